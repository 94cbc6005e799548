"""Evaluate a class map against a reference: confusion matrix and accuracy metrics.

:func:`confusion_matrix` compares an integer class map (band 1 of a raster) with a
reference that is either a raster of class labels or a vector file of labelled
polygons (or points) with an integer class field, and returns a
:class:`ConfusionMatrix`: counts with rows = reference labels and columns = map labels
(OTB's ``ComputeConfusionMatrix`` layout), overall accuracy, Cohen's kappa and per-class
precision, recall and F1. The map is read in strips of rows, so memory stays bounded on
maps of any size; counts are accumulated with :func:`numpy.bincount`.

Geometry: the comparison is made on the map's grid, over the part the reference covers.
Polygons are rasterised on the map grid with the pixel-centre rule (``all_touched`` off;
where they overlap, the later feature wins); a point labels the pixel containing it. A
reference raster on another grid of the same CRS is read at the pixel containing each
map pixel centre (nearest, no resampling) when the two grids nest: equal spacings with
a whole-pixel offset, or one spacing an integer multiple of the other with pixel edges
aligned. Other grids are refused.

Errors name parameters by neutral identifiers (``map``, ``reference``, ``field``,
``reference_nodata``, ``map_nodata``, ``out``, ``format``, ``kind``, ``box``); callers
pass ``names`` to spell them their own way (the ``ComputeConfusionMatrix`` application
passes OTB's keys).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
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
from terrapatch.geometry import SNAP_TOLERANCE, Grid, check_same_crs, crop_box, crs_label
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import is_remote, nodata_mask
from terrapatch.vector import VECTOR_DRIVERS, read_layers
from terrapatch.writer import atomic_output, check_writable, claimed, failure_reason

PathLike = str | os.PathLike[str]

#: CSV layouts of :meth:`ConfusionMatrix.to_csv`.
FORMATS = ("confusionmatrix", "contingencytable", "classificationreport")
#: Kinds of reference.
KINDS = ("raster", "vector")
#: Neutral parameter identifiers, as error messages name them unless ``names`` says
#: otherwise.
NAMES: dict[str, str] = {key: key for key in (
    "map", "reference", "field", "reference_nodata", "map_nodata", "out", "format", "kind",
    "box")}
#: Map pixels read per strip (with the reference pixels they are compared with).
STRIP_PIXELS = 1 << 22
#: Most distinct labels a comparison may hold (the matrix is dense).
MAX_CLASSES = 4096
#: Label span under which pairs are counted by offset, without sorting.
_DIRECT_SPAN = 1024
#: Vector extensions, for the hint when a vector file is read as a raster.
_VECTOR_SUFFIXES = (*VECTOR_DRIVERS, ".sqlite", ".kml", ".gml", ".fgb")
#: Geometry type ids (shapely) a vector reference may hold: points and polygons.
_REFERENCE_GEOMETRIES = (0, 3, 4, 6)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` in float64, NaN where ``den`` is 0."""
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _count_pairs(reference: np.ndarray, produced: np.ndarray, name: str = "map"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Labels seen and their square count matrix for paired int64 label vectors.

    More than :data:`MAX_CLASSES` labels is an error naming ``name``.
    """
    if reference.size == 0:
        return np.empty(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
    lo = int(min(reference.min(), produced.min()))
    hi = int(max(reference.max(), produced.max()))
    span = hi - lo + 1
    if span <= _DIRECT_SPAN:
        codes = (reference - lo) * span + (produced - lo)
        counts = np.bincount(codes, minlength=span * span).reshape(span, span)
        present = np.flatnonzero(counts.any(axis=0) | counts.any(axis=1))
        return present.astype(np.int64) + lo, counts[np.ix_(present, present)]
    labels, inverse = np.unique(np.concatenate([reference, produced]), return_inverse=True)
    k = len(labels)
    if k > MAX_CLASSES:
        raise InputError(f"{name}: {k} distinct labels; a class map holds at most "
                         f"{MAX_CLASSES} classes (is it a class map?)")
    ref_codes, prod_codes = inverse[:reference.size], inverse[reference.size:]
    counts = np.bincount(ref_codes * k + prod_codes, minlength=k * k).reshape(k, k)
    return labels.astype(np.int64), counts


def _integer_values(values: np.ndarray, name: str, what: str) -> np.ndarray:
    """Labels as int64; a non-finite or fractional value is an error naming ``name``."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise InputError(f"{name}: {what} holds {values.dtype} values, not integer labels")
    bad = ~np.isfinite(values) | (values != np.trunc(values))
    if bad.any():
        first = values[bad][0].item()
        raise InputError(f"{name}: value {first!r} of {what} is not an integer class label "
                         "(set the no-data label for pixels without a class)")
    return values.astype(np.int64)


@dataclass(frozen=True, eq=False)
class ConfusionMatrix:
    """Pixel counts of a class map against a reference, and the accuracy they give.

    Rows are reference labels, columns map (produced) labels, both in the order of
    :attr:`labels`: ``matrix[i, j]`` counts the pixels of reference class
    ``labels[i]`` that the map labels ``labels[j]``. Ratios whose denominator is zero
    (``0 / 0``) are NaN: the precision of a class the map never produces, the recall of
    a class absent from the reference, kappa when chance agreement is 1.

    Attributes
    ----------
    labels
        Sorted class labels (int64): the union of the classes of the map and of the
        reference among the compared pixels.
    matrix
        ``(n, n)`` int64 counts, read-only.

    Examples
    --------
    >>> cm = ConfusionMatrix.from_arrays([1, 1, 2, 2], [1, 2, 2, 2])
    >>> cm.matrix.tolist()
    [[1, 1], [0, 2]]
    >>> float(cm.overall_accuracy)
    0.75
    """

    labels: np.ndarray
    matrix: np.ndarray

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        matrix = np.array(self.matrix, dtype=np.int64)
        n = len(labels)
        if matrix.shape != (n, n):
            raise InputError(f"matrix: shape {matrix.shape} does not match {n} labels")
        if n > 1 and not (np.diff(labels) > 0).all():
            raise InputError(f"labels: {labels.tolist()} must be sorted and unique")
        if (matrix < 0).any():
            raise InputError("matrix: counts must be ≥ 0")
        labels.setflags(write=False)
        matrix.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "matrix", matrix)

    @classmethod
    def from_arrays(cls, reference: Any, produced: Any, labels: Sequence[int] | None = None,
                    *, reference_nodata: float | None = None,
                    produced_nodata: float | None = None) -> ConfusionMatrix:
        """Count pairs of labels of two arrays of the same shape.

        Parameters
        ----------
        reference, produced
            Reference and map labels (integers, or reals holding integers).
        labels
            Classes of the matrix, in any order (sorted in the result). Pairs with a
            label outside them are not counted. Default: every label seen.
        reference_nodata, produced_nodata
            Labels whose pixels are not counted (NaN matches NaN).

        Returns
        -------
        ConfusionMatrix
            The counts.
        """
        ref = np.asarray(reference)
        prod = np.asarray(produced)
        if ref.shape != prod.shape:
            raise InputError(f"produced: shape {prod.shape} differs from the reference's "
                             f"{ref.shape}")
        valid = np.ones(ref.shape, dtype=bool)
        if reference_nodata is not None:
            valid &= ~nodata_mask(ref, float(reference_nodata))
        if produced_nodata is not None:
            valid &= ~nodata_mask(prod, float(produced_nodata))
        r = _integer_values(ref[valid], "reference", "the reference")
        p = _integer_values(prod[valid], "produced", "the map")
        if labels is not None:
            wanted = np.unique(np.asarray(labels, dtype=np.int64))
            keep = np.isin(r, wanted) & np.isin(p, wanted)
            seen, counts = _count_pairs(r[keep], p[keep], "produced")
            return cls(wanted, np.zeros((len(wanted), len(wanted)), np.int64)) + \
                cls(seen, counts)
        return cls(*_count_pairs(r, p, "produced"))

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Counts of both matrices over the union of their labels."""
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        labels = np.union1d(self.labels, other.labels).astype(np.int64)
        total = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for part in (self, other):
            index = np.searchsorted(labels, part.labels)
            total[np.ix_(index, index)] += part.matrix
        return ConfusionMatrix(labels, total)

    # ---------------------------------------------------------------- counts

    @property
    def total(self) -> int:
        """Number of pixels compared."""
        return int(self.matrix.sum())

    @property
    def support(self) -> np.ndarray:
        """Reference pixels per class (row sums)."""
        return np.asarray(self.matrix.sum(axis=1))

    @property
    def predicted(self) -> np.ndarray:
        """Map pixels per class (column sums)."""
        return np.asarray(self.matrix.sum(axis=0))

    @property
    def correct(self) -> np.ndarray:
        """Pixels of each class labelled right (the diagonal)."""
        return np.asarray(np.diagonal(self.matrix))

    # ---------------------------------------------------------------- metrics

    @property
    def overall_accuracy(self) -> float:
        """Share of pixels labelled right: ``trace / N`` (NaN when nothing is compared)."""
        total = self.total
        return float(self.correct.sum()) / total if total else float("nan")

    @property
    def kappa(self) -> float:
        """Cohen's kappa ``(p_o - p_e) / (1 - p_e)``, ``p_e = Σ_i n_i+ · n_+i / N²``.

        NaN when ``p_e = 1`` (both sides hold one and the same class) or nothing is
        compared.
        """
        n = float(self.total)
        if n == 0:
            return float("nan")
        p_o = float(self.correct.sum()) / n
        p_e = float(self.support.astype(np.float64) @ self.predicted.astype(np.float64)) / n**2
        if abs(1.0 - p_e) <= 1e-15:
            return float("nan")
        return (p_o - p_e) / (1.0 - p_e)

    @property
    def precision(self) -> np.ndarray:
        """Per class ``n_ii / n_+i`` (user's accuracy); NaN for a class the map never gives."""
        return _ratio(self.correct.astype(np.float64), self.predicted)

    @property
    def recall(self) -> np.ndarray:
        """Per class ``n_ii / n_i+`` (producer's accuracy); NaN for a class not in the reference."""
        return _ratio(self.correct.astype(np.float64), self.support)

    @property
    def f1(self) -> np.ndarray:
        """Per class F1 ``2 n_ii / (n_i+ + n_+i)``, which is ``2PR / (P + R)``.

        NaN only for a class in neither side; 0 for a class the map never gets right
        (also when the map never produces it, so that its precision is NaN).
        """
        return _ratio(2.0 * self.correct, self.support + self.predicted)

    def per_class(self) -> dict[int, dict[str, float]]:
        """Label → ``{"precision", "recall", "f1", "support"}``."""
        return {int(label): {"precision": float(p), "recall": float(r), "f1": float(f),
                             "support": float(s)}
                for label, p, r, f, s in zip(self.labels, self.precision, self.recall,
                                             self.f1, self.support, strict=True)}

    # ---------------------------------------------------------------- output

    def csv_text(self, format: str = "confusionmatrix") -> str:
        """The CSV text of :meth:`to_csv`."""
        if format == "confusionmatrix":
            return _matrix_csv(self.labels, self.labels, self.matrix)
        if format == "contingencytable":
            rows = np.flatnonzero(self.support > 0)
            cols = np.flatnonzero(self.predicted > 0)
            return _matrix_csv(self.labels[rows], self.labels[cols],
                               self.matrix[np.ix_(rows, cols)])
        if format == "classificationreport":
            lines = [f"#Overall accuracy:{_number(self.overall_accuracy)}",
                     f"#Kappa:{_number(self.kappa)}",
                     f"#Pixels:{self.total}",
                     "label,precision,recall,f1,support"]
            for label, p, r, f, s in zip(self.labels, self.precision, self.recall, self.f1,
                                         self.support, strict=True):
                lines.append(f"{label},{_number(p)},{_number(r)},{_number(f)},{s}")
            return "\n".join(lines) + "\n"
        raise InputError(f"format: {format!r} is not one of {', '.join(FORMATS)}")

    def to_csv(self, path: PathLike, format: str = "confusionmatrix",
               parameter: str = "out") -> Path:
        """Write the matrix or the report as CSV, atomically.

        Parameters
        ----------
        path
            Output ``.csv`` file.
        format
            ``confusionmatrix``: OTB's layout, two comment lines ``#Reference labels
            (rows):1,2,3`` and ``#Produced labels (columns):1,2,3`` then one line of
            counts per reference label, over the union of labels;
            ``contingencytable``: the same layout, rows only the reference's labels and
            columns only the map's; ``classificationreport``: comment lines
            ``#Overall accuracy:``, ``#Kappa:``, ``#Pixels:``, then
            ``label,precision,recall,f1,support`` per class (NaN written ``nan``).
        parameter
            Name of the output in error messages.

        Returns
        -------
        Path
            The file written.
        """
        text = self.csv_text(format)
        target = Path(path)
        with atomic_output(target, parameter) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return target

    def describe(self) -> str:
        """A text table: the matrix, per-class scores, overall accuracy and kappa."""
        labels = [str(v) for v in self.labels]
        cells = [[str(v) for v in row] for row in self.matrix]
        width = max([len("ref\\map"), *(len(t) for t in labels),
                     *(len(t) for row in cells for t in row)])
        lines = [f"Confusion matrix: {self.total} pixels (rows: reference, columns: map)",
                 " ".join(f"{t:>{width}}" for t in ["ref\\map", *labels])]
        lines += [" ".join(f"{t:>{width}}" for t in [label, *row])
                  for label, row in zip(labels, cells, strict=True)]
        lines += ["", f"{'class':>{width}} {'precision':>9} {'recall':>9} {'f1':>9} "
                  f"{'support':>9}"]
        for label, p, r, f, s in zip(labels, self.precision, self.recall, self.f1,
                                     self.support, strict=True):
            lines.append(f"{label:>{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {s:>9d}")
        lines += ["", f"overall accuracy {self.overall_accuracy:.4f}, kappa {self.kappa:.4f}"]
        return "\n".join(lines)


def _number(value: float) -> str:
    return "nan" if np.isnan(value) else format(float(value), ".12g")


def _matrix_csv(rows: np.ndarray, cols: np.ndarray, matrix: np.ndarray) -> str:
    lines = ["#Reference labels (rows):" + ",".join(str(v) for v in rows),
             "#Produced labels (columns):" + ",".join(str(v) for v in cols)]
    lines += [",".join(str(v) for v in row) for row in matrix]
    return "\n".join(lines) + "\n"


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

    def add(self, reference: np.ndarray, produced: np.ndarray, names: Mapping[str, str],
            map_path: str, reference_what: str) -> None:
        r = _integer_values(reference, names["reference"], reference_what)
        p = _integer_values(produced, names["map"], repr(map_path))
        labels, counts = _count_pairs(r, p, names["map"])
        if len(labels):
            self.matrix = self.matrix + ConfusionMatrix(labels, counts)
            if len(self.matrix.labels) > MAX_CLASSES:
                raise InputError(f"{names['map']}: more than {MAX_CLASSES} distinct labels; "
                                 "a class map holds fewer classes (is it a class map?)")


def _compare_rasters(map_raster: _Raster, ref: _Raster, region: tuple[int, int, int, int],
                     map_nodata: float | None, reference_nodata: float | None,
                     names: Mapping[str, str], quiet: bool) -> _Tally:
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
            f"{names['map']} {map_raster.path!r} (bounds "
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
            tally.add(reference[valid], produced[valid], names, map_raster.path,
                      repr(ref.path))
            bar.update(1)
    return tally


@dataclass(frozen=True)
class _Features:
    geoms: np.ndarray
    classes: np.ndarray
    path: str


def _read_features(path: PathLike, field: str, map_raster: _Raster,
                   names: Mapping[str, str]) -> _Features:
    """Points and polygons with an integer ``field``, from every layer holding it."""
    text = os.fspath(path)
    name, field_name = names["reference"], names["field"]
    if not is_remote(text) and not Path(text).exists():
        raise MissingInputError(f"{name}: file {text!r} does not exist")
    try:
        layers_info = [pyogrio.read_info(text, layer=str(layer))
                       for layer, _ in pyogrio.list_layers(text)]
    except Exception as exc:
        raise InputError(f"{name}: {text!r} is not a readable vector file "
                         f"({failure_reason(exc)})") from None
    fields: list[str] = []
    for info in layers_info:
        for f, dtype in zip(info["fields"], info["dtypes"], strict=True):
            fields.extend([str(f)] if str(f) not in fields else [])
            kind = np.dtype(dtype).kind
            if str(f) == field and kind not in "iuf":
                shown = "string" if kind in "OSU" else str(dtype)
                raise InputError(f"{field_name}: field {field!r} of {text!r} holds {shown} "
                                 "values, not integer classes")
    if field not in fields:
        raise InputError(f"{field_name}: {field!r} is not a field of {text!r} "
                         f"(fields: {', '.join(fields) or 'none'})")
    layers, skipped = read_layers(text, field, _REFERENCE_GEOMETRIES, "a point or a polygon",
                                  name)
    geoms: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    crs = map_raster.grid.crs
    for layer in layers:
        if layer.crs is not None and crs is not None and layer.crs != crs:
            raise CRSMismatchError(
                f"{name}: CRS {crs_label(layer.crs)} of layer {layer.name!r} in {text!r} "
                f"differs from {names['map']} CRS {crs_label(crs)}; reproject the vector "
                f"(e.g. ogr2ogr -t_srs {crs_label(crs)})"
            )
        if layer.crs is None and crs is not None and len(layer.geometries):
            logger.warning("%s: layer %r of %s has no CRS; assuming the map's", name,
                           layer.name, text)
        values = np.asarray(layer.values)
        if values.dtype.kind == "O":  # e.g. a shapefile integer column read with nulls
            values = values.astype(np.float64)
        classes.append(_integer_values(values, field_name,
                                       f"field {field!r} of layer {layer.name!r} in {text!r}"))
        geoms.append(layer.geometries)
    if skipped:
        logger.info("%s: %d feature(s) without geometry or %r value skipped", name, skipped,
                    field)
    return _Features(np.concatenate(geoms), np.concatenate(classes), text)


def _compare_vector(map_raster: _Raster, features: _Features,
                    region: tuple[int, int, int, int], map_nodata: float | None,
                    reference_nodata: float | None, names: Mapping[str, str],
                    quiet: bool) -> _Tally:
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
            f"{names['reference']}: no feature of {features.path!r} (bounds "
            f"{_bounds(extent)}) overlaps {names['map']} {map_raster.path!r} (bounds "
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
            tally.add(reference[valid], produced[valid], names, map_raster.path,
                      repr(features.path))
    if tally.covered == 0:
        raise NoSamplesError(f"{names['reference']}: no feature of {features.path!r} covers "
                             f"a pixel centre of {names['map']} {map_raster.path!r}")
    return tally


# ================================================================ output check


def _input_files(path: PathLike) -> list[str]:
    """An input and the files it is made of (a shapefile's parts, a raster's sidecars)."""
    text = os.fspath(path)
    if is_remote(text):
        return []
    p = Path(text)
    parts = [os.fspath(p.with_suffix(s)) for s in (".shp", ".dbf", ".shx", ".prj", ".cpg")] \
        if p.suffix.lower() == ".shp" else []
    return [text, *parts, *(text + s for s in (".aux.xml", ".ovr", ".msk"))]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def claim_table(path: PathLike, inputs: Mapping[str, PathLike | None],
                parameter: str = "out") -> Iterator[Path]:
    """Check a CSV output before any work, then hold its lock for the run.

    Refuses, in one line naming ``parameter``: an output that is one of ``inputs``
    (same path or same file, a shapefile's parts and a raster's sidecars included), an
    extension other than ``.csv``, and a place that cannot be written.

    Yields
    ------
    Path
        The output path; write it with :meth:`ConfusionMatrix.to_csv` (or
        :func:`~terrapatch.writer.atomic_output`) in the same thread.
    """
    text = os.fspath(path)
    for key, given in inputs.items():
        if given is None:
            continue
        for member in _input_files(given):
            if os.path.lexists(member) and _same_file(text, member):
                shown = "" if member == os.fspath(given) else f" ({member!r})"
                raise InputError(f"{parameter}: {text!r} is also {key}{shown}; the CSV would "
                                 "replace its input")
    suffix = Path(text).suffix.lower()
    if suffix != ".csv":
        raise InputError(f"{parameter}: {text!r} has extension {suffix or '(none)'!r}; a "
                         "confusion matrix is written as .csv")
    check_writable(text, parameter)
    with claimed(text, parameter):
        yield Path(text)


# ================================================================ the comparison


def _resolve_kind(reference: PathLike, kind: str | None, field: str | None,
                  names: Mapping[str, str]) -> str:
    if kind is not None:
        if kind not in KINDS:
            raise InputError(f"{names['kind']}: {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "vector" and not field:
            raise InputError(f"{names['field']}: missing; a vector reference needs its "
                             "integer class field")
        return kind
    if field:
        return "vector"
    if Path(os.fspath(reference)).suffix.lower() in _VECTOR_SUFFIXES:
        raise InputError(f"{names['field']}: missing; {os.fspath(reference)!r} looks like a "
                         "vector file, which needs its integer class field")
    return "raster"


def confusion_matrix(
    map_path: PathLike,
    reference: PathLike,
    field: str | None = None,
    reference_nodata: float | None = None,
    map_nodata: float | None = None,
    box: Sequence[int] | None = None,
    *,
    kind: str | None = None,
    out: PathLike | None = None,
    format: str = "confusionmatrix",
    quiet: bool = False,
    names: Mapping[str, str] | None = None,
) -> ConfusionMatrix:
    """Compare a class map with a reference raster or vector (OTB ``ComputeConfusionMatrix``).

    Parameters
    ----------
    map_path
        Class map: band 1 holds integer labels (any integer type, or reals holding
        integers). Pixels equal to the file's nodata tag or to ``map_nodata`` are not
        compared.
    reference
        Reference labels: a raster (band 1; on a grid that nests with the map's) or a
        vector file of polygons and/or points (every layer holding ``field``).
    field
        Integer class field of a vector reference (integer, or reals holding integers).
    reference_nodata
        Reference label not compared (besides, for a raster, its nodata tag; for a
        vector, pixels no feature covers).
    map_nodata
        Map label not compared.
    box
        ``(col_off, row_off, width, height)`` of the map, in map pixels, to compare
        only that part.
    kind
        ``"raster"`` or ``"vector"``; default: vector when ``field`` is given.
    out
        Optional ``.csv`` output, checked before any work and written atomically.
    format
        Layout of ``out``: one of :data:`FORMATS` (see :meth:`ConfusionMatrix.to_csv`).
    quiet
        No progress bar.
    names
        Neutral parameter identifier (:data:`NAMES`) → spelling in error messages.

    Returns
    -------
    ConfusionMatrix
        Counts over the pixels where both the map and the reference hold a label.

    Raises
    ------
    InputError
        A missing or unreadable input, a non-integer label or field, a CRS mismatch,
        grids that do not nest, no overlap, or a bad output.
    """
    n = {**NAMES, **(names or {})}
    if format not in FORMATS:
        raise InputError(f"{n['format']}: {format!r} is not one of {', '.join(FORMATS)}")
    kind = _resolve_kind(reference, kind, field, n)
    if out is None:
        return _confusion(map_path, reference, field, kind, reference_nodata, map_nodata,
                          box, quiet, n)
    with claim_table(out, {n["map"]: map_path, n["reference"]: reference}, n["out"]):
        result = _confusion(map_path, reference, field, kind, reference_nodata, map_nodata,
                            box, quiet, n)
        result.to_csv(out, format, n["out"])
    logger.info("confusion matrix written to %s", os.fspath(out))
    return result


def _confusion(map_path: PathLike, reference: PathLike, field: str | None, kind: str,
               reference_nodata: float | None, map_nodata: float | None,
               box: Sequence[int] | None, quiet: bool, n: Mapping[str, str]
               ) -> ConfusionMatrix:
    map_raster = _open_raster(map_path, n["map"])
    region, _ = crop_box(box, map_raster.grid.width, map_raster.grid.height)
    if kind == "raster":
        suffix = Path(os.fspath(reference)).suffix.lower()
        hint = "; a vector file needs its class field" if suffix in _VECTOR_SUFFIXES else ""
        ref = _open_raster(reference, n["reference"], hint)
        tally = _compare_rasters(map_raster, ref, region, map_nodata, reference_nodata, n,
                                 quiet)
    else:
        assert field is not None  # _resolve_kind checked it
        features = _read_features(reference, field, map_raster, n)
        tally = _compare_vector(map_raster, features, region, map_nodata, reference_nodata,
                                n, quiet)
    result = tally.matrix
    if tally.covered == 0:
        raise NoSamplesError(f"{n['reference']}: {os.fspath(reference)!r} holds no label "
                             f"where it overlaps {n['map']} (all no-data)")
    if result.total == 0:
        raise NoSamplesError(
            f"{n['map']}: no pixel of {os.fspath(map_path)!r} holds a label where "
            f"{n['reference']} does ({tally.covered} reference pixel(s), all no-data in the "
            "map)"
        )
    only_map = result.labels[(result.support == 0) & (result.predicted > 0)]
    if len(only_map):
        logger.warning("%s: class(es) %s of the map are absent from %s (reported as rows "
                       "of zeros)", n["map"], ", ".join(str(v) for v in only_map),
                       n["reference"])
    only_ref = result.labels[(result.predicted == 0) & (result.support > 0)]
    if len(only_ref):
        logger.info("%s: reference class(es) %s never appear in the map", n["reference"],
                    ", ".join(str(v) for v in only_ref))
    logger.info("confusion matrix: %d pixels, %d classes, overall accuracy %.4f, kappa %.4f",
                result.total, len(result.labels), result.overall_accuracy, result.kappa)
    return result
