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

Errors and log records name parameters by the keywords of :func:`confusion_matrix`,
their neutral identifiers (``map_path``, ``reference``, ``field``, ``reference_nodata``,
``map_nodata``, ``out``, ``format``, ``kind``, ``box``); a facade respells them
(:mod:`terrapatch.spelling`; the ``ComputeConfusionMatrix`` application gives OTB's keys).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.evaluation.compare import (
    STRIP_PIXELS,
    _compare_rasters,
    _compare_vector,
    _open_raster,
    _read_features,
)
from terrapatch.evaluation.matrix import FORMATS, MAX_CLASSES, ConfusionMatrix
from terrapatch.progress import logger
from terrapatch.raster import is_remote
from terrapatch.tiling import crop_box
from terrapatch.vector import VECTOR_DRIVERS
from terrapatch.writer import check_writable, claimed

__all__ = [
    "FORMATS",
    "KINDS",
    "MAX_CLASSES",
    "STRIP_PIXELS",
    "ConfusionMatrix",
    "claim_table",
    "confusion_matrix",
]

PathLike = str | os.PathLike[str]

#: Kinds of reference.
KINDS = ("raster", "vector")
#: Vector extensions, for the hint when a vector file is read as a raster.
_VECTOR_SUFFIXES = (*VECTOR_DRIVERS, ".sqlite", ".kml", ".gml", ".fgb")


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
                raise InputError(f"{parameter}: {text!r} is also {key}={member!r}; the CSV "
                                 "would replace its input")
    suffix = Path(text).suffix.lower()
    if suffix != ".csv":
        raise InputError(f"{parameter}: {text!r} has extension {suffix or '(none)'!r}; a "
                         "confusion matrix is written as .csv")
    check_writable(text, parameter)
    with claimed(text, parameter):
        yield Path(text)


# ================================================================ the comparison


def _resolve_kind(reference: PathLike, kind: str | None, field: str | None) -> str:
    """``kind``, checked, or the reference's kind: vector when ``field`` is given."""
    if kind is not None:
        if kind not in KINDS:
            raise InputError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "vector" and not field:
            raise InputError("field: missing; a vector reference needs its integer class "
                             "field")
        return kind
    if field:
        return "vector"
    if Path(os.fspath(reference)).suffix.lower() in _VECTOR_SUFFIXES:
        raise InputError(f"field: missing; {os.fspath(reference)!r} looks like a vector "
                         "file, which needs its integer class field")
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
    if format not in FORMATS:
        raise InputError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    kind = _resolve_kind(reference, kind, field)
    if out is None:
        return _confusion(map_path, reference, field, kind, reference_nodata, map_nodata,
                          box, quiet)
    with claim_table(out, {"map_path": map_path, "reference": reference}):
        result = _confusion(map_path, reference, field, kind, reference_nodata, map_nodata,
                            box, quiet)
        result.to_csv(out, format)
    logger.info("confusion matrix written to %s", os.fspath(out))
    return result


def _confusion(map_path: PathLike, reference: PathLike, field: str | None, kind: str,
               reference_nodata: float | None, map_nodata: float | None,
               box: Sequence[int] | None, quiet: bool) -> ConfusionMatrix:
    """The counts of :func:`confusion_matrix`, logged; no label compared is an error."""
    map_raster = _open_raster(map_path, "map_path")
    region, _ = crop_box(box, map_raster.grid.width, map_raster.grid.height)
    if kind == "raster":
        suffix = Path(os.fspath(reference)).suffix.lower()
        hint = "; a vector file needs its class field" if suffix in _VECTOR_SUFFIXES else ""
        ref = _open_raster(reference, "reference", hint)
        tally = _compare_rasters(map_raster, ref, region, map_nodata, reference_nodata, quiet)
    else:
        assert field is not None  # _resolve_kind checked it
        features = _read_features(reference, field, map_raster)
        tally = _compare_vector(map_raster, features, region, map_nodata, reference_nodata,
                                quiet)
    result = tally.matrix
    if tally.covered == 0:
        raise NoSamplesError(f"reference: {os.fspath(reference)!r} holds no label where it "
                             "overlaps map_path (all no-data)")
    if result.total == 0:
        raise NoSamplesError(
            f"map_path: no pixel of {os.fspath(map_path)!r} holds a label where the "
            f"reference does ({tally.covered} reference pixel(s), all no-data in the map)"
        )
    only_map = result.labels[(result.support == 0) & (result.predicted > 0)]
    if len(only_map):
        logger.warning("map_path: class(es) %s of the map are absent from the reference "
                       "(reported as rows of zeros)", ", ".join(str(v) for v in only_map))
    only_ref = result.labels[(result.predicted == 0) & (result.support > 0)]
    if len(only_ref):
        logger.info("reference: reference class(es) %s never appear in the map",
                    ", ".join(str(v) for v in only_ref))
    logger.info("confusion matrix: %d pixels, %d classes, overall accuracy %.4f, kappa %.4f",
                result.total, len(result.labels), result.overall_accuracy, result.kappa)
    return result
