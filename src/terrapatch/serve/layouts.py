"""Tensor layouts: detect whether a model takes channels-last or channels-first images.

TensorFlow and Keras models take ``[batch, rows, cols, bands]`` (``"nhwc"``); models
exported from PyTorch, most ONNX files among them, take ``[batch, bands, rows,
cols]`` (``"nchw"``). :func:`detect_layout` decides from the model's static input
shapes against the sources' band counts, then from the engine's convention, and
:func:`with_layout` wraps a channels-first engine so that the rest of serving
(probing, tiles, assembly) always sees channels-last tensors: inputs are
transposed on the way in, rank-4 outputs on the way out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from terrapatch.engines import Engine, TensorInfo
from terrapatch.errors import InputError, ModelError
from terrapatch.progress import logger
from terrapatch.raster import Source

__all__ = ["LAYOUTS", "ChannelsFirstEngine", "detect_layout", "layout_known", "with_layout"]

#: Accepted layouts: channels last (TensorFlow, Keras) and channels first (PyTorch, ONNX).
LAYOUTS = ("nhwc", "nchw")


def check_layout(value: Any, parameter: str = "model_layout") -> str | None:
    """Normalise a layout name (None stays None: detect it), or raise naming ``parameter``."""
    if value is None or value == "":
        return None
    text = str(value).lower()
    if text not in LAYOUTS:
        raise InputError(f"{parameter}: {value!r} is not a layout; expected nhwc (channels "
                         "last) or nchw (channels first)")
    return text


def _fits(shape: tuple[int | None, ...] | None, axis: int, bands: int) -> bool | None:
    """Whether a rank-4 static shape has ``bands`` at ``axis`` (None: not static)."""
    if shape is None or len(shape) != 4 or shape[axis] is None:
        return None
    return shape[axis] == bands


def _describe_feed(source: Source, layout: str) -> str:
    if layout == "nchw":
        return f"[batch, {source.bands}, rows, cols] (nchw)"
    return f"[batch, rows, cols, {source.bands}] (nhwc)"


def detect_layout(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
                  override: str | None = None) -> str:
    """Layout of the model's image inputs: ``"nhwc"`` or ``"nchw"``.

    Decided, in this order, by ``override`` (checked against the band counts), by
    the static channel dimension of each input against its source's band count,
    and by the engine's convention (:attr:`Engine.layout`; channels last for
    TensorFlow and Keras). All inputs share one layout.

    Raises
    ------
    InputError
        If ``override`` contradicts a static channel dimension, or no layout fits
        every source's band count (the message states both possibilities).
    """
    override = check_layout(override)
    shapes = {name: engine.inputs[name].shape for name in input_names}
    for name in input_names:
        shape = shapes[name]
        if shape is not None and len(shape) != 4:
            raise ModelError(
                f"model: model input {engine.inputs[name].describe()} is not an image batch "
                "(rank 4: [batch, rows, cols, bands] or [batch, bands, rows, cols])"
            )
    fits = {layout: [_fits(shapes[n], -1 if layout == "nhwc" else 1, s.bands)
                     for s, n in zip(sources, input_names, strict=True)]
            for layout in LAYOUTS}
    if override is not None:
        other = "nchw" if override == "nhwc" else "nhwc"
        for s, n, ok, alt in zip(sources, input_names, fits[override], fits[other],
                                 strict=True):
            if ok is False or (ok is None and alt):
                raise InputError(
                    f"model_layout: {override} contradicts the model: input "
                    f"{engine.inputs[n].describe()} has no {s.bands} channel(s) of {s.name} "
                    f"there; terrapatch would feed {_describe_feed(s, override)}"
                )
        return override
    votes: set[str] = set()
    both = False
    for s, n, last, first in zip(sources, input_names, fits["nhwc"], fits["nchw"],
                                 strict=True):
        if last and first:
            both = True
        elif last:
            votes.add("nhwc")
        elif first:
            votes.add("nchw")
        elif last is False or first is False:  # a static channel axis that does not fit
            raise InputError(_mismatch(engine, s, n))
    if len(votes) > 1:
        raise InputError(
            "model_layout: the model's inputs disagree (some channels last, some channels "
            f"first: {', '.join(engine.inputs[n].describe() for n in input_names)}); "
            "give model_layout"
        )
    if votes:
        return votes.pop()
    layout = engine.layout
    if both:  # every channel dimension fits both ways, e.g. [1, 3, 64, 3]
        logger.warning("model_layout: the model's input shapes fit both nhwc and nchw; "
                       "assuming %s (give model_layout to choose)", layout)
    return layout


def _mismatch(engine: Engine, source: Source, name: str) -> str:
    """Message for a source whose band count fits neither layout of a model input."""
    info = engine.inputs[name]
    shape = info.shape or ()
    static = [(axis, shape[i]) for axis, i in (("channels last", -1), ("channels first", 1))
              if shape and shape[i] is not None]
    axis, channels = static[0]
    return (f"{source.name}: {source.bands} band(s), but model input {name!r} expects "
            f"{channels} channel(s) ({info.describe()}, read {axis}); terrapatch would feed "
            f"{_describe_feed(source, 'nhwc')} or {_describe_feed(source, 'nchw')}")


def layout_known(engine: Engine, input_names: Sequence[str]) -> bool:
    """Whether some input's shape shows its channel axis (a static dim 1 or -1)."""
    for name in input_names:
        shape = engine.inputs[name].shape
        if shape is not None and len(shape) == 4 and (shape[1] is not None
                                                      or shape[-1] is not None):
            return True
    return False


class ChannelsFirstEngine(Engine):
    """A channels-first engine seen as channels-last: transposes inputs and rank-4 outputs.

    Parameters
    ----------
    inner
        The engine of a model taking ``[batch, bands, rows, cols]`` images.
    """

    layout = "nhwc"

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        super().__init__(inner.path, {k: _to_last(v) for k, v in inner.inputs.items()},
                         {k: _to_last(v) for k, v in inner.outputs.items()}, inner.aliases)

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        moved = {k: (np.ascontiguousarray(v.transpose(0, 3, 1, 2)) if v.ndim == 4 else v)
                 for k, v in feed.items()}
        result = self.inner.run(moved, outputs)
        return {k: (np.asarray(v).transpose(0, 2, 3, 1) if np.ndim(v) == 4 else v)
                for k, v in result.items()}


def _to_last(info: TensorInfo) -> TensorInfo:
    """The channels-last view of a channels-first tensor description."""
    shape = info.shape
    if shape is not None and len(shape) == 4:
        shape = (shape[0], shape[2], shape[3], shape[1])
    return TensorInfo(info.name, shape, info.dtype)


def with_layout(engine: Engine, layout: str | None) -> Engine:
    """``engine`` as a channels-last engine (wrapped when ``layout`` is ``"nchw"``)."""
    if layout == "nchw" and not isinstance(engine, ChannelsFirstEngine):
        return ChannelsFirstEngine(engine)
    return engine

