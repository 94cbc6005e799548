"""Fault injection for cluster tests: tasks that kill their worker, or always fail."""

from __future__ import annotations

import os
from pathlib import Path


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


def always_fail(value: int) -> int:
    """A task that always raises."""
    raise RuntimeError(f"injected failure for {value}")
