"""Writing rasters: pixel types, OTB conversion, extended file names, writability, atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from terrapatch.apps._extended import (
    ExtendedFilename,
    parse_extended_filename,
    split_extended_path,
)
from terrapatch.errors import InputError, OutputError
from terrapatch.writer import (
    atomic_output,
    check_writable,
    convert_pixels,
    geotiff_profile,
    pixel_dtype,
)

# ---------------------------------------------------------------- pixel types


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("uint8", "uint8"), ("int16", "int16"), ("uint16", "uint16"), ("int32", "int32"),
     ("uint32", "uint32"), ("float", "float32"), ("float32", "float32"), ("double", "float64"),
     (" UInt8 ", "uint8"), (None, "float32")],
)
def test_pixel_dtype_names(name, dtype):
    assert pixel_dtype(name) == np.dtype(dtype)


def test_pixel_dtype_defaults_numpy_and_errors():
    assert pixel_dtype(None, default="uint8") == np.uint8
    assert pixel_dtype(np.int16) == np.int16
    assert pixel_dtype(np.dtype("float64")) == np.float64
    with pytest.raises(InputError, match=r"source2\.out: unknown pixel type 'uint12'"):
        pixel_dtype("uint12", parameter="source2.out")
    with pytest.raises(InputError, match=r"out: unsupported pixel type 'complex64'"):
        pixel_dtype(np.complex64, parameter="out")


# ---------------------------------------------------------------- conversion


def test_float_to_uint8_clamps_then_truncates():
    values = np.array([-300.0, -1.5, -0.4, 0.0, 0.9, 1.0, 254.99, 255.0, 255.7, 1e9, np.nan,
                       np.inf, -np.inf], np.float32)
    out = convert_pixels(values, np.dtype("uint8"))
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 0, 0, 0, 1, 254, 255, 255, 255, 0, 255, 0]


def test_float_to_int16_truncates_toward_zero():
    values = np.array([-40000.0, -3.7, -0.9, 0.9, 3.7, 32767.9, 40000.0], np.float64)
    assert convert_pixels(values, np.dtype("int16")).tolist() == [
        -32768, -3, 0, 0, 3, 32767, 32767]


def test_rounding_is_half_away_from_zero():
    values = np.array([-2.5, -1.4, 0.5, 1.5, 2.49, 254.5, 255.5], np.float32)
    assert convert_pixels(values, np.dtype("int16"), rounding=True).tolist() == [
        -3, -1, 1, 2, 2, 255, 256]
    assert convert_pixels(values, np.dtype("uint8"), rounding=True).tolist() == [
        0, 0, 1, 2, 2, 255, 255]


def test_integer_to_integer_clamps():
    values = np.array([-5, 0, 200, 300, 70000], np.int64)
    assert convert_pixels(values, np.dtype("uint8")).tolist() == [0, 0, 200, 255, 255]
    assert convert_pixels(values, np.dtype("int16")).tolist() == [-5, 0, 200, 300, 32767]
    u16 = np.array([0, 40000, 65535], np.uint16)
    assert convert_pixels(u16, np.dtype("int16")).tolist() == [0, 32767, 32767]
    assert convert_pixels(u16, np.dtype("uint32")).tolist() == [0, 40000, 65535]


def test_same_dtype_is_untouched_and_float_is_a_cast():
    values = np.array([1.5, -2.25], np.float32)
    assert convert_pixels(values, np.dtype("float32")) is values
    out = convert_pixels(np.array([1, 2**24 + 1], np.int64), np.dtype("float64"))
    assert out.dtype == np.float64 and out.tolist() == [1.0, 2.0**24 + 1]


# ---------------------------------------------------------------- extended file names


def test_split_extended_path():
    assert split_extended_path("out.tif") == (Path("out.tif"), "")
    assert split_extended_path("d/out.tif?&box=0:0:10:10") == (Path("d/out.tif"), "box=0:0:10:10")
    assert split_extended_path(Path("x.tif")) == (Path("x.tif"), "")


def test_parse_extended_filename():
    ext = parse_extended_filename(
        "?&box=2000:2000:500:500&gdal:co:compress=DEFLATE&gdal:co:TILED=YES&streaming:type=none")
    assert ext.box == (2000, 2000, 500, 500)
    assert ext.creation_options == {"COMPRESS": "DEFLATE", "TILED": "YES"}
    assert parse_extended_filename("") == ExtendedFilename()
    assert parse_extended_filename(None).creation_options == {}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("box=1:2:3", "box='1:2:3'"), ("box=0:0:0:5", "box='0:0:0:5'"), ("box=a:b:c:d", "box="),
     ("colour=red", "'colour'"), ("gdal:co:COMPRESS", "'gdal:co:COMPRESS'")],
)
def test_bad_extended_filename_names_parameter_and_entry(text, fragment):
    with pytest.raises(InputError) as info:
        parse_extended_filename(text, parameter="source1.out")
    assert str(info.value).startswith("source1.out: ")
    assert fragment in str(info.value)


# ---------------------------------------------------------------- writability and atomicity


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "a.tif", "out") == tmp_path / "a.tif"
    with pytest.raises(OutputError, match=r"outlabels: directory .*missing.* does not exist"):
        check_writable(tmp_path / "missing" / "a.tif", "outlabels")
    with pytest.raises(OutputError, match=r"out: .* is a directory"):
        check_writable(tmp_path, "out")


def test_atomic_output_renames_on_success(tmp_path):
    target = tmp_path / "a.tif"
    with atomic_output(target, "out") as tmp:
        assert tmp.parent == tmp_path / ".a.tif.pending" and tmp != target
        assert not target.exists()
        tmp.write_bytes(b"complete")
        Path(str(tmp) + ".aux.xml").write_text("<PAMDataset/>")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_cleans_up_on_failure(tmp_path, error):
    target = tmp_path / "a.tif"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_output(target, "out") as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]


def test_atomic_output_checks_the_directory_first(tmp_path):
    with pytest.raises(OutputError, match=r"source1\.out: directory"):
        with atomic_output(tmp_path / "no" / "a.tif", "source1.out"):
            pytest.fail("must not be reached")


# ---------------------------------------------------------------- profiles


def test_geotiff_profile():
    small = geotiff_profile(100, 50, 3, np.dtype("float32"))
    assert small["compress"] == "deflate" and "tiled" not in small and "predictor" not in small
    big = geotiff_profile(512, 300, 1, np.dtype("uint16"), crs="EPSG:32631", nodata=0,
                          creation_options={"COMPRESS": "LZW", "ZLEVEL": "9"})
    assert big["tiled"] is True and big["blockxsize"] == big["blockysize"] == 256
    assert big["predictor"] == 2
    assert big["compress"] == "LZW" and big["zlevel"] == "9"
    assert big["crs"] == "EPSG:32631" and big["nodata"] == 0
    assert geotiff_profile(300, 300, 1, np.dtype("uint8"))["bigtiff"] == "IF_SAFER"
    assert "predictor" not in geotiff_profile(300, 300, 1, np.dtype("uint8"))


def test_output_group_commits_all_or_nothing(tmp_path):
    from terrapatch.writer import output_group

    with output_group() as stage:
        stage(tmp_path / "a.tif").write_text("a")
        shp = stage(tmp_path / "p.shp")
        shp.write_text("s")
        shp.with_suffix(".dbf").write_text("d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "p.dbf", "p.shp"]
    with pytest.raises(RuntimeError), output_group() as stage:
        stage(tmp_path / "b.tif").write_text("b")
        raise RuntimeError("second output failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "p.dbf", "p.shp"]


def test_extraction_failure_on_last_output_leaves_no_output(tmp_path, monkeypatch):
    import terrapatch.extraction as ex
    from terrapatch.extraction import job
    from terrapatch.raster import Source
    from terrapatch.testing import make_scene

    scene = make_scene(tmp_path / "scene", size=128, n_points=100)
    out = tmp_path / "out"
    out.mkdir()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(job, "write_points", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.extract_patches([Source(scene.img_10m, 16, 0)], scene.points_train, "class",
                           [out / "p.tif"], labels_out=out / "l.tif",
                           points_out=out / "pts.gpkg", quiet=True)
    assert list(out.iterdir()) == []


def test_outputs_get_umask_permissions_and_write_failures_are_output_errors(tmp_path):
    from terrapatch.writer import atomic_directory, atomic_output

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "a.txt", "out") as tmp:
            tmp.write_text("x")
        with atomic_directory(tmp_path / "d", "savedmodel") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    with pytest.raises(OutputError, match=r"out: cannot write .*b.txt.*No space left"), \
            atomic_output(tmp_path / "b.txt", "out"):
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]
