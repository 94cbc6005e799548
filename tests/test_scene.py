"""The synthetic Sentinel-2-like scene: determinism, nested grids, nodata border, labels, points."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.testing import CLASSES, assert_same_map, make_scene, read_raster
from terrapatch.vector import read_points

SIZE = 128


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    base = tmp_path_factory.mktemp("scenes")
    a = make_scene(base / "a", size=SIZE, n_points=800, seed=5)
    b = make_scene(base / "b", size=SIZE, n_points=800, seed=5)
    c = make_scene(base / "c", size=SIZE, n_points=800, seed=6)
    return a, b, c


def test_same_seed_same_files_other_seed_differs(scenes):
    a, b, c = scenes
    for attr in ("img_10m", "img_20m", "labels_10m"):
        assert_same_map(getattr(a, attr), getattr(b, attr), check_layout=True)
        da, dc = (read_raster(getattr(s, attr)).values for s in (a, c))
        assert not np.array_equal(da, dc), attr
    for attr in ("points_train", "points_valid"):
        pa, pb = (read_points(getattr(s, attr), "class") for s in (a, b))
        np.testing.assert_array_equal(pa.x, pb.x)
        np.testing.assert_array_equal(pa.y, pb.y)
        np.testing.assert_array_equal(pa.labels, pb.labels)
    assert not np.array_equal(read_points(a.points_train, "class").x,
                              read_points(c.points_train, "class").x)


def test_grids_nest_and_files_are_as_documented(scenes):
    s = scenes[0]
    b10, t10, dt10, crs10, nd10 = read_raster(s.img_10m)[:5]
    b20, t20, dt20, crs20, nd20 = read_raster(s.img_20m)[:5]
    lab, tl, dtl, crsl, ndl = read_raster(s.labels_10m)[:5]
    assert b10.shape == (4, SIZE, SIZE) and b20.shape == (6, SIZE // 2, SIZE // 2)
    assert lab.shape == (1, SIZE, SIZE)
    assert dt10 == dt20 == "uint16" and dtl == "uint8"
    assert (nd10, nd20, ndl) == (0, 0, 255)
    assert crs10 == crs20 == crsl == s.crs
    assert t10 == tl == s.transform_10m and t20 == s.transform_20m
    # Nested: same outer corner, spacing ratio 2, same extent.
    assert (t10.c, t10.f) == (t20.c, t20.f)
    assert t20.a == 2 * t10.a and t20.e == 2 * t10.e
    assert t10.b == t10.d == t20.b == t20.d == 0
    assert SIZE * t10.a == (SIZE // 2) * t20.a
    assert t10 == Affine(10, 0, t10.c, 0, -10, t10.f)


def test_nodata_border_in_both_grids(scenes):
    s = scenes[0]
    b10 = read_raster(s.img_10m).values
    b20 = read_raster(s.img_20m).values
    lab = read_raster(s.labels_10m, band=1).values
    nodata10 = (b10 == 0).all(axis=0)
    nodata20 = (b20 == 0).all(axis=0)
    # Nodata is all-bands-or-none, and only on the right side.
    assert ((b10 == 0).any(axis=0) == nodata10).all()
    assert ((b20 == 0).any(axis=0) == nodata20).all()
    assert nodata10.any() and nodata20.any()
    assert not nodata10[:, : SIZE // 2].any() and nodata10[:, -1].all()
    assert ((lab == 255) == nodata10).all()
    # A 20 m pixel is nodata exactly when one of its four 10 m pixels is.
    blocks = nodata10.reshape(SIZE // 2, 2, SIZE // 2, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(nodata20, blocks)


def test_all_classes_present_and_points_match_labels(scenes):
    s = scenes[0]
    lab = read_raster(s.labels_10m, band=1).values
    assert set(np.unique(lab).tolist()) == {*range(len(CLASSES)), 255}
    train = read_points(s.points_train, "class")
    valid = read_points(s.points_valid, "class")
    assert train.crs == valid.crs == s.crs
    n = len(train) + len(valid)
    assert 0.75 * 800 * 0.8 < n <= 800    # points on nodata are dropped
    assert abs(len(train) - 0.8 * n) <= 1
    labels = np.concatenate([train.labels, valid.labels])
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    x = np.concatenate([train.x, valid.x])
    y = np.concatenate([train.y, valid.y])
    with rasterio.open(s.labels_10m) as ds:
        at_points = np.array([v[0] for v in ds.sample(zip(x, y, strict=True))])
    np.testing.assert_array_equal(at_points, labels)


def test_rejects_odd_or_tiny_sizes(tmp_path):
    for size in (63, 100 + 1, 32):
        with pytest.raises(ValueError, match="size"):
            make_scene(tmp_path / str(size), size=size, n_points=10)
