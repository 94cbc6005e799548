"""Polygon statistics and sampling: labelled polygons rasterised on a raster's grid.

:func:`polygon_class_statistics` counts the pixels of each class and polygon
(pixel-centre rule, later polygons on top);
:func:`sample_polygons` draws points per class inside the polygons, at most one per
pixel, through the rank-selection engine (:mod:`._ranks`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.geometry import crs_label
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import PathLike
from terrapatch.sampling._ranks import Strip, random_ranks, rank_selection
from terrapatch.sampling._rasters import (
    CLASS_WORK_BYTES,
    Raster,
    open_raster,
    pixel_valid,
    row_strips,
    strip_window,
)
from terrapatch.sampling.samples import PolygonSamples, PolygonStatistics, Samples
from terrapatch.vector import read_layers
from terrapatch.writer import Output, check_outputs

#: Polygon sampling strategies.
POLYGON_STRATEGIES = ("constant", "balanced", "all")

#: Random points inside a pixel keep at least this fraction of a pixel from its edges, so
#: the point → pixel rule (which snaps within 1e-6 pixel) maps them back to that pixel.
EDGE_MARGIN = 1e-3


@dataclass(frozen=True)
class _Polygons:
    geoms: np.ndarray
    classes: np.ndarray
    class_names: dict[int, str] | None
    class_field: str
    n_skipped: int
    layers: tuple[str, ...]


def _class_codes(values: list[Any], path: str, field_name: str
                 ) -> tuple[np.ndarray, dict[int, str] | None]:
    """Integer class codes for field values; strings become 0, 1, 2… in sorted name order."""
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64), None
    if all(isinstance(v, float | np.floating | int | np.integer) for v in values):
        arr = np.array(values, dtype=np.float64)
        bad = arr != np.trunc(arr)
        if bad.any():
            raise InputError(f"field: value {arr[bad][0]!r} of field {field_name!r} in {path!r} "
                             "is not an integer class")
        return arr.astype(np.int64), None
    texts = [str(v).strip() for v in values]
    try:
        return np.array([int(t) for t in texts], dtype=np.int64), None
    except ValueError:
        pass
    names = sorted(set(texts))
    code = {name: i for i, name in enumerate(names)}
    return np.array([code[t] for t in texts], dtype=np.int64), dict(enumerate(names))


def _read_polygons(path: PathLike, field_name: str, crs: CRS | None,
                   parameter: str = "polygons") -> _Polygons:
    """Read labelled polygons from every layer holding ``field_name``, in ``crs``."""
    text = os.fspath(path)
    layers, skipped = read_layers(text, field_name, (3, 6), "a polygon", parameter)
    geoms: list[np.ndarray] = []
    values: list[Any] = []
    for layer in layers:
        layer_geoms = layer.geometries
        if crs is not None and layer.crs is not None and layer.crs != crs and len(layer_geoms):
            from rasterio.warp import transform_geom

            mapped = transform_geom(layer.crs, crs, [shapely.geometry.mapping(g)
                                                     for g in layer_geoms])
            layer_geoms = np.array([shapely.geometry.shape(g) for g in mapped], dtype=object)
            logger.info("%s: layer %r reprojected from %s to the raster's CRS %s", parameter,
                        layer.name, crs_label(layer.crs), crs_label(crs))
        elif crs is not None and layer.crs is None:
            logger.warning("%s: layer %r has no CRS; assuming the raster's", parameter,
                           layer.name)
        geoms.append(layer_geoms)
        values.extend(layer.values.tolist())
    if not values:
        raise NoSamplesError(f"{parameter}: no polygon of {text!r} has a value in field "
                             f"{field_name!r}")
    classes, names = _class_codes(values, text, field_name)
    if names is not None:
        logger.info("%s: string field %r mapped to class codes %s", parameter, field_name,
                    ", ".join(f"{c}={n}" for c, n in names.items()))
    return _Polygons(np.concatenate(geoms), classes, names, field_name, skipped,
                     tuple(layer.name for layer in layers))


def _polygon_strips(info: Raster, polys: _Polygons, nodata: float | None,
                    quiet: bool) -> Iterator[Strip]:
    """Polygon index and class per pixel (pixel-centre rule, later polygons on top)."""
    from rasterio.features import rasterize

    grid = info.grid
    width, height = grid.width, grid.height
    left, _, right, _ = grid.bounds
    bounds = shapely.bounds(polys.geoms)
    usable = ~shapely.is_empty(polys.geoms) & np.isfinite(bounds).all(axis=1)
    in_x = usable & (bounds[:, 2] >= left) & (bounds[:, 0] <= right)
    per_pixel = 4 + CLASS_WORK_BYTES + (info.bands * info.dtype.itemsize if nodata is not None
                                        else 0)
    plan = row_strips(height, width, per_pixel)
    lut = polys.classes
    reader = info.open() if nodata is not None else None
    try:
        with progress_bar(len(plan), "rasterising", unit="strip", quiet=quiet) as bar:
            for r0, r1 in plan:
                (_, top), (_, bottom) = grid.xy_of(0, r0, offset=0), grid.xy_of(0, r1, offset=0)
                sel = np.flatnonzero(in_x & (bounds[:, 3] >= bottom) & (bounds[:, 1] <= top))
                if len(sel):
                    index = rasterize(
                        ((polys.geoms[i], int(i)) for i in sel), out_shape=(r1 - r0, width),
                        transform=grid.transform @ Affine.translation(0, r0), fill=-1,
                        dtype="int32", all_touched=False)
                else:
                    index = np.full((r1 - r0, width), -1, dtype=np.int32)
                valid = index >= 0
                if reader is not None and nodata is not None and valid.any():
                    valid &= pixel_valid(reader.read(strip_window(r0, r1, width)), nodata)
                yield r0, np.where(valid, lut[np.maximum(index, 0)], 0), valid, index
                bar.update(1)
    finally:
        if reader is not None:
            reader.close()


def _statistics(info: Raster, polys: _Polygons, nodata: float | None,
                quiet: bool) -> PolygonStatistics:
    per_polygon = np.zeros(len(polys.geoms), dtype=np.int64)
    for _, _, valid, index in _polygon_strips(info, polys, nodata, quiet):
        assert index is not None
        per_polygon += np.bincount(index[valid], minlength=len(per_polygon))
    per_class = {int(c): int(per_polygon[polys.classes == c].sum())
                 for c in np.unique(polys.classes)}
    return PolygonStatistics(per_class, per_polygon, polys.classes, polys.class_names,
                             polys.class_field, polys.n_skipped)


def _covered(raster: PathLike, polygons: PathLike, field: str, nodata: float | None,
             quiet: bool) -> tuple[Raster, _Polygons, PolygonStatistics]:
    """Open ``raster`` and ``polygons`` and count pixels; error when none covers a pixel."""
    info = open_raster(raster, "raster")
    polys = _read_polygons(polygons, field, info.grid.crs)
    stats = _statistics(info, polys, nodata, quiet)
    if int(stats.per_polygon.sum()) == 0:
        raise NoSamplesError(
            f"polygons: no polygon of {os.fspath(polygons)!r} covers a pixel centre of "
            f"{info.path!r} (check that they overlap)"
        )
    return info, polys, stats


def polygon_class_statistics(
    raster: PathLike,
    polygons: PathLike,
    field: str,
    *,
    out: PathLike | None = None,
    nodata: float | None = None,
    quiet: bool = False,
) -> PolygonStatistics:
    """Count pixels per class and per polygon of labelled polygons on a raster's grid.

    Polygons are rasterised on the raster's grid with the pixel-centre rule (a pixel
    belongs to a polygon when its centre is inside; ``rasterio.features.rasterize``,
    ``all_touched=False``); where polygons overlap, the later one in file order wins.

    Parameters
    ----------
    raster
        Support raster: its grid is the one polygons are rasterised on.
    polygons
        Polygon vector file; every layer holding ``field`` is read. Polygons in
        another CRS are reprojected to the raster's.
    field
        Class field: integer, integer-valued real, or strings (mapped to codes 0, 1, 2… in
        sorted name order; see :attr:`PolygonStatistics.class_names`).
    out
        Optional output: OTB statistics XML (``.xml``) or JSON (``.json``).
    nodata
        When set, pixels whose bands all equal it are not counted.
    quiet
        No progress bar.

    Returns
    -------
    PolygonStatistics
        Per-class and per-polygon pixel counts.
    """
    if out is not None:
        check_outputs({"out": Output(out, "statistics")},
                      {"raster": raster, "polygons": polygons})
    _, _, stats = _covered(raster, polygons, field, nodata, quiet)
    logger.info("polygon statistics: %d pixels in %d of %d polygons; per class %s",
                int(stats.per_polygon.sum()), int((stats.per_polygon > 0).sum()),
                len(stats.per_polygon),
                ", ".join(f"{stats.class_key(c)}: {n}" for c, n in stats.per_class.items()))
    if out is not None:
        stats.write(out)
    return stats


def _resolve_class(key: Any, stats: PolygonStatistics, parameter: str) -> int:
    names = stats.class_names
    if names is not None:
        reverse = {n: c for c, n in names.items()}
        if str(key) in reverse:
            return reverse[str(key)]
        raise InputError(f"{parameter}: class {key!r} is not a value of field {stats.field!r} "
                         f"(classes: {', '.join(sorted(reverse))})")
    try:
        code = int(key)
    except (TypeError, ValueError):
        raise InputError(f"{parameter}: class {key!r} is not an integer class of field "
                         f"{stats.field!r}") from None
    if code not in stats.per_class:
        raise InputError(f"{parameter}: class {code} is not a value of field {stats.field!r} "
                         f"(classes: {', '.join(map(str, sorted(stats.per_class)))})")
    return code


def _polygon_quotas(strategy: str, counts: int | Mapping[Any, int] | None,
                    stats: PolygonStatistics) -> dict[int, int]:
    """Points to draw per class code (classes with none left out); bad ``counts`` raise."""
    available = {c: n for c, n in stats.per_class.items() if n > 0}
    empty = [stats.class_key(c) for c, n in stats.per_class.items() if n == 0]
    if empty and not isinstance(counts, Mapping):
        logger.warning("polygon selection: class(es) %s cover no pixel and get no point",
                       ", ".join(empty))
    if strategy == "all":
        if counts is not None:
            raise InputError(f"counts: {counts!r} is not used with strategy all")
        return available
    if isinstance(counts, Mapping):
        if strategy != "constant":
            raise InputError("counts: per-class counts need strategy constant")
        quotas = _class_quotas(counts, stats)
    else:
        quotas = dict.fromkeys(available, _count_per_class(strategy, counts, available))
    for code, n in quotas.items():
        have = stats.per_class.get(code, 0)
        if n > have:
            raise InputError(
                f"counts: {n} points requested for class {stats.class_key(code)} but its "
                f"polygons cover only {have} pixels (at most one point per pixel)"
            )
    return {c: n for c, n in quotas.items() if n > 0}


def _class_quotas(counts: Mapping[Any, int], stats: PolygonStatistics) -> dict[int, int]:
    """``{class code: count}`` from counts keyed by class names or codes."""
    quotas = {}
    for key, n in counts.items():
        code = _resolve_class(key, stats, "counts")
        if int(n) < 0:
            raise InputError(f"counts: count {n!r} of class {key!r} must be ≥ 0")
        quotas[code] = int(n)
    return quotas


def _count_per_class(strategy: str, counts: int | None, available: Mapping[int, int]) -> int:
    """One count for every class: ``counts``, or (``balanced``) the smallest class's pixels."""
    if counts is None:
        if strategy == "constant":
            raise InputError("counts: a count per class is required with strategy constant")
        n = min(available.values())
        logger.info("balanced polygon selection: %d points per class (the smallest class)", n)
        return n
    n = int(counts)
    if n < 1:
        raise InputError(f"counts: {counts!r} must be ≥ 1")
    return n


def sample_polygons(
    raster: PathLike,
    polygons: PathLike,
    field: str,
    *,
    strategy: str = "balanced",
    counts: int | Mapping[Any, int] | None = None,
    mode: str = "grid",
    seed: int = 0,
    nodata: float | None = None,
    quiet: bool = False,
) -> PolygonSamples:
    """Draw sample points per class inside labelled polygons, at most one per pixel.

    Pixels belong to a polygon by the pixel-centre rule (as in
    :func:`polygon_class_statistics`); pixels are drawn per class uniformly without
    replacement with a NumPy generator seeded by ``seed``.

    Parameters
    ----------
    raster
        Raster whose grid the points are placed on.
    polygons
        Polygon vector file; reprojected to the raster's CRS when needed.
    field
        Class field (integer, or strings mapped to codes 0, 1, 2… in sorted name order).
    strategy
        ``constant``: ``counts`` points per class (an int for every class covering a
        pixel, or ``{class: count}`` with class names or codes; unlisted classes get none).
        ``balanced``: the same number per class, ``counts`` or, when None, the pixel count of
        the smallest class. ``all``: every pixel.
    counts
        See ``strategy``. A quota larger than the pixels a class covers is an error.
    mode
        ``grid``: points at pixel centres. ``random``: uniformly inside the pixel (at
        least :data:`EDGE_MARGIN` of a pixel from its edges, so it maps back to that pixel;
        the point itself may lie just outside the polygon near its boundary).
    seed
        Random seed.
    nodata
        When set, pixels whose bands all equal it are never drawn.
    quiet
        No progress bar.

    Returns
    -------
    PolygonSamples
        Points in raster order with fields ``class``, ``id``, ``polygon`` (and
        ``class_name`` for string fields), the statistics and the quotas.
    """
    if strategy not in POLYGON_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is not one of {', '.join(POLYGON_STRATEGIES)}")
    if mode not in ("random", "grid"):
        raise InputError(f"mode: {mode!r} is not one of random, grid")
    info, polys, stats = _covered(raster, polygons, field, nodata, quiet)
    quotas = _polygon_quotas(strategy, counts, stats)
    if not quotas:
        raise NoSamplesError("strategy: the quotas select no point")
    classes = np.array(sorted(c for c, n in stats.per_class.items() if n > 0), dtype=np.int64)
    class_counts = np.array([stats.per_class[c] for c in classes.tolist()], dtype=np.int64)
    targets = np.array([quotas.get(c, 0) for c in classes.tolist()], dtype=np.int64)
    rng = np.random.default_rng(seed)
    ranks = random_ranks(class_counts, targets, rng)
    cols, rows, cls, poly = rank_selection(
        lambda: _polygon_strips(info, polys, nodata, quiet), classes, class_counts, ranks, 0)
    grid = info.grid
    if mode == "grid":
        x, y = grid.xy_of(cols, rows)
    else:
        u = rng.uniform(EDGE_MARGIN, 1 - EDGE_MARGIN, size=(2, len(cols)))
        x, y = grid.xy_of(cols + u[0], rows + u[1], offset=0)
    fields: dict[str, np.ndarray] = {
        "class": cls, "id": np.arange(len(cols), dtype=np.int64),
        "polygon": poly if poly is not None else np.empty(0, np.int64)}
    if stats.class_names is not None:
        fields["class_name"] = np.array([stats.class_names[c] for c in cls.tolist()],
                                        dtype=object)
    logger.info("polygon selection: %d points (%s), strategy %s, mode %s", len(cols),
                ", ".join(f"{stats.class_key(c)}: {n}" for c, n in sorted(quotas.items())),
                strategy, mode)
    return PolygonSamples(Samples(x, y, fields, grid.crs), stats, quotas)
