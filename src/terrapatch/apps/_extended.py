"""OTB extended file names: ``out.tif?&box=...&gdal:co:KEY=VALUE&gdal:of:COG``.

The facade reads them from output parameters and passes the plain options (box,
creation options, output format) to the core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from terrapatch.errors import InputError

__all__ = ["ExtendedFilename", "parse_extended_filename", "split_extended_path"]


@dataclass(frozen=True)
class ExtendedFilename:
    """Options parsed from an OTB extended file name (``box=...&gdal:co:KEY=VALUE``).

    Attributes
    ----------
    box
        ``(startx, starty, sizex, sizey)`` in output-grid pixels, or None.
    creation_options
        GDAL creation options from ``gdal:co:KEY=VALUE`` entries (keys upper-cased).
    driver
        Output format from a ``gdal:of:NAME`` entry (upper-cased, e.g. ``COG``), or None.
    """

    box: tuple[int, int, int, int] | None = None
    creation_options: dict[str, str] = field(default_factory=dict)
    driver: str | None = None


def split_extended_path(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Split ``"out.tif?&box=0:0:10:10"`` into ``(Path("out.tif"), "box=0:0:10:10")``."""
    text = os.fspath(path)
    if "?" not in text:
        return Path(text), ""
    base, _, ext = text.partition("?")
    return Path(base), ext.lstrip("&")


def parse_extended_filename(text: str | None, parameter: str = "ext_fname") -> ExtendedFilename:
    """Parse an OTB extended file name string such as ``"box=0:0:64:64&gdal:co:COMPRESS=LZW"``.

    Keys other than ``box``, ``gdal:co:*`` and ``gdal:of:NAME`` (output format, e.g.
    ``gdal:of:COG``) are rejected with an error naming them, except OTB streaming hints
    (``streaming:*``), which are accepted and ignored.
    """
    box = None
    driver: str | None = None
    options: dict[str, str] = {}
    if not text:
        return ExtendedFilename()
    for item in text.strip().lstrip("?").split("&"):
        item = item.strip()
        if not item:
            continue
        if item.lower().startswith("gdal:of:"):
            driver = item[len("gdal:of:"):].strip().upper()
            if not driver:
                raise InputError(f"{parameter}: entry {item!r} names no output format")
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"{parameter}: entry {item!r} is not of the form key=value")
        low = key.strip().lower()
        if low == "box":
            parts = value.split(":")
            try:
                numbers = tuple(int(p) for p in parts)
            except ValueError:
                numbers = ()
            if len(numbers) != 4 or numbers[2] <= 0 or numbers[3] <= 0:
                raise InputError(
                    f"{parameter}: box={value!r} must be startx:starty:sizex:sizey "
                    "with integer start and positive sizes"
                )
            box = (numbers[0], numbers[1], numbers[2], numbers[3])
        elif low.startswith("gdal:co:"):
            options[key.strip()[len("gdal:co:"):].upper()] = value.strip()
        elif low.startswith("streaming:"):
            continue
        else:
            raise InputError(
                f"{parameter}: unsupported extended file name key {key!r} "
                "(supported: box, gdal:co:KEY, gdal:of:NAME, streaming:*)"
            )
    return ExtendedFilename(box=box, creation_options=options, driver=driver)
