"""One error, two spellings: the sampling core names its keywords, the apps OTBTF's keys.

Each case feeds the same bad value to a :mod:`terrapatch.sampling` function and to the
application over it: the core's message starts with the neutral identifier, the
application's with the OTBTF key, and the rest is the same once the identifiers the
body mentions are respelled too.
"""

from __future__ import annotations

from typing import Any

import pytest

from terrapatch import sampling as S
from terrapatch.apps import (
    DensePolygonClassStatistics,
    LabelImageSampleSelection,
    PatchesSelection,
    PolygonSampleSelection,
)
from terrapatch.testing import SpellingCase

#: The ``label_scene`` fixture's value (tests/conftest.py): ``dir``, ``img``, ``lab``,
#: ``frac`` and ``vec``.
Scene = Any


@pytest.fixture()
def scene(label_scene: Scene) -> Scene:
    return label_scene


def _grid_app(s: Scene, **keys: Any) -> None:
    PatchesSelection({"in": s.img, "grid.step": 8, "grid.psize": 8,
                      "outtrain": s.dir / "t.gpkg", **keys}, quiet=True)


def _label_app(s: Scene, **keys: Any) -> None:
    LabelImageSampleSelection({"inref": s.lab, "outvec": s.dir / "p.gpkg", **keys}, quiet=True)


def _polygon_app(s: Scene, **keys: Any) -> None:
    PolygonSampleSelection({"in": s.img, "vec": s.vec, "field": "fclass",
                            "out": s.dir / "p.gpkg", **keys}, quiet=True)


CASES = {
    "patch larger than the image": SpellingCase(
        lambda s: S.select_patches(s.img, 100, 8),
        lambda s: _grid_app(s, **{"grid.psize": 100}),
        (("psize", "grid.psize"),)),
    "missing reference image": SpellingCase(
        lambda s: S.select_patches(s.dir / "none.tif", 8, 8),
        lambda s: _grid_app(s, **{"in": s.dir / "none.tif"}),
        (("image", "in"),)),
    "offset off the sampling grid": SpellingCase(
        lambda s: S.select_patches(s.img, 8, 8, factor=2),
        lambda s: _grid_app(s, **{"grid.factor": 2}),
        (("offset[0]", "grid.offsetx"), ("factor=", "grid.factor="))),
    "empty valid group": SpellingCase(
        lambda s: S.select_patches(s.img, 30, 30, offset=29, strategy="split").write(
            s.dir / "t.gpkg", s.dir / "v.gpkg"),
        lambda s: _grid_app(s, **{"grid.step": 30, "grid.psize": 30, "grid.offsetx": 29,
                                  "grid.offsety": 29, "strategy": "split",
                                  "outvalid": s.dir / "v.gpkg"}),
        (("valid", "outvalid"),)),
    "label not an integer": SpellingCase(
        lambda s: S.select_patches(s.img, 8, 8, label_image=s.frac),
        lambda s: _grid_app(s, label=s.frac),
        (("label_image", "label"),)),
    "balanced label beyond nclasses": SpellingCase(
        lambda s: S.select_patches(s.lab, 8, 8, strategy="balanced", label_image=s.lab,
                                   nclasses=2),
        lambda s: _grid_app(s, **{"in": s.lab, "strategy": "balanced",
                                  "strategy.balanced.labelimage": s.lab,
                                  "strategy.balanced.nclasses": 2}),
        (("label_image", "strategy.balanced.labelimage"),
         ("nclasses=", "strategy.balanced.nclasses="))),
    "total beyond the labelled pixels": SpellingCase(
        lambda s: S.select_from_label_image(s.lab, strategy="total", total=5000),
        lambda s: _label_app(s, strategy="total", **{"strategy.total.v": 5000}),
        (("total", "strategy.total.v"),)),
    "no point per class": SpellingCase(
        lambda s: S.select_from_label_image(s.lab, count=0),
        lambda s: _label_app(s, **{"strategy.constant.nb": 0}),
        (("count", "strategy.constant.nb"),)),
    "constant count beyond a class": SpellingCase(
        lambda s: S.sample_polygons(s.img, s.vec, "fclass", strategy="constant", counts=101),
        lambda s: _polygon_app(s, strategy="constant", **{"strategy.constant.nb": 101}),
        (("counts", "strategy.constant.nb"),)),
    "per-class count beyond a class": SpellingCase(
        lambda s: S.sample_polygons(s.img, s.vec, "fclass", strategy="constant",
                                    counts={"crop": 101}),
        lambda s: _polygon_app(s, strategy="constant",
                               **{"strategy.constant.counts": "crop:101"}),
        (("counts", "strategy.constant.counts"),)),
    "balanced count of 0": SpellingCase(
        lambda s: S.sample_polygons(s.img, s.vec, "fclass", strategy="balanced", counts=0),
        lambda s: _polygon_app(s, **{"strategy.balanced.nb": 0}),
        (("counts", "strategy.balanced.nb"),)),
    "missing polygons": SpellingCase(
        lambda s: S.polygon_class_statistics(s.img, s.dir / "none.gpkg", "fclass"),
        lambda s: DensePolygonClassStatistics({"in": s.img, "vec": s.dir / "none.gpkg",
                                               "field": "fclass", "out": s.dir / "s.json"},
                                              quiet=True),
        (("polygons", "vec"),)),
    "missing support raster": SpellingCase(
        lambda s: S.polygon_class_statistics(s.dir / "none.tif", s.vec, "fclass"),
        lambda s: DensePolygonClassStatistics({"in": s.dir / "none.tif", "vec": s.vec,
                                               "field": "fclass", "out": s.dir / "s.json"},
                                              quiet=True),
        (("raster", "in"),)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_core_and_app_name_the_same_error_each_its_way(scene: Scene, case: SpellingCase) -> None:
    case.check(scene)


# ------------------------------------------------------------------ log records


def test_cap_warning_is_respelled_for_app_users(scene: Scene, log_messages: list[str]) -> None:
    S.select_from_label_image(scene.lab, count=5000, quiet=True)
    _label_app(scene, **{"strategy.constant.nb": 5000})
    cap = "exceeds the smallest class (class 0: 400 pixels); taking 400 points per class"
    warned = [line for line in log_messages if "exceeds" in line]
    assert warned == [f"label selection: count=5000 {cap}",
                      f"LabelImageSampleSelection: strategy.constant.nb=5000 {cap}"]


def test_unwritten_group_log_is_respelled_for_app_users(scene: Scene,
                                                        log_messages: list[str]) -> None:
    S.select_patches(scene.img, 8, 8, quiet=True).write(scene.dir / "a.gpkg")
    _grid_app(scene)
    skipped = [line for line in log_messages if "not written" in line]
    assert skipped == ["grid selection: 6 points of group valid not written (valid=None)",
                       "PatchesSelection: 6 points of group valid not written (outvalid=None)"]
