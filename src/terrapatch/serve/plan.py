"""Plan a serving run: bind the model, fix the geometry and the tiles (:func:`prepare_serve`).

Nothing is written: the model is loaded (or the given engine used), its inputs and
outputs are bound to the sources, the model's recorded contract fills what the
caller left out (:mod:`terrapatch.serve.recorded`), the receptive and expression
fields are derived or checked by probing (:mod:`terrapatch.serve.probe`), the halo of
a same-padded model is measured, and the layout and the tile plan are built
(:mod:`terrapatch.geometry`). :class:`~terrapatch.serve.job.ServeJob` runs the plan.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypedDict

import numpy as np

from terrapatch._params import optional_pair
from terrapatch.engines import Engine, check_device, load_engine
from terrapatch.errors import InputError, ModelError
from terrapatch.geometry import COVERAGES, Layout, ServingSteps, misalignments, serving_steps
from terrapatch.progress import logger
from terrapatch.raster import Source, check_sources
from terrapatch.scales import check_spcscale, scale_value
from terrapatch.serve.binding import resolve_inputs, resolve_outputs
from terrapatch.serve.job import ServeJob
from terrapatch.serve.layouts import detect_layout, layout_known, with_layout
from terrapatch.serve.probe import (
    HALO_LIMIT,
    ModelGeometry,
    check_geometry,
    derive_geometry,
    efield_for_fields,
    measure_halo,
    probe_tile,
)
from terrapatch.serve.recorded import recorded_for
from terrapatch.serve.runner import TileRunner
from terrapatch.serve.transforms import Argmax, Normalization, check_normalizations
from terrapatch.tiling import align_size, crop_box, plan_tiles

__all__ = [
    "DEFAULT_TILE_FCN",
    "DEFAULT_TILE_PB",
    "GPU_TILE_BATCH",
    "PB_BATCH_BYTES",
    "PlanOptions",
    "prepare_serve",
]

#: Default tile size (output pixels) in fully-convolutional mode: large tiles amortise
#: the model call and the context margin (OTBTF's default of 16 is several times slower).
DEFAULT_TILE_FCN = 256
#: Default (largest) tile size in patch-based mode: 64×64 = 4096 patches per batch.
DEFAULT_TILE_PB = 64
#: Bytes of float32 patches one patch-based batch may hold: the default tile shrinks for
#: large receptive fields (e.g. 64×64×13 patches) so memory stays bounded.
PB_BATCH_BYTES = 256 * 2**20
#: Fully-convolutional tiles per model call when the model runs on a GPU.
GPU_TILE_BATCH = 4


class PlanOptions(TypedDict, total=False):
    """Keyword arguments of :func:`prepare_serve`, passed on by :func:`~terrapatch.serve.serve`."""

    fullyconv: bool | None
    spcscale: float | Fraction | str | None
    efield: int | Sequence[int] | None
    tile_size: int | Sequence[int] | None
    box: Sequence[int] | None
    user_placeholders: Mapping[str, Any] | None
    disable_tiling: bool
    engine: Engine | None
    model_layout: str | None
    margin: int | Sequence[int] | None
    coverage: str | None
    padding: str | float
    normalization: Sequence[Normalization | None] | None
    argmax: bool
    threshold: float | None
    below_threshold: float
    tile_batch: int | None
    device: str


def _pb_default_tile(sources: Sequence[Source], geometry: ModelGeometry) -> int:
    """Largest patch-based tile (≤ DEFAULT_TILE_PB) whose batch fits in PB_BATCH_BYTES."""
    per_pixel = sum(4 * rx * ry * s.bands
                    for s, (rx, ry) in zip(sources, geometry.fields, strict=True))
    side = math.isqrt(max(1, PB_BATCH_BYTES // max(1, per_pixel)))
    return max(1, min(DEFAULT_TILE_PB, side))


def prepare_serve(
    sources: Sequence[Source],
    model: Any,
    output_names: Sequence[str] | str | None = None,
    fullyconv: bool | None = None,
    spcscale: float | Fraction | str | None = None,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    engine: Engine | None = None,
    model_layout: str | None = None,
    margin: int | Sequence[int] | None = None,
    coverage: str | None = None,
    padding: str | float = "reflect",
    normalization: Sequence[Normalization | None] | None = None,
    argmax: bool = False,
    threshold: float | None = None,
    below_threshold: float = 255,
    tile_batch: int | None = None,
    device: str = "auto",
) -> ServeJob:
    """Validate a serving run and plan its tiles, without writing anything.

    Loads the model, resolves its inputs, outputs and tensor layout (filling what
    the caller leaves out from the contract the model records, docs/models.md),
    derives or checks the geometry (one small probe run), measures the halo of a
    same-padded model, builds the layout and the tile plan.

    Parameters
    ----------
    sources
        :class:`~terrapatch.raster.Source` objects, source 1 first: their
        ``patch_size`` is the receptive field (None: derived from the model),
        ``placeholder`` the model input they feed (None: the free inputs in
        alphabetical order), ``nodata`` their no-data value.
    model
        SavedModel directory, ``.keras``, ``.onnx``, ``.pt2`` (torch.export) or ``.pt``
        (TorchScript) file, in-memory :class:`keras.Model` or ``torch.nn.Module``, or an
        :class:`~terrapatch.engines.Engine`.
    output_names
        Model outputs to write, stacked as bands in this order (signature keys or
        Keras layer names); default: the first output in alphabetical order.
    fullyconv
        Fully-convolutional mode: one tensor per source per tile; else patch-based.
    spcscale
        Output spacing in source-1 pixels: an integer ``k`` (coarser output) or ``1/k``
        (super-resolution: 0.5, 0.25, ``Fraction(1, 3)``; output pixels nested ``k × k``
        in every source-1 pixel). Other values are an error naming the nearest valid
        ones.
    efield
        Expression field ``ex`` or ``(ex, ey)`` (fully-convolutional mode); None:
        derived from the model (1 in patch-based mode).
    tile_size
        Tile size in output pixels (default :data:`DEFAULT_TILE_FCN` or
        :data:`DEFAULT_TILE_PB`), enlarged to a multiple of the expression field.
    box
        ``(startx, starty, sizex, sizey)`` in output-grid pixels: only that part is
        computed and written (cropped to the grid; no overlap is an error).
    user_placeholders
        Extra constant model inputs, name → array.
    disable_tiling
        Compute the whole box as one tile.
    engine
        An already loaded engine to run instead of opening ``model``.
    model_layout
        ``"nhwc"`` (channels last: TensorFlow, Keras) or ``"nchw"`` (channels first:
        PyTorch exports) image tensors, inputs and outputs alike. None: detected from
        the model's static channel dimensions and the sources' band counts.
    margin
        Output pixels by which tiles overlap (computed, then cropped), ``m`` or
        ``(mx, my)``. None: 0, except for same-padded models (output as large as the
        input), whose halo is measured by probing so that tiles equal the model applied
        to the whole image.
    coverage
        ``"inset"`` (OTBTF's: only pixels whose receptive fields lie inside every
        source) or ``"full"`` (source 1's whole extent; windows past the edges are
        filled as ``padding`` says). None: full for same-padded models, else inset.
    padding
        Fill of windows past a source's edges under full coverage: ``"reflect"`` or a
        constant value.
    normalization
        One :class:`~terrapatch.serve.Normalization` (or None) per source, applied to
        its values before the model (after nodata detection).
    argmax
        Write the class index of each output's highest score instead of the scores.
    threshold
        With ``argmax``: pixels whose highest score is below it get ``below_threshold``.
    below_threshold
        Value of pixels below ``threshold``.
    tile_batch
        Fully-convolutional tiles of one size stacked into one model call (in this
        process). Default: :data:`GPU_TILE_BATCH` on a GPU, else 1.
    device
        Where the model runs: ``"cpu"``, ``"cuda"`` (onnxruntime's CUDA provider,
        TensorFlow's GPU, torch CUDA; an error naming ``device`` when there is none) or
        ``"auto"`` (CUDA when the engine finds a GPU). Dask workers resolve it on
        their own machine.

    Returns
    -------
    ServeJob
        The planned run; :meth:`ServeJob.run` writes the map.
    """
    sources = check_sources(sources)
    grids = [s.grid for s in sources]  # opens every source: missing/unreadable files fail here
    recorded = recorded_for(model)
    fields_given = any(s.patch_size is not None for s in sources)
    sources = recorded.sources(sources)
    fullyconv = bool(recorded.value(fullyconv, "fullyconv", False))
    spcscale = recorded.value(spcscale, "spcscale", 1)
    if not fields_given:  # the recorded expression field goes with the recorded fields
        efield = recorded.value(efield, "efield", None)
    output_names = recorded.value(output_names or None, "output_names", None)
    model_layout = recorded.value(model_layout, "model_layout", None)
    normalization = recorded.normalizations(normalization, sources)
    device = check_device(device)
    if engine is None:
        engine = load_engine(model, device=device)
    model_path = model if isinstance(model, str | os.PathLike) else None
    user_inputs = {k: np.asarray(v) for k, v in (user_placeholders or {}).items()}
    user_inputs = {engine.resolve_input(k, "user_placeholders"): v
                   for k, v in user_inputs.items()}
    input_names = resolve_inputs(engine, sources, user_inputs)
    layout_guessed = model_layout is None and not layout_known(engine, input_names)
    model_layout = detect_layout(engine, sources, input_names, model_layout)
    engine = with_layout(engine, model_layout)
    outputs = resolve_outputs(engine, output_names)
    coverage = _check_coverage(coverage)
    pad = _check_padding(padding)
    if threshold is not None and not argmax:
        raise InputError(f"threshold: {threshold!r} needs argmax=True (the threshold "
                         "applies to the highest class score)")
    post = Argmax(threshold, below_threshold) if argmax else None
    given_margin = _margin(margin)
    spcscale = scale_value(check_spcscale(spcscale))
    ef = optional_pair(efield, "efield")
    if not fullyconv and ef not in (None, (1, 1)):
        raise InputError(
            f"efield: {ef[0]}×{ef[1]} in patch-based mode; each patch gives one output "
            "pixel, so the expression field must be 1 (use fullyconv=True for larger ones)"
        )
    names = [s.name for s in sources]
    given = [s.patch_size for s in sources]
    derived = False
    if all(f is not None for f in given):
        geometry = ModelGeometry(tuple(given), ef or (1, 1), spcscale)  # type: ignore[arg-type]
        if fullyconv and ef is None:
            # OTBTF's default expression field is 1; otherwise derive it from the model.
            layout = Layout(tuple(grids), geometry.fields, factor=spcscale, efield=(1, 1))
            _, problem = probe_tile(engine, sources, layout, input_names, outputs, True,
                                     user_inputs, geometry)
            if problem:
                try:
                    found = derive_geometry(engine, sources, input_names, outputs, True,
                                            spcscale, user_inputs)
                except ModelError:  # reported with suggestions by _check_geometry below
                    found = None
                e = None if found is None else efield_for_fields(grids, geometry.fields,
                                                                  found, spcscale)
                if e is not None:
                    geometry = ModelGeometry(geometry.fields, e, spcscale)
                    derived = True
                    logger.info("expression field derived from the model: %d×%d", *e)
    else:
        with _layout_hint(layout_guessed, model_layout):
            found = derive_geometry(engine, sources, input_names, outputs, fullyconv,
                                    spcscale, user_inputs)
        fields = tuple(g if g is not None else d for g, d in zip(given, found.fields,
                                                                 strict=True))
        if ef is None:
            ef = found.efield if fullyconv else (1, 1)
        geometry = ModelGeometry(fields, ef, spcscale)
        derived = True
        logger.info("geometry derived from the model: %s", geometry.describe(names))

    steps = serving_steps(grids, spcscale, fullyconv)
    same_padded = bool(fullyconv and steps is not None and all(
        rf[d] * steps.outputs[d] == step[d] * geometry.efield[d]
        for rf, step in zip(geometry.fields, steps.sources, strict=True) for d in (0, 1)))
    if coverage is None:
        coverage = "full" if same_padded else "inset"
    layout = Layout(tuple(grids), geometry.fields, factor=spcscale, efield=geometry.efield,
                    coverage=coverage)
    for line in misalignments(grids):
        logger.warning("%s", line)
    out_grid = layout.output_grid
    with _layout_hint(layout_guessed, model_layout):
        channels = check_geometry(engine, sources, layout, input_names, outputs, fullyconv,
                                   user_inputs, geometry)
    dtypes = [engine.inputs[n].dtype for n in input_names]
    coefficients = check_normalizations(normalization, names, [s.bands for s in sources],
                                        dtypes)
    runner = TileRunner(sources, layout, input_names, dtypes, outputs, channels, fullyconv,
                        user_inputs, os.fspath(model_path) if model_path is not None else None,
                        model_layout=model_layout, normalizations=coefficients, argmax=post,
                        pad=pad if coverage == "full" else None, device=device)
    if given_margin is not None:
        margin_px = given_margin
    elif same_padded and steps is not None and not disable_tiling:
        margin_px = _measured_margin(engine, sources, input_names, outputs, user_inputs,
                                     steps, geometry.efield)
    else:
        margin_px = (0, 0)

    crop, cropped = crop_box(box, out_grid.width, out_grid.height)
    if cropped:
        logger.warning("box=%s cropped to the output grid: %d:%d:%d:%d",
                       ":".join(str(int(v)) for v in box or ()), *crop)
    ex, ey = geometry.efield
    if disable_tiling:
        size = (crop[2] + ex, crop[3] + ey)
    else:
        default = DEFAULT_TILE_FCN if fullyconv else _pb_default_tile(sources, geometry)
        size = optional_pair(tile_size, "tile_size") or (default, default)
    if given_margin is not None and any(m > t for m, t in zip(given_margin, size,
                                                                 strict=True)):
        raise InputError(f"margin: {given_margin[0]} px is larger than the tile "
                         f"({size[0]}×{size[1]} px); give a larger tile_size")
    if any(m > t for m, t in zip(margin_px, size, strict=True)):
        enlarged = (max(size[0], 2 * margin_px[0]), max(size[1], 2 * margin_px[1]))
        logger.warning("tile_size: %d×%d enlarged to %d×%d, twice the measured halo "
                       "of %d px", *size, *enlarged, margin_px[0])
        size = enlarged
    adjusted = align_size(size, geometry.efield)
    if adjusted != size and not disable_tiling:
        logger.warning("tile_size: %d×%d enlarged to %d×%d, a multiple of the "
                       "expression field %d×%d", *size, *adjusted, ex, ey)
    tiles = plan_tiles(out_grid.width, out_grid.height, crop, adjusted, geometry.efield,
                       margin=margin_px, computed=layout.computed_size)
    logger.info("output grid %d×%d px at %g m (%s coverage), box %s, %d tile(s) of %d×%d "
                "overlapping by %d px (%s, %s model)", out_grid.width, out_grid.height,
                out_grid.grid.spacing[0], coverage, crop, len(tiles), *adjusted, margin_px[0],
                "fully-convolutional" if fullyconv else "patch-based", model_layout)
    batch = _tile_batch(tile_batch, getattr(engine, "device", "cpu"))
    return ServeJob(sources, engine, layout, geometry, derived, runner, crop, adjusted, tiles,
                    model_path=_model_path(model, engine), margin=margin_px, tile_batch=batch,
                    recorded=recorded)


def _tile_batch(value: int | None, device: str) -> int:
    """Tiles per model call (fully-convolutional), or raise naming ``tile_batch``.

    Default: :data:`GPU_TILE_BATCH` when the engine runs on a GPU, else 1 (a CPU is
    as busy with one tile as with several).
    """
    if value is None:
        return GPU_TILE_BATCH if device == "cuda" else 1
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise InputError(f"tile_batch: {value!r} must be an integer ≥ 1")
    return int(value)


@contextlib.contextmanager
def _layout_hint(guessed: bool, layout: str) -> Iterator[None]:
    """Add to a model error that the tensor layout was assumed, not read from the model."""
    try:
        yield
    except ModelError as exc:
        if not guessed:
            raise
        other = "nchw" if layout == "nhwc" else "nhwc"
        raise ModelError(f"{exc}; the model's inputs have no static channel dimension, so "
                         f"terrapatch assumed {layout}: give model_layout={other!r} if the "
                         "model takes the other layout") from None


def _check_coverage(value: str | None) -> str | None:
    """``inset``, ``full`` or None (chosen from the model), or raise naming ``coverage``."""
    if value is None:
        return None
    text = str(value).lower()
    if text not in COVERAGES:
        raise InputError(f"coverage: {value!r} is not one of {', '.join(COVERAGES)}")
    return text


def _check_padding(value: str | float) -> str | float:
    """``reflect`` or a finite constant, or raise naming ``padding``."""
    if isinstance(value, str):
        if value.lower() == "reflect":
            return "reflect"
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"padding: {value!r} is neither reflect nor a "
                             "number") from None
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"padding: {value!r} must be finite or reflect")
    return number


def _margin(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """A margin ``(mx, my)`` ≥ 0 from one value or a pair, or raise naming ``margin``."""
    if value is None:
        return None
    items = [value] if isinstance(value, int | float | np.number) else list(value)
    if len(items) not in (1, 2) or any(int(v) != v or v < 0 for v in items):
        raise InputError(f"margin: {value!r} must be an integer number of pixels ≥ 0 "
                         "(or a pair)")
    pair = (int(items[0]), int(items[-1]))
    return pair


def _measured_margin(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
                     outputs: Sequence[str], user_inputs: Mapping[str, np.ndarray],
                     steps: ServingSteps, efield: tuple[int, int]
                     ) -> tuple[int, int]:
    """The halo of a same-padded model, measured; a warning when it cannot be."""
    halo, problem = measure_halo(engine, input_names, [s.bands for s in sources], outputs,
                                 user_inputs, steps, efield=efield)
    if halo is None and "reached" in problem:
        raise ModelError(
            f"model: the model's output keeps its input size (same padding), but {problem}; "
            f"give margin={2 * HALO_LIMIT} or serve with "
            "disable_tiling=True"
        )
    if halo is None:
        logger.warning("margin: the halo of this same-padded model could not be "
                       "measured (%s): tiles do not overlap, and pixels near tile edges may "
                       "differ from the model applied to the whole image; give margin=N (pixels)",
                       problem)
        return (0, 0)
    if halo:
        logger.info("same-padded model: halo measured %d px; tiles overlap by %d px and crop "
                    "it (give margin=N to override)", halo, halo)
    return (halo, halo)


def _model_path(model: Any, engine: Engine) -> str | None:
    """The model's file or directory, when it has one (for clusters and journals)."""
    if isinstance(model, str | os.PathLike):
        return os.path.abspath(os.fspath(model))
    path = str(getattr(engine, "path", "") or "")
    return os.path.abspath(path) if path and os.path.exists(path) else None
