"""Rasters of sample selection: sources named by their parameter, read by strips of rows.

What remains raster-specific once :mod:`terrapatch.raster` opens and checks the
files: errors name the selection's own parameter (``image``, ``mask``,
``label_image``…), the file's nodata is known, rasters given apart must share a
grid, reads go by strips of rows bounded by :data:`STRIP_BYTES`, and label rasters
become integer classes with one nodata / NaN rule.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from terrapatch.errors import GeometryError, InputError, TerrapatchError
from terrapatch.geometry import Grid, crs_label
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import PathLike, Source, nodata_mask
from terrapatch.sampling._ranks import Strip
from terrapatch.writer import failure_reason

#: Bytes of raster data and working arrays (all inputs together) per strip of rows when
#: streaming a raster.
STRIP_BYTES = 64 * 2**20

#: Working bytes per pixel of a class strip (label values, masks, sort keys and ranks).
CLASS_WORK_BYTES = 64


@dataclass(frozen=True)
class Raster:
    """A raster given to a selection parameter, opened and checked as a :class:`Source`.

    Attributes
    ----------
    source
        The source, named ``parameter`` (so its errors start with ``parameter:``).
    path
        The path as given, for messages.
    parameter
        The keyword of the selection function that took it (``image``, ``mask``,
        ``label_image``…).
    grid
        Its grid, named ``"<parameter> (<path>)"`` in errors.
    nodata
        The file's own nodata value, or None.
    """

    source: Source
    path: str
    parameter: str
    grid: Grid
    nodata: float | None

    @property
    def bands(self) -> int:
        """Number of bands."""
        return self.source.bands

    @property
    def dtype(self) -> np.dtype:
        """Common dtype of the bands."""
        return self.source.dtype

    def open(self) -> RasterReader:
        """A reader of windows; use as a context manager."""
        return RasterReader(self)


def open_raster(path: PathLike, parameter: str) -> Raster:
    """Open and check a raster given to ``parameter``; errors name that parameter.

    Raises
    ------
    MissingInputError, InputError, GeometryError
        As :class:`~terrapatch.raster.Source` does (missing, unreadable, not
        georeferenced), with ``parameter:`` first.
    """
    text = os.fspath(path)
    source = Source(text, name=parameter)
    grid = source.grid  # opens and checks the files
    with rasterio.open(source.paths[0]) as ds:  # Source does not keep the file's nodata
        nodata = ds.nodata
    return Raster(source, text, parameter, dataclasses.replace(grid, name=f"{parameter} ({text})"),
                  None if nodata is None else float(nodata))


class RasterReader:
    """Open handles on a :class:`Raster`; reads ``(bands, rows, cols)`` windows."""

    def __init__(self, raster: Raster) -> None:
        self.raster = raster
        self._reader = raster.source.open()

    def read(self, window: Window) -> np.ndarray:
        """Every band of ``window``; a damaged file is an :class:`InputError` naming it."""
        try:
            return self._reader.read(window)
        except TerrapatchError as exc:
            # SourceReader re-raises GDAL's error "from None": its context holds the reason.
            if isinstance(exc.__context__, RasterioError | OSError):
                raise self._damaged(exc.__context__) from None
            raise
        except (RasterioError, OSError) as exc:
            raise self._damaged(exc) from None

    def _damaged(self, exc: BaseException) -> InputError:
        return InputError(f"{self.raster.parameter}: cannot read {self.raster.path!r} "
                          f"({failure_reason(exc)}); is the file complete?")

    def band1(self, window: Window) -> np.ndarray:
        """Band 1 of ``window`` as ``(rows, cols)``."""
        return np.asarray(self.read(window)[0])

    def close(self) -> None:
        """Close the files."""
        self._reader.close()

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def check_same_grid(ref: Raster, other: Raster) -> None:
    """Raise :class:`GeometryError` unless ``other`` is on the grid of ``ref``.

    A different CRS tag on the same grid is only a warning.
    """
    a, b = ref.grid, other.grid
    if (a.width, a.height) != (b.width, b.height) or not a.transform.almost_equals(b.transform):
        raise GeometryError(
            f"{other.parameter}: {other.path!r} ({b.width}×{b.height}, origin {b.x0}, {b.y0}, "
            f"pixel {b.spacing}) is not on the grid of {ref.parameter}={ref.path!r} "
            f"({a.width}×{a.height}, origin {a.x0}, {a.y0}, pixel {a.spacing})"
        )
    if a.crs != b.crs:
        logger.warning("%s: %s has the grid of %s but a different CRS tag (%s vs %s); using "
                       "it as on the same grid", other.parameter, other.path, ref.path,
                       crs_label(b.crs), crs_label(a.crs))


# ---------------------------------------------------------------------------------- strips


def strip_window(row0: int, row1: int, width: int, col0: int = 0) -> Window:
    """The window of rows ``row0 .. row1 - 1`` and ``width`` columns from ``col0``."""
    return Window(col0, row0, width, row1 - row0)


def strip_plan(first_rows: np.ndarray, height: int, width: int,
               bytes_per_pixel: int) -> list[tuple[int, int]]:
    """Group consecutive windows (starting at ``first_rows``, ``height`` rows each) into strips.

    Returns ``(i0, i1)`` index ranges; each strip's rows span at most :data:`STRIP_BYTES`
    (but always at least one window).
    """
    budget_rows = max(height, STRIP_BYTES // max(1, width * bytes_per_pixel))
    plan = []
    i0 = 0
    for i in range(1, len(first_rows) + 1):
        if i == len(first_rows) or first_rows[i] + height - first_rows[i0] > budget_rows:
            plan.append((i0, i))
            i0 = i
    return plan


def row_strips(height: int, width: int, bytes_per_pixel: int) -> list[tuple[int, int]]:
    """``(row0, row1)`` strips covering ``height`` rows within :data:`STRIP_BYTES`."""
    rows = max(1, STRIP_BYTES // max(1, width * bytes_per_pixel))
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]


def pixel_valid(data: np.ndarray, nodata: float) -> np.ndarray:
    """OTBTF selection rule: a pixel is invalid only if all its bands equal ``nodata``."""
    return np.asarray(~np.logical_and.reduce(nodata_mask(data, nodata), axis=0), dtype=bool)


# ---------------------------------------------------------------------------------- labels


def integer_labels(values: np.ndarray, valid: np.ndarray, parameter: str) -> np.ndarray:
    """Label values as int64; non-integer or non-finite labelled values are an error."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    sel = values[valid]
    bad = ~np.isfinite(sel) | (sel != np.trunc(sel))
    if bad.any():
        raise InputError(f"{parameter}: label value {sel[bad][0]!r} is not an integer; "
                         "label rasters must hold integer class values (set its nodata?)")
    out = np.zeros(values.shape, dtype=np.int64)
    out[valid] = sel.astype(np.int64)
    return out


def read_labels(raw: np.ndarray, nodata: Iterable[float | None],
                parameter: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels and validity of label values: NaN and each ``nodata`` are unlabelled.

    Parameters
    ----------
    raw
        Label values as read.
    nodata
        Values marking unlabelled pixels (None entries are skipped).
    parameter
        Named in the error for a non-integer labelled value.

    Returns
    -------
    tuple of numpy.ndarray
        ``(labels, valid)``: int64 labels (0 where not valid) and the labelled pixels.
    """
    valid = np.ones(raw.shape, dtype=bool)
    for value in (*nodata, math.nan):  # NaN is never a label
        if value is not None:
            valid &= ~nodata_mask(raw, value)
    return integer_labels(raw, valid, parameter), valid


def label_strips(raster: Raster, pad: int, nodata: float | None,
                 quiet: bool) -> Iterator[Strip]:
    """Band 1 of a label raster inside a ``pad`` border, as class strips.

    Pixels equal to ``nodata`` or to the file's nodata, and NaN, are not valid.
    """
    grid = raster.grid
    width = grid.width - 2 * pad
    height = grid.height - 2 * pad
    plan = row_strips(height, width, raster.bands * raster.dtype.itemsize + CLASS_WORK_BYTES)
    with raster.open() as reader, \
            progress_bar(len(plan), "reading labels", unit="strip", quiet=quiet) as bar:
        for r0, r1 in plan:
            raw = reader.band1(strip_window(pad + r0, pad + r1, width, pad))
            labels, valid = read_labels(raw, (nodata, raster.nodata), raster.parameter)
            yield pad + r0, labels, valid, None
            bar.update(1)


def class_counts(strips: Iterable[Strip]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct valid class values of the strips and their pixel counts."""
    values: dict[int, int] = {}
    for _, vals, valid, _ in strips:
        u, c = np.unique(vals[valid], return_counts=True)
        for v, n in zip(u.tolist(), c.tolist(), strict=True):
            values[v] = values.get(v, 0) + n
    classes = np.array(sorted(values), dtype=np.int64)
    return classes, np.array([values[c] for c in classes.tolist()], dtype=np.int64)
