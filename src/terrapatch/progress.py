"""Progress reporting and logging shared by every long-running job.

Progress bars (tqdm) are shown only on an interactive terminal and never when
``quiet`` is set; counts and summaries go to the ``terrapatch`` logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("terrapatch")


def progress_bar(total: int | None, desc: str, unit: str = "it", quiet: bool = False,
                 **kwargs: Any) -> tqdm:
    """Return a tqdm bar, disabled when ``quiet`` or when stderr is not a terminal."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False,
                dynamic_ncols=True, **kwargs)


def configure_logging(quiet: bool = False, debug: bool = False) -> None:
    """Send terrapatch's log records to stderr (INFO, WARNING when quiet, DEBUG when debug)."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log to whatever ``sys.stderr`` is when a record is emitted (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass
