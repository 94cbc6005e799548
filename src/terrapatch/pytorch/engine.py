"""The PyTorch engine: run an ``nn.Module``, a ``torch.export`` program or TorchScript on numpy.

:class:`TorchEngine` is terrapatch's :class:`~terrapatch.engines.Engine` for PyTorch
models, opened by :func:`terrapatch.engines.load_engine` for an in-memory
:class:`torch.nn.Module` (TorchScript modules included) or
:class:`torch.export.ExportedProgram`, a ``.pt2`` file (``torch.export.save``) or a
``.pt`` / ``.pth`` file (``torch.jit.save``). Inputs are named as
:mod:`terrapatch.pytorch.interface` says (``forward``'s argument names, or a dict
argument's keys), outputs too (``output`` for one tensor, ``output_0``, ... for a
tuple, the keys of a dict).

The engine is channels first, as PyTorch is: it takes and returns
``[batch, bands, rows, cols]`` arrays and says so (``layout = "nchw"``). Serving
(:func:`terrapatch.serve.layouts.detect_layout`, then ``with_layout``) therefore
wraps it, once, in :class:`~terrapatch.serve.layouts.ChannelsFirstEngine`, which
transposes channels-last inputs to channels first and rank-4 outputs back: the
rest of terrapatch sees channels-last tensors, as for every other engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terrapatch.engines import Engine, _first_line, resolve_device
from terrapatch.errors import ModelError
from terrapatch.pytorch.interface import Interface, name_outputs, read_interface

__all__ = ["TorchEngine", "archive_kind", "torch_device"]

_PROGRAM, _SCRIPT, _PICKLE = "torch.export program", "TorchScript file", "torch.save file"

#: What a file of each suffix must hold.
_EXPECTED = {".pt2": _PROGRAM, ".pt": _SCRIPT, ".pth": _SCRIPT}

#: How to make the file a suffix expects, for messages.
_HOW = {
    _PROGRAM: "save it with torch.export.save (or terrapatch.pytorch.save_program) as .pt2",
    _SCRIPT: "save it with torch.jit.save(torch.jit.script(model)) as .pt",
}


def archive_kind(path: str | os.PathLike[str]) -> str | None:
    """What a PyTorch file holds: a torch.export program, TorchScript, a torch.save file.

    Returns None when the file is not a zip archive (every format of the three is).
    """
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("archive_format") for n in names):
        return _PROGRAM
    if any("/code/" in n for n in names):
        return _SCRIPT
    return _PICKLE


def _check_archive(path: str, parameter: str) -> str:
    """The kind of ``path``, or raise in one line when its suffix expects another."""
    expected = _EXPECTED[Path(path).suffix.lower()]
    kind = archive_kind(path)
    if kind == expected:
        return kind
    start = f"{parameter}: cannot load {path!r} as a {expected}: "
    if kind is None:
        raise ModelError(start + "the file is not a zip archive, as PyTorch files are "
                         "(damaged, truncated or of another format)")
    if kind == _PICKLE:
        raise ModelError(start + "it is a torch.save file (a state dict or a pickled module, "
                         f"no program); {_HOW[expected]}, or serve the nn.Module in Python")
    suffix = ".pt2" if kind == _PROGRAM else ".pt"
    raise ModelError(start + f"it is a {kind}: name it {suffix}")


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Keep torch.export's deserialisation warnings off stderr (failures raise)."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def torch_device(device: str, model: str, parameter: str = "device") -> str:
    """``"cuda"`` or ``"cpu"`` for ``device`` (``"auto"``: cuda when ``torch.cuda`` has a GPU)."""
    return resolve_device(device, torch.cuda.is_available(), f"PyTorch (for {model})",
                          parameter)


def _load(path: str, parameter: str, device: str) -> Any:
    """Open a ``.pt2`` program or a ``.pt`` / ``.pth`` TorchScript file."""
    kind = _check_archive(path, parameter)
    try:
        if kind == _PROGRAM:
            with _quiet_torch_logs():
                return torch.export.load(path)
        return torch.jit.load(path, map_location=device)  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelError(f"{parameter}: cannot load the {kind} {path!r}: "
                         f"{_first_line(exc)}") from None


class TorchEngine(Engine):
    """A PyTorch model: ``nn.Module``, ``torch.export`` program (``.pt2``) or TorchScript (``.pt``).

    Channels first (``layout = "nchw"``): inputs and outputs are ``[batch, bands,
    rows, cols]``; serving wraps the engine in
    :class:`~terrapatch.serve.layouts.ChannelsFirstEngine`, so sources and maps stay
    channels last. Python modules and TorchScript show no static shapes (their
    :class:`~terrapatch.engines.TensorInfo` shapes are None): serving derives the
    receptive fields by probing. Exported programs keep theirs (symbolic sizes are
    None).

    Parameters
    ----------
    model
        A ``.pt2`` / ``.pt`` / ``.pth`` path, or an in-memory ``nn.Module`` (put in
        evaluation mode), TorchScript module or ``ExportedProgram``.
    parameter
        Parameter name quoted in error messages.
    device
        ``"auto"`` (default: CUDA when ``torch.cuda.is_available()``), ``"cpu"`` or
        ``"cuda"`` (an :class:`~terrapatch.errors.InputError` naming ``device`` when
        there is no GPU).
    output_names
        Names for the outputs of a model returning a tensor or a tuple (in order);
        default ``output`` or ``output_0``, ``output_1``, ... A dict's keys are its
        names.
    input_keys
        Keys of dict arguments of a Python module's ``forward`` (argument name →
        keys), when a :mod:`torch.fx` trace cannot find them.

    Examples
    --------
    >>> import torch
    >>> engine = TorchEngine(torch.nn.Conv2d(4, 2, 3))  # doctest: +SKIP
    >>> engine.input_names, engine.output_names  # doctest: +SKIP
    (('input',), ('output',))
    """

    kind = "PyTorch model"
    layout = "nchw"

    def __init__(self, model: Any, parameter: str = "model", device: str = "auto",
                 output_names: Sequence[str] | None = None,
                 input_keys: Mapping[str, Sequence[str]] | None = None) -> None:
        path = os.fspath(model) if isinstance(model, str | os.PathLike) else "<memory>"
        self.device = torch_device(device, "the PyTorch model" if path == "<memory>"
                                   else f"the PyTorch model {path!r}")
        if path != "<memory>":
            if not os.path.isfile(path):
                raise ModelError(f"{parameter}: model {path!r} does not exist")
            model = _load(path, parameter, self.device)
        elif not isinstance(model, torch.nn.Module | torch.export.ExportedProgram):
            raise ModelError(f"{parameter}: expected a torch.nn.Module or ExportedProgram, got "
                             f"{type(model).__name__}")
        interface: Interface = read_interface(model, output_names, input_keys)
        super().__init__(path, interface.inputs, interface.outputs, interface.aliases)
        self._interface = interface
        self._output_names = list(output_names) if output_names else None
        if isinstance(model, torch.export.ExportedProgram):
            if self.device != "cpu":
                from torch.export.passes import move_to_device_pass

                model = move_to_device_pass(model, self.device)
            self.program: torch.export.ExportedProgram | None = model
            self.module: torch.nn.Module = model.module()
        else:
            self.program = None
            self.module = model.to(self.device).eval()

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        with torch.no_grad():
            tensors = {k: torch.from_numpy(np.require(v, requirements=["C", "W"]))
                       .to(self.device) for k, v in feed.items()}
            args, kwargs = self._interface.pack(tensors)
            result = self.module(*args, **kwargs)
        named = name_outputs(result, self._output_names)
        missing = [k for k in outputs if k not in named]
        if missing:
            raise ModelError(f"output_names: the PyTorch model {self.path} returned "
                             f"{', '.join(sorted(named))}, not {', '.join(missing)} (name a "
                             "tensor or tuple's outputs with output_names= when loading it)")
        return {k: named[k].detach().cpu().numpy() for k in outputs}
