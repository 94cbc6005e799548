"""One extraction run: checks, candidate windows, reading, nodata rejection, outputs, summary.

For every labelled point, each source's window comes from the geometry module
(:class:`~terrapatch.geometry.Layout`): the windows of one sample cover the same
ground in every source (docs/geometry.md). A sample is kept only if its window lies
inside every source and, for sources with a nodata value, contains no pixel
equal to it in any band. Kept samples are written in feature order, at the same
index in every patches image and in the labels image (or, with ``shards=True``,
to one shard per spatial block: :mod:`terrapatch.extraction.shards`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.extraction.reading import (
    all_rejected_for_nodata,
    gdal_cache,
    read_candidates,
    read_candidates_on_cluster,
    reject_nodata,
)
from terrapatch.extraction.shards import extract_shards, shard_folder
from terrapatch.extraction.writing import Writing, write_outputs
from terrapatch.geometry import Layout, extraction_factor, misalignments
from terrapatch.progress import logger
from terrapatch.raster import Source
from terrapatch.scales import check_factor
from terrapatch.vector import PointSet, read_points, write_points
from terrapatch.writer import (
    Output,
    check_outputs,
    claim_outputs,
    count_unfit,
    output_group,
    pixel_dtype,
)

PathLike = str | os.PathLike[str]

#: Points whose windows are computed at once.
POINT_CHUNK = 2**18


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
        With ``shards=True``: output key (``"source1.output"``, ``"labels_out"``) → its shard
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
    clamp_labels: bool = False,
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
        Pixel type of the labels image; default uint8. A class value it cannot hold is an
        error, unless ``clamp_labels``.
    creation_options
        GDAL creation options for every raster output.
    output_options
        GDAL creation options for one output, by key (``"source1.output"``, ``"labels_out"``),
        added to ``creation_options``.
    factor
        Factor of the sampling grid G in source-1 pixels; default: coarsest spacing /
        source-1 spacing when that is an integer, else 1 (docs/geometry.md).
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
        :data:`~terrapatch.extraction.reading.CLUSTER_BLOCK`-pixel block of source 1
        holding kept samples (numbered by block; blocks without samples have no shard).
        Shard ``k`` of every output holds the same samples, in feature order; blocks come
        in row-major order. On a Dask cluster each worker writes its own shards and
        returns only counts; the folders appear together when every shard is written (an
        existing folder is replaced).
    clamp_labels
        Clamp class values the labels' pixel type cannot hold (OTB's behaviour), with a
        warning counting them, instead of failing: those classes then merge.

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
    out_dtypes = [pixel_dtype(pt, "float32", f"{s.name}.output")
                  for s, pt in zip(sources, pixel_types, strict=True)]
    labels_dtype = pixel_dtype(labels_pixel_type, "uint8", "labels_out")
    for s in sources:
        if s.patch_size is None:
            raise InputError(f"{s.name}.patch_size: missing; extraction needs each source's "
                             "patch size")

    def options(key: str) -> dict[str, str]:
        return {**(creation_options or {}), **(output_options or {}).get(key, {})}

    named = {f"{s.name}.output": out for s, out in zip(sources, outputs, strict=True)
             if out is not None}
    if labels_out is not None:
        named["labels_out"] = labels_out
    planned: dict[str, Output | None] = {
        key: Output(path, "patches", creation_options=options(key))
        for key, path in named.items()}
    if shards:  # the folders of shards are written; the names still give the format
        check_outputs(planned)
        planned = {key: Output(shard_folder(path), "folder") for key, path in named.items()}
    planned["points_out"] = None if points_out is None else Output(points_out, "vector")
    inputs: dict[str, Any] = {f"{s.name}.paths": s.paths for s in sources}
    if not isinstance(vector, PointSet):
        inputs["vector"] = vector
    with claim_outputs(planned, inputs) as claims:
        grids = [s.grid for s in sources]
        layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),  # type: ignore[misc]
                        factor=(check_factor(factor) if factor is not None
                                else extraction_factor(grids)))
        for line in misalignments(grids):
            logger.warning("%s", line)
        points = vector if isinstance(vector, PointSet) else read_points(
            vector, field, crs=grids[0].crs, reproject=reproject)
        n = len(points)
        if n == 0:
            raise NoSamplesError(
                f"vector: no point feature carries the field {field!r} "
                f"({points.n_skipped} features without it)"
            )
        candidates, cand_starts, rejected_outside, n_outside = _candidate_windows(
            layout, points, [s.name for s in sources])
        if len(candidates) == 0:
            detail = ", ".join(f"{k} rejects {v}" for k, v in rejected_outside.items())
            raise NoSamplesError(
                f"vector: every one of the {n} samples has its patch outside a source "
                f"({detail}); check that the points fall inside the images and share their CRS"
            )
        if labels_out is not None:
            check_labels(points.labels[candidates], labels_dtype, clamp_labels)
        writing = Writing(
            sizes=tuple(s.patch_size for s in sources),  # type: ignore[misc]
            bands=tuple(s.bands for s in sources),
            spacings=tuple(s.grid.spacing for s in sources),
            dtypes=tuple(out_dtypes),
            options=tuple(options(f"{s.name}.output") for s in sources),
            keys=tuple(f"{s.name}.output" for s in sources),
            labels_dtype=labels_dtype,
            labels_options=options("labels_out"),
        )
        summary_outputs: dict[str, Path] = {}
        summary_shards: dict[str, list[Path]] = {}
        with gdal_cache():
            if shards:
                source_keys = [None if o is None else f"{s.name}.output"
                               for s, o in zip(sources, outputs, strict=True)]
                with contextlib.ExitStack() as stack:
                    n_kept, rejected_nodata, summary_shards, kept_parts = extract_shards(
                        sources, cand_starts, points.labels[candidates], named, source_keys,
                        writing, stack,
                        points_out is not None, quiet, scheduler, workers)
                    summary_outputs = {key: shard_folder(path) for key, path in named.items()}
                    if points_out is not None:
                        stage = stack.enter_context(output_group())
                        features = candidates[np.concatenate(kept_parts)]
                        write_points(
                            stage(points_out, "points_out"), points.x[features],
                            points.y[features],
                            {field: points.labels[features],
                             "shard": np.repeat(np.arange(len(kept_parts), dtype=np.int64),
                                                [len(k) for k in kept_parts]),
                             "patch": np.concatenate([np.arange(len(k), dtype=np.int64)
                                                      for k in kept_parts]),
                             "feature": features.astype(np.int64)},
                            crs=grids[0].crs, parameter="points_out",
                            layer=Path(points_out).stem,
                        )
                        summary_outputs["points_out"] = Path(points_out)
            else:
                spool = next(iter(claims.values())).dir if claims else None
                n_kept, rejected_nodata = _extract_single(
                    sources, candidates, cand_starts, points, field, grids,
                    outputs, labels_out, points_out, writing, quiet, scheduler, workers,
                    summary_outputs, spool)
    summary = ExtractionSummary(
        n_features=n, n_skipped=points.n_skipped, n_collected=n_kept,
        n_rejected_outside=n_outside, rejected_outside=rejected_outside,
        rejected_nodata=rejected_nodata, factor=int(layout.factor), outputs=summary_outputs,
        shards=summary_shards,
    )
    logger.info("extraction: %s", summary)
    return summary


def check_labels(labels: np.ndarray, dtype: np.dtype, clamp: bool) -> None:
    """Refuse (or, with ``clamp``, warn about) class values the labels' pixel type cannot hold.

    Raises
    ------
    InputError
        Naming ``labels_out``, the values and how many samples carry them.
    """
    n = count_unfit(labels, dtype)
    if n == 0:
        return
    info = np.iinfo(dtype)
    values = np.unique(labels[(labels < info.min) | (labels > info.max)])
    shown = ", ".join(str(int(v)) for v in values[:5]) + (", …" if len(values) > 5 else "")
    if not clamp:
        raise InputError(
            f"labels_out: class values {shown} ({n} sample(s)) do not fit {dtype.name} "
            f"({info.min}..{info.max}); give a wider labels_pixel_type (e.g. int16) or "
            "clamp them with clamp_labels=True"
        )
    logger.warning("labels_out: %d sample(s) with class values %s clamped to %s's range "
                   "%d..%d: those classes merge", n, shown, dtype.name, info.min, info.max)


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
    writing: Writing,
    quiet: bool,
    scheduler: Any,
    workers: int | None,
    summary_outputs: dict[str, Path],
    spool: Path | None = None,
) -> tuple[int, dict[str, int]]:
    """Read every candidate, then write the kept ones to one file per output, in order.

    Spooled patches go to a temporary folder in ``spool`` (the first output's pending
    folder, so that a killed run's spool is removed by the next run), else the system's.
    """
    keep = [o is not None for o in outputs]
    with tempfile.TemporaryDirectory(prefix="terrapatch-extract-", dir=spool) as tmpdir:
        if scheduler is None and workers is None:
            buffers, nodata_hits = read_candidates(sources, cand_starts, keep, tmpdir, quiet)
        else:
            buffers, nodata_hits = read_candidates_on_cluster(
                sources, cand_starts, keep, tmpdir, quiet, scheduler, workers)
        ok, rejected_nodata = reject_nodata(sources, nodata_hits)
        del nodata_hits
        positions = np.flatnonzero(ok)
        if len(positions) == 0:
            raise all_rejected_for_nodata(rejected_nodata)
        kept = candidates[positions]
        with output_group() as stage:
            staged = [None if o is None else stage(o, f"{s.name}.output")
                      for s, o in zip(sources, outputs, strict=True)]
            staged_labels = None if labels_out is None else stage(labels_out, "labels_out")
            labels = points.labels[kept]
            write_outputs(writing, buffers, positions, labels, staged, staged_labels)
            for s, o in zip(sources, outputs, strict=True):
                if o is not None:
                    summary_outputs[f"{s.name}.output"] = Path(o)
            if labels_out is not None:
                summary_outputs["labels_out"] = Path(labels_out)
            if points_out is not None:
                write_points(
                    stage(points_out, "points_out"), points.x[kept], points.y[kept],
                    {field: labels,
                     "patch": np.arange(len(kept), dtype=np.int64),
                     "feature": kept.astype(np.int64)},
                    crs=grids[0].crs, parameter="points_out", layer=Path(points_out).stem,
                )
                summary_outputs["points_out"] = Path(points_out)
        del buffers
    return len(kept), rejected_nodata
