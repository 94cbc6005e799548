"""OTBTF-compatible applications (pyotb-style facade) over terrapatch's Python API.

``terrapatch.apps.PatchesExtraction(n_sources=2, source1_il=..., ...)`` accepts the
parameter keys OTBTF users know, in underscore or dotted spelling, or as a dict,
and runs as soon as its outputs are given (or on ``.write(...)``). Each
application lives in its own module and is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from terrapatch.apps._base import App, Param

#: Application name → "module:class".
REGISTRY: dict[str, str] = {
    "PatchesExtraction": "terrapatch.apps.extraction:PatchesExtraction",
    "TensorflowModelServe": "terrapatch.apps.serve:TensorflowModelServe",
    "PatchesSelection": "terrapatch.apps.selection:PatchesSelection",
    "LabelImageSampleSelection": "terrapatch.apps.selection:LabelImageSampleSelection",
    "DensePolygonClassStatistics": "terrapatch.apps.selection:DensePolygonClassStatistics",
    "PolygonSampleSelection": "terrapatch.apps.selection:PolygonSampleSelection",
    "ComputeConfusionMatrix": "terrapatch.apps.evaluation:ComputeConfusionMatrix",
    "TrainClassifierFromDeepFeatures":
        "terrapatch.apps.deepfeatures:TrainClassifierFromDeepFeatures",
    "ImageClassifierFromDeepFeatures":
        "terrapatch.apps.deepfeatures:ImageClassifierFromDeepFeatures",
}

__all__ = ["REGISTRY", "App", "Param", "get_app", *REGISTRY]


def get_app(name: str) -> type[App]:
    """Return the application class registered under ``name``."""
    target = REGISTRY[name]
    module_name, _, attr = target.partition(":")
    cls: type[App] = getattr(importlib.import_module(module_name), attr)
    return cls


def __getattr__(name: str) -> Any:
    if name in REGISTRY:
        return get_app(name)
    raise AttributeError(f"module 'terrapatch.apps' has no attribute {name!r}")
