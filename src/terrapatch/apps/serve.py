"""TensorflowModelServe application: OTBTF's parameter keys over :func:`terrapatch.serve.serve`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from terrapatch.apps._base import (
    MODEL_SOURCE_NAMES,
    App,
    Param,
    efield_and_tile_size,
    model_sources,
)
from terrapatch.errors import InputError
from terrapatch.progress import logger
from terrapatch.serve import Normalization, ServeSummary, serve

_NUMERIC = set("-0123456789.")

#: OTBTF spelling of the neutral identifiers the serving core names
#: (:func:`terrapatch.serve.serve`'s keywords), sources included.
SERVE_NAMES = {
    **MODEL_SOURCE_NAMES,
    "model": "model.dir",
    "user_placeholders": "model.userplaceholders",
    "fullyconv": "model.fullyconv",
    "model_layout": "model.layout",
    "output_names": "output.names",
    "spcscale": "output.spcscale",
    "efield": "output.efieldx/y",
    "efield[0]": "output.efieldx",
    "efield[1]": "output.efieldy",
    "margin": "output.margin",
    "coverage": "output.coverage",
    "padding": "output.padding",
    "argmax": "output.argmax",
    "threshold": "output.threshold",
    "below_threshold": "output.belowvalue",
    "background": "output.bv",
    "disable_tiling": "optim.disabletiling",
    "tile_size": "optim.tilesizex/y",
    "tile_size[0]": "optim.tilesizex",
    "tile_size[1]": "optim.tilesizey",
    "tile_batch": "optim.tilebatch",
    "device": "--device",
    "resume": "--resume",
    "workers": "--workers",
    "scheduler": "--dask-scheduler",
    "serving": "TensorflowModelServe",  # the core's name for itself in cluster errors
}


def parse_user_placeholders(entries: Sequence[str], parameter: str = "model.userplaceholders"
                            ) -> dict[str, np.ndarray]:
    """Parse ``model.userplaceholders`` entries the way OTBTF does (errors name ``parameter``).

    Each entry is ``name=value``: a scalar gives a tensor of shape ``[1]``, ``(v1, v2,
    ...)`` a tensor of shape ``[n]``. Values made only of ``-0123456789.`` are numeric
    (float32 if any has a ``.``, else int32); otherwise each must be ``true`` or
    ``false`` (bool).

    Examples
    --------
    >>> parse_user_placeholders(["scale=0.5", "ids=(1, 2)"])["ids"]
    array([1, 2], dtype=int32)
    """
    values: dict[str, np.ndarray] = {}
    for entry in entries:
        name, sep, text = entry.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise InputError(
                f"{parameter}: {entry!r} is not of the form name=value, "
                "name=(v1, v2, ...) or name=true|false"
            )
        if text.startswith("(") or text.endswith(")"):
            if not (text.startswith("(") and text.endswith(")")) or text.count("(") != 1 \
                    or text.count(")") != 1:
                raise InputError(
                    f"{parameter}: {entry!r}: error parsing vector expression "
                    "(missing parentheses?)"
                )
            items = [item.strip() for item in text[1:-1].split(",")]
        else:
            items = [text]
        if any(not item for item in items):
            raise InputError(f"{parameter}: {entry!r}: empty element")
        if all(set(item) <= _NUMERIC for item in items):
            is_float = any("." in item for item in items)
            try:
                array = np.array([float(i) if is_float else int(i) for i in items],
                                 dtype=np.float32 if is_float else np.int32)
            except ValueError:
                raise InputError(f"{parameter}: {entry!r}: "
                                 "not a number") from None
        elif all(item.lower() in ("true", "false") for item in items):
            array = np.array([item.lower() == "true" for item in items], dtype=bool)
        else:
            raise InputError(
                f"{parameter}: {entry!r}: values must be numbers or true/false"
            )
        values[name] = array
    return values


class TensorflowModelServe(App):
    """Apply a model to N sources and write the map (OTBTF ``TensorflowModelServe``).

    Examples
    --------
    >>> from terrapatch.apps import TensorflowModelServe  # doctest: +SKIP
    >>> TensorflowModelServe(
    ...     n_sources=2,
    ...     source1_il="s2_10m.tif", source1_rfieldx=16, source1_rfieldy=16,
    ...     source1_placeholder="input_10m",
    ...     source2_il="s2_20m.tif", source2_rfieldx=8, source2_rfieldy=8,
    ...     source2_placeholder="input_20m",
    ...     model_dir="model_savedmodel", model_fullyconv=True,
    ...     output_names="estimated_labels", output_spcscale=2,
    ... ).write("map.tif", pixel_type="uint8", ext_fname="box=2000:2000:500:500")
    """

    name = "TensorflowModelServe"
    description = ("apply a deep learning model (SavedModel, .keras or ONNX) to N sources, "
                   "patch-based or fully-convolutional, and write a GeoTIFF map")
    primary_output = "out"
    supports_cluster = True
    supports_resume = True
    supports_device = True
    spelling = SERVE_NAMES
    source_params = (
        Param("il", "paths", "input image(s), stacked as bands", required=True),
        Param("rfieldx", "int", "receptive field width in this source's pixels "
              "(default: derived from the model)"),
        Param("rfieldy", "int", "receptive field height (default: rfieldx, or derived)"),
        Param("placeholder", "str", "model input fed by this source "
              "(default: the free inputs in alphabetical order)"),
        Param("nodata", "float", "skip tiles whose input from this source is entirely this "
              "value (filled with output.bv)"),
        Param("scale", "strs", "multiply this source's values before the model: one value "
              "or one per band (e.g. 0.00392 for /255)"),
        Param("offset", "strs", "then add this (one value or one per band)"),
        Param("mean", "strs", "then subtract this per-band mean (one value or one per band)"),
        Param("std", "strs", "then divide by this per-band standard deviation"),
    )
    params = (
        Param("model.dir", "path", "SavedModel directory, .keras, .onnx, .pt2 (torch.export) "
              "or .pt (TorchScript) file; what it records (docs/models.md) fills the "
              "parameters left out", required=True),
        Param("model.userplaceholders", "strs", "extra model inputs: name=value, "
              "name=(v1, v2...), name=true|false"),
        Param("model.fullyconv", "bool", "fully-convolutional mode (one tensor per tile; "
              "default: recorded in the model, else off)"),
        Param("model.layout", "choice", "image tensors channels last (nhwc: TensorFlow, "
              "Keras) or first (nchw: PyTorch exports); default: detected from the model",
              choices=("nhwc", "nchw")),
        Param("model.tagsets", "strs", "SavedModel tags (accepted for compatibility; the "
              "serving signature is used)"),
        Param("output.names", "strs", "model outputs stacked as bands "
              "(default: first output in alphabetical order)"),
        Param("output.spcscale", "float", "output spacing in source-1 pixels: an integer k, "
              "or 1/k (0.5, 0.25) for super-resolution (default: recorded in the model, "
              "else 1)"),
        Param("output.efieldx", "int", "expression field width (default: derived from the "
              "model in fully-convolutional mode, 1 otherwise)"),
        Param("output.efieldy", "int", "expression field height (default: efieldx)"),
        Param("output.margin", "int", "output pixels by which tiles overlap, computed and "
              "cropped (default: the halo measured for same-padded models, else 0)"),
        Param("output.coverage", "choice", "inset: pixels whose receptive fields lie inside "
              "every source (OTBTF); full: source 1's whole extent, windows padded past the "
              "edges (default: full for same-padded models, else inset)",
              choices=("inset", "full")),
        Param("output.padding", "str", "fill of windows past the edges under full "
              "coverage: reflect, or a constant value", default="reflect"),
        Param("output.argmax", "bool", "write the class index of the highest score of each "
              "output instead of the scores", default=False),
        Param("output.threshold", "float", "with output.argmax: pixels whose highest score "
              "is below this (in [0, 1]) get output.belowvalue"),
        Param("output.belowvalue", "float", "value of pixels below output.threshold",
              default=255.0),
        Param("output.bv", "float", "value of skipped (no-data) tiles, also written as the "
              "output's nodata (unset: 0, and no nodata value)"),
        Param("optim.disabletiling", "bool", "compute the whole output as one tile",
              default=False),
        Param("optim.tilesizex", "int", "tile width in output pixels (default 256 "
              "fully-convolutional, 64 patch-based)"),
        Param("optim.tilesizey", "int", "tile height (default: tilesizex)"),
        Param("optim.tilebatch", "int", "fully-convolutional tiles of one size stacked into "
              "one model call (default 1; a GPU is better fed with several)"),
        Param("out", "out", "output map: .tif (add ?&gdal:of:COG for a Cloud-Optimized "
              "GeoTIFF with overviews) or .vrt (a mosaic of block files)", required=True,
              pixel_type="float32"),
    )

    def run(self) -> ServeSummary:
        """Serve the model."""
        sources = model_sources(self)
        normalizations = [self._normalization(int(s.name[len("source"):]))
                          for s in sources]
        spcscale = self.get("output.spcscale")
        efield, tile_size = efield_and_tile_size(self)
        if self.get("model.tagsets"):
            logger.info("model.tagsets ignored: the SavedModel's serving signature is used")
        out = self.output("out")
        assert out is not None  # required parameter, checked by App
        placeholders = parse_user_placeholders(self.get("model.userplaceholders") or ())
        return serve(
            sources,
            self.get("model.dir"),
            out.path,
            output_names=list(self.get("output.names") or ()),
            fullyconv=self.get("model.fullyconv"),
            spcscale=spcscale,
            efield=efield,
            tile_size=tile_size,
            box=out.ext.box,
            pixel_type=out.pixel_type,
            background=self.get("output.bv"),
            creation_options=out.ext.creation_options or None,
            quiet=self.quiet,
            user_placeholders=placeholders,
            disable_tiling=bool(self.get("optim.disabletiling")),
            scheduler=self.scheduler,
            workers=self.workers,
            resume=self.resume,
            output_format=out.ext.driver,
            model_layout=self.get("model.layout"),
            margin=self.get("output.margin"),
            coverage=self.get("output.coverage"),
            padding=self.get("output.padding"),
            normalization=normalizations,
            argmax=bool(self.get("output.argmax")),
            threshold=self.get("output.threshold"),
            below_threshold=self.get("output.belowvalue"),
            tile_batch=self.get("optim.tilebatch"),
            device=self.device or "auto",
        )

    def _normalization(self, k: int) -> Normalization | None:
        """``sourceK.scale/offset/mean/std`` as a normalisation (None when none is given)."""
        fields: dict[str, float | list[float]] = {}
        for name in ("scale", "offset", "mean", "std"):
            items = self.source(k, name)
            if not items:
                continue
            try:
                values = [float(v) for v in items]
            except ValueError:
                raise InputError(f"source{k}.{name}: {' '.join(items)!r} is not a list of "
                                 "numbers") from None
            fields[name] = values[0] if len(values) == 1 else values
        return Normalization(**fields) if fields else None
