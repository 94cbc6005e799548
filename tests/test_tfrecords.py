"""TFRecords: shards and JSON written from patches images, read back as (inputs, targets)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from terrapatch.dataset import DatasetFromPatchesImages
from terrapatch.errors import InputError, MissingInputError
from terrapatch.patches import write_patches_image
from terrapatch.tfrecords import TFRecords

N = 23


@pytest.fixture
def dataset(tmp_path: Path) -> DatasetFromPatchesImages:
    """N samples: img value = id*10 + band (float32), labels = id (uint8)."""
    ids = np.arange(N)
    img = np.broadcast_to((ids[:, None, None, None] * 10 + np.arange(2)).astype("float32"),
                          (N, 3, 3, 2))
    labels = ids.astype("uint8").reshape(N, 1, 1, 1)
    write_patches_image(tmp_path / "img.tif", [img], n_patches=N, patch_size_x=3,
                        patch_size_y=3, bands=2)
    write_patches_image(tmp_path / "lab.tif", [labels], n_patches=N, patch_size_x=1,
                        patch_size_y=1, bands=1, dtype="uint8")
    return DatasetFromPatchesImages({"img": [tmp_path / "img.tif"],
                                     "labels": [tmp_path / "lab.tif"]})


def ids_of(batch: tuple[dict, dict]) -> np.ndarray:
    inputs, targets = batch
    ids = (np.asarray(inputs["img"])[:, 0, 0, 0] / 10).astype(int)
    np.testing.assert_array_equal(np.asarray(targets["labels"])[:, 0, 0, 0], ids)
    np.testing.assert_array_equal(np.asarray(inputs["img"])[:, 2, 1, 1], ids * 10 + 1)
    return ids


def test_write_shards_and_json(dataset, tmp_path):
    out = tmp_path / "records"
    assert dataset.to_tfrecords(out, n_samples_per_shard=5) == out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0.records", "1.records", "2.records", "3.records",
                     "output_shapes.json", "output_types.json"]
    assert json.loads((out / "output_shapes.json").read_text()) == {
        "img": [3, 3, 2], "labels": [1, 1, 1]}
    assert json.loads((out / "output_types.json").read_text()) == {
        "img": "float32", "labels": "uint8"}
    records = TFRecords(out)
    assert records.output_types == {"img": "float32", "labels": "uint8"}
    assert [p.name for p in records.shards()] == [f"{i}.records" for i in range(4)]


def test_records_use_otbtf_serialization(dataset, tmp_path):
    """One bytes feature per key holding a serialized tensor (tf.io.parse_tensor reads it)."""
    TFRecords(tmp_path / "r").ds2tfrecord(dataset, n_samples_per_shard=N, shuffle=False)
    raw = next(iter(tf.data.TFRecordDataset(str(tmp_path / "r" / "0.records"))))
    example = tf.train.Example.FromString(raw.numpy())
    assert set(example.features.feature) == {"img", "labels"}
    value = example.features.feature["img"].bytes_list.value[0]
    img = tf.io.parse_tensor(value, out_type=tf.float32).numpy()
    np.testing.assert_array_equal(img[..., 1], np.full((3, 3), 1.0))  # sample 0, band 1
    assert tf.io.serialize_tensor(tf.constant(img)).numpy() == value


def test_read_yields_every_written_sample_once_per_epoch(dataset, tmp_path):
    records = TFRecords(tmp_path / "r")
    shards = records.ds2tfrecord(dataset, n_samples_per_shard=5, drop_remainder=False)
    assert len(shards) == 5  # 4 full shards + a shard of 3
    ds = records.read(batch_size=4, target_keys=["labels"], drop_remainder=False,
                      shuffle_buffer_size=10)
    inputs_spec, targets_spec = ds.element_spec
    assert list(inputs_spec) == ["img"] and list(targets_spec) == ["labels"]
    assert targets_spec["labels"].dtype == tf.uint8
    first = np.concatenate([ids_of(b) for b in ds])
    second = np.concatenate([ids_of(b) for b in ds])
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
    assert not np.array_equal(first, second)


def test_drop_remainder_drops_the_last_samples(dataset, tmp_path):
    records = TFRecords(tmp_path / "r")
    records.ds2tfrecord(dataset, n_samples_per_shard=5, shuffle=False)
    ds = records.read(batch_size=5, target_keys=["labels"])
    ids = np.concatenate([ids_of(b) for b in ds])
    np.testing.assert_array_equal(ids, np.arange(20))  # shards in order, no shuffling


def test_preprocessing_fn_receives_kwargs(dataset, tmp_path):
    records = TFRecords(tmp_path / "r")
    records.ds2tfrecord(dataset, n_samples_per_shard=10, shuffle=False)

    def prep(sample, scale):
        return {"x": sample["img"] * scale, "y": tf.cast(sample["labels"], tf.int32) + 100}

    x, y = next(iter(records.read(batch_size=10, target_keys=["y"], preprocessing_fn=prep,
                                  scale=2.0)))
    np.testing.assert_array_equal(np.asarray(y["y"])[:, 0, 0, 0], np.arange(10) + 100)
    np.testing.assert_array_equal(np.asarray(x["x"])[:, 0, 0, 0], np.arange(10) * 20.0)
    with pytest.raises(InputError, match=r"target_keys: \['labels'\].*preprocessing_fn"):
        records.read(batch_size=2, target_keys=["labels"], preprocessing_fn=prep, scale=1.0)


def test_n_workers_keeps_a_multiple_of_shards(dataset, tmp_path):
    records = TFRecords(tmp_path / "r")
    records.ds2tfrecord(dataset, n_samples_per_shard=5, shuffle=False)  # 4 shards
    ds = records.read(batch_size=5, target_keys=["labels"], n_workers=3)
    assert sum(1 for _ in ds) == 3
    with pytest.raises(MissingInputError, match="fewer than n_workers=5"):
        records.read(batch_size=5, target_keys=["labels"], n_workers=5)


def test_rewrite_replaces_previous_shards_and_leaves_no_temporary_file(dataset, tmp_path):
    records = TFRecords(tmp_path / "r")
    records.ds2tfrecord(dataset, n_samples_per_shard=4)
    records.ds2tfrecord(dataset, n_samples_per_shard=10)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "0.records", "1.records", "output_shapes.json", "output_types.json"]


def test_write_from_a_tf_data_dataset(tmp_path):
    ds = tf.data.Dataset.from_tensor_slices(
        {"a": np.arange(12, dtype="int16").reshape(6, 2, 1), "b": np.ones((6, 3), "float32")})
    records = TFRecords(tmp_path / "r")
    records.ds2tfrecord(ds, n_samples_per_shard=4, drop_remainder=False)
    assert records.output_shapes == {"a": [2, 1], "b": [3]}
    x, _ = next(iter(records.read(batch_size=6, target_keys=["b"], drop_remainder=False)))
    np.testing.assert_array_equal(np.asarray(x["a"]), np.arange(12).reshape(6, 2, 1))


def test_read_errors(dataset, tmp_path):
    empty = TFRecords(tmp_path / "empty")
    with pytest.raises(MissingInputError, match=r"output_shapes\.json.*missing"):
        empty.read(batch_size=2, target_keys=["labels"])
    records = TFRecords(tmp_path / "r")
    records.ds2tfrecord(dataset, n_samples_per_shard=5)
    with pytest.raises(InputError, match=r"target_keys: \['nope'\]"):
        records.read(batch_size=2, target_keys=["nope"])
    with pytest.raises(InputError, match="n_samples_per_shard: 50 is larger than the 23"):
        records.ds2tfrecord(dataset, n_samples_per_shard=50)
    with pytest.raises(InputError, match="n_samples_per_shard"):
        records.ds2tfrecord(dataset, n_samples_per_shard=0)
    with pytest.raises(InputError, match="dataset: expected"):
        records.ds2tfrecord([1, 2, 3])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not a directory"):
        TFRecords(tmp_path / "file")
