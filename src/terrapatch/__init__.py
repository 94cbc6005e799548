"""terrapatch: deep learning on multi-source remote-sensing rasters.

Patch extraction from N sources at their own resolutions, training on Keras 3,
and streaming inference over whole rasters (patch-based or fully-convolutional),
with OTBTF's parameter names. ``import terrapatch as otbtf`` gives the training
API OTBTF users know (``DatasetFromPatchesImages``, ``ModelBase``, ``layers``,
``ops``, ``TFRecords``); heavy modules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'terrapatch' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
