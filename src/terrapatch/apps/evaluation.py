"""ComputeConfusionMatrix application: OTB keys over :func:`terrapatch.evaluation.confusion_matrix`.

See ``docs/evaluation.md``. The core names its parameters by their keywords
(:mod:`terrapatch.spelling`); :data:`EVALUATION_NAMES` and :func:`reference_names` give
their OTB keys.
"""

from __future__ import annotations

from terrapatch.apps._base import App, Param
from terrapatch.errors import ParameterError
from terrapatch.evaluation import FORMATS, ConfusionMatrix, confusion_matrix
from terrapatch.progress import logger
from terrapatch.spelling import respelled

#: OTB keys of :func:`~terrapatch.evaluation.confusion_matrix`'s identifiers that do not
#: depend on the kind of reference.
EVALUATION_NAMES = {"map_path": "in", "field": "ref.vector.field", "map_nodata": "nodatalabel",
                    "kind": "ref", "out": "out", "format": "format"}


def reference_names(kind: str) -> dict[str, str]:
    """OTB keys of the reference's identifiers for a ``raster`` or ``vector`` reference."""
    return {"reference": f"ref.{kind}.in", "reference_nodata": f"ref.{kind}.nodata"}



class ComputeConfusionMatrix(App):
    """Confusion matrix of a class map against a reference raster or vector (OTB app).

    Examples
    --------
    >>> from terrapatch.apps import ComputeConfusionMatrix  # doctest: +SKIP
    >>> cm = ComputeConfusionMatrix({"in": "map.tif", "ref": "vector",  # doctest: +SKIP
    ...                              "ref.vector.in": "truth.gpkg",
    ...                              "ref.vector.field": "class",
    ...                              "out": "matrix.csv"}).result
    >>> print(cm.describe())  # doctest: +SKIP
    """

    name = "ComputeConfusionMatrix"
    description = ("confusion matrix of a class map against a reference raster or vector "
                   "(rows: reference labels, columns: map labels), with overall accuracy, "
                   "kappa and per-class precision, recall and F1")
    primary_output = "out"
    spelling = EVALUATION_NAMES
    params = (
        Param("in", "path", "class map (integer labels, band 1)", required=True),
        Param("out", "outvec", "output CSV (.csv)", required=True),
        Param("format", "choice", "confusionmatrix: OTB's matrix over the union of labels; "
              "contingencytable: rows the reference's labels, columns the map's; "
              "classificationreport: per-class precision, recall, F1, support, with "
              "overall accuracy and kappa", default="confusionmatrix", choices=FORMATS),
        Param("ref", "choice", "reference type (default raster; vector when only "
              "ref.vector.* is given)", choices=("raster", "vector")),
        Param("ref.raster.in", "path", "reference raster (band 1), on a grid nested with "
              "in's"),
        Param("ref.raster.nodata", "int", "reference label not compared (the file's nodata "
              "is never compared)"),
        Param("ref.vector.in", "path", "reference polygons and/or points (rasterised on in's "
              "grid, pixel centres)"),
        Param("ref.vector.field", "str", "integer class field of ref.vector.in"),
        Param("ref.vector.nodata", "int", "class value of features not compared"),
        Param("nodatalabel", "int", "map label not compared (the file's nodata is never "
              "compared)"),
        Param("ram", "int", "accepted for OTB compatibility; ignored (memory is bounded by "
              "strips of rows)"),
    )

    def run(self) -> ConfusionMatrix:
        """Compute the matrix and write the CSV."""
        kind = self.get("ref")
        if kind is None:
            vector_only = self.get("ref.vector.in") and not self.get("ref.raster.in")
            kind = "vector" if vector_only else "raster"
        other = "vector" if kind == "raster" else "raster"
        for key in [k for k in self.values if k.startswith(f"ref.{other}.")]:
            logger.warning("%s is ignored with -ref %s", key, kind)
        reference = self.get(f"ref.{kind}.in")
        if not reference:
            raise ParameterError(f"ref.{kind}.in: missing mandatory parameter of {self.name} "
                                 f"(with -ref {kind})")
        field = self.get("ref.vector.field") if kind == "vector" else None
        if kind == "vector" and not field:
            raise ParameterError(f"ref.vector.field: missing mandatory parameter of "
                                 f"{self.name} (with -ref vector)")
        with respelled(reference_names(kind)):
            result = confusion_matrix(
                self.get("in"), reference, field=field, kind=kind,
                reference_nodata=self.get(f"ref.{kind}.nodata"),
                map_nodata=self.get("nodatalabel"), out=self.get("out"),
                format=self.get("format"), quiet=self.quiet)
        logger.info("%s", result.describe())
        return result
