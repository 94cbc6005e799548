"""ModelBase and the seed's training workflow (dataset → compile → fit → checkpoint → reload)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util
import json
import logging
import runpy
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import terrapatch as otbtf
from terrapatch.errors import InputError, ModelError
from terrapatch.metrics import FScore
from terrapatch.model import DEFAULT_INFERENCE_CROPPING, ModelBase, load_model
from terrapatch.testing.markers import requires_tensorboard

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed = load_example("train_dual_source")


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> dict[str, list[str]]:
    """48 training and 16 validation samples of the seed's sources (learnable classes)."""
    directory = tmp_path_factory.mktemp("patches")
    train = seed.write_synthetic_patches(directory, "a_", 48, seed=1)
    valid = seed.write_synthetic_patches(directory, "b_", 16, seed=2)
    return {"train": train, "valid": valid}


def spec_of(shapes: dict[str, tuple], batch: int | None = 4):
    return ({key: tf.TensorSpec((batch, *shape), tf.float32) for key, shape in shapes.items()},
            {"y": tf.TensorSpec((batch, 1, 1, 2), tf.float32)})


class TinyModel(ModelBase):
    """1×1 convolution on 'a' plus a global (rank-2) output."""

    def normalize_inputs(self, inputs):
        return {key: keras.ops.cast(value, "float32") * 0.5 for key, value in inputs.items()}

    def get_outputs(self, normalized_inputs):
        x = normalized_inputs["a"]
        scores = keras.layers.Conv2D(2, 1, activation="softmax", name="scores")(x)
        pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
        return {"y": scores, "pooled": pooled}


def test_inputs_have_free_rows_and_columns_and_dataset_names():
    model = TinyModel(spec_of({"a": (8, 8, 3), "b": (4, 4, 2)}))
    assert [t.name for t in model.inputs] == ["a", "b"]
    assert [tuple(t.shape) for t in model.inputs] == [(None, None, None, 3),
                                                      (None, None, None, 2)]
    assert all(t.dtype == "float32" for t in model.inputs)
    only_a = TinyModel(spec_of({"a": (8, 8, 3), "b": (4, 4, 2)}), input_keys=["a"])
    assert [t.name for t in only_a.inputs] == ["a"]


def test_outputs_are_dict_keys_plus_crops_of_rank4_outputs_only():
    model = TinyModel(spec_of({"a": (8, 8, 3)}))
    crops = [f"y_crop{c}" for c in DEFAULT_INFERENCE_CROPPING]
    assert model.output_keys == ["y", "pooled", *crops]
    assert DEFAULT_INFERENCE_CROPPING == (16, 32, 64, 96, 128)
    x = np.random.default_rng(0).random((2, 40, 40, 3)).astype("float32")
    out = model.predict({"a": x}, verbose=0)
    assert set(out) == {"y", "pooled", *crops}
    np.testing.assert_allclose(out["y_crop16"], out["y"][:, 16:-16, 16:-16, :])
    assert out["y_crop32"].shape == (2, 0, 0, 2)
    assert out["pooled"].shape == (2, 3)
    custom = TinyModel(spec_of({"a": (8, 8, 3)}), inference_cropping=[3])
    assert custom.output_keys == ["y", "pooled", "y_crop3"]


def test_attributes_are_forwarded_to_the_keras_model():
    model = TinyModel(spec_of({"a": (8, 8, 3)}))
    assert isinstance(model.model, keras.Model)
    assert model.name == "TinyModel"
    assert model.count_params() == model.model.count_params() == 3 * 2 + 2
    with pytest.raises(AttributeError):
        _ = model.no_such_attribute


def test_default_normalize_inputs_warns_and_keeps_values(caplog):
    class Plain(ModelBase):
        def get_outputs(self, normalized_inputs):
            return {"y": keras.layers.Conv2D(2, 1, name="c")(normalized_inputs["a"])}

    with caplog.at_level(logging.WARNING, logger="terrapatch.model"):
        model = Plain(spec_of({"a": (4, 4, 1)}), inference_cropping=[1])
    assert "normalize_inputs" in caplog.text
    assert model.output_keys == ["y", "y_crop1"]


def test_model_errors():
    with pytest.raises(TypeError):
        ModelBase(spec_of({"a": (8, 8, 3)}))  # abstract
    with pytest.raises(InputError, match=r"input_keys: \['c'\] not in the dataset inputs"):
        TinyModel(spec_of({"a": (8, 8, 3)}), input_keys=["c"])
    with pytest.raises(InputError, match="inference_cropping"):
        TinyModel(spec_of({"a": (8, 8, 3)}), inference_cropping=[0])
    with pytest.raises(InputError, match="dataset_element_spec"):
        TinyModel(42)

    class NoDict(ModelBase):
        def get_outputs(self, normalized_inputs):
            return normalized_inputs["a"]

    with pytest.raises(ModelError, match=r"NoDict\.get_outputs must return a non-empty dict"):
        NoDict(spec_of({"a": (8, 8, 3)}))


def test_seed_model_shapes_and_output_names(patches):
    ds = seed.create_dataset(*patches["train"], batch_size=8)
    model = seed.DualSrcFCNNModel(dataset_element_spec=ds.element_spec)
    assert model.output_keys[:3] == ["estimated", "estimated_labels", "features"]
    x = {"input_10m": np.zeros((1, 46, 46, 4), "float32"),
         "input_20m": np.zeros((1, 23, 23, 6), "float32")}
    out = model.predict(x, verbose=0)
    assert out["estimated"].shape == (1, 16, 16, 6)
    assert out["estimated_labels"].shape == (1, 16, 16, 1)
    assert out["estimated_labels"].dtype == np.int64
    assert out["features"].shape == (1, 16, 16, 64)


def test_seed_workflow_fit_checkpoint_and_safe_mode_reload(patches, tmp_path):
    """The seed's calls: dataset, shuffle, compile with per-class metrics, fit, checkpoint."""
    keras.utils.set_random_seed(0)
    ds_train = seed.create_dataset(*patches["train"], batch_size=8)
    ds_train = ds_train.shuffle(buffer_size=100)
    ds_valid = seed.create_dataset(*patches["valid"], batch_size=8)
    model = seed.DualSrcFCNNModel(dataset_element_spec=ds_train.element_spec)
    metrics = [
        cls(class_id=class_id)
        for class_id in range(seed.class_nb)
        for cls in [keras.metrics.Precision, keras.metrics.Recall]
    ]
    metrics += [FScore(class_id=c, name=f"fscore_cls{c}") for c in range(seed.class_nb)]
    model.compile(
        loss={seed.tgt_key: keras.losses.CategoricalCrossentropy()},
        optimizer=keras.optimizers.Adam(0.0002),
        metrics={seed.tgt_key: metrics},
    )
    model.summary(print_fn=lambda *args, **kwargs: None)
    checkpoint = tmp_path / "model.keras"
    callbacks = [keras.callbacks.ModelCheckpoint(checkpoint, save_best_only=True,
                                                 monitor="val_loss", mode="min", verbose=0)]
    history = model.fit(ds_train, epochs=1, validation_data=ds_valid, callbacks=callbacks,
                        verbose=0)
    logs = history.history
    assert np.isfinite(logs["loss"][0]) and np.isfinite(logs["val_loss"][0])
    assert {f"fscore_cls{c}" for c in range(6)} <= set(logs)
    assert {f"val_fscore_cls{c}" for c in range(6)} <= set(logs)
    assert sum(key.startswith("precision") for key in logs) == 6
    assert checkpoint.is_file()
    with zipfile.ZipFile(checkpoint) as archive:
        config = json.loads(archive.read("config.json"))
    # a plain functional model: loading needs terrapatch.layers (Argmax) only
    assert config["class_name"] == "Functional"

    reloaded = load_model(checkpoint, safe_mode=True)
    x = {"input_10m": np.random.default_rng(1).integers(0, 4000, (2, 46, 46, 4)).astype("f4"),
         "input_20m": np.random.default_rng(2).integers(0, 4000, (2, 23, 23, 6)).astype("f4")}
    expected = model.predict(x, verbose=0)
    got = reloaded.predict(x, verbose=0)
    assert set(got) == set(expected)
    np.testing.assert_allclose(got["estimated"], expected["estimated"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["estimated_labels"], expected["estimated_labels"])

    # a checkpoint reloaded with its optimizer and metrics trains on
    resumed = load_model(checkpoint, safe_mode=True, compile=True)
    resumed.fit(ds_train, epochs=1, verbose=0)


@requires_tensorboard
def test_tensorboard_callback_of_the_seed(patches, tmp_path):
    ds = seed.create_dataset(*patches["train"], batch_size=16)
    model = seed.DualSrcFCNNModel(dataset_element_spec=ds.element_spec)
    model.compile(loss={seed.tgt_key: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(0.0002))
    model.fit(ds, epochs=1, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir=tmp_path / "logs")])
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_training_learns_the_synthetic_classes(patches):
    keras.utils.set_random_seed(0)
    ds = seed.create_dataset(*patches["train"], batch_size=8, seed=0)
    model = seed.DualSrcFCNNModel(dataset_element_spec=ds.element_spec)
    model.compile(loss={seed.tgt_key: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(0.003))
    history = model.fit(ds, epochs=6, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_model_from_tfrecords_dataset(patches, tmp_path):
    dataset = otbtf.DatasetFromPatchesImages(
        {"img_10m": [patches["train"][0]], "img_20m": [patches["train"][1]],
         "labels": [patches["train"][2]]})
    dataset.to_tfrecords(tmp_path / "records", n_samples_per_shard=16)
    records = otbtf.TFRecords(tmp_path / "records")
    ds = records.read(batch_size=8, target_keys=[seed.tgt_key],
                      preprocessing_fn=seed.dataset_preprocessing_fn, shuffle_buffer_size=32)
    model = seed.DualSrcFCNNModel(dataset_element_spec=ds.element_spec)
    model.compile(loss={seed.tgt_key: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(0.0002))
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@requires_tensorboard
def test_example_scripts_train_and_convert(tmp_path, capsys):
    model_path = tmp_path / "dual.keras"
    code = seed.main(["--synthetic", "32", "--epochs", "1", "--batch_size", "8",
                      "--model", str(model_path), "--log_dir", str(tmp_path / "logs"),
                      "--use_streaming", "--seed", "0"])
    assert code == 0 and model_path.is_file()
    convert = load_example("savedmodel")
    code = convert.main(["--model", str(model_path), "--savedmodel", str(tmp_path / "sm")])
    assert code == 0 and (tmp_path / "sm" / "saved_model.pb").is_file()
    assert convert.main(["--model", str(tmp_path / "none.keras"),
                         "--savedmodel", str(tmp_path / "sm2")]) == 2
    assert "none.keras" in capsys.readouterr().err


SEED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed.txt"


@requires_tensorboard
def test_seed_training_script_runs_with_only_its_imports_changed(tmp_path, monkeypatch):
    """The tutorial's part_2_train_fcn_2_sources.py, data paths pointed at tmp_path."""
    if not SEED_TEXT.is_file():
        pytest.skip(f"seed reference not available at {SEED_TEXT}")
    text = SEED_TEXT.read_text()
    start = text.index("import argparse\nimport otbtf")
    code = text[start:text.index("Command:", start)]
    code = code.replace("import otbtf\n", "import terrapatch as otbtf\n")
    code = code.replace("from mymetrics import FScore\n", "from terrapatch.metrics import FScore\n")
    code = code.replace('"/data/', f'"{tmp_path}/')
    for prefix, n in (("a_", 48), ("b_", 16)):
        for path in seed.write_synthetic_patches(tmp_path, prefix, n, seed=len(prefix) + n):
            Path(path).rename(Path(path).with_name(Path(path).stem + "_2src.tif"))
    script = tmp_path / "part_2_train_fcn_2_sources.py"
    script.write_text(code)
    model_path = tmp_path / "model2_dualsrc.keras"
    monkeypatch.setattr("sys.argv", [str(script), "--model", str(model_path),
                                     "--log_dir", str(tmp_path / "logs"), "--epochs", "1"])
    runpy.run_path(str(script), run_name="__main__")
    assert model_path.is_file()
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))
