"""Sample-selection applications: OTBTF's keys over :mod:`terrapatch.sampling`.

``PatchesSelection``, ``LabelImageSampleSelection`` and
``DensePolygonClassStatistics`` accept OTBTF's parameter keys (plus a ``seed``
and a few documented extensions); ``PolygonSampleSelection`` is terrapatch's own
(points drawn inside labelled polygons). See ``docs/selection.md``.

The core names parameters by its keywords (:mod:`terrapatch.spelling`); each
application's ``spelling`` gives their keys here (:data:`PATCHES_NAMES`,
:data:`LABEL_NAMES`, :data:`STATISTICS_NAMES`, :data:`POLYGON_NAMES`), and its
name to the core's log records (``grid selection: …`` reads ``PatchesSelection: …``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from terrapatch.apps._base import App, Param
from terrapatch.errors import InputError
from terrapatch.progress import logger
from terrapatch.sampling import (
    LABEL_STRATEGIES,
    PATCH_STRATEGIES,
    POLYGON_STRATEGIES,
    PatchSelection,
    PolygonSamples,
    PolygonStatistics,
    Samples,
    polygon_class_statistics,
    sample_polygons,
    select_from_label_image,
    select_patches,
)
from terrapatch.spelling import respelled
from terrapatch.writer import Output, claim_outputs

#: OTBTF keys of :func:`~terrapatch.sampling.select_patches`'s identifiers (the label
#: image is ``label``, or ``strategy.balanced.labelimage`` with strategy balanced).
PATCHES_NAMES = {
    "image": "in", "psize": "grid.psize", "step": "grid.step",
    "offset": "grid.offsetx/offsety", "offset[0]": "grid.offsetx", "offset[1]": "grid.offsety",
    "factor": "grid.factor", "proportions": "strategy.split.*prop",
    "proportions[0]": "strategy.split.trainprop", "proportions[1]": "strategy.split.validprop",
    "proportions[2]": "strategy.split.testprop", "spatial_proportion": "strategy.balanced.sp",
    "nclasses": "strategy.balanced.nclasses", "label_image": "label",
    "train": "outtrain", "valid": "outvalid", "test": "outtest",
    "grid selection": "PatchesSelection", "balanced grid selection": "PatchesSelection balanced",
}
#: OTBTF keys of :func:`~terrapatch.sampling.select_from_label_image`'s identifiers.
LABEL_NAMES = {"label_image": "inref", "count": "strategy.constant.nb",
               "total": "strategy.total.v", "method": "pick",
               "label selection": "LabelImageSampleSelection"}
#: OTBTF keys of :func:`~terrapatch.sampling.polygon_class_statistics`'s identifiers.
STATISTICS_NAMES = {"raster": "in", "polygons": "vec",
                    "polygon statistics": "DensePolygonClassStatistics"}
#: Keys of :func:`~terrapatch.sampling.sample_polygons`'s identifiers (``counts``: see
#: :func:`counts_names`).
POLYGON_NAMES = {"raster": "in", "polygons": "vec", "class_map": "outclassmap",
                 "polygon selection": "PolygonSampleSelection",
                 "balanced polygon selection": "PolygonSampleSelection balanced"}

_RAM = Param("ram", "int", "accepted for OTB compatibility; ignored (memory is bounded by "
             "strips of rows)")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class PatchesSelection(App):
    """Select patch positions on a grid, split into train/valid/test (OTBTF ``PatchesSelection``).

    Examples
    --------
    >>> from terrapatch.apps import PatchesSelection  # doctest: +SKIP
    >>> PatchesSelection({"in": "label.tif", "grid.step": 32, "grid.psize": 32,
    ...                   "strategy": "split", "strategy.split.trainprop": 80,
    ...                   "strategy.split.validprop": 20, "outtrain": "train.gpkg",
    ...                   "outvalid": "valid.gpkg"})
    """

    name = "PatchesSelection"
    description = ("choose patch positions on a regular grid of a raster (nodata / mask "
                   "filtered) and split them into train / valid / test point files")
    primary_output = "outtrain"
    spelling = PATCHES_NAMES
    params = (
        Param("in", "path", "reference image: defines the grid (and nodata pixels)",
              required=True),
        Param("mask", "path", "mask on the grid of in: non-zero = valid (every pixel of the "
              "patch must be valid)"),
        Param("nodata", "float", "pixel invalid when all its bands equal this value; a patch "
              "must be fully valid"),
        Param("grid.step", "int", "step between candidate patches (pixels)", required=True),
        Param("grid.psize", "int", "patch size (pixels)", required=True),
        Param("grid.offsetx", "int", "grid offset x (modulo step; patches start at "
              "offsetx + 1)", default=0),
        Param("grid.offsety", "int", "grid offset y (modulo step)", default=0),
        Param("grid.factor", "int", "terrapatch: factor of the extraction's sampling grid in "
              "pixels of in (2 for 10 m + 20 m sources with the 10 m image as source 1); "
              "keeps patches on that grid", default=1),
        Param("strategy", "choice", "how points are assigned to outputs",
              default="chessboard", choices=PATCH_STRATEGIES),
        Param("strategy.split.random", "bool", "shuffle the split sequence (seeded)",
              default=False),
        Param("strategy.split.trainprop", "float", "training share (percent or fraction)",
              default=50.0),
        Param("strategy.split.validprop", "float", "validation share (used if outvalid is set)",
              default=25.0),
        Param("strategy.split.testprop", "float", "test share (used if outtest is set)",
              default=25.0),
        Param("strategy.balanced.sp", "float", "share of candidates drawn at random before "
              "balancing", default=0.25),
        Param("strategy.balanced.nclasses", "int", "number of classes (labels 0..n-1); "
              "default: the values found in the label image"),
        Param("strategy.balanced.labelimage", "path", "label image on the grid of in "
              "(balanced strategy)"),
        Param("label", "path", "label image on the grid of in (may be in itself): field "
              "class = its value at each point"),
        Param("outtrain", "outvec", "output points of group train", required=True),
        Param("outvalid", "outvec", "output points of group valid (chessboard, split, "
              "balanced)"),
        Param("outtest", "outvec", "output points of group test (split)"),
        Param("seed", "int", "random seed (split.random, balanced)", default=0),
        _RAM,
    )

    def run(self) -> PatchSelection:
        """Run the selection and write the point files."""
        strategy = self.get("strategy")
        outs = {k: self.get(k) for k in ("outtrain", "outvalid", "outtest")}
        proportions = (
            self.get("strategy.split.trainprop"),
            self.get("strategy.split.validprop") if outs["outvalid"] else 0.0,
            self.get("strategy.split.testprop") if outs["outtest"] else 0.0,
        )
        if strategy == "split":
            for key, out, prop in zip(("trainprop", "validprop", "testprop"),
                                      ("outtrain", "outvalid", "outtest"), proportions,
                                      strict=True):
                if outs[out] and prop <= 0:
                    raise InputError(f"strategy.split.{key}: {prop!r} must be > 0 when {out} "
                                     "is set")
        else:  # OTBTF ignores the outputs a strategy does not fill, with a warning
            unused = ("outvalid", "outtest") if strategy == "all" else ("outtest",)
            for key in unused:
                if outs[key]:
                    logger.warning("PatchesSelection: %s is ignored with strategy %s (only "
                                   "split fills a test group; all fills only outtrain)",
                                   key, strategy)
                    outs[key] = None
        label = self.get("label")
        if strategy == "balanced":
            balanced_label = self.get("strategy.balanced.labelimage")
            if not balanced_label:
                raise InputError("strategy.balanced.labelimage: required with strategy "
                                 "balanced")
            if label and not _same_file(label, balanced_label):
                raise InputError(f"label: {label!r} differs from strategy.balanced.labelimage "
                                 f"{balanced_label!r}; balanced uses one label image")
            label = balanced_label
        inputs = {"in": self.get("in"), "mask": self.get("mask"), "label": label}
        label_key = {"label_image": "strategy.balanced.labelimage"} \
            if strategy == "balanced" else {}
        with respelled(label_key), \
                claim_outputs({k: Output(v, "vector") if v else None for k, v in outs.items()},
                              inputs):
            return self._select(strategy, proportions, label, outs)

    def _select(self, strategy: str, proportions: tuple[float, float, float], label: Any,
                outs: dict[str, Any]) -> PatchSelection:
        """Select the patches and write the groups (their outputs claimed by :meth:`run`)."""
        selection = select_patches(
            self.get("in"), self.get("grid.psize"), self.get("grid.step"),
            offset=(self.get("grid.offsetx"), self.get("grid.offsety")),
            nodata=self.get("nodata"), mask=self.get("mask"), strategy=strategy,
            proportions=proportions, shuffle=bool(self.get("strategy.split.random")),
            seed=self.get("seed"), label_image=label,
            nclasses=self.get("strategy.balanced.nclasses"),
            spatial_proportion=self.get("strategy.balanced.sp"),
            factor=self.get("grid.factor"), quiet=self.quiet,
        )
        selection.write(outs["outtrain"], outs["outvalid"] or None, outs["outtest"] or None)
        return selection


class LabelImageSampleSelection(App):
    """Draw labelled pixel centres per class from a label image (OTBTF app of that name)."""

    name = "LabelImageSampleSelection"
    description = "draw sample points (pixel centres) per class from a label image"
    primary_output = "outvec"
    spelling = LABEL_NAMES
    params = (
        Param("inref", "path", "label image (integer classes, band 1)", required=True),
        Param("strategy", "choice", "how many points per class", default="constant",
              choices=LABEL_STRATEGIES),
        Param("strategy.constant.nb", "int", "points per class (capped to the smallest "
              "class, as in OTBTF)", default=1000),
        Param("strategy.total.v", "int", "total points, shared in proportion to class sizes",
              default=1000),
        Param("nodata", "float", "label value to ignore (the file's own nodata is always "
              "ignored)", default=-1),
        Param("pad", "int", "border excluded on every side (pixels)", default=0),
        Param("pick", "choice", "random (seeded) or strided (OTBTF's every n-th pixel)",
              default="random", choices=("random", "strided")),
        Param("rebase", "bool", "OTBTF's class = value - smallest value", default=False),
        Param("seed", "int", "random seed", default=0),
        Param("outvec", "outvec", "output points with field class", required=True),
        _RAM,
    )

    def run(self) -> Samples:
        """Run the selection and write the points."""
        out = self.get("outvec")
        with claim_outputs({"outvec": Output(out, "vector")}, {"inref": self.get("inref")}):
            samples = select_from_label_image(
                self.get("inref"), strategy=self.get("strategy"),
                count=self.get("strategy.constant.nb"), total=self.get("strategy.total.v"),
                nodata=self.get("nodata"), pad=self.get("pad"), method=self.get("pick"),
                seed=self.get("seed"), rebase=bool(self.get("rebase")), quiet=self.quiet,
            )
            samples.write(out, "outvec")
        return samples


class DensePolygonClassStatistics(App):
    """Per-class and per-polygon pixel counts of polygons on a raster grid (OTBTF app)."""

    name = "DensePolygonClassStatistics"
    description = ("count pixels per class and per polygon, polygons rasterised on the grid "
                   "of an image (pixel-centre rule)")
    primary_output = "out"
    spelling = STATISTICS_NAMES
    params = (
        Param("in", "path", "support image (grid)", required=True),
        Param("vec", "path", "polygons (reprojected to the image's CRS if needed)",
              required=True),
        Param("field", "str", "class field (integer or strings)", required=True),
        Param("nodata", "float", "do not count pixels whose bands all equal this value"),
        Param("out", "outvec", "statistics file: OTB XML (.xml) or JSON (.json)",
              required=True),
        _RAM,
    )

    def run(self) -> PolygonStatistics:
        """Compute and write the statistics."""
        with claim_outputs({"out": Output(self.get("out"), "statistics")},
                           {"in": self.get("in"), "vec": self.get("vec")}):
            return polygon_class_statistics(
                self.get("in"), self.get("vec"), self.get("field"), out=self.get("out"),
                nodata=self.get("nodata"), quiet=self.quiet,
            )


def _parse_counts(items: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.rpartition(":") if ":" in part else part.rpartition("=")
            try:
                if not sep or not key:
                    raise ValueError
                counts[key.strip()] = int(value)
            except ValueError:
                raise InputError(f"strategy.constant.counts: {part!r} is not class:count") \
                    from None
    if not counts:
        raise InputError("strategy.constant.counts: no class:count given")
    return counts


def counts_names(strategy: str, counts: Any) -> dict[str, str]:
    """The key of :func:`~terrapatch.sampling.sample_polygons`'s ``counts`` for a run.

    ``strategy.constant.counts`` for per-class counts, else ``strategy.<strategy>.nb``;
    none with strategy ``all``, which takes no counts.
    """
    if strategy == "all":
        return {}
    if isinstance(counts, Mapping):
        return {"counts": "strategy.constant.counts"}
    return {"counts": f"strategy.{strategy}.nb"}


class PolygonSampleSelection(App):
    """Draw points per class inside labelled polygons (terrapatch extension)."""

    name = "PolygonSampleSelection"
    description = ("draw points per class inside labelled polygons, at most one per pixel of "
                   "the image, ready for PatchesExtraction")
    primary_output = "out"
    spelling = POLYGON_NAMES
    params = (
        Param("in", "path", "image whose pixels the points are placed in", required=True),
        Param("vec", "path", "labelled polygons (reprojected to the image's CRS if needed)",
              required=True),
        Param("field", "str", "class field (integer, or strings mapped to codes)",
              required=True),
        Param("strategy", "choice", "constant (given counts), balanced (same count per "
              "class) or all (every pixel)", default="balanced", choices=POLYGON_STRATEGIES),
        Param("strategy.constant.nb", "int", "points per class (constant)"),
        Param("strategy.constant.counts", "strs", "per-class points, e.g. forest:100 "
              "water:50 (constant; unlisted classes get none)"),
        Param("strategy.balanced.nb", "int", "points per class (balanced; default: the "
              "smallest class's pixel count)"),
        Param("mode", "choice", "grid: pixel centres; random: random inside the pixel",
              default="grid", choices=("grid", "random")),
        Param("nodata", "float", "never draw pixels whose bands all equal this value"),
        Param("seed", "int", "random seed", default=0),
        Param("out", "outvec", "output points (fields class, id, polygon[, class_name])",
              required=True),
        Param("outclassmap", "path", "class code → name JSON for string fields "
              "(default: <out stem>.classes.json)"),
        _RAM,
    )

    def run(self) -> PolygonSamples:
        """Draw and write the points."""
        out = self.get("out")
        strategy = self.get("strategy")
        counts: Any = None
        if strategy == "constant":
            per_class = self.get("strategy.constant.counts")
            nb = self.get("strategy.constant.nb")
            if per_class and nb is not None:
                raise InputError("strategy.constant.counts: give either it or "
                                 "strategy.constant.nb, not both")
            counts = _parse_counts(per_class) if per_class else nb
            if counts is None:
                raise InputError("strategy.constant.nb: required with strategy constant "
                                 "(or strategy.constant.counts)")
        elif strategy == "balanced":
            counts = self.get("strategy.balanced.nb")
        else:
            for key in ("strategy.constant.nb", "strategy.constant.counts",
                        "strategy.balanced.nb"):
                if self.values.get(key) not in (None, ()):
                    raise InputError(f"{key}: counts are not used with strategy all")
        class_map = self.get("outclassmap")
        default_map = Path(out).with_suffix(".classes.json")  # written for string classes
        with respelled(counts_names(strategy, counts)), \
                claim_outputs({"out": Output(out, "vector"),
                               "outclassmap": Output(class_map or default_map, "json")},
                              {"in": self.get("in"), "vec": self.get("vec")}):
            result = sample_polygons(
                self.get("in"), self.get("vec"), self.get("field"), strategy=strategy,
                counts=counts, mode=self.get("mode"), seed=self.get("seed"),
                nodata=self.get("nodata"), quiet=self.quiet,
            )
            result.write(out, "out", Path(class_map) if class_map else None)
        return result
