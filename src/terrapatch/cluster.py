"""Dask clusters: connect to (or start) a scheduler, check workers' files, run tasks with retries.

terrapatch's long jobs (extraction, serving) are split into independent tasks:
this module ships them to a ``dask.distributed`` cluster and collects the
results in task order with a bounded number of tasks in flight
(:func:`run_ordered`), with progress from the scheduler.
Errors that a user can fix (unreachable scheduler, a worker missing a file)
become one-line input errors.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from terrapatch.errors import InputError, TerrapatchError
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import is_remote

#: How many times a task is retried after an error in a worker.
TASK_RETRIES = 2
#: Seconds to wait for a scheduler before giving up.
CONNECT_TIMEOUT = 10


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        raise InputError(
            "dask-scheduler: dask.distributed is not installed (pip install 'dask[distributed]')"
        ) from exc
    return distributed


@contextlib.contextmanager
def client_for(scheduler: Any = None, workers: int | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client``.

    Parameters
    ----------
    scheduler
        A ``Client`` (used as is), a scheduler address (``"tcp://host:8786"``), or None
        to start a ``LocalCluster`` of ``workers`` single-threaded worker processes.
    workers
        Number of local worker processes (default: the number of CPU cores).

    Notes
    -----
    The local workers share this machine's cores: unless ``TF_NUM_INTRAOP_THREADS``
    (``TERRAPATCH_ONNX_THREADS``) is set, each one's TensorFlow (onnxruntime) gets
    ``cores // workers`` intra-op threads (at least 1) instead of one per core each.
    """
    distributed = _import_distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if scheduler:
        client = _connect(distributed, str(scheduler))
        try:
            yield client
        finally:
            client.close()
        return
    cores = _cores()
    n = workers or cores
    if n < 1:
        raise InputError(f"workers: {workers!r} must be ≥ 1")
    share = str(max(1, cores // n))
    env = {name: share for name in ("TF_NUM_INTRAOP_THREADS", "TERRAPATCH_ONNX_THREADS")
           if name not in os.environ}
    # ":0": the scheduler's HTTP endpoints on a free port (not 8787, maybe taken).
    with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", env=env) as cluster, \
            distributed.Client(cluster) as client:
        logger.debug("local Dask cluster of %d worker process(es) at %s", n,
                     cluster.scheduler_address)
        yield client


def _connect(distributed: Any, address: str) -> Any:
    """A ``Client`` of the scheduler at ``address``, or one input error naming it."""
    _probe_scheduler(distributed, address)
    failure = None
    try:
        return distributed.Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, AssertionError, RuntimeError) as exc:
        # distributed sometimes fails a connection that times out with an internal
        # AssertionError of its event-loop runner rather than a TimeoutError.
        failure = InputError(f"dask-scheduler: cannot reach the scheduler at {address!r} "
                             f"({str(exc) or type(exc).__name__})")
    except ValueError as exc:
        failure = InputError(f"dask-scheduler: {address!r} is not a scheduler address ({exc}); "
                             "expected e.g. tcp://host:8786")
    # The half-built Client is garbage now. Left to a later collection, its __del__
    # may run inside the next Client's event-loop start and deadlock on distributed's
    # loop lock (seen in CI): collect it here, outside distributed.
    gc.collect()
    raise failure


def _probe_scheduler(distributed: Any, address: str) -> None:
    """Fail fast, without building a ``Client``, when nothing listens at a TCP address."""
    try:
        scheme, location = distributed.comm.parse_address(address)
        host, port = distributed.comm.parse_host_port(location)
    except (ValueError, TypeError):
        return  # malformed: the Client names the problem
    if scheme not in ("tcp", "tls"):
        return
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(
            f"dask-scheduler: cannot reach the scheduler at {address!r} ({reason})"
        ) from None


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _missing_paths(paths: Sequence[str]) -> list[str]:
    """The paths (files or directories) that do not exist on this machine, in order."""
    return [p for p in paths if not is_remote(p) and not os.path.exists(p)]


def check_worker_paths(client: Any, paths: Iterable[str | os.PathLike[str]],
                       labels: Mapping[str, str] | None = None) -> None:
    """Raise :class:`InputError` naming the worker and the path if a worker lacks one.

    Parameters
    ----------
    client
        A ``distributed.Client``.
    paths
        Files or directories (e.g. a SavedModel directory and its ``saved_model.pb``)
        every worker must see; relative paths are taken from the caller's working
        directory. URLs and GDAL ``/vsi`` paths are not checked.
    labels
        Neutral identifier of each path, as given in ``paths`` (e.g. ``{"m.keras":
        "model"}``), named in the error as ``model='/abs/m.keras'``; default
        ``input file``.

    Raises
    ------
    InputError
        For the first worker (by address) missing a path, with the first path it lacks.
    """
    names: dict[str, str] = {}
    for p in paths:
        text = os.fspath(p)
        full = text if is_remote(text) else os.path.abspath(text)
        label = (labels or {}).get(text)
        names.setdefault(full, f"input file {full!r}" if label is None else f"{label}={full!r}")
    missing = client.run(_missing_paths, sorted(names))
    for worker, lost in sorted(missing.items()):
        if lost:
            raise InputError(
                f"worker {worker}: {names[lost[0]]} does not exist there "
                "(the rasters and models must be visible to every worker at the same path)"
            )


def total_threads(client: Any) -> int:
    """Number of task slots (worker threads) of the cluster now; at least 1."""
    return max(1, int(sum(client.nthreads().values())))


def _task_result(future: Any, index: int, desc: str) -> Any:
    """The result of a finished task, or a :class:`TerrapatchError` saying why it failed."""
    distributed = _import_distributed()
    try:
        return future.result()
    except TerrapatchError:
        raise
    except distributed.KilledWorker as exc:
        raise TerrapatchError(
            f"{desc}: task {index} failed on the cluster: the workers running it died "
            f"{_allowed_failures() + 1} time(s) (out of memory, or a crash in native code?): "
            f"{exc}"
        ) from exc
    except Exception as exc:
        raise TerrapatchError(
            f"{desc}: task {index} failed on the cluster after {TASK_RETRIES} retries: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _allowed_failures() -> int:
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


def run_ordered(
    client: Any,
    func: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    on_result: Callable[[int, Any], None],
    desc: str,
    quiet: bool = False,
    in_flight: int | None = None,
    weights: Sequence[int] | None = None,
    unit: str = "task",
) -> None:
    """Run ``func(*task)`` for every task on the cluster; call ``on_result(i, result)`` in order.

    Tasks are submitted as a sliding window: task ``i + in_flight`` is submitted only
    once task ``i`` has been handed to ``on_result``, so at most ``in_flight`` results
    exist at any time (running, waiting on a worker, or buffered here until the tasks
    before them end), whatever the number of tasks. Tasks are retried
    :data:`TASK_RETRIES` times after an error, and rescheduled by Dask when a worker
    dies; a task that still fails aborts the run with its error. The progress bar
    advances as tasks end on the cluster.

    Parameters
    ----------
    client
        A ``distributed.Client``.
    func
        Task function, importable on the workers.
    tasks
        Arguments of each task.
    on_result
        Called in the calling thread with ``(i, result)`` for ``i = 0, 1, ...``.
    desc
        Name of the job, for the progress bar and error messages.
    quiet
        No progress bar.
    in_flight
        Most tasks submitted and not yet handed over (default: twice the cluster's
        threads, so every worker has a task queued behind the one it runs).
    weights
        Progress units of each task (default 1), e.g. the tiles of a block.
    unit
        Name of the progress unit.
    """
    distributed = _import_distributed()
    n = len(tasks)
    limit = max(1, in_flight if in_flight is not None else 2 * total_threads(client))
    if weights is not None and len(weights) != n:
        raise ValueError(f"weights: {len(weights)} values for {n} tasks")
    pending: dict[str, int] = {}
    futures: dict[int, Any] = {}
    done: dict[int, Any] = {}
    queue = distributed.as_completed()
    submitted = emitted = 0

    def fill() -> None:
        nonlocal submitted
        while submitted < n and submitted - emitted < limit:
            future = client.submit(func, *tasks[submitted], retries=TASK_RETRIES, pure=False)
            pending[future.key] = submitted
            futures[submitted] = future
            queue.add(future)
            submitted += 1

    total = n if weights is None else int(sum(weights))
    try:
        with progress_bar(total, desc, unit=unit, quiet=quiet) as bar:
            fill()
            for future in queue:
                i = pending.pop(future.key)
                done[i] = _task_result(future, i, desc)
                futures.pop(i).release()
                bar.update(1 if weights is None else weights[i])
                while emitted in done:
                    on_result(emitted, done.pop(emitted))
                    emitted += 1
                fill()
    finally:
        for future in futures.values():
            future.cancel()
    logger.debug("%s: %d tasks done in order on %s", desc, n, client)
