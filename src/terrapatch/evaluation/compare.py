"""Reading a map and its reference, strip by strip, and counting their label pairs.

A reference raster on a grid nested with the map's is read at the pixel holding each
map pixel centre; reference polygons and points are rasterised on the map grid
(pixel-centre rule). Memory is bounded by :data:`STRIP_PIXELS`. Errors name the
inputs as :func:`~terrapatch.evaluation.confusion_matrix` does: ``map_path``,
``reference``, ``field``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import rasterio
import shapely
from affine import Affine
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.transform import xy
from rasterio.windows import Window

from terrapatch.errors import (
    CRSMismatchError,
    GeometryError,
    InputError,
    MissingInputError,
    NoSamplesError,
)
from terrapatch.evaluation.matrix import MAX_CLASSES, ConfusionMatrix, _count_pairs, _integer_values
from terrapatch.geometry import SNAP_TOLERANCE, Grid, check_same_crs, crs_label
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import is_remote, nodata_mask
from terrapatch.vector import read_layers
from terrapatch.writer import failure_reason

PathLike = str | os.PathLike[str]

#: Map pixels read per strip (with the reference pixels they are compared with).
STRIP_PIXELS = 1 << 22
#: Geometry type ids (shapely) a vector reference may hold: points and polygons.
_REFERENCE_GEOMETRIES = (0, 3, 4, 6)


# ================================================================ inputs


@dataclass(frozen=True)
class _Raster:
    """A raster input: its grid, band count, band-1 type and nodata tag."""

    path: str
    grid: Grid
    count: int
    dtype: np.dtype[Any]
    nodata: float | None
    block_rows: int
    name: str


def _open_raster(path: PathLike, name: str, hint: str = "") -> _Raster:
    text = os.fspath(path)
    if not is_remote(text) and not Path(text).exists():
        raise MissingInputError(f"{name}: file {text!r} does not exist")
    try:
        with rasterio.open(text) as ds:
            transform, width, height, crs = ds.transform, ds.width, ds.height, ds.crs
            count, dtype, nodata = ds.count, np.dtype(ds.dtypes[0]), ds.nodata
            block_rows = int(ds.block_shapes[0][0]) if ds.block_shapes else 1
    except RasterioIOError as exc:
        raise InputError(f"{name}: {text!r} is not a readable raster "
                         f"({failure_reason(exc)}){hint}") from None
    if transform.is_identity and crs is None:
        raise GeometryError(f"{name}: {text!r} has no georeference; terrapatch needs "
                            "north-up georeferenced rasters")
    if count > 1:
        logger.warning("%s: %s has %d bands; band 1 holds the labels compared", name, text,
                       count)
    grid = Grid(transform, width, height, crs, name)
    return _Raster(text, grid, count, dtype, None if nodata is None else float(nodata),
                   max(1, block_rows), name)


def _read(ds: Any, raster: _Raster, window: Window) -> np.ndarray:
    try:
        return np.asarray(ds.read(1, window=window))
    except (RasterioError, OSError) as exc:
        raise InputError(f"{raster.name}: cannot read {raster.path!r} "
                         f"({failure_reason(exc)}); is the file complete?") from None


def _valid(values: np.ndarray, raster: _Raster, label: float | None) -> np.ndarray:
    """Pixels holding a label: not the file's nodata tag, nor the no-data ``label``."""
    valid = np.ones(values.shape, dtype=bool)
    for nodata in (raster.nodata, label):
        if nodata is not None:
            valid &= ~nodata_mask(values, float(nodata))
    return valid


def _strips(row0: int, row1: int, width: int, block_rows: int, cost: int = 1
            ) -> list[tuple[int, int]]:
    """``(r0, r1)`` strips of rows within :data:`STRIP_PIXELS` (``cost`` pixels each)."""
    rows = max(1, STRIP_PIXELS // max(1, width * cost))
    if rows > block_rows:
        rows -= rows % block_rows
    return [(r, min(row1, r + rows)) for r in range(row0, row1, rows)]


def _nested_index(map_grid: Grid, ref_grid: Grid, name: str, map_name: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Reference column of every map column and reference row of every map row.

    Each map pixel centre goes to the reference pixel containing it; raises unless the
    grids nest (per axis: one spacing an integer multiple of the other, pixel edges of
    the coarser on edges of the finer).
    """
    problems = []
    for dim, axis in ((0, "x"), (1, "y")):
        m, r = map_grid.axis(dim), ref_grid.axis(dim)
        fine, coarse = min(m.spacing, r.spacing), max(m.spacing, r.spacing)
        ratio = coarse / fine
        steps = (r.origin - m.origin) / fine
        if abs(ratio - round(ratio)) > SNAP_TOLERANCE:
            problems.append(f"pixel size {r.spacing:g} vs {m.spacing:g} in {axis} is not an "
                            "integer ratio")
        elif abs(steps - round(steps)) > SNAP_TOLERANCE:
            problems.append(f"origins {abs(steps - round(steps)):.3g} pixel "
                            f"({abs(steps - round(steps)) * fine:g} units) apart in {axis}")
    if problems:
        def shown(g: Grid) -> str:
            return (f"pixel {g.spacing[0]:g} × {g.spacing[1]:g}, origin "
                    f"({g.x0:g}, {g.y0:g})")

        raise GeometryError(
            f"{name}: its grid ({shown(ref_grid)}) does not nest with the grid of "
            f"{map_name} ({shown(map_grid)}): {'; '.join(problems)}; resample the reference "
            "onto a nested grid (nearest neighbour)"
        )
    cols, rows = np.arange(map_grid.width), np.arange(map_grid.height)
    xs, _ = xy(map_grid.transform, np.zeros_like(cols), cols, offset="center")
    _, ys = xy(map_grid.transform, rows, np.zeros_like(rows), offset="center")
    ref_cols, _ = ref_grid.pixel_of(np.asarray(xs, dtype=np.float64), 0.0)
    _, ref_rows = ref_grid.pixel_of(0.0, np.asarray(ys, dtype=np.float64))
    return np.asarray(ref_cols), np.asarray(ref_rows)


def _span(index: np.ndarray, size: int, lo: int, hi: int) -> tuple[int, int]:
    """First and past-last position in ``[lo, hi)`` whose ``index`` lies in ``[0, size)``."""
    inside = np.flatnonzero((index[lo:hi] >= 0) & (index[lo:hi] < size))
    if not len(inside):
        return 0, 0
    return lo + int(inside[0]), lo + int(inside[-1]) + 1


def _bounds(bounds: tuple[float, float, float, float]) -> str:
    return ", ".join(f"{v:g}" for v in bounds)


def _check_crs(map_raster: _Raster, ref: _Raster) -> None:
    a, b = map_raster.grid, ref.grid
    same_grid = (a.width, a.height) == (b.width, b.height) and \
        a.transform.almost_equals(b.transform)
    if same_grid and a.crs != b.crs:
        logger.warning("%s: %s has the grid of %s but a different CRS tag (%s vs %s); "
                       "compared as on the same grid", ref.name, ref.path, map_raster.path,
                       crs_label(b.crs), crs_label(a.crs))
        return
    check_same_crs([a, b])


@dataclass
class _Tally:
    """Counts accumulated over the strips."""

    matrix: ConfusionMatrix
    covered: int = 0

    def add(self, reference: np.ndarray, produced: np.ndarray, map_path: str,
            reference_what: str) -> None:
        """Count the pairs of one strip's compared pixels."""
        r = _integer_values(reference, "reference", reference_what)
        p = _integer_values(produced, "map_path", repr(map_path))
        labels, counts = _count_pairs(r, p, "map_path")
        if len(labels):
            self.matrix = self.matrix + ConfusionMatrix(labels, counts)
            if len(self.matrix.labels) > MAX_CLASSES:
                raise InputError(f"map_path: more than {MAX_CLASSES} distinct labels; a "
                                 "class map holds fewer classes (is it a class map?)")


def _compare_rasters(map_raster: _Raster, ref: _Raster, region: tuple[int, int, int, int],
                     map_nodata: float | None, reference_nodata: float | None,
                     quiet: bool) -> _Tally:
    _check_crs(map_raster, ref)
    ref_cols, ref_rows = _nested_index(map_raster.grid, ref.grid, ref.name, map_raster.name)
    bx, by, bw, bh = region
    c0, c1 = _span(ref_cols, ref.grid.width, bx, bx + bw)
    r0, r1 = _span(ref_rows, ref.grid.height, by, by + bh)
    if c1 <= c0 or r1 <= r0:
        within = "" if (bw, bh) == (map_raster.grid.width, map_raster.grid.height) else \
            ", within the box"
        raise GeometryError(
            f"{ref.name}: {ref.path!r} (bounds {_bounds(ref.grid.bounds)}) does not overlap "
            f"{map_raster.name} {map_raster.path!r} (bounds "
            f"{_bounds(map_raster.grid.bounds)}{within})"
        )
    mx, my = map_raster.grid.spacing
    rx, ry = ref.grid.spacing
    cost = 1 + max(1, round(mx / rx)) * max(1, round(my / ry))
    tally = _Tally(ConfusionMatrix(np.empty(0, np.int64), np.zeros((0, 0), np.int64)))
    plan = _strips(r0, r1, c1 - c0, map_raster.block_rows, cost)
    cols = ref_cols[c0:c1]
    with rasterio.open(map_raster.path) as mds, rasterio.open(ref.path) as rds, \
            progress_bar(len(plan), "comparing", unit="strip", quiet=quiet) as bar:
        for s0, s1 in plan:
            produced = _read(mds, map_raster, Window(c0, s0, c1 - c0, s1 - s0))
            rows = ref_rows[s0:s1]
            rr0, rc0 = int(rows[0]), int(cols[0])
            window = Window(rc0, rr0, int(cols[-1]) - rc0 + 1, int(rows[-1]) - rr0 + 1)
            reference = _read(rds, ref, window)[np.ix_(rows - rr0, cols - rc0)]
            ref_ok = _valid(reference, ref, reference_nodata)
            valid = ref_ok & _valid(produced, map_raster, map_nodata)
            tally.covered += int(ref_ok.sum())
            tally.add(reference[valid], produced[valid], map_raster.path, repr(ref.path))
            bar.update(1)
    return tally


@dataclass(frozen=True)
class _Features:
    geoms: np.ndarray
    classes: np.ndarray
    path: str


def _read_features(path: PathLike, field: str, map_raster: _Raster) -> _Features:
    """Points and polygons with an integer ``field``, from every layer holding it."""
    text = os.fspath(path)
    if not is_remote(text) and not Path(text).exists():
        raise MissingInputError(f"reference: file {text!r} does not exist")
    try:
        layers_info = [pyogrio.read_info(text, layer=str(layer))
                       for layer, _ in pyogrio.list_layers(text)]
    except Exception as exc:
        raise InputError(f"reference: {text!r} is not a readable vector file "
                         f"({failure_reason(exc)})") from None
    fields: list[str] = []
    for info in layers_info:
        for f, dtype in zip(info["fields"], info["dtypes"], strict=True):
            fields.extend([str(f)] if str(f) not in fields else [])
            kind = np.dtype(dtype).kind
            if str(f) == field and kind not in "iuf":
                shown = "string" if kind in "OSU" else str(dtype)
                raise InputError(f"field: field {field!r} of {text!r} holds {shown} "
                                 "values, not integer classes")
    if field not in fields:
        raise InputError(f"field: {field!r} is not a field of {text!r} "
                         f"(fields: {', '.join(fields) or 'none'})")
    layers, skipped = read_layers(text, field, _REFERENCE_GEOMETRIES, "a point or a polygon",
                                  "reference")
    geoms: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    crs = map_raster.grid.crs
    for layer in layers:
        if layer.crs is not None and crs is not None and layer.crs != crs:
            raise CRSMismatchError(
                f"reference: CRS {crs_label(layer.crs)} of layer {layer.name!r} in {text!r} "
                f"differs from {map_raster.name} CRS {crs_label(crs)}; reproject the vector "
                f"(e.g. ogr2ogr -t_srs {crs_label(crs)})"
            )
        if layer.crs is None and crs is not None and len(layer.geometries):
            logger.warning("reference: layer %r of %s has no CRS; assuming the map's",
                           layer.name, text)
        values = np.asarray(layer.values)
        if values.dtype.kind == "O":  # e.g. a shapefile integer column read with nulls
            values = values.astype(np.float64)
        classes.append(_integer_values(values, "field",
                                       f"field {field!r} of layer {layer.name!r} in {text!r}"))
        geoms.append(layer.geometries)
    if skipped:
        logger.info("reference: %d feature(s) without geometry or %r value skipped", skipped,
                    field)
    return _Features(np.concatenate(geoms), np.concatenate(classes), text)


def _compare_vector(map_raster: _Raster, features: _Features,
                    region: tuple[int, int, int, int], map_nodata: float | None,
                    reference_nodata: float | None, quiet: bool) -> _Tally:
    from rasterio.features import rasterize

    grid = map_raster.grid
    bx, by, bw, bh = region
    sy = grid.spacing[1]
    bounds = shapely.bounds(features.geoms)
    (left, right), (top, bottom) = xy(grid.transform, [by, by + bh], [bx, bx + bw],
                                      offset="ul")
    usable = np.isfinite(bounds).all(axis=1) & (bounds[:, 2] >= left) & \
        (bounds[:, 0] <= right) & (bounds[:, 3] >= bottom) & (bounds[:, 1] <= top)
    if not usable.any():
        extent = (float(np.nanmin(bounds[:, 0])), float(np.nanmin(bounds[:, 1])),
                  float(np.nanmax(bounds[:, 2])), float(np.nanmax(bounds[:, 3])))
        raise GeometryError(
            f"reference: no feature of {features.path!r} (bounds "
            f"{_bounds(extent)}) overlaps {map_raster.name} {map_raster.path!r} (bounds "
            f"{_bounds((left, bottom, right, top))})"
        )
    tally = _Tally(ConfusionMatrix(np.empty(0, np.int64), np.zeros((0, 0), np.int64)))
    plan = _strips(by, by + bh, bw, map_raster.block_rows, 2)
    lut = features.classes
    with rasterio.open(map_raster.path) as mds, \
            progress_bar(len(plan), "comparing", unit="strip", quiet=quiet) as bar:
        for s0, s1 in plan:
            strip_top, strip_bottom = top - (s0 - by) * sy, top - (s1 - by) * sy
            sel = np.flatnonzero(usable & (bounds[:, 3] >= strip_bottom) &
                                 (bounds[:, 1] <= strip_top))
            bar.update(1)
            if not len(sel):
                continue
            index = rasterize(((features.geoms[i], int(i)) for i in sel),
                              out_shape=(s1 - s0, bw),
                              transform=grid.transform @ Affine.translation(bx, s0),
                              fill=-1, dtype="int32", all_touched=False)
            ref_ok = index >= 0
            if not ref_ok.any():
                continue
            reference = np.where(ref_ok, lut[np.maximum(index, 0)], 0)
            if reference_nodata is not None:
                ref_ok &= ~nodata_mask(reference, float(reference_nodata))
            produced = _read(mds, map_raster, Window(bx, s0, bw, s1 - s0))
            valid = ref_ok & _valid(produced, map_raster, map_nodata)
            tally.covered += int(ref_ok.sum())
            tally.add(reference[valid], produced[valid], map_raster.path,
                      repr(features.path))
    if tally.covered == 0:
        raise NoSamplesError(f"reference: no feature of {features.path!r} covers a pixel "
                             f"centre of {map_raster.name} {map_raster.path!r}")
    return tally
