"""One error, two spellings: the extraction core names its keywords, PatchesExtraction OTBTF's keys.

Each case feeds the same bad value to :func:`terrapatch.extract_patches` and to the
``PatchesExtraction`` application over it: the core's message starts with the neutral
identifier, the application's with the OTBTF key, and the rest is the same once the
identifiers the body mentions are respelled too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine

from terrapatch import Source, extract_patches
from terrapatch.apps import PatchesExtraction
from terrapatch.apps.extraction import EXTRACTION_NAMES
from terrapatch.testing import SpellingCase, coordinate_raster
from terrapatch.vector import write_points

T10 = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)
T20 = Affine(20.0, 0.0, 1000.0, 0.0, -20.0, 5000.0)


@dataclass(frozen=True)
class Scene:
    """A 64×64 10 m raster, its 32×32 20 m twin, and point files: inside them (classes
    0..2, or 0..300), in lon/lat, and beside them."""

    dir: Path
    s10: Path
    s20: Path
    points: Path
    big: Path
    lonlat: Path
    far: Path


@pytest.fixture()
def scene(tmp_path: Path) -> Scene:
    s10 = coordinate_raster(tmp_path / "s10.tif", 64, 64, T10)
    s20 = coordinate_raster(tmp_path / "s20.tif", 32, 32, T20)
    x = 1000.0 + np.array([160.0, 320.0, 480.0])
    y = 5000.0 - np.array([160.0, 320.0, 480.0])
    points = write_points(tmp_path / "points.gpkg", x, y,
                          {"class": np.array([0, 1, 2], np.int64)}, crs="EPSG:32631")
    big = write_points(tmp_path / "big.gpkg", x, y,
                       {"class": np.array([0, 300, 2], np.int64)}, crs="EPSG:32631")
    lonlat = write_points(tmp_path / "lonlat.gpkg", np.array([3.0]), np.array([45.0]),
                          {"class": np.array([1], np.int64)}, crs="EPSG:4326")
    far = write_points(tmp_path / "far.gpkg", x + 10_000, y,
                       {"class": np.array([0, 1, 2], np.int64)}, crs="EPSG:32631")
    return Scene(tmp_path, s10, s20, points, big, lonlat, far)


def _core(s: Scene, size: int = 8, vector: Path | None = None, field: str = "class",
          outputs: list[Any] | None = None, **kwargs: Any) -> Any:
    sources = [Source(s.s10, size, name="source1"), Source(s.s20, size // 2, name="source2")]
    return extract_patches(sources, vector or s.points, field,
                           outputs or [s.dir / "a.tif", s.dir / "b.tif"], quiet=True, **kwargs)


def _app(s: Scene, **keys: Any) -> Any:
    return PatchesExtraction({
        "source1.il": s.s10, "source1.patchsizex": 8, "source1.patchsizey": 8,
        "source1.out": s.dir / "a.tif", "source2.il": s.s20, "source2.patchsizex": 4,
        "source2.patchsizey": 4, "source2.out": s.dir / "b.tif", "vec": s.points,
        "field": "class", **keys}, quiet=True)


CASES = {
    "patch larger than the image": SpellingCase(
        lambda s: _core(s, size=80),
        lambda s: _app(s, **{"source1.patchsizex": 80, "source1.patchsizey": 80,
                             "source2.patchsizex": 40, "source2.patchsizey": 40}),
        (("source1.patch_size", "source1.patchsizex/y"),)),
    "missing source file": SpellingCase(
        lambda s: extract_patches([Source(s.dir / "none.tif", 8, name="source1")], s.points,
                                  "class", [s.dir / "a.tif"], quiet=True),
        lambda s: PatchesExtraction({"source1.il": s.dir / "none.tif",
                                     "source1.patchsizex": 8, "source1.patchsizey": 8,
                                     "source1.out": s.dir / "a.tif", "vec": s.points,
                                     "field": "class"}, quiet=True),
        (("source1", "source1.il"),)),
    "every patch outside the sources": SpellingCase(
        lambda s: _core(s, vector=s.far),
        lambda s: _app(s, vec=s.far),
        (("vector", "vec"),)),
    "points in another CRS": SpellingCase(
        lambda s: _core(s, vector=s.lonlat),
        lambda s: _app(s, vec=s.lonlat),
        (("vector", "vec"), ("reproject=", "vec.reproject="))),
    "sampling-grid factor of 0": SpellingCase(
        lambda s: _core(s, factor=0),
        lambda s: _app(s, **{"grid.factor": 0}),
        (("factor", "grid.factor"),)),
    "class values beyond uint8": SpellingCase(
        lambda s: _core(s, vector=s.big, labels_out=s.dir / "l.tif"),
        lambda s: _app(s, vec=s.big, outlabels=s.dir / "l.tif"),
        (("labels_out", "outlabels"), ("labels_pixel_type", "outlabels pixel type"),
         ("clamp_labels", "outlabels.clamp"))),
    "output on its input": SpellingCase(
        lambda s: _core(s, outputs=[s.s10, s.dir / "b.tif"]),
        lambda s: _app(s, **{"source1.out": s.s10}),
        (("source1.output", "source1.out"), ("source1.paths", "source1.il"))),
    "labels on a patches output": SpellingCase(
        lambda s: _core(s, labels_out=s.dir / "a.tif"),
        lambda s: _app(s, outlabels=s.dir / "a.tif"),
        (("labels_out", "outlabels"), ("source1.output", "source1.out"))),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_core_and_app_name_the_same_error_each_its_way(scene: Scene, case: SpellingCase) -> None:
    case.check(scene)


def test_every_spelling_is_a_key_of_the_application() -> None:
    keys = {p.key for p in PatchesExtraction.params}
    keys |= {f"{{source}}.{p.key}" for p in PatchesExtraction.source_params}
    for neutral, key in EXTRACTION_NAMES.items():
        if neutral == "extraction":
            assert key == PatchesExtraction.name
            continue
        parts = [k.strip() for k in key.removesuffix(" pixel type").split("/")]
        first = parts[0]
        assert first in keys or first.replace("patchsizex", "patchsizey") in keys, (neutral, key)


# ------------------------------------------------------------------ log records


def test_summary_and_clamp_warning_are_respelled_for_app_users(scene: Scene,
                                                              log_messages: list[str]) -> None:
    core = _core(scene, vector=scene.big, labels_out=scene.dir / "l.tif", clamp_labels=True)
    app = _app(scene, vec=scene.big, outlabels=scene.dir / "l2.tif",
               **{"outlabels.clamp": True}).result
    assert core.n_collected == app.n_collected == 3
    assert set(core.outputs) == {"source1.output", "source2.output", "labels_out"}
    clamp = "1 sample(s) with class values 300 clamped to uint8's range 0..255"
    assert [line for line in log_messages if "clamped" in line] == [
        f"labels_out: {clamp}: those classes merge", f"outlabels: {clamp}: those classes merge"]
    summaries = [line for line in log_messages if "samples collected" in line]
    assert [line.split(": ")[0] for line in summaries] == ["extraction", "PatchesExtraction"]
    assert summaries[0].split(": ", 1)[1] == summaries[1].split(": ", 1)[1]
