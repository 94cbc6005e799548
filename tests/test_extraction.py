"""PatchesExtraction on synthetic GeoTIFFs: windows, rejections, counts, order, outputs.

Every raster here is a *coordinate raster* (band 1 = column, band 2 = row) or a
small raster with hand-placed values, written with an explicit transform, so the
window each patch came from can be read off the patch and checked by hand
against DESIGN.md §2 (not against :mod:`terrapatch.geometry`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terrapatch.patches as patches_module
from terrapatch.errors import CRSMismatchError, InputError, NoSamplesError
from terrapatch.extraction import ExtractionSummary, extract_patches
from terrapatch.extraction import reading as reading_module
from terrapatch.extraction import spool as spool_module
from terrapatch.geometry import Layout, extraction_factor
from terrapatch.patches import read_patches, read_patches_info
from terrapatch.raster import Source
from terrapatch.testing import (
    assert_coordinate_patch,
    assert_same_patches,
    coordinate_raster,
    read_raster,
    write_raster,
)
from terrapatch.vector import PointSet, write_points

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"


# ---------------------------------------------------------------- helpers


def coord(path: Path, spacing: float, width: int, height: int | None = None,
          x0: float = L, y0: float = T, dtype: str = "float32") -> Path:
    return coordinate_raster(path, width, height or width,
                             Affine(spacing, 0, x0, 0, -spacing, y0), crs=CRS, dtype=dtype)


def points(path: Path, x, y, labels, field: str = "class", crs: str = CRS) -> Path:
    return write_points(path, np.asarray(x, float), np.asarray(y, float),
                        {field: np.asarray(labels)}, crs=crs)


def geojson(path: Path, features: list[dict]) -> Path:
    """A GeoJSON file in EPSG:32631 with hand-written features (nulls, missing keys)."""
    path.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32631"}},
        "features": features}))
    return path


def in_cell(spacing: float, j: int, i: int, dx: float, dy: float) -> tuple[float, float]:
    """Point at offset (dx, dy) metres (dy downwards) inside pixel (j, i) of a grid at (L, T)."""
    return L + spacing * j + dx, T - spacing * i - dy


def out_files(directory: Path, inputs: set[str]) -> set[str]:
    return {p.name for p in directory.iterdir()} - inputs


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """20 m (40×40) and 10 m (80×80) coordinate rasters sharing the corner (L, T)."""
    d = tmp_path_factory.mktemp("pair")
    return coord(d / "c20.tif", 20, 40), coord(d / "c10.tif", 10, 80)


# 20 m cells (j, i) and offsets (dx, dy) inside them: exact corner, right/lower half
# (odd 10 m column/row: where OTBTF shifts the 10 m window by 10 m), 10 m boundaries.
CELLS = [(4, 4, 0.0, 0.0), (5, 9, 15.0, 5.0), (20, 17, 10.0, 10.0), (33, 36, 19.999, 19.999),
         (36, 35, 5.0, 15.0), (11, 28, 12.5, 0.0)]


# ---------------------------------------------------------------- 1. windows


@pytest.mark.parametrize("order", ["20m_first", "10m_first"])
def test_two_sources_windows_by_hand(tmp_path, pair, order):
    c20, c10 = pair
    xy = [in_cell(20, j, i, dx, dy) for j, i, dx, dy in CELLS]
    vec = points(tmp_path / "p.geojson", [p[0] for p in xy], [p[1] for p in xy],
                 np.arange(len(xy)))
    s20 = Source(c20, 8)
    s10 = Source(c10, 16)
    if order == "20m_first":
        sources, outs = [s20, s10], [tmp_path / "o20.tif", tmp_path / "o10.tif"]
    else:
        sources, outs = [s10, s20], [tmp_path / "o10.tif", tmp_path / "o20.tif"]
    for k, s in enumerate(sources, start=1):
        s.name = f"source{k}"
    summary = extract_patches(sources, vec, "class", outs, quiet=True)
    assert summary.n_collected == len(CELLS)
    assert summary.factor == (1 if order == "20m_first" else 2)
    p20 = read_patches(tmp_path / "o20.tif")
    p10 = read_patches(tmp_path / "o10.tif")
    assert p20.shape == (len(CELLS), 8, 8, 2)
    assert p10.shape == (len(CELLS), 16, 16, 2)
    for n, (j, i, _, _) in enumerate(CELLS):
        assert_coordinate_patch(p20[n], j - 4, i - 4)            # 20 m cols j-4..j+3
        assert_coordinate_patch(p10[n], 2 * j - 8, 2 * i - 8)    # 10 m cols 2j-8..2j+7
        # Same ground: left/top edges and 160 m extents coincide.
        assert L + 20 * p20[n, 0, 0, 0] == L + 10 * p10[n, 0, 0, 0]
        assert T - 20 * p20[n, 0, 0, 1] == T - 10 * p10[n, 0, 0, 1]


def test_both_orders_give_identical_files(tmp_path, pair):
    c20, c10 = pair
    rng = np.random.default_rng(1)
    x = L + rng.uniform(0, 800, 40)
    y = T - rng.uniform(0, 800, 40)
    vec = points(tmp_path / "p.gpkg", x, y, rng.integers(0, 5, 40))
    a = extract_patches([Source(c20, 8, name="source1"), Source(c10, 16, name="source2")], vec,
                        "class", [tmp_path / "a20.tif", tmp_path / "a10.tif"],
                        labels_out=tmp_path / "al.tif", quiet=True)
    b = extract_patches([Source(c10, 16, name="source1"), Source(c20, 8, name="source2")], vec,
                        "class", [tmp_path / "b10.tif", tmp_path / "b20.tif"],
                        labels_out=tmp_path / "bl.tif", quiet=True)
    assert 0 < a.n_collected < 40  # some points are near the border
    assert a.n_collected == b.n_collected
    assert_same_patches(tmp_path / "a20.tif", tmp_path / "b20.tif")
    assert_same_patches(tmp_path / "a10.tif", tmp_path / "b10.tif")
    assert_same_patches(tmp_path / "al.tif", tmp_path / "bl.tif")


def test_grid_factor_override_gives_otbtf_single_source_windows(tmp_path, pair):
    c20, c10 = pair
    # 10 m pixel (21, 13): odd column, odd row.
    vec = points(tmp_path / "p.geojson", [L + 215.0], [T - 135.0], [1])
    summary = extract_patches([Source(c10, 16, name="source1"), Source(c20, 8, name="source2")],
                              vec, "class", [tmp_path / "o10.tif", None], factor=1, quiet=True)
    assert summary.factor == 1
    # OTBTF: c - 16//2
    assert_coordinate_patch(read_patches(tmp_path / "o10.tif")[0], 21 - 8, 13 - 8)


@pytest.mark.parametrize(
    ("x", "y", "size", "window"),
    [
        (500175.0, 3999825.0, 33, (1, 1)),    # centre of pixel (17, 17), odd size
        (500170.0, 3999820.0, 32, (1, 2)),    # bottom-left corner of (17, 17): centre (17, 18)
        (500170.0, 3999830.0, 32, (1, 1)),    # top-left corner of (17, 17)
        (500005.0, 3999995.0, 16, None),      # centre (0, 0): window starts at -8 → rejected
        (500995.0, 3999005.0, 1, (99, 99)),   # last pixel, size 1
        (500995.0, 3999005.0, 3, None),       # odd size 3 at the last pixel leaves the image
        (500005.0, 3999995.0, 2, None),       # even size 2 at pixel (0, 0) starts at -1
    ],
)
def test_single_source_reference_examples(tmp_path, x, y, size, window):
    img = coord(tmp_path / "img.tif", 10, 100)
    # A second feature far inside keeps the run from failing when the first is rejected.
    vec = points(tmp_path / "p.geojson", [x, 500505.0], [y, 3999495.0], [1, 2])
    summary = extract_patches([Source(img, size)], vec, "class", [tmp_path / "o.tif"],
                              labels_out=tmp_path / "l.tif", quiet=True)
    assert summary.factor == 1
    patches = read_patches(tmp_path / "o.tif")
    labels = read_raster(tmp_path / "l.tif").values.ravel()
    if window is None:
        assert summary.n_collected == 1 and summary.n_rejected_outside == 1
        assert labels.tolist() == [2]
    else:
        assert summary.n_collected == 2
        assert labels.tolist() == [1, 2]
        assert_coordinate_patch(patches[0], *window)


def test_non_square_patches_round_trip_with_metadata(tmp_path, pair):
    c20, c10 = pair
    cells = [(10, 6), (25, 30)]
    xy = [in_cell(20, j, i, 7.0, 13.0) for j, i in cells]
    vec = points(tmp_path / "p.geojson", [p[0] for p in xy], [p[1] for p in xy], [0, 1])
    extract_patches([Source(c20, (6, 4), name="source1"), Source(c10, (12, 8), name="source2")],
                    vec, "class", [tmp_path / "o20.tif", tmp_path / "o10.tif"], quiet=True)
    info20 = read_patches_info(tmp_path / "o20.tif")
    info10 = read_patches_info(tmp_path / "o10.tif")
    assert (info20.patch_size_x, info20.patch_size_y) == (6, 4)
    assert (info20.n_patches, info20.bands) == (2, 2)
    assert (info10.patch_size_x, info10.patch_size_y, info10.n_patches) == (12, 8, 2)
    assert info20.from_metadata and info10.from_metadata
    with rasterio.open(tmp_path / "o20.tif") as ds:
        assert (ds.width, ds.height) == (6, 8)
    p20 = read_patches(tmp_path / "o20.tif")
    p10 = read_patches(tmp_path / "o10.tif")
    assert p20.shape == (2, 4, 6, 2) and p10.shape == (2, 8, 12, 2)
    for n, (j, i) in enumerate(cells):
        assert_coordinate_patch(p20[n], j - 3, i - 2)
        assert_coordinate_patch(p10[n], 2 * j - 6, 2 * i - 4)


# ---------------------------------------------------------------- 2. rejections and counts


def test_nodata_in_band_two_only_drops_exactly_the_samples_covering_it(tmp_path):
    data = np.ones((2, 30, 30), np.float32)
    data[1, 10, 12] = -7.0   # band 2 only, pixel (col 12, row 10)
    data[0, 20, 20] = 5.0    # not nodata
    img = write_raster(tmp_path / "img.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    centres = [(12, 10), (15, 13), (16, 10), (9, 7), (8, 10), (20, 20), (12, 14)]
    xs = [L + 10 * c + 5 for c, _ in centres]
    ys = [T - 10 * r - 5 for _, r in centres]
    vec = points(tmp_path / "p.geojson", xs, ys, np.arange(len(centres)))
    # patch 8: cols c-4..c+3 → covers col 12 iff 9 <= c <= 16 (same for rows).
    expect_kept = [n for n, (c, r) in enumerate(centres)
                   if not (9 <= c <= 16 and 7 <= r <= 14)]
    summary = extract_patches([Source(img, 8, nodata=-7)], vec, "class",
                              [tmp_path / "o.tif"], labels_out=tmp_path / "l.tif", quiet=True)
    assert read_raster(tmp_path / "l.tif").values.ravel().tolist() == expect_kept
    assert summary.rejected_nodata == {"source1": len(centres) - len(expect_kept)}
    assert summary.n_collected == len(expect_kept)
    # Without nodata nothing is dropped.
    summary = extract_patches([Source(img, 8)], vec, "class", [tmp_path / "o.tif"], quiet=True)
    assert summary.n_collected == len(centres)


def test_nan_nodata_matches_nan_pixels(tmp_path):
    # Deliberate difference from OTBTF (where a NaN nodata never matches): NaN pixels
    # are missing data, as in GDAL and in terrapatch's selection and serving.
    data = np.ones((1, 20, 20), np.float32)
    data[0, 5:15, 5:15] = np.nan
    img = write_raster(tmp_path / "img.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    vec = points(tmp_path / "p.geojson", [L + 105.0, L + 35.0, L + 145.0],
                 [T - 105.0, T - 35.0, T - 145.0], [1, 2, 3])
    summary = extract_patches([Source(img, 4, nodata=float("nan"))], vec, "class",
                              [tmp_path / "o.tif"], quiet=True)
    assert summary.rejected_nodata == {"source1": 2}  # the two patches touching the NaN block
    assert summary.n_collected == 1
    assert not np.isnan(read_patches(tmp_path / "o.tif")).any()


def test_nodata_is_compared_in_the_raster_type(tmp_path):
    # float32 raster: nodata 0.1 (a float64) matches pixels holding float32(0.1).
    data = np.full((1, 20, 20), 2.0, np.float32)
    data[0, 3, 3] = 0.1
    img = write_raster(tmp_path / "img.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    vec = points(tmp_path / "p.geojson", [L + 35.0, L + 155.0], [T - 35.0, T - 35.0], [1, 2])
    summary = extract_patches([Source(img, 3, nodata=0.1)], vec, "class", [tmp_path / "o.tif"],
                              labels_out=tmp_path / "l.tif", quiet=True)
    assert summary.rejected_nodata == {"source1": 1}
    assert read_raster(tmp_path / "l.tif").values.ravel().tolist() == [2]
    # float64 raster: compared exactly in float64 (OTBTF would round both to float32).
    data64 = np.full((1, 20, 20), 2.0, np.float64)
    data64[0, 3, 3] = 1.0 + 1e-9
    img64 = write_raster(tmp_path / "img64.tif", data64, Affine(10, 0, L, 0, -10, T), crs=CRS)
    summary = extract_patches([Source(img64, 3, nodata=1.0)], vec, "class",
                              [tmp_path / "o.tif"], quiet=True)
    assert summary.rejected_nodata == {"source1": 0}


def test_integer_nodata_matches_integer_rasters(tmp_path):
    data = np.full((1, 20, 20), 500, np.uint16)
    data[0, 3, 3] = 0
    img = write_raster(tmp_path / "img.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    vec = points(tmp_path / "p.geojson", [L + 35.0, L + 155.0], [T - 35.0, T - 35.0], [1, 2])
    summary = extract_patches([Source(img, 3, nodata=0)], vec, "class", [tmp_path / "o.tif"],
                              quiet=True)
    assert summary.rejected_nodata == {"source1": 1}
    # A nodata value outside the type's range or not an integer never matches.
    for nodata in (-1.0, 0.5, 70000.0):
        summary = extract_patches([Source(img, 3, nodata=nodata)], vec, "class",
                                  [tmp_path / "o.tif"], quiet=True)
        assert summary.n_collected == 2, nodata


def test_nodata_compares_integers_exactly(tmp_path):
    # Deliberate difference from OTBTF (which compares in float32): 16777217 is not
    # nodata 16777216, although both are 16777216 in float32.
    data = np.full((1, 10, 10), 7, np.uint32)
    data[0, 2, 2] = 16777217
    img = write_raster(tmp_path / "img.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    vec = points(tmp_path / "p.geojson", [L + 25.0, L + 75.0], [T - 25.0, T - 75.0], [1, 2])
    summary = extract_patches([Source(img, 3, nodata=16777216.0)], vec, "class",
                              [tmp_path / "o.tif"], quiet=True)
    assert summary.rejected_nodata == {"source1": 0}
    summary = extract_patches([Source(img, 3, nodata=16777217.0)], vec, "class",
                              [tmp_path / "o.tif"], quiet=True)
    assert summary.rejected_nodata == {"source1": 1}


def test_summary_counts_per_source(tmp_path):
    t20 = Affine(20, 0, L, 0, -20, T)
    t10 = Affine(10, 0, L, 0, -10, T)
    a20 = np.ones((1, 40, 40), np.float32)
    a10 = np.ones((1, 80, 40), np.float32)   # covers only the left half of the 20 m image
    a20[0, 30, 8] = -9                        # E: nodata in source 1
    a10[0, 60, 30] = -9                       # F: nodata in source 2 (20 m cell (15, 30))
    a20[0, 20, 12] = -9                       # G: nodata in both
    a10[0, 40, 24] = -9
    s20 = write_raster(tmp_path / "s20.tif", a20, t20, crs=CRS)
    s10 = write_raster(tmp_path / "s10.tif", a10, t10, crs=CRS)
    # 20 m cells: A, B kept; C outside source 2 only; D outside both; E, F, G nodata.
    cells = {"A": (5, 5), "B": (10, 10), "C": (25, 10), "D": (39, 20), "E": (8, 30),
             "F": (15, 30), "G": (12, 20)}
    xs = [L + 20 * j + 10 for j, _ in cells.values()]
    ys = [T - 20 * i - 10 for _, i in cells.values()]
    features = [{"type": "Feature", "properties": {"class": n},
                 "geometry": {"type": "Point", "coordinates": [x, y]}}
                for n, (x, y) in enumerate(zip(xs, ys, strict=True))]
    features.insert(3, {"type": "Feature", "properties": {"class": None},
                        "geometry": {"type": "Point", "coordinates": [xs[0], ys[0]]}})
    features.append({"type": "Feature", "properties": {"other": 4},
                     "geometry": {"type": "Point", "coordinates": [xs[1], ys[1]]}})
    vec = geojson(tmp_path / "p.geojson", features)
    summary = extract_patches(
        [Source(s20, 4, nodata=-9, name="source1"), Source(s10, 8, nodata=-9, name="source2")],
        vec, "class", [tmp_path / "o20.tif", tmp_path / "o10.tif"],
        labels_out=tmp_path / "l.tif", quiet=True)
    assert isinstance(summary, ExtractionSummary)
    assert summary.n_features == 7
    assert summary.n_skipped == 2
    assert summary.n_collected == 2
    assert summary.n_rejected_outside == 2
    assert summary.rejected_outside == {"source1": 1, "source2": 2}
    # A sample with nodata in several sources is counted once, at the first source.
    assert summary.rejected_nodata == {"source1": 2, "source2": 1}
    assert (summary.n_collected + summary.n_rejected_outside
            + sum(summary.rejected_nodata.values())) == summary.n_features
    assert read_raster(tmp_path / "l.tif").values.ravel().tolist() == [0, 1]
    assert "2 samples collected of 7" in str(summary)
    assert set(summary.outputs) == {"source1.output", "source2.output", "labels_out"}


def test_nodata_of_an_unwritten_source_still_rejects(tmp_path, pair):
    c20, _ = pair
    data = np.ones((1, 80, 80), np.float32)
    data[0, 20, 20] = 0
    s10 = write_raster(tmp_path / "s10.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    vec = points(tmp_path / "p.geojson", [L + 205.0, L + 605.0], [T - 205.0, T - 605.0], [1, 2])
    summary = extract_patches(
        [Source(c20, 8, name="source1"), Source(s10, 16, nodata=0, name="source2")], vec,
        "class", [tmp_path / "o20.tif", None], quiet=True)
    assert summary.rejected_nodata == {"source1": 0, "source2": 1}
    assert set(summary.outputs) == {"source1.output"}
    assert_coordinate_patch(read_patches(tmp_path / "o20.tif")[0], 30 - 4, 30 - 4)


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """10 m 1100×1100 and 20 m 550×550 coordinate rasters (several 512-px read chunks)."""
    d = tmp_path_factory.mktemp("big")
    c10 = coord(d / "c10.tif", 10, 1100, dtype="uint16")
    c20 = coord(d / "c20.tif", 20, 550, dtype="uint16")
    rng = np.random.default_rng(7)
    n = 90
    x = L + rng.uniform(-200, 11200, n)   # some outside, spread over all chunks
    y = T - rng.uniform(-200, 11200, n)
    vec = points(d / "p.geojson", x, y, np.arange(n))
    return c10, c20, vec, x, y


def _expected_cells(x, y):
    j = np.floor((x - L) / 20).astype(int)
    i = np.floor((T - y) / 20).astype(int)
    inside = (j - 4 >= 0) & (j + 4 <= 550) & (i - 4 >= 0) & (i + 4 <= 550)
    return j, i, inside


def test_sample_order_is_feature_order_in_every_output(tmp_path, big_pair):
    c10, c20, vec, x, y = big_pair
    summary = extract_patches(
        [Source(c10, 16, name="source1"), Source(c20, 8, name="source2")], vec, "class",
        [tmp_path / "o10.tif", tmp_path / "o20.tif"], labels_out=tmp_path / "l.tif",
        points_out=tmp_path / "kept.gpkg", labels_pixel_type="uint16", quiet=True)
    j, i, inside = _expected_cells(x, y)
    kept = np.flatnonzero(inside)
    assert 0 < summary.n_rejected_outside == int((~inside).sum())
    assert summary.n_collected == len(kept)
    labels = read_raster(tmp_path / "l.tif").values
    assert labels.shape == (1, len(kept), 1)
    assert labels.ravel().tolist() == kept.tolist()
    p10 = read_patches(tmp_path / "o10.tif")
    p20 = read_patches(tmp_path / "o20.tif")
    for n, f in enumerate(kept):
        assert_coordinate_patch(p10[n], 2 * j[f] - 8, 2 * i[f] - 8)
        assert_coordinate_patch(p20[n], j[f] - 4, i[f] - 4)
    meta, _, geom, fields = pyogrio.raw.read(tmp_path / "kept.gpkg")
    names = list(meta["fields"])
    assert names == ["class", "patch", "feature"]
    assert fields[names.index("patch")].tolist() == list(range(len(kept)))
    assert fields[names.index("feature")].tolist() == kept.tolist()
    assert fields[names.index("class")].tolist() == kept.tolist()
    xy = shapely.get_coordinates(shapely.from_wkb(geom))
    np.testing.assert_allclose(xy[:, 0], x[kept])
    np.testing.assert_allclose(xy[:, 1], y[kept])
    assert pyogrio.read_info(tmp_path / "kept.gpkg")["crs"] == CRS


def test_feature_index_counts_only_features_with_the_field(tmp_path, pair):
    c20, _ = pair
    features = [
        {"type": "Feature", "properties": {"class": None},
         "geometry": {"type": "Point", "coordinates": [L + 105, T - 105]}},
        {"type": "Feature", "properties": {"class": 3},
         "geometry": {"type": "Point", "coordinates": [L + 5, T - 5]}},      # outside
        {"type": "Feature", "properties": {"class": 4},
         "geometry": {"type": "Point", "coordinates": [L + 305, T - 305]}},
    ]
    vec = geojson(tmp_path / "p.geojson", features)
    extract_patches([Source(c20, 4)], vec, "class", [tmp_path / "o.tif"],
                    points_out=tmp_path / "kept.geojson", quiet=True)
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "kept.geojson")
    names = list(meta["fields"])
    assert fields[names.index("feature")].tolist() == [1]
    assert fields[names.index("class")].tolist() == [4]


def test_labels_image_default_uint8_clamp_truncate_and_strings(tmp_path, pair, caplog):
    c20, _ = pair
    values = [3, 255, 256, 1000, -5]
    n = len(values)
    x = L + 200 + 40.0 * np.arange(n)
    y = np.full(n, T - 200)
    vec = points(tmp_path / "int.geojson", x, y, np.array(values, np.int64))
    # Classes that do not fit the labels' pixel type: an error naming them, by default ...
    with pytest.raises(InputError, match=r"labels_out: class values -5, 256, 1000 \(3 "
                                         r"sample\(s\)\) do not fit uint8"):
        extract_patches([Source(c20, 4)], vec, "class", [tmp_path / "o.tif"],
                        labels_out=tmp_path / "l.tif", quiet=True)
    assert not (tmp_path / "l.tif").exists()
    # ... or clamped OTB-style, with a warning counting them, when asked.
    extract_patches([Source(c20, 4)], vec, "class", [tmp_path / "o.tif"],
                    labels_out=tmp_path / "l.tif", quiet=True, clamp_labels=True)
    assert "3 sample(s) with class values -5, 256, 1000 clamped" in caplog.text
    with rasterio.open(tmp_path / "l.tif") as ds:
        assert (ds.width, ds.height, ds.count) == (1, n, 1)
        assert ds.dtypes[0] == "uint8"
        assert ds.crs is None
        assert ds.read(1).ravel().tolist() == [3, 255, 255, 255, 0]
    # Real values are truncated; numeric strings parsed.
    reals = points(tmp_path / "real.gpkg", x[:4], y[:4], np.array([3.9, 7.2, -0.5, 200.99]))
    extract_patches([Source(c20, 4)], reals, "class", [tmp_path / "o.tif"],
                    labels_out=tmp_path / "l2.tif", labels_pixel_type="int16", quiet=True)
    assert read_raster(tmp_path / "l2.tif").values.ravel().tolist() == [3, 7, 0, 200]
    strings = points(tmp_path / "str.geojson", x[:3], y[:3],
                     np.array(["12", " 4 ", "5.8"], dtype=object))
    extract_patches([Source(c20, 4)], strings, "class", [tmp_path / "o.tif"],
                    labels_out=tmp_path / "l3.tif", quiet=True)
    assert read_raster(tmp_path / "l3.tif").values.ravel().tolist() == [12, 4, 5]


# ---------------------------------------------------------------- 3. vector formats


@pytest.mark.parametrize("ext", [".geojson", ".gpkg", ".shp"])
def test_vector_formats_give_the_same_samples(tmp_path, pair, ext):
    c20, c10 = pair
    xy = [in_cell(20, j, i, dx, dy) for j, i, dx, dy in CELLS]
    # Integer field with a null: written through pyogrio (float with NaN = null).
    labels = np.array([1.0, np.nan, 2.0, 3.0, 4.0, 5.0])
    geom = shapely.to_wkb(shapely.points(np.array(xy)))
    path = tmp_path / f"p{ext}"
    driver = {".geojson": "GeoJSON", ".gpkg": "GPKG", ".shp": "ESRI Shapefile"}[ext]
    pyogrio.raw.write(path, geometry=geom, field_data=[labels], fields=["class"], crs=CRS,
                      driver=driver, geometry_type="Point")
    summary = extract_patches(
        [Source(c20, 8, name="source1"), Source(c10, 16, name="source2")], path, "class",
        [tmp_path / "o20.tif", tmp_path / "o10.tif"], labels_out=tmp_path / "l.tif", quiet=True)
    assert summary.n_skipped == 1
    assert summary.n_collected == 5
    assert read_raster(tmp_path / "l.tif").values.ravel().tolist() == [1, 2, 3, 4, 5]
    p20 = read_patches(tmp_path / "o20.tif")
    for n, (j, i, _, _) in enumerate(c for k, c in enumerate(CELLS) if k != 1):
        assert_coordinate_patch(p20[n], j - 4, i - 4)


def test_multi_layer_gpkg_read_in_layer_order(tmp_path, pair):
    c20, _ = pair
    path = tmp_path / "layers.gpkg"

    def layer(name, cells, labels, field="class"):
        geom = shapely.to_wkb(shapely.points([in_cell(20, j, i, 10, 10) for j, i in cells]))
        pyogrio.raw.write(path, geometry=geom, field_data=[np.array(labels)], fields=[field],
                          crs=CRS, driver="GPKG", geometry_type="Point", layer=name)

    # Layer order is creation order (not alphabetical): zeta, other, alpha.
    layer("zeta", [(10, 10), (20, 20)], [1, 2])
    layer("other", [(15, 15)], [9], field="code")     # no "class" field: skipped
    layer("alpha", [(30, 5), (5, 30), (12, 12)], [3, 4, 5])
    assert [n for n, _ in pyogrio.list_layers(path)] == ["zeta", "other", "alpha"]
    summary = extract_patches([Source(c20, 4)], path, "class", [tmp_path / "o.tif"],
                              labels_out=tmp_path / "l.tif", quiet=True)
    assert summary.n_skipped == 1
    assert read_raster(tmp_path / "l.tif").values.ravel().tolist() == [1, 2, 3, 4, 5]
    p = read_patches(tmp_path / "o.tif")
    for n, (j, i) in enumerate([(10, 10), (20, 20), (30, 5), (5, 30), (12, 12)]):
        assert_coordinate_patch(p[n], j - 2, i - 2)


def test_multi_layer_gpkg_with_layers_in_different_crs(tmp_path, pair):
    # Was a bug (fixed in 8b558fc): every layer was taken in the first layer's CRS.
    from rasterio.warp import transform
    c20, _ = pair
    path = tmp_path / "layers.gpkg"
    utm = in_cell(20, 10, 10, 10, 10)
    other = in_cell(20, 20, 20, 10, 10)
    lon, lat = transform(CRS, "EPSG:4326", [other[0]], [other[1]])
    pyogrio.raw.write(path, geometry=shapely.to_wkb(shapely.points([utm])),
                      field_data=[np.array([1])], fields=["class"], crs=CRS, driver="GPKG",
                      geometry_type="Point", layer="utm")
    pyogrio.raw.write(path, geometry=shapely.to_wkb(shapely.points([[lon[0], lat[0]]])),
                      field_data=[np.array([2])], fields=["class"], crs="EPSG:4326",
                      driver="GPKG", geometry_type="Point", layer="lonlat")
    with pytest.raises(CRSMismatchError, match=r"vector: CRS EPSG:4326 of layer 'lonlat'"):
        extract_patches([Source(c20, 4)], path, "class", [tmp_path / "o.tif"], quiet=True)
    assert not (tmp_path / "o.tif").exists()
    summary = extract_patches([Source(c20, 4)], path, "class", [tmp_path / "o.tif"],
                              reproject=True, quiet=True)
    assert summary.n_collected == 2
    assert_coordinate_patch(read_patches(tmp_path / "o.tif")[1], 18, 18)


def test_empty_point_geometry_does_not_shift_labels(tmp_path, pair):
    c20, _ = pair
    geoms = [shapely.Point(), shapely.Point(*in_cell(20, 10, 10, 5, 5)),
             shapely.Point(*in_cell(20, 20, 20, 5, 5))]
    path = tmp_path / "empty.gpkg"
    pyogrio.raw.write(path, geometry=shapely.to_wkb(np.array(geoms, dtype=object)),
                      field_data=[np.array([1, 2, 3])], fields=["class"], crs=CRS,
                      driver="GPKG", geometry_type="Point")
    try:
        summary = extract_patches([Source(c20, 4)], path, "class", [tmp_path / "o.tif"],
                                  labels_out=tmp_path / "l.tif", quiet=True)
    except InputError as exc:   # rejecting the empty point with a clear error is fine too
        assert "empty" in str(exc).lower()
        return
    assert summary.n_features + summary.n_skipped == 3
    assert read_raster(tmp_path / "l.tif").values.ravel().tolist() == [2, 3]
    p = read_patches(tmp_path / "o.tif")
    assert_coordinate_patch(p[0], 8, 8)
    assert_coordinate_patch(p[1], 18, 18)


# ---------------------------------------------------------------- 4. outputs


def test_pixel_types_per_output_clamp_and_truncate(tmp_path):
    values = np.array([0.9, 255.9, 300.0, -1.5, 40000.0, -3.7, np.nan, -40000.0], np.float32)
    img = write_raster(tmp_path / "v.tif", values.reshape(1, 1, -1),
                       Affine(10, 0, L, 0, -10, T), crs=CRS)
    vec = points(tmp_path / "p.geojson", L + 5 + 10 * np.arange(len(values)),
                 np.full(len(values), T - 5), np.arange(len(values)))
    extract_patches([Source(img, 1, name="source1"), Source(img, 1, name="source2"),
                     Source(img, 1, name="source3")], vec, "class",
                    [tmp_path / "u8.tif", tmp_path / "i16.tif", tmp_path / "f.tif"],
                    pixel_types=["uint8", "int16", None], quiet=True)
    with rasterio.open(tmp_path / "u8.tif") as ds:
        assert ds.dtypes[0] == "uint8"
        assert ds.read(1).ravel().tolist() == [0, 255, 255, 0, 255, 0, 0, 0]
    with rasterio.open(tmp_path / "i16.tif") as ds:
        assert ds.dtypes[0] == "int16"
        assert ds.read(1).ravel().tolist() == [0, 255, 300, -1, 32767, -3, 0, -32768]
    with rasterio.open(tmp_path / "f.tif") as ds:
        assert ds.dtypes[0] == "float32"
        np.testing.assert_array_equal(ds.read(1).ravel(), values)


def test_patches_image_layout_and_dummy_georeference(tmp_path, pair):
    c20, c10 = pair
    vec = points(tmp_path / "p.geojson", [L + 205.0], [T - 205.0], [1])
    extract_patches([Source(c20, 8, name="source1"), Source(c10, 16, name="source2")], vec,
                    "class", [tmp_path / "o20.tif", tmp_path / "o10.tif"], quiet=True)
    for name, s, size in (("o20.tif", 20, 8), ("o10.tif", 10, 16)):
        with rasterio.open(tmp_path / name) as ds:
            assert (ds.width, ds.height, ds.count) == (size, size, 2)
            assert ds.crs is None
            assert ds.transform == Affine(s, 0, -s / 2, 0, -s, s / 2)
            assert ds.compression is None   # uncompressed by default, like OTBTF


def test_image_list_is_stacked_as_bands_in_order(tmp_path, pair):
    _, c10 = pair
    t = Affine(10, 0, L, 0, -10, T)
    k = write_raster(tmp_path / "k.tif", np.stack([np.full((80, 80), 7, np.uint8),
                                                   np.full((80, 80), 9, np.uint8)]), t, crs=CRS)
    vec = points(tmp_path / "p.geojson", [L + 405.0], [T - 305.0], [1])
    extract_patches([Source([c10, k], 4)], vec, "class", [tmp_path / "a.tif"], quiet=True)
    extract_patches([Source([k, c10], 4)], vec, "class", [tmp_path / "b.tif"], quiet=True)
    a = read_patches(tmp_path / "a.tif")[0]
    b = read_patches(tmp_path / "b.tif")[0]
    assert a.shape == b.shape == (4, 4, 4)
    assert_coordinate_patch(a[..., :2], 38, 28)
    assert (a[..., 2] == 7).all() and (a[..., 3] == 9).all()
    assert (b[..., 0] == 7).all() and (b[..., 1] == 9).all()
    assert_coordinate_patch(b[..., 2:], 38, 28)


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path, pair, monkeypatch):
    c20, c10 = pair
    rng = np.random.default_rng(3)
    vec = points(tmp_path / "p.geojson", L + rng.uniform(200, 600, 10),
                 T - rng.uniform(200, 600, 10), np.arange(10))
    final = tmp_path / "o20.tif"
    before = {p.name for p in tmp_path.iterdir()}
    calls = {"n": 0}
    real = patches_module.convert_pixels

    def failing(values, dtype, rounding=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(values, dtype, rounding)

    monkeypatch.setattr(spool_module, "WRITE_CHUNK", 2)
    monkeypatch.setattr(patches_module, "convert_pixels", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        extract_patches([Source(c20, 8, name="source1"), Source(c10, 16, name="source2")], vec,
                        "class", [final, tmp_path / "o10.tif"], quiet=True)
    assert calls["n"] == 3   # failed in the middle of the first output
    assert {p.name for p in tmp_path.iterdir()} == before


def test_failed_write_keeps_previous_file_intact(tmp_path, pair, monkeypatch):
    c20, _ = pair
    vec = points(tmp_path / "p.geojson", [L + 205.0], [T - 205.0], [1])
    final = tmp_path / "o.tif"
    final.write_bytes(b"previous run")

    def failing(values, dtype, rounding=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(patches_module, "convert_pixels", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_patches([Source(c20, 8)], vec, "class", [final], quiet=True)
    assert final.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif", "p.geojson"]


def _run_big(tmp_path: Path, big_pair, tag: str) -> tuple[int, Path, Path, Path]:
    c10, c20, vec, _, _ = big_pair
    data = np.full((1, 550, 550), 3, np.uint16)
    data[0, 100:120, 300:301] = 0
    nod = write_raster(tmp_path / f"nod_{tag}.tif", data, Affine(20, 0, L, 0, -20, T), crs=CRS)
    summary = extract_patches(
        [Source(c10, 16, name="source1"), Source([c20, nod], 8, nodata=0, name="source2")],
        vec, "class", [tmp_path / f"{tag}10.tif", tmp_path / f"{tag}20.tif"],
        labels_out=tmp_path / f"{tag}l.tif", quiet=True)
    return (summary.n_collected, tmp_path / f"{tag}10.tif", tmp_path / f"{tag}20.tif",
            tmp_path / f"{tag}l.tif")


def test_memmap_buffering_gives_identical_output(tmp_path, big_pair, monkeypatch):
    ref = _run_big(tmp_path, big_pair, "ref")
    used = []
    real = np.lib.format.open_memmap

    def spy(*args, **kwargs):
        used.append(kwargs.get("shape"))
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module, "MEMMAP_BYTES", 1)
    monkeypatch.setattr(np.lib.format, "open_memmap", spy)
    got = _run_big(tmp_path, big_pair, "mm")
    assert len(used) == 2   # one buffer per written source
    assert got[0] == ref[0]
    for a, b in zip(ref[1:], got[1:], strict=True):
        assert_same_patches(b, a)


def test_per_sample_reads_give_identical_output(tmp_path, big_pair, monkeypatch):
    calls = []
    real = reading_module.patches_from_region

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reading_module, "patches_from_region", spy)
    ref = _run_big(tmp_path, big_pair, "ref")
    assert calls   # the default path reads regions

    def forbidden(*args, **kwargs):
        raise AssertionError("region read used")

    monkeypatch.setattr(reading_module, "patches_from_region", forbidden)
    monkeypatch.setattr(reading_module, "REGION_OVERREAD", 0)
    monkeypatch.setattr(reading_module, "MIN_REGION", 0)
    got = _run_big(tmp_path, big_pair, "ps")
    assert got[0] == ref[0]
    for a, b in zip(ref[1:], got[1:], strict=True):
        assert_same_patches(b, a)
    assert 0 < ref[0] < 90   # some nodata / outside rejections happened


# ---------------------------------------------------------------- 10. property test

# Nested pairs (fine spacing, coarse spacing, fine corner, coarse corner, fine size, coarse size):
# aligned 2:1, Virginia-like 2:1 with the fine grid half a coarse pixel east, 3:1 offset.
NESTED = {
    "2to1_aligned": (10.0, 20.0, (L, T), (L, T), (60, 56), (30, 28)),
    "2to1_half_offset": (10.0, 20.0, (L + 10, T), (L, T), (59, 60), (30, 30)),
    "3to1_offset": (10.0, 30.0, (L, T), (L - 30, T + 60), (90, 84), (31, 30)),
}


@pytest.fixture(scope="module")
def nested_rasters(tmp_path_factory):
    d = tmp_path_factory.mktemp("nested")
    out = {}
    for name, (sf, sc, (fx, fy), (cx, cy), (fw, fh), (cw, ch)) in NESTED.items():
        fine = coordinate_raster(d / f"{name}_fine.tif", fw, fh, Affine(sf, 0, fx, 0, -sf, fy),
                                 crs=CRS)
        coarse = coordinate_raster(d / f"{name}_coarse.tif", cw, ch,
                                   Affine(sc, 0, cx, 0, -sc, cy), crs=CRS)
        out[name] = (fine, coarse, round(sc / sf))
    return d, out


@st.composite
def sample_points(draw):
    name = draw(st.sampled_from(sorted(NESTED)))
    sf, _, (fx, fy), _, (fw, fh), _ = NESTED[name]
    n = draw(st.integers(1, 12))
    # Anywhere over the fine image and a margin, or exactly on 5 m lines (pixel boundaries).
    coord_x = st.one_of(st.floats(fx - 50, fx + fw * sf + 50),
                        st.integers(-10, 2 * fw + 10).map(lambda k: fx + 5.0 * k))
    coord_y = st.one_of(st.floats(fy - fh * sf - 50, fy + 50),
                        st.integers(-10, 2 * fh + 10).map(lambda k: fy - 5.0 * k))
    xs = draw(st.lists(coord_x, min_size=n, max_size=n))
    ys = draw(st.lists(coord_y, min_size=n, max_size=n))
    rf = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))   # coarse patch, maybe non-square
    fine_first = draw(st.booleans())
    return name, np.array(xs), np.array(ys), rf, fine_first


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample_points())
def test_property_patches_equal_layout_windows(nested_rasters, case):
    d, rasters = nested_rasters
    name, xs, ys, rf, fine_first = case
    fine, coarse, ratio = rasters[name]
    s_fine = Source(fine, (ratio * rf[0], ratio * rf[1]))
    s_coarse = Source(coarse, rf)
    sources = [s_fine, s_coarse] if fine_first else [s_coarse, s_fine]
    for k, s in enumerate(sources, start=1):
        s.name = f"source{k}"
    grids = [s.grid for s in sources]
    layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),
                    factor=extraction_factor(grids))
    starts = layout.sample_windows(xs, ys)
    inside = np.logical_and.reduce([layout.inside(i, c, r) for i, (c, r) in enumerate(starts)])
    points_ = PointSet(xs, ys, np.arange(len(xs)), None)
    outs = [d / "out1.tif", d / "out2.tif"]
    if not inside.any():
        with pytest.raises(NoSamplesError):
            extract_patches(sources, points_, "class", outs, quiet=True)
        return
    summary = extract_patches(sources, points_, "class", outs, labels_out=d / "labels.tif",
                              labels_pixel_type="int32", quiet=True)
    kept = np.flatnonzero(inside)
    assert summary.n_collected == len(kept)
    assert read_raster(d / "labels.tif").values.ravel().tolist() == kept.tolist()
    patches = [read_patches(o) for o in outs]
    for n, f in enumerate(kept):
        extents = set()
        for i, (cols, rows) in enumerate(starts):
            assert_coordinate_patch(patches[i][n], int(cols[f]), int(rows[f]))
            t = grids[i].transform
            rx, ry = sources[i].patch_size
            extents.add((t.c + cols[f] * t.a, t.f + rows[f] * t.e,
                         t.c + (cols[f] + rx) * t.a, t.f + (rows[f] + ry) * t.e))
        assert len(extents) == 1, extents    # I1: both windows cover the same ground
        # The sample's window contains its point (within half a G cell of margin).
        left, top, right, bottom = extents.pop()
        assert left <= xs[f] + 1e-6 and bottom <= ys[f] + 1e-6
        assert right >= xs[f] - 1e-6 and top >= ys[f] - 1e-6
