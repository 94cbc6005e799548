"""PatchesImagesReader and DatasetFromPatchesImages on patches images written in tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.dataset import DatasetFromPatchesImages, PatchesImagesReader
from terrapatch.errors import InputError, MissingInputError
from terrapatch.patches import write_patches_image


def make_samples(n: int, first: int = 0) -> dict[str, np.ndarray]:
    """Samples whose every value encodes the sample id (id*10 + band), labels = id % 256."""
    ids = np.arange(first, first + n)
    img = (ids[:, None, None, None] * 10 + np.arange(3)).astype("float32")
    img = np.broadcast_to(img, (n, 4, 4, 3)).copy()
    img[:, 1, 2, :] += 0.5  # not constant inside a patch
    small = np.broadcast_to(ids[:, None, None, None].astype("int16"), (n, 2, 2, 1)).copy()
    labels = (ids % 256).astype("uint8").reshape(n, 1, 1, 1)
    return {"img": img, "small": small, "labels": labels}


def write_set(directory: Path, n: int, first: int = 0, tag: str = "") -> dict[str, Path]:
    samples = make_samples(n, first)
    paths = {}
    for key, array in samples.items():
        path = directory / f"{tag}{key}.tif"
        _, psy, psx, bands = array.shape
        write_patches_image(path, [array], n_patches=n, patch_size_x=psx, patch_size_y=psy,
                            bands=bands, dtype=array.dtype)
        paths[key] = path
    return paths


@pytest.fixture
def two_files(tmp_path: Path) -> dict[str, list[Path]]:
    """Two files per key: samples 0..29 then 30..49."""
    a = write_set(tmp_path, 30, 0, "a_")
    b = write_set(tmp_path, 20, 30, "b_")
    return {key: [a[key], b[key]] for key in a}


def sample_ids(element: dict) -> np.ndarray:
    """Sample ids of a batch (checked consistent across keys)."""
    img = np.asarray(element["img"])
    ids = (img[:, 0, 0, 0] / 10).astype(int)
    np.testing.assert_array_equal(np.asarray(element["small"])[:, 0, 0, 0], ids)
    np.testing.assert_array_equal(np.asarray(element["labels"])[:, 0, 0, 0], ids % 256)
    expected = make_samples(int(ids.max()) + 1)["img"][ids]
    np.testing.assert_array_equal(img, expected)
    return ids


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_reads_every_sample_across_files(two_files, streaming):
    reader = PatchesImagesReader(two_files, use_streaming=streaming)
    assert reader.get_size() == 50
    assert reader.file_sizes == [30, 20]
    assert reader.patch_shapes == {"img": (4, 4, 3), "small": (2, 2, 1), "labels": (1, 1, 1)}
    assert reader.dtypes["labels"] == np.uint8 and reader.dtypes["small"] == np.int16
    expected = make_samples(50)
    for index in (0, 29, 30, 49):
        sample = reader.get_sample(index)
        for key in expected:
            np.testing.assert_array_equal(sample[key], expected[key][index])
            assert sample[key].dtype == expected[key].dtype
    with pytest.raises(InputError, match="index"):
        reader.get_sample(50)


@pytest.mark.parametrize("streaming", [False, True])
def test_stats_match_numpy(two_files, streaming):
    stats = PatchesImagesReader(two_files, use_streaming=streaming).get_stats()
    expected = make_samples(50)
    for key, array in expected.items():
        values = array.astype(np.float64).reshape(-1, array.shape[-1])
        np.testing.assert_array_equal(stats[key]["min"], values.min(axis=0))
        np.testing.assert_array_equal(stats[key]["max"], values.max(axis=0))
        np.testing.assert_allclose(stats[key]["mean"], values.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], values.std(axis=0), rtol=1e-10)


def test_non_square_patches_use_metadata(tmp_path):
    n = 7
    data = np.arange(n * 3 * 5 * 2, dtype="float32").reshape(n, 3, 5, 2)
    write_patches_image(tmp_path / "p.tif", [data], n_patches=n, patch_size_x=5,
                        patch_size_y=3, bands=2)
    lab = np.arange(n, dtype="uint8").reshape(n, 1, 1, 1)
    write_patches_image(tmp_path / "l.tif", [lab], n_patches=n, patch_size_x=1,
                        patch_size_y=1, bands=1, dtype="uint8")
    reader = PatchesImagesReader({"p": [tmp_path / "p.tif"], "l": [tmp_path / "l.tif"]})
    assert reader.patch_shapes["p"] == (3, 5, 2)
    np.testing.assert_array_equal(reader.get_sample(4)["p"], data[4])


def test_otbtf_file_without_metadata_is_read_as_square_patches(tmp_path):
    n, psz = 5, 4
    data = np.arange(n * psz * psz, dtype="float32").reshape(n, psz, psz, 1)
    path = tmp_path / "otbtf.tif"
    with rasterio.open(path, "w", driver="GTiff", width=psz, height=n * psz, count=1,
                       dtype="float32", transform=Affine(10, 0, -5, 0, -10, 5)) as dst:
        dst.write(data.reshape(n * psz, psz)[None])
    reader = PatchesImagesReader({"x": [str(path)]})
    assert reader.get_size() == n
    np.testing.assert_array_equal(reader.get_sample(3)["x"], data[3])


def test_single_file_name_accepted_for_a_key(tmp_path):
    paths = write_set(tmp_path, 5)
    reader = PatchesImagesReader({key: str(p) for key, p in paths.items()})
    assert reader.get_size() == 5


# -- errors ----------------------------------------------------------------------------


def test_different_patch_counts_list_counts_per_key_and_file(tmp_path):
    a = write_set(tmp_path, 10, 0, "a_")
    b = write_set(tmp_path, 9, 0, "b_")
    with pytest.raises(InputError) as info:
        PatchesImagesReader({"img": [a["img"]], "labels": [b["labels"]]})
    message = str(info.value)
    assert "filenames_dict" in message and "\n" not in message
    assert f"{a['img']}=10" in message and f"{b['labels']}=9" in message
    assert "total 10" in message and "total 9" in message


def test_same_total_but_different_split_between_files_is_rejected(tmp_path):
    a = write_set(tmp_path, 10, 0, "a_")
    b = write_set(tmp_path, 5, 0, "b_")
    c = write_set(tmp_path, 5, 0, "c_")
    d = write_set(tmp_path, 10, 0, "d_")
    with pytest.raises(InputError, match="file by file"):
        PatchesImagesReader({"img": [a["img"], b["img"]], "labels": [c["labels"], d["labels"]]})


def test_different_number_of_files(tmp_path):
    a = write_set(tmp_path, 4, 0, "a_")
    b = write_set(tmp_path, 4, 0, "b_")
    with pytest.raises(InputError, match=r"same number of patches images; got img: 2, labels: 1"):
        PatchesImagesReader({"img": [a["img"], b["img"]], "labels": [a["labels"]]})


def test_file_that_is_not_a_patches_image(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=10, height=15, count=1,
                       dtype="uint8", transform=Affine(1, 0, 0, 0, -1, 0)) as dst:
        dst.write(np.zeros((1, 15, 10), dtype="uint8"))
    with pytest.raises(InputError, match=r"filenames_dict\['img'\].*plain.tif.*not a patches"):
        PatchesImagesReader({"img": [path]})
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(InputError, match=r"filenames_dict\['img'\].*notes.tif"):
        PatchesImagesReader({"img": [text]})


def test_missing_file_and_bad_dict(tmp_path):
    with pytest.raises(MissingInputError, match=r"filenames_dict\['img'\].*nope.tif"):
        PatchesImagesReader({"img": [tmp_path / "nope.tif"]})
    with pytest.raises(InputError, match="filenames_dict"):
        PatchesImagesReader({})
    with pytest.raises(InputError, match=r"filenames_dict\['img'\]"):
        PatchesImagesReader({"img": []})


def test_files_of_one_key_must_share_patch_shape(tmp_path):
    a = write_set(tmp_path, 3, 0, "a_")
    other = np.zeros((3, 2, 2, 3), dtype="float32")
    write_patches_image(tmp_path / "o.tif", [other], n_patches=3, patch_size_x=2,
                        patch_size_y=2, bands=3)
    with pytest.raises(InputError, match=r"filenames_dict\['img'\].*o.tif"):
        PatchesImagesReader({"img": [a["img"], tmp_path / "o.tif"]})


# -- tf.data ------------------------------------------------------------------------------


def epoch_ids(ds) -> np.ndarray:
    return np.concatenate([sample_ids(batch) for batch in ds])


@pytest.mark.parametrize("streaming", [False, True])
def test_every_epoch_yields_every_sample_once_in_a_new_order(two_files, streaming):
    dataset = DatasetFromPatchesImages(two_files, use_streaming=streaming, buffer_length=16)
    ds = dataset.get_tf_dataset(batch_size=8, drop_remainder=False, seed=3)
    first, second = epoch_ids(ds), epoch_ids(ds)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(50))
    # same seed, same sequence of epochs
    again = DatasetFromPatchesImages(two_files, use_streaming=streaming, buffer_length=16)
    ds2 = again.get_tf_dataset(batch_size=8, drop_remainder=False, seed=3)
    np.testing.assert_array_equal(epoch_ids(ds2), first)


@pytest.mark.parametrize("streaming", [False, True])
def test_no_shuffle_keeps_file_order_and_drop_remainder(two_files, streaming):
    dataset = DatasetFromPatchesImages(two_files, use_streaming=streaming, buffer_length=16)
    ds = dataset.get_tf_dataset(batch_size=8, shuffle=False)
    batches = list(ds)
    assert len(batches) == 50 // 8 and ds.cardinality() == 50 // 8
    np.testing.assert_array_equal(np.concatenate([sample_ids(b) for b in batches]),
                                  np.arange(48))
    assert batches[0]["img"].dtype.name == "float32"
    assert batches[0]["labels"].dtype.name == "uint8"
    assert tuple(batches[0]["img"].shape) == (8, 4, 4, 3)


def test_streaming_reads_in_bounded_chunks(two_files):
    dataset = DatasetFromPatchesImages(two_files, use_streaming=True, buffer_length=16)
    chunks = list(dataset.iter_chunks(shuffle=True, rng=np.random.default_rng(0)))
    sizes = [len(c["img"]) for c in chunks]
    assert sum(sizes) == 50
    assert max(sizes) <= 16 + dataset._block_size() - 1
    assert sorted(np.concatenate([sample_ids(c) for c in chunks])) == list(range(50))


def test_targets_keys_split_inputs_and_targets(two_files):
    dataset = DatasetFromPatchesImages(two_files)

    def prep(sample):
        return {"x": sample["img"], "aux": sample["small"], "y": sample["labels"] * 2}

    ds = dataset.get_tf_dataset(batch_size=5, preprocessing_fn=prep, targets_keys=["y"],
                                shuffle=False)
    inputs_spec, targets_spec = ds.element_spec
    assert sorted(inputs_spec) == ["aux", "x"] and list(targets_spec) == ["y"]
    x, y = next(iter(ds))
    np.testing.assert_array_equal(np.asarray(y["y"])[:, 0, 0, 0], np.arange(5) * 2)
    np.testing.assert_array_equal(np.asarray(x["aux"])[:, 0, 0, 0], np.arange(5))


def test_preprocessing_errors_name_the_parameter(two_files):
    dataset = DatasetFromPatchesImages(two_files)
    with pytest.raises(InputError) as info:
        dataset.get_tf_dataset(batch_size=4, targets_keys=["estimated"],
                               preprocessing_fn=lambda s: {"x": s["img"], "y": s["labels"]})
    message = str(info.value)
    assert message.startswith("targets_keys: ['estimated']")
    assert "preprocessing_fn" in message and "['x', 'y']" in message
    with pytest.raises(InputError, match=r"preprocessing_fn.*must return a dict"):
        dataset.get_tf_dataset(batch_size=4, preprocessing_fn=lambda s: s["img"],
                               targets_keys=["labels"])
    plain = dataset.get_tf_dataset(batch_size=4, preprocessing_fn=lambda s: s["img"])
    assert tuple(plain.element_spec.shape) == (4, 4, 4, 3)
    with pytest.raises(InputError, match=r"targets_keys.*no input is left"):
        dataset.get_tf_dataset(batch_size=4, targets_keys=["img", "small", "labels"])
    with pytest.raises(InputError, match=r"targets_keys: \['nope'\].*the dataset"):
        dataset.get_tf_dataset(batch_size=4, targets_keys=["nope"])


def test_batch_size_errors(two_files):
    dataset = DatasetFromPatchesImages(two_files)
    with pytest.raises(InputError, match="batch_size: 0"):
        dataset.get_tf_dataset(batch_size=0)
    with pytest.raises(InputError, match="batch_size: 64 is larger than the 50 samples"):
        dataset.get_tf_dataset(batch_size=64)
    assert len(list(dataset.get_tf_dataset(batch_size=64, drop_remainder=False))) == 1
    with pytest.raises(InputError, match="buffer_length"):
        DatasetFromPatchesImages(two_files, buffer_length=0)


def test_dataset_exposes_size_shapes_types_and_stats(two_files):
    dataset = DatasetFromPatchesImages(two_files)
    assert dataset.size == dataset.get_size() == 50
    assert dataset.output_shapes["img"] == (4, 4, 3)
    assert dataset.output_types["labels"].name == "uint8"
    assert set(dataset.get_stats()) == {"img", "small", "labels"}
