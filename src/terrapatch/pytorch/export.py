"""Write a multi-input PyTorch model for serving, checked: ONNX or a torch.export ``.pt2`` file.

Both take the model's inputs as ``{name: (channels, rf)}`` (receptive field in the
source's pixels, ``rf`` or ``(rf_x, rf_y)``) or ``{name: example tensor}``
(channels first), names being the model's input names as terrapatch reads them
(:mod:`terrapatch.pytorch.interface`: ``forward``'s arguments or a dict
argument's keys), which become the served placeholders. Batch and spatial sizes
stay free; the spatial sizes of the inputs keep the ratio of their receptive
fields (a 10 m input twice the size of a 20 m one), as serving feeds them.

Each file is written atomically (:func:`terrapatch.writer.atomic_output`) and
checked before it is kept: it is reloaded (onnxruntime for ONNX) and compared with
the module on a second input size, so that a file which only works at the example
size is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terrapatch.errors import InputError, ModelError
from terrapatch.pytorch.interface import name_outputs, read_interface
from terrapatch.writer import atomic_output

__all__ = ["InputSpec", "export_onnx", "save_program"]

#: ``(channels, rf)`` or ``(channels, (rf_x, rf_y))``, or an example tensor ``(N, C, H, W)``.
InputSpec = tuple[int, int | tuple[int, int]] | torch.Tensor


@dataclass(frozen=True)
class _Input:
    """One input: channels, base spatial size, dtype, and its example tensor if given."""

    channels: int
    rows: int
    cols: int
    dtype: torch.dtype
    tensor: torch.Tensor | None


def _parse(inputs: Mapping[str, InputSpec]) -> dict[str, _Input]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise InputError("inputs: expected {name: (channels, rf)} or {name: example tensor}, "
                         f"got {inputs!r}")
    parsed: dict[str, _Input] = {}
    for name, spec in inputs.items():
        if isinstance(spec, torch.Tensor):
            if spec.ndim != 4:
                raise InputError(f"inputs[{name!r}]: an example tensor is (batch, channels, "
                                 f"rows, cols), got shape {tuple(spec.shape)}")
            parsed[name] = _Input(int(spec.shape[1]), int(spec.shape[2]), int(spec.shape[3]),
                                  spec.dtype, spec)
            continue
        try:
            channels, rf = spec
            rx, ry = (rf, rf) if isinstance(rf, int) else rf
            parsed[name] = _Input(int(channels), int(ry), int(rx), torch.float32, None)
        except (TypeError, ValueError):
            raise InputError(f"inputs[{name!r}]: expected (channels, rf), (channels, (rf_x, "
                             f"rf_y)) or an example tensor, got {spec!r}") from None
        if min(parsed[name].channels, rx, ry) < 1:
            raise InputError(f"inputs[{name!r}]: channels and rf must be positive, got {spec!r}")
    return parsed


def _units(parsed: Mapping[str, _Input]) -> tuple[int, int]:
    """Greatest common divisor of the base sizes, rows and columns."""
    return (math.gcd(*(i.rows for i in parsed.values())),
            math.gcd(*(i.cols for i in parsed.values())))


def _feed(parsed: Mapping[str, _Input], scale: int, batch: int,
          seed: int) -> dict[str, torch.Tensor]:
    """Random inputs ``scale`` times the base sizes (the example tensors at scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    feed = {}
    for name, spec in parsed.items():
        if spec.tensor is not None and scale == 1:
            feed[name] = spec.tensor
            continue
        n = batch if spec.tensor is None else int(spec.tensor.shape[0])
        shape = (n, spec.channels, spec.rows * scale, spec.cols * scale)
        feed[name] = torch.randn(shape, generator=generator).to(spec.dtype)
    return feed


def _example_scale(parsed: Mapping[str, _Input]) -> int:
    """Example tensors are used as given; receptive-field sizes are doubled."""
    return 1 if any(i.tensor is not None for i in parsed.values()) else 2


def _call(module: torch.nn.Module,
          packed: tuple[tuple[Any, ...], dict[str, Any]]) -> dict[str, np.ndarray]:
    """A module's named outputs on packed inputs ``(args, kwargs)``, as numpy arrays."""
    with torch.no_grad():
        result = name_outputs(module(*packed[0], **packed[1]))
    return {k: v.detach().cpu().numpy() for k, v in result.items()}


def _scaled(dim: Any, factor: int) -> Any:
    """``factor · dim`` (the Dim itself for 1)."""
    return dim if factor == 1 else factor * dim


def _check_names(module: torch.nn.Module, parsed: Mapping[str, _Input]) -> None:
    names = list(read_interface(module).inputs)
    if sorted(names) != sorted(parsed):
        raise InputError(f"inputs: {sorted(parsed)} are not the model's inputs {names} "
                         "(forward's argument names, or a dict argument's keys)")


def _compare(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], what: str,
             rtol: float, atol: float) -> None:
    """Raise a one-line :class:`ModelError` when ``got`` differs from ``expected``."""
    for name, ref in expected.items():
        value = got.get(name)
        if value is None or value.shape != ref.shape:
            raise ModelError(f"{what}: output {name!r} has shape "
                             f"{None if value is None else value.shape} instead of {ref.shape}")
        if not np.allclose(value, ref, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(value.astype(np.float64) - ref)))
            raise ModelError(f"{what}: output {name!r} differs from PyTorch's by up to {worst:.3g} "
                             f"(rtol={rtol}, atol={atol})")


def export_onnx(module: torch.nn.Module, path: str | os.PathLike[str],
                inputs: Mapping[str, InputSpec], *, batch: int = 2, opset: int | None = None,
                rtol: float = 1e-4, atol: float = 1e-5) -> Path:
    """Write ``module`` to ONNX with free batch and spatial sizes, checked with onnxruntime.

    Parameters
    ----------
    module
        The model (put in evaluation mode). Its ``forward`` takes channels-first
        tensors, as arguments or as one dict; it returns a tensor, a tuple or a dict.
    path
        The ``.onnx`` file to write (atomically).
    inputs
        ``{name: (channels, rf)}`` or ``{name: example tensor}``, one per model input
        (see the module docstring); the names become the ONNX input names.
    batch
        Batch size of the generated example inputs.
    opset
        ONNX opset (default: the exporter's).
    rtol, atol
        Tolerance of the check of onnxruntime against PyTorch at a second size.

    Returns
    -------
    pathlib.Path
        ``path``. The ONNX model is channels first (``[batch, bands, rows, cols]``):
        terrapatch's serving detects it from its static channel dimensions.

    Raises
    ------
    InputError
        If ``inputs`` does not name exactly the model's inputs.
    ModelError
        If onnxruntime's outputs differ from PyTorch's at the second size.
    """
    import onnxruntime as ort

    module = module.eval()
    parsed = _parse(inputs)
    _check_names(module, parsed)
    scale = _example_scale(parsed)
    interface = read_interface(module)
    example = _feed(parsed, scale, batch, seed=0)
    outputs = _call(module, interface.pack(example))
    names = list(interface.inputs)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 2: f"{n}_rows", 3: f"{n}_cols"}
                                       for n in names}
    for name, value in outputs.items():
        axes[name] = {0: "batch"} | ({2: f"{name}_rows", 3: f"{name}_cols"} if value.ndim == 4
                                     else {})
    args, kwargs = interface.pack(example)
    with atomic_output(path, "path") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        # The exporter reads a trailing dict as keyword arguments: always give one.
        torch.onnx.export(module, (*args, dict(kwargs)), os.fspath(tmp), dynamo=False,
                          input_names=names, output_names=list(outputs), dynamic_axes=axes,
                          opset_version=opset)
        check = _feed(parsed, scale + 1, batch, seed=1)
        session = ort.InferenceSession(os.fspath(tmp), providers=["CPUExecutionProvider"])
        got = session.run(list(outputs), {k: v.numpy() for k, v in check.items()})
        _compare(_call(module, interface.pack(check)), dict(zip(outputs, got, strict=True)),
                 f"path: the ONNX export {os.fspath(path)!r}", rtol, atol)
    return Path(path)


@contextlib.contextmanager
def _size_oblivious() -> Iterator[None]:
    """Export without specialising sizes 0 and 1, so that 1 × 1 outputs (patch-based) work."""
    try:
        import torch.fx.experimental._config as fx_config

        patch = fx_config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        patch = contextlib.nullcontext()
    with patch:
        yield


def save_program(module: torch.nn.Module, path: str | os.PathLike[str],
                 inputs: Mapping[str, InputSpec], *, batch: int = 2,
                 rtol: float = 1e-5, atol: float = 1e-6) -> Path:
    """Export ``module`` with ``torch.export`` (free batch and spatial sizes) to a ``.pt2`` file.

    Parameters are those of :func:`export_onnx`: the spatial sizes of the inputs are
    one free size per axis times each input's share of the receptive fields (10 m
    ``2·d``, 20 m ``d``), from the receptive fields (or the example tensors' sizes)
    up. The reloaded program is checked against the module at a second size.

    Returns
    -------
    pathlib.Path
        ``path``, to serve with :func:`terrapatch.serve.serve` (or load with
        :func:`terrapatch.engines.load_engine`).
    """
    module = module.eval()
    parsed = _parse(inputs)
    _check_names(module, parsed)
    scale = _example_scale(parsed)
    unit_rows, unit_cols = _units(parsed)
    rows = torch.export.Dim("rows", min=unit_rows)  # from the receptive fields (or examples) up
    cols = torch.export.Dim("cols", min=unit_cols)
    dims = {name: {0: torch.export.Dim.DYNAMIC, 2: _scaled(rows, i.rows // unit_rows),
                   3: _scaled(cols, i.cols // unit_cols)} for name, i in parsed.items()}
    example = _feed(parsed, scale, batch, seed=0)
    interface = read_interface(module)
    args, kwargs = interface.pack(example)
    shapes, _ = interface.pack(dims)
    try:
        with _size_oblivious():
            program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes)
    except Exception as exc:
        text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelError(f"module: torch.export failed with free sizes: {text}") from None
    with atomic_output(path, "path") as tmp:
        torch.export.save(program, os.fspath(tmp))
        loaded = torch.export.load(os.fspath(tmp)).module()
        check = _feed(parsed, scale + 1, batch, seed=1)
        packed = interface.pack(check)
        _compare(_call(module, packed), _call(loaded, packed),
                 f"path: the exported program {os.fspath(path)!r}", rtol, atol)
    return Path(path)
