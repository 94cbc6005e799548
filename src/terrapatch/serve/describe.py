"""Record how a model serves: its contract, from a planned run, written with the model files.

:func:`describe` turns a :class:`~terrapatch.serve.ServeJob` (a model bound to sources,
its geometry derived or checked) into a
:class:`~terrapatch.contract.ServingContract`; :func:`record_contract` plans such a
run on an exported model and writes the contract and a STAC MLM Item beside every
file of the model (``terrapatch export --source …``). :func:`read_classes` reads the
class names and colours that go with it. See docs/models.md.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from terrapatch.contract import (
    ContractClass,
    ContractInput,
    ContractOutput,
    Framework,
    ServingContract,
    write_contract,
)
from terrapatch.errors import InputError
from terrapatch.raster import Source
from terrapatch.serve.job import ServeJob
from terrapatch.serve.plan import PlanOptions, prepare_serve
from terrapatch.serve.transforms import Normalization

__all__ = ["describe", "framework_of", "read_classes", "record_contract"]

#: Model file kinds → (framework name as MLM spells it, package giving its version).
FRAMEWORKS = {".onnx": ("ONNX", "onnx"), ".keras": ("Keras", "keras"),
              ".pt2": ("PyTorch", "torch"), ".pt": ("PyTorch", "torch"),
              ".pth": ("PyTorch", "torch"), "": ("TensorFlow", "tensorflow")}


def framework_of(model: str | os.PathLike[str]) -> Framework:
    """The framework of a model file (a directory is a TensorFlow SavedModel)."""
    suffix = "" if os.path.isdir(model) else Path(model).suffix.lower()
    name, package = FRAMEWORKS.get(suffix, ("ONNX", "onnx"))
    try:
        version: str | None = importlib.metadata.version(package).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        version = None
    return Framework(name, version)


def describe(job: ServeJob, normalization: Sequence[Normalization | None] | None = None,
             classes: Sequence[ContractClass] | None = None,
             band_names: Sequence[Sequence[str] | None] | None = None,
             name: str | None = None) -> ServingContract:
    """The contract of a planned run: what serving the same model elsewhere needs.

    Parameters
    ----------
    job
        A run planned with :func:`~terrapatch.serve.prepare_serve` (its geometry, input
        and output names, tensor layout and mode are recorded).
    normalization
        Per source, the normalisation the model expects (as given to the run).
    classes
        Class values, names and colours of the (first) output.
    band_names
        Per source, the names of its bands (e.g. ``("B04", "B03", "B02", "B08")``).
    name
        Model name.
    """
    runner, geometry = job.runner, job.geometry
    norms = list(normalization) if normalization is not None else [None] * len(job.sources)
    names = list(band_names) if band_names is not None else [None] * len(job.sources)
    inputs = tuple(
        ContractInput(placeholder, source.bands, geometry.fields[i],
                      None if names[i] is None else tuple(names[i] or ()),
                      source.grid.spacing, norms[i], source.nodata, runner.model_layout,
                      runner.input_dtypes[i].name)
        for i, (source, placeholder) in enumerate(zip(job.sources, runner.input_names,
                                                      strict=True)))
    outputs = tuple(
        ContractOutput(out, geometry.efield, float(geometry.spcscale), channels, "float32",
                       tuple(classes) if classes and k == 0 else None)
        for k, (out, channels) in enumerate(zip(runner.output_names, runner.channels,
                                                strict=True)))
    model = job.model_path or str(getattr(job.engine, "path", ""))
    return ServingContract(framework_of(model), inputs, outputs,
                           "fully-convolutional" if runner.fullyconv else "patch-based", name)


def record_contract(models: Sequence[str | os.PathLike[str]], sources: Sequence[Source],
                    output_names: Sequence[str] | str | None = None, *,
                    classes: Sequence[ContractClass] | None = None,
                    band_names: Sequence[Sequence[str] | None] | None = None,
                    name: str | None = None, mlm: bool = True,
                    **plan: Unpack[PlanOptions]) -> ServingContract:
    """Plan a run of ``models[0]`` on ``sources``; write its contract with every model file.

    The receptive and expression fields are derived from the model (or checked, when
    the sources give them); the other files (e.g. the SavedModel of the same export)
    get the same contract. With ``mlm``, a STAC MLM Item is written beside each file.
    ``plan`` are :func:`~terrapatch.serve.prepare_serve`'s options (``fullyconv``,
    ``spcscale``, ``output_names`` go with ``models``; ``normalization`` is recorded).

    Returns
    -------
    ServingContract
        What was recorded.
    """
    if not models:
        raise InputError("models: give at least one exported model file")
    job = prepare_serve(sources, os.fspath(models[0]), output_names, **plan)
    contract = describe(job, plan.get("normalization"), classes, band_names, name)
    for model in models:
        described = ServingContract(framework_of(model), contract.inputs, contract.outputs,
                                    contract.kind, contract.name)
        write_contract(model, described)
        if mlm:
            from terrapatch.mlm import write_mlm_item

            write_mlm_item(described, model)
    return contract


def read_classes(path: str | os.PathLike[str]) -> tuple[ContractClass, ...]:
    """Classes from a CSV or JSON file.

    CSV: ``value,name[,color]`` rows (a header row is skipped); JSON: ``{"0": "water"}``
    or ``{"0": ["water", "#0000ff"]}``.

    Raises
    ------
    InputError
        Naming the file and the row or key that is not a class.
    """
    text = Path(path).read_text(encoding="utf-8")
    rows: list[tuple[Any, ...]]
    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"classes: {os.fspath(path)!r} is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"classes: {os.fspath(path)!r} must map class values to names")
        rows = [(k, *(v if isinstance(v, list) else [v])) for k, v in data.items()]
    else:
        rows = [tuple(r) for r in csv.reader(text.splitlines()) if r and not
                r[0].lstrip().startswith("#")]
        if rows and not rows[0][0].strip().lstrip("-").isdigit():
            rows = rows[1:]  # a header
    classes = []
    for row in rows:
        try:
            value = int(str(row[0]).strip())
            label = str(row[1]).strip()
            color = str(row[2]).strip() if len(row) > 2 and str(row[2]).strip() else None
        except (ValueError, IndexError):
            raise InputError(f"classes: {os.fspath(path)!r}: {list(row)!r} is not "
                             "value,name[,color]") from None
        classes.append(ContractClass(value, label, color))
    if not classes:
        raise InputError(f"classes: {os.fspath(path)!r} lists no class")
    return tuple(classes)
