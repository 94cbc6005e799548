"""Reading the candidates' patches: decode units, groups, the unit cache, regions, gathers.

A source is read in *units* (whole blocks of its first file, grouped to at least
:data:`UNIT_MIN` pixels a side); the samples of one :data:`CHUNK`-pixel group are cut,
with one vectorised gather, from a region assembled from the units their windows touch,
and a unit shared by neighbouring groups is decoded once and dropped after its last group.
Groups are read on a few threads (or as Dask tasks, one per :data:`CLUSTER_BLOCK`-pixel
block of source 1); the patches go to the buffers of :mod:`terrapatch.extraction.spool`,
and which candidates hold nodata is recorded per source.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import rasterio
import rasterio.errors
from rasterio.windows import Window

from terrapatch.errors import NoSamplesError
from terrapatch.extraction import spool
from terrapatch.progress import progress_bar
from terrapatch.raster import Source, SourceReader, nodata_mask

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
#: Most patches cut from a region at once (bounds the gathered arrays in dense groups).
GATHER_BATCH = 2048
#: Threads reading groups in parallel (GDAL decodes outside the GIL).
READ_THREADS = 4
#: GDAL block cache during an extraction, unless GDAL_CACHEMAX is set: every unit is
#: decoded once, so a larger cache would only hold memory.
GDAL_CACHE_BYTES = 32 * 2**20
#: Side, in source-1 pixels, of the spatial blocks of samples sent to one Dask task (and
#: of the shards).
CLUSTER_BLOCK = 2048


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



def _cache_set_by_user() -> bool:
    """Whether GDAL_CACHEMAX comes from the environment or an active ``rasterio.Env``."""
    if "GDAL_CACHEMAX" in os.environ:
        return True
    try:
        return "GDAL_CACHEMAX" in rasterio.env.getenv()
    except rasterio.errors.EnvError:
        return False


@contextlib.contextmanager
def gdal_cache() -> Iterator[None]:
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


def read_candidates(
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
    buffers = spool.patch_buffers(sources, n, keep, tmpdir)
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
        return cast(SourceReader, readers[i])

    def store(i: int, index: np.ndarray, patches: np.ndarray) -> None:
        buf = buffers[i]
        if buf is not None:
            spool.scatter(buf, index, patches)
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
        spool.release(buf)
    return buffers, nodata_hits


def read_candidates_on_cluster(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
    tmpdir: str,
    quiet: bool,
    scheduler: Any,
    workers: int | None,
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Same as :func:`read_candidates`, with candidates partitioned by spatial block over Dask."""
    from terrapatch import cluster

    n = len(starts[0][0])
    buffers = spool.patch_buffers(sources, n, keep, tmpdir)
    nodata_hits = [np.zeros(n, dtype=bool) for _ in sources]
    parts = cluster_blocks(starts[0])
    tasks = [(list(sources), [(c[idx], r[idx]) for c, r in starts], list(keep))
             for idx in parts]

    def collect(k: int, result: tuple[list[np.ndarray | None], list[np.ndarray]]) -> None:
        idx = parts[k]
        part_buffers, part_hits = result
        for i in range(len(sources)):
            buf, got = buffers[i], part_buffers[i]
            if buf is not None and got is not None:
                spool.scatter(buf, idx, got)
            nodata_hits[i][idx] = part_hits[i]

    with cluster.client_for(scheduler, workers) as client:
        cluster.check_worker_paths(client, [p for s in sources for p in s.paths])
        cluster.run_ordered(client, _read_block, tasks, collect, "extracting", quiet)
    for buf in buffers:
        spool.release(buf)
    return buffers, nodata_hits


def cluster_blocks(starts: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Candidates split by :data:`CLUSTER_BLOCK`-pixel blocks of source 1, each in order."""
    order, bounds = _group_order(starts[0], starts[1], CLUSTER_BLOCK)
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _read_block(
    sources: Sequence[Source], starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """One cluster task: the patches of one spatial block of candidates, in memory."""
    with gdal_cache():
        return read_candidates(sources, starts, keep, None, quiet=True, threads=1)



def reject_nodata(sources: Sequence[Source],
                   nodata_hits: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of candidates free of nodata, and per source the rejections not already counted."""
    ok = np.ones(len(nodata_hits[0]), dtype=bool)
    rejected: dict[str, int] = {}
    for source, has_nodata in zip(sources, nodata_hits, strict=True):
        rejected[source.name] = int((has_nodata & ok).sum())
        ok &= ~has_nodata
    return ok, rejected


def all_rejected_for_nodata(rejected: Mapping[str, int]) -> NoSamplesError:
    """The error when every sample inside the sources has nodata in a patch."""
    detail = ", ".join(f"{k} rejects {v}" for k, v in rejected.items() if v)
    return NoSamplesError(
        f"vector: every sample inside the images has nodata in its patch ({detail}); "
        "check the sources' nodata values"
    )


def _contains(patches: np.ndarray, nodata: float) -> np.ndarray:
    """Per patch ``(n, bands, ry, rx)``: whether a value equals ``nodata`` (:func:`nodata_mask`)."""
    return np.asarray(nodata_mask(patches, nodata).any(axis=(1, 2, 3)))
