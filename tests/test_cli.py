"""The ``terrapatch`` command line for PatchesExtraction: help, runs, pixel types, exit codes."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Compression

from terrapatch.cli import main
from terrapatch.errors import MissingInputError
from terrapatch.patches import read_patches
from terrapatch.testing import assert_coordinate_patch, coordinate_raster, write_raster
from terrapatch.vector import write_points

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
# 20 m cells (j, i) of the sample points, and their labels.
CELLS = [(6, 6), (12, 30), (25, 9), (33, 33)]
LABELS = [4, 0, 7, 2]


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path, Path]:
    c10 = coordinate_raster(tmp_path / "c10.tif", 80, 80, Affine(10, 0, L, 0, -10, T), crs=CRS)
    c20 = coordinate_raster(tmp_path / "c20.tif", 40, 40, Affine(20, 0, L, 0, -20, T), crs=CRS)
    x = np.array([L + 20 * j + 15.0 for j, _ in CELLS])   # right half: odd 10 m column
    y = np.array([T - 20 * i - 15.0 for _, i in CELLS])   # lower half: odd 10 m row
    vec = write_points(tmp_path / "p.gpkg", x, y, {"class": np.array(LABELS)}, crs=CRS)
    return c10, c20, vec


def check_windows(o10: Path, o20: Path) -> None:
    p10, p20 = read_patches(o10), read_patches(o20)
    assert p10.shape == (len(CELLS), 16, 16, 2)
    assert p20.shape == (len(CELLS), 8, 8, 2)
    for n, (j, i) in enumerate(CELLS):
        assert_coordinate_patch(p10[n], 2 * j - 8, 2 * i - 8)
        assert_coordinate_patch(p20[n], j - 4, i - 4)


def two_source_argv(tmp_path: Path, c10: Path, c20: Path, vec: Path) -> list[str]:
    return [
        "PatchesExtraction",
        "-source1.il", str(c10), "-source1.patchsizex", "16", "-source1.patchsizey", "16",
        "-source1.out", str(tmp_path / "a.tif"), "uint16",
        "-source2.il", str(c20), "-source2.patchsizex", "8", "-source2.patchsizey", "8",
        "-source2.out", f"{tmp_path / 'b.tif'}?&gdal:co:COMPRESS=DEFLATE",
        "-vec", str(vec), "-field", "class",
        "-outlabels", str(tmp_path / "l.tif"), "int32",
    ]


# ---------------------------------------------------------------- help


def test_help_lists_source_groups_from_env(capsys, monkeypatch):
    monkeypatch.setenv("OTB_TF_NSOURCES", "2")
    assert main(["PatchesExtraction", "-help"]) == 0
    out = capsys.readouterr().out
    assert "[source1]" in out and "[source2]" in out and "[source3]" not in out
    for key in ("il", "out", "patchsizex", "patchsizey", "nodata"):
        assert f"-source1.{key}" in out and f"-source2.{key}" in out
    for key in ("-vec", "-field", "-outlabels", "-outpoints", "-grid.factor", "-vec.reproject"):
        assert key in out
    assert "Sources: 2" in out


def test_help_defaults_to_one_source_and_follows_given_keys(capsys, monkeypatch):
    monkeypatch.delenv("OTB_TF_NSOURCES", raising=False)
    assert main(["PatchesExtraction", "-help"]) == 0
    out = capsys.readouterr().out
    assert "[source1]" in out and "[source2]" not in out
    assert main(["PatchesExtraction", "-source3.il", "x.tif", "-help"]) == 0
    out = capsys.readouterr().out
    assert "[source3]" in out and "-source3.patchsizey" in out


@pytest.mark.parametrize(("value", "groups"), [("3x", 3), ("-1", 1), ("", 1)])
def test_help_parses_otb_tf_nsources_like_stoi(capsys, monkeypatch, value, groups):
    monkeypatch.setenv("OTB_TF_NSOURCES", value)
    assert main(["PatchesExtraction", "-help"]) == 0
    out = capsys.readouterr().out
    assert f"[source{groups}]" in out and f"[source{groups + 1}]" not in out


def test_usage_and_unknown_application(capsys):
    assert main([]) == 2
    assert "PatchesExtraction" in capsys.readouterr().out
    assert main(["-help"]) == 0
    assert "PatchesExtraction" in capsys.readouterr().out
    assert main(["PatchExtraction", "-vec", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown application or command 'PatchExtraction'" in err


# ---------------------------------------------------------------- runs


def test_two_source_run_with_trailing_pixel_types(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.delenv("OTB_TF_NSOURCES", raising=False)
    c10, c20, vec = inputs
    argv = [*two_source_argv(tmp_path, c10, c20, vec), "-outpoints", str(tmp_path / "k.gpkg")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "4 samples collected of 4" in err
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert ds.dtypes[0] == "uint16"
    with rasterio.open(tmp_path / "b.tif") as ds:
        assert ds.dtypes[0] == "float32"
        assert ds.compression == Compression.deflate
    with rasterio.open(tmp_path / "l.tif") as ds:
        assert ds.dtypes[0] == "int32"
        assert ds.read(1).ravel().tolist() == LABELS
    check_windows(tmp_path / "a.tif", tmp_path / "b.tif")
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "k.gpkg")
    assert fields[list(meta["fields"]).index("patch")].tolist() == [0, 1, 2, 3]


def test_switched_sources_and_quiet(tmp_path, inputs, capsys):
    c10, c20, vec = inputs
    argv = ["PatchesExtraction", "--quiet",
            "-source1.il", str(c20), "-source1.patchsizex", "8", "-source1.patchsizey", "8",
            "-source1.out", str(tmp_path / "b.tif"),
            "-source2.il", str(c10), "-source2.patchsizex", "16", "-source2.patchsizey", "16",
            "-source2.out", str(tmp_path / "a.tif"), "-vec", str(vec), "-field", "class"]
    assert main(argv) == 0
    assert "samples collected" not in capsys.readouterr().err   # --quiet: warnings only
    check_windows(tmp_path / "a.tif", tmp_path / "b.tif")


def test_image_list_negative_nodata_and_bare_flag(tmp_path, inputs, capsys):
    c10, _, _ = inputs
    data = np.full((1, 80, 80), 1, np.int16)
    data[0, 60, 12] = -7
    extra = write_raster(tmp_path / "extra.tif", data, Affine(10, 0, L, 0, -10, T), crs=CRS)
    from rasterio.warp import transform
    xs, ys = np.array([L + 125.0, L + 405.0]), np.array([T - 605.0, T - 405.0])
    lon, lat = transform(CRS, "EPSG:4326", xs, ys)
    vec = write_points(tmp_path / "ll.geojson", np.array(lon), np.array(lat),
                       {"class": np.array([1, 2])}, crs="EPSG:4326")
    argv = ["PatchesExtraction", "-source1.il", str(c10), str(extra),
            "-source1.patchsizex", "4", "-source1.patchsizey", "4",
            "-source1.nodata", "-7", "-source1.out", str(tmp_path / "o.tif"),
            "-vec", str(vec), "-vec.reproject", "-field", "class",
            "-outlabels", str(tmp_path / "l.tif")]
    assert main(argv) == 0, capsys.readouterr().err
    p = read_patches(tmp_path / "o.tif")
    assert p.shape == (1, 4, 4, 3)          # 2 + 1 bands stacked
    assert p[0, 0, :, 0].tolist() == [38, 39, 40, 41]
    assert (p[0, ..., 2] == 1).all()
    with rasterio.open(tmp_path / "l.tif") as ds:
        assert ds.read(1).ravel().tolist() == [2]   # the first sample touched -7


def test_debug_lets_the_error_through(tmp_path, inputs):
    c10, _, vec = inputs
    argv = two_source_argv(tmp_path, c10, tmp_path / "absent.tif", vec)
    with pytest.raises(MissingInputError, match=r"absent\.tif"):
        main([*argv, "--debug"])


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("terrapatch")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "terrapatch.cli"]


def test_real_subprocess_run_and_debug_traceback(tmp_path, inputs):
    c10, c20, vec = inputs
    env = {**os.environ, "OTB_TF_NSOURCES": "2"}
    done = subprocess.run([*_cli(), *two_source_argv(tmp_path, c10, c20, vec)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    check_windows(tmp_path / "a.tif", tmp_path / "b.tif")
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert ds.dtypes[0] == "uint16"

    bad = two_source_argv(tmp_path / "nowhere", c10, c20, vec)
    done = subprocess.run([*_cli(), *bad], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "source1.out" in done.stderr and "nowhere" in done.stderr
    assert "Traceback" not in done.stderr

    done = subprocess.run([*_cli(), *bad, "--debug"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in done.stderr
    assert "OutputError" in done.stderr
    assert not (tmp_path / "nowhere").exists()


def test_bare_key_for_a_value_parameter_is_an_error(tmp_path, capsys):
    from terrapatch.cli import main as cli_main

    code = cli_main(["PatchesExtraction", "-source1.il", "x.tif", "-source1.nodata",
                     "-source1.patchsizex", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].endswith("source1.nodata: missing value (a float is expected)")
