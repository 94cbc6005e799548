"""Geometry contract: grids, point → pixel, the sampling grid G, per-source windows, output grid.

This module is the single source of truth for every window terrapatch reads.
Extraction, patch-based serving and fully-convolutional serving all call it;
none of them computes a window on its own (docs/geometry.md). Scales (``k`` or
``1/k``) are parsed in :mod:`terrapatch.scales`; the served box is cut into tiles and
blocks in :mod:`terrapatch.tiling`.

Vocabulary
----------
Source ``i`` is a north-up raster grid with outer corner ``(L_i, T_i)``, pixel
spacing ``s_i`` and a receptive field (patch size) ``rf_i`` in its own pixels.
Source 1 (index 0) is the reference.

The *sampling grid* G has spacing ``f · s_1`` (``f`` = ``factor``: ``spcscale``
when serving). ``f`` is a positive integer ``k`` (coarser output, G's lines are
source-1 grid lines every ``k`` pixels, shifted by ``offset`` source-1 pixels so that,
wherever the other sources' grids nest, G's lines are also theirs) or ``1/k``
(super-resolution: ``k × k`` cells nested in every source-1 pixel, G's lines on
source-1 grid lines every ``k`` cells). A *cell* of G is one output pixel when
serving and one sample when extracting (extraction takes integer factors only).

A *block* of ``e`` cells (``e`` the expression field: output pixels a model emits
per input window) spans ``E = e · f`` source-1 pixels from its first cell's corner
``ref``. Its window centre, in source-1 pixels, is::

    C = ref + g/2 · ((rf_1 // g) % 2) + (E - g) / 2,     g = max(f, 1)

For one cell with ``f ≥ 1`` this is the cell's corner when source 1's receptive
field spans an even number of cells, else its centre; with ``f = 1`` source 1's
window starts at ``ref - rf_1 // 2`` (OTBTF's rule, ``ref`` the cell's pixel). With
``f = 1/k`` a cell takes the window of the source-1 pixel that contains it, and a
block of ``e = k·m`` cells (a super-resolution model emitting ``k`` output pixels per
source-1 pixel) is centred on the ``m`` source-1 pixels it covers. Source 1's window
is the ``rf_1``-pixel window centred on C; every other source takes the
``rf_i``-pixel window centred on C::

    start_i = floor((C - L_i) / s_i - rf_i / 2 + 0.5)

All computations are done per axis; the y axis uses ``t = -y`` so that both
axes increase with the pixel index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window

from terrapatch.errors import CRSMismatchError, GeometryError, InputError
from terrapatch.scales import MAX_SCALE_DENOMINATOR, check_spcscale, scale_value

#: Tolerance, in pixels, under which a continuous index is snapped to the nearest integer
#: before taking its floor. Guards exact-boundary cases against float64 round-off.
SNAP_TOLERANCE = 1e-6
#: Output coverage: ``"inset"`` (OTBTF's: every receptive field inside every source) or
#: ``"full"`` (every pixel of source 1's extent; windows padded past the edges).
COVERAGES = ("inset", "full")


def floor_index(values: np.ndarray | float) -> np.ndarray:
    """Floor continuous pixel indices, snapping values within tolerance of an integer to it.

    A value that is an integer up to round-off (``2.9999999999``) is treated as that
    integer, so points lying exactly on a pixel boundary go to the pixel with the
    larger index, as in OTBTF (round half up on the centre-based index).
    """
    u = np.asarray(values, dtype=np.float64)
    nearest = np.rint(u)
    snapped = np.abs(u - nearest) <= SNAP_TOLERANCE
    return np.where(snapped, nearest, np.floor(u)).astype(np.int64)


def _is_integer(value: float) -> bool:
    return abs(value - round(value)) <= SNAP_TOLERANCE


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: ``coordinate = origin + index * spacing`` (spacing > 0)."""

    origin: float
    spacing: float
    size: int


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid: affine transform, size and CRS.

    Parameters
    ----------
    transform
        GDAL-style affine transform; must be north-up (no rotation, x spacing > 0,
        y spacing < 0).
    width, height
        Size in pixels.
    crs
        Coordinate reference system (rasterio ``CRS``) or None.
    name
        Label used in error messages: the source identifier, then the path in
        parentheses (``"source1 (a.tif)"``); not part of equality.
    """

    transform: Affine
    width: int
    height: int
    crs: Any = None
    name: str = field(default="raster", compare=False)

    def __post_init__(self) -> None:
        t = self.transform
        if t.b != 0 or t.d != 0:
            raise GeometryError(
                f"{self.name}: rotated or skewed rasters are not supported "
                f"(transform terms b={t.b}, d={t.d}); warp it to a north-up grid first"
            )
        if not t.a > 0 or not t.e < 0:
            raise GeometryError(
                f"{self.name}: raster is not north-up (pixel size x={t.a}, y={t.e}); "
                "it needs a georeference with positive x and negative y spacing"
            )
        if self.width <= 0 or self.height <= 0:
            raise GeometryError(f"{self.name}: empty raster ({self.width}×{self.height})")

    @property
    def x0(self) -> float:
        """X of the outer left edge."""
        return float(self.transform.c)

    @property
    def y0(self) -> float:
        """Y of the outer top edge."""
        return float(self.transform.f)

    @property
    def spacing(self) -> tuple[float, float]:
        """Absolute pixel spacing ``(sx, sy)``."""
        return (float(self.transform.a), float(-self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)``."""
        sx, sy = self.spacing
        return (self.x0, self.y0 - self.height * sy, self.x0 + self.width * sx, self.y0)

    def axis(self, dim: int) -> Axis:
        """Axis 0 (x, columns) or 1 (y, rows; coordinate ``-y``)."""
        if dim == 0:
            return Axis(self.x0, self.spacing[0], self.width)
        return Axis(-self.y0, self.spacing[1], self.height)

    def pixel_of(
        self, x: np.ndarray | float, y: np.ndarray | float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(col, row)`` of the pixel containing each point (may be outside the grid)."""
        sx, sy = self.spacing
        cols = floor_index((np.asarray(x, dtype=np.float64) - self.x0) / sx)
        rows = floor_index((self.y0 - np.asarray(y, dtype=np.float64)) / sy)
        return cols, rows

    def xy_of(self, cols: np.ndarray | float, rows: np.ndarray | float,
              offset: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Return world ``(x, y)`` of pixel positions: the inverse of :meth:`pixel_of`.

        ``offset`` is the position inside the pixel, in pixels from its top-left
        corner: 0.5 (default) gives pixel centres, 0 corners. Fractional ``cols`` and
        ``rows`` are positions too. ``pixel_of(*xy_of(c, r))`` is ``(c, r)`` for every
        integer pixel and any ``0 ≤ offset < 1``.
        """
        sx, sy = self.spacing
        x = self.x0 + (np.asarray(cols, dtype=np.float64) + offset) * sx
        y = self.y0 - (np.asarray(rows, dtype=np.float64) + offset) * sy
        return x, y



def check_same_crs(grids: Sequence[Grid]) -> None:
    """Raise :class:`CRSMismatchError` unless all grids share one CRS (or all have none)."""
    first = grids[0]
    for other in grids[1:]:
        if (first.crs is None) != (other.crs is None) or (
            first.crs is not None and first.crs != other.crs
        ):
            raise CRSMismatchError(
                f"{other.name}: CRS {crs_label(other.crs)} differs from {first.name} CRS "
                f"{crs_label(first.crs)}; reproject the rasters to one CRS"
            )


def crs_label(crs: Any) -> str:
    """Short CRS name for messages: ``EPSG:32631``, the CRS string, or ``(none)``."""
    if crs is None:
        return "(none)"
    try:
        epsg = crs.to_epsg()
    except Exception:  # pragma: no cover - exotic CRS objects
        epsg = None
    return f"EPSG:{epsg}" if epsg else repr(crs.to_string())


def extraction_factor(grids: Sequence[Grid]) -> int:
    """Factor f of the extraction grid: coarsest spacing / source-1 spacing if integer, else 1."""
    s0x, s0y = grids[0].spacing
    coarse_x = max(g.spacing[0] for g in grids) / s0x
    coarse_y = max(g.spacing[1] for g in grids) / s0y
    if _is_integer(coarse_x) and _is_integer(coarse_y) and round(coarse_x) == round(coarse_y):
        return max(1, round(coarse_x))
    return 1


@dataclass(frozen=True)
class OutputGrid:
    """The cells of G that serving computes.

    Attributes
    ----------
    grid
        Georeferenced output grid (spacing ``f · s_1``, CRS of source 1).
    cell_origin
        G cell index ``(k, l)`` of output pixel ``(0, 0)``.
    """

    grid: Grid
    cell_origin: tuple[int, int]

    @property
    def width(self) -> int:
        """Output width in pixels."""
        return self.grid.width

    @property
    def height(self) -> int:
        """Output height in pixels."""
        return self.grid.height


@dataclass(frozen=True)
class Layout:
    """How N sources are sampled together on one grid G (docs/geometry.md).

    Parameters
    ----------
    grids
        One grid per source; source 1 first.
    fields
        Receptive field (patch size) ``(rx, ry)`` per source, in its own pixels.
    factor
        G spacing in source-1 pixels (``spcscale`` when serving): a positive integer
        ``k`` or ``1/k`` (a :class:`~fractions.Fraction`, or a float such as 0.25).
    efield
        Expression field ``(ex, ey)``: output pixels emitted per input window.
    factor_key
        Neutral identifier of ``factor`` in error messages (``spcscale`` when serving).
    """

    grids: tuple[Grid, ...]
    fields: tuple[tuple[int, int], ...]
    factor: int | Fraction = 1
    efield: tuple[int, int] = (1, 1)
    factor_key: str = field(default="factor", compare=False)
    coverage: str = "inset"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", tuple(self.grids))
        object.__setattr__(self, "fields", tuple((int(a), int(b)) for a, b in self.fields))
        if not self.grids:
            raise InputError("at least one source is required")
        if len(self.fields) != len(self.grids):
            raise InputError(
                f"{len(self.grids)} sources but {len(self.fields)} receptive fields given"
            )
        object.__setattr__(self, "factor", scale_value(check_spcscale(self.factor,
                                                                     self.factor_key)))
        for g, (rx, ry) in zip(self.grids, self.fields, strict=True):
            size = f"{source_of(g)}.patch_size"
            if rx < 1 or ry < 1:
                raise InputError(f"{size}: {rx}×{ry} must be ≥ 1")
            if rx > g.width or ry > g.height:
                raise InputError(f"{size}: {rx}×{ry} is larger than the image "
                                 f"({g.width}×{g.height} px)")
        ex, ey = self.efield
        if ex < 1 or ey < 1:
            raise InputError(f"efield: {ex}×{ey} must be ≥ 1")
        if self.coverage not in COVERAGES:
            raise InputError(f"coverage: {self.coverage!r} is not one of "
                             f"{', '.join(COVERAGES)}")
        check_same_crs(self.grids)

    # ------------------------------------------------------------------ per axis

    @cached_property
    def offset(self) -> tuple[int, int]:
        """Offset of G's lines from source-1 pixel 0, in source-1 pixels, per axis."""
        return (self._snap_offset(0), self._snap_offset(1))

    @property
    def subdivision(self) -> int:
        """Cells per source-1 pixel along each axis: ``k`` for ``f = 1/k``, else 1."""
        return Fraction(self.factor).denominator

    def _snap_offset(self, dim: int) -> int:
        f = self.factor
        ref = self.grids[0].axis(dim)
        best, best_score = 0, -1
        for o in range(max(1, math.floor(f))):
            score = 0
            for g in self.grids[1:]:
                ax = g.axis(dim)
                if not _is_integer(f * ref.spacing / ax.spacing):
                    continue
                if _is_integer((ref.origin + o * ref.spacing - ax.origin) / ax.spacing):
                    score += 1
            if score > best_score:
                best, best_score = o, score
        return best

    def _centre(self, cells: np.ndarray, dim: int) -> np.ndarray:
        """Window centre C, in source-1 index units, of blocks starting at G cell ``cells``.

        ``C = ref + g/2 · ((rf_1 // g) % 2) + (E - g) / 2`` with ``g = max(f, 1)`` and
        ``E = e · f`` (module docstring). With ``f = 1`` this is OTBTF's window
        ``[ref - rf_1 // 2, ref - rf_1 // 2 + rf_1)``; a block of ``e`` cells is
        centred on the mean of its cells' centres.
        """
        rf0 = self.fields[0][dim]
        e = self.efield[dim]
        f = self.factor
        g = max(f, 1)
        ref = self.offset[dim] + cells * float(f)
        return ref + float(Fraction(g, 2) * ((rf0 // g) % 2) + (e * Fraction(f) - g) / 2)

    def window_starts(self, cells: np.ndarray | int, dim: int, source: int) -> np.ndarray:
        """First pixel (col for dim 0, row for dim 1) of ``source``'s window for each block.

        ``cells`` are G cell indices of the first cell of each block (every cell when
        the expression field is 1).
        """
        centre = self._centre(np.asarray(cells, dtype=np.int64), dim)
        rf0 = self.fields[0][dim]
        first = floor_index(centre - rf0 / 2 + 0.5)
        if source == 0:
            return first
        # Other sources centre on source 1's window itself: where C is not its exact
        # centre (a block of e > 1 cells with an even field), they still cover its ground.
        centre = first + rf0 / 2
        rf = self.fields[source][dim]
        ref = self.grids[0].axis(dim)
        ax = self.grids[source].axis(dim)
        world = ref.origin + centre * ref.spacing
        return floor_index((world - ax.origin) / ax.spacing - rf / 2 + 0.5)

    def cells_of_points(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """G cell ``(k, l)`` containing each point."""
        ref = self.grids[0]
        sx, sy = ref.spacing
        ux = (np.asarray(x, dtype=np.float64) - ref.x0) / sx - self.offset[0]
        uy = (ref.y0 - np.asarray(y, dtype=np.float64)) / sy - self.offset[1]
        f = Fraction(self.factor)
        # floor(u / f) == floor(floor(u·q) / p) for f = p/q; snapping happens on u·q.
        return (np.floor_divide(floor_index(ux * f.denominator), f.numerator),
                np.floor_divide(floor_index(uy * f.denominator), f.numerator))

    def cell_transform(self) -> Affine:
        """Transform of G itself (cell ``(0, 0)`` at the top-left)."""
        ref = self.grids[0]
        sx, sy = ref.spacing
        f = float(self.factor)
        return Affine(f * sx, 0.0, ref.x0 + self.offset[0] * sx,
                      0.0, -f * sy, ref.y0 - self.offset[1] * sy)

    # ------------------------------------------------------------------ extraction

    def sample_windows(self, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Window start ``(cols, rows)`` of every source for the cells containing the points."""
        k, l_ = self.cells_of_points(x, y)
        return [(self.window_starts(k, 0, i), self.window_starts(l_, 1, i))
                for i in range(len(self.grids))]

    def inside(self, source: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether windows starting at ``(cols, rows)`` lie fully inside ``source``."""
        g = self.grids[source]
        rx, ry = self.fields[source]
        return (cols >= 0) & (rows >= 0) & (cols + rx <= g.width) & (rows + ry <= g.height)

    # ------------------------------------------------------------------ serving

    def _valid_cells(self, dim: int) -> tuple[int, int, int]:
        """First cell, number of output cells and of computed cells along ``dim``.

        Inset coverage: the cells whose windows lie inside every source, a multiple
        of e (both counts are equal). Full coverage: every cell inside source 1; the
        computed cells round that up to a multiple of e (windows read past the
        edges are padded). With ``f = 1/k`` the first cell is on a source-1 grid line
        (a multiple of ``k``), so that blocks of ``k·m`` cells cover whole pixels.
        """
        f = Fraction(self.factor)
        e = self.efield[dim]
        ref = self.grids[0].axis(dim)
        if self.coverage == "full":
            count = math.floor((ref.size - self.offset[dim]) / f)
            if count < 1:
                raise GeometryError(f"{self.grids[0].name}: smaller than one output pixel of "
                                    f"{f} source pixels")
            return 0, count, -(-count // e) * e
        lo = math.floor((-self.fields[0][dim] - self.offset[dim]) / f) - e - 2
        hi = math.floor((ref.size - self.offset[dim]) / f) + 2
        cells = np.arange(lo, hi + 1, dtype=np.int64)
        ok = np.ones(cells.shape, dtype=bool)
        for i, g in enumerate(self.grids):
            starts = self.window_starts(cells, dim, i)
            size = g.axis(dim).size
            ok &= (starts >= 0) & (starts + self.fields[i][dim] <= size)
        valid = cells[ok]
        on_lines = valid[valid % self.subdivision == 0]
        if e > 1 and len(self.grids) > 1 and on_lines.size > 1:
            # Blocks of e cells start where most sources have a grid line, so that a
            # block spans whole pixels of every nested source.
            candidates = on_lines[:MAX_SCALE_DENOMINATOR * self.subdivision]
            on_lines = on_lines[int(np.argmax(self._lines_through(candidates, dim))):]
        if not on_lines.size:
            names = ", ".join(g.name for g in self.grids)
            axis = "x" if dim == 0 else "y"
            raise GeometryError(
                f"no output pixel has its full receptive field inside every source along {axis} "
                f"({names}): the sources do not overlap enough for the receptive fields "
                f"{[fld[dim] for fld in self.fields]}"
            )
        first, last = int(on_lines[0]), int(valid[-1])
        n_blocks = (last - first) // e + 1
        return first, n_blocks * e, n_blocks * e

    def _lines_through(self, cells: np.ndarray, dim: int) -> np.ndarray:
        """How many of the other sources have a grid line at the corner of each cell."""
        ref = self.grids[0].axis(dim)
        world = ref.origin + (self.offset[dim] + cells * float(self.factor)) * ref.spacing
        count = np.zeros(cells.shape, dtype=np.int64)
        for g in self.grids[1:]:
            ax = g.axis(dim)
            u = (world - ax.origin) / ax.spacing
            count += np.abs(u - np.rint(u)) <= SNAP_TOLERANCE
        return count

    @cached_property
    def _cells(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        return self._valid_cells(0), self._valid_cells(1)

    @cached_property
    def output_grid(self) -> OutputGrid:
        """The output grid: the cells of G served (see :attr:`coverage`).

        Inset coverage: cells whose windows lie inside every source; full coverage:
        every cell of G inside source 1.
        """
        (k0, nx, _), (l0, ny, _) = self._cells
        g = self.cell_transform() @ Affine.translation(k0, l0)
        ref = self.grids[0]
        return OutputGrid(Grid(g, nx, ny, ref.crs, "output"), (k0, l0))

    @property
    def computed_size(self) -> tuple[int, int]:
        """Output pixels that tiles may compute: ``(width, height)``.

        The grid, rounded up to the expression field under full coverage (the extra
        pixels are computed, never written).
        """
        (_, _, cx), (_, _, cy) = self._cells
        return cx, cy

    def check_tile(self, col_off: int, row_off: int, width: int, height: int) -> None:
        """Raise unless the tile is computable and aligned on the expression field."""
        cw, ch = self.computed_size
        ex, ey = self.efield
        if (col_off < 0 or row_off < 0 or width < 1 or height < 1
                or col_off + width > cw or row_off + height > ch):
            raise GeometryError(
                f"tile ({col_off}, {row_off}, {width}, {height}) is outside the output grid "
                f"({cw}×{ch})"
            )
        if col_off % ex or row_off % ey or width % ex or height % ey:
            raise GeometryError(
                f"tile ({col_off}, {row_off}, {width}, {height}) is not aligned on the "
                f"expression field {ex}×{ey}"
            )

    def tile_starts(
        self, col_off: int, row_off: int, width: int, height: int, source: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Window starts ``(cols, rows)`` of ``source`` for every block of an output tile.

        With an expression field of 1 there is one window per output pixel: ``cols`` has
        ``width`` entries and ``rows`` ``height`` entries.
        """
        self.check_tile(col_off, row_off, width, height)
        k0, l0 = self.output_grid.cell_origin
        ex, ey = self.efield
        ks = k0 + col_off + np.arange(0, width, ex, dtype=np.int64)
        ls = l0 + row_off + np.arange(0, height, ey, dtype=np.int64)
        return self.window_starts(ks, 0, source), self.window_starts(ls, 1, source)

    def tile_regions(self, col_off: int, row_off: int, width: int, height: int) -> list[Window]:
        """Input region of every source for an output tile: the union of its blocks' windows.

        This is what fully-convolutional serving reads; patch-based serving reads the
        same region and cuts one window per output pixel from it.
        """
        regions = []
        for i in range(len(self.grids)):
            cols, rows = self.tile_starts(col_off, row_off, width, height, i)
            rx, ry = self.fields[i]
            c0, r0 = int(cols[0]), int(rows[0])
            regions.append(Window(c0, r0, int(cols[-1]) + rx - c0, int(rows[-1]) + ry - r0))
        return regions

    def cell_centres(self, cells_x: np.ndarray, cells_y: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """World ``(x, y)`` of G cell centres ``(k, l)``: inverse of :meth:`cells_of_points`."""
        t = self.cell_transform()
        k = np.asarray(cells_x, dtype=np.float64) + 0.5
        l_ = np.asarray(cells_y, dtype=np.float64) + 0.5
        return t.c + k * t.a, t.f + l_ * t.e




def spacing_ratios(grids: Sequence[Grid], spacing: tuple[float, float]
                   ) -> list[tuple[int, int]] | None:
    """Pixels of each grid per ``spacing`` (per axis), when all are integers ≥ 1.

    ``spacing`` is an output spacing, e.g. ``spcscale · s_1``; the ratios are
    ``spacing / s_i`` with the module's one integrality tolerance. None when any
    ratio is not an integer ≥ 1.
    """
    out: list[tuple[int, int]] = []
    for g in grids:
        pair = []
        for dim in (0, 1):
            ratio = spacing[dim] / g.spacing[dim]
            if not _is_integer(ratio) or round(ratio) < 1:
                return None
            pair.append(round(ratio))
        out.append((pair[0], pair[1]))
    return out


def misalignments(grids: Sequence[Grid]) -> list[str]:
    """One line per source whose grid is offset from source 1's by a fraction of a pixel.

    Per axis, the offset is that of the source's origin from the nearest line of the
    finer of the two grids; where it is not a whole pixel (beyond the module's
    tolerance) the grids do not nest, so no window of that source can cover exactly a
    window of source 1: each source's window is still centred on the sample, to the
    nearest pixel (:meth:`Layout.window_starts`). Empty when every grid nests.
    """
    ref = grids[0]
    units = getattr(ref.crs, "linear_units", "") or ""
    unit = " m" if units.lower() in ("metre", "meter", "metres", "meters") else " map units"
    lines = []
    for g in grids[1:]:
        offsets = []
        for dim, axis in ((0, "x"), (1, "y")):
            fine = min(ref.axis(dim).spacing, g.axis(dim).spacing)
            steps = (g.axis(dim).origin - ref.axis(dim).origin) / fine
            fraction = abs(steps - round(steps))
            if fraction > SNAP_TOLERANCE:
                offsets.append(f"{fraction:.3g} px ({fraction * fine:g}{unit}) in {axis}")
        if offsets:
            lines.append(
                f"{source_of(g)}: its grid is offset from "
                f"{source_of(ref)}'s by {' and '.join(offsets)}, so the two do not "
                "nest; terrapatch centres its windows on each sample to the nearest pixel "
                f"(up to {max(g.spacing) / 2:g}{unit} off); resample it onto a grid nested "
                "with source 1's for exact co-registration"
            )
    return lines


@dataclass(frozen=True)
class ServingSteps:
    """The serving unit: the shortest run of output pixels spanning whole source pixels.

    A fully-convolutional model shifted by one unit sees every source shifted by a
    whole number of its pixels, so its output shifts by whole output pixels.

    Attributes
    ----------
    sources
        Pixels of each source per unit, per axis ``(dx, dy)``.
    outputs
        Output pixels per unit, per axis ``(qx, qy)``: 1 unless the output is finer
        than some source (super-resolution, or a 10 m output over a 20 m source).
    """

    sources: tuple[tuple[int, int], ...]
    outputs: tuple[int, int] = (1, 1)

    def input_per_output(self, source: int, dim: int) -> Fraction:
        """Pixels of ``source`` per output pixel along ``dim``."""
        return Fraction(self.sources[source][dim], self.outputs[dim])


def _unit(grids: Sequence[Grid], spacing: float, dim: int) -> tuple[list[int], int] | None:
    """Source pixels and output pixels per unit along ``dim``, or None past the search."""
    for q in range(1, MAX_SCALE_DENOMINATOR + 1):
        ratios = [q * spacing / g.spacing[dim] for g in grids]
        if all(_is_integer(r) and round(r) >= 1 for r in ratios):
            return [round(r) for r in ratios], q
    return None


def serving_steps(grids: Sequence[Grid], spcscale: int | float | Fraction, fullyconv: bool
                  ) -> ServingSteps | None:
    """The serving unit of ``grids`` at ``spcscale`` (see :class:`ServingSteps`).

    Fully-convolutional: the shortest run of output pixels (spacing ``spcscale · s_1``)
    that spans a whole number of every source's pixels. Patch-based models see only
    patches, so their own scale is used when that unit is not one output pixel:
    coarsest spacing / ``s_i``. None when no unit of at most
    :data:`MAX_SCALE_DENOMINATOR` output pixels exists.
    """
    s1 = grids[0].spacing
    f = float(spcscale)
    if not fullyconv:
        found = spacing_ratios(grids, (f * s1[0], f * s1[1]))
        if found is None:
            coarse = (max(g.spacing[0] for g in grids), max(g.spacing[1] for g in grids))
            found = spacing_ratios(grids, coarse)
        return None if found is None else ServingSteps(tuple(found))
    along_x, along_y = _unit(grids, f * s1[0], 0), _unit(grids, f * s1[1], 1)
    if along_x is None or along_y is None:
        return None
    (dx, qx), (dy, qy) = along_x, along_y
    return ServingSteps(tuple(zip(dx, dy, strict=True)), (qx, qy))


def source_of(grid: Grid) -> str:
    """The identifier of the source a grid belongs to: its name without the path."""
    return grid.name.split(" (")[0]


def spcscale_hint(grids: Sequence[Grid]) -> str:
    """A sentence proposing an output scale on which every source spacing divides."""
    coarse = max(g.spacing[0] for g in grids) / grids[0].spacing[0]
    if _is_integer(coarse) and round(coarse) > 1:
        return f"try spcscale={round(coarse)}"
    return "give spcscale so that every source spacing divides the output spacing"
