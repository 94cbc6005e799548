"""Sample selection: choose where patches will be cut (grids, label images, labelled polygons).

Four jobs, each a plain function over rasters and vectors:

* :func:`select_patches` (OTBTF ``PatchesSelection``): a regular grid of
  candidate patches on a reference raster, filtered by nodata / mask, split
  into train / valid / test groups (``split``, ``chessboard``, ``all``,
  ``balanced``).
* :func:`select_from_label_image` (OTBTF ``LabelImageSampleSelection``): pixel
  centres drawn per class from a label raster.
* :func:`polygon_class_statistics` (OTBTF ``DensePolygonClassStatistics``):
  per-class and per-polygon pixel counts of polygons rasterised on a grid.
* :func:`sample_polygons`: points drawn per class inside labelled polygons.

Placement rule
--------------
Points are placed through :mod:`terrapatch.geometry`: a candidate patch is kept only
if it is the window of a cell of the extraction's sampling grid G (``factor`` 1 for
one source; 2 when a 10 m image is source 1 beside 20 m sources), and its point is
that cell's centre, so the patch extracted at a point is exactly the patch the grid
validated. With ``factor`` 1 the point is the centre of pixel ``start + psize // 2``
for odd and even sizes alike; OTBTF's even-size shift to the pixel's bottom-left
corner (reference §11.2) is not reproduced.

Every raster is read by strips of rows whose size is bounded by
:data:`STRIP_BYTES`, so memory does not grow with the raster.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from terrapatch.errors import GeometryError, InputError, MissingInputError, NoSamplesError
from terrapatch.geometry import Grid, Layout, check_factor, crs_label
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import is_remote, nodata_mask
from terrapatch.vector import read_layers, write_points
from terrapatch.writer import (
    Output,
    atomic_output,
    check_outputs,
    check_writable,
    failure_reason,
    final_path,
    output_group,
)

PathLike = str | os.PathLike[str]

#: Bytes of raster data and working arrays (all inputs together) per strip of rows when
#: streaming a raster.
STRIP_BYTES = 64 * 2**20

#: Working bytes per pixel of a class strip (label values, masks, sort keys and ranks).
_CLASS_WORK_BYTES = 64

#: Names of the PatchesSelection groups, in group-index order.
GROUPS = ("train", "valid", "test")

#: PatchesSelection strategies.
PATCH_STRATEGIES = ("chessboard", "split", "all", "balanced")

#: LabelImageSampleSelection strategies.
LABEL_STRATEGIES = ("constant", "total", "smallest", "all")

#: Polygon sampling strategies.
POLYGON_STRATEGIES = ("constant", "balanced", "all")

#: Random points inside a pixel keep at least this fraction of a pixel from its edges, so
#: the point → pixel rule (which snaps within 1e-6 pixel) maps them back to that pixel.
EDGE_MARGIN = 1e-3


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Samples:
    """Sample points with attribute columns.

    Attributes
    ----------
    x, y
        Point coordinates (float64) in ``crs``.
    fields
        Attribute name → one value per point (e.g. ``class``, ``id``).
    crs
        CRS of the coordinates (the raster's), or None.
    """

    x: np.ndarray
    y: np.ndarray
    fields: dict[str, np.ndarray]
    crs: Any = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: np.ndarray) -> Samples:
        """The points selected by a boolean mask or an index array."""
        return Samples(self.x[index], self.y[index],
                       {k: v[index] for k, v in self.fields.items()}, self.crs)

    def write(self, path: PathLike, parameter: str = "out", layer: str | None = None) -> Path:
        """Write the points (GPKG, GeoJSON or Shapefile, from the extension), atomically.

        Raises :class:`~terrapatch.errors.NoSamplesError` when there is no point.
        """
        if len(self) == 0:
            raise NoSamplesError(f"{parameter}: no point to write to "
                                 f"{os.fspath(final_path(path))!r}")
        return write_points(path, self.x, self.y, self.fields, crs=self.crs, parameter=parameter,
                            layer=layer)


@dataclass(frozen=True)
class PatchSelection:
    """Result of :func:`select_patches`.

    Attributes
    ----------
    samples
        Every selected patch as a point at the centre of its reference pixel, in
        row-major grid order, with fields ``id`` (0, 1, 2…) and, when a label image was
        given, ``class`` (its value at the reference pixel).
    groups
        Group of each point: 0 train, 1 valid, 2 test (:data:`GROUPS`).
    starts
        ``(cols, rows)``: first column / row of each selected patch.
    psize
        Patch size ``(x, y)`` in pixels.
    grid
        Grid of the reference raster.
    n_candidates
        Grid positions whose patch lies inside the raster.
    n_invalid
        Candidates dropped for nodata / mask pixels in their window, or for a reference
        pixel without class.
    """

    samples: Samples
    groups: np.ndarray
    starts: tuple[np.ndarray, np.ndarray]
    psize: tuple[int, int]
    grid: Grid
    n_candidates: int
    n_invalid: int

    def __len__(self) -> int:
        return len(self.samples)

    def group(self, group: int | str) -> Samples:
        """The points of one group (index or name ``"train"``, ``"valid"``, ``"test"``)."""
        index = GROUPS.index(group) if isinstance(group, str) else int(group)
        return self.samples.subset(self.groups == index)

    def counts(self) -> dict[str, int]:
        """Number of points per group name."""
        return {name: int((self.groups == i).sum()) for i, name in enumerate(GROUPS)}

    def write(self, train: PathLike | None, valid: PathLike | None = None,
              test: PathLike | None = None) -> dict[str, Path]:
        """Write each group to its vector file; groups without a file are logged and skipped.

        Raises :class:`~terrapatch.errors.NoSamplesError` when a file is given for a group
        that received no point.
        """
        targets = {"outtrain": train, "outvalid": valid, "outtest": test}
        for index, (key, path) in enumerate(targets.items()):
            if path is None:
                continue
            check_writable(path, key)
            if not (self.groups == index).any():
                raise NoSamplesError(
                    f"{key}: no patch was assigned to group {GROUPS[index]} "
                    f"({len(self)} patches selected in all: {self.counts()})"
                )
        written: dict[str, Path] = {}
        with output_group() as stage:  # all group files appear together, or none
            for index, (key, path) in enumerate(targets.items()):
                points = self.group(index)
                if path is None:
                    if len(points):
                        logger.info("PatchesSelection: %d points of group %s not written "
                                    "(%s not set)", len(points), GROUPS[index], key)
                    continue
                points.write(stage(path, key), key, layer=Path(path).stem)
                written[key] = Path(path)
        return written


@dataclass(frozen=True)
class PolygonStatistics:
    """Pixel counts of polygons rasterised on a raster grid (pixel-centre rule).

    Attributes
    ----------
    per_class
        Class code → number of pixels whose centre falls in a polygon of that class
        (every class of the file, 0 included).
    per_polygon
        Pixels per polygon, in feature order (a pixel covered by overlapping polygons
        counts for the last one, as GDAL burns them).
    polygon_classes
        Class code of each polygon.
    class_names
        Class code → name for string class fields; None for numeric fields.
    field
        The class field.
    n_skipped
        Features skipped (no geometry, or a null class value).
    """

    per_class: dict[int, int]
    per_polygon: np.ndarray
    polygon_classes: np.ndarray
    class_names: dict[int, str] | None
    field: str
    n_skipped: int = 0

    def class_key(self, code: int) -> str:
        """The class as written in files: its name for string fields, else its code."""
        if self.class_names is not None:
            return self.class_names[code]
        return str(code)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``samplesPerClass``, ``samplesPerVector`` (+ ``classNames``)."""
        out: dict[str, Any] = {
            "field": self.field,
            "samplesPerClass": {str(c): int(n) for c, n in sorted(self.per_class.items())},
            "samplesPerVector": {str(i): int(n) for i, n in enumerate(self.per_polygon) if n},
            "skippedFeatures": self.n_skipped,
        }
        if self.class_names is not None:
            out["classNames"] = {str(c): name for c, name in sorted(self.class_names.items())}
        return out

    def write(self, path: PathLike, parameter: str = "out") -> Path:
        """Write JSON, or OTB's statistics XML when ``path`` ends with ``.xml``."""
        target = Path(path)
        with atomic_output(target, parameter) as tmp:
            if target.suffix.lower() == ".xml":
                _write_statistics_xml(tmp, self)
            else:
                tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target


@dataclass(frozen=True)
class PolygonSamples:
    """Result of :func:`sample_polygons`.

    Attributes
    ----------
    samples
        The points, with fields ``class`` (integer code), ``id`` (0, 1, 2…), ``polygon``
        (index of the polygon in feature order) and, for string class fields,
        ``class_name``.
    statistics
        The polygon statistics the draw was based on.
    quotas
        Class code → number of points drawn.
    """

    samples: Samples
    statistics: PolygonStatistics
    quotas: dict[int, int]

    @property
    def class_names(self) -> dict[int, str] | None:
        """Class code → name for string class fields (None for numeric fields)."""
        return self.statistics.class_names

    def write(self, path: PathLike, parameter: str = "out",
              class_map: PathLike | None = None) -> dict[str, Path]:
        """Write the points and, for string class fields, the code → name map as JSON.

        The map goes to ``class_map``, by default beside the points as
        ``<stem>.classes.json``.
        """
        written = {parameter: Path(path)}
        with output_group() as stage:  # points and class map appear together, or neither
            self.samples.write(stage(path, parameter), parameter, layer=Path(path).stem)
            if self.class_names is not None:
                target = Path(class_map) if class_map is not None else \
                    Path(path).with_suffix(".classes.json")
                write_class_map(stage(target, "outclassmap"), self.class_names,
                                self.statistics.field, "outclassmap")
                written["outclassmap"] = target
        return written


def write_class_map(path: PathLike, class_names: Mapping[int, str], field_name: str,
                    parameter: str = "outclassmap") -> Path:
    """Write a class code → name map as JSON (``{"field": ..., "classes": {code: name}}``)."""
    target = Path(path)
    payload = {"field": field_name,
               "classes": {str(c): n for c, n in sorted(class_names.items())}}
    with atomic_output(target, parameter) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    logger.info("class codes of field %r written to %s", field_name, target)
    return target


# ---------------------------------------------------------------------------------- rasters


@dataclass(frozen=True)
class _RasterInfo:
    path: str
    grid: Grid
    count: int
    dtype: np.dtype
    nodata: float | None
    parameter: str


def _open_info(path: PathLike, parameter: str) -> _RasterInfo:
    text = os.fspath(path)
    if not is_remote(text) and not Path(text).exists():
        raise MissingInputError(f"{parameter}: file {text!r} does not exist")
    try:
        with rasterio.open(text) as ds:
            transform, width, height, crs = ds.transform, ds.width, ds.height, ds.crs
            count, dtypes, nodata = ds.count, ds.dtypes, ds.nodata
    except RasterioIOError as exc:
        raise InputError(f"{parameter}: {text!r} is not a readable raster ({exc})") from None
    if transform.is_identity and crs is None:
        raise GeometryError(f"{parameter}: {text!r} has no georeference; terrapatch needs "
                            "north-up georeferenced rasters")
    grid = Grid(transform, width, height, crs, f"{parameter} ({text})")
    return _RasterInfo(text, grid, count, np.dtype(np.result_type(*dtypes)),
                       None if nodata is None else float(nodata), parameter)


def _read(ds: Any, parameter: str, *args: Any, **kwargs: Any) -> np.ndarray:
    """``ds.read(...)``; a damaged or truncated file is an :class:`InputError` naming it."""
    try:
        return np.asarray(ds.read(*args, **kwargs))
    except (RasterioError, OSError) as exc:
        raise InputError(f"{parameter}: cannot read {ds.name!r} ({failure_reason(exc)}); is "
                         "the file complete?") from None


def _check_same_grid(ref: _RasterInfo, other: _RasterInfo) -> None:
    a, b = ref.grid, other.grid
    if (a.width, a.height) != (b.width, b.height) or not a.transform.almost_equals(b.transform):
        raise GeometryError(
            f"{other.parameter}: {other.path!r} ({b.width}×{b.height}, origin {b.x0}, {b.y0}, "
            f"pixel {b.spacing}) is not on the grid of {ref.parameter} {ref.path!r} "
            f"({a.width}×{a.height}, origin {a.x0}, {a.y0}, pixel {a.spacing})"
        )
    if a.crs != b.crs:
        logger.warning("%s: %s has the grid of %s but a different CRS tag (%s vs %s); using "
                       "it as on the same grid", other.parameter, other.path, ref.path,
                       crs_label(b.crs), crs_label(a.crs))


def _integer_labels(values: np.ndarray, valid: np.ndarray, parameter: str) -> np.ndarray:
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


def _strip_plan(first_rows: np.ndarray, height: int, width: int,
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


def _row_strips(height: int, width: int, bytes_per_pixel: int) -> list[tuple[int, int]]:
    """``(row0, row1)`` strips covering ``height`` rows within :data:`STRIP_BYTES`."""
    rows = max(1, STRIP_BYTES // max(1, width * bytes_per_pixel))
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]


def _pixel_valid(data: np.ndarray, nodata: float) -> np.ndarray:
    """OTBTF selection rule: a pixel is invalid only if all its bands equal ``nodata``."""
    return np.asarray(~np.logical_and.reduce(nodata_mask(data, nodata), axis=0), dtype=bool)


def _pixel_centres(grid: Grid, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sx, sy = grid.spacing
    x = grid.x0 + (np.asarray(cols, np.float64) + 0.5) * sx
    y = grid.y0 - (np.asarray(rows, np.float64) + 0.5) * sy
    return x, y


# ---------------------------------------------------------------------------------- grid


def _pair(value: int | Sequence[int], parameter: str, minimum: int | None = 1) -> tuple[int, int]:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        pair = (int(value), int(value))
    else:
        try:
            items = tuple(value)  # type: ignore[arg-type]
        except TypeError:
            raise InputError(f"{parameter}: {value!r} is not an integer or an (x, y) pair") \
                from None
        if len(items) != 2:
            raise InputError(f"{parameter}: expected one integer or (x, y), got {value!r}")
        pair = (int(items[0]), int(items[1]))
    if minimum is not None and min(pair) < minimum:
        raise InputError(f"{parameter}: {value!r} must be ≥ {minimum}")
    return pair


def candidate_starts(size: int, psize: int, step: int, offset: int = 0) -> np.ndarray:
    """First pixels of the candidate patches along one axis of a ``size``-pixel raster.

    Patch starts ``s`` with ``0 ≤ s ≤ size - psize`` and ``s ≡ offset + 1 (mod step)``.
    This is OTBTF's grid (its centres ``c = s + psize // 2`` satisfy
    ``(c - psize//2 - 1) mod step == offset mod step``: with offset 0 the first patch
    starts at pixel 1), made consistent at ``offset ≡ step - 1`` where OTBTF admits the
    patch starting at pixel 0 only when ``nodata`` is set; terrapatch always admits it.
    """
    if step < 1 or psize < 1:
        raise InputError(f"grid: step {step} and psize {psize} must be ≥ 1")
    first = (offset + 1) % step
    return np.arange(first, size - psize + 1, step, dtype=np.int64)


def _on_sampling_grid(layout: Layout, starts: np.ndarray,
                      dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the candidate starts that are windows of cells of G; return (cells, starts)."""
    if len(starts) == 0:
        return starts, starts
    f = layout.factor
    lo = (int(starts[0]) - layout.fields[0][dim]) // f - 2
    hi = (int(starts[-1]) + layout.fields[0][dim]) // f + 2
    cells = np.arange(lo, hi + 1, dtype=np.int64)
    windows = layout.window_starts(cells, dim, 0)
    index = np.clip(np.searchsorted(windows, starts), 0, len(windows) - 1)
    hit = windows[index] == starts
    if not hit.any():
        key = "grid.offsetx" if dim == 0 else "grid.offsety"
        phase = int(windows[len(windows) // 2]) % f
        raise InputError(
            f"{key}: with grid.factor {f} patches must start on the sampling grid "
            f"(start ≡ {phase} mod {f}), but every candidate start is ≡ {int(starts[0]) % f}; "
            "change the offset or the step"
        )
    return cells[index[hit]], starts[hit]


def patch_reference_pixels(starts: np.ndarray, psize: int) -> np.ndarray:
    """Reference pixel of patches starting at ``starts``: ``start + psize // 2``.

    Extraction cuts ``[ref - psize // 2, ref - psize // 2 + psize)`` around the pixel that
    contains a point, so a point at this pixel's centre gives back exactly the patch.
    """
    return np.asarray(starts, dtype=np.int64) + psize // 2


def split_sequence(n: int, proportions: Sequence[float]) -> np.ndarray:
    """OTBTF's deterministic interleaved group sequence for ``split`` (reference §6.1).

    ``inc_g = sum(props) / prop_g``; each slot takes the group with the smallest running
    count (the first on ties) and adds its increment; groups with proportion 0 are never
    picked. Counts are float32 as in OTBTF. E.g. 50/25/25 gives ``0,1,2,0,0,1,2,0,…`` and
    0.8/0.1/0.1 gives ``0,1,2,0,0,0,0,0,0,0,0,1,2,0,…``.
    """
    props = np.asarray(proportions, dtype=np.float32)
    if (props < 0).any() or not np.isfinite(props).all() or props.sum() <= 0:
        raise InputError(f"proportions {list(map(float, proportions))} must be ≥ 0 and not all 0")
    total = np.float32(props.sum())
    counts = [np.float32(0.0) if p > 0 else np.float32(np.inf) for p in props]
    incs = [np.float32(total / p) if p > 0 else np.float32(0.0) for p in props]
    out = np.empty(n, dtype=np.int8)
    for i in range(n):
        g = 0
        for k in range(1, len(counts)):
            if counts[k] < counts[g]:
                g = k
        out[i] = g
        counts[g] = np.float32(counts[g] + incs[g])
    return out


def _normalise_proportions(proportions: Sequence[float]) -> tuple[float, ...]:
    names = ("strategy.split.trainprop", "strategy.split.validprop", "strategy.split.testprop")
    props = tuple(float(p) for p in proportions)
    if len(props) not in (1, 2, 3):
        raise InputError(f"strategy.split (proportions): expected 1 to 3 values, got {props!r}")
    for name, p in zip(names, props, strict=False):
        if not math.isfinite(p) or p < 0:
            raise InputError(f"{name}: {p!r} must be a finite number ≥ 0")
    total = sum(props)
    if total <= 0:
        raise InputError(
            f"strategy.split.*prop: proportions {list(props)} of the requested outputs sum to 0; "
            "give e.g. 50 25 25 or 0.8 0.1 0.1"
        )
    return tuple(p / total for p in props) + (0.0,) * (3 - len(props))


def select_patches(
    image: PathLike,
    psize: int | Sequence[int],
    step: int | Sequence[int],
    *,
    offset: int | Sequence[int] = 0,
    nodata: float | None = None,
    mask: PathLike | None = None,
    strategy: str = "chessboard",
    proportions: Sequence[float] = (50.0, 25.0, 25.0),
    shuffle: bool = False,
    seed: int = 0,
    label_image: PathLike | None = None,
    nclasses: int | None = None,
    spatial_proportion: float = 0.25,
    factor: int = 1,
    quiet: bool = False,
) -> PatchSelection:
    """Select patches on a regular grid of a reference raster (OTBTF ``PatchesSelection``).

    Parameters
    ----------
    image
        Reference raster (``in``): defines the grid and, with ``nodata``, valid pixels.
    psize
        Patch size in pixels (int or ``(x, y)``).
    step
        Grid step between candidate patches in pixels (int or ``(x, y)``).
    offset
        Grid offset (``grid.offsetx/y``), taken modulo the step: patch starts are
        ``s ≡ offset + 1 (mod step)`` as in OTBTF (:func:`candidate_starts`).
    nodata
        A pixel whose bands all equal this value is invalid; a patch is kept only if every
        pixel of its ``psize`` window is valid. None: every pixel of ``image`` is valid
        (the file's own nodata is *not* used, as in OTBTF).
    mask
        Raster on the grid of ``image``; a pixel is valid where the mask is non-zero
        (OTBTF requires exactly 1). Every pixel of the window must be valid.
    strategy
        ``chessboard`` (groups 0/1 alternate on the grid), ``split`` (proportions),
        ``all`` (everything in group 0) or ``balanced`` (subset with a balanced class
        histogram, then chessboard groups).
    proportions
        ``split`` shares of train, valid, test (percentages or fractions; normalised; a
        0 share means the group is not produced).
    shuffle
        ``split``: shuffle the group sequence with a NumPy generator seeded by ``seed``
        (proportions stay exact) instead of the deterministic interleaved sequence.
    seed
        Seed of every random choice (split shuffle, balanced selection).
    label_image
        Label raster on the grid of ``image``. Each point gets field ``class`` = its value
        at the point's reference pixel; patches whose reference pixel is the label's
        nodata are dropped. Required for ``balanced``.
    nclasses
        ``balanced``: classes are ``0 .. nclasses-1`` (other values are an error). None:
        the distinct values of ``label_image``.
    spatial_proportion
        ``balanced``: share of candidates drawn uniformly at random first (``sp``).
    factor
        Factor of the extraction's sampling grid G in pixels of ``image`` (``grid.factor``;
        2 when the points will feed a 10 m + 20 m extraction with the 10 m image as
        source 1). Only candidate patches that are windows of G cells are kept, and each
        point is placed at the centre of its G cell, so extraction cuts exactly the
        validated patch (:mod:`terrapatch.geometry`).
    quiet
        No progress bar.

    Returns
    -------
    PatchSelection
        Points (reference-pixel centres), groups and windows.

    Examples
    --------
    >>> sel = select_patches("label.tif", psize=32, step=32, strategy="split",
    ...                      proportions=(80, 10, 10), label_image="label.tif")  # doctest: +SKIP
    >>> sel.write("train.gpkg", "valid.gpkg", "test.gpkg")  # doctest: +SKIP
    """
    if strategy not in PATCH_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is not one of {', '.join(PATCH_STRATEGIES)}")
    px, py = _pair(psize, "grid.psize")
    stx, sty = _pair(step, "grid.step")
    ox, oy = _pair(offset, "grid.offsetx/offsety", minimum=None)
    props = _normalise_proportions(proportions) if strategy == "split" else (1.0, 0.0, 0.0)
    if strategy == "balanced":
        if label_image is None:
            raise InputError("strategy.balanced.labelimage: required with strategy balanced")
        if not 0.0 <= spatial_proportion <= 1.0:
            raise InputError(f"strategy.balanced.sp: {spatial_proportion!r} must be in [0, 1]")
        if nclasses is not None and nclasses < 2:
            raise InputError(f"strategy.balanced.nclasses: {nclasses!r} must be ≥ 2")

    info = _open_info(image, "in")
    grid = info.grid
    width, height = grid.width, grid.height
    if px > width or py > height:
        raise InputError(f"grid.psize: patch {px}×{py} does not fit in {info.path!r} "
                         f"({width}×{height} pixels)")
    if nodata is None and info.nodata is not None:
        logger.info("PatchesSelection: %s declares nodata %s but nodata is not set; every pixel "
                    "counts as valid", info.path, info.nodata)
    mask_info = _open_info(mask, "mask") if mask is not None else None
    if mask_info is not None:
        _check_same_grid(info, mask_info)
    label_param = "strategy.balanced.labelimage" if strategy == "balanced" else "label"
    label_info = _open_info(label_image, label_param) if label_image is not None else None
    if label_info is not None:
        _check_same_grid(info, label_info)

    layout = Layout((grid,), ((px, py),), factor=check_factor(factor, "grid.factor"),
                    factor_key="grid.factor")
    cx, sx = _on_sampling_grid(layout, candidate_starts(width, px, stx, ox), 0)
    cy, sy = _on_sampling_grid(layout, candidate_starts(height, py, sty, oy), 1)
    if len(sx) == 0 or len(sy) == 0:
        raise NoSamplesError(
            f"grid: no candidate patch fits in {info.path!r} ({width}×{height}) with psize "
            f"{px}×{py}, step {stx}×{sty}, offset {ox}, {oy}"
        )
    n_candidates = len(sx) * len(sy)

    classes: np.ndarray | None = None
    if strategy == "balanced":
        assert label_info is not None
        if nclasses is not None:
            classes = np.arange(nclasses, dtype=np.int64)
        else:
            classes = _label_values(label_info)
            if len(classes) == 0:
                raise NoSamplesError(f"{label_param}: {label_info.path!r} has no labelled pixel")

    scan = _scan_grid(info, sx, sy, (px, py), nodata, mask_info, label_info, classes,
                      quiet=quiet)
    valid = scan.valid
    n_invalid = int((~valid).sum())
    if not valid.any():
        raise NoSamplesError(
            f"in: none of the {n_candidates} candidate patches of {info.path!r} is fully valid "
            f"(nodata={nodata}, mask={os.fspath(mask) if mask is not None else None}"
            + (", or their reference pixel has no label" if label_info is not None else "")
            + ")"
        )
    jj, ii = np.meshgrid(np.arange(len(sx)), np.arange(len(sy)))  # row-major order
    ii, jj = ii[valid], jj[valid]
    start_cols, start_rows = sx[jj], sy[ii]
    pos_x = (start_cols - sx[0]) // stx
    pos_y = (start_rows - sy[0]) // sty
    chess = ((pos_x + pos_y) % 2).astype(np.int8)
    keep = np.ones(len(ii), dtype=bool)

    if strategy == "chessboard":
        groups = chess
    elif strategy == "all":
        groups = np.zeros(len(ii), dtype=np.int8)
    elif strategy == "split":
        groups = split_sequence(len(ii), props)
        if shuffle:
            groups = np.random.default_rng(seed).permutation(groups)
    else:
        assert scan.histograms is not None
        keep = _balanced_subset(scan.histograms[valid], spatial_proportion, seed)
        groups = chess
    start_cols, start_rows, groups = start_cols[keep], start_rows[keep], groups[keep]
    x, y = layout.cell_transform() @ (cx[jj[keep]] + 0.5, cy[ii[keep]] + 0.5)
    fields: dict[str, np.ndarray] = {"id": np.arange(len(x), dtype=np.int64)}
    if scan.labels is not None:
        fields["class"] = scan.labels[valid][keep]
    samples = Samples(x, y, fields, grid.crs)
    selection = PatchSelection(samples, groups.astype(np.int8), (start_cols, start_rows),
                               (px, py), grid, n_candidates, n_invalid)
    logger.info("PatchesSelection: %d of %d candidate patches valid, %d selected (%s) with "
                "strategy %s", n_candidates - n_invalid, n_candidates, len(selection),
                ", ".join(f"{k} {v}" for k, v in selection.counts().items()), strategy)
    return selection


@dataclass
class _GridScan:
    valid: np.ndarray
    labels: np.ndarray | None = None
    histograms: np.ndarray | None = None


def _scan_grid(info: _RasterInfo, sx: np.ndarray, sy: np.ndarray, psize: tuple[int, int],
               nodata: float | None, mask_info: _RasterInfo | None,
               label_info: _RasterInfo | None, classes: np.ndarray | None,
               quiet: bool = False) -> _GridScan:
    """Validity, reference-pixel label and (balanced) class histogram of every candidate."""
    px, py = psize
    width = info.grid.width
    ny, nx = len(sy), len(sx)
    scan = _GridScan(valid=np.ones((ny, nx), dtype=bool))
    if nodata is None and mask_info is None and label_info is None:
        return scan
    if label_info is not None:
        scan.labels = np.zeros((ny, nx), dtype=np.int64)
    if classes is not None:
        scan.histograms = np.zeros((ny, nx, len(classes)), dtype=np.int64)
    per_pixel = 1
    if nodata is not None:
        per_pixel += info.count * info.dtype.itemsize
    if mask_info is not None:
        per_pixel += mask_info.dtype.itemsize
    if label_info is not None:
        per_pixel += label_info.dtype.itemsize + 9 + (16 if classes is not None else 0)
    plan = _strip_plan(sy, py, width, per_pixel)
    datasets = {}
    try:
        if nodata is not None:
            datasets["in"] = rasterio.open(info.path)
        if mask_info is not None:
            datasets["mask"] = rasterio.open(mask_info.path)
        if label_info is not None:
            datasets["label"] = rasterio.open(label_info.path)
        with progress_bar(len(plan), "selecting", unit="strip", quiet=quiet) as bar:
            for i0, i1 in plan:
                r0 = int(sy[i0])
                window = Window(0, r0, width, int(sy[i1 - 1]) + py - r0)
                ok: np.ndarray | None = None
                if nodata is not None:
                    ok = _pixel_valid(_read(datasets["in"], info.parameter, window=window), nodata)
                if mask_info is not None:
                    m = _read(datasets["mask"], mask_info.parameter, 1, window=window) != 0
                    ok = m if ok is None else ok & m
                lab = lab_ok = None
                if label_info is not None:
                    raw = _read(datasets["label"], label_info.parameter, 1, window=window)
                    lab_ok = np.ones(raw.shape, dtype=bool)
                    if label_info.nodata is not None:
                        lab_ok &= ~nodata_mask(raw, label_info.nodata)
                    if raw.dtype.kind == "f":
                        lab_ok &= ~np.isnan(raw)
                    lab = _integer_labels(raw, lab_ok, label_info.parameter)
                cidx = None
                if classes is not None and label_info is not None:
                    assert lab is not None and lab_ok is not None
                    cidx = _class_index(lab, lab_ok, classes, label_info.parameter)
                for i in range(i0, i1):
                    rr = int(sy[i]) - r0
                    if ok is not None:
                        col_ok = ok[rr:rr + py].all(axis=0)
                        bad = np.concatenate([[0], np.cumsum(~col_ok)])
                        scan.valid[i] &= (bad[sx + px] - bad[sx]) == 0
                    if lab is not None and lab_ok is not None and scan.labels is not None:
                        ref_r, ref_c = rr + py // 2, sx + px // 2
                        scan.labels[i] = lab[ref_r, ref_c]
                        scan.valid[i] &= lab_ok[ref_r, ref_c]
                    if cidx is not None and scan.histograms is not None:
                        block = cidx[rr:rr + py]
                        for k in range(scan.histograms.shape[2]):
                            cs = np.concatenate([[0], np.cumsum((block == k).sum(axis=0))])
                            scan.histograms[i, :, k] = cs[sx + px] - cs[sx]
                bar.update(1)
    finally:
        for ds in datasets.values():
            ds.close()
    return scan


def _class_index(labels: np.ndarray, valid: np.ndarray, classes: np.ndarray,
                 parameter: str) -> np.ndarray:
    """Index of each label in ``classes`` (-1 where not valid); unknown labels are an error."""
    pos = np.searchsorted(classes, labels)
    pos_c = np.clip(pos, 0, len(classes) - 1)
    known = classes[pos_c] == labels
    if (valid & ~known).any():
        value = labels[valid & ~known][0]
        raise InputError(f"{parameter}: label value {value} is not one of the classes "
                         f"{classes.min()}..{classes.max()} (strategy.balanced.nclasses)")
    return np.where(valid, pos_c, -1)


def _label_values(info: _RasterInfo) -> np.ndarray:
    """Sorted distinct labelled values of band 1 (file nodata and NaN excluded)."""
    found: set[int] = set()
    with rasterio.open(info.path) as ds:
        for r0, r1 in _row_strips(ds.height, ds.width, info.dtype.itemsize + 24):
            raw = _read(ds, info.parameter, 1, window=Window(0, r0, ds.width, r1 - r0))
            ok = np.ones(raw.shape, dtype=bool)
            if info.nodata is not None:
                ok &= ~nodata_mask(raw, info.nodata)
            if raw.dtype.kind == "f":
                ok &= ~np.isnan(raw)
            found.update(np.unique(_integer_labels(raw, ok, info.parameter)[ok]).tolist())
    return np.array(sorted(found), dtype=np.int64)


def _balanced_subset(hist: np.ndarray, spatial_proportion: float, seed: int) -> np.ndarray:
    """Choose candidates so that the summed class histogram is as even as possible.

    1. A share ``spatial_proportion`` of the candidates is drawn uniformly at random
       (spatial coverage).
    2. The others are visited by decreasing rarity score ``sum_k h_k / T_k`` (``T_k``: pixels
       of class k over all candidates; ties in random order) and a candidate is kept when
       it increases the cosine similarity between the summed histogram and the uniform one.

    Classes absent from every candidate are left out of the target.
    """
    rng = np.random.default_rng(seed)
    n = hist.shape[0]
    h = hist.astype(np.float64)
    totals = h.sum(axis=0)
    present = totals > 0
    if not present.any():
        raise NoSamplesError("strategy.balanced.labelimage: no candidate window holds a "
                             "labelled pixel")
    if (~present).any():
        logger.warning("PatchesSelection balanced: %d class(es) absent from every candidate "
                       "window are left out of the balance", int((~present).sum()))
    h = h[:, present]
    totals = totals[present]
    keep = np.zeros(n, dtype=bool)
    n_seed = min(n, round(spatial_proportion * n))
    if n_seed:
        keep[rng.choice(n, n_seed, replace=False)] = True
    cum = h[keep].sum(axis=0)
    rest = np.flatnonzero(~keep)
    score = (h[rest] / totals).sum(axis=1)
    order = rest[np.lexsort((rng.random(len(rest)), -score))]
    k = h.shape[1]

    def cosine(v: np.ndarray) -> float:
        norm = float(np.sqrt((v * v).sum()))
        return -1.0 if norm == 0 else float(v.sum()) / (norm * math.sqrt(k))

    best = cosine(cum)
    for i in order:
        candidate = cum + h[i]
        c = cosine(candidate)
        if c > best + 1e-12:
            keep[i] = True
            cum, best = candidate, c
    logger.info("PatchesSelection balanced: %d of %d candidates kept (%d spatial), class "
                "shares %s", int(keep.sum()), n, n_seed,
                np.round(cum / max(cum.sum(), 1), 3).tolist())
    return keep


# ---------------------------------------------------------------------------------- class rasters


#: A strip of a class raster: first row, class values, validity, and optional keys
#: (polygon index) — all ``(rows, cols)`` arrays over the scanned window's columns.
_Strip = tuple[int, np.ndarray, np.ndarray, np.ndarray | None]


def _rank_selection(
    strips: Callable[[], Iterator[_Strip]],
    classes: np.ndarray,
    counts: np.ndarray,
    ranks: Sequence[np.ndarray],
    col0: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Pixels whose rank (raster order) within their class is in ``ranks[class]``.

    Returns ``(cols, rows, classes, keys)`` in raster order.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chosen = np.sort(np.concatenate([offsets[k] + np.asarray(r, np.int64)
                                     for k, r in enumerate(ranks)] or [np.empty(0, np.int64)]))
    empty = np.empty(0, dtype=np.int64)
    if len(chosen) == 0:
        return empty, empty, empty, None
    seen = np.zeros(len(classes), dtype=np.int64)
    out_c, out_r, out_k, out_key = [], [], [], []
    any_keys = False
    for row0, values, valid, keys in strips():
        flat = np.flatnonzero(valid)
        if len(flat) == 0:
            continue
        ci = np.searchsorted(classes, values.ravel()[flat])
        order = np.argsort(ci, kind="stable")
        sci = ci[order]
        first = np.searchsorted(sci, np.arange(len(classes)))
        global_rank = offsets[sci] + seen[sci] + (np.arange(len(sci)) - first[sci])
        pos = np.searchsorted(chosen, global_rank)
        hit = (pos < len(chosen)) & (chosen[np.minimum(pos, len(chosen) - 1)] == global_rank)
        picked = np.sort(flat[order[hit]])
        seen += np.bincount(ci, minlength=len(classes))
        w = values.shape[1]
        out_r.append(row0 + picked // w)
        out_c.append(col0 + picked % w)
        out_k.append(values.ravel()[picked])
        if keys is not None:
            any_keys = True
            out_key.append(keys.ravel()[picked])
    cols = np.concatenate(out_c) if out_c else empty
    rows = np.concatenate(out_r) if out_r else empty
    cls = np.concatenate(out_k).astype(np.int64) if out_k else empty
    key = (np.concatenate(out_key).astype(np.int64) if out_key else empty) if any_keys else None
    return cols, rows, cls, key


def _random_ranks(counts: np.ndarray, targets: np.ndarray, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    return [np.sort(rng.choice(int(c), int(t), replace=False)) if t else np.empty(0, np.int64)
            for c, t in zip(counts, targets, strict=True)]


# ---------------------------------------------------------------------------------- label image


def select_from_label_image(
    label_image: PathLike,
    *,
    strategy: str = "constant",
    count: int = 1000,
    total: int = 1000,
    nodata: float | None = None,
    pad: int = 0,
    method: str = "random",
    seed: int = 0,
    rebase: bool = False,
    quiet: bool = False,
) -> Samples:
    """Draw pixel centres per class from a label raster (OTBTF ``LabelImageSampleSelection``).

    Parameters
    ----------
    label_image
        Single-band raster of integer class values (``inref``; band 1 is used).
    strategy
        ``constant``: ``count`` points per class; when a class has fewer pixels, every
        class gets the smallest class's count (OTBTF's cap, logged as a warning).
        ``total``: ``total`` points shared among classes in proportion to their pixel
        counts (error if larger than the labelled pixels). ``smallest``: as many points per
        class as the smallest class has pixels. ``all``: every labelled pixel.
    count, total
        Quotas of ``constant`` (``strategy.constant.nb``) and ``total``
        (``strategy.total.v``).
    nodata
        Label value to ignore. Pixels equal to the file's own nodata, and NaN, are always
        ignored.
    pad
        Border, in pixels, excluded on every side.
    method
        ``random``: the points of a class are drawn uniformly without replacement with a
        NumPy generator seeded by ``seed``. ``strided``: OTBTF's pick, every
        ``step``-th pixel of a class in raster order (reference §6.3).
    seed
        Random seed (``random``).
    rebase
        OTBTF's ``class = value - smallest value`` (classes start at 0). Default: the
        label value itself.
    quiet
        No progress bar.

    Returns
    -------
    Samples
        Points at pixel centres, in raster order, with field ``class``.
    """
    if strategy not in LABEL_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is not one of {', '.join(LABEL_STRATEGIES)}")
    if method not in ("random", "strided"):
        raise InputError(f"method: {method!r} is not one of random, strided")
    if strategy == "constant" and count < 1:
        raise InputError(f"strategy.constant.nb: {count!r} must be ≥ 1")
    if strategy == "total" and total < 1:
        raise InputError(f"strategy.total.v: {total!r} must be ≥ 1")
    if pad < 0:
        raise InputError(f"pad: {pad!r} must be ≥ 0")
    info = _open_info(label_image, "inref")
    grid = info.grid
    if 2 * pad >= grid.width or 2 * pad >= grid.height:
        raise InputError(f"pad: {pad} leaves no pixel in {info.path!r} "
                         f"({grid.width}×{grid.height})")
    if info.count > 1:
        logger.warning("LabelImageSampleSelection: %s has %d bands; band 1 is used",
                       info.path, info.count)

    def strips() -> Iterator[_Strip]:
        return _label_strips(info, pad, nodata, quiet)

    values: dict[int, int] = {}
    for _, vals, valid, _ in strips():
        u, c = np.unique(vals[valid], return_counts=True)
        for v, n in zip(u.tolist(), c.tolist(), strict=True):
            values[v] = values.get(v, 0) + n
    if not values:
        raise NoSamplesError(f"inref: {info.path!r} has no labelled pixel "
                             f"(nodata={nodata}, file nodata={info.nodata}, pad={pad})")
    classes = np.array(sorted(values), dtype=np.int64)
    counts = np.array([values[c] for c in classes.tolist()], dtype=np.int64)
    targets, steps = _label_quotas(strategy, counts, classes, count, total, method)
    if method == "random":
        ranks = _random_ranks(counts, targets, np.random.default_rng(seed))
    else:
        ranks = [s * np.arange(1, t + 1, dtype=np.int64) - 1 for s, t in
                 zip(steps, targets, strict=True)]
    cols, rows, cls, _ = _rank_selection(strips, classes, counts, ranks, pad)
    x, y = _pixel_centres(grid, cols, rows)
    if rebase:
        cls = cls - int(classes[0])
        missing = np.setdiff1d(np.arange(classes[0], classes[-1] + 1), classes)
        if len(missing):
            logger.warning("LabelImageSampleSelection: classes %s have no pixel; re-based "
                           "codes are not contiguous", missing.tolist())
    logger.info("LabelImageSampleSelection: %d points (%s) from %d labelled pixels, strategy "
                "%s, %s pick", len(x), ", ".join(f"class {c}: {t}" for c, t in
                                                 zip(classes.tolist(), targets.tolist(),
                                                     strict=True)),
                int(counts.sum()), strategy, method)
    return Samples(x, y, {"class": cls}, grid.crs)


def _label_strips(info: _RasterInfo, pad: int, nodata: float | None,
                  quiet: bool) -> Iterator[_Strip]:
    grid = info.grid
    width = grid.width - 2 * pad
    height = grid.height - 2 * pad
    plan = _row_strips(height, width, info.dtype.itemsize + _CLASS_WORK_BYTES)
    with rasterio.open(info.path) as ds, \
            progress_bar(len(plan), "reading labels", unit="strip", quiet=quiet) as bar:
        for r0, r1 in plan:
            raw = _read(ds, info.parameter, 1, window=Window(pad, pad + r0, width, r1 - r0))
            valid = np.ones(raw.shape, dtype=bool)
            for value in (nodata, info.nodata):
                if value is not None:
                    valid &= ~nodata_mask(raw, value)
            if raw.dtype.kind == "f":
                valid &= ~np.isnan(raw)
            yield pad + r0, _integer_labels(raw, valid, "inref"), valid, None
            bar.update(1)


def _label_quotas(strategy: str, counts: np.ndarray, classes: np.ndarray, count: int,
                  total: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-class targets and strides (the strides serve OTBTF's ``strided`` pick)."""
    smallest = int(counts.min())
    if strategy == "constant":
        target = count
        if count > smallest:
            small = int(classes[int(np.argmin(counts))])
            logger.warning("LabelImageSampleSelection: strategy.constant.nb %d exceeds the "
                           "smallest class (class %d: %d pixels); taking %d points per class",
                           count, small, smallest, smallest)
            target = smallest
        return np.full(len(counts), target, dtype=np.int64), counts // target
    if strategy == "total":
        n = int(counts.sum())
        if total > n:
            raise InputError(f"strategy.total.v: {total} points requested but only {n} "
                             "labelled pixels are available")
        step = max(1, n // total)
        steps = np.full(len(counts), step, dtype=np.int64)
        if method == "strided":  # OTBTF: every step-th pixel of each class
            return counts // step, steps
        exact = counts * (total / n)
        targets = np.minimum(np.floor(exact).astype(np.int64), counts)
        left = total - int(targets.sum())
        if left:  # largest remainders first (ties: class order)
            order = np.argsort(-(exact - targets), kind="stable")
            order = order[targets[order] < counts[order]]
            targets[order[:left]] += 1
        return targets, steps
    if strategy == "smallest":
        return np.full(len(counts), smallest, dtype=np.int64), counts // smallest
    return counts.copy(), np.ones(len(counts), dtype=np.int64)


# ---------------------------------------------------------------------------------- polygons


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
                   parameter: str = "vec") -> _Polygons:
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


def _polygon_strips(info: _RasterInfo, polys: _Polygons, nodata: float | None,
                    quiet: bool) -> Iterator[_Strip]:
    """Polygon index and class per pixel (pixel-centre rule, later polygons on top)."""
    from rasterio.features import rasterize

    grid = info.grid
    width, height = grid.width, grid.height
    sx, sy = grid.spacing
    bounds = shapely.bounds(polys.geoms)
    usable = ~shapely.is_empty(polys.geoms) & np.isfinite(bounds).all(axis=1)
    in_x = usable & (bounds[:, 2] >= grid.x0) & (bounds[:, 0] <= grid.x0 + width * sx)
    per_pixel = 4 + _CLASS_WORK_BYTES + (info.count * info.dtype.itemsize if nodata is not None
                                         else 0)
    plan = _row_strips(height, width, per_pixel)
    lut = polys.classes
    ds = rasterio.open(info.path) if nodata is not None else None
    try:
        with progress_bar(len(plan), "rasterising", unit="strip", quiet=quiet) as bar:
            for r0, r1 in plan:
                top, bottom = grid.y0 - r0 * sy, grid.y0 - r1 * sy
                sel = np.flatnonzero(in_x & (bounds[:, 3] >= bottom) & (bounds[:, 1] <= top))
                if len(sel):
                    index = rasterize(
                        ((polys.geoms[i], int(i)) for i in sel), out_shape=(r1 - r0, width),
                        transform=grid.transform @ Affine.translation(0, r0), fill=-1,
                        dtype="int32", all_touched=False)
                else:
                    index = np.full((r1 - r0, width), -1, dtype=np.int32)
                valid = index >= 0
                if ds is not None and nodata is not None and valid.any():
                    valid &= _pixel_valid(
                        _read(ds, info.parameter, window=Window(0, r0, width, r1 - r0)), nodata)
                yield r0, np.where(valid, lut[np.maximum(index, 0)], 0), valid, index
                bar.update(1)
    finally:
        if ds is not None:
            ds.close()


def _statistics(info: _RasterInfo, polys: _Polygons, nodata: float | None,
                quiet: bool) -> PolygonStatistics:
    per_polygon = np.zeros(len(polys.geoms), dtype=np.int64)
    for _, _, valid, index in _polygon_strips(info, polys, nodata, quiet):
        assert index is not None
        per_polygon += np.bincount(index[valid], minlength=len(per_polygon))
    per_class = {int(c): int(per_polygon[polys.classes == c].sum())
                 for c in np.unique(polys.classes)}
    return PolygonStatistics(per_class, per_polygon, polys.classes, polys.class_names,
                             polys.class_field, polys.n_skipped)


def polygon_class_statistics(
    raster: PathLike,
    polygons: PathLike,
    field: str,
    *,
    out: PathLike | None = None,
    nodata: float | None = None,
    quiet: bool = False,
) -> PolygonStatistics:
    """Count pixels per class and per polygon (OTBTF ``DensePolygonClassStatistics``).

    Polygons are rasterised on the raster's grid with the pixel-centre rule (a pixel
    belongs to a polygon when its centre is inside; ``rasterio.features.rasterize``,
    ``all_touched=False``); where polygons overlap, the later one in file order wins.

    Parameters
    ----------
    raster
        Support raster (``in``): its grid is the one polygons are rasterised on.
    polygons
        Polygon vector file (``vec``); every layer holding ``field`` is read. Polygons in
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
        check_outputs({"out": Output(out, "statistics")}, {"in": raster, "vec": polygons})
    info = _open_info(raster, "in")
    polys = _read_polygons(polygons, field, info.grid.crs)
    stats = _statistics(info, polys, nodata, quiet)
    if int(stats.per_polygon.sum()) == 0:
        raise NoSamplesError(
            f"vec: no polygon of {os.fspath(polygons)!r} covers a pixel centre of "
            f"{info.path!r} (check that they overlap)"
        )
    logger.info("DensePolygonClassStatistics: %d pixels in %d of %d polygons; per class %s",
                int(stats.per_polygon.sum()), int((stats.per_polygon > 0).sum()),
                len(stats.per_polygon),
                ", ".join(f"{stats.class_key(c)}: {n}" for c, n in stats.per_class.items()))
    if out is not None:
        stats.write(out)
    return stats


def _write_statistics_xml(path: Path, stats: PolygonStatistics) -> None:
    """OTB's statistics XML: ``GeneralStatistics`` / ``Statistic`` / ``StatisticMap``."""
    root = ET.Element("GeneralStatistics")
    per_class = ET.SubElement(root, "Statistic", name="samplesPerClass")
    for code, n in sorted(stats.per_class.items()):
        if n:
            ET.SubElement(per_class, "StatisticMap", key=stats.class_key(code), value=str(n))
    per_vector = ET.SubElement(root, "Statistic", name="samplesPerVector")
    for i, n in enumerate(stats.per_polygon.tolist()):
        if n:
            ET.SubElement(per_vector, "StatisticMap", key=str(i), value=str(n))
    ET.indent(root, space="    ")
    text = '<?xml version="1.0" ?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    path.write_text(text, encoding="utf-8")


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
    available = {c: n for c, n in stats.per_class.items() if n > 0}
    empty = [stats.class_key(c) for c, n in stats.per_class.items() if n == 0]
    if empty and not isinstance(counts, Mapping):
        logger.warning("PolygonSampleSelection: class(es) %s cover no pixel and get no point",
                       ", ".join(empty))
    if strategy == "all":
        if counts is not None:
            raise InputError("strategy.constant.nb: counts are not used with strategy all")
        return available
    if isinstance(counts, Mapping):
        if strategy != "constant":
            raise InputError("strategy.constant.counts: per-class counts need strategy constant")
        quotas = {}
        for key, n in counts.items():
            code = _resolve_class(key, stats, "strategy.constant.counts")
            if int(n) < 0:
                raise InputError(f"strategy.constant.counts: count {n!r} of class {key!r} "
                                 "must be ≥ 0")
            quotas[code] = int(n)
        param = "strategy.constant.counts"
    else:
        param = f"strategy.{strategy}.nb"
        if counts is None:
            if strategy == "constant":
                raise InputError("strategy.constant.nb: a count per class is required")
            n = min(available.values())
            logger.info("PolygonSampleSelection balanced: %d points per class (the smallest "
                        "class)", n)
        else:
            n = int(counts)
            if n < 1:
                raise InputError(f"{param}: {counts!r} must be ≥ 1")
        quotas = dict.fromkeys(available, n)
    for code, n in quotas.items():
        have = stats.per_class.get(code, 0)
        if n > have:
            raise InputError(
                f"{param}: {n} points requested for class {stats.class_key(code)} but its "
                f"polygons cover only {have} pixels (at most one point per pixel)"
            )
    return {c: n for c, n in quotas.items() if n > 0}


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
        Raster whose grid the points are placed on (``in``).
    polygons
        Polygon vector file (``vec``); reprojected to the raster's CRS when needed.
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
    info = _open_info(raster, "in")
    polys = _read_polygons(polygons, field, info.grid.crs)
    stats = _statistics(info, polys, nodata, quiet)
    if int(stats.per_polygon.sum()) == 0:
        raise NoSamplesError(
            f"vec: no polygon of {os.fspath(polygons)!r} covers a pixel centre of "
            f"{info.path!r} (check that they overlap)"
        )
    quotas = _polygon_quotas(strategy, counts, stats)
    if not quotas:
        raise NoSamplesError("strategy: the quotas select no point")
    classes = np.array(sorted(c for c, n in stats.per_class.items() if n > 0), dtype=np.int64)
    class_counts = np.array([stats.per_class[c] for c in classes.tolist()], dtype=np.int64)
    targets = np.array([quotas.get(c, 0) for c in classes.tolist()], dtype=np.int64)
    rng = np.random.default_rng(seed)
    ranks = _random_ranks(class_counts, targets, rng)
    cols, rows, cls, poly = _rank_selection(
        lambda: _polygon_strips(info, polys, nodata, quiet), classes, class_counts, ranks, 0)
    grid = info.grid
    if mode == "grid":
        x, y = _pixel_centres(grid, cols, rows)
    else:
        sx, sy = grid.spacing
        u = rng.uniform(EDGE_MARGIN, 1 - EDGE_MARGIN, size=(2, len(cols)))
        x = grid.x0 + (cols + u[0]) * sx
        y = grid.y0 - (rows + u[1]) * sy
    fields: dict[str, np.ndarray] = {
        "class": cls, "id": np.arange(len(cols), dtype=np.int64),
        "polygon": poly if poly is not None else np.empty(0, np.int64)}
    if stats.class_names is not None:
        fields["class_name"] = np.array([stats.class_names[c] for c in cls.tolist()],
                                        dtype=object)
    logger.info("PolygonSampleSelection: %d points (%s), strategy %s, mode %s", len(cols),
                ", ".join(f"{stats.class_key(c)}: {n}" for c, n in sorted(quotas.items())),
                strategy, mode)
    return PolygonSamples(Samples(x, y, fields, grid.crs), stats, quotas)
