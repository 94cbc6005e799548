"""PatchesExtraction: cut one patch per sample from each of N sources and write patches images.

For every labelled point, each source's window comes from the geometry module
(:class:`~terrapatch.geometry.Layout`): the windows of one sample cover the same
ground in every source (DESIGN.md §2). A sample is kept only if its window lies
inside every source and, for sources with a nodata value, contains no pixel
equal to it in any band. Kept samples are written in feature order, at the same
index in every patches image and in the labels image.

Reading is block-aware: samples are grouped by 512 × 512-pixel chunks of each
source and a dense group is served by one read of its bounding box, instead of
one small read per sample.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.geometry import Layout, extraction_factor
from terrapatch.patches import write_patches_image
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import Source, SourceReader, nodata_mask, patches_from_region
from terrapatch.vector import PointSet, read_points, vector_driver, write_points
from terrapatch.writer import check_writable, output_group, pixel_dtype

PathLike = str | os.PathLike[str]

#: Side, in source pixels, of the chunks samples are grouped by for reading.
CHUNK = 512
#: A group is read as one region when its bounding box is at most this many times the
#: total area of its patches (or smaller than ``MIN_REGION`` pixels).
REGION_OVERREAD = 8
MIN_REGION = 65536
#: Above this many bytes, candidate patches are buffered in a memory-mapped temp file.
MEMMAP_BYTES = 512 * 2**20
#: Patches written per chunk.
WRITE_CHUNK = 4096
#: Threads reading chunks in parallel (GDAL decodes outside the GIL).
READ_THREADS = 4
#: Side, in source-1 pixels, of the spatial blocks of samples sent to one Dask task.
CLUSTER_BLOCK = 2048


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
        Output key → written path.
    """

    n_features: int
    n_skipped: int
    n_collected: int
    n_rejected_outside: int
    rejected_outside: dict[str, int]
    rejected_nodata: dict[str, int]
    factor: int
    outputs: dict[str, Path] = field(default_factory=dict)

    def __str__(self) -> str:
        outside = ", ".join(f"{k}: {v}" for k, v in self.rejected_outside.items())
        nodata = ", ".join(f"{k}: {v}" for k, v in self.rejected_nodata.items())
        return (f"{self.n_collected} samples collected of {self.n_features} "
                f"({self.n_rejected_outside} outside [{outside}]; nodata [{nodata}]; "
                f"{self.n_skipped} features without the field skipped)")


def _group_order(cols: np.ndarray, rows: np.ndarray,
                 chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Order samples by ``chunk``-pixel blocks; return (order, start offsets of each group)."""
    keys = (rows // chunk) * (int(cols.max(initial=0)) // chunk + 1) + cols // chunk
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    return order, np.concatenate([[0], bounds, [len(order)]])


def _read_group(reader: SourceReader, cols: np.ndarray, rows: np.ndarray,
                size: tuple[int, int]) -> np.ndarray:
    """Patches ``(n, ry, rx, bands)`` at the given window starts, reading as few times as sane."""
    rx, ry = size
    c0, r0 = int(cols.min()), int(rows.min())
    width, height = int(cols.max()) + rx - c0, int(rows.max()) + ry - r0
    if width * height <= max(REGION_OVERREAD * len(cols) * rx * ry, MIN_REGION):
        region = reader.read(Window(c0, r0, width, height))
        return patches_from_region(region, cols - c0, rows - r0, size)
    out = np.empty((len(cols), ry, rx, reader.bands), dtype=reader.dtype)
    for n, (c, r) in enumerate(zip(cols, rows, strict=True)):
        out[n] = reader.read(Window(int(c), int(r), rx, ry)).transpose(1, 2, 0)
    return out


def _buffer(shape: tuple[int, ...], dtype: np.dtype, tmpdir: str | None) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if tmpdir is None or nbytes <= MEMMAP_BYTES:
        return np.empty(shape, dtype=dtype)
    path = Path(tmpdir) / f"patches-{len(os.listdir(tmpdir))}.npy"
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _read_patches(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
    tmpdir: str | None,
    quiet: bool,
    threads: int = READ_THREADS,
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Read every candidate's patch in every source, chunk by chunk, on a few threads.

    Returns the patch buffers (None where the patches are not kept; in memory when
    ``tmpdir`` is None) and, per source, which candidates hold nodata.
    """
    buffers: list[np.ndarray | None] = []
    nodata_hits: list[np.ndarray] = []
    tasks: list[tuple[int, np.ndarray]] = []
    for i, source in enumerate(sources):
        cols, rows = starts[i]
        rx, ry = source.patch_size  # type: ignore[misc]
        buffers.append(_buffer((len(cols), ry, rx, source.bands), source.dtype, tmpdir)
                       if keep[i] else None)
        nodata_hits.append(np.zeros(len(cols), dtype=bool))
        if source.nodata is None and not keep[i]:
            continue  # nothing to read: the geometry alone decides for this source
        order, bounds = _group_order(cols, rows)
        tasks.extend((i, order[a:b]) for a, b in itertools.pairwise(bounds))

    local = threading.local()

    def run(task: tuple[int, np.ndarray]) -> None:
        i, idx = task
        readers = getattr(local, "readers", None)
        if readers is None:
            readers = local.readers = {}
            opened.append(readers)
        if i not in readers:
            readers[i] = sources[i].open()
        patches = _read_group(readers[i], starts[i][0][idx], starts[i][1][idx],
                              sources[i].patch_size)  # type: ignore[arg-type]
        buf = buffers[i]
        if buf is not None:
            buf[idx] = patches
        nodata = sources[i].nodata
        if nodata is not None:
            nodata_hits[i][idx] = _contains(patches, nodata)

    opened: list[dict[int, SourceReader]] = []
    workers = max(1, min(threads, os.cpu_count() or 1, len(tasks)))
    try:
        with progress_bar(len(tasks), "extracting", unit="chunk", quiet=quiet) as bar, \
                ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(run, tasks):
                bar.update(1)
    finally:
        for readers in opened:
            for reader in readers.values():
                reader.close()
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
    buffers: list[np.ndarray | None] = []
    nodata_hits = [np.zeros(n, dtype=bool) for _ in sources]
    for i, source in enumerate(sources):
        rx, ry = source.patch_size  # type: ignore[misc]
        buffers.append(_buffer((n, ry, rx, source.bands), source.dtype, tmpdir)
                       if keep[i] else None)
    cols, rows = starts[0]
    order, bounds = _group_order(cols, rows, CLUSTER_BLOCK)
    parts = [order[a:b] for a, b in itertools.pairwise(bounds)]
    tasks = [(list(sources), [(c[idx], r[idx]) for c, r in starts], list(keep))
             for idx in parts]

    def collect(k: int, result: tuple[list[np.ndarray | None], list[np.ndarray]]) -> None:
        idx = parts[k]
        part_buffers, part_hits = result
        for i in range(len(sources)):
            buf, got = buffers[i], part_buffers[i]
            if buf is not None and got is not None:
                buf[idx] = got
            nodata_hits[i][idx] = part_hits[i]

    with cluster.client_for(scheduler, workers) as client:
        cluster.check_worker_paths(client, [p for s in sources for p in s.paths])
        cluster.run_tasks(client, _read_block, tasks, collect, "extracting", quiet)
    return buffers, nodata_hits


def _read_block(
    sources: Sequence[Source], starts: Sequence[tuple[np.ndarray, np.ndarray]],
    keep: Sequence[bool],
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """One cluster task: the patches of one spatial block of candidates, in memory."""
    return _read_patches(sources, starts, keep, None, quiet=True, threads=1)


def _chunks(buffer: np.ndarray, positions: np.ndarray) -> Iterator[np.ndarray]:
    for a in range(0, len(positions), WRITE_CHUNK):
        yield np.asarray(buffer[positions[a:a + WRITE_CHUNK]])


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
        patch index) and ``feature`` (the index among features carrying the field).
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
        address. The outputs are identical to an in-process run.
    workers
        Run the reads on a local Dask cluster of this many worker processes.

    Returns
    -------
    ExtractionSummary
        Counts and written paths.
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
    starts = layout.sample_windows(points.x, points.y)
    inside_each = [layout.inside(i, c, r) for i, (c, r) in enumerate(starts)]
    inside = np.logical_and.reduce(inside_each)
    rejected_outside = {s.name: int((~m).sum()) for s, m in zip(sources, inside_each, strict=True)}
    candidates = np.flatnonzero(inside)
    if len(candidates) == 0:
        detail = ", ".join(f"{k} rejects {v}" for k, v in rejected_outside.items())
        raise NoSamplesError(
            f"vec: every one of the {n} samples has its patch outside a source ({detail}); "
            "check that the points fall inside the images and share their CRS"
        )

    ok = np.ones(len(candidates), dtype=bool)
    rejected_nodata: dict[str, int] = {}
    summary_outputs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="terrapatch-extract-") as tmpdir:
        cand_starts = [(c[candidates], r[candidates]) for c, r in starts]
        keep = [o is not None for o in outputs]
        if scheduler is None and workers is None:
            buffers, nodata_hits = _read_patches(sources, cand_starts, keep, tmpdir, quiet)
        else:
            buffers, nodata_hits = _read_patches_on_cluster(
                sources, cand_starts, keep, tmpdir, quiet, scheduler, workers)
        for source, has_nodata in zip(sources, nodata_hits, strict=True):
            rejected_nodata[source.name] = int((has_nodata & ok).sum())
            ok &= ~has_nodata
        positions = np.flatnonzero(ok)
        kept = candidates[positions]
        if len(kept) == 0:
            detail = ", ".join(f"{k} rejects {v}" for k, v in rejected_nodata.items() if v)
            raise NoSamplesError(
                f"vec: every sample inside the images has nodata in its patch ({detail}); "
                "check the sourceK.nodata values"
            )
        labels = points.labels[kept]
        with output_group() as stage:
            for i, source in enumerate(sources):
                buf, out = buffers[i], outputs[i]
                if out is None or buf is None:
                    continue
                rx, ry = source.patch_size  # type: ignore[misc]
                write_patches_image(
                    stage(out), _chunks(buf, positions), n_patches=len(kept),
                    patch_size_x=rx, patch_size_y=ry, bands=source.bands, dtype=out_dtypes[i],
                    spacing=source.grid.spacing, creation_options=options(f"{source.name}.out"),
                    parameter=f"{source.name}.out",
                )
                summary_outputs[f"{source.name}.out"] = Path(out)
            if labels_out is not None:
                write_patches_image(
                    stage(labels_out), [labels.reshape(-1, 1, 1, 1)], n_patches=len(kept),
                    patch_size_x=1, patch_size_y=1, bands=1, dtype=labels_dtype,
                    creation_options=options("outlabels"), parameter="outlabels",
                )
                summary_outputs["outlabels"] = Path(labels_out)
            if points_out is not None:
                write_points(
                    stage(points_out), points.x[kept], points.y[kept],
                    {field: labels, "patch": np.arange(len(kept), dtype=np.int64),
                     "feature": kept.astype(np.int64)},
                    crs=grids[0].crs, parameter="outpoints", layer=Path(points_out).stem,
                )
                summary_outputs["outpoints"] = Path(points_out)
    summary = ExtractionSummary(
        n_features=n, n_skipped=points.n_skipped, n_collected=len(kept),
        n_rejected_outside=int((~inside).sum()), rejected_outside=rejected_outside,
        rejected_nodata=rejected_nodata, factor=layout.factor, outputs=summary_outputs,
    )
    logger.info("PatchesExtraction: %s", summary)
    return summary


def _contains(patches: np.ndarray, nodata: float) -> np.ndarray:
    """Per patch: whether any value of any band equals ``nodata`` (see :func:`nodata_mask`)."""
    hits = nodata_mask(patches, nodata)
    return np.asarray(hits.reshape(hits.shape[0], -1).any(axis=1))
