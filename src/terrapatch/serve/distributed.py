"""Serving on a Dask cluster: blocks of tiles as tasks, written by the workers or sent back.

A task is one :class:`~terrapatch.tiling.Block`. With the block sink (the
default), :func:`write_block` reads the block's inputs, runs the model (loaded
once per worker process) and writes the block file itself into the output's
pending folder: the client receives a :class:`BlockStatus` of a few hundred bytes
per block and journals it. With the ordered sink, :func:`serve_block` returns the
block's pixels and the client writes them in order, as before. Either way tasks
are retried after an error and rescheduled when a worker dies
(:func:`terrapatch.cluster.run_ordered`), and the map is the same.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch import cluster
from terrapatch.engines import savedmodel_graph
from terrapatch.errors import InputError, ModelError, OutputError
from terrapatch.raster import is_remote
from terrapatch.serve.caches import cached_engine, checkin_readers, checkout_readers, worker_name
from terrapatch.serve.journal import BlockStatus
from terrapatch.serve.pipeline import run_pipeline
from terrapatch.serve.runner import ServeStats, TileRunner
from terrapatch.serve.sinks import BlockStore
from terrapatch.tiling import Block, Tile
from terrapatch.writer import convert_pixels, count_unfit

__all__ = [
    "BlockResult",
    "check_workers_can_write",
    "model_files",
    "movable_runner",
    "serve_block",
    "worker_paths",
    "write_block",
]

#: What :func:`serve_block` returns: the pixels of each tile of its block (``(bands,
#: rows, cols)`` in the output pixel type, None for a tile skipped for nodata), the
#: seconds spent reading and in the model, and the pixel values clamped into the type.
BlockResult = tuple[list[np.ndarray | None], float, float, int]


def _compute(runner: TileRunner, tiles: Sequence[Tile], dtype: np.dtype, rounding: bool
             ) -> tuple[list[np.ndarray | None], ServeStats, int]:
    """Compute tiles in a worker (reader thread ahead of the model); pixels in ``dtype``.

    Also returns how many pixel values did not fit ``dtype`` and were clamped.
    """
    if runner.model is None:
        raise ModelError("serve_block: the tile runner has no model path to open")
    engine = runner.adapt(cached_engine(runner.model, runner.device))
    where = worker_name()  # here: the reader thread is not the worker's task thread
    stats = ServeStats()
    pixels: list[np.ndarray | None] = []
    local: dict[str, Any] = {}
    clamped = [0]

    def read(tile: Tile) -> dict[str, np.ndarray] | None:
        start = time.perf_counter()
        if "readers" not in local:
            local["key"], local["readers"] = checkout_readers(runner, where)
        feed = runner.read(local["readers"], tile)
        stats.add("read", time.perf_counter() - start)
        return feed

    def infer(tile: Tile, feed: dict[str, np.ndarray] | None) -> np.ndarray | None:
        return None if feed is None else runner.infer(engine, tile, feed, stats)

    def keep(tile: Tile, values: np.ndarray | None) -> None:
        if values is not None:
            clamped[0] += count_unfit(values, dtype, rounding)
        pixels.append(None if values is None else np.ascontiguousarray(
            convert_pixels(values, dtype, rounding).transpose(2, 0, 1)))

    def close() -> None:
        if "readers" in local:
            checkin_readers(local["key"], local.pop("readers"))

    run_pipeline(tiles, read, infer, keep, close, prefetch=2)
    return pixels, stats, clamped[0]


def serve_block(runner: TileRunner, tiles: Sequence[Tile], pixel_type: str,
                rounding: bool = False) -> BlockResult:
    """Compute a block of tiles and return its pixels (the ordered sink's cluster task).

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
        Pixels per tile, read seconds, model seconds, pixel values clamped.
    """
    pixels, stats, clamped = _compute(runner, tiles, np.dtype(pixel_type), rounding)
    return pixels, stats.read, stats.compute, clamped


def write_block(runner: TileRunner, block: Block, store: BlockStore,
                rounding: bool = False) -> tuple[BlockStatus, int]:
    """Compute a block and write its file into the pending folder (the block sink's task).

    Returns only the block's status (its file name, size and timings) and the number of
    pixel values clamped into the output type.
    """
    pixels, stats, clamped = _compute(runner, block.tiles, np.dtype(store.dtype), rounding)
    return store.write(block, pixels, (stats.read, stats.compute)), clamped


def movable_runner(runner: TileRunner, model_path: str | None) -> TileRunner:
    """The tile runner to ship to a cluster: absolute paths, the model as a path.

    Raises
    ------
    InputError
        If the model was given in memory (workers need a file or directory).
    """
    if model_path is None:
        raise InputError(
            "model: serving on a Dask cluster needs the model as a SavedModel "
            "directory, .keras or .onnx file every worker can read; got an "
            "in-memory model"
        )
    moved = copy.copy(runner)
    sources = []
    for source in runner.sources:
        copied = copy.copy(source)
        copied.paths = tuple(_absolute(p) for p in source.paths)
        sources.append(copied)
    moved.sources = sources
    moved.model = _absolute(model_path)
    return moved


def _absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def model_files(model: str) -> list[Path]:
    """The files that make a model: the file itself, or every file of a SavedModel directory."""
    path = Path(model)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def worker_paths(runner: TileRunner) -> dict[str, str]:
    """Paths every worker must see (a SavedModel's ``saved_model.pb`` too) → parameter."""
    paths = {p: f"{s.name}.paths" for s in runner.sources for p in s.paths}
    if runner.model is not None:
        paths[runner.model] = "model"
        if os.path.isdir(runner.model):  # the graph must be there (named even when gone here)
            graph = savedmodel_graph(runner.model) or os.path.join(runner.model,
                                                                   "saved_model.pb")
            paths[os.fspath(graph)] = "model"
    return paths


def _writable_here(folder: str) -> bool:
    """Whether this process can create a file in ``folder``."""
    probe = Path(folder) / f".probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def check_workers_can_write(client: Any, folder: Path) -> list[str]:
    """Addresses of the workers that cannot write into ``folder`` (empty: all can)."""
    answers = client.run(_writable_here, os.fspath(folder))
    return sorted(worker for worker, ok in answers.items() if not ok)


def run_blocks(client: Any, runner: TileRunner, store: BlockStore, blocks: Sequence[Block],
               rounding: bool, on_status: Callable[[BlockStatus, int], None],
               quiet: bool) -> None:
    """Run every block as a :func:`write_block` task; hand each status over in order.

    ``on_status`` gets the block's status and its count of clamped pixel values.
    """
    tasks = [(runner, block, store, rounding) for block in blocks]
    cluster.run_ordered(client, write_block, tasks, lambda _, result: on_status(*result),
                        "serving", quiet, weights=[len(b.tiles) for b in blocks],
                        unit="tile")


def run_pixels(client: Any, runner: TileRunner, blocks: Sequence[Block], pixel_type: str,
               rounding: bool, on_result: Callable[[Block, BlockResult], None],
               quiet: bool) -> None:
    """Run every block as a :func:`serve_block` task; hand its pixels over in order."""
    tasks = [(runner, block.tiles, pixel_type, rounding) for block in blocks]
    cluster.run_ordered(client, serve_block, tasks,
                        lambda k, result: on_result(blocks[k], result),
                        "serving", quiet, weights=[len(b.tiles) for b in blocks],
                        unit="tile")


def require_writable(client: Any, folder: Path) -> None:
    """Raise :class:`OutputError` when a worker cannot write the pending folder."""
    denied = check_workers_can_write(client, folder)
    if denied:
        raise OutputError(
            f"out: worker {denied[0]} cannot write into {os.fspath(folder)!r} (with the block "
            "sink every worker writes its blocks beside the output: use a folder all workers "
            "share, or sink='ordered')"
        )
