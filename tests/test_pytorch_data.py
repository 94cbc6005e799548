"""PatchesDataset: patches images from a small two-source extraction as torch tensors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

from terrapatch.dataset import PatchesImagesReader  # noqa: E402
from terrapatch.errors import InputError  # noqa: E402
from terrapatch.extraction import extract_patches  # noqa: E402
from terrapatch.pytorch import PatchesDataset  # noqa: E402
from terrapatch.raster import Source  # noqa: E402
from terrapatch.testing.scene import make_scene  # noqa: E402


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    """A 10 m (16 × 16, 4 bands) / 20 m (8 × 8, 6 bands) extraction with labels."""
    directory = tmp_path_factory.mktemp("torch_patches")
    scene = make_scene(directory / "scene", size=128, n_points=120, seed=3)
    files = {"input_10m": directory / "p10.tif", "input_20m": directory / "p20.tif",
             "labels": directory / "labels.tif"}
    extract_patches([Source(scene.img_10m, 16, nodata=0), Source(scene.img_20m, 8, nodata=0)],
                    scene.points_train, "class", [files["input_10m"], files["input_20m"]],
                    labels_out=files["labels"], quiet=True)
    return files


@pytest.mark.parametrize("streaming", [False, True])
def test_items_are_channels_first_tensors_of_the_patches(patches, streaming):
    dataset = PatchesDataset(patches, use_streaming=streaming, integer_keys=["labels"])
    reader = PatchesImagesReader(patches)
    assert len(dataset) == reader.get_size() > 10
    assert dataset.keys == ["input_10m", "input_20m", "labels"]
    assert dataset.shapes == {"input_10m": (4, 16, 16), "input_20m": (6, 8, 8),
                              "labels": (1, 1, 1)}
    for index in (0, len(dataset) - 1):
        item, sample = dataset[index], reader.get_sample(index)
        assert item["input_10m"].dtype == torch.float32 and item["labels"].dtype == torch.int64
        for key, array in sample.items():
            assert tuple(item[key].shape) == dataset.shapes[key]
            np.testing.assert_array_equal(item[key].numpy(), array.transpose(2, 0, 1))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_gives_every_sample_once(patches, workers):
    dataset = PatchesDataset(patches, use_streaming=workers > 0, integer_keys=["labels"])
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert batch["input_10m"].shape[1:] == (4, 16, 16)
        assert batch["input_20m"].shape[1:] == (6, 8, 8)
        seen.append(torch.cat([batch["input_20m"].flatten(1), batch["labels"].flatten(1)], 1))
    got = torch.cat(seen).numpy()
    expected = np.stack([np.concatenate([dataset[i]["input_20m"].flatten().numpy(),
                                         dataset[i]["labels"].flatten().numpy()])
                         for i in range(len(dataset))])
    assert got.shape == expected.shape
    order = np.lexsort(got.T[::-1])
    np.testing.assert_array_equal(got[order], expected[np.lexsort(expected.T[::-1])])


def test_transform_and_errors(patches):
    def scale(item):
        return {k: v / 10000 if k != "labels" else v for k, v in item.items()}

    raw = PatchesDataset(patches)
    scaled = PatchesDataset(patches, transform=scale, dtype=torch.float64)
    assert scaled[0]["input_10m"].dtype == torch.float64
    np.testing.assert_allclose(scaled[0]["input_10m"].numpy(),
                               raw[0]["input_10m"].numpy() / 10000)
    with pytest.raises(InputError, match="integer_keys"):
        PatchesDataset(patches, integer_keys=["label"])
