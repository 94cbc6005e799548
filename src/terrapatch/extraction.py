"""PatchesExtraction: cut one patch per sample from each of N sources and write patches images.

For every labelled point, each source's window comes from the geometry module
(:class:`~terrapatch.geometry.Layout`): the windows of one sample cover the same
ground in every source (DESIGN.md §2). A sample is kept only if its window lies
inside every source and, for sources with a nodata value, contains no pixel
equal to it in any band. Kept samples are written in feature order, at the same
index in every patches image and in the labels image; with ``shards=True`` every
spatial block of samples gets its own shard of every output instead (written by
the Dask workers on a cluster).

Reading decodes each needed block once. A source is read in *units* (whole blocks
of its first file, grouped to at least 256 pixels a side); the samples of one
512-pixel group are cut, with one vectorised gather, from a region assembled from
the units their windows touch, and a unit shared by neighbouring groups is decoded
once and dropped after its last group. Candidate patches are held in memory up to
:data:`MEMMAP_BYTES`, beyond that in a memory-mapped spool whose resident pages are
released as it fills and which is read back with plain reads; the patches images are
written in feature order, a chunk at a time. Memory is bounded by these buffers and by
a few tens of bytes of bookkeeping per sample, not by the patches of all samples.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import rasterio
import rasterio.errors
from rasterio.windows import Window

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.geometry import Layout, extraction_factor
from terrapatch.patches import write_patches_image
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import Source, SourceReader, nodata_mask
from terrapatch.vector import PointSet, read_points, vector_driver, write_points
from terrapatch.writer import atomic_directory, check_writable, output_group, pixel_dtype

PathLike = str | os.PathLike[str]
_T = TypeVar("_T")
_R = TypeVar("_R")

#: Side, in source pixels, of the groups of samples cut from one region (rounded to units).
CHUNK = 512
#: A group is read with one windowed read per sample instead of from its units when the
#: units its windows touch cover more than this many times the area of the blocks they
#: touch, and more than ``MIN_REGION`` pixels (sparse samples in units of many strips).
REGION_OVERREAD = 8
MIN_REGION = 65536
#: Smallest side, in pixels, of a decode unit (whole blocks of the source's first file).
UNIT_MIN = 256
#: A source whose decode unit would exceed this many bytes is read one window per sample.
MAX_UNIT_BYTES = 64 * 2**20
#: Width, in source pixels, of the column bands groups are ordered by; a unit touched by
#: two bands is decoded once per band, so memory is bounded by the band width, not the
#: raster's.
BAND_WIDTH = 16384
#: Above this many bytes of candidate patches (written sources together), the patches
#: are spooled to memory-mapped temporary files instead of being held in memory.
MEMMAP_BYTES = 128 * 2**20
#: The resident pages of a spool are released whenever patches written to it may have
#: made this many bytes of it resident.
RELEASE_BYTES = 4 * 2**20
#: Patches written per chunk.
WRITE_CHUNK = 4096
#: Most patches cut from a region at once (bounds the gathered arrays in dense groups).
GATHER_BATCH = 2048
#: Points whose windows are computed at once.
POINT_CHUNK = 2**18
#: Threads reading groups in parallel (GDAL decodes outside the GIL).
READ_THREADS = 4
#: GDAL block cache during an extraction, unless GDAL_CACHEMAX is set: every unit is
#: decoded once, so a larger cache would only hold memory.
GDAL_CACHE_BYTES = 32 * 2**20
#: Side, in source-1 pixels, of the spatial blocks of samples sent to one Dask task (and
#: of the shards).
CLUSTER_BLOCK = 2048
#: Suffix of the folder holding the shards of an output (``a.tif`` → ``a_shards/``).
SHARDS_SUFFIX = "_shards"


@dataclass(frozen=True)
class ExtractionSummary:
    """What an extraction did.

    Attributes
    ----------
    n_features
        Features carrying the label field.
    n_skipped
        Features skipped because they lack the field.
    n_collected
        Samples kept and written.
    n_rejected_outside
        Samples whose window leaves at least one source.
    rejected_outside
        Per source name, samples whose window leaves that source.
    rejected_nodata
        Per source name, samples (inside every source) rejected for nodata there and not
        already rejected by an earlier source, so the counts add up to the total.
    factor
        Factor of the sampling grid G (in source-1 pixels).
    outputs
        Output key → written path (with ``shards=True``, the folder of its shards).
    shards
        With ``shards=True``: output key (``"source1.out"``, ``"outlabels"``) → its shard
        files, in shard order; shard ``i`` of every key holds the same samples, so
        ``{name: summary.shards[key] ...}`` is a ``filenames_dict`` for
        :class:`~terrapatch.dataset.DatasetFromPatchesImages`. Empty otherwise.
    """

    n_features: int
    n_skipped: int
    n_collected: int
    n_rejected_outside: int
    rejected_outside: dict[str, int]
    rejected_nodata: dict[str, int]
    factor: int
    outputs: dict[str, Path] = field(default_factory=dict)
    shards: dict[str, list[Path]] = field(default_factory=dict)

    def __str__(self) -> str:
        outside = ", ".join(f"{k}: {v}" for k, v in self.rejected_outside.items())
        nodata = ", ".join(f"{k}: {v}" for k, v in self.rejected_nodata.items())
        sharded = f" in {len(next(iter(self.shards.values())))} shards" if self.shards else ""
        return (f"{self.n_collected} samples collected of {self.n_features}{sharded} "
                f"({self.n_rejected_outside} outside [{outside}]; nodata [{nodata}]; "
                f"{self.n_skipped} features without the field skipped)")


# ------------------------------------------------------------------ grouping and units


def _order_by(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of ``keys`` and the start offsets of each run of equal keys (+ the end)."""
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    return order, np.concatenate([[0], bounds, [len(order)]]).astype(np.int64)


def _group_order(cols: np.ndarray, rows: np.ndarray,
                 chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Order samples by ``chunk``-pixel blocks; return (order, start offsets of each group)."""
    cols = np.asarray(cols, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    keys = (rows // chunk) * (int(cols.max(initial=0)) // chunk + 1) + cols // chunk
    return _order_by(keys)


def _touched(cols: np.ndarray, rows: np.ndarray, size: tuple[int, int],
             cell: tuple[int, int], n_x: int) -> np.ndarray:
    """Sorted keys (``row * n_x + col``) of the ``cell``-sized cells that windows touch."""
    (rx, ry), (cw, ch) = size, cell
    ux0, ux1 = cols // cw, (cols + rx - 1) // cw
    uy0, uy1 = rows // ch, (rows + ry - 1) // ch
    keys = []
    for dy in range(int((uy1 - uy0).max()) + 1):
        for dx in range(int((ux1 - ux0).max()) + 1):
            hit = (uy0 + dy <= uy1) & (ux0 + dx <= ux1)
            keys.append((uy0[hit] + dy).astype(np.int64) * n_x + ux0[hit] + dx)
    return np.unique(np.concatenate(keys))


@dataclass(frozen=True)
class _UnitGrid:
    """The decode units of one source: ``width × height``-pixel runs of whole blocks."""

    width: int
    height: int
    block: tuple[int, int]
    raster_width: int
    raster_height: int

    @classmethod
    def of(cls, source: Source) -> _UnitGrid | None:
        """Units of ``source`` (its first file's blocks), or None if one exceeds MAX_UNIT_BYTES."""
        grid = source.grid
        with rasterio.open(source.paths[0]) as ds:
            block_h, block_w = ds.block_shapes[0]
        width = min(grid.width, block_w * -(-UNIT_MIN // block_w))
        height = min(grid.height, block_h * -(-UNIT_MIN // block_h))
        if width * height * source.bands * source.dtype.itemsize > MAX_UNIT_BYTES:
            return None
        return cls(width, height, (int(block_w), int(block_h)), grid.width, grid.height)

    @property
    def n_x(self) -> int:
        """Units across the raster."""
        return -(-self.raster_width // self.width)

    def window(self, key: int) -> Window:
        """Pixel window of unit ``key`` (``row * n_x + col``), clipped to the raster."""
        uy, ux = divmod(int(key), self.n_x)
        col, row = ux * self.width, uy * self.height
        return Window(col, row, min(self.width, self.raster_width - col),
                      min(self.height, self.raster_height - row))

    def touched(self, cols: np.ndarray, rows: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Sorted keys of the units that ``size`` windows starting at ``(cols, rows)`` touch."""
        return _touched(cols, rows, size, (self.width, self.height), self.n_x)

    def blocks_touched(self, cols: np.ndarray, rows: np.ndarray, size: tuple[int, int]) -> int:
        """Number of file blocks those windows touch (what per-window reads would decode)."""
        return len(_touched(cols, rows, size, self.block,
                            -(-self.raster_width // self.block[0])))


@dataclass(frozen=True)
class _Group:
    """Candidates of one source read together.

    ``units`` are the keys of the units the group is cut from (None: one windowed read per
    sample); ``band`` is the column band the units are shared in.
    """

    source: int
    index: np.ndarray
    units: np.ndarray | None
    band: int = 0


def _plan(i: int, source: Source, cols: np.ndarray,
          rows: np.ndarray) -> tuple[list[_Group], _UnitGrid | None, dict[tuple[int, int], int]]:
    """Split source ``i``'s candidates into groups; count how many groups use each unit.

    Groups are whole units about :data:`CHUNK` pixels a side, holding the samples whose
    window starts there, ordered by column band, then row, then column.
    """
    size: tuple[int, int] = source.patch_size  # type: ignore[assignment]
    units = _UnitGrid.of(source)
    if units is None:
        order, bounds = _group_order(cols, rows)
        return [_Group(i, order[a:b], None) for a, b in itertools.pairwise(bounds)], None, {}
    gw = units.width * max(1, CHUNK // units.width)
    gh = units.height * max(1, CHUNK // units.height)
    n_gx = -(-units.raster_width // gw)
    n_gy = -(-units.raster_height // gh)
    per_band = max(1, BAND_WIDTH // gw)
    key_type = np.int32 if (n_gx + per_band) * n_gy < 2**31 else np.int64
    gx = np.asarray(cols // gw, dtype=key_type)
    keys = ((gx // per_band * n_gy + np.asarray(rows // gh, dtype=key_type)) * per_band
            + gx % per_band)
    del gx
    order, bounds = _order_by(keys)
    del keys
    order = order.astype(np.int32) if len(order) < 2**31 else order
    groups: list[_Group] = []
    refs: dict[tuple[int, int], int] = {}
    for a, b in itertools.pairwise(bounds):
        idx = order[a:b]
        c, r = cols[idx], rows[idx]
        keys = units.touched(c, r, size)
        unit_area = len(keys) * units.width * units.height
        if unit_area > MIN_REGION and unit_area > REGION_OVERREAD * (
                units.blocks_touched(c, r, size) * units.block[0] * units.block[1]):
            groups.append(_Group(i, idx, None))
            continue
        group_band = int(c[0]) // gw // per_band
        groups.append(_Group(i, idx, keys, group_band))
        for key in keys.tolist():
            refs[(group_band, key)] = refs.get((group_band, key), 0) + 1
    return groups, units, refs


class _Slot:
    """One unit in the cache: set once by the thread that decodes it."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.value: np.ndarray | None = None
        self.error: BaseException | None = None


class _UnitCache:
    """Decoded units of one source, shared by its groups across threads.

    A unit is decoded by the first group that needs it and dropped when the last group
    using it (``refs`` counts them) releases it, so each unit is decoded once.

    Attributes
    ----------
    decoded
        Units decoded so far.
    peak
        Most units held at once.
    """

    def __init__(self, refs: Mapping[tuple[int, int], int]) -> None:
        self._lock = threading.Lock()
        self._refs = dict(refs)
        self._slots: dict[tuple[int, int], _Slot] = {}
        self.decoded = 0
        self.peak = 0

    def get(self, key: tuple[int, int], load: Callable[[], np.ndarray],
            wait: bool = True) -> np.ndarray | None:
        """The unit ``key``, decoded with ``load`` unless another group already did.

        With ``wait=False``, None instead of waiting while another thread decodes it.
        """
        with self._lock:
            slot = self._slots.get(key)
            owner = slot is None
            if slot is None:
                slot = self._slots[key] = _Slot()
                self.decoded += 1
                self.peak = max(self.peak, len(self._slots))
        if owner:
            try:
                slot.value = load()
            except BaseException as exc:
                slot.error = exc
                raise
            finally:
                slot.ready.set()
        elif not slot.ready.is_set() and not wait:
            return None
        else:
            slot.ready.wait()
            if slot.error is not None:
                raise slot.error
        return slot.value

    def release(self, key: tuple[int, int]) -> None:
        """One group is done with unit ``key``; drop it after the last one."""
        with self._lock:
            left = self._refs.get(key, 1) - 1
            if left > 0:
                self._refs[key] = left
            else:
                self._refs.pop(key, None)
                self._slots.pop(key, None)

    @property
    def held(self) -> int:
        """Units held now."""
        return len(self._slots)


def patches_from_region(region: np.ndarray, col_offsets: np.ndarray, row_offsets: np.ndarray,
                        size: tuple[int, int]) -> np.ndarray:
    """Cut band-planar patches ``(n, bands, ry, rx)`` out of a ``(bands, rows, cols)`` region.

    The planar form of :func:`terrapatch.raster.patches_from_region` (which returns
    ``(n, ry, rx, bands)``): one fancy-indexing gather over a strided sliding-window view
    of the region, whose result numpy lays out in this order, and no pixel transpose
    (patches images are written band by band).
    """
    rx, ry = size
    view = np.lib.stride_tricks.sliding_window_view(region, (ry, rx), axis=(1, 2))
    return np.ascontiguousarray(view[:, row_offsets, col_offsets].transpose(1, 0, 2, 3))


def _read_each(reader: SourceReader, cols: np.ndarray, rows: np.ndarray,
               size: tuple[int, int]) -> np.ndarray:
    """Band-planar patches ``(n, bands, ry, rx)``, one windowed read each."""
    rx, ry = size
    out = np.empty((len(cols), reader.bands, ry, rx), dtype=reader.dtype)
    for n, (c, r) in enumerate(zip(cols.tolist(), rows.tolist(), strict=True)):
        out[n] = reader.read(Window(c, r, rx, ry))
    return out


def _read_region(reader: SourceReader, cache: _UnitCache, units: _UnitGrid,
                 group: _Group) -> tuple[np.ndarray, int, int]:
    """The region ``(bands, rows, cols)`` a group is cut from, and its first column and row.

    It is assembled from the units the group's windows touch (through ``cache``); parts of
    its bounding box that no window touches are left unset, never read.
    """
    keys = group.units
    assert keys is not None
    uy, ux = np.divmod(keys, units.n_x)
    x0, y0 = int(ux.min()) * units.width, int(uy.min()) * units.height
    x1 = min(units.raster_width, (int(ux.max()) + 1) * units.width)
    y1 = min(units.raster_height, (int(uy.max()) + 1) * units.height)

    def loader(key: int) -> Callable[[], np.ndarray]:
        return lambda: reader.read(units.window(key))

    try:
        if len(keys) == 1:
            region = cache.get((group.band, int(keys[0])), loader(int(keys[0])))
            assert region is not None
            return region, x0, y0
        region = np.empty((reader.bands, y1 - y0, x1 - x0), dtype=reader.dtype)
        todo, wait = keys.tolist(), False
        while todo:  # units another thread is decoding come last: no idle waits
            later = []
            for key in todo:
                data = cache.get((group.band, key), loader(key), wait=wait)
                if data is None:
                    later.append(key)
                    continue
                w = units.window(key)
                c, r = int(w.col_off) - x0, int(w.row_off) - y0
                region[:, r:r + int(w.height), c:c + int(w.width)] = data
            todo, wait = later, True
        return region, x0, y0
    finally:
        for key in keys.tolist():
            cache.release((group.band, key))


# ------------------------------------------------------------------ buffers


def _buffers(sources: Sequence[Source], n: int, keep: Sequence[bool],
             tmpdir: str | None) -> list[np.ndarray | None]:
    """One ``(n, bands, ry, rx)`` buffer per kept source, in memory or spooled to ``tmpdir``."""
    shapes = []
    for source in sources:
        rx, ry = source.patch_size  # type: ignore[misc]
        shapes.append((n, source.bands, ry, rx))
    total = sum(int(np.prod(s)) * src.dtype.itemsize
                for s, src, k in zip(shapes, sources, keep, strict=True) if k)
    spool = tmpdir is not None and n > 0 and total > MEMMAP_BYTES
    out: list[np.ndarray | None] = []
    for i, (shape, source) in enumerate(zip(shapes, sources, strict=True)):
        if not keep[i]:
            out.append(None)
        elif spool:
            path = Path(tmpdir) / f"patches-{i}.npy"  # type: ignore[arg-type]
            out.append(np.lib.format.open_memmap(path, mode="w+", dtype=source.dtype,
                                                 shape=shape))
        else:
            out.append(np.empty(shape, dtype=source.dtype))
    return out


_SPOOL_LOCK = threading.Lock()


def _scatter(buffer: np.ndarray, index: np.ndarray, patches: np.ndarray) -> None:
    """``buffer[index] = patches``; into a spool, in slices releasing its pages after each.

    Scattered records touch up to one page each, however small they are: a slice makes
    at most :data:`RELEASE_BYTES` of the spool resident.
    """
    if not isinstance(buffer, np.memmap):
        buffer[index] = patches
        return
    record = buffer.dtype.itemsize * int(np.prod(buffer.shape[1:]))
    step = max(1, RELEASE_BYTES // (record + mmap.PAGESIZE))
    for a in range(0, len(index), step):
        with _SPOOL_LOCK:  # concurrent faults would outrun the releases
            buffer[index[a:a + step]] = patches[a:a + step]
            _release(buffer)


def _release(buffer: np.ndarray | None) -> None:
    """Drop the resident pages of a spool (its data stays in the file); no-op in memory.

    ``MADV_DONTNEED`` on a shared file mapping keeps written data (the pages are the
    file's page cache): later accesses fault the same contents back in. numpy keeps the
    mapping of an ``np.memmap`` in its ``_mmap`` attribute; without it (or without
    ``madvise``) nothing is released and the pages are left to the OS.
    """
    handle = getattr(buffer, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if isinstance(handle, mmap.mmap) and advice is not None and hasattr(handle, "madvise"):
        handle.madvise(advice)


def _cache_set_by_user() -> bool:
    """Whether GDAL_CACHEMAX comes from the environment or an active ``rasterio.Env``."""
    if "GDAL_CACHEMAX" in os.environ:
        return True
    try:
        return "GDAL_CACHEMAX" in rasterio.env.getenv()
    except rasterio.errors.EnvError:
        return False


@contextlib.contextmanager
def _gdal_cache() -> Iterator[None]:
    """Bound GDAL's block cache to :data:`GDAL_CACHE_BYTES`, unless GDAL_CACHEMAX is set.

    GDAL's default (5 % of the RAM) would fill with blocks that are never read again.
    """
    if _cache_set_by_user():
        yield
        return
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        yield


def _run_in_order(func: Callable[[_T], _R], items: Sequence[_T], threads: int,
                  on_result: Callable[[_R], None]) -> None:
    """``on_result(func(item))`` for every item, in order, at most ``2 × threads`` in flight."""
    if threads <= 1:
        for item in items:
            on_result(func(item))
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[_R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) >= 2 * threads:
                    on_result(pending.popleft().result())
            while pending:
                on_result(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()


def _read_patches(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
    tmpdir: str | None,
    quiet: bool,
    threads: int | None = None,
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Read every candidate's patch in every source, group by group, on a few threads.

    Returns the patch buffers (None where the patches are not kept; in memory when
    ``tmpdir`` is None or they are small, else spooled there) and, per source, which
    candidates hold nodata.
    """
    n = len(starts[0][0])
    buffers = _buffers(sources, n, keep, tmpdir)
    nodata_hits = [np.zeros(n, dtype=bool) for _ in sources]
    groups: list[_Group] = []
    plans: dict[int, tuple[_UnitGrid | None, _UnitCache]] = {}
    for i, source in enumerate(sources):
        if source.nodata is None and not keep[i]:
            continue  # nothing to read: the geometry alone decides for this source
        source_groups, units, refs = _plan(i, source, *starts[i])
        groups.extend(source_groups)
        plans[i] = (units, _UnitCache(refs))

    local = threading.local()
    opened: list[dict[int, SourceReader]] = []
    lock = threading.Lock()

    def reader_for(i: int) -> SourceReader:
        readers = getattr(local, "readers", None)
        if readers is None:
            readers = local.readers = {}
            with lock:
                opened.append(readers)
        if i not in readers:
            readers[i] = sources[i].open()
        return readers[i]

    def store(i: int, index: np.ndarray, patches: np.ndarray) -> None:
        buf = buffers[i]
        if buf is not None:
            _scatter(buf, index, patches)
        nodata = sources[i].nodata
        if nodata is not None:
            nodata_hits[i][index] = _contains(patches, nodata)

    def run(group: _Group) -> None:
        i = group.source
        size: tuple[int, int] = sources[i].patch_size  # type: ignore[assignment]
        cols, rows = starts[i][0][group.index], starts[i][1][group.index]
        units, cache = plans[i]
        if group.units is None or units is None:
            store(i, group.index, _read_each(reader_for(i), cols, rows, size))
            return
        region, x0, y0 = _read_region(reader_for(i), cache, units, group)
        for a in range(0, len(group.index), GATHER_BATCH):  # one gather per batch
            b = a + GATHER_BATCH
            store(i, group.index[a:b],
                  patches_from_region(region, cols[a:b] - x0, rows[a:b] - y0, size))

    wanted = READ_THREADS if threads is None else threads
    workers = max(1, min(wanted, os.cpu_count() or 1, len(groups)))
    try:
        with progress_bar(len(groups), "extracting", unit="group", quiet=quiet) as bar:
            _run_in_order(run, groups, workers, lambda _: bar.update(1))
    finally:
        for readers in opened:
            for reader in readers.values():
                reader.close()
    for buf in buffers:
        _release(buf)
    return buffers, nodata_hits


def _read_patches_on_cluster(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
    tmpdir: str,
    quiet: bool,
    scheduler: Any,
    workers: int | None,
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Same as :func:`_read_patches`, with candidates partitioned by spatial block over Dask."""
    from terrapatch import cluster

    n = len(starts[0][0])
    buffers = _buffers(sources, n, keep, tmpdir)
    nodata_hits = [np.zeros(n, dtype=bool) for _ in sources]
    parts = _blocks(starts[0])
    tasks = [(list(sources), [(c[idx], r[idx]) for c, r in starts], list(keep))
             for idx in parts]

    def collect(k: int, result: tuple[list[np.ndarray | None], list[np.ndarray]]) -> None:
        idx = parts[k]
        part_buffers, part_hits = result
        for i in range(len(sources)):
            buf, got = buffers[i], part_buffers[i]
            if buf is not None and got is not None:
                _scatter(buf, idx, got)
            nodata_hits[i][idx] = part_hits[i]

    with cluster.client_for(scheduler, workers) as client:
        cluster.check_worker_paths(client, [p for s in sources for p in s.paths])
        cluster.run_tasks(client, _read_block, tasks, collect, "extracting", quiet)
    for buf in buffers:
        _release(buf)
    return buffers, nodata_hits


def _blocks(starts: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Candidates split by :data:`CLUSTER_BLOCK`-pixel blocks of source 1, each in order."""
    order, bounds = _group_order(starts[0], starts[1], CLUSTER_BLOCK)
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _read_block(
    sources: Sequence[Source], starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """One cluster task: the patches of one spatial block of candidates, in memory."""
    with _gdal_cache():
        return _read_patches(sources, starts, keep, None, quiet=True, threads=1)


def _chunks(buffer: np.ndarray, positions: np.ndarray) -> Iterator[np.ndarray]:
    """The patches at ``positions`` (ascending), as planar chunks ``(bands, k, ry, rx)``.

    :data:`WRITE_CHUNK` patches at a time. A spool is read with plain reads of each run
    of consecutive records, not through its mapping: a read fault maps whole page-cache
    folios around it, which would make far more of it resident than the chunk.
    """
    if not isinstance(buffer, np.memmap) or buffer.filename is None:
        for a in range(0, len(positions), WRITE_CHUNK):
            records = buffer[positions[a:a + WRITE_CHUNK]]
            yield np.ascontiguousarray(records.transpose(1, 0, 2, 3))
        return
    with open(buffer.filename, "rb", buffering=0) as f:
        for a in range(0, len(positions), WRITE_CHUNK):
            records = _read_records(f.fileno(), buffer, positions[a:a + WRITE_CHUNK])
            yield np.ascontiguousarray(records.transpose(1, 0, 2, 3))


def _read_records(fd: int, spool: np.memmap, index: np.ndarray) -> np.ndarray:
    """``spool[index]`` (ascending ``index``) read from its file, one read per run."""
    out = np.empty((len(index), *spool.shape[1:]), dtype=spool.dtype)
    record = out.itemsize * int(np.prod(out.shape[1:]))
    cuts = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
    for a, b in itertools.pairwise([0, *cuts, len(index)]):
        view = memoryview(out[a:b]).cast("B")  # type: ignore[arg-type]
        offset, done = int(spool.offset) + int(index[a]) * record, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"spool {spool.filename!r}: short read at {offset + done}")
            done += got
    return out


def _array_chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    """``values`` as planar 1 × 1 patches ``(1, k, 1, 1)``, :data:`WRITE_CHUNK` at a time."""
    for a in range(0, len(values), WRITE_CHUNK):
        yield values[a:a + WRITE_CHUNK].reshape(1, -1, 1, 1)


def _reject_nodata(sources: Sequence[Source],
                   nodata_hits: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of candidates free of nodata, and per source the rejections not already counted."""
    ok = np.ones(len(nodata_hits[0]), dtype=bool)
    rejected: dict[str, int] = {}
    for source, has_nodata in zip(sources, nodata_hits, strict=True):
        rejected[source.name] = int((has_nodata & ok).sum())
        ok &= ~has_nodata
    return ok, rejected


# ------------------------------------------------------------------ writing


@dataclass(frozen=True)
class _Writing:
    """How the patches images and the labels image of an extraction are written."""

    sizes: tuple[tuple[int, int], ...]
    bands: tuple[int, ...]
    spacings: tuple[tuple[float, float], ...]
    dtypes: tuple[np.dtype, ...]
    options: tuple[dict[str, str], ...]
    keys: tuple[str, ...]
    labels_dtype: np.dtype
    labels_options: dict[str, str]


def _write_outputs(
    writing: _Writing,
    buffers: Sequence[np.ndarray | None],
    positions: np.ndarray,
    labels: np.ndarray,
    outputs: Sequence[PathLike | None],
    labels_out: PathLike | None,
) -> None:
    """Write the candidates at ``positions`` to the patches images and the labels image."""
    n = len(positions)
    for i, (buf, out) in enumerate(zip(buffers, outputs, strict=True)):
        if out is None or buf is None:
            continue
        rx, ry = writing.sizes[i]
        write_patches_image(
            out, _chunks(buf, positions), n_patches=n, patch_size_x=rx, patch_size_y=ry,
            bands=writing.bands[i], dtype=writing.dtypes[i], spacing=writing.spacings[i],
            creation_options=writing.options[i], parameter=writing.keys[i], planar=True,
        )
    if labels_out is not None:
        write_patches_image(
            labels_out, _array_chunks(labels), n_patches=n, patch_size_x=1, patch_size_y=1,
            bands=1, dtype=writing.labels_dtype, creation_options=writing.labels_options,
            parameter="outlabels", planar=True,
        )


def _write_shard(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    outputs: Sequence[str | None],
    labels_out: str | None,
    writing: _Writing,
    want_kept: bool,
    threads: int | None = 1,
) -> dict[str, Any]:
    """One shard task: read, reject nodata and write one block's samples to its shard files.

    Writes nothing when no sample of the block survives. Returns counts only (and, when
    ``want_kept``, the packed mask of the kept candidates, for the points output).
    """
    keep = [o is not None for o in outputs]
    with tempfile.TemporaryDirectory(prefix="terrapatch-shard-") as tmpdir, _gdal_cache():
        buffers, nodata_hits = _read_patches(sources, starts, keep, tmpdir, quiet=True,
                                             threads=threads)
        ok, rejected = _reject_nodata(sources, nodata_hits)
        positions = np.flatnonzero(ok)
        if len(positions):
            _write_outputs(writing, buffers, positions, labels[positions], outputs, labels_out)
        del buffers
    return {"n": len(positions), "rejected_nodata": rejected,
            "kept": np.packbits(ok) if want_kept else None}


def shard_folder(path: PathLike) -> Path:
    """Folder holding the shards of output ``path``: ``dir/a.tif`` → ``dir/a_shards``."""
    p = Path(path)
    return p.with_name(p.stem + SHARDS_SUFFIX)


def _shard_name(path: PathLike, k: int, digits: int) -> str:
    p = Path(path)
    return f"{p.stem}-{k:0{digits}d}{p.suffix or '.tif'}"


def _extract_shards(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    outputs: Mapping[str, PathLike],
    source_keys: Sequence[str | None],
    writing: _Writing,
    stack: contextlib.ExitStack,
    want_kept: bool,
    quiet: bool,
    scheduler: Any,
    workers: int | None,
) -> tuple[int, dict[str, int], dict[str, list[Path]], list[np.ndarray]]:
    """Write one shard of every output per spatial block, staged to be committed by ``stack``.

    ``outputs`` maps output keys to the paths given; ``source_keys`` gives each source's
    output key (None: not written). The shard folders are staged in ``stack``: they appear
    when it closes without error. Returns the samples kept, the nodata rejections, the
    shard lists and, when ``want_kept``, per shard the indices of its kept candidates.
    """
    from terrapatch import cluster

    parts = _blocks(starts[0])
    digits = max(5, len(str(len(parts) - 1)))
    folders: dict[str, Path] = {}
    for key, path in outputs.items():
        folder = shard_folder(path)
        for other, seen in folders.items():
            if seen == folder:
                raise InputError(f"{key}: its shard folder {os.fspath(folder)!r} is also the one "
                                 f"of {other}; give the outputs different names")
        folders[key] = folder
    stages = {key: stack.enter_context(atomic_directory(folder, key))
              for key, folder in folders.items()}
    labels_key = "outlabels" if "outlabels" in outputs else None
    tasks = []
    for k, idx in enumerate(parts):
        names = {key: os.fspath(stages[key] / _shard_name(outputs[key], k, digits))
                 for key in outputs}
        tasks.append((list(sources), [(c[idx], r[idx]) for c, r in starts], labels[idx],
                      [None if key is None else names[key] for key in source_keys],
                      names[labels_key] if labels_key else None, writing, want_kept))
    results: list[dict[str, Any]] = [{} for _ in parts]
    if scheduler is None and workers is None:
        with progress_bar(len(tasks), "extracting", unit="shard", quiet=quiet) as bar:
            for k, task in enumerate(tasks):
                results[k] = _write_shard(*task, threads=None)
                bar.update(1)
    else:
        with cluster.client_for(scheduler, workers) as client:
            cluster.check_worker_paths(
                client, [*(p for s in sources for p in s.paths),
                         *(os.fspath(s) for s in stages.values())],
                labels={os.fspath(s): key for key, s in stages.items()})
            cluster.run_tasks(client, _write_shard, tasks, results.__setitem__,
                              "extracting", quiet)
    n_kept = sum(int(r["n"]) for r in results)
    rejected = {s.name: sum(int(r["rejected_nodata"][s.name]) for r in results)
                for s in sources}
    if n_kept == 0:
        detail = ", ".join(f"{k} rejects {v}" for k, v in rejected.items() if v)
        raise NoSamplesError(
            f"vec: every sample inside the images has nodata in its patch ({detail}); "
            "check the sourceK.nodata values"
        )
    written = [k for k, r in enumerate(results) if r["n"]]
    shards = {key: [folders[key] / _shard_name(outputs[key], k, digits) for k in written]
              for key in outputs}
    for key, stage in stages.items():
        expected = {p.name for p in shards[key]}
        for item in stage.iterdir():  # temporaries of attempts that died with their worker
            if item.name not in expected:
                item.unlink()
    kept = [parts[k][np.unpackbits(results[k]["kept"], count=len(parts[k])).astype(bool)]
            for k in written] if want_kept else []
    return n_kept, rejected, shards, kept


# ------------------------------------------------------------------ entry point


def _candidate_windows(
    layout: Layout, points: PointSet, names: Sequence[str],
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], dict[str, int], int]:
    """Candidates (inside every source) and their window starts, computed in chunks.

    Returns the candidates' feature indices, per source their window starts (int32), the
    rejections outside per source and the number of samples outside some source.
    """
    n = len(points)
    rejected = dict.fromkeys(names, 0)
    found: list[np.ndarray] = []
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in names]
    for a in range(0, n, POINT_CHUNK):
        starts = layout.sample_windows(points.x[a:a + POINT_CHUNK], points.y[a:a + POINT_CHUNK])
        inside_each = [layout.inside(i, c, r) for i, (c, r) in enumerate(starts)]
        for name, m in zip(names, inside_each, strict=True):
            rejected[name] += int((~m).sum())
        inside = np.flatnonzero(np.logical_and.reduce(inside_each))
        found.append(inside + a)
        for i, (c, r) in enumerate(starts):
            parts[i].append((c[inside].astype(np.int32), r[inside].astype(np.int32)))
    candidates = np.concatenate(found) if found else np.empty(0, np.int64)
    if n < 2**31:
        candidates = candidates.astype(np.int32)
    starts_out = [(np.concatenate([c for c, _ in p]), np.concatenate([r for _, r in p]))
                  for p in parts]
    return candidates, starts_out, rejected, n - len(candidates)


def extract_patches(
    sources: Sequence[Source],
    vector: PathLike | PointSet,
    field: str,
    outputs: Sequence[PathLike | None],
    labels_out: PathLike | None = None,
    points_out: PathLike | None = None,
    *,
    pixel_types: Sequence[str | None] | str | None = None,
    labels_pixel_type: str | None = None,
    creation_options: Mapping[str, str] | None = None,
    output_options: Mapping[str, Mapping[str, str]] | None = None,
    factor: int | None = None,
    reproject: bool = False,
    quiet: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
    shards: bool = False,
) -> ExtractionSummary:
    """Extract one patch per sample from each source and write OTBTF patches images.

    Parameters
    ----------
    sources
        The sources, source 1 first, each with its ``patch_size`` (and ``nodata``).
    vector
        Vector file of sample points (every layer is read), or a :class:`PointSet`.
    field
        Integer label field; features without it are skipped.
    outputs
        One patches-image path per source (None: that source is checked but not written).
    labels_out
        Optional labels image (1 × N, default uint8).
    points_out
        Optional vector file of the kept points, with fields ``field``, ``patch`` (the
        patch index) and ``feature`` (the index among features carrying the field); with
        ``shards``, also ``shard`` (the shard's position in :attr:`ExtractionSummary.shards`)
        and ``patch`` is the index in that shard.
    pixel_types
        Pixel type per output (or one for all); default float32.
    labels_pixel_type
        Pixel type of the labels image; default uint8 (values clamped, OTB-style).
    creation_options
        GDAL creation options for every raster output.
    output_options
        GDAL creation options for one output, by key (``"source1.out"``, ``"outlabels"``),
        added to ``creation_options``.
    factor
        Factor of the sampling grid G in source-1 pixels; default: coarsest spacing /
        source-1 spacing when that is an integer, else 1 (DESIGN.md §2).
    reproject
        Reproject the points to source 1's CRS instead of failing on a CRS mismatch.
    quiet
        No progress bar.
    scheduler
        Run the reads on a Dask cluster: a ``distributed.Client`` or a scheduler
        address. Without ``shards`` the outputs are identical to an in-process run.
    workers
        Run the reads on a local Dask cluster of this many worker processes.
    shards
        Write every output as shards instead of one file: ``dir/a.tif`` becomes the folder
        ``dir/a_shards/`` of ``a-00000.tif``, ``a-00001.tif``, … one per
        :data:`CLUSTER_BLOCK`-pixel block of source 1 holding kept samples (numbered by
        block; blocks without samples have no shard). Shard ``k`` of every output holds
        the same samples, in feature order; blocks come in row-major order. On a Dask
        cluster each worker writes its own shards and returns only counts; the folders
        appear together when every shard is written (an existing folder is replaced).

    Returns
    -------
    ExtractionSummary
        Counts and written paths (and the shard lists with ``shards``).
    """
    sources = list(sources)
    outputs = list(outputs)
    if len(outputs) != len(sources):
        raise InputError(f"outputs: {len(outputs)} paths given for {len(sources)} sources")
    if isinstance(pixel_types, str) or pixel_types is None:
        pixel_types = [pixel_types] * len(sources)
    out_dtypes = [pixel_dtype(pt, "float32", f"{s.name}.out")
                  for s, pt in zip(sources, pixel_types, strict=True)]
    labels_dtype = pixel_dtype(labels_pixel_type, "uint8", "outlabels")
    for s, out in zip(sources, outputs, strict=True):
        if s.patch_size is None:
            raise InputError(f"{s.name}.patchsizex: missing patch size for {s.name}")
        if out is not None:
            check_writable(out, f"{s.name}.out")
    if labels_out is not None:
        check_writable(labels_out, "outlabels")
    if points_out is not None:
        check_writable(points_out, "outpoints")
        vector_driver(points_out, "outpoints")

    def options(key: str) -> dict[str, str]:
        return {**(creation_options or {}), **(output_options or {}).get(key, {})}

    grids = [s.grid for s in sources]
    layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),  # type: ignore[misc]
                    factor=factor if factor is not None else extraction_factor(grids),
                    factor_key="grid.factor")
    points = vector if isinstance(vector, PointSet) else read_points(
        vector, field, crs=grids[0].crs, reproject=reproject)
    n = len(points)
    if n == 0:
        raise NoSamplesError(
            f"vec: no point feature carries the field {field!r} "
            f"({points.n_skipped} features without it)"
        )
    candidates, cand_starts, rejected_outside, n_outside = _candidate_windows(
        layout, points, [s.name for s in sources])
    if len(candidates) == 0:
        detail = ", ".join(f"{k} rejects {v}" for k, v in rejected_outside.items())
        raise NoSamplesError(
            f"vec: every one of the {n} samples has its patch outside a source ({detail}); "
            "check that the points fall inside the images and share their CRS"
        )
    writing = _Writing(
        sizes=tuple(s.patch_size for s in sources),  # type: ignore[misc]
        bands=tuple(s.bands for s in sources),
        spacings=tuple(s.grid.spacing for s in sources),
        dtypes=tuple(out_dtypes),
        options=tuple(options(f"{s.name}.out") for s in sources),
        keys=tuple(f"{s.name}.out" for s in sources),
        labels_dtype=labels_dtype,
        labels_options=options("outlabels"),
    )
    summary_outputs: dict[str, Path] = {}
    summary_shards: dict[str, list[Path]] = {}
    with _gdal_cache():
        if shards:
            named = {f"{s.name}.out": out for s, out in zip(sources, outputs, strict=True)
                     if out is not None}
            if labels_out is not None:
                named["outlabels"] = labels_out
            source_keys = [None if o is None else f"{s.name}.out"
                           for s, o in zip(sources, outputs, strict=True)]
            with contextlib.ExitStack() as stack:
                n_kept, rejected_nodata, summary_shards, kept_parts = _extract_shards(
                    sources, cand_starts, points.labels[candidates], named, source_keys,
                    writing, stack,
                    points_out is not None, quiet, scheduler, workers)
                summary_outputs = {key: shard_folder(path) for key, path in named.items()}
                if points_out is not None:
                    stage = stack.enter_context(output_group())
                    features = candidates[np.concatenate(kept_parts)]
                    write_points(
                        stage(points_out), points.x[features], points.y[features],
                        {field: points.labels[features],
                         "shard": np.repeat(np.arange(len(kept_parts), dtype=np.int64),
                                            [len(k) for k in kept_parts]),
                         "patch": np.concatenate([np.arange(len(k), dtype=np.int64)
                                                  for k in kept_parts]),
                         "feature": features.astype(np.int64)},
                        crs=grids[0].crs, parameter="outpoints", layer=Path(points_out).stem,
                    )
                    summary_outputs["outpoints"] = Path(points_out)
        else:
            n_kept, rejected_nodata = _extract_single(
                sources, candidates, cand_starts, points, field, grids,
                outputs, labels_out, points_out, writing, quiet, scheduler, workers,
                summary_outputs)
    summary = ExtractionSummary(
        n_features=n, n_skipped=points.n_skipped, n_collected=n_kept,
        n_rejected_outside=n_outside, rejected_outside=rejected_outside,
        rejected_nodata=rejected_nodata, factor=layout.factor, outputs=summary_outputs,
        shards=summary_shards,
    )
    logger.info("PatchesExtraction: %s", summary)
    return summary


def _extract_single(
    sources: Sequence[Source],
    candidates: np.ndarray,
    cand_starts: Sequence[tuple[np.ndarray, np.ndarray]],
    points: PointSet,
    field: str,
    grids: Sequence[Any],
    outputs: Sequence[PathLike | None],
    labels_out: PathLike | None,
    points_out: PathLike | None,
    writing: _Writing,
    quiet: bool,
    scheduler: Any,
    workers: int | None,
    summary_outputs: dict[str, Path],
) -> tuple[int, dict[str, int]]:
    """Read every candidate, then write the kept ones to one file per output, in order."""
    keep = [o is not None for o in outputs]
    with tempfile.TemporaryDirectory(prefix="terrapatch-extract-") as tmpdir:
        if scheduler is None and workers is None:
            buffers, nodata_hits = _read_patches(sources, cand_starts, keep, tmpdir, quiet)
        else:
            buffers, nodata_hits = _read_patches_on_cluster(
                sources, cand_starts, keep, tmpdir, quiet, scheduler, workers)
        ok, rejected_nodata = _reject_nodata(sources, nodata_hits)
        del nodata_hits
        positions = np.flatnonzero(ok)
        if len(positions) == 0:
            detail = ", ".join(f"{k} rejects {v}" for k, v in rejected_nodata.items() if v)
            raise NoSamplesError(
                f"vec: every sample inside the images has nodata in its patch ({detail}); "
                "check the sourceK.nodata values"
            )
        kept = candidates[positions]
        with output_group() as stage:
            staged = [None if o is None else stage(o, f"{s.name}.out")
                      for s, o in zip(sources, outputs, strict=True)]
            staged_labels = None if labels_out is None else stage(labels_out, "outlabels")
            labels = points.labels[kept]
            _write_outputs(writing, buffers, positions, labels, staged, staged_labels)
            for s, o in zip(sources, outputs, strict=True):
                if o is not None:
                    summary_outputs[f"{s.name}.out"] = Path(o)
            if labels_out is not None:
                summary_outputs["outlabels"] = Path(labels_out)
            if points_out is not None:
                write_points(
                    stage(points_out), points.x[kept], points.y[kept],
                    {field: labels,
                     "patch": np.arange(len(kept), dtype=np.int64),
                     "feature": kept.astype(np.int64)},
                    crs=grids[0].crs, parameter="outpoints", layer=Path(points_out).stem,
                )
                summary_outputs["outpoints"] = Path(points_out)
        del buffers
    return len(kept), rejected_nodata


def _contains(patches: np.ndarray, nodata: float) -> np.ndarray:
    """Per patch ``(n, bands, ry, rx)``: whether a value equals ``nodata`` (:func:`nodata_mask`)."""
    return np.asarray(nodata_mask(patches, nodata).any(axis=(1, 2, 3)))

