"""terrapatch: deep learning on multi-source remote-sensing rasters.

Patch extraction from N sources at their own resolutions, training on Keras 3,
and streaming inference over whole rasters (patch-based or fully-convolutional),
with OTBTF's parameter names. ``import terrapatch as otbtf`` gives the training
API OTBTF users know (``DatasetFromPatchesImages``, ``ModelBase``, ``layers``,
``ops``, ``TFRecords``); heavy modules are imported on first use.

``import terrapatch`` imports neither TensorFlow nor Keras: extraction, selection
and ONNX serving run on the core install; the training API and SavedModel /
``.keras`` serving need ``pip install 'terrapatch[tensorflow]'``. Importing the
package sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless it is set, so that TensorFlow,
when some part of terrapatch loads it, starts without its C++ log lines.
"""

from __future__ import annotations

import importlib
from typing import Any

from terrapatch._optional import (
    EXTRAS,
    missing_extra_message,
    set_tensorflow_log_level,
    tensorflow_startup,
)
from terrapatch.errors import MissingExtraError

__version__ = "0.1.0"

set_tensorflow_log_level()

# public name -> "module:attribute" (attribute empty for a module)
_LAZY: dict[str, str] = {
    "Source": "terrapatch.raster:Source",
    "extract_patches": "terrapatch.extraction:extract_patches",
    "ExtractionSummary": "terrapatch.extraction:ExtractionSummary",
    "serve": "terrapatch.serve:serve",
    "DatasetFromPatchesImages": "terrapatch.dataset:DatasetFromPatchesImages",
    "PatchesImagesReader": "terrapatch.dataset:PatchesImagesReader",
    "TFRecords": "terrapatch.tfrecords:TFRecords",
    "ModelBase": "terrapatch.model:ModelBase",
    "export_model": "terrapatch.export:export_model",
    "layers": "terrapatch.layers:",
    "ops": "terrapatch.ops:",
    "metrics": "terrapatch.metrics:",
    "apps": "terrapatch.apps:",
    "testing": "terrapatch.testing:",
}

__all__ = ["__version__", *_LAZY]

#: Modules of :data:`_LAZY` that import TensorFlow or Keras (loaded in tensorflow_startup).
_TF_MODULES = frozenset({"terrapatch.dataset", "terrapatch.tfrecords", "terrapatch.model",
                         "terrapatch.export", "terrapatch.layers", "terrapatch.ops",
                         "terrapatch.metrics"})


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'terrapatch' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    if module_name in _TF_MODULES:
        try:
            with tensorflow_startup():
                module = importlib.import_module(module_name)
        except ImportError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            message, extra = missing_extra_message(
                (top,), f"terrapatch.{name}", str(exc).strip().splitlines()[0])
            raise MissingExtraError(message, extra=extra, package=top) from None
    else:
        module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
