"""Dask clusters: connect to (or start) a scheduler, check workers' files, run tasks with retries.

terrapatch's long jobs (extraction, serving) are split into independent tasks:
this module ships them to a ``dask.distributed`` cluster and collects the
results in the order the caller needs, with progress from the scheduler.
Errors that a user can fix (unreachable scheduler, a worker missing a file)
become one-line input errors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from terrapatch.errors import InputError, TerrapatchError
from terrapatch.progress import logger, progress_bar

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
    """
    distributed = _import_distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if scheduler:
        try:
            client = distributed.Client(str(scheduler), timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"dask-scheduler: cannot reach the scheduler at {scheduler!r} ({exc})"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    if n < 1:
        raise InputError(f"workers: {workers!r} must be ≥ 1")
    with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def _missing_paths(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not p.startswith("/vsi") and not os.path.exists(p)]


def check_worker_paths(client: Any, paths: Iterable[str]) -> None:
    """Raise :class:`InputError` naming the worker and the path if a worker lacks a file."""
    wanted = sorted({os.path.abspath(os.fspath(p)) for p in paths})
    missing = client.run(_missing_paths, wanted)
    for worker, lost in sorted(missing.items()):
        if lost:
            raise InputError(
                f"worker {worker}: input file {lost[0]!r} does not exist there "
                "(the rasters and models must be visible to every worker at the same path)"
            )


def run_tasks(
    client: Any,
    func: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    on_result: Callable[[int, Any], None],
    desc: str,
    quiet: bool = False,
) -> None:
    """Run ``func(*task)`` for every task on the cluster; call ``on_result(i, result)`` as they end.

    Tasks are retried :data:`TASK_RETRIES` times after an error, and rescheduled by Dask
    when a worker dies. A task that still fails aborts the run with its error.
    """
    distributed = _import_distributed()
    futures = client.map(func, *zip(*tasks, strict=True), retries=TASK_RETRIES, pure=False) \
        if tasks else []
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        with progress_bar(len(futures), desc, unit="task", quiet=quiet) as bar:
            for future in distributed.as_completed(futures):
                try:
                    result = future.result()
                except TerrapatchError:
                    raise
                except Exception as exc:
                    raise TerrapatchError(
                        f"{desc}: task {index[future.key]} failed on the cluster after "
                        f"{TASK_RETRIES} retries: {type(exc).__name__}: {exc}"
                    ) from exc
                on_result(index[future.key], result)
                future.release()
                bar.update(1)
    finally:
        for future in futures:
            future.cancel()
    logger.debug("%s: %d tasks done on %s", desc, len(futures), client)
