"""Fault injection for cluster tests: tasks that kill their worker, fail, or take their time.

Everything here is importable on Dask workers (it lives in the installed package,
not in ``tests/``): plain task functions for :mod:`terrapatch.cluster`, and
:class:`~terrapatch.serve.TileRunner` subclasses that make one tile of a serving
run kill its worker or fail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.serve import Tile, TileRunner


def die_once(marker: str, value: int) -> int:
    """Kill the worker process the first time any task runs (per ``marker``), else return value.

    The marker file is created just before the worker exits, so the rescheduled task
    (on a fresh or another worker) succeeds.
    """
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(1)
    return value * 10


def die_always(value: int) -> int:
    """Kill the worker process every time (a task no retry can save)."""
    os._exit(1)


def always_fail(value: int) -> int:
    """A task that always raises."""
    raise RuntimeError(f"injected failure for {value}")


def slow_value(value: int, seconds: float) -> int:
    """Sleep ``seconds``, then return ``value`` (tasks that end out of order)."""
    time.sleep(seconds)
    return value


class DieOnceRunner(TileRunner):
    """A tile runner whose worker process dies the first time it computes tile ``at``.

    Parameters
    ----------
    runner
        The runner to copy (a job's :attr:`~terrapatch.serve.ServeJob.runner`).
    marker
        File created just before the first death (see :func:`die_once`); later runs
        of tile ``at`` compute it normally.
    at
        Index of the tile whose first computation kills the worker.
    """

    def __init__(self, runner: TileRunner, marker: str | os.PathLike[str], at: int = 0) -> None:
        self.__setstate__(runner.__getstate__())
        self.marker = os.fspath(marker)
        self.at = int(at)

    def infer(self, engine: Any, tile: Tile, feed: Mapping[str, np.ndarray],
              stats: Any = None) -> np.ndarray:
        """Kill this process on the first run of tile ``at``; else compute the tile."""
        if tile.index == self.at:
            die_once(self.marker, 0)
        return super().infer(engine, tile, feed, stats)


class FailingRunner(TileRunner):
    """A tile runner that always raises on tile ``at`` (an unrecoverable task failure).

    Parameters
    ----------
    runner
        The runner to copy.
    at
        Index of the tile that fails.
    """

    def __init__(self, runner: TileRunner, at: int = 0) -> None:
        self.__setstate__(runner.__getstate__())
        self.at = int(at)

    def infer(self, engine: Any, tile: Tile, feed: Mapping[str, np.ndarray],
              stats: Any = None) -> np.ndarray:
        """Raise on tile ``at``; else compute the tile."""
        if tile.index == self.at:
            raise RuntimeError(f"injected failure on tile {self.at}")
        return super().infer(engine, tile, feed, stats)
