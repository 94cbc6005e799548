"""Sharded outputs: one shard of every output per spatial block, written by tasks.

With ``shards=True`` every :data:`~terrapatch.extraction.reading.CLUSTER_BLOCK`-pixel
block of source 1 holding kept samples gets its own shard of every output
(``dir/a.tif`` → ``dir/a_shards/a-00000.tif``, …), read and written by one task (a Dask
worker on a cluster); the shard folders appear together when every shard is written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.errors import InputError
from terrapatch.extraction.reading import (
    all_rejected_for_nodata,
    cluster_blocks,
    gdal_cache,
    read_candidates,
    reject_nodata,
)
from terrapatch.extraction.writing import Writing, write_outputs
from terrapatch.progress import progress_bar
from terrapatch.raster import Source
from terrapatch.writer import atomic_directory

PathLike = str | os.PathLike[str]

#: Suffix of the folder holding the shards of an output (``a.tif`` → ``a_shards/``).
SHARDS_SUFFIX = "_shards"


def write_shard(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    outputs: Sequence[str | None],
    labels_out: str | None,
    writing: Writing,
    want_kept: bool,
    threads: int | None = 1,
) -> dict[str, Any]:
    """One shard task: read, reject nodata and write one block's samples to its shard files.

    Writes nothing when no sample of the block survives. Returns counts only (and, when
    ``want_kept``, the packed mask of the kept candidates, for the points output).
    """
    keep = [o is not None for o in outputs]
    with tempfile.TemporaryDirectory(prefix="terrapatch-shard-") as tmpdir, gdal_cache():
        buffers, nodata_hits = read_candidates(sources, starts, keep, tmpdir, quiet=True,
                                             threads=threads)
        ok, rejected = reject_nodata(sources, nodata_hits)
        positions = np.flatnonzero(ok)
        if len(positions):
            write_outputs(writing, buffers, positions, labels[positions], outputs, labels_out)
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


def extract_shards(
    sources: Sequence[Source],
    starts: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    outputs: Mapping[str, PathLike],
    source_keys: Sequence[str | None],
    writing: Writing,
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

    parts = cluster_blocks(starts[0])
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
    labels_key = "labels_out" if "labels_out" in outputs else None
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
                results[k] = write_shard(*task, threads=None)
                bar.update(1)
    else:
        with cluster.client_for(scheduler, workers) as client:
            cluster.check_worker_paths(
                client, [*(p for s in sources for p in s.paths),
                         *(os.fspath(s) for s in stages.values())],
                labels={os.fspath(s): key for key, s in stages.items()})
            cluster.run_ordered(client, write_shard, tasks, results.__setitem__,
                              "extracting", quiet)
    n_kept = sum(int(r["n"]) for r in results)
    rejected = {s.name: sum(int(r["rejected_nodata"][s.name]) for r in results)
                for s in sources}
    if n_kept == 0:
        raise all_rejected_for_nodata(rejected)
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
