"""The serving contract an exported model carries: what serving it needs to know.

A :class:`ServingContract` records, for one model, the framework that wrote it, one
:class:`ContractInput` per source (model input name, bands, grid spacing, receptive
field, normalisation, nodata, tensor layout), one :class:`ContractOutput` per output
(name, expression field, spcscale, classes with names and colours) and whether the
model is fully convolutional or patch-based. Serving reads it (:func:`read_contract`)
and takes it as its defaults (:func:`contract_defaults`); explicit parameters win.

Where it lives (:func:`write_contract`, :func:`read_contract`):

- ONNX: in the model's ``metadata_props`` under :data:`METADATA_KEY`
  (``terrapatch:contract``); read with onnxruntime alone (a core dependency), written
  with onnx (the ``tensorflow`` extra);
- SavedModel directory: the file ``assets/terrapatch_contract.json`` (:data:`ASSET_NAME`);
- any other model file (``.keras``, ``.pt2``, ``.pt``): a sidecar JSON named after the
  whole file name, ``model.keras`` → ``model.keras.contract.json``
  (:func:`contract_path`).

The JSON is versioned (key ``terrapatch_contract``) and read strictly: an unknown key,
a missing field or a bad value is a one-line :class:`~terrapatch.errors.ModelError`
naming the field and the value. A model without a contract serves as before.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from terrapatch._optional import available, require
from terrapatch.errors import InputError, MissingInputError, ModelError
from terrapatch.writer import atomic_output

if TYPE_CHECKING:
    from terrapatch.serve.transforms import Normalization

__all__ = [
    "ASSET_NAME",
    "CONTRACT_VERSION",
    "KINDS",
    "LAYOUTS",
    "METADATA_KEY",
    "SIDECAR_SUFFIX",
    "ContractClass",
    "ContractInput",
    "ContractOutput",
    "Framework",
    "ServingContract",
    "check_contract_sources",
    "contract_defaults",
    "contract_location",
    "contract_path",
    "read_contract",
    "write_contract",
]

#: Version of the contract's JSON layout (key ``terrapatch_contract``).
CONTRACT_VERSION = 1
#: Key of the contract in an ONNX model's ``metadata_props``.
METADATA_KEY = "terrapatch:contract"
#: File name of the contract in a SavedModel's ``assets/`` directory.
ASSET_NAME = "terrapatch_contract.json"
#: Suffix of the sidecar contract of other model files (``model.keras.contract.json``).
SIDECAR_SUFFIX = ".contract.json"
#: Model kinds: served fully convolutionally (tiles of any size) or patch by patch.
KINDS = ("fully-convolutional", "patch-based")
#: Tensor layouts of image inputs.
LAYOUTS = ("nhwc", "nchw")
#: Pixel types an input or output may declare (NumPy names).
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "float32", "float64")

_WHERE = "model contract"
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


def _fail(path: str, message: str) -> ModelError:
    return ModelError(f"{_WHERE}: {path}: {message}")


def _pair(value: Any, path: str, positive_int: bool = True) -> tuple[Any, Any]:
    """``(x, y)`` from one value or a pair; integers ≥ 1, or finite numbers > 0."""
    items = list(value) if isinstance(value, list | tuple) else [value, value]
    if len(items) != 2:
        raise _fail(path, f"{value!r} must be one value or a pair (x, y)")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise _fail(path, f"{value!r} must hold numbers")
        if positive_int and (not float(item).is_integer() or item < 1):
            raise _fail(path, f"{value!r} must be integers ≥ 1")
        if not positive_int and not (math.isfinite(item) and item > 0):
            raise _fail(path, f"{value!r} must be finite and > 0")
    if positive_int:
        return int(items[0]), int(items[1])
    return float(items[0]), float(items[1])


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise _fail(path, f"{value!r} must be a finite number")
    return float(value)


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"{value!r} must be a non-empty string")
    return value


def _choice(value: Any, choices: Sequence[str], path: str) -> str:
    if value not in choices:
        raise _fail(path, f"{value!r} is not one of {', '.join(choices)}")
    return str(value)


def _normalization_type() -> type[Normalization]:
    """:class:`~terrapatch.serve.transforms.Normalization`, imported on use.

    (``terrapatch.serve`` may import this module: importing it here at load time would
    make the import order matter.)
    """
    from terrapatch.serve.transforms import Normalization

    return Normalization


def _values(value: Any) -> Any:
    """A normalisation field as JSON: one number, or a list of numbers."""
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else [float(v) for v in array.ravel()]


@dataclass(frozen=True)
class Framework:
    """The framework that wrote the model, e.g. ``Framework("ONNX", "1.17.0")``."""

    name: str
    version: str | None = None

    def __post_init__(self) -> None:
        _text(self.name, "framework.name")
        if self.version is not None:
            _text(self.version, "framework.version")


@dataclass(frozen=True)
class ContractInput:
    """One model input, fed by one source.

    Attributes
    ----------
    placeholder
        Name of the model input.
    bands
        Number of bands (channels) the input takes.
    receptive_field
        ``(x, y)`` input size, in the source's pixels, for one output block.
    band_names
        Names of the bands, in order (e.g. ``("B05", "B06")``), or None.
    spacing
        ``(x, y)`` pixel spacing of the source grid the model was trained on, in CRS
        units (a scalar means the same for both axes), or None.
    normalization
        Scaling applied to the source's values before the model, or None.
    nodata
        Value marking missing data in the source, or None.
    layout
        ``"nhwc"`` (channels last) or ``"nchw"``.
    dtype
        Pixel type of the model input (NumPy name).
    """

    placeholder: str
    bands: int
    receptive_field: tuple[int, int]
    band_names: tuple[str, ...] | None = None
    spacing: tuple[float, float] | None = None
    normalization: Normalization | None = None
    nodata: float | None = None
    layout: str = "nhwc"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        where = f"inputs[{self.placeholder!r}]"
        _text(self.placeholder, f"{where}.placeholder")
        if isinstance(self.bands, bool) or not isinstance(self.bands, int) or self.bands < 1:
            raise _fail(f"{where}.bands", f"{self.bands!r} must be an integer ≥ 1")
        object.__setattr__(self, "receptive_field",
                           _pair(self.receptive_field, f"{where}.receptive_field"))
        if self.band_names is not None:
            names = tuple(self.band_names)
            if len(names) != self.bands or not all(isinstance(n, str) and n for n in names):
                raise _fail(f"{where}.band_names",
                            f"{list(names)!r} must be {self.bands} non-empty names")
            object.__setattr__(self, "band_names", names)
        if self.spacing is not None:
            object.__setattr__(self, "spacing",
                               _pair(self.spacing, f"{where}.spacing", positive_int=False))
        if self.normalization is not None:
            if not isinstance(self.normalization, _normalization_type()):
                raise _fail(f"{where}.normalization",
                            f"expected a Normalization, got {type(self.normalization).__name__}")
            try:
                self.normalization.coefficients(self.bands, f"{where}.normalization")
            except InputError as exc:
                raise ModelError(f"{_WHERE}: {exc}") from None
        if self.nodata is not None:
            object.__setattr__(self, "nodata", _number(self.nodata, f"{where}.nodata"))
        _choice(self.layout, LAYOUTS, f"{where}.layout")
        _choice(self.dtype, DTYPES, f"{where}.dtype")


@dataclass(frozen=True)
class ContractClass:
    """One class of a class map: its value, name and display colour (``#rrggbb``)."""

    value: int
    name: str
    color: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 0:
            raise _fail("classes.value", f"{self.value!r} must be an integer ≥ 0")
        _text(self.name, f"classes[{self.value}].name")
        if self.color is not None and not (isinstance(self.color, str)
                                           and _COLOUR.match(self.color)):
            raise _fail(f"classes[{self.value}].color", f"{self.color!r} is not #rrggbb")

    @property
    def rgba(self) -> tuple[int, int, int, int] | None:
        """The colour as ``(r, g, b, 255)``, or None."""
        if self.color is None:
            return None
        return (int(self.color[1:3], 16), int(self.color[3:5], 16),
                int(self.color[5:7], 16), 255)


@dataclass(frozen=True)
class ContractOutput:
    """One model output.

    Attributes
    ----------
    name
        Name of the model output.
    expression_field
        ``(x, y)`` output block size, in output pixels, that one receptive field gives.
    spcscale
        Output spacing / source 1's spacing (``0.25`` for a ×4 super-resolution).
    bands
        Number of output channels, or None when unknown.
    dtype
        Pixel type of the output (NumPy name).
    classes
        Classes of a class map (value, name, colour), or None.
    """

    name: str
    expression_field: tuple[int, int] = (1, 1)
    spcscale: float = 1.0
    bands: int | None = None
    dtype: str = "float32"
    classes: tuple[ContractClass, ...] | None = None

    def __post_init__(self) -> None:
        where = f"outputs[{self.name!r}]"
        _text(self.name, f"{where}.name")
        object.__setattr__(self, "expression_field",
                           _pair(self.expression_field, f"{where}.expression_field"))
        scale = _number(self.spcscale, f"{where}.spcscale")
        if scale <= 0:
            raise _fail(f"{where}.spcscale", f"{self.spcscale!r} must be > 0")
        object.__setattr__(self, "spcscale", scale)
        if self.bands is not None and (isinstance(self.bands, bool)
                                       or not isinstance(self.bands, int) or self.bands < 1):
            raise _fail(f"{where}.bands", f"{self.bands!r} must be an integer ≥ 1")
        _choice(self.dtype, DTYPES, f"{where}.dtype")
        if self.classes is not None:
            classes = tuple(self.classes)
            if not classes or not all(isinstance(c, ContractClass) for c in classes):
                raise _fail(f"{where}.classes", "must be a non-empty list of classes")
            values = [c.value for c in classes]
            if len(set(values)) != len(values):
                raise _fail(f"{where}.classes", f"class values {values!r} repeat")
            object.__setattr__(self, "classes", classes)


@dataclass(frozen=True)
class ServingContract:
    """What serving an exported model needs to know; see the module docstring.

    Attributes
    ----------
    framework
        The framework that wrote the model file.
    inputs
        One entry per source, in source order (source1 first).
    outputs
        The outputs served (all on one grid: same expression field and spcscale).
    kind
        ``"fully-convolutional"`` or ``"patch-based"``.
    name
        A short name of the model, or None (the file name is used).
    """

    framework: Framework
    inputs: tuple[ContractInput, ...]
    outputs: tuple[ContractOutput, ...]
    kind: str = "fully-convolutional"
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.framework, Framework):
            raise _fail("framework", f"expected a Framework, got {self.framework!r}")
        inputs, outputs = tuple(self.inputs), tuple(self.outputs)
        if not inputs or not all(isinstance(i, ContractInput) for i in inputs):
            raise _fail("inputs", "must be a non-empty list of inputs")
        if not outputs or not all(isinstance(o, ContractOutput) for o in outputs):
            raise _fail("outputs", "must be a non-empty list of outputs")
        for kind, names in (("inputs", [i.placeholder for i in inputs]),
                            ("outputs", [o.name for o in outputs])):
            if len(set(names)) != len(names):
                raise _fail(kind, f"names {names!r} repeat")
        first = outputs[0]
        for other in outputs[1:]:
            if (other.expression_field, other.spcscale) != (first.expression_field,
                                                            first.spcscale):
                raise _fail(f"outputs[{other.name!r}]",
                            f"expression field {list(other.expression_field)} and spcscale "
                            f"{other.spcscale} differ from {first.name!r}'s "
                            f"({list(first.expression_field)}, {first.spcscale}): terrapatch "
                            "serves all outputs on one grid")
        _choice(self.kind, KINDS, "kind")
        if self.name is not None:
            _text(self.name, "name")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)

    @property
    def fullyconv(self) -> bool:
        """Whether the model is served fully convolutionally."""
        return self.kind == "fully-convolutional"

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """The contract as JSON-compatible data (with the version key)."""
        def normalization(n: Normalization | None) -> dict[str, Any] | None:
            if n is None:
                return None
            return {k: _values(getattr(n, k)) for k in ("scale", "offset", "mean", "std")}

        return {
            "terrapatch_contract": CONTRACT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "framework": {"name": self.framework.name, "version": self.framework.version},
            "inputs": [{
                "placeholder": i.placeholder, "bands": i.bands,
                "band_names": None if i.band_names is None else list(i.band_names),
                "receptive_field": list(i.receptive_field),
                "spacing": None if i.spacing is None else list(i.spacing),
                "normalization": normalization(i.normalization),
                "nodata": i.nodata, "layout": i.layout, "dtype": i.dtype,
            } for i in self.inputs],
            "outputs": [{
                "name": o.name, "expression_field": list(o.expression_field),
                "spcscale": o.spcscale, "bands": o.bands, "dtype": o.dtype,
                "classes": None if o.classes is None else [
                    {"value": c.value, "name": c.name, "color": c.color} for c in o.classes],
            } for o in self.outputs],
        }

    def to_json(self) -> str:
        """The contract as a JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> ServingContract:
        """Read a contract strictly from :meth:`to_dict`'s data.

        Raises
        ------
        ModelError
            On a missing or unknown key, a newer version, or an invalid value; the
            message names the field and the value.
        """
        top = _object(data, "", {"terrapatch_contract", "framework", "inputs", "outputs"},
                      {"kind", "name"})
        version = top["terrapatch_contract"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _fail("terrapatch_contract", f"{version!r} is not a contract version")
        if version > CONTRACT_VERSION:
            raise _fail("terrapatch_contract",
                        f"version {version} is newer than this terrapatch reads "
                        f"({CONTRACT_VERSION}); upgrade terrapatch")
        fw = _object(top["framework"], "framework", {"name"}, {"version"})
        framework = Framework(_text(fw["name"], "framework.name"), fw.get("version"))
        inputs = [_input(item, f"inputs[{k}]") for k, item in
                  enumerate(_list(top["inputs"], "inputs"))]
        outputs = [_output(item, f"outputs[{k}]") for k, item in
                   enumerate(_list(top["outputs"], "outputs"))]
        return cls(framework, tuple(inputs), tuple(outputs),
                   top.get("kind", "fully-convolutional"), top.get("name"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ServingContract:
        """Read a contract from a JSON text (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{_WHERE}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _object(data: Any, path: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    where = path or "(top level)"
    if not isinstance(data, dict):
        raise _fail(where, f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - required - optional)
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r}")
    missing = sorted(required - set(data))
    if missing:
        raise _fail(where, f"missing field {missing[0]!r}")
    return data


def _list(data: Any, path: str) -> list[Any]:
    if not isinstance(data, list) or not data:
        raise _fail(path, f"{data!r} must be a non-empty list")
    return data


def _input(data: Any, path: str) -> ContractInput:
    item = _object(data, path, {"placeholder", "bands", "receptive_field"},
                   {"band_names", "spacing", "normalization", "nodata", "layout", "dtype"})
    norm = item.get("normalization")
    if norm is not None:
        fields = _object(norm, f"{path}.normalization", set(), {"scale", "offset", "mean", "std"})
        for key, value in fields.items():
            if isinstance(value, bool) or not (isinstance(value, int | float) or (
                    isinstance(value, list) and value
                    and all(isinstance(v, int | float) and not isinstance(v, bool)
                            for v in value))):
                raise _fail(f"{path}.normalization.{key}",
                            f"{value!r} must be a number or a list of numbers")
        norm = _normalization_type()(**fields)
    names = item.get("band_names")
    if names is not None and not isinstance(names, list):
        raise _fail(f"{path}.band_names", f"{names!r} must be a list of names")
    return ContractInput(
        placeholder=_text(item["placeholder"], f"{path}.placeholder"),
        bands=item["bands"], receptive_field=item["receptive_field"],
        band_names=None if names is None else tuple(names),
        spacing=item.get("spacing"), normalization=norm, nodata=item.get("nodata"),
        layout=item.get("layout", "nhwc"), dtype=item.get("dtype", "float32"))


def _output(data: Any, path: str) -> ContractOutput:
    item = _object(data, path, {"name"},
                   {"expression_field", "spcscale", "bands", "dtype", "classes"})
    classes = item.get("classes")
    parsed: tuple[ContractClass, ...] | None = None
    if classes is not None:
        parsed = tuple(
            ContractClass(**_object(c, f"{path}.classes[{k}]", {"value", "name"}, {"color"}))
            for k, c in enumerate(_list(classes, f"{path}.classes")))
    return ContractOutput(
        name=_text(item["name"], f"{path}.name"),
        expression_field=item.get("expression_field", (1, 1)),
        spcscale=item.get("spcscale", 1.0), bands=item.get("bands"),
        dtype=item.get("dtype", "float32"), classes=parsed)


# ---------------------------------------------------------------------- storage


def contract_path(model_path: str | os.PathLike[str]) -> Path:
    """The sidecar contract of a model file: ``model.keras`` → ``model.keras.contract.json``."""
    target = Path(model_path)
    return target.with_name(target.name + SIDECAR_SUFFIX)


def contract_location(model_path: str | os.PathLike[str]) -> tuple[str, Path]:
    """Where the contract of ``model_path`` lives: ``(kind, path)``.

    ``kind`` is ``"onnx"`` (in the model file itself), ``"savedmodel"`` (the asset
    file) or ``"sidecar"``.
    """
    target = Path(model_path)
    if target.is_dir():
        return "savedmodel", target / "assets" / ASSET_NAME
    if target.suffix.lower() == ".onnx":
        return "onnx", target
    return "sidecar", contract_path(target)


def write_contract(model_path: str | os.PathLike[str], contract: ServingContract) -> Path:
    """Record ``contract`` with the model at ``model_path`` (atomically); return where.

    ONNX models get it in their ``metadata_props`` (the file is rewritten; needs onnx,
    from the ``tensorflow`` extra), SavedModel directories as ``assets/terrapatch_contract
    .json``, other model files as a sidecar ``<file name>.contract.json``. An existing
    contract is replaced.

    Raises
    ------
    MissingInputError
        If the model does not exist.
    MissingExtraError
        If an ONNX model is given and onnx is not installed.
    OutputError
        If the contract cannot be written.
    """
    target = Path(model_path)
    if not target.exists():
        raise MissingInputError(f"model: {os.fspath(model_path)!r} does not exist")
    if not isinstance(contract, ServingContract):
        raise InputError(f"contract: expected a ServingContract, got {type(contract).__name__}")
    kind, where = contract_location(target)
    text = contract.to_json()
    if kind == "onnx":
        onnx = require("onnx", f"write_contract: embedding the contract in {target.name!r}")
        model = onnx.load(os.fspath(target), load_external_data=False)
        kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, text
        with atomic_output(target, "model") as tmp:
            onnx.save(model, os.fspath(tmp))
        return target
    if kind == "savedmodel":
        where.parent.mkdir(exist_ok=True)
    with atomic_output(where, "contract") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return where


def _onnx_metadata(path: Path, use_onnx: bool | None = None) -> str | None:
    """The contract text in an ONNX model's metadata, or None (onnx, else onnxruntime)."""
    if use_onnx is None:
        use_onnx = available("onnx")
    try:
        if use_onnx:
            import onnx

            model = onnx.load(os.fspath(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            session = onnxruntime.InferenceSession(os.fspath(path), options,
                                                   providers=["CPUExecutionProvider"])
            props = dict(session.get_modelmeta().custom_metadata_map)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model: cannot read the ONNX model {os.fspath(path)!r} "
                         f"({reason})") from None
    return props.get(METADATA_KEY)


def read_contract(model_path: str | os.PathLike[str]) -> ServingContract | None:
    """The contract recorded with the model at ``model_path``, or None if it has none.

    Reading an ONNX model's contract needs only onnxruntime.

    Raises
    ------
    MissingInputError
        If the model does not exist.
    ModelError
        If the recorded contract is invalid (the message names the field and value).
    """
    target = Path(model_path)
    if not target.exists():
        raise MissingInputError(f"model: {os.fspath(model_path)!r} does not exist")
    kind, where = contract_location(target)
    if kind == "onnx":
        text = _onnx_metadata(target)
    elif where.is_file():
        text = where.read_text(encoding="utf-8")
    else:
        text = None
    return None if text is None else ServingContract.from_json(text)


# ---------------------------------------------------------------------- serving


def contract_defaults(contract: ServingContract) -> dict[str, Any]:
    """The contract as defaults for :func:`terrapatch.serve.serve`.

    Returns
    -------
    dict
        Keyword arguments of ``serve`` / ``prepare_serve``: ``output_names``,
        ``fullyconv``, ``spcscale`` (a :class:`~fractions.Fraction` when fractional),
        ``efield``, ``normalization`` (one per source), ``model_layout``, and, when the
        first output has classes, ``colormap`` (value → RGBA, classes with a colour) and
        ``class_names`` (index = class value, ``""`` for values without a class);
        plus ``"sources"``: one dict per source of :class:`terrapatch.raster.Source`
        keywords, ``placeholder``, ``patch_size`` and ``nodata``. Explicit parameters
        override each of them.
    """
    first = contract.outputs[0]
    scale = first.spcscale
    spcscale: int | Fraction = int(scale) if float(scale).is_integer() \
        else Fraction(scale).limit_denominator(1000)
    defaults: dict[str, Any] = {
        "output_names": [o.name for o in contract.outputs],
        "fullyconv": contract.fullyconv,
        "spcscale": spcscale,
        "efield": first.expression_field,
        "normalization": [i.normalization for i in contract.inputs],
        "model_layout": contract.inputs[0].layout,
        "sources": [{"placeholder": i.placeholder, "patch_size": i.receptive_field,
                     "nodata": i.nodata} for i in contract.inputs],
    }
    if first.classes:
        colormap = {c.value: c.rgba for c in first.classes if c.rgba is not None}
        names = [""] * (max(c.value for c in first.classes) + 1)
        for c in first.classes:
            names[c.value] = c.name
        defaults["colormap"] = colormap or None
        defaults["class_names"] = names
    return defaults


def check_contract_sources(contract: ServingContract, band_counts: Sequence[int],
                           names: Sequence[str] | None = None) -> None:
    """Refuse sources whose band counts differ from what the model's contract records.

    Parameters
    ----------
    contract
        The model's contract.
    band_counts
        Bands of each source, in source order.
    names
        Source names in messages (default ``source1``, ``source2``, ...).

    Raises
    ------
    InputError
        E.g. ``source2: the model's contract expects 6 bands (B05, B06, …), the raster
        has 4``.
    """
    labels = list(names) if names is not None else [f"source{k + 1}"
                                                    for k in range(len(band_counts))]
    if len(band_counts) != len(contract.inputs):
        raise InputError(f"sources: the model's contract expects {len(contract.inputs)} "
                         f"source(s) ({', '.join(i.placeholder for i in contract.inputs)}), "
                         f"{len(band_counts)} given")
    for label, count, item in zip(labels, band_counts, contract.inputs, strict=True):
        if int(count) != item.bands:
            listed = ""
            if item.band_names:
                shown = list(item.band_names[:3]) + (["…"] if item.bands > 3 else [])
                listed = f" ({', '.join(shown)})"
            raise InputError(f"{label}: the model's contract expects {item.bands} bands"
                             f"{listed}, the raster has {int(count)}")
