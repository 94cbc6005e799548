"""Per-process caches of cluster workers: loaded models and open source readers.

A Dask worker runs many tasks of one job: it loads a model once
(:func:`cached_engine`, reloaded when the file changes) and keeps a few sets of
open readers between tasks (:func:`checkout_readers` / :func:`checkin_readers`) so
that GDAL's block cache carries the blocks neighbouring tasks share.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from terrapatch.engines import Engine, load_engine, savedmodel_graph
from terrapatch.errors import InputError, ModelError
from terrapatch.progress import logger
from terrapatch.raster import SourceReader, is_remote
from terrapatch.serve.runner import TileRunner

__all__ = [
    "ENGINE_CACHE_SIZE",
    "READER_CACHE_SIZE",
    "cached_engine",
    "checkin_readers",
    "checkout_readers",
    "worker_name",
]

#: Models kept loaded per worker process by :func:`cached_engine`.
ENGINE_CACHE_SIZE = 2
#: Idle sets of open source readers kept per worker process between cluster tasks, so
#: that GDAL's block cache carries the blocks neighbouring tasks share.
READER_CACHE_SIZE = 4

#: (model path, device) → (file stamp, engine).
_ENGINES: dict[tuple[str, str], tuple[tuple[int, int], Engine]] = {}
_ENGINES_LOCK = threading.Lock()


def worker_name() -> str:
    """Address of the Dask worker running the caller, else ``process <pid>``."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"process {os.getpid()}"


def _model_stamp(model: str) -> tuple[int, int]:
    """``(mtime_ns, size)`` of a model file, or of a SavedModel's ``saved_model.pb``."""
    path = savedmodel_graph(model) or Path(model)
    try:
        stat = path.stat()
    except OSError:
        raise ModelError(
            f"model: {model!r} does not exist on worker {worker_name()} (the model must "
            "be visible to every worker at the same path)"
        ) from None
    return (stat.st_mtime_ns, stat.st_size)


def cached_engine(model: str, device: str = "auto") -> Engine:
    """The engine of the model at ``model``, loaded once per process and kept.

    Cluster tasks call this so that a worker process loads a model once, not once per
    task; the last :data:`ENGINE_CACHE_SIZE` models are kept, and a model whose file
    changed since it was loaded is loaded again.

    Parameters
    ----------
    model
        SavedModel directory, ``.keras``, ``.onnx``, ``.pt2`` or ``.pt`` file.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"`` (see :func:`terrapatch.engines.load_engine`);
        part of the cache key.

    Raises
    ------
    ModelError
        If the model does not exist here (naming the worker) or cannot be loaded.
    """
    stamp = _model_stamp(model)
    with _ENGINES_LOCK:
        key = (model, device)
        cached = _ENGINES.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        _ENGINES.pop(key, None)
        while len(_ENGINES) >= ENGINE_CACHE_SIZE:
            _ENGINES.pop(next(iter(_ENGINES)))
        engine = load_engine(model, device=device)
        _ENGINES[key] = (stamp, engine)
        logger.debug("loaded %s on %s", model, worker_name())
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


def checkout_readers(runner: TileRunner, where: str
                      ) -> tuple[tuple[Any, ...], list[SourceReader]]:
    """Open readers on the runner's sources, reusing an idle set left by an earlier task."""
    key = _readers_key(runner)
    with _READERS_LOCK:
        idle = _READERS.get(key)
        if idle:
            return key, idle.pop()
    return key, _open_readers_here(runner, where)


def checkin_readers(key: tuple[Any, ...], readers: list[SourceReader]) -> None:
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
                        f"{source.name}: {path!r} does not exist on worker "
                        f"{where} (the rasters must be visible to every worker at "
                        "the same path)"
                    )
            readers.append(source.open())
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers
