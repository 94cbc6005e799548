"""Engines: SavedModel, .keras and ONNX give the same outputs; names, dtypes and errors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from terrapatch.engines import (
    Engine,
    KerasEngine,
    ModelRunError,
    OnnxEngine,
    SavedModelEngine,
    load_engine,
)
from terrapatch.errors import ModelError
from terrapatch.testing import read_raster
from terrapatch.testing.markers import requires, requires_onnx

#: Keras models, their SavedModel and their ONNX export (the ``tensorflow`` extra).
requires_export = requires("tensorflow", "keras", "tf2onnx", "onnx")


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """The seed model in memory, as .keras, and exported as SavedModel and ONNX."""
    from terrapatch.export import export_model
    from terrapatch.testing.models import seed_model

    directory = tmp_path_factory.mktemp("seed_engines")
    model = seed_model(seed=3)
    keras_path = directory / "seed.keras"
    model.save(keras_path)
    export_model(keras_path, savedmodel=directory / "seed_savedmodel",
                 onnx=directory / "seed.onnx")
    return {"keras": keras_path, "model": model, "savedmodel": directory / "seed_savedmodel",
            "onnx": directory / "seed.onnx"}


def _seed_feed(m=5, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return {
        "input_10m": rng.uniform(0, 8000, (2, 2 * m + 14, 2 * m + 14, 4)),  # float64 on purpose
        "input_20m": rng.uniform(0, 8000, (2, m + 7, m + 7, 6)).astype(np.uint16),
    }


@requires_export
def test_engine_kinds(seed_files):
    assert isinstance(load_engine(seed_files["keras"]), KerasEngine)
    assert isinstance(load_engine(seed_files["savedmodel"]), SavedModelEngine)
    assert isinstance(load_engine(seed_files["model"]), KerasEngine)
    engine = load_engine(seed_files["keras"])
    assert Engine.load(engine) is engine
    assert isinstance(load_engine(seed_files["onnx"]), OnnxEngine)


@requires_export
def test_engines_give_the_same_outputs(seed_files):
    feed = _seed_feed()
    names = ["estimated", "estimated_labels", "features"]
    results = {}
    for kind in ("model", "keras", "savedmodel", "onnx"):
        engine = load_engine(seed_files[kind])
        assert set(engine.input_names) == {"input_10m", "input_20m"}
        assert set(engine.output_names) == set(names)
        results[kind] = engine.run(feed, names)
    ref = results["keras"]
    assert ref["estimated"].shape == (2, 5, 5, 6)
    assert ref["estimated_labels"].shape == (2, 5, 5, 1)
    assert ref["features"].shape == (2, 5, 5, 64)
    for kind, res in results.items():
        np.testing.assert_allclose(res["estimated"], ref["estimated"], atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(res["features"], ref["features"], atol=1e-4, err_msg=kind)
        # Labels agree wherever the best class is not a near tie.
        top2 = np.sort(ref["estimated"], axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 1e-4
        assert np.array_equal(res["estimated_labels"][..., 0][clear],
                              ref["estimated_labels"][..., 0][clear]), kind
        assert res["estimated_labels"].dtype == np.int64


@requires_export
def test_output_names_key_then_layer_name(seed_files):
    engine = load_engine(seed_files["keras"])
    feed = _seed_feed(m=2)
    by_key = engine.run(feed, ["estimated_labels"])["estimated_labels"]
    by_layer = engine.run(feed, ["argmax_layer"])["argmax_layer"]
    by_tf_name = engine.run(feed, ["estimated_labels:0"])["estimated_labels:0"]
    assert np.array_equal(by_key, by_layer) and np.array_equal(by_key, by_tf_name)
    assert engine.resolve_output("softmax_layer") == "estimated"
    assert engine.resolve_output("feats") == "features"


@requires_export
@pytest.mark.parametrize("kind", ["keras", "savedmodel", "onnx"])
def test_unknown_names_list_what_exists(seed_files, kind):
    engine = load_engine(seed_files[kind])
    with pytest.raises(ModelError, match=r"'nope' is not an output.*estimated, "
                                         r"estimated_labels, features"):
        engine.resolve_output("nope")
    with pytest.raises(ModelError, match=r"source1.placeholder: 'input_5m' is not an input"
                                         r".*input_10m.*input_20m|input_20m.*input_10m"):
        engine.resolve_input("input_5m", "source1.placeholder")


@requires_export
def test_inputs_converted_to_model_dtype(tmp_path):
    from terrapatch.testing.models import identity_model

    model = identity_model(bands=2, rank=4, dtype="int16")
    model.save(tmp_path / "id16.keras")
    model.export(tmp_path / "id16_sm", format="tf_saved_model", verbose=False)
    x = np.array([[[[1.9, -2.2], [300.0, 7.0]]]])  # float64, shape (1, 1, 2, 2)
    for path in (tmp_path / "id16.keras", tmp_path / "id16_sm"):
        engine = load_engine(path)
        assert engine.inputs["x"].dtype == np.int16
        out = engine.run({"x": x}, ["y"])["y"]
        assert out.dtype == np.int16
        assert out.tolist() == [[[[1, -2], [300, 7]]]]


@requires_export
def test_missing_input_value_and_run_failure(seed_files):
    engine = load_engine(seed_files["keras"])
    feed = _seed_feed()
    with pytest.raises(ModelError, match="no value given for input"):
        engine.run({"input_10m": feed["input_10m"]}, ["estimated"])
    bad = dict(feed, input_20m=feed["input_20m"][:, :-2, :-2])  # branches disagree
    with pytest.raises(ModelRunError, match="failed on inputs"):
        engine.run(bad, ["estimated"])


@requires_export
def test_missing_and_corrupt_models(tmp_path):
    with pytest.raises(ModelError, match=r"model: model '.*nothere' does not exist"):
        load_engine(tmp_path / "nothere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelError, match="is not a TensorFlow SavedModel"):
        load_engine(tmp_path / "empty_dir")
    for name in ("broken.keras", "broken.onnx"):
        (tmp_path / name).write_bytes(b"this is not a model")
        with pytest.raises(ModelError, match=f"cannot load the .*{name}"):
            load_engine(tmp_path / name)
    sm = tmp_path / "broken_sm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load the SavedModel"):
        load_engine(sm)
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model terrapatch can serve"):
        load_engine(tmp_path / "model.h5")
    with pytest.raises(ModelError, match="expected a model path"):
        load_engine(42)


@requires_export
def test_served_maps_agree_across_engines_and_with_the_model_in_memory(seed_files,
                                                                       tmp_path):
    """Keras → SavedModel → ONNX serve the same map, equal to the model applied in memory."""
    from affine import Affine

    from terrapatch.raster import Source
    from terrapatch.serve import prepare_serve
    from terrapatch.testing import write_raster

    rng = np.random.default_rng(9)
    t10 = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
    t20 = Affine(20.0, 0.0, 500000.0, 0.0, -20.0, 4000000.0)
    p10 = write_raster(tmp_path / "a10.tif", rng.integers(0, 9000, (4, 60, 60), np.uint16),
                       t10)
    p20 = write_raster(tmp_path / "a20.tif", rng.integers(0, 9000, (6, 30, 30), np.uint16),
                       t20)
    maps = {}
    for kind in ("keras", "savedmodel", "onnx"):
        sources = [Source(p20, 8, placeholder="input_20m", name="source1"),
                   Source(p10, 16, placeholder="input_10m", name="source2")]
        job = prepare_serve(sources, seed_files[kind], ["estimated", "features"],
                            fullyconv=True, tile_size=8)
        summary = job.run(tmp_path / f"{kind}.tif", quiet=True)
        maps[kind] = read_raster(summary.path).values
    # In memory: the whole output grid as one tensor per source, through the Keras model.
    grid = job.output_grid
    regions = job.layout.tile_regions(0, 0, grid.width, grid.height)
    feed = {}
    for source, region, name in zip(job.sources, regions, ("input_20m", "input_10m"),
                                    strict=True):
        with source.open() as reader:
            feed[name] = reader.read(region).transpose(1, 2, 0)[None].astype(np.float32)
    out = seed_files["model"](feed)
    memory = np.concatenate([np.asarray(out["estimated"])[0],
                             np.asarray(out["features"])[0]], axis=-1).transpose(2, 0, 1)
    assert memory.shape == maps["keras"].shape == (70, 23, 23)
    for kind, values in maps.items():
        np.testing.assert_allclose(values, memory, atol=1e-4, err_msg=kind)


@requires_onnx
def test_onnx_threads_from_the_environment(tmp_path, monkeypatch):
    """Local Dask clusters share the cores between ONNX workers through this variable."""
    from terrapatch.engines import ONNX_THREADS_ENV, OnnxEngine
    from terrapatch.testing.onnx_models import single_conv_onnx

    path = str(single_conv_onnx(tmp_path / "m.onnx"))
    monkeypatch.setenv(ONNX_THREADS_ENV, "1")
    assert OnnxEngine(path).session.get_session_options().intra_op_num_threads == 1
    assert OnnxEngine(path, threads=2).session.get_session_options().intra_op_num_threads == 2
    monkeypatch.setenv(ONNX_THREADS_ENV, "lots")
    assert OnnxEngine(path).session.get_session_options().intra_op_num_threads == 0
