"""STAC Machine Learning Model (MLM v1.4) Items describing exported models.

:func:`mlm_item` turns a model's :class:`~terrapatch.contract.ServingContract` into a
STAC Item with the `MLM extension <https://github.com/stac-extensions/mlm>`_ (through
``pystac.extensions.mlm``, the ``mlm`` extra); :func:`write_mlm_item` writes it beside
the model as ``<model file name>.stac.json`` (:func:`mlm_item_path`).

What goes where:

- ``mlm:name``, ``mlm:architecture``, ``mlm:tasks``, ``mlm:framework`` (+ version);
- ``mlm:input``, one per source: its model input name, band names, ``input.shape``
  (``-1`` batch, the receptive field, the bands) in the model's ``dim_order``, the
  data type, and the normalisation as ``value_scaling`` (z-score objects: every
  ``((x·scale + offset) - mean) / std`` is ``(x - m) / s`` per band);
- ``mlm:output``: name, tasks, ``result`` shape (``-1`` batch, the expression field,
  the channels) and ``classification:classes`` (value, name, ``color_hint``);
- the model asset (``mlm:model`` role, ``mlm:artifact_type``, its media type), with
  the band names as STAC 1.1 ``bands`` when the contract names them;
- what MLM has no field for, under a ``terrapatch:`` prefix: in each input
  ``terrapatch:receptive_field``, ``terrapatch:spacing``, ``terrapatch:nodata``; in each
  output ``terrapatch:expression_field``, ``terrapatch:spcscale``; in the properties
  ``terrapatch:kind`` and the whole contract as ``terrapatch:contract``.

Geometry and bbox default to null (a model is not tied to a place) and the datetime
to the time of the export.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.contract import ContractInput, ContractOutput, ServingContract
from terrapatch.errors import InputError, MissingExtraError
from terrapatch.writer import atomic_output

__all__ = ["ARTIFACT_TYPES", "ITEM_SUFFIX", "MEDIA_TYPES", "mlm_item", "mlm_item_path",
           "write_mlm_item"]

#: Suffix of the Item written beside a model (``model.onnx`` → ``model.onnx.stac.json``).
ITEM_SUFFIX = ".stac.json"
#: Model kind → ``mlm:artifact_type`` (the call that wrote the file; MLM best practices).
ARTIFACT_TYPES = {"onnx": "onnx.save", "savedmodel": "tf.saved_model.save",
                  "keras": "keras.Model.save", "pt2": "torch.export.save",
                  "pt": "torch.jit.save"}
#: Model kind → media type of the model asset.
MEDIA_TYPES = {
    "onnx": "application/octet-stream; framework=onnx; profile=onnx",
    "savedmodel": "application/octet-stream; framework=tensorflow; profile=savedmodel",
    "keras": "application/octet-stream; framework=keras; profile=keras",
    "pt2": "application/octet-stream; framework=pytorch; profile=torch.export",
    "pt": "application/octet-stream; framework=pytorch; profile=torchscript",
}
#: Framework names as MLM spells them.
_FRAMEWORKS = {"onnx": "ONNX", "tensorflow": "TensorFlow", "keras": "Keras",
               "pytorch": "PyTorch", "torch": "PyTorch", "jax": "JAX"}


def _mlm() -> Any:
    try:
        from pystac.extensions import mlm
    except ImportError as exc:
        raise MissingExtraError(
            "mlm_item: describing a model as a STAC MLM Item needs pystac's MLM extension "
            f"(pystac-ext-mlm), which cannot be imported here ({exc}); install it with "
            "pip install 'terrapatch[mlm]'", extra="mlm", package="pystac.extensions.mlm"
        ) from None
    return mlm


def model_kind(model_path: str | os.PathLike[str]) -> str:
    """``onnx``, ``savedmodel``, ``keras``, ``pt2`` or ``pt`` for a model path.

    Raises
    ------
    InputError
        For another kind of file.
    """
    target = Path(model_path)
    if target.is_dir():
        return "savedmodel"
    kind = target.suffix.lower().lstrip(".")
    if kind == "pth":
        kind = "pt"
    if kind not in ARTIFACT_TYPES:
        raise InputError(f"model: {os.fspath(model_path)!r} is not an ONNX, SavedModel, "
                         ".keras, .pt2 or .pt model")
    return kind


def mlm_item_path(model_path: str | os.PathLike[str]) -> Path:
    """Where :func:`write_mlm_item` writes: ``model.onnx`` → ``model.onnx.stac.json``."""
    target = Path(os.path.abspath(model_path))
    return target.with_name(target.name + ITEM_SUFFIX)


def _semver(version: str | None) -> str | None:
    """``"2.18"`` → ``"2.18.0"``, ``"2.13.0+cpu"`` kept; None if no version number."""
    if not version:
        return None
    match = re.match(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(\+[0-9A-Za-z.-]+)?", version)
    if match is None:
        return None
    parts = [str(int(p or 0)) for p in match.groups()[:3]]
    return ".".join(parts) + (match.group(4) or "")


def _model_name(text: str) -> str:
    """A name matching MLM's pattern (letters first, alphanumeric last)."""
    name = re.sub(r"[^a-zA-Z0-9_.\- ]", "-", text).strip("-_. ")
    if not name or not name[0].isalpha():
        name = f"model-{name}" if name else "model"
    return name if len(name) >= 3 else f"{name}-model"


def _tasks(contract: ServingContract) -> list[str]:
    tasks: list[str] = []
    if any(o.spcscale < 1 for o in contract.outputs):
        tasks.append("super-resolution")
    if any(o.classes for o in contract.outputs):
        tasks += ["classification", "semantic-segmentation"]
    return tasks or ["regression"]


def _dims(layout: str, height: int, width: int, channels: int) -> tuple[list[int], list[str]]:
    if layout == "nchw":
        return [-1, channels, height, width], ["batch", "channel", "height", "width"]
    return [-1, height, width, channels], ["batch", "height", "width", "channel"]


def _value_scaling(item: ContractInput) -> list[dict[str, Any]] | None:
    """The normalisation as per-band (or one broadcast) z-score value scaling objects."""
    if item.normalization is None or item.normalization.identity:
        return None
    a, b = item.normalization.coefficients(item.bands, item.placeholder)
    if (a == 0).any():
        return None  # a constant input: no z-score form; kept in terrapatch:contract
    mean, stddev = -b / a, 1.0 / a
    objects = [{"type": "z-score", "mean": float(m), "stddev": float(s)}
               for m, s in zip(mean, stddev, strict=True)]
    if np.allclose(mean, mean[0]) and np.allclose(stddev, stddev[0]):
        return objects[:1]
    return objects


def _input(mlm: Any, item: ContractInput) -> Any:
    rx, ry = item.receptive_field
    shape, order = _dims(item.layout, ry, rx, item.bands)
    structure = mlm.InputStructure.create(shape=shape, dim_order=order, data_type=item.dtype)
    model_input = mlm.ModelInput.create(
        name=item.placeholder, bands=list(item.band_names or []), input=structure,
        description=f"source fed to model input {item.placeholder!r}")
    fields = model_input.properties
    scaling = _value_scaling(item)
    if scaling is not None:
        fields["value_scaling"] = scaling
    fields["terrapatch:receptive_field"] = [rx, ry]
    if item.spacing is not None:
        fields["terrapatch:spacing"] = list(item.spacing)
    if item.nodata is not None:
        fields["terrapatch:nodata"] = item.nodata
    return model_input


def _output(mlm: Any, item: ContractOutput, tasks: Sequence[str], layout: str) -> Any:
    from pystac.extensions.classification import Classification

    ex, ey = item.expression_field
    shape, order = _dims(layout, ey, ex, item.bands or -1)
    result = mlm.ResultStructure.create(shape=shape, dim_order=order, data_type=item.dtype)
    classes = None
    if item.classes:
        classes = [Classification.create(value=c.value, description=c.name, name=c.name,
                                         color_hint=None if c.color is None
                                         else c.color[1:].upper())
                   for c in item.classes]
    output = mlm.ModelOutput.create(name=item.name, tasks=list(tasks), result=result,
                                    classes=classes)
    output.properties["terrapatch:expression_field"] = [ex, ey]
    output.properties["terrapatch:spcscale"] = item.spcscale
    return output


def mlm_item(contract: ServingContract, model_path: str | os.PathLike[str], *,
             item_id: str | None = None, name: str | None = None,
             architecture: str | None = None, tasks: Sequence[str] | None = None,
             description: str | None = None, geometry: dict[str, Any] | None = None,
             bbox: Sequence[float] | None = None,
             datetime: dt.datetime | None = None) -> Any:
    """A STAC Item (``pystac.Item``) with the MLM extension describing a model.

    Parameters
    ----------
    contract
        The model's serving contract.
    model_path
        The model (its file name is the asset's href, relative to the Item beside it).
    item_id, name
        Item id and ``mlm:name`` (default: the contract's name, else the file name).
    architecture
        ``mlm:architecture`` (default ``"fully convolutional network"`` or
        ``"convolutional neural network"`` after the contract's kind).
    tasks
        ``mlm:tasks`` (default: ``super-resolution`` when an output's spcscale is below
        1, ``classification`` and ``semantic-segmentation`` when an output has classes,
        else ``regression``).
    description
        Item description.
    geometry, bbox
        Where the model applies (GeoJSON, WGS 84), default null.
    datetime
        Default: now (the export), in UTC.

    Raises
    ------
    MissingExtraError
        If pystac's MLM extension is not installed (the ``mlm`` extra).
    InputError
        If the model path is not a model kind terrapatch writes.
    """
    mlm = _mlm()
    import pystac

    kind = model_kind(model_path)
    target = Path(model_path)
    stem = target.name if kind == "savedmodel" else target.stem
    when = datetime or dt.datetime.now(dt.UTC)
    if bbox is not None and geometry is None:
        raise InputError("bbox: a bbox needs a geometry too (STAC requires both or neither)")
    item = pystac.Item(
        id=item_id or contract.name or stem, geometry=geometry,
        bbox=None if bbox is None else list(bbox), datetime=when,
        properties={"description": description or
                    f"{contract.kind} model {target.name!r} exported by terrapatch"})
    model_tasks = list(tasks) if tasks is not None else _tasks(contract)
    layout = contract.inputs[0].layout
    framework = _FRAMEWORKS.get(contract.framework.name.lower(), contract.framework.name)
    ext = mlm.MLMExtension.ext(item, add_if_missing=True)
    ext.apply(
        name=_model_name(name or contract.name or stem),
        architecture=architecture or ("fully convolutional network" if contract.fullyconv
                                      else "convolutional neural network"),
        tasks=model_tasks,
        input=[_input(mlm, i) for i in contract.inputs],
        output=[_output(mlm, o, model_tasks, layout) for o in contract.outputs],
        framework=framework, framework_version=_semver(contract.framework.version),
    )
    if any(o.classes for o in contract.outputs):
        from pystac.extensions.classification import ClassificationExtension

        item.stac_extensions.append(ClassificationExtension.get_schema_uri())
    item.properties["terrapatch:kind"] = contract.kind
    item.properties["terrapatch:contract"] = contract.to_dict()
    asset = pystac.Asset(href=target.name, media_type=MEDIA_TYPES[kind],
                         title=f"{framework} model", roles=["mlm:model"])
    names = [n for i in contract.inputs for n in (i.band_names or ())]
    if names:
        asset.extra_fields["bands"] = [{"name": n} for n in dict.fromkeys(names)]
    item.add_asset("model", asset)
    mlm.AssetDetailedMLMExtension.ext(asset, add_if_missing=False).artifact_type = \
        ARTIFACT_TYPES[kind]
    return item


def write_mlm_item(contract: ServingContract, model_path: str | os.PathLike[str],
                   path: str | os.PathLike[str] | None = None, **options: Any) -> Path:
    """Write :func:`mlm_item` as JSON (atomically) beside the model; return its path.

    Parameters
    ----------
    contract, model_path
        See :func:`mlm_item`.
    path
        Where to write (default :func:`mlm_item_path`: ``model.onnx.stac.json``).
    **options
        Keyword arguments of :func:`mlm_item`.
    """
    item = mlm_item(contract, model_path, **options)
    target = Path(path) if path is not None else mlm_item_path(model_path)
    data = item.to_dict(include_self_link=False)
    with atomic_output(target, "mlm") as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return target
