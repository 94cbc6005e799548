"""Export of the seed model: Keras, SavedModel and ONNX agree; names kept; CLI and errors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from terrapatch.cli.export import main
from terrapatch.errors import InputError, MissingInputError, ModelError, OutputError
from terrapatch.export import export_model
from terrapatch.model import load_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(46, 23, 16), (16, 8, 1), (96, 48, 41)]  # 10 m input, 20 m input → output size


def load_seed():
    spec = importlib.util.spec_from_file_location(
        "train_dual_source", ROOT / "examples" / "train_dual_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The seed model with random weights, saved as .keras and exported both ways."""
    seed = load_seed()
    keras.utils.set_random_seed(7)
    element_spec = (
        {"input_10m": tf.TensorSpec((8, 16, 16, 4), tf.float32),
         "input_20m": tf.TensorSpec((8, 8, 8, 6), tf.float32)},
        {"estimated": tf.TensorSpec((8, 1, 1, 6), tf.float32)},
    )
    model = seed.DualSrcFCNNModel(dataset_element_spec=element_spec)
    directory = tmp_path_factory.mktemp("export")
    keras_path = directory / "model.keras"
    model.save(keras_path)
    written = export_model(keras_path, savedmodel=directory / "sm", onnx=directory / "m.onnx")
    return {"model": model, "keras": keras_path, **written, "keys": model.output_keys}


def random_inputs(size10: int, size20: int, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed + size10)
    return {"input_10m": rng.integers(0, 10000, (batch, size10, size10, 4)).astype("float32"),
            "input_20m": rng.integers(0, 10000, (batch, size20, size20, 6)).astype("float32")}


def run_savedmodel(path, inputs):
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    return {k: v.numpy() for k, v in signature(**{k: tf.constant(v)
                                                  for k, v in inputs.items()}).items()}


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs), strict=True))


def test_savedmodel_signature_names_and_dynamic_dims(exported):
    signature = tf.saved_model.load(str(exported["savedmodel"])).signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert set(inputs) == {"input_10m", "input_20m"}
    assert inputs["input_10m"].shape.as_list() == [None, None, None, 4]
    assert inputs["input_20m"].shape.as_list() == [None, None, None, 6]
    outputs = signature.structured_outputs
    assert set(outputs) == set(exported["keys"])
    assert {"estimated", "estimated_labels", "features", "estimated_labels_crop16"} <= \
        set(outputs)
    assert outputs["estimated_labels"].dtype == tf.int64
    assert outputs["estimated_labels"].shape.as_list() == [None, None, None, 1]


def test_onnx_names_and_dynamic_dims(exported):
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert set(inputs) == {"input_10m", "input_20m"}
    assert inputs["input_10m"].shape[3] == 4 and inputs["input_20m"].shape[3] == 6
    assert all(not isinstance(d, int) for d in inputs["input_10m"].shape[:3])
    outputs = {o.name: o for o in session.get_outputs()}
    assert set(outputs) == set(exported["keys"])
    assert outputs["estimated_labels"].type == "tensor(int64)"


@pytest.mark.parametrize(("size10", "size20", "size_out"), SIZES)
def test_keras_savedmodel_and_onnx_agree(exported, size10, size20, size_out):
    inputs = random_inputs(size10, size20)
    expected = exported["model"].predict(inputs, verbose=0)
    saved = run_savedmodel(exported["savedmodel"], inputs)
    onnx = run_onnx(exported["onnx"], inputs)
    assert expected["estimated"].shape == (2, size_out, size_out, 6)
    assert expected["estimated_crop16"].shape == (2, max(size_out - 32, 0),
                                                  max(size_out - 32, 0), 6)
    for key, value in expected.items():
        for engine, got in (("savedmodel", saved), ("onnx", onnx)):
            assert got[key].shape == value.shape, (engine, key)
            assert got[key].dtype == value.dtype, (engine, key)
            if value.dtype.kind == "f":
                np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{engine} {key}")
            else:
                np.testing.assert_array_equal(got[key], value, err_msg=f"{engine} {key}")
    # the class map is not trivially constant
    assert len(np.unique(expected["estimated_labels"])) > 1 or size_out == 1


def test_reloaded_keras_file_matches_the_model(exported):
    inputs = random_inputs(46, 23)
    reloaded = load_model(exported["keras"])
    np.testing.assert_allclose(reloaded.predict(inputs, verbose=0)["features"],
                               exported["model"].predict(inputs, verbose=0)["features"],
                               rtol=1e-6)


def test_cli_main_and_replacing_an_existing_savedmodel(exported, tmp_path, capsys):
    out_dir = tmp_path / "sm"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    code = main([str(exported["keras"]), "--savedmodel", str(out_dir)])
    assert code == 0
    assert (out_dir / "saved_model.pb").is_file() and not (out_dir / "stale.txt").exists()
    assert f"savedmodel: {out_dir}" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_cli_errors(exported, tmp_path):
    with pytest.raises(MissingInputError, match=r"nope\.keras"):
        main([str(tmp_path / "nope.keras"), "--onnx", str(tmp_path / "m.onnx")])
    with pytest.raises(InputError, match="at least one output"):
        main([str(exported["keras"])])
    with pytest.raises(InputError, match="unrecognized arguments: --bogus"):
        main([str(exported["keras"]), "--onnx", "x.onnx", "--bogus"])
    with pytest.raises(OutputError, match=r"onnx: directory .*missing_dir"):
        main([str(exported["keras"]), "--onnx", str(tmp_path / "missing_dir" / "m.onnx")])
    not_a_model = tmp_path / "bad.keras"
    not_a_model.write_text("not a zip")
    with pytest.raises(ModelError, match=r"model: cannot load .*bad\.keras"):
        export_model(not_a_model, onnx=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_in_a_fresh_process(exported, tmp_path):
    """A fresh interpreter loads the .keras file in safe mode and exports it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "terrapatch.cli", "export", str(exported["keras"]),
         "--onnx", str(tmp_path / "fresh.onnx")],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    inputs = random_inputs(16, 8)
    np.testing.assert_allclose(run_onnx(tmp_path / "fresh.onnx", inputs)["estimated"],
                               exported["model"].predict(inputs, verbose=0)["estimated"],
                               rtol=1e-4, atol=1e-6)
    failed = subprocess.run(
        [sys.executable, "-m", "terrapatch.cli", "export", str(tmp_path / "nope.keras"),
         "--onnx", str(tmp_path / "x.onnx")],
        capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("terrapatch export: error: model:")


def test_export_records_the_contract_and_serving_needs_nothing_else(exported, tmp_path,
                                                                     capsys):
    """`terrapatch export --source …` derives rf/ef on the rasters and records them; then
    TensorflowModelServe takes only the rasters and the model, and the map carries the
    classes."""
    import rasterio

    from terrapatch.cli import main as terrapatch
    from terrapatch.contract import read_contract
    from terrapatch.mlm import mlm_item_path
    from terrapatch.testing import make_scene
    from terrapatch.writer import read_category_names

    scene = make_scene(tmp_path / "scene", size=64, n_points=10)
    classes = tmp_path / "classes.csv"
    classes.write_text("value,name,color\n0,water,#0000ff\n1,crop,#ffff00\n2,forest,#00aa00\n"
                       "3,urban,#ff0000\n4,bare,#aa7700\n5,grass,#00ff00\n")
    onnx_path, saved = tmp_path / "described.onnx", tmp_path / "described_sm"
    code = main([str(exported["keras"]), "--onnx", str(onnx_path), "--savedmodel", str(saved),
                 "--source", f"input_10m={scene.img_10m}", "--source",
                 f"input_20m={scene.img_20m}", "--fullyconv", "--spcscale", "2",
                 "--output", "estimated_labels", "--classes", str(classes),
                 "--bands", "input_10m=B04,B03,B02,B08", "--nodata", "input_10m=0"])
    assert code == 0
    assert "contract: input_10m rf 16, input_20m rf 8; efield 1, spcscale 2" in \
        capsys.readouterr().out
    for model in (onnx_path, saved):
        contract = read_contract(model)
        assert contract is not None and contract.fullyconv
        assert [i.receptive_field for i in contract.inputs] == [(16, 16), (8, 8)]
        assert contract.inputs[0].band_names == ("B04", "B03", "B02", "B08")
        assert contract.inputs[0].nodata == 0 and contract.inputs[1].spacing == (20.0, 20.0)
        assert contract.outputs[0].classes[2].name == "forest"
        assert mlm_item_path(model).is_file()
    assert read_contract(onnx_path).framework.name == "ONNX"
    assert read_contract(saved).framework.name == "TensorFlow"
    out = tmp_path / "map.tif"
    assert terrapatch(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-source2.il",
                       str(scene.img_20m), "-model.dir", str(onnx_path), "-out", str(out),
                       "uint8"]) == 0
    with rasterio.open(out) as ds:
        assert ds.transform.a == 20.0 and ds.count == 1
        assert ds.colormap(1)[2][:3] == (0, 170, 0)
    assert read_category_names(out)[:3] == ["water", "crop", "forest"]
    # bad input: a placeholder that is not a source, one line, nothing written
    with pytest.raises(InputError, match=r"--rfield: input_30m is not a --source placeholder"):
        main([str(exported["keras"]), "--onnx", str(tmp_path / "x.onnx"), "--source",
              f"input_10m={scene.img_10m}", "--rfield", "input_30m=4"])
    assert not (tmp_path / "x.onnx").exists()
    # the API's neutral names read as the command's options, and the sources are checked
    # before the export writes anything
    for extra, message in (
            (["--source", f"input_10m={scene.img_10m}", "--rfield", "input_10m=0"],
             r"^--rfield: 0 must be ≥ 1"),
            (["--source", f"input_10m={tmp_path}/none.tif"], r"^--source: file .*none.tif"),
            (["--source", f"input_10m={scene.img_10m}", "--rfield", "input_10m=a"],
             r"^--rfield: input_10m='a' is not a number")):
        with pytest.raises(InputError, match=message):
            main([str(exported["keras"]), "--onnx", str(tmp_path / "x.onnx"), *extra])
        assert not (tmp_path / "x.onnx").exists()
