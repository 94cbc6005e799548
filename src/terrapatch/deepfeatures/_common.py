"""Shared pieces of the deep-features package: names, limits, the classical extra."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from terrapatch.errors import MissingExtraError

PathLike = str | os.PathLike[str]

#: Classifiers known by name (any scikit-learn classifier instance is accepted too).
CLASSIFIERS = ("rf", "svm", "knn", "dt", "bayes")
#: ``format`` entry of a saved bundle.
BUNDLE_FORMAT = "terrapatch-deep-features-classifier"
#: Bytes of patches (all sources) run through the model at once when sampling.
FEATURE_BATCH_BYTES = 64 * 2**20
#: Most patches per model call when sampling.
FEATURE_BATCH = 4096
#: Output names of a :class:`ClassifierEngine`.
CLASSES_OUTPUT = "classes"
PROBABILITIES_OUTPUT = "probabilities"
#: Top-level modules whose classes a classifier file may hold.
TRUSTED_MODULES = ("sklearn", "numpy")

# Classifier files are an output kind of their own (checked like every output).


def _classical(what: str) -> tuple[ModuleType, ModuleType]:
    """Import scikit-learn and skops, or raise naming the ``classical`` extra."""
    try:
        sklearn = importlib.import_module("sklearn")
        skops_io = importlib.import_module("skops.io")
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs scikit-learn and skops, which cannot be imported here "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else 'ImportError'}); "
            "install them with pip install 'terrapatch[classical]'",
            extra="classical", package=exc.name,
        ) from None
    return sklearn, skops_io
