"""The confusion matrix: counts of (reference, map) label pairs and the scores they give.

:class:`ConfusionMatrix` holds the counts (rows = reference labels, columns = map
labels, OTB's layout), overall accuracy, Cohen's kappa, per-class precision, recall
and F1, and writes OTB's CSV layouts (:data:`FORMATS`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.errors import (
    InputError,
)
from terrapatch.raster import nodata_mask
from terrapatch.writer import atomic_output

__all__ = ["FORMATS", "MAX_CLASSES", "ConfusionMatrix"]

PathLike = str | os.PathLike[str]

#: CSV layouts of :meth:`ConfusionMatrix.to_csv`.
FORMATS = ("confusionmatrix", "contingencytable", "classificationreport")
#: Most distinct labels a comparison may hold (the matrix is dense).
MAX_CLASSES = 4096
#: Label span under which pairs are counted by offset, without sorting.
_DIRECT_SPAN = 1024


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
