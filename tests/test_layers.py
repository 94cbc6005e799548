"""Layers, ops and metrics: values against NumPy, dtypes, shapes, safe-mode save/load."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from terrapatch import layers, ops
from terrapatch.errors import InputError
from terrapatch.metrics import FScore
from terrapatch.model import load_model


def rng() -> np.random.Generator:
    return np.random.default_rng(42)


def test_argmax_index_dtype_and_shape():
    x = rng().random((2, 5, 7, 4)).astype("float32")
    out = np.asarray(layers.Argmax()(x))
    assert out.dtype == np.int64 and out.shape == (2, 5, 7, 1)
    np.testing.assert_array_equal(out[..., 0], np.argmax(x, axis=-1))
    flat = np.asarray(layers.Argmax(expand_last_dim=False)(x))
    assert flat.shape == (2, 5, 7)
    onehot = np.asarray(layers.Argmax(one_hot=True)(x))
    assert onehot.dtype == np.float32 and onehot.shape == x.shape
    np.testing.assert_array_equal(onehot, np.eye(4, dtype="float32")[np.argmax(x, axis=-1)])


def test_argmax_symbolic_shape_and_dtype():
    inp = keras.Input((None, None, 6))
    out = layers.Argmax()(inp)
    assert tuple(out.shape) == (None, None, None, 1) and out.dtype == "int64"
    assert layers.Argmax(one_hot=True)(inp).dtype == "float32"


def test_max_keeps_a_last_axis():
    x = rng().normal(size=(3, 4, 4, 5)).astype("float32")
    np.testing.assert_array_equal(np.asarray(layers.Max()(x)), x.max(axis=-1, keepdims=True))


def reference_dilated_mask(x: np.ndarray, nodata: float, radius: int) -> np.ndarray:
    mask = (x == nodata).astype(np.uint8)
    _, h, w, _ = mask.shape
    out = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            window = mask[:, max(i - radius, 0):i + radius + 1, max(j - radius, 0):j + radius + 1]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_dilated_mask_matches_a_max_filter(radius):
    x = rng().integers(0, 6, (2, 9, 8, 2)).astype("float32")
    out = np.asarray(layers.DilatedMask(nodata_value=0, radius=radius)(x))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_dilated_mask(x, 0, radius))


def test_apply_mask_broadcasts_a_one_channel_mask():
    x = rng().random((2, 4, 4, 3)).astype("float32")
    mask = (rng().random((2, 4, 4, 1)) > 0.5).astype("uint8")
    out = np.asarray(layers.ApplyMask(out_nodata=-9)((mask, x)))
    np.testing.assert_array_equal(out, np.where(mask == 1, np.float32(-9), x))


def test_scalars_tile_repeats_scalars_over_the_reference_grid():
    ref = np.zeros((3, 5, 6, 2), dtype="float32")
    s1 = np.array([1.0, 2.0, 3.0], dtype="float32")
    s2 = np.array([[10.0], [20.0], [30.0]], dtype="float32")
    out = np.asarray(layers.ScalarsTile()((ref, [s1, s2])))
    assert out.shape == (3, 5, 6, 2)
    np.testing.assert_array_equal(out[:, 2, 3], np.stack([s1, s2[:, 0]], axis=-1))
    assert (out[..., 0] == s1[:, None, None]).all()
    inp = keras.Input((None, None, 2))
    scalar = keras.Input((1,))
    assert tuple(layers.ScalarsTile()((inp, [scalar, scalar])).shape) == (None, None, None, 2)


def test_crop_border_and_empty_result_when_too_small():
    x = rng().random((1, 10, 12, 2)).astype("float32")
    np.testing.assert_array_equal(np.asarray(layers.CropBorder(3)(x)), x[:, 3:-3, 3:-3, :])
    assert np.asarray(layers.CropBorder(16)(x)).shape == (1, 0, 0, 2)
    assert layers.CropBorder(3).compute_output_shape((None, 10, None, 2)) == (None, 4, None, 2)
    with pytest.raises(ValueError, match="crop"):
        layers.CropBorder(0)


def test_one_hot_numpy_and_tf_inputs():
    labels = np.array([[[[2]]], [[[0]]]], dtype="uint8")  # (2, 1, 1, 1)
    out = np.asarray(ops.one_hot(labels, nb_classes=4))
    assert out.shape == (2, 1, 1, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, 0], [[0, 0, 1, 0], [1, 0, 0, 0]])
    tf_out = ops.one_hot(tf.constant(labels[0]), nb_classes=3)
    assert isinstance(tf_out, tf.Tensor) and tf_out.shape == (1, 1, 3)
    with pytest.raises(InputError, match="nb_classes"):
        ops.one_hot(labels, nb_classes=0)
    with pytest.raises(InputError, match="axis of size 1"):
        ops.one_hot(np.zeros((2, 3), dtype="int32"), nb_classes=3)


def fscore_reference(y_true, y_pred, class_id, threshold=0.5, beta=1.0):
    t = y_true[..., class_id] != 0
    p = y_pred[..., class_id] > threshold
    tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
    b2 = beta * beta
    denominator = (1 + b2) * tp + b2 * fn + fp
    return 0.0 if denominator == 0 else (1 + b2) * tp / denominator


def test_fscore_matches_precision_and_recall():
    r = rng()
    classes = 4
    y_true = np.eye(classes, dtype="float32")[r.integers(0, classes, (64, 1, 1))]
    y_pred = keras.ops.convert_to_numpy(
        keras.activations.softmax(r.normal(size=(64, 1, 1, classes)).astype("float32") * 3)
    )
    for class_id in range(classes):
        metric = FScore(class_id=class_id)
        assert metric.name == f"fscore_cls{class_id}"
        metric.update_state(y_true[:40], y_pred[:40])
        metric.update_state(y_true[40:], y_pred[40:])
        precision = keras.metrics.Precision(class_id=class_id)
        recall = keras.metrics.Recall(class_id=class_id)
        precision.update_state(y_true, y_pred)
        recall.update_state(y_true, y_pred)
        p, rec = float(precision.result()), float(recall.result())
        expected = fscore_reference(y_true, y_pred, class_id)
        assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
        if p + rec > 0:
            assert float(metric.result()) == pytest.approx(2 * p * rec / (p + rec), abs=1e-6)
        metric.reset_state()
        assert float(metric.result()) == 0.0
    f2 = FScore(class_id=1, beta=2.0)
    f2.update_state(y_true, y_pred)
    assert float(f2.result()) == pytest.approx(
        fscore_reference(y_true, y_pred, 1, beta=2.0), abs=1e-6)


def test_fscore_sample_weight_and_micro_average():
    y_true = np.array([[1, 0], [0, 1], [1, 0]], dtype="float32")
    y_pred = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8]], dtype="float32")
    weighted = FScore(class_id=0)
    weighted.update_state(y_true, y_pred, sample_weight=np.array([1.0, 0.0, 1.0]))
    # class 0: tp=1 (w1), fp=0 (weight 0), fn=1 → 2/(2+1)
    assert float(weighted.result()) == pytest.approx(2 / 3)
    micro = FScore()
    micro.update_state(y_true, y_pred)
    assert micro.name == "fscore"
    # all entries: tp=1, fp=2, fn=2 → 2/(2+2+2)
    assert float(micro.result()) == pytest.approx(1 / 3)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_layers_and_metric_survive_a_safe_mode_round_trip(tmp_path):
    image = keras.Input((None, None, 3), name="image")
    scalar = keras.Input((1,), name="scalar")
    mask = layers.DilatedMask(nodata_value=0, radius=1, name="mask")(image)
    masked = layers.ApplyMask(out_nodata=-1, name="apply")((mask, image))
    tiled = layers.ScalarsTile(name="tile")((image, [scalar]))
    scores = keras.layers.Conv2D(4, 1, activation="softmax", name="scores")(
        keras.layers.Concatenate()([masked, tiled]))
    outputs = {
        "scores": scores,
        "labels": layers.Argmax(name="argmax")(scores),
        "onehot": layers.Argmax(one_hot=True, name="argmax_onehot")(scores),
        "max": layers.Max(name="max")(scores),
        "cropped": layers.CropBorder(1, name="crop")(scores),
    }
    model = keras.Model({"image": image, "scalar": scalar}, outputs)
    model.compile(loss={"scores": "categorical_crossentropy"}, optimizer="adam",
                  metrics={"scores": [FScore(class_id=2, beta=0.5, name="f")]})
    path = tmp_path / "layers.keras"
    model.save(path)
    loaded = load_model(path, safe_mode=True, compile=True)
    assert isinstance(loaded.get_layer("argmax"), layers.Argmax)
    assert loaded.get_layer("argmax_onehot").one_hot is True
    assert loaded.get_layer("mask").radius == 1
    assert loaded.get_layer("crop").crop == 1
    x = {"image": rng().integers(0, 3, (2, 6, 6, 3)).astype("float32"),
         "scalar": np.array([[1.0], [2.0]], dtype="float32")}
    expected = model.predict(x, verbose=0)
    got = loaded.predict(x, verbose=0)
    for key in outputs:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)
    config = FScore(class_id=2, beta=0.5, name="f").get_config()
    assert FScore.from_config(config).beta == 0.5
