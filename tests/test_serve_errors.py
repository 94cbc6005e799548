"""ModelServe on bad input: one clear line naming the parameter, CLI exit 2, no output left."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re

import numpy as np
import pytest
from affine import Affine

from terrapatch.cli import main
from terrapatch.engines import KerasEngine, ModelRunError
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.testing.models import RecordingEngine, identity_model, seed_model
from terrapatch.testing.rasters import write_raster

L, T = 500000.0, 4000000.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(0)
    t10 = Affine(10.0, 0.0, L, 0.0, -10.0, T)
    t20 = Affine(20.0, 0.0, L, 0.0, -20.0, T)
    f = {
        "s10": write_raster(d / "s10.tif", rng.integers(0, 9000, (4, 64, 64), np.uint16), t10),
        "s20": write_raster(d / "s20.tif", rng.integers(0, 9000, (6, 32, 32), np.uint16), t20),
        "far20": write_raster(d / "far20.tif", rng.integers(0, 9000, (6, 32, 32), np.uint16),
                              Affine(20.0, 0.0, L + 50000, 0.0, -20.0, T)),
        "utm32": write_raster(d / "utm32.tif", rng.integers(0, 9000, (6, 32, 32), np.uint16),
                              t20, crs="EPSG:32632"),
        "broken": d / "broken.keras",
    }
    f["broken"].write_bytes(b"not a zip")
    model = seed_model()
    model.save(d / "seed.keras")
    f["seed"] = d / "seed.keras"
    return f


def _argv(files, out, **over):
    args = {
        "source1.il": str(files["s20"]), "source1.rfieldx": "8",
        "source1.placeholder": "input_20m",
        "source2.il": str(files["s10"]), "source2.rfieldx": "16",
        "source2.placeholder": "input_10m",
        "model.dir": str(files["seed"]), "output.names": "estimated_labels",
        "model.fullyconv": "on",
    }
    args.update(over)
    argv = ["TensorflowModelServe", "--quiet"]
    for key, value in args.items():
        if value is not None:
            argv += [f"-{key}", value]
    return [*argv, "-out", str(out), "uint8"]


CASES = {
    "missing model": ({"model.dir": "{tmp}/nothere"}, r"model.dir: model '.*nothere' does "
                                                      r"not exist"),
    "corrupt model": ({"model.dir": "{broken}"}, r"model.dir: cannot load the Keras model"),
    "placeholder not an input": ({"source1.placeholder": "input_5m"},
                                 r"source1.placeholder: 'input_5m' is not an input of the "
                                 r"Keras model .*; its inputs are: input_10m"),
    "unknown output": ({"output.names": "labels"},
                       r"output.names: 'labels' is not an output .*; its outputs are: "
                       r"estimated, estimated_labels, features"),
    "rf larger than source": ({"source1.rfieldx": "40"},
                              r"source1.rfieldx/y: 40×40 is larger than the image "
                              r"\(32×32 px\)"),
    "no overlap": ({"source1.il": "{far20}"}, r"no output pixel has its full receptive field"),
    "crs mismatch": ({"source1.il": "{utm32}"}, r"CRS EPSG:32631 differs from source1 CRS "
                                                r"EPSG:32632"),
    "inconsistent geometry": ({"source1.rfieldx": "9"},
                              r"inconsistent geometry \(source1.rfieldx/y=\(9, 9\), .*\): for a "
                              r"1×1-pixel output tile .* fed input_20m \(1, 9, 9, 6\), "
                              r"input_10m \(1, 16, 16, 4\) and failed .*; the model's "
                              r"geometry suggests source1.rfieldx/y=\(8, 8\), "
                              r"source2.rfieldx/y=\(16, 16\), output.efieldx/y=\(1, 1\)"),
    "missing spcscale": ({"source1.il": "{s10}", "source1.placeholder": "input_10m",
                          "source1.rfieldx": "16", "source2.il": "{s20}",
                          "source2.placeholder": "input_20m", "source2.rfieldx": "8"},
                         r"inconsistent geometry .* returned estimated_labels "
                         r"\(1, 2, 2, 1\); expected 3×3 .* suggests .*output.spcscale=2"),
    "box outside": ({"out.box": "1"}, r"box=100:100:5:5 does not overlap the output grid"),
    "bad pixel type": ({"out.pixeltype": "uint7"}, r"unknown pixel type 'uint7'"),
    "missing raster": ({"source2.il": "{tmp}/none.tif"}, r"source2.il: file .*none.tif' "
                                                         r"does not exist"),
    "efield in patch-based": ({"model.fullyconv": "off", "output.efieldx": "4"},
                              r"output.efieldx/y: 4×4 in patch-based mode"),
    "bad spcscale": ({"output.spcscale": "1.5"}, r"output.spcscale: 1.5 is neither an integer "
                                                 r"k nor 1/k .* nearest valid values are 1 or 2"),
    "zero spcscale": ({"output.spcscale": "0"}, r"output.spcscale: 0(\.0)? must be positive"),
    "bad userplaceholder": ({"model.userplaceholders": "scale"},
                            r"model.userplaceholders: 'scale' is not of the form name=value"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_one_line_exit_2_nothing_written(files, tmp_path, capsys, case):
    over, pattern = CASES[case]
    subst = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    over = {k: v.format(**subst) for k, v in over.items()}
    out = tmp_path / "map.tif"
    box = over.pop("out.box", None)
    pixel = over.pop("out.pixeltype", None)
    argv = _argv(files, out, **over)
    if box:
        argv[-2] = f"{out}?&box=100:100:5:5"
    if pixel:
        argv[-1] = pixel
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]
    assert err[0].startswith("terrapatch TensorflowModelServe: error: ")
    assert list(tmp_path.iterdir()) == []  # neither the map nor a temporary file


def test_unwritable_output(files, tmp_path, capsys):
    argv = _argv(files, tmp_path / "no_dir" / "map.tif")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out: directory" in err[0] and "does not exist" in err[0]
    argv = _argv(files, tmp_path)  # a directory
    assert main(argv) == 2
    assert "is a directory" in capsys.readouterr().err


def test_failure_in_the_middle_leaves_nothing(files, tmp_path):
    recorder = RecordingEngine(KerasEngine.from_model(seed_model()), fail_after=3)
    sources = [Source(files["s20"], 8, placeholder="input_20m", name="source1"),
               Source(files["s10"], 16, placeholder="input_10m", name="source2")]
    with pytest.raises(ModelRunError, match="simulated failure after 3"):
        serve(sources, None, tmp_path / "map.tif", "estimated", fullyconv=True, tile_size=4,
              engine=recorder, quiet=True)
    assert len(recorder.data_feeds) == 3
    assert list(tmp_path.iterdir()) == []


def test_model_needs_an_input_no_source_feeds(files, tmp_path):
    sources = [Source(files["s20"], 8, placeholder="input_20m", name="source1")]
    with pytest.raises(Exception, match=r"model input\(s\) \['input_10m'\] are fed by no "
                                        r"source"):
        serve(sources, files["seed"], tmp_path / "m.tif", "estimated", quiet=True)
    with pytest.raises(Exception, match=r"source1: 6 band\(s\), but model input 'x' "
                                        r"expects 2 channel"):
        serve([Source(files["s20"], 1)], identity_model(bands=2), tmp_path / "m.tif",
              quiet=True)
    assert list(tmp_path.iterdir()) == []
