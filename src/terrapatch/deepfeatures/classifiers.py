"""Classical classifiers on deep features: train, save and load safely, cache."""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import terrapatch
from terrapatch.deepfeatures._common import (
    BUNDLE_FORMAT,
    CLASSIFIERS,
    TRUSTED_MODULES,
    PathLike,
    _classical,
)
from terrapatch.deepfeatures.features import FeatureModel, _as_features
from terrapatch.errors import (
    InputError,
    MissingInputError,
    ModelError,
)
from terrapatch.serve.caches import worker_name
from terrapatch.writer import (
    atomic_output,
)


def _estimator(name: str, params: Mapping[str, Any], seed: int) -> Any:
    """A new scikit-learn classifier for a :data:`CLASSIFIERS` name."""
    _classical(f"classifier {name!r}")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    kwargs = dict(params)
    try:
        if name == "rf":
            kwargs = {"n_estimators": 100, "n_jobs": 1, "random_state": seed, **kwargs}
            return RandomForestClassifier(**kwargs)
        if name == "dt":
            return DecisionTreeClassifier(**{"random_state": seed, **kwargs})
        if name == "svm":  # features on very different scales: standardised first
            return make_pipeline(StandardScaler(), SVC(**{"random_state": seed, **kwargs}))
        if name == "knn":
            return make_pipeline(StandardScaler(), KNeighborsClassifier(**kwargs))
        if name == "bayes":
            return GaussianNB(**kwargs)
    except TypeError as exc:
        raise InputError(f"classifier: {name}: {exc}") from None
    raise InputError(f"classifier: {name!r} is not one of {', '.join(CLASSIFIERS)} "
                     "(or a scikit-learn classifier)")


def train_classifier(features: np.ndarray, labels: np.ndarray, classifier: Any = "rf",
                     params: Mapping[str, Any] | None = None, seed: int = 0) -> Any:
    """Fit a classifier on feature vectors.

    Parameters
    ----------
    features
        ``(n, C)`` feature vectors.
    labels
        ``(n,)`` integer classes (at least two distinct).
    classifier
        ``"rf"`` (random forest, 100 trees), ``"svm"`` (RBF SVM on standardised
        features), ``"knn"`` (k nearest neighbours on standardised features), ``"dt"``
        (decision tree), ``"bayes"`` (Gaussian naive Bayes), or a scikit-learn
        classifier instance (cloned, then fitted).
    params
        Keyword arguments of the scikit-learn estimator (``{"n_estimators": 200}``,
        ``{"C": 10}``); not with an instance.
    seed
        ``random_state`` of the estimators that take one.

    Returns
    -------
    estimator
        The fitted scikit-learn estimator.

    Raises
    ------
    InputError
        For mismatched or non-finite inputs, a single class, or an unknown classifier.
    """
    x = _as_features(np.asarray(features))
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise InputError(f"features: shape {x.shape} does not fit labels of shape {y.shape} "
                         "(expected (n, C) and (n,))")
    if x.shape[0] == 0:
        raise InputError("features: no sample to train on")
    if not np.isfinite(x).all():
        raise InputError("features: NaN or infinite values")
    if y.dtype.kind not in "iu":
        raise InputError(f"labels: classes must be integers, got {y.dtype.name}")
    info = np.iinfo(np.int32)
    if y.min() < info.min or y.max() > info.max:
        raise InputError("labels: classes must fit a 32-bit integer")
    if len(np.unique(y)) < 2:
        raise InputError(f"labels: only one class ({int(y[0])}) among the {len(y)} samples; "
                         "a classifier needs at least two")
    if isinstance(classifier, str):
        estimator = _estimator(classifier.lower(), params or {}, seed)
    else:
        _classical("classifier")
        from sklearn.base import clone, is_classifier

        if params:
            raise InputError("params: give the parameters in the classifier instance")
        if not is_classifier(classifier):
            raise InputError(f"classifier: {type(classifier).__name__} is not a scikit-learn "
                             "classifier")
        estimator = clone(classifier)
    try:
        estimator.fit(x, y.astype(np.int64))
        estimator.predict(x[:1])  # e.g. k nearest neighbours with k > samples fails here
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "ValueError"
        raise InputError(f"classifier: cannot train on {len(y)} samples × {x.shape[1]} "
                         f"features: {reason}") from None
    return estimator


# ---------------------------------------------------------------------- saving and loading


@dataclass(frozen=True)
class ClassifierBundle:
    """A fitted classifier and what its features are.

    Attributes
    ----------
    estimator
        The fitted scikit-learn classifier.
    n_features
        Length of the feature vectors it was trained on.
    feature_output
        Name of the model output the features came from.
    classes
        Its classes, in its order.
    fields
        Receptive field of each source at training (the classification default).
    spcscale
        Sampling-grid factor at training.
    classifier
        The classifier's name (``"rf"``) or class name.
    terrapatch_version
        Version that trained it.
    """

    estimator: Any
    n_features: int
    feature_output: str
    classes: tuple[int, ...]
    fields: tuple[tuple[int, int], ...] = ()
    spcscale: int = 1
    classifier: str = "rf"
    terrapatch_version: str = terrapatch.__version__

    @classmethod
    def of(cls, estimator: Any, model: FeatureModel, classifier: Any = "rf"
           ) -> ClassifierBundle:
        """The bundle of an estimator fitted on ``model``'s features."""
        name = classifier if isinstance(classifier, str) else type(classifier).__name__
        return cls(estimator, model.channels, model.output,
                   tuple(int(c) for c in estimator.classes_), model.fields, model.spcscale,
                   name)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class of each feature vector ``(n, C)`` → ``(n,)`` int32."""
        x = _as_features(features)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InputError(f"features: shape {x.shape}; the classifier takes "
                             f"(n, {self.n_features})")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.int32)
        return np.asarray(self.estimator.predict(x)).astype(np.int32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of each class (in :attr:`classes` order) → ``(n, K)`` float32."""
        x = _as_features(features)
        if not hasattr(self.estimator, "predict_proba"):
            raise InputError(f"classifier: {self.classifier} gives no class probabilities")
        if x.shape[0] == 0:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        return np.asarray(self.estimator.predict_proba(x), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The dict saved in the skops file (plain Python and scikit-learn objects only)."""
        return {"format": BUNDLE_FORMAT, "estimator": self.estimator,
                "n_features": int(self.n_features), "feature_output": str(self.feature_output),
                "classes": [int(c) for c in self.classes],
                "fields": [[int(a), int(b)] for a, b in self.fields],
                "spcscale": int(self.spcscale), "classifier": str(self.classifier),
                "terrapatch_version": str(self.terrapatch_version)}


def trusted_type(name: str) -> bool:
    """Whether a type named in a skops file may be loaded: a scikit-learn or NumPy class.

    The name must resolve, in an already importable module of those packages, to a
    class (not a function or any other object).
    """
    module, _, attr = name.rpartition(".")
    if not module or module.split(".")[0] not in TRUSTED_MODULES:
        return False
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    return isinstance(obj, type)


def _untrusted(types: Sequence[str]) -> list[str]:
    return sorted(t for t in types if not trusted_type(t))


def save_classifier(bundle: ClassifierBundle, path: PathLike, parameter: str = "out") -> Path:
    """Write the bundle as a skops file, atomically; return its path.

    Raises
    ------
    InputError
        If the estimator holds types :func:`load_classifier` would refuse (not
        scikit-learn or NumPy classes).
    """
    _, sio = _classical(f"{parameter}: saving a classifier")
    data = sio.dumps(bundle.to_dict())
    refused = _untrusted(sio.get_untrusted_types(data=data))
    if refused:
        raise InputError(f"{parameter}: the classifier holds types terrapatch refuses to load "
                         f"({', '.join(refused)}); use scikit-learn estimators")
    with atomic_output(path, parameter) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def _bundle_error(parameter: str, path: PathLike, why: str) -> InputError:
    return InputError(f"{parameter}: {os.fspath(path)!r} is not a terrapatch classifier "
                      f"({why})")


def load_classifier(path: PathLike, parameter: str = "classifier") -> ClassifierBundle:
    """Load a classifier saved by :func:`save_classifier`, safely.

    The file is read with :func:`skops.io.load`; it is loaded only when every type it
    holds beyond skops' own defaults is a scikit-learn or NumPy class
    (:func:`trusted_type`). Anything else (a class of another package, a function) is
    refused before any object is built. Pickles are never loaded.

    Raises
    ------
    MissingInputError
        If the file does not exist.
    InputError
        For a file that is not a skops file, holds an untrusted type, or is not a
        terrapatch classifier.
    """
    _, sio = _classical(f"{parameter}: loading a classifier")
    text = os.fspath(path)
    if not os.path.isfile(text):
        what = "is a directory" if os.path.isdir(text) else "does not exist"
        raise MissingInputError(f"{parameter}: classifier {text!r} {what}")
    try:
        types = list(sio.get_untrusted_types(file=text))
    except Exception as exc:  # zipfile.BadZipFile, KeyError, JSON errors: not a skops file
        raise _bundle_error(parameter, text, f"not a skops file: {type(exc).__name__}") \
            from None
    refused = _untrusted(types)
    if refused:
        raise InputError(
            f"{parameter}: {text!r} holds types terrapatch does not load: {', '.join(refused)} "
            "(only scikit-learn and NumPy classes are trusted); it was not loaded"
        )
    try:
        data = sio.load(text, trusted=types)
    except Exception as exc:
        raise _bundle_error(parameter, text, f"skops cannot load it: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise _bundle_error(parameter, text, "no terrapatch bundle inside")
    estimator = data.get("estimator")
    from sklearn.base import is_classifier

    if not is_classifier(estimator) or not hasattr(estimator, "classes_"):
        raise _bundle_error(parameter, text, "its estimator is not a fitted classifier")
    try:
        bundle = ClassifierBundle(
            estimator, int(data["n_features"]), str(data["feature_output"]),
            tuple(int(c) for c in data["classes"]),
            tuple((int(a), int(b)) for a, b in data.get("fields", ())),
            int(data.get("spcscale", 1)), str(data.get("classifier", "")),
            str(data.get("terrapatch_version", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise _bundle_error(parameter, text, f"bad entry {exc}") from None
    n_in = getattr(estimator, "n_features_in_", bundle.n_features)
    if int(n_in) != bundle.n_features:
        raise _bundle_error(parameter, text, f"its estimator takes {n_in} features, the "
                            f"bundle says {bundle.n_features}")
    return bundle


_BUNDLES: dict[str, tuple[tuple[int, int], ClassifierBundle]] = {}
_BUNDLES_LOCK = threading.Lock()


def _stamp(path: str, parameter: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        raise ModelError(f"{parameter}: classifier {path!r} does not exist on "
                         f"{worker_name()} (it must be visible to every worker at the same "
                         "path)") from None
    return (stat.st_mtime_ns, stat.st_size)


def cached_classifier(path: str, stamp: tuple[int, int] | None = None,
                      parameter: str = "classifier") -> ClassifierBundle:
    """The classifier at ``path``, loaded once per process (again when the file changes).

    With ``stamp`` (``(mtime_ns, size)`` seen when the run started), a file changed
    since is an error: every tile of a map must come from the same classifier.
    """
    current = _stamp(path, parameter)
    if stamp is not None and tuple(stamp) != current:
        raise ModelError(f"{parameter}: classifier {path!r} changed since the run started "
                         f"(on {worker_name()})")
    with _BUNDLES_LOCK:
        cached = _BUNDLES.get(path)
        if cached is not None and cached[0] == current:
            return cached[1]
    bundle = load_classifier(path, parameter)
    with _BUNDLES_LOCK:
        _BUNDLES[path] = (current, bundle)
    return bundle


# ---------------------------------------------------------------------- the classifier engine


def check_feature_size(bundle: ClassifierBundle, channels: int, output: str) -> None:
    """Refuse a classifier trained on another number of features than the model gives.

    Raises
    ------
    InputError
        Naming ``classifier`` (and the model's ``feature_output``).
    """
    if channels != bundle.n_features:
        raise InputError(
            f"classifier: the classifier was trained on {bundle.n_features} features "
            f"(output {bundle.feature_output!r}), but feature_output {output!r} gives "
            f"{channels} per pixel"
        )
