"""Keras backends: the seed model trains under torch and jax; its .keras serves and exports.

Keras fixes its backend when it is first imported, so every training here runs in a
fresh interpreter (``KERAS_BACKEND`` set, TensorFlow blocked from importing, as if it
were not installed), on patches extracted from a synthetic scene by this process.
This process (TensorFlow backend) then serves the ``.keras`` file the other backend
saved and exports it to SavedModel and ONNX, and every route must give the outputs
``model.predict`` gave under the training backend. The dataset tests at the end
check :meth:`DatasetFromPatchesImages.get_keras_dataset` in this process.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from terrapatch.dataset import DatasetFromPatchesImages
from terrapatch.extraction import extract_patches
from terrapatch.raster import Source
from terrapatch.testing import make_scene

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_dual_source.py"
SERVED = ("estimated", "estimated_labels", "features")

#: Backend → whether its worker streams the patches (both reading paths get trained on).
BACKENDS = {"torch": False, "jax": True}

WORKER = textwrap.dedent('''
    """Train the seed model one epoch under $KERAS_BACKEND without TensorFlow, then on tf.data."""
    import json
    import sys

    import importlib.machinery


    class _NoTensorFlow:
        """Make importing tensorflow (or tf2onnx) fail as if it were not installed.

        Found, not importable: ``importlib.util.find_spec`` (which torch calls on
        many modules) still answers; the import itself fails.
        """

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf2onnx"):
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):  # never reached
            raise ModuleNotFoundError(module.__name__)


    blocker = _NoTensorFlow()
    sys.meta_path.insert(0, blocker)

    import importlib.util

    import keras
    import numpy as np

    import terrapatch as otbtf

    cfg = json.loads(sys.argv[1])
    spec = importlib.util.spec_from_file_location("train_dual_source", cfg["example"])
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    keras.utils.set_random_seed(0)


    def dataset(files, shuffle):
        patches = otbtf.DatasetFromPatchesImages(
            {"img_10m": files[0], "img_20m": files[1], "labels": files[2]},
            use_streaming=cfg["streaming"], buffer_length=64)
        return patches.get_keras_dataset(
            batch_size=16, preprocessing_fn=seed.dataset_preprocessing_fn,
            targets_keys=[seed.tgt_key], shuffle=shuffle, seed=0)


    train = dataset(cfg["train"], shuffle=True)
    valid = dataset(cfg["valid"], shuffle=False)
    model = seed.DualSrcFCNNModel(dataset_element_spec=train.element_spec)
    model.compile(loss={seed.tgt_key: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(0.003),
                  metrics={seed.tgt_key: seed.seed_metrics()})
    before = model.evaluate(valid, verbose=0, return_dict=True)["loss"]
    checkpoint = keras.callbacks.ModelCheckpoint(
        cfg["model"], save_best_only=True, monitor="val_loss", mode="min", verbose=0)
    history = model.fit(train, epochs=1, validation_data=valid, callbacks=[checkpoint],
                        verbose=0)
    x = dict(np.load(cfg["inputs"]))
    predicted = model.predict(x, verbose=0)
    np.savez(cfg["predictions"], **{k: np.asarray(predicted[k]) for k in cfg["served"]})
    result = {
        "backend": keras.backend.backend(),
        "loss_before": float(before),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "label_dtype": str(np.asarray(predicted["estimated_labels"]).dtype),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }

    # Then the seed's own pipeline, tf.data (TensorFlow importable again from here on).
    sys.meta_path.remove(blocker)
    ds = seed.create_dataset(*cfg["train"], batch_size=16, seed=0)
    model = seed.DualSrcFCNNModel(dataset_element_spec=ds.element_spec)
    model.compile(loss={seed.tgt_key: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(0.003))
    history = model.fit(ds, epochs=1, verbose=0)
    model.save(cfg["tf_data_model"])
    result["tf_data"] = {
        "backend": keras.backend.backend(),
        "loss": [float(v) for v in history.history["loss"]],
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    }
    with open(cfg["result"], "w") as f:
        json.dump(result, f)
''')


def _child_env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_ENABLE_X64", None)
    return env


def _require(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"the {backend} backend of Keras needs {backend}, not installed")


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Seed-shaped patches (10 m 16×16×4, 20 m 8×8×6, labels) of a synthetic scene."""
    directory = tmp_path_factory.mktemp("keras_backends")
    scene = make_scene(directory / "scene", size=128, n_points=400, seed=5)
    files: dict[str, Any] = {"dir": directory}
    for split, points in (("train", scene.points_train), ("valid", scene.points_valid)):
        out = [directory / f"{split}_img_10m.tif", directory / f"{split}_img_20m.tif"]
        labels = directory / f"{split}_labels.tif"
        summary = extract_patches(
            [Source(scene.img_10m, 16, nodata=0, name="source1"),
             Source(scene.img_20m, 8, nodata=0, name="source2")],
            points, "class", out, labels_out=labels, quiet=True)
        files[split] = [str(p) for p in (*out, labels)]
        files[f"n_{split}"] = summary.n_collected
    rng = np.random.default_rng(11)
    # Serving-sized tiles (46×46 at 10 m → 16×16 outputs), reflectance-like values.
    files["inputs"] = directory / "inputs.npz"
    np.savez(files["inputs"],
             input_10m=rng.integers(200, 4000, (2, 46, 46, 4)).astype("float32"),
             input_20m=rng.integers(200, 4000, (2, 23, 23, 6)).astype("float32"))
    return files


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def trained(request: pytest.FixtureRequest, patches: dict[str, Any]) -> dict[str, Any]:
    """Train the seed model one epoch under a backend, in its own interpreter."""
    backend = request.param
    _require(backend)
    out = patches["dir"] / backend
    out.mkdir()
    cfg = {"example": str(EXAMPLE), "train": patches["train"], "valid": patches["valid"],
           "streaming": BACKENDS[backend], "inputs": str(patches["inputs"]),
           "served": list(SERVED), "model": str(out / "model.keras"),
           "predictions": str(out / "predictions.npz"), "result": str(out / "result.json"),
           "tf_data_model": str(out / "tfdata.keras")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg)],
                          env=_child_env(backend), capture_output=True, text=True,
                          timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"{backend} worker failed:\n{proc.stderr[-4000:]}"
    result = json.loads(Path(cfg["result"]).read_text())
    with np.load(cfg["predictions"]) as predictions:
        expected = {key: predictions[key] for key in SERVED}
    with np.load(patches["inputs"]) as inputs:
        x = {key: inputs[key] for key in inputs.files}
    return {"backend": backend, "model": Path(cfg["model"]), "result": result,
            "expected": expected, "x": x, "seconds": seconds, "dir": out}


def _assert_outputs_agree(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same scores and features within float32 tolerance; same class where not a near tie."""
    np.testing.assert_allclose(got["estimated"], expected["estimated"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["features"], expected["features"], rtol=1e-4, atol=1e-4)
    scores = np.sort(expected["estimated"], axis=-1)
    clear = (scores[..., -1] - scores[..., -2] > 1e-4)[..., None]
    labels, expected_labels = np.asarray(got["estimated_labels"]), expected["estimated_labels"]
    assert labels.shape == expected_labels.shape
    np.testing.assert_array_equal(np.where(clear, labels, 0), np.where(clear, expected_labels, 0))


@pytest.mark.slow
def test_seed_model_trains_one_epoch_without_tensorflow(trained: dict[str, Any],
                                                        patches: dict[str, Any]) -> None:
    result = trained["result"]
    assert result["backend"] == trained["backend"]
    assert result["tensorflow_imported"] is False
    logs = result["history"]
    assert np.isfinite(logs["loss"][0]) and np.isfinite(logs["val_loss"][0])
    # One epoch on well-separated spectra: the validation loss falls below its value
    # for the untrained model (about ln 6).
    assert logs["val_loss"][0] < result["loss_before"]
    assert {f"fscore_cls{c}" for c in range(6)} <= set(logs)
    assert {f"val_fscore_cls{c}" for c in range(6)} <= set(logs)
    assert trained["model"].is_file()
    assert patches["n_train"] >= 150  # a real epoch: enough batches to learn something
    # Class ids: int64, or int32 under JAX without 64-bit types (its widest integer).
    assert result["label_dtype"] == ("int32" if trained["backend"] == "jax" else "int64")
    print(f"{trained['backend']}: trained in a fresh interpreter in "
          f"{trained['seconds']:.1f} s")


@pytest.mark.slow
def test_keras_file_serves_under_tensorflow_like_predict(trained: dict[str, Any]) -> None:
    from terrapatch.engines import KerasEngine
    from terrapatch.model import load_model

    engine = KerasEngine(str(trained["model"]))
    assert set(SERVED) <= set(engine.output_names)
    got = engine.run(trained["x"], list(SERVED))
    _assert_outputs_agree(got, trained["expected"])
    assert got["estimated_labels"].dtype == np.int64

    # The checkpoint also restores its optimizer and metrics under TensorFlow.
    resumed = load_model(trained["model"], compile=True)
    again = resumed.predict(trained["x"], verbose=0)
    _assert_outputs_agree(again, trained["expected"])


@pytest.mark.slow
def test_keras_file_exports_to_savedmodel_and_onnx_under_tensorflow(
        trained: dict[str, Any]) -> None:
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from terrapatch.engines import OnnxEngine, SavedModelEngine
    from terrapatch.export import export_model

    out = trained["dir"]
    written = export_model(trained["model"], savedmodel=out / "savedmodel",
                           onnx=out / "model.onnx")
    assert set(written) == {"savedmodel", "onnx"}
    for engine in (OnnxEngine(str(written["onnx"])),
                   SavedModelEngine(str(written["savedmodel"]))):
        got = engine.run(trained["x"], list(SERVED))
        _assert_outputs_agree(got, trained["expected"])


@pytest.mark.slow
def test_export_under_another_backend_fails_in_one_line(trained: dict[str, Any]) -> None:
    backend = trained["backend"]
    onnx = trained["dir"] / "refused.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from terrapatch.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "export", str(trained["model"]), "--onnx", str(onnx)],
        env=_child_env(backend), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("terrapatch export: error: export:")
    assert f"this process runs Keras on {backend}" in lines[0]
    assert "KERAS_BACKEND=tensorflow terrapatch export" in lines[0]
    assert not onnx.exists()


@pytest.mark.slow
def test_seed_tf_data_pipeline_trains_under_backend(trained: dict[str, Any],
                                                    patches: dict[str, Any]) -> None:
    """The seed's own input pipeline (``get_tf_dataset``, tf.data) feeds torch and jax too."""
    result = trained["result"]["tf_data"]
    assert result["backend"] == trained["backend"]
    assert np.isfinite(result["loss"][0])
    assert result["steps"] == patches["n_train"] // 16  # every batch of the epoch, once

    from terrapatch.model import load_model

    reloaded = load_model(trained["dir"] / "tfdata.keras")
    x = {"input_10m": np.full((1, 16, 16, 4), 2000, "float32"),
         "input_20m": np.full((1, 8, 8, 6), 2000, "float32")}
    scores = reloaded.predict(x, verbose=0)["estimated"]
    assert scores.shape == (1, 1, 1, 6)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)


# -- the backend-neutral dataset, in this process ---------------------------------------


@pytest.fixture(scope="module")
def seed_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_dual_source", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_patches(tmp_path_factory: pytest.TempPathFactory, seed_example: Any) -> list[str]:
    """40 seed samples whose 10 m patch encodes the sample number (band 0, pixel 0)."""
    directory = tmp_path_factory.mktemp("keras_dataset")
    files = seed_example.write_synthetic_patches(directory, "a_", 40, seed=3)
    from terrapatch.patches import read_patches, write_patches_image

    img = read_patches(files[0])
    img[:, 0, 0, 0] = np.arange(40)
    write_patches_image(files[0], [img], n_patches=40, patch_size_x=16, patch_size_y=16,
                        bands=4, dtype="uint16")
    return files


def _ids(batch: Any) -> list[int]:
    inputs = batch[0] if isinstance(batch, tuple) else batch
    return [int(v) for v in inputs["input_10m"][:, 0, 0, 0]]


@pytest.mark.parametrize("streaming", [False, True])
def test_keras_dataset_yields_every_sample_once_per_epoch(
        small_patches: list[str], seed_example: Any, streaming: bool) -> None:
    ds = DatasetFromPatchesImages(
        {"img_10m": small_patches[0], "img_20m": small_patches[1],
         "labels": small_patches[2]}, use_streaming=streaming, buffer_length=16)
    kds = ds.get_keras_dataset(8, preprocessing_fn=seed_example.dataset_preprocessing_fn,
                               targets_keys=["estimated"], seed=1)
    assert len(kds) == 5
    inputs_spec, targets_spec = kds.element_spec
    assert {k: tuple(v.shape) for k, v in inputs_spec.items()} == {
        "input_10m": (8, 16, 16, 4), "input_20m": (8, 8, 8, 6)}
    assert tuple(targets_spec["estimated"].shape) == (8, 1, 1, 6)
    epochs = []
    for _ in range(2):
        batches = {i: kds[i] for i in reversed(range(len(kds)))}  # random access
        inputs, targets = batches[0]
        assert inputs["input_10m"].dtype == np.uint16
        assert targets["estimated"].dtype == np.float32
        np.testing.assert_array_equal(targets["estimated"].sum(axis=-1), 1.0)
        ids = [i for b in range(len(kds)) for i in _ids(batches[b])]
        assert sorted(ids) == list(range(40))
        epochs.append(ids)
        kds.on_epoch_end()
    assert epochs[0] != epochs[1]
    # The same seed gives the same epochs; the targets are those of the samples held.
    again = ds.get_keras_dataset(8, preprocessing_fn=seed_example.dataset_preprocessing_fn,
                                 targets_keys=["estimated"], seed=1)
    assert [i for b in range(len(again)) for i in _ids(again[b])] == epochs[0]
    for b in range(len(again)):
        inputs, targets = again[b]
        labels = ds.reader.read_samples(_ids(again[b]))["labels"][:, 0, 0, 0]
        np.testing.assert_array_equal(np.argmax(targets["estimated"][:, 0, 0], -1), labels)


def test_keras_dataset_matches_tf_dataset_and_trains(small_patches: list[str],
                                                     seed_example: Any) -> None:
    files = {"img_10m": small_patches[0], "img_20m": small_patches[1],
             "labels": small_patches[2]}
    ds = DatasetFromPatchesImages(files)
    kds = ds.get_keras_dataset(8, preprocessing_fn=seed_example.dataset_preprocessing_fn,
                               targets_keys=["estimated"], shuffle=False)
    tds = ds.get_tf_dataset(8, preprocessing_fn=seed_example.dataset_preprocessing_fn,
                            targets_keys=["estimated"], shuffle=False)
    for i, (inputs, targets) in enumerate(tds):
        k_inputs, k_targets = kds[i]
        for key, value in inputs.items():
            np.testing.assert_array_equal(k_inputs[key], value.numpy())
        np.testing.assert_array_equal(k_targets["estimated"], targets["estimated"].numpy())
    plain = ds.get_keras_dataset(16, drop_remainder=False, shuffle=False)
    assert len(plain) == 3 and len(plain[2]["labels"]) == 8
    assert tuple(plain.element_spec["img_20m"].shape) == (None, 8, 8, 6)

    model = seed_example.DualSrcFCNNModel(dataset_element_spec=kds.element_spec)
    model.compile(loss={"estimated": "categorical_crossentropy"}, optimizer="adam")
    history = model.fit(kds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_keras_dataset_errors(small_patches: list[str]) -> None:
    from terrapatch.errors import InputError

    ds = DatasetFromPatchesImages({"a": small_patches[0], "b": small_patches[2]})
    with pytest.raises(InputError, match="batch_size"):
        ds.get_keras_dataset(0)
    with pytest.raises(InputError, match="larger than the 40 samples"):
        ds.get_keras_dataset(41)
    with pytest.raises(InputError, match=r"targets_keys: \['c'\] not among"):
        ds.get_keras_dataset(4, targets_keys=["c"])
    with pytest.raises(InputError, match="must return a dict"):
        ds.get_keras_dataset(4, preprocessing_fn=lambda s: s["a"], targets_keys=["a"])
    with pytest.raises(InputError, match="index: 40 outside"):
        ds.reader.read_samples([3, 40])
