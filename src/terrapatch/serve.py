"""ModelServe: apply a model to whole rasters, streaming tile by tile into a GeoTIFF.

:func:`serve` is terrapatch's ``TensorflowModelServe``: N sources, each at its own
resolution with its receptive field, feed a model (TF SavedModel, ``.keras`` or
ONNX, see :mod:`terrapatch.engines`) in *patch-based* mode (one patch per source
per output pixel, every pixel of a tile in one batch) or *fully-convolutional*
mode (one tensor per source per tile); the outputs are stacked as bands of a
tiled, compressed, georeferenced GeoTIFF on the output grid of
:class:`terrapatch.geometry.Layout`.

Every window comes from the layout (:meth:`~terrapatch.geometry.Layout.tile_regions`
for what a tile reads, :meth:`~terrapatch.geometry.Layout.tile_starts` for the
patches cut out of it); this module computes none on its own.

Streaming: the output is cut into tiles aligned on the expression field. A tile
is an independent task (:class:`TileRunner`: tile → array). Locally, a reader
thread prepares the next tiles' inputs and a writer thread writes the previous
ones while the model computes, through bounded queues, so memory depends on the
tile size, never on the raster size. On a Dask cluster (``scheduler=`` or
``workers=``), runs of consecutive tiles are tasks (:func:`serve_block`): each
reads its own inputs and runs the model (loaded once per worker process,
:func:`cached_engine`), and this process writes the blocks in order as they come
back, with a bounded number of blocks in flight. Either way the map is the same,
and the file is written under a temporary name and renamed when complete.

When receptive fields or the expression field are not given, they are derived
from the model by probing its output size as a function of its input sizes
(:func:`derive_geometry`); when given values disagree with the model, the error
states the expected and actual shapes and suggests consistent values.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from terrapatch import cluster
from terrapatch.engines import Engine, ModelRunError, load_engine
from terrapatch.errors import GeometryError, InputError, ModelError
from terrapatch.geometry import Grid, Layout
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import (
    Source,
    SourceReader,
    is_remote,
    nodata_mask,
    patches_from_region,
)
from terrapatch.writer import (
    atomic_output,
    check_writable,
    convert_pixels,
    geotiff_profile,
    pixel_dtype,
)

__all__ = [
    "CLUSTER_BLOCK_TILES",
    "DEFAULT_TILE_FCN",
    "DEFAULT_TILE_PB",
    "ModelGeometry",
    "ServeJob",
    "ServeSummary",
    "Tile",
    "TileRunner",
    "cached_engine",
    "derive_geometry",
    "plan_tiles",
    "prepare_serve",
    "serve",
    "serve_block",
]

#: Default tile size (output pixels) in fully-convolutional mode: large tiles amortise
#: the model call and the context margin (OTBTF's default of 16 is several times slower).
DEFAULT_TILE_FCN = 256
#: Default (largest) tile size in patch-based mode: 64×64 = 4096 patches per batch.
DEFAULT_TILE_PB = 64
#: Bytes of float32 patches one patch-based batch may hold: the default tile shrinks for
#: large receptive fields (e.g. 64×64×13 patches) so memory stays bounded.
PB_BATCH_BYTES = 256 * 2**20
#: Most tiles per task on a Dask cluster (fewer when the plan has few tiles per worker
#: thread, so that every worker gets several tasks).
CLUSTER_BLOCK_TILES = 8
#: Tasks per worker thread aimed at when choosing the block size (load balance).
CLUSTER_TASKS_PER_THREAD = 4
#: Models kept loaded per worker process by :func:`cached_engine`.
ENGINE_CACHE_SIZE = 2
#: Idle sets of open source readers kept per worker process between cluster tasks, so
#: that GDAL's block cache carries the blocks neighbouring tasks share.
READER_CACHE_SIZE = 4

Box = tuple[int, int, int, int]


# ============================================================================ tiles


@dataclass(frozen=True)
class Tile:
    """One unit of work: an aligned block of output pixels and the part of it to write.

    Attributes
    ----------
    index
        Position in the plan.
    window
        ``(col_off, row_off, width, height)`` computed, in output-grid pixels; aligned
        on the expression field.
    target
        ``(col_off, row_off, width, height)`` written (inside ``window`` and the box).
    """

    index: int
    window: Box
    target: Box


def plan_tiles(width: int, height: int, box: Box, tile_size: tuple[int, int],
               efield: tuple[int, int]) -> tuple[Tile, ...]:
    """Cut ``box`` of a ``width × height`` output grid into tiles aligned on ``efield``.

    The tile grid is anchored at the box origin (rounded down to the expression
    field), so tiles match the blocks of the written file; each tile's window is its
    target enlarged to the expression field and cropped to the grid.
    """
    bx, by, bw, bh = box
    tx, ty = tile_size
    ex, ey = efield
    ax, ay = bx - bx % ex, by - by % ey
    tiles: list[Tile] = []
    for y0 in range(ay, by + bh, ty):
        for x0 in range(ax, bx + bw, tx):
            tcx0, tcy0 = max(x0, bx), max(y0, by)
            tcx1, tcy1 = min(x0 + tx, bx + bw), min(y0 + ty, by + bh)
            if tcx1 <= tcx0 or tcy1 <= tcy0:
                continue
            wx0, wy0 = tcx0 - tcx0 % ex, tcy0 - tcy0 % ey
            wx1 = min(width, -(-tcx1 // ex) * ex)
            wy1 = min(height, -(-tcy1 // ey) * ey)
            tiles.append(Tile(len(tiles), (wx0, wy0, wx1 - wx0, wy1 - wy0),
                              (tcx0, tcy0, tcx1 - tcx0, tcy1 - tcy0)))
    return tuple(tiles)


# ============================================================================ geometry


@dataclass(frozen=True)
class ModelGeometry:
    """Receptive field per source and expression field, as served.

    Attributes
    ----------
    fields
        ``(rx, ry)`` per source, in the source's pixels.
    efield
        ``(ex, ey)`` output pixels per input window.
    spcscale
        Output spacing in source-1 pixels.
    """

    fields: tuple[tuple[int, int], ...]
    efield: tuple[int, int]
    spcscale: int

    def describe(self, names: Sequence[str]) -> str:
        """OTBTF parameter spelling, e.g. ``source1.rfieldx/y=8/8, ..., output.spcscale=1``."""
        parts = [f"{n}.rfieldx/y={rx}/{ry}" for n, (rx, ry) in zip(names, self.fields,
                                                                   strict=True)]
        parts.append(f"output.efieldx/y={self.efield[0]}/{self.efield[1]}")
        parts.append(f"output.spcscale={self.spcscale}")
        return ", ".join(parts)


class _Prober:
    """Run the model on zero inputs of given sizes; return the output's spatial size."""

    def __init__(self, engine: Engine, names: Sequence[str], bands: Sequence[int],
                 outputs: Sequence[str], extra: Mapping[str, np.ndarray]) -> None:
        self.engine = engine
        self.names = list(names)
        self.bands = list(bands)
        self.outputs = list(outputs)
        self.extra = dict(extra)
        self.cache: dict[tuple[tuple[int, int], ...], tuple[int, int] | None] = {}
        self.last_shapes: dict[str, tuple[int, ...]] = {}
        self.last_error = ""
        self.calls = 0

    def feed(self, sizes: Sequence[tuple[int, int]], batch: int = 1) -> dict[str, np.ndarray]:
        feed = {n: np.zeros((batch, h, w, b), dtype=self.engine.inputs[n].dtype)
                for n, b, (w, h) in zip(self.names, self.bands, sizes, strict=True)}
        feed.update(self.extra)
        return feed

    def __call__(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        key = tuple((int(w), int(h)) for w, h in sizes)
        if key in self.cache:
            return self.cache[key]
        result: tuple[int, int] | None = None
        self.last_shapes, self.last_error = {}, ""
        if all(w >= 1 and h >= 1 for w, h in key):
            self.calls += 1
            try:
                out = self.engine.run(self.feed(key), self.outputs)
            except ModelError as exc:
                self.last_error = str(exc)
            else:
                self.last_shapes = {k: tuple(v.shape) for k, v in out.items()}
                spatial = {_spatial_size(v) for v in out.values()}
                if len(spatial) == 1:
                    result = spatial.pop()
                    if result is not None and (result[0] < 1 or result[1] < 1):
                        result = None
        self.cache[key] = result
        return result


def _spatial_size(array: np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` of a batch-1 output; flattened outputs are assumed square."""
    shape = array.shape
    if array.ndim in (3, 4):
        return (int(shape[2]), int(shape[1]))
    if array.ndim in (1, 2):
        side = math.isqrt(int(shape[0]))
        return (side, side) if side * side == shape[0] else None
    return None


def _channels(array: np.ndarray) -> int:
    """Channels of an output as OTBTF counts them: last dim for ranks 2 and 4, else 1."""
    return int(array.shape[-1]) if array.ndim in (2, 4) else 1


def _strides(grids: Sequence[Grid], spcscale: int, fullyconv: bool
             ) -> list[tuple[int, int]] | None:
    """Source pixels per output pixel, per source and axis, if integers.

    Fully-convolutional: ``spcscale · s1 / s_i``. Patch-based models see only patches,
    so their own scale is used: coarsest spacing / ``s_i`` when that is not integral.
    """
    def ratios(num: tuple[float, float]) -> list[tuple[int, int]] | None:
        out = []
        for g in grids:
            pair = []
            for dim in (0, 1):
                r = Fraction(num[dim] / g.spacing[dim]).limit_denominator(1000)
                if r.denominator != 1 or r < 1:
                    return None
                pair.append(int(r))
            out.append((pair[0], pair[1]))
        return out

    s1 = grids[0].spacing
    found = ratios((spcscale * s1[0], spcscale * s1[1]))
    if found is None and not fullyconv:
        found = ratios((max(g.spacing[0] for g in grids), max(g.spacing[1] for g in grids)))
    return found


def _offsets(count: int, radius: int) -> Iterator[tuple[int, ...]]:
    """Integer vectors of length ``count`` by increasing max-norm, then 1-norm."""
    if count == 0:
        yield ()
        return
    vectors = sorted(product(range(-radius, radius + 1), repeat=count),
                     key=lambda v: (max(abs(x) for x in v), sum(abs(x) for x in v)))
    yield from vectors


class _NoGeometry(Exception):
    """Derivation failed; the message says why."""


def _derive(prober: _Prober, strides: Sequence[tuple[int, int]],
            static: Sequence[tuple[int | None, int | None]], fullyconv: bool,
            spcscale: int) -> ModelGeometry:
    n = len(strides)
    if all(w is not None and h is not None for w, h in static):
        sizes = [(int(w), int(h)) for w, h in static]  # type: ignore[arg-type]
        m = prober(sizes)
        if m is None:
            raise _NoGeometry(f"the model fails on its own static input sizes {sizes}")
        if not fullyconv and m != (1, 1):
            raise _NoGeometry(f"the model emits {m[0]}×{m[1]} pixels per patch, not one")
        return ModelGeometry(tuple(sizes), (1, 1) if not fullyconv else m, spcscale)

    found = None
    radius = {1: 0, 2: 12}.get(n, 4)
    for base in (64, 160):
        for offs in _offsets(n - 1, radius):
            t = [base, *[base + o for o in offs]]
            sizes = [(dx * ti, dy * ti) for (dx, dy), ti in zip(strides, t, strict=True)]
            m0 = prober(sizes)
            if m0 is not None:
                found = (sizes, m0)
                break
        if found:
            break
    if found is None:
        raise _NoGeometry(
            "no input sizes in the ratio of the source spacings give an output "
            f"(last error: {prober.last_error or 'none'})"
        )
    sizes, m0 = found
    # Smallest input sizes still giving m0: the receptive field for m0 outputs.
    minimal: list[tuple[int, int]] = list(sizes)
    for i in range(n):
        for dim in (0, 1):
            for _ in range(strides[i][dim] - 1):
                w, h = minimal[i]
                smaller = (w - 1, h) if dim == 0 else (w, h - 1)
                if prober([*minimal[:i], smaller, *minimal[i + 1:]]) == m0:
                    minimal[i] = smaller
                else:
                    break
    # Expression field: smallest output increment the model accepts.
    efield = None
    for j in range(1, 65):
        trial = [(w + dx * j, h + dy * j) for (w, h), (dx, dy) in zip(minimal, strides,
                                                                        strict=True)]
        if prober(trial) == (m0[0] + j, m0[1] + j):
            efield = j
            break
    if efield is None:
        raise _NoGeometry("the model accepts no larger input in the ratio of the spacings")
    if not fullyconv:
        efield = 1
    fields = []
    for (w, h), (dx, dy) in zip(minimal, strides, strict=True):
        rx = w - dx * m0[0] + dx * efield
        ry = h - dy * m0[1] + dy * efield
        if rx < 1 or ry < 1:
            raise _NoGeometry("the model's output is larger than its input allows")
        fields.append((rx, ry))
    if not fullyconv and prober(fields) != (1, 1):
        raise _NoGeometry(
            f"patches of {[f'{rx}×{ry}' for rx, ry in fields]} pixels do not give one output "
            "pixel each (is the model fully convolutional only?)"
        )
    return ModelGeometry(tuple(fields), (efield, efield), spcscale)


def derive_geometry(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
                    output_names: Sequence[str], fullyconv: bool, spcscale: int = 1,
                    user_inputs: Mapping[str, np.ndarray] | None = None) -> ModelGeometry:
    """Derive receptive fields and expression field from the model.

    The model is run on zero inputs whose sizes keep the ratio of the source
    spacings (source ``i`` gets ``spcscale · s1 / s_i`` pixels per output pixel); the
    smallest sizes that give ``m`` output pixels, and the smallest output increment
    the model accepts, give ``rf_i`` and the expression field. Patch-based models with
    a static input size use it. Rows and columns are assumed to behave alike.

    Raises
    ------
    ModelError
        If no consistent geometry is found; the message says what was tried.
    """
    grids = [s.grid for s in sources]
    strides = _strides(grids, spcscale, fullyconv)
    names = [s.name for s in sources]
    if strides is None:
        spacings = ", ".join(f"{n} {g.spacing[0]:g}" for n, g in zip(names, grids, strict=True))
        raise ModelError(
            f"output.spcscale: cannot derive receptive fields with spcscale={spcscale}: the "
            f"source spacings ({spacings}) are not integer divisions of the output spacing "
            f"{spcscale * grids[0].spacing[0]:g}; {_spcscale_hint(grids)}"
        )
    prober = _Prober(engine, input_names, [s.bands for s in sources], output_names,
                     user_inputs or {})
    static = [_static_hw(engine, n) for n in input_names]
    try:
        return _derive(prober, strides, static, fullyconv, spcscale)
    except _NoGeometry as exc:
        raise ModelError(
            f"model.dir: cannot derive the receptive fields from the model {engine.path} "
            f"with output.spcscale={spcscale}: {exc}; give sourceK.rfieldx/y "
            "(and output.efieldx/y)"
        ) from None


def _spcscale_hint(grids: Sequence[Grid]) -> str:
    coarse = max(g.spacing[0] for g in grids) / grids[0].spacing[0]
    ratio = Fraction(coarse).limit_denominator(1000)
    if ratio.denominator == 1 and ratio > 1:
        return f"try output.spcscale={int(ratio)}"
    return "give output.spcscale so that every source spacing divides the output spacing"


def _static_hw(engine: Engine, name: str) -> tuple[int | None, int | None]:
    shape = engine.inputs[name].shape
    if shape is None or len(shape) != 4:
        return (None, None)
    return (shape[2], shape[1])


def _suggest(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
             output_names: Sequence[str], fullyconv: bool, spcscale: int,
             user_inputs: Mapping[str, np.ndarray]) -> str:
    """A sentence suggesting consistent rf/ef/spcscale values, derived from the model."""
    names = [s.name for s in sources]
    scales = [spcscale] + ([f for f in (1, 2, 3, 4, 6, 8) if f != spcscale] if fullyconv else [])
    for f in scales:
        try:
            geometry = derive_geometry(engine, sources, input_names, output_names, fullyconv,
                                       f, user_inputs)
        except ModelError:
            continue
        return f"the model's geometry suggests {geometry.describe(names)}"
    return "terrapatch could not derive a consistent geometry from the model either"


# ============================================================================ tile runner


@dataclass
class _Stats:
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)


class TileRunner:
    """Compute output tiles: read a tile's inputs, run the model, return its pixels.

    A tile is computed by a pure function of the tile (:meth:`__call__`), so tiles can
    be distributed; the serving pipeline calls the two stages, :meth:`read` (in a
    reader thread) and :meth:`infer` (in the model thread), separately.

    Parameters
    ----------
    sources
        The sources, source 1 first.
    layout
        The layout giving every window.
    input_names
        Model input fed by each source.
    input_dtypes
        Dtype of each model input (inputs are converted while reading).
    output_names
        Model outputs, stacked as bands in this order.
    channels
        Channels of each output.
    fullyconv
        Fully-convolutional mode (else patch-based).
    user_inputs
        Extra constant model inputs (``model.userplaceholders``).
    model
        Path of the model, used by :meth:`__call__` to open an engine where none is given.
    """

    def __init__(self, sources: Sequence[Source], layout: Layout, input_names: Sequence[str],
                 input_dtypes: Sequence[np.dtype], output_names: Sequence[str],
                 channels: Sequence[int], fullyconv: bool,
                 user_inputs: Mapping[str, np.ndarray] | None = None,
                 model: str | None = None) -> None:
        self.sources = list(sources)
        self.layout = layout
        self.input_names = list(input_names)
        self.input_dtypes = [np.dtype(d) for d in input_dtypes]
        self.output_names = list(output_names)
        self.channels = list(channels)
        self.fullyconv = fullyconv
        self.user_inputs = dict(user_inputs or {})
        self.model = model
        self._local = threading.local()

    @property
    def bands(self) -> int:
        """Number of output bands."""
        return sum(self.channels)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ stages

    def open_readers(self) -> list[SourceReader]:
        """Open one reader per source (for the calling thread)."""
        return [s.open() for s in self.sources]

    def read(self, readers: Sequence[SourceReader], tile: Tile) -> dict[str, np.ndarray] | None:
        """Read a tile's model inputs; None when a source's input is entirely nodata.

        Fully-convolutional: one ``(1, rows, cols, bands)`` tensor per source holding
        the tile's region. Patch-based: ``(n, ry, rx, bands)`` patches, one per output
        pixel (row-major), cut as strided views of the region.
        """
        col, row, width, height = tile.window
        regions = self.layout.tile_regions(col, row, width, height)
        feed: dict[str, np.ndarray] = {}
        for i, (source, reader, region) in enumerate(zip(self.sources, readers, regions,
                                                         strict=True)):
            data = reader.read(region)  # (bands, rows, cols)
            dtype = self.input_dtypes[i]
            if self.fullyconv:
                if _all_nodata(data, source.nodata):
                    return None
                tensor = np.empty((1, data.shape[1], data.shape[2], data.shape[0]), dtype=dtype)
                tensor[0] = data.transpose(1, 2, 0)
                feed[self.input_names[i]] = tensor
                continue
            cols, rows = self.layout.tile_starts(col, row, width, height, i)
            rx, ry = self.layout.fields[i]
            covered = (np.all(np.diff(cols) <= rx) and np.all(np.diff(rows) <= ry))
            if covered and _all_nodata(data, source.nodata):
                return None
            rr, cc = np.meshgrid(rows - int(region.row_off), cols - int(region.col_off),
                                 indexing="ij")
            region_cast = data if data.dtype == dtype else data.astype(dtype)
            patches = patches_from_region(region_cast, cc.ravel(), rr.ravel(), (rx, ry))
            if not covered and source.nodata is not None:
                raw = patches_from_region(data, cc.ravel(), rr.ravel(), (rx, ry))
                if _all_nodata(raw, source.nodata):
                    return None
            feed[self.input_names[i]] = patches
        feed.update(self.user_inputs)
        return feed

    def infer(self, engine: Engine, tile: Tile, feed: Mapping[str, np.ndarray],
              stats: _Stats | None = None) -> np.ndarray:
        """Run the model on a tile's inputs; return the target pixels ``(rows, cols, bands)``."""
        start = time.perf_counter()
        result = engine.run(feed, self.output_names)
        if stats is not None:
            stats.add("compute", time.perf_counter() - start)
        return self.assemble(tile, result)

    def assemble(self, tile: Tile, result: Mapping[str, np.ndarray]) -> np.ndarray:
        """Reshape the model outputs of a tile to ``(rows, cols, bands)`` of its target."""
        _, _, width, height = tile.window
        parts = []
        for name, channels in zip(self.output_names, self.channels, strict=True):
            array = np.asarray(result[name])
            expected = width * height * channels
            if array.size != expected or (array.ndim in (3, 4) and self.fullyconv
                                          and array.shape[1:3] != (height, width)):
                mode = "fully-convolutional" if self.fullyconv else "patch-based"
                raise ModelError(
                    f"output.names: output {name!r} has shape {tuple(array.shape)} for a "
                    f"{width}×{height}-pixel tile in {mode} mode; expected {expected} values "
                    f"({height}×{width}×{channels})"
                )
            parts.append(array.reshape(height, width, channels))
        stacked = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        tc, tr, tw, th = tile.target
        wc, wr = tile.window[0], tile.window[1]
        return stacked[tr - wr:tr - wr + th, tc - wc:tc - wc + tw]

    # ------------------------------------------------------------------ task

    def __call__(self, tile: Tile, engine: Engine | None = None) -> np.ndarray | None:
        """Compute one tile (pure function of the tile); None when skipped for nodata."""
        local = self._local
        if getattr(local, "readers", None) is None:
            local.readers = self.open_readers()
        if engine is None:
            if getattr(local, "engine", None) is None:
                if self.model is None:
                    raise ModelError("TileRunner: no engine given and no model path to open")
                local.engine = load_engine(self.model)
            engine = local.engine
        feed = self.read(local.readers, tile)
        if feed is None:
            return None
        return self.infer(engine, tile, feed)

    def close(self) -> None:
        """Close the readers opened by :meth:`__call__` in the calling thread."""
        for reader in getattr(self._local, "readers", None) or []:
            reader.close()
        self._local.readers = None


# ============================================================================ cluster tasks

_ENGINES: dict[str, tuple[tuple[int, int], Engine]] = {}
_ENGINES_LOCK = threading.Lock()


def _worker_name() -> str:
    """Address of the Dask worker running the caller, else ``process <pid>``."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"process {os.getpid()}"


def _model_stamp(model: str) -> tuple[int, int]:
    """``(mtime_ns, size)`` of a model file, or of a SavedModel's ``saved_model.pb``."""
    path = Path(model)
    if path.is_dir():
        for name in ("saved_model.pb", "saved_model.pbtxt"):
            if (path / name).is_file():
                path = path / name
                break
    try:
        stat = path.stat()
    except OSError:
        raise ModelError(
            f"model.dir: {model!r} does not exist on worker {_worker_name()} (the model must "
            "be visible to every worker at the same path)"
        ) from None
    return (stat.st_mtime_ns, stat.st_size)


def cached_engine(model: str) -> Engine:
    """The engine of the model at ``model``, loaded once per process and kept.

    Cluster tasks call this so that a worker process loads a model once, not once per
    task; the last :data:`ENGINE_CACHE_SIZE` models are kept, and a model whose file
    changed since it was loaded is loaded again.

    Parameters
    ----------
    model
        SavedModel directory, ``.keras`` or ``.onnx`` file.

    Raises
    ------
    ModelError
        If the model does not exist here (naming the worker) or cannot be loaded.
    """
    stamp = _model_stamp(model)
    with _ENGINES_LOCK:
        cached = _ENGINES.get(model)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        _ENGINES.pop(model, None)
        while len(_ENGINES) >= ENGINE_CACHE_SIZE:
            _ENGINES.pop(next(iter(_ENGINES)))
        engine = load_engine(model)
        _ENGINES[model] = (stamp, engine)
        logger.debug("loaded %s on %s", model, _worker_name())
        return engine


_READERS: dict[tuple[Any, ...], list[list[SourceReader]]] = {}
_READERS_LOCK = threading.Lock()


def _readers_key(runner: TileRunner) -> tuple[Any, ...]:
    """Identity of a runner's sources on this machine: names, paths, modification times."""
    key: list[Any] = []
    for source in runner.sources:
        for path in source.paths:
            try:
                stamp = 0 if is_remote(path) else os.stat(path).st_mtime_ns
            except OSError:
                stamp = -1
            key.append((source.name, path, stamp))
        key.append(None)
    return tuple(key)


def _checkout_readers(runner: TileRunner, where: str
                      ) -> tuple[tuple[Any, ...], list[SourceReader]]:
    """Open readers on the runner's sources, reusing an idle set left by an earlier task."""
    key = _readers_key(runner)
    with _READERS_LOCK:
        idle = _READERS.get(key)
        if idle:
            return key, idle.pop()
    return key, _open_readers_here(runner, where)


def _checkin_readers(key: tuple[Any, ...], readers: list[SourceReader]) -> None:
    """Keep readers for later tasks; close the oldest idle sets beyond the cache size."""
    closing: list[SourceReader] = []
    with _READERS_LOCK:
        _READERS.setdefault(key, []).append(readers)
        _READERS[key] = _READERS.pop(key)  # most recently used last
        while sum(len(v) for v in _READERS.values()) > READER_CACHE_SIZE:
            oldest = next(iter(_READERS))
            closing.extend(_READERS[oldest].pop(0))
            if not _READERS[oldest]:
                del _READERS[oldest]
    for reader in closing:
        reader.close()


def _open_readers_here(runner: TileRunner, where: str) -> list[SourceReader]:
    """Open the runner's sources; a missing file is an error naming the worker ``where``."""
    readers: list[SourceReader] = []
    try:
        for source in runner.sources:
            for path in source.paths:
                if not is_remote(path) and not os.path.exists(path):
                    raise InputError(
                        f"{source.name}.il: {path!r} does not exist on worker "
                        f"{where} (the rasters must be visible to every worker at "
                        "the same path)"
                    )
            readers.append(source.open())
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


#: What a cluster task returns: the pixels of each tile of its block (``(bands, rows,
#: cols)`` in the output pixel type, None for a tile skipped for nodata), and the
#: seconds spent reading and in the model.
BlockResult = tuple[list[np.ndarray | None], float, float]


def serve_block(runner: TileRunner, tiles: Sequence[Tile], pixel_type: str,
                rounding: bool = False) -> BlockResult:
    """Compute a block of tiles: one task of serving on a Dask cluster.

    Opens the sources, reads each tile's inputs, runs the model (:func:`cached_engine`
    of ``runner.model``) and converts the pixels to the output type, so that only
    the map's pixels travel back.

    Parameters
    ----------
    runner
        The tile runner of the job, with a model path every worker can read.
    tiles
        The tiles of the block.
    pixel_type
        Output pixel type.
    rounding
        Round instead of truncating when converting to an integer type.

    Returns
    -------
    BlockResult
        Pixels per tile, read seconds, model seconds.
    """
    if runner.model is None:
        raise ModelError("serve_block: the tile runner has no model path to open")
    dtype = np.dtype(pixel_type)
    engine = cached_engine(runner.model)
    where = _worker_name()  # here: the reader thread is not the worker's task thread
    stats = _Stats()
    pixels: list[np.ndarray | None] = []
    local: dict[str, Any] = {}

    def read(tile: Tile) -> dict[str, np.ndarray] | None:
        start = time.perf_counter()
        if "readers" not in local:
            local["key"], local["readers"] = _checkout_readers(runner, where)
        feed = runner.read(local["readers"], tile)
        stats.add("read", time.perf_counter() - start)
        return feed

    def infer(tile: Tile, feed: dict[str, np.ndarray] | None) -> np.ndarray | None:
        return None if feed is None else runner.infer(engine, tile, feed, stats)

    def keep(tile: Tile, values: np.ndarray | None) -> None:
        pixels.append(None if values is None else np.ascontiguousarray(
            convert_pixels(values, dtype, rounding).transpose(2, 0, 1)))

    def close() -> None:
        if "readers" in local:
            _checkin_readers(local["key"], local.pop("readers"))

    # The same pipeline as in process: the next tile is read while the model runs.
    _pipeline(tiles, read, infer, keep, close, prefetch=2)
    return pixels, stats.read, stats.compute


def _absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def _worker_paths(runner: TileRunner) -> dict[str, str]:
    """Paths every worker must see (a SavedModel's ``saved_model.pb`` too) → parameter."""
    paths = {p: f"{s.name}.il" for s in runner.sources for p in s.paths}
    if runner.model is not None:
        paths[runner.model] = "model.dir"
        if os.path.isdir(runner.model):
            text = os.path.join(runner.model, "saved_model.pbtxt")
            binary = os.path.join(runner.model, "saved_model.pb")
            inside = text if os.path.isfile(text) and not os.path.isfile(binary) else binary
            paths[inside] = "model.dir"
    return paths


def _all_nodata(data: np.ndarray, nodata: float | None) -> bool:
    if nodata is None or data.size == 0:
        return False
    return bool(nodata_mask(data, nodata).all())


# ============================================================================ job


@dataclass(frozen=True)
class ServeSummary:
    """What :func:`serve` wrote.

    Attributes
    ----------
    path
        Output file.
    width, height, bands
        Size of the written raster.
    dtype
        Pixel type written.
    transform, crs
        Georeference of the written raster (the box of the output grid).
    box
        ``(col_off, row_off, width, height)`` of the written part of the output grid.
    output_grid
        The full output grid.
    geometry
        Receptive fields, expression field and spcscale served.
    derived
        Whether the geometry was (partly) derived from the model.
    fullyconv
        Mode.
    output_names
        Outputs stacked as bands.
    tile_size
        Tile size used.
    tiles, skipped_tiles
        Number of tiles, and of tiles filled with the background because a source was
        entirely nodata.
    seconds, read_seconds, compute_seconds, write_seconds
        Wall time of the run, and time spent reading, in the model and writing (these
        overlap).
    """

    path: Path
    width: int
    height: int
    bands: int
    dtype: str
    transform: Affine
    crs: Any
    box: Box
    output_grid: Grid
    geometry: ModelGeometry
    derived: bool
    fullyconv: bool
    output_names: tuple[str, ...]
    tile_size: tuple[int, int]
    tiles: int
    skipped_tiles: int
    seconds: float
    read_seconds: float
    compute_seconds: float
    write_seconds: float

    @property
    def pixels_per_second(self) -> float:
        """Output pixels written per second of wall time."""
        return self.width * self.height / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class ServeJob:
    """A validated serving run: engine, geometry, layout, tile plan; :meth:`run` writes it.

    Build it with :func:`prepare_serve`.
    """

    sources: list[Source]
    engine: Engine
    layout: Layout
    geometry: ModelGeometry
    derived: bool
    runner: TileRunner
    box: Box
    tile_size: tuple[int, int]
    tiles: tuple[Tile, ...]

    @property
    def output_grid(self) -> Grid:
        """The full output grid."""
        return self.layout.output_grid.grid

    @property
    def transform(self) -> Affine:
        """Transform of the written raster (box origin)."""
        return self.output_grid.transform @ Affine.translation(self.box[0], self.box[1])

    def block_cache_bytes(self, dtype: np.dtype) -> int:
        """GDAL block cache for this run: a row of tiles of every source and of the output.

        Enough to decompress every input block once (tiles of a row share blocks with
        the next row through their context), small enough that memory depends on the
        tile size and the raster width, not on the raster size. Never above GDAL's
        current setting.
        """
        from rasterio.env import get_gdal_config

        current = get_gdal_config("GDAL_CACHEMAX")
        col, row, width, height = self.tiles[0].window if self.tiles else (0, 0, 1, 1)
        total = 0
        for source, grid, region in zip(self.sources, self.layout.grids,
                                        self.layout.tile_regions(col, row, width, height),
                                        strict=True):
            rows = int(region.height) + 2 * 256
            total += grid.width * rows * source.bands * source.dtype.itemsize
        total += self.box[2] * (self.tile_size[1] + 256) * self.runner.bands * dtype.itemsize
        wanted = max(64 * 2**20, int(1.5 * total))
        try:
            limit = int(current)
        except (TypeError, ValueError):
            return wanted
        if limit < 100_000:  # GDAL reads small values as megabytes
            limit *= 2**20
        return min(wanted, limit)

    def default_block_tiles(self, threads: int) -> int:
        """Tiles per cluster task for a cluster of ``threads`` task slots.

        At most :data:`CLUSTER_BLOCK_TILES`, fewer when that would give a worker thread
        fewer than :data:`CLUSTER_TASKS_PER_THREAD` tasks.
        """
        per_task = len(self.tiles) // max(1, CLUSTER_TASKS_PER_THREAD * threads)
        return max(1, min(CLUSTER_BLOCK_TILES, per_task))

    def cluster_runner(self) -> TileRunner:
        """The tile runner to ship to a cluster: absolute paths, the model as a path.

        Raises
        ------
        InputError
            If the model was given in memory (workers need a file or directory).
        """
        model = self.runner.model
        if model is None:
            path = str(getattr(self.engine, "path", ""))
            if not path or not os.path.exists(path):
                raise InputError(
                    "model.dir: serving on a Dask cluster needs the model as a SavedModel "
                    "directory, .keras or .onnx file every worker can read; got an "
                    f"in-memory model ({type(self.engine).__name__} {path!r})"
                )
            model = path
        runner = copy.copy(self.runner)
        sources = []
        for source in self.runner.sources:
            moved = copy.copy(source)
            moved.paths = tuple(_absolute(p) for p in source.paths)
            sources.append(moved)
        runner.sources = sources
        runner.model = _absolute(model)
        return runner

    def run(self, out: str | os.PathLike[str], pixel_type: str | np.dtype = "float32",
            rounding: bool = False, background: float | None = None,
            creation_options: Mapping[str, str] | None = None, quiet: bool = False,
            prefetch: int = 2, scheduler: Any = None, workers: int | None = None,
            block_tiles: int | None = None) -> ServeSummary:
        """Compute every tile and write the GeoTIFF ``out`` (atomically); see :func:`serve`."""
        dtype = pixel_dtype(pixel_type, parameter="out (pixel type)")
        fill = convert_pixels(np.asarray([background or 0.0], dtype=np.float64), dtype)[0]
        _, _, bw, bh = self.box
        runner = self.runner
        # The background becomes the output's nodata only when given: with OTBTF's default
        # of 0, a nodata tag would hide class 0 of every classification map.
        profile = geotiff_profile(bw, bh, runner.bands, dtype, crs=self.output_grid.crs,
                                  transform=self.transform,
                                  nodata=None if background is None else float(fill),
                                  creation_options=creation_options)
        stats = _Stats()
        start = time.perf_counter()
        where = "in process"
        if scheduler is None and workers is None:
            self._run_local(out, profile, dtype, rounding, fill, quiet, prefetch, stats)
        else:
            if block_tiles is not None and int(block_tiles) < 1:
                raise InputError(f"block_tiles: {block_tiles!r} must be ≥ 1")
            where = self._run_on_cluster(out, profile, dtype, rounding, fill, quiet, stats,
                                         scheduler, workers, block_tiles)
        seconds = time.perf_counter() - start
        logger.info(
            "wrote %s: %d×%d px, %d band(s) %s, %d tile(s) (%d skipped), %.1f s, %.0f px/s "
            "(%s)", os.fspath(out), bw, bh, runner.bands, dtype.name, len(self.tiles),
            stats.skipped, seconds, bw * bh / max(seconds, 1e-9), where,
        )
        return ServeSummary(
            path=Path(out), width=bw, height=bh, bands=runner.bands, dtype=dtype.name,
            transform=self.transform, crs=self.output_grid.crs, box=self.box,
            output_grid=self.output_grid, geometry=self.geometry, derived=self.derived,
            fullyconv=runner.fullyconv, output_names=tuple(runner.output_names),
            tile_size=self.tile_size, tiles=len(self.tiles), skipped_tiles=stats.skipped,
            seconds=seconds, read_seconds=stats.read, compute_seconds=stats.compute,
            write_seconds=stats.write,
        )

    def _put(self, dataset: Any, tile: Tile, pixels: np.ndarray | None, fill: Any,
             dtype: np.dtype) -> None:
        """Write a tile's ``(bands, rows, cols)`` pixels (None: the background)."""
        tc, tr, tw, th = tile.target
        if pixels is None:
            pixels = np.full((self.runner.bands, th, tw), fill, dtype=dtype)
        dataset.write(pixels, window=Window(tc - self.box[0], tr - self.box[1], tw, th))

    def _run_local(self, out: str | os.PathLike[str], profile: Mapping[str, Any],
                   dtype: np.dtype, rounding: bool, fill: Any, quiet: bool, prefetch: int,
                   stats: _Stats) -> None:
        """Serve in this process: reader thread, model here, writer thread."""
        runner = self.runner
        local: dict[str, list[SourceReader]] = {}

        def read(tile: Tile) -> dict[str, np.ndarray] | None:
            t0 = time.perf_counter()
            if "readers" not in local:
                local["readers"] = runner.open_readers()
            feed = runner.read(local["readers"], tile)
            stats.add("read", time.perf_counter() - t0)
            return feed

        def close_readers() -> None:
            for reader in local.pop("readers", []):
                reader.close()

        with atomic_output(out, "out") as tmp, \
                rasterio.Env(GDAL_CACHEMAX=self.block_cache_bytes(dtype)), \
                rasterio.open(tmp, "w", **profile) as dataset, \
                progress_bar(len(self.tiles), "TensorflowModelServe", unit="tile",
                             quiet=quiet) as bar:

            def write(tile: Tile, values: np.ndarray | None) -> None:
                t0 = time.perf_counter()
                pixels = None if values is None else \
                    convert_pixels(values, dtype, rounding).transpose(2, 0, 1)
                self._put(dataset, tile, pixels, fill, dtype)
                stats.add("write", time.perf_counter() - t0)
                bar.update(1)

            def infer(tile: Tile, feed: dict[str, np.ndarray] | None) -> np.ndarray | None:
                if feed is None:
                    stats.skipped += 1
                    return None
                return runner.infer(self.engine, tile, feed, stats)

            _pipeline(self.tiles, read, infer, write, close_readers, prefetch)

    def _run_on_cluster(self, out: str | os.PathLike[str], profile: Mapping[str, Any],
                        dtype: np.dtype, rounding: bool, fill: Any, quiet: bool,
                        stats: _Stats, scheduler: Any, workers: int | None,
                        block_tiles: int | None) -> str:
        """Serve blocks of tiles as Dask tasks; write them here, in order. Returns where."""
        runner = self.cluster_runner()
        check_writable(out, "out")
        with cluster.client_for(scheduler, workers) as client:
            paths = _worker_paths(runner)
            cluster.check_worker_paths(client, paths, labels=paths)
            threads = cluster.total_threads(client)
            size = int(block_tiles) if block_tiles else self.default_block_tiles(threads)
            blocks = [self.tiles[i:i + size] for i in range(0, len(self.tiles), size)]
            tasks = [(runner, block, dtype.name, rounding) for block in blocks]
            where = (f"Dask, {len(client.nthreads())} worker(s), {threads} thread(s), "
                     f"{len(blocks)} block(s) of ≤ {size} tile(s)")
            logger.info("serving on %s: %s", client.scheduler.address, where)
            with atomic_output(out, "out") as tmp, \
                    rasterio.Env(GDAL_CACHEMAX=self.block_cache_bytes(dtype)), \
                    rasterio.open(tmp, "w", **profile) as dataset:

                def write(k: int, result: BlockResult) -> None:
                    pixels, read_seconds, compute_seconds = result
                    stats.add("read", read_seconds)
                    stats.add("compute", compute_seconds)
                    t0 = time.perf_counter()
                    for tile, values in zip(blocks[k], pixels, strict=True):
                        if values is None:
                            stats.skipped += 1
                        self._put(dataset, tile, values, fill, dtype)
                    stats.add("write", time.perf_counter() - t0)

                cluster.run_ordered(client, serve_block, tasks, write, "TensorflowModelServe",
                                    quiet, weights=[len(b) for b in blocks], unit="tile")
        return where


def _pipeline(tiles: Iterable[Tile],
              read: Callable[[Tile], dict[str, np.ndarray] | None],
              infer: Callable[[Tile, dict[str, np.ndarray] | None], np.ndarray | None],
              write: Callable[[Tile, np.ndarray | None], None],
              close: Callable[[], None], prefetch: int) -> None:
    """Read ahead in one thread, run the model here, write behind in another thread.

    At most ``prefetch`` tiles are read ahead and ``prefetch`` written behind, so
    memory stays bounded; the first error of any stage stops the run and is raised.
    """
    prefetch = max(1, int(prefetch))
    with ThreadPoolExecutor(1, thread_name_prefix="terrapatch-read") as readers, \
            ThreadPoolExecutor(1, thread_name_prefix="terrapatch-write") as writers:
        pending_reads: deque[tuple[Tile, Future[Any]]] = deque()
        pending_writes: deque[Future[Any]] = deque()
        queue = iter(tiles)

        def submit_read() -> None:
            tile = next(queue, None)
            if tile is not None:
                pending_reads.append((tile, readers.submit(read, tile)))

        try:
            for _ in range(prefetch):
                submit_read()
            while pending_reads:
                tile, future = pending_reads.popleft()
                feed = future.result()
                submit_read()
                values = infer(tile, feed)
                del feed
                pending_writes.append(writers.submit(write, tile, values))
                while len(pending_writes) > prefetch:
                    pending_writes.popleft().result()
            while pending_writes:
                pending_writes.popleft().result()
        except BaseException:
            for _, future in pending_reads:
                future.cancel()
            for future in pending_writes:
                future.cancel()
            raise
        finally:
            readers.submit(close).result()


def _resolve_inputs(engine: Engine, sources: Sequence[Source],
                    user_inputs: Mapping[str, np.ndarray]) -> list[str]:
    """Model input of each source; unnamed sources take the remaining inputs alphabetically."""
    users = {engine.resolve_input(k, "model.userplaceholders") for k in user_inputs}
    named: list[str | None] = []
    for s in sources:
        if s.placeholder:
            named.append(engine.resolve_input(s.placeholder, f"{s.name}.placeholder"))
        else:
            named.append(None)
    free = sorted(n for n in engine.input_names if n not in users and n not in named)
    names: list[str] = []
    for s, name in zip(sources, named, strict=True):
        if name is None:
            if not free:
                raise ModelError(
                    f"{s.name}.placeholder: not given and no model input is left for it "
                    f"(inputs: {', '.join(engine.input_names)})"
                )
            name = free.pop(0)
            logger.info("%s feeds model input %r (first free input in alphabetical order)",
                        s.name, name)
        names.append(name)
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InputError(f"sourceK.placeholder: model input(s) {sorted(dupes)} fed by several "
                         "sources")
    unfed = [n for n in engine.input_names if n not in names and n not in users]
    if unfed:
        raise ModelError(
            f"model.dir: model input(s) {unfed} are fed by no source and no "
            "model.userplaceholders entry"
        )
    for s, name in zip(sources, names, strict=True):
        shape = engine.inputs[name].shape
        if shape is not None and len(shape) != 4:
            raise ModelError(
                f"{s.name}.placeholder: model input {engine.inputs[name].describe()} is not an "
                "image batch [batch, rows, cols, bands]"
            )
        if shape is not None and shape[-1] is not None and shape[-1] != s.bands:
            raise InputError(
                f"{s.name}.il: {s.bands} band(s), but model input {name!r} expects "
                f"{shape[-1]} channel(s)"
            )
    return names


def _resolve_outputs(engine: Engine, output_names: Sequence[str] | str | None) -> list[str]:
    if isinstance(output_names, str):
        output_names = output_names.split()
    names = [n for n in (output_names or []) if n]
    if not names:
        first = sorted(engine.output_names)[0]
        if len(engine.output_names) > 1:
            logger.warning("output.names not given: serving %r, the first of the model outputs "
                           "%s in alphabetical order", first, sorted(engine.output_names))
        return [first]
    return [engine.resolve_output(n, "output.names") for n in names]


def _pair(value: int | Sequence[int] | None, parameter: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        pair = (int(value), int(value))
    else:
        items = [int(v) for v in value]
        if len(items) != 2:
            raise InputError(f"{parameter}: expected one value or (x, y), got {value!r}")
        pair = (items[0], items[1])
    if pair[0] < 1 or pair[1] < 1:
        raise InputError(f"{parameter}: {pair[0]}×{pair[1]} must be ≥ 1")
    return pair


def _crop_box(box: Sequence[int] | None, width: int, height: int) -> Box:
    if box is None:
        return (0, 0, width, height)
    if len(box) != 4:
        raise InputError(f"box: expected (startx, starty, sizex, sizey), got {box!r}")
    bx, by, bw, bh = (int(v) for v in box)
    if bw < 1 or bh < 1:
        raise InputError(f"box: size {bw}×{bh} must be positive")
    x0, y0 = max(bx, 0), max(by, 0)
    x1, y1 = min(bx + bw, width), min(by + bh, height)
    if x1 <= x0 or y1 <= y0:
        raise GeometryError(
            f"box={bx}:{by}:{bw}:{bh} does not overlap the output grid ({width}×{height} "
            "pixels; box coordinates are output-grid pixel indices)"
        )
    if (x0, y0, x1 - x0, y1 - y0) != (bx, by, bw, bh):
        logger.warning("box=%d:%d:%d:%d cropped to the output grid: %d:%d:%d:%d",
                       bx, by, bw, bh, x0, y0, x1 - x0, y1 - y0)
    return (x0, y0, x1 - x0, y1 - y0)


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
    fullyconv: bool = False,
    spcscale: int = 1,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    engine: Engine | None = None,
) -> ServeJob:
    """Validate a serving run and plan its tiles, without writing anything.

    Parameters are those of :func:`serve`. Loads the model, resolves its inputs and
    outputs, derives or checks the geometry (one small probe run), builds the
    layout and the tile plan.
    """
    sources = list(sources)
    if not sources:
        raise InputError("source1.il: at least one source is required")
    for s in sources:
        if not isinstance(s, Source):
            raise InputError(f"sources: expected terrapatch.Source objects, got {type(s).__name__}")
    grids = [s.grid for s in sources]  # opens every source: missing/unreadable files fail here
    if engine is None:
        engine = load_engine(model)
    model_path = model if isinstance(model, str | os.PathLike) else None
    user_inputs = {k: np.asarray(v) for k, v in (user_placeholders or {}).items()}
    user_inputs = {engine.resolve_input(k, "model.userplaceholders"): v
                   for k, v in user_inputs.items()}
    input_names = _resolve_inputs(engine, sources, user_inputs)
    outputs = _resolve_outputs(engine, output_names)

    if isinstance(spcscale, bool) or float(spcscale) != int(float(spcscale)) or spcscale < 1:
        raise InputError(f"output.spcscale: {spcscale!r} is not a positive integer "
                         "(terrapatch keeps the output grid on source-1 grid lines)")
    spcscale = int(spcscale)
    ef = _pair(efield, "output.efield")
    if not fullyconv and ef not in (None, (1, 1)):
        raise InputError(
            f"output.efieldx/y: {ef[0]}×{ef[1]} in patch-based mode; each patch gives one output "
            "pixel, so the expression field must be 1 (use model.fullyconv for larger ones)"
        )
    names = [s.name for s in sources]
    given = [s.patch_size for s in sources]
    derived = False
    if all(f is not None for f in given):
        geometry = ModelGeometry(tuple(given), ef or (1, 1), spcscale)  # type: ignore[arg-type]
        if fullyconv and ef is None:
            # OTBTF's default expression field is 1; otherwise derive it from the model.
            layout = Layout(tuple(grids), geometry.fields, factor=spcscale, efield=(1, 1))
            _, problem = _probe_tile(engine, sources, layout, input_names, outputs, True,
                                     user_inputs, geometry)
            if problem:
                try:
                    found = derive_geometry(engine, sources, input_names, outputs, True,
                                            spcscale, user_inputs)
                except ModelError:  # reported with suggestions by _check_geometry below
                    found = None
                e = None if found is None else _efield_for_fields(grids, geometry.fields,
                                                                  found, spcscale)
                if e is not None:
                    geometry = ModelGeometry(geometry.fields, e, spcscale)
                    derived = True
                    logger.info("expression field derived from the model: %d×%d", *e)
    else:
        found = derive_geometry(engine, sources, input_names, outputs, fullyconv, spcscale,
                                user_inputs)
        fields = tuple(g if g is not None else d for g, d in zip(given, found.fields,
                                                                 strict=True))
        if ef is None:
            ef = found.efield if fullyconv else (1, 1)
        geometry = ModelGeometry(fields, ef, spcscale)
        derived = True
        logger.info("geometry derived from the model: %s", geometry.describe(names))

    layout = Layout(tuple(grids), geometry.fields, factor=spcscale, efield=geometry.efield)
    out_grid = layout.output_grid
    channels = _check_geometry(engine, sources, layout, input_names, outputs, fullyconv,
                               user_inputs, geometry)
    dtypes = [engine.inputs[n].dtype for n in input_names]
    runner = TileRunner(sources, layout, input_names, dtypes, outputs, channels, fullyconv,
                        user_inputs, os.fspath(model_path) if model_path is not None else None)

    crop = _crop_box(box, out_grid.width, out_grid.height)
    ex, ey = geometry.efield
    if disable_tiling:
        size = (crop[2] + ex, crop[3] + ey)
    else:
        default = DEFAULT_TILE_FCN if fullyconv else _pb_default_tile(sources, geometry)
        size = _pair(tile_size, "optim.tilesizex") or (default, default)
    adjusted = (size[0] if size[0] % ex == 0 else (1 + size[0] // ex) * ex,
                size[1] if size[1] % ey == 0 else (1 + size[1] // ey) * ey)
    if adjusted != size and not disable_tiling:
        logger.warning("optim.tilesizex/y %d×%d enlarged to %d×%d, a multiple of the "
                       "expression field %d×%d", *size, *adjusted, ex, ey)
    tiles = plan_tiles(out_grid.width, out_grid.height, crop, adjusted, geometry.efield)
    logger.info("output grid %d×%d px at %g m, box %s, %d tile(s) of %d×%d (%s)",
                out_grid.width, out_grid.height, out_grid.grid.spacing[0], crop, len(tiles),
                *adjusted, "fully-convolutional" if fullyconv else "patch-based")
    return ServeJob(sources, engine, layout, geometry, derived, runner, crop, adjusted, tiles)


def _efield_for_fields(grids: Sequence[Grid], fields: Sequence[tuple[int, int]],
                       found: ModelGeometry, spcscale: int) -> tuple[int, int] | None:
    """Expression field matching given receptive fields, from a derived geometry.

    The model's context is ``rf - d·e`` for every consistent (rf, e), with ``d`` the
    source pixels per output pixel; None unless all sources agree.
    """
    strides = _strides(grids, spcscale, True)
    if strides is None:
        return None
    result = []
    for dim in (0, 1):
        values = set()
        for rf, rf_found, d in zip(fields, found.fields, strides, strict=True):
            num = rf[dim] - rf_found[dim] + d[dim] * found.efield[dim]
            values.add(num // d[dim] if num % d[dim] == 0 else -1)
        if len(values) != 1 or min(values) < 1:
            return None
        result.append(values.pop())
    return (result[0], result[1])


def _output_ok(array: np.ndarray, channels: int, expected: tuple[int, int]) -> bool:
    """Whether a batch-1 (or one-patch) output covers exactly ``expected`` = (w, h) pixels."""
    ew, eh = expected
    if array.size != ew * eh * channels:
        return False
    if array.ndim in (3, 4):
        return array.shape[0] == 1 and array.shape[1:3] == (eh, ew)
    return True


def _probe_tile(engine: Engine, sources: Sequence[Source], layout: Layout,
                input_names: Sequence[str], outputs: Sequence[str], fullyconv: bool,
                user_inputs: Mapping[str, np.ndarray], geometry: ModelGeometry
                ) -> tuple[list[int], str]:
    """Run the model on small tiles (1 and 3 blocks wide); return (channels, problem)."""
    ex, ey = geometry.efield
    prober = _Prober(engine, input_names, [s.bands for s in sources], outputs, user_inputs)
    if fullyconv:
        grid = layout.output_grid
        trials = []
        for k in (1, 3):
            w, h = min(k * ex, grid.width), min(k * ey, grid.height)
            regions = layout.tile_regions(0, 0, w, h)
            sizes = [(int(r.width), int(r.height)) for r in regions]
            trials.append((sizes, (w, h), f"a {w}×{h}-pixel output tile (fully-convolutional)"))
    else:
        trials = [(list(geometry.fields), (1, 1), "one patch per source (patch-based)")]
    channels: list[int] = []
    for sizes, expected, what in trials:
        feed = prober.feed(sizes)
        fed = ", ".join(f"{n} {tuple(feed[n].shape)}" for n in input_names)
        unit = "tile" if fullyconv else "patch"
        head = f"for {what} the model was fed {fed} and"
        tail = f"expected {expected[0]}×{expected[1]} output pixel(s) per {unit}"
        try:
            result = engine.run(feed, outputs)
        except ModelRunError as exc:
            return [], f"{head} failed ({exc.detail}); {tail}"
        channels = [_channels(result[k]) for k in outputs]
        if not all(_output_ok(result[k], c, expected)
                   for k, c in zip(outputs, channels, strict=True)):
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
            return channels, f"{head} returned {shapes}; {tail}"
    return channels, ""


def _check_geometry(engine: Engine, sources: Sequence[Source], layout: Layout,
                    input_names: Sequence[str], outputs: Sequence[str], fullyconv: bool,
                    user_inputs: Mapping[str, np.ndarray], geometry: ModelGeometry
                    ) -> list[int]:
    """Check the geometry on the smallest tile; return channels per output, or raise."""
    channels, problem = _probe_tile(engine, sources, layout, input_names, outputs, fullyconv,
                                    user_inputs, geometry)
    if problem:
        names = [s.name for s in sources]
        hint = _suggest(engine, sources, input_names, outputs, fullyconv, geometry.spcscale,
                        user_inputs)
        raise ModelError(
            f"inconsistent geometry ({geometry.describe(names)}): {problem}; {hint}"
        )
    return channels


def serve(
    sources: Sequence[Source],
    model: Any,
    out: str | os.PathLike[str],
    output_names: Sequence[str] | str | None = None,
    fullyconv: bool = False,
    spcscale: int = 1,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    pixel_type: str | np.dtype = "float32",
    rounding: bool = False,
    background: float | None = None,
    creation_options: Mapping[str, str] | None = None,
    quiet: bool = False,
    engine: Engine | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    prefetch: int = 2,
    scheduler: Any = None,
    workers: int | None = None,
    block_tiles: int | None = None,
) -> ServeSummary:
    """Apply a model to whole rasters and write the map as a tiled GeoTIFF.

    Parameters
    ----------
    sources
        :class:`~terrapatch.raster.Source` objects, source 1 first: their
        ``patch_size`` is the receptive field (None: derived from the model),
        ``placeholder`` the model input they feed (None: the free inputs in
        alphabetical order), ``nodata`` their no-data value.
    model
        SavedModel directory, ``.keras`` file, ``.onnx`` file, in-memory
        :class:`keras.Model` or :class:`~terrapatch.engines.Engine`.
    out
        Output GeoTIFF path (written under a temporary name, then renamed).
    output_names
        Model outputs to write, stacked as bands in this order (signature keys or
        Keras layer names); default: the first output in alphabetical order.
    fullyconv
        Fully-convolutional mode: one tensor per source per tile; else patch-based.
    spcscale
        Output spacing in source-1 pixels (positive integer).
    efield
        Expression field ``ex`` or ``(ex, ey)`` (fully-convolutional mode); None:
        derived from the model (1 in patch-based mode).
    tile_size
        Tile size in output pixels (default :data:`DEFAULT_TILE_FCN` or
        :data:`DEFAULT_TILE_PB`), enlarged to a multiple of the expression field.
    box
        ``(startx, starty, sizex, sizey)`` in output-grid pixels: only that part is
        computed and written (cropped to the grid; no overlap is an error).
    pixel_type
        Output pixel type (``uint8``, ``int16``, ``float32``, ...): values are clamped to
        the type's range, then truncated (rounded when ``rounding``).
    rounding
        Round instead of truncating when converting to an integer pixel type.
    background
        Value of tiles skipped because a source's input is entirely nodata
        (``output.bv``), also written as the output's nodata value. None: skipped tiles
        are 0 and the output has no nodata value (so class 0 stays visible).
    creation_options
        GDAL creation options overriding the defaults (tiled, DEFLATE, BIGTIFF=IF_SAFER).
    quiet
        No progress bar.
    engine
        An already loaded engine to run instead of opening ``model``.
    user_placeholders
        Extra constant model inputs, name → array (``model.userplaceholders``).
    disable_tiling
        Compute the whole box as one tile (``optim.disabletiling``).
    prefetch
        Tiles read ahead and written behind (memory ∝ ``prefetch`` × tile size).
    scheduler
        Serve on a Dask cluster: a ``distributed.Client`` or a scheduler address
        (``"tcp://host:8786"``). The model must then be a path, and the model and the
        rasters must be visible to every worker at the same path (checked first).
    workers
        Serve on a local Dask cluster of this many single-threaded worker processes
        (when ``scheduler`` is None).
    block_tiles
        Tiles per cluster task (default: :meth:`ServeJob.default_block_tiles`).

    Returns
    -------
    ServeSummary
        Size, georeference, geometry and timings of what was written (on a cluster,
        read and model seconds are summed over the workers).

    Raises
    ------
    TerrapatchError
        On bad input (an :class:`~terrapatch.errors.InputError`, ``ModelError``, ...),
        an unreachable scheduler, a worker missing a file, or a task failing on the
        cluster after its retries; no file is left under ``out``.
    """
    check_writable(out, "out")
    dtype = pixel_dtype(pixel_type, parameter="out (pixel type)")
    if block_tiles is not None and int(block_tiles) < 1:
        raise InputError(f"block_tiles: {block_tiles!r} must be ≥ 1")

    def prepare_and_run(client: Any) -> ServeSummary:
        job = prepare_serve(sources, model, output_names=output_names, fullyconv=fullyconv,
                            spcscale=spcscale, efield=efield, tile_size=tile_size, box=box,
                            user_placeholders=user_placeholders,
                            disable_tiling=disable_tiling, engine=engine)
        return job.run(out, dtype, rounding=rounding, background=background,
                       creation_options=creation_options, quiet=quiet, prefetch=prefetch,
                       scheduler=client, block_tiles=block_tiles)

    if scheduler is None and workers is None:
        return prepare_and_run(None)
    # Connect (or start the local cluster) first: an unreachable scheduler fails fast.
    with cluster.client_for(scheduler, workers) as client:
        return prepare_and_run(client)
