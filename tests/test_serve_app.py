"""TensorflowModelServe facade and CLI: OTBTF keys, pyotb-style write, command line."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys

import numpy as np
import pytest
from affine import Affine

from terrapatch.apps import TensorflowModelServe
from terrapatch.apps.serve import parse_user_placeholders
from terrapatch.cli import main
from terrapatch.errors import InputError
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.testing import assert_same_map, read_raster, write_raster
from terrapatch.testing.models import seed_model

L, T = 500000.0, 4000000.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    rng = np.random.default_rng(1)
    s10 = write_raster(d / "s2_10m.tif", rng.integers(0, 9000, (4, 96, 96), np.uint16),
                       Affine(10.0, 0.0, L, 0.0, -10.0, T))
    s20 = write_raster(d / "s2_20m.tif", rng.integers(0, 9000, (6, 48, 48), np.uint16),
                       Affine(20.0, 0.0, L, 0.0, -20.0, T))
    model = seed_model(seed=2)
    model.save(d / "seed.keras")
    return {"s10": s10, "s20": s20, "model": d / "seed.keras"}


def _reference(files, tmp_path, box=None):
    sources = [Source(files["s10"], 16, placeholder="input_10m", name="source1"),
               Source(files["s20"], 8, placeholder="input_20m", name="source2")]
    return serve(sources, files["model"], tmp_path / "ref.tif", "estimated_labels",
                 fullyconv=True, spcscale=2, box=box, pixel_type="uint8", quiet=True)


def test_pyotb_style_call_of_the_seed_script(files, tmp_path):
    ref = _reference(files, tmp_path, box=(2, 3, 10, 12))
    app = TensorflowModelServe(
        n_sources=2,
        source1_il=str(files["s10"]), source1_rfieldx=16, source1_rfieldy=16,
        source1_placeholder="input_10m",
        source2_il=str(files["s20"]), source2_rfieldx=8, source2_rfieldy=8,
        source2_placeholder="input_20m",
        model_dir=str(files["model"]), model_fullyconv=True,
        output_names="estimated_labels", output_spcscale=2,
    )
    summary = app.write(tmp_path / "map.tif", pixel_type="uint8",
                        ext_fname="box=2:3:10:12&gdal:co:COMPRESS=LZW")
    assert (summary.width, summary.height) == (10, 12)
    got = read_raster(tmp_path / "map.tif")
    assert got.dtype == "uint8" and got.profile["compress"].lower() == "lzw"
    assert got.transform == Affine(20.0, 0.0, L + 80 + 40, 0.0, -20.0, T - 80 - 60)
    assert_same_map(got, ref.path)


def test_dict_keys_defaults_and_derived_geometry(files, tmp_path):
    """Keys as a dict in dotted spelling; rfield and placeholders left to defaults."""
    summary = TensorflowModelServe({
        "source1.il": str(files["s10"]), "source2.il": str(files["s20"]),
        "model.dir": str(files["model"]), "output.names": ["estimated", "features"],
        "out": str(tmp_path / "m.tif"),
    }, quiet=True).result
    # Unnamed sources take the inputs in alphabetical order: input_10m, then input_20m.
    # Patch-based at spcscale 1 on the 10 m source: a 10 m map of the 20 m model.
    assert summary.geometry.fields == ((16, 16), (8, 8)) and summary.derived
    assert summary.bands == 6 + 64 and summary.dtype == "float32"
    assert summary.transform == Affine(10.0, 0.0, L + 80, 0.0, -10.0, T - 80)


def test_cli_in_process_and_in_a_subprocess(files, tmp_path):
    ref = _reference(files, tmp_path)
    argv = ["TensorflowModelServe", "-source1.il", str(files["s10"]),
            "-source1.rfieldx", "16", "-source1.placeholder", "input_10m",
            "-source2.il", str(files["s20"]), "-source2.rfieldx", "8",
            "-source2.placeholder", "input_20m", "-model.dir", str(files["model"]),
            "-model.fullyconv", "on", "-output.spcscale", "2",
            "-output.names", "estimated_labels", "-optim.tilesizex", "16",
            "-out", str(tmp_path / "cli.tif"), "uint8"]
    assert main([*argv, "--quiet"]) == 0
    assert_same_map(tmp_path / "cli.tif", ref.path)

    argv[-2] = str(tmp_path / "sub.tif")
    done = subprocess.run([sys.executable, "-m", "terrapatch.cli", *argv, "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_map(tmp_path / "sub.tif", ref.path)

    argv[argv.index("-output.names") + 1] = "nope"
    done = subprocess.run([sys.executable, "-m", "terrapatch.cli", *argv, "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("terrapatch TensorflowModelServe: error: output.names: 'nope'")
    assert "Traceback" not in done.stderr


def test_help_lists_the_source_groups(capsys):
    assert main(["TensorflowModelServe", "-help", "-source2.il", "x.tif"]) == 0
    text = capsys.readouterr().out
    for key in ("-source1.rfieldx", "-source2.placeholder", "-model.fullyconv",
                "-output.spcscale", "-optim.tilesizex", "-output.bv"):
        assert key in text


def test_user_placeholders_parsing():
    values = parse_user_placeholders(["a=2", "b=0.5", "c=(1, 2,3)", "d=(1.0, -2)",
                                      "e=true", "f=(False, TRUE)"])
    assert values["a"].dtype == np.int32 and values["a"].tolist() == [2]
    assert values["b"].dtype == np.float32 and values["b"].shape == (1,)
    assert values["c"].tolist() == [1, 2, 3] and values["c"].dtype == np.int32
    assert values["d"].dtype == np.float32 and values["d"].tolist() == [1.0, -2.0]
    assert values["e"].tolist() == [True] and values["f"].tolist() == [False, True]
    for bad, msg in (("a", "not of the form"), ("a=(1, 2", "missing parentheses"),
                     ("a=yes", "numbers or true/false"), ("a=(1,,2)", "empty element"),
                     ("a=1-2", "not a number")):
        with pytest.raises(InputError, match=msg):
            parse_user_placeholders([bad])
