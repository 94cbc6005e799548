"""The assertions of terrapatch.testing: they pass on equal inputs and say what differs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from affine import Affine
from rasterio.windows import Window

from terrapatch.errors import InputError
from terrapatch.patches import write_patches_image
from terrapatch.testing import (
    Raster,
    SpellingCase,
    assert_coordinate_patch,
    assert_respelled,
    assert_same_map,
    assert_same_patches,
    assert_same_values,
    assert_windows_equal,
    coordinate_raster,
    read_raster,
    write_raster,
)

T = Affine(10, 0, 500000.0, 0, -10, 4000000.0)


@pytest.fixture
def values() -> np.ndarray:
    return np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)


@pytest.fixture
def ref(tmp_path, values):
    return write_raster(tmp_path / "ref.tif", values, T, nodata=-1.0)


def test_read_raster(ref, values):
    r = read_raster(ref)
    assert isinstance(r, Raster)
    np.testing.assert_array_equal(r.values, values)
    assert (r.transform, r.crs.to_epsg(), r.nodata, r.dtype) == (T, 32631, -1.0, "float32")
    assert r.path == str(ref)
    assert r.profile["width"] == 5 and r.profile["count"] == 2
    assert read_raster(ref, band=2).values.shape == (6, 5)
    got, transform = read_raster(ref)[:2]
    assert transform == T and got.shape == (2, 6, 5)


def test_same_map_passes_on_equal_maps(tmp_path, ref, values):
    copy = write_raster(tmp_path / "copy.tif", values, T, nodata=-1.0)
    assert_same_map(copy, ref)
    assert_same_map(copy, read_raster(ref), check_layout=True)
    assert_same_map(read_raster(copy), ref)


def test_same_map_names_the_changed_pixel_and_the_largest_difference(tmp_path, ref, values):
    changed = values.copy()
    changed[1, 4, 3] += 0.5
    changed[1, 5, 0] += 2.0
    other = write_raster(tmp_path / "other.tif", changed, T, nodata=-1.0)
    message = (r"values differ \(bit for bit\) at 2 of 60 elements; first at "
               r"band index \(0-based\) 1, row 4, col 3: 53\.5 != 53\.0 \(expected\); "
               r"largest \|difference\| 2$")
    with pytest.raises(AssertionError, match=message):
        assert_same_map(other, ref)
    with pytest.raises(AssertionError, match=re.escape(f"maps {str(other)!r} and {str(ref)!r}")):
        assert_same_map(read_raster(other), read_raster(ref))
    with pytest.raises(AssertionError,
                       match=r"within atol=1\.0, rtol=0.* at 1 of 60.*row 5, col 0"):
        assert_same_map(other, ref, atol=1.0)
    assert_same_map(other, ref, atol=2.0)
    assert_same_map(other, ref, rtol=0.1)


def test_same_map_exact_means_bit_for_bit(tmp_path, values):
    zeros = np.zeros_like(values)
    with pytest.raises(AssertionError, match="bit for bit"):
        assert_same_values(zeros, -zeros)
    assert_same_values(zeros, -zeros, atol=1e-12)
    nan = np.full_like(values, np.nan)
    assert_same_map(write_raster(tmp_path / "n1.tif", nan, T),
                    write_raster(tmp_path / "n2.tif", nan, T))


def test_same_map_shifted_transform(tmp_path, ref, values):
    shifted = write_raster(tmp_path / "shifted.tif", values,
                           Affine(10, 0, 500010.0, 0, -10, 4000000.0), nodata=-1.0)
    with pytest.raises(AssertionError, match=r"transforms differ: \(10\.0, 0\.0, 500010\.0.*"
                                             r"!= \(10\.0, 0\.0, 500000\.0"):
        assert_same_map(shifted, ref)
    assert_same_map(shifted, ref, check_georeference=False)


def test_same_map_other_crs_dtype_nodata_size(tmp_path, ref, values):
    cases = {
        r"CRS differ: 'EPSG:32632' != 'EPSG:32631'":
            write_raster(tmp_path / "crs.tif", values, T, crs="EPSG:32632", nodata=-1.0),
        r"dtypes differ: 'float64' != 'float32'":
            write_raster(tmp_path / "f64.tif", values.astype(np.float64), T, nodata=-1.0),
        r"nodata values differ: None != -1\.0":
            write_raster(tmp_path / "nodata.tif", values, T),
        r"shapes \(bands, rows, cols\) differ: \(1, 6, 5\) != \(2, 6, 5\)":
            write_raster(tmp_path / "band.tif", values[:1], T, nodata=-1.0),
    }
    for message, path in cases.items():
        with pytest.raises(AssertionError, match=message):
            assert_same_map(path, ref)
        with pytest.raises(AssertionError, match=re.escape(repr(str(path)))):
            assert_same_map(path, ref)


def test_same_map_layout(tmp_path, ref, values):
    tiled = write_raster(tmp_path / "tiled.tif", values, T, nodata=-1.0, compress="deflate")
    assert_same_map(tiled, ref)
    with pytest.raises(AssertionError, match=r"profile entries \['compress'\]"):
        assert_same_map(tiled, ref, check_layout=True)


def test_same_values():
    a = np.arange(6).reshape(2, 3)
    assert_same_values(a, a.copy())
    with pytest.raises(AssertionError, match=r"dtypes differ: int32 != int64"):
        assert_same_values(a.astype(np.int32), a)
    with pytest.raises(AssertionError, match=r"shapes differ: \(3, 2\) != \(2, 3\)"):
        assert_same_values(a.T, a)
    b = a.copy()
    b[1, 2] = 9
    with pytest.raises(AssertionError, match=r"^labels differ .* at 1 of 6 elements; first "
                                             r"at y 1, x 2: 9 != 5 \(expected\); largest "
                                             r"\|difference\| 4$"):
        assert_same_values(b, a, axes=("y", "x"), what="labels")
    assert_same_values(b, a, atol=4)


def _patches(path, values, psx=3, psy=2, spacing=(10.0, 10.0)):
    return write_patches_image(path, [values], n_patches=len(values), patch_size_x=psx,
                               patch_size_y=psy, bands=values.shape[-1], dtype=values.dtype,
                               spacing=spacing)


def test_same_patches(tmp_path):
    p = np.arange(4 * 2 * 3 * 2, dtype=np.int16).reshape(4, 2, 3, 2)
    a = _patches(tmp_path / "a.tif", p)
    assert_same_patches(_patches(tmp_path / "b.tif", p), a)
    changed = p.copy()
    changed[2, 1, 0, 1] = 100
    with pytest.raises(AssertionError, match=r"first at patch 2, row 1, col 0, band 1"):
        assert_same_patches(_patches(tmp_path / "c.tif", changed), a)
    with pytest.raises(AssertionError, match=r"n_patches differ: 3 != 4"):
        assert_same_patches(_patches(tmp_path / "d.tif", p[:3]), a)
    square = p.reshape(4, 3, 2, 2)  # same pixels, 2×3 patches
    with pytest.raises(AssertionError, match=r"patch_size_x differ: 2 != 3"):
        assert_same_patches(_patches(tmp_path / "e.tif", square, psx=2, psy=3), a)
    with pytest.raises(AssertionError, match=r"dtype differ"):
        assert_same_patches(_patches(tmp_path / "f.tif", p.astype(np.float32)), a)
    coarse = _patches(tmp_path / "g.tif", p, spacing=(20.0, 20.0))
    with pytest.raises(AssertionError, match=r"transforms differ"):
        assert_same_patches(coarse, a)
    assert_same_patches(coarse, a, check_georeference=False)


def test_same_patches_reports_the_patch_number_past_the_first_read(tmp_path, monkeypatch):
    import terrapatch.testing.asserts as asserts

    monkeypatch.setattr(asserts, "PATCHES_PER_READ", 2)
    p = np.zeros((5, 2, 2, 1), np.uint8)
    q = p.copy()
    q[3, 0, 1, 0] = 1
    with pytest.raises(AssertionError, match=r"patch 1, row 0, col 1.*\(patch numbers from 2\)"):
        assert_same_patches(_patches(tmp_path / "q.tif", q, 2, 2),
                            _patches(tmp_path / "p.tif", p, 2, 2))


def test_windows_equal():
    assert_windows_equal(Window(2, 3, 4, 5), Window(2, 3, 4, 5))
    assert_windows_equal(Window(2, 3, 4, 5), (2, 3, 4, 5))
    assert_windows_equal(((3, 8), (2, 6)), Window(2, 3, 4, 5))
    with pytest.raises(AssertionError, match=r"windows differ: row_off 4 != 3, height 6 != 5"):
        assert_windows_equal(Window(2, 4, 4, 6), Window(2, 3, 4, 5))
    with pytest.raises(TypeError, match="not a window"):
        assert_windows_equal((1, 2, 3), Window(0, 0, 1, 1))


def test_coordinate_patch(tmp_path):
    path = coordinate_raster(tmp_path / "c.tif", 20, 10, T)
    data = read_raster(path).values.transpose(1, 2, 0)  # (rows, cols, 2)
    assert_coordinate_patch(data[3:7, 5:9], 5, 3)
    with pytest.raises(AssertionError, match=r"not the window at col_off=5, row_off=3: its "
                                             r"first pixel is at col .*6.*, row .*3"):
        assert_coordinate_patch(data[3:7, 6:10], 5, 3)
    broken = data[3:7, 5:9].copy()
    broken[2, 1, 1] = 0
    with pytest.raises(AssertionError, match=r"band 1 \(rows\).*first at row 2, col 1"):
        assert_coordinate_patch(broken, 5, 3)
    with pytest.raises(AssertionError, match=r"not \(rows, cols, bands ≥ 2\)"):
        assert_coordinate_patch(data[..., 0], 0, 0)


def test_respelled():
    core = "labels_out: 300 does not fit uint8; give labels_pixel_type=int16"
    app = "outlabels: 300 does not fit uint8; give outlabels pixel type=int16"
    names = [("labels_out", "outlabels"), ("labels_pixel_type", "outlabels pixel type")]
    assert_respelled(core, app, names)
    with pytest.raises(AssertionError, match=r"does not start with 'outlabels'"):
        assert_respelled(core, "labels_out: 300 does not fit uint8", names)
    with pytest.raises(AssertionError, match=r"does not mention 'clamp_labels'"):
        assert_respelled(core, app, [*names, ("clamp_labels", "outlabels.clamp")])
    with pytest.raises(AssertionError, match=r"differ beyond their names"):
        assert_respelled(core, app.replace("uint8", "int8"), names)
    with pytest.raises(AssertionError, match=r"names: give at least"):
        assert_respelled(core, app, [])


def test_spelling_case_needs_both_errors():
    def core(value):
        raise InputError(f"spcscale: {value} is not a scale")

    def facade(value):
        raise InputError(f"output.spcscale: {value} is not a scale")

    SpellingCase(core, facade, (("spcscale", "output.spcscale"),)).check(1.5)
    with pytest.raises(AssertionError, match=r"raised no terrapatch error"):
        SpellingCase(core, lambda value: None, (("spcscale", "output.spcscale"),)).check(1.5)
    with pytest.raises(AssertionError, match=r"differ beyond their names"):
        SpellingCase(core, lambda v: facade(v + 1), (("spcscale", "output.spcscale"),)).check(1.5)
