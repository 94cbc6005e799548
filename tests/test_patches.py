"""The patches-image format: writing chunks atomically, reading back with and without metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Compression

from terrapatch.errors import InputError, MissingInputError
from terrapatch.patches import (
    TAG_N_PATCHES,
    TAG_PATCH_SIZE_X,
    TAG_PATCH_SIZE_Y,
    read_patches,
    read_patches_info,
    write_patches_image,
)
from terrapatch.testing import write_raster


def numbered(n: int, psy: int, psx: int, bands: int, start: int = 0) -> np.ndarray:
    """Patches whose every value encodes (patch, row, col, band) → 1000 p + 100 b + 10 r + c."""
    p, r, c, b = np.meshgrid(np.arange(start, start + n), np.arange(psy), np.arange(psx),
                             np.arange(bands), indexing="ij")
    return (1000 * p + 100 * b + 10 * r + c).astype(np.float32)


def write_plain(path: Path, array: np.ndarray) -> Path:
    """A GeoTIFF without terrapatch tags (as OTBTF writes them)."""
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                       count=array.shape[0], dtype=array.dtype.name,
                       transform=Affine(1, 0, -0.5, 0, -1, 0.5)) as ds:
        ds.write(array)
    return path


def test_round_trip_from_uneven_chunks(tmp_path):
    data = numbered(7, 3, 5, 2)
    chunks = [data[:3], data[3:3], data[3:4], data[4:]]
    out = write_patches_image(tmp_path / "p.tif", chunks, n_patches=7, patch_size_x=5,
                              patch_size_y=3, bands=2, spacing=(10.0, 10.0))
    assert out == tmp_path / "p.tif"
    info = read_patches_info(out)
    assert (info.n_patches, info.patch_size_x, info.patch_size_y, info.bands) == (7, 5, 3, 2)
    assert info.patch_shape == (3, 5, 2)
    assert info.from_metadata
    assert info.dtype == np.float32
    np.testing.assert_array_equal(read_patches(out), data)
    np.testing.assert_array_equal(read_patches(out, start=2, count=3), data[2:5])
    np.testing.assert_array_equal(read_patches(out, start=6), data[6:])
    assert read_patches(out, start=7).shape == (0, 3, 5, 2)
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.count) == (5, 21, 2)
        # Patch n occupies rows 3n..3n+2; band b is channel b.
        np.testing.assert_array_equal(ds.read(2, window=((6, 9), (0, 5))), data[2, :, :, 1])
        assert ds.crs is None
        assert ds.transform == Affine(10, 0, -5, 0, -10, 5)
        assert ds.tags()[TAG_PATCH_SIZE_X] == "5"
        assert ds.tags()[TAG_PATCH_SIZE_Y] == "3"
        assert ds.tags()[TAG_N_PATCHES] == "7"
        assert ds.compression is None
        assert ds.block_shapes[0][0] % 3 == 0   # strips hold whole patches


def test_read_range_errors(tmp_path):
    out = write_patches_image(tmp_path / "p.tif", [numbered(2, 2, 2, 1)], n_patches=2,
                              patch_size_x=2, patch_size_y=2, bands=1)
    for start, count in ((-1, 1), (1, 2), (0, -1), (3, None)):
        with pytest.raises(InputError, match="outside the 2 patches"):
            read_patches(out, start=start, count=count)


def test_file_without_metadata_is_read_as_square_patches(tmp_path):
    data = numbered(3, 8, 8, 2)
    stacked = data.transpose(3, 0, 1, 2).reshape(2, 24, 8)
    path = write_plain(tmp_path / "otbtf.tif", stacked)
    info = read_patches_info(path)
    assert not info.from_metadata
    assert (info.n_patches, info.patch_size_x, info.patch_size_y, info.bands) == (3, 8, 8, 2)
    np.testing.assert_array_equal(read_patches(path), data)
    # Labels image (1 × N) without metadata: N patches of 1 × 1.
    labels = write_plain(tmp_path / "labels.tif", np.arange(5, dtype=np.uint8).reshape(1, 5, 1))
    info = read_patches_info(labels)
    assert (info.n_patches, info.patch_size_x, info.bands, info.dtype) == (5, 1, 1, np.uint8)
    assert read_patches(labels).ravel().tolist() == [0, 1, 2, 3, 4]


def test_non_square_patches_need_the_metadata(tmp_path):
    data = numbered(4, 3, 5, 1)
    stacked = data.transpose(3, 0, 1, 2).reshape(1, 12, 5)
    path = write_plain(tmp_path / "plain.tif", stacked)
    with pytest.raises(InputError, match=r"plain\.tif.*not a patches image.*5×12"):
        read_patches_info(path)
    tagged = write_patches_image(tmp_path / "tagged.tif", [data], n_patches=4, patch_size_x=5,
                                 patch_size_y=3, bands=1)
    np.testing.assert_array_equal(read_patches(tagged), data)
    # Without metadata a height that happens to be a multiple of the width is read as
    # square patches, like OTBTF's reader (reference §3.5).
    data = numbered(4, 3, 6, 1)
    path = write_plain(tmp_path / "plain6.tif", data.transpose(3, 0, 1, 2).reshape(1, 12, 6))
    info = read_patches_info(path)
    assert (info.n_patches, info.patch_size_x, info.patch_size_y) == (2, 6, 6)


def test_inconsistent_metadata_is_an_error(tmp_path):
    path = write_plain(tmp_path / "p.tif", np.zeros((1, 12, 4), np.float32))
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**{TAG_PATCH_SIZE_X: "4", TAG_PATCH_SIZE_Y: "3", TAG_N_PATCHES: "5"})
    with pytest.raises(InputError, match="declares 5 patches but holds 4"):
        read_patches_info(path)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**{TAG_PATCH_SIZE_X: "3", TAG_N_PATCHES: "4"})   # width is 4
    with pytest.raises(InputError, match="not a patches image"):
        read_patches_info(path)


def test_missing_and_unreadable_files_name_the_parameter(tmp_path):
    with pytest.raises(MissingInputError, match=r"train\.x: file .*nope\.tif"):
        read_patches_info(tmp_path / "nope.tif", parameter="train.x")
    bad = tmp_path / "bad.tif"
    bad.write_text("hello")
    with pytest.raises(InputError, match=r"patches: .*bad\.tif.* not a readable raster"):
        read_patches_info(bad)


def test_pixel_type_conversion_and_compression(tmp_path):
    values = np.array([-3.7, 0.9, 200.5, 300.0, 70000.0, np.nan], np.float32).reshape(6, 1, 1, 1)
    u8 = write_patches_image(tmp_path / "u8.tif", [values], n_patches=6, patch_size_x=1,
                             patch_size_y=1, bands=1, dtype="uint8",
                             creation_options={"COMPRESS": "DEFLATE"})
    i16 = write_patches_image(tmp_path / "i16.tif", [values], n_patches=6, patch_size_x=1,
                              patch_size_y=1, bands=1, dtype=np.int16)
    with rasterio.open(u8) as ds:
        assert ds.dtypes[0] == "uint8"
        assert ds.compression == Compression.deflate
        assert ds.read(1).ravel().tolist() == [0, 0, 200, 255, 255, 0]
    with rasterio.open(i16) as ds:
        assert ds.dtypes[0] == "int16"
        assert ds.compression is None
        assert ds.read(1).ravel().tolist() == [-3, 0, 200, 300, 32767, 0]


@pytest.mark.parametrize("sizes", [[2, 1], [2, 2, 1]])
def test_wrong_patch_count_leaves_no_file(tmp_path, sizes):
    chunks = [numbered(k, 2, 2, 1) for k in sizes]
    with pytest.raises(ValueError, match="patches"):
        write_patches_image(tmp_path / "p.tif", chunks, n_patches=4, patch_size_x=2,
                            patch_size_y=2, bands=1)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_chunks_leave_no_file_and_keep_the_old_one(tmp_path):
    old = write_raster(tmp_path / "p.tif", np.ones((1, 2, 2), np.uint8),
                       Affine(1, 0, 0, 0, -1, 2), crs=None)
    before = old.read_bytes()

    def chunks():
        yield numbered(2, 2, 2, 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_patches_image(tmp_path / "p.tif", chunks(), n_patches=4, patch_size_x=2,
                            patch_size_y=2, bands=1)
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]
    assert old.read_bytes() == before


def test_large_patch_count_strips_hold_whole_patches(tmp_path):
    data = numbered(300, 4, 4, 1)
    out = write_patches_image(tmp_path / "p.tif", (data[a:a + 64] for a in range(0, 300, 64)),
                              n_patches=300, patch_size_x=4, patch_size_y=4, bands=1)
    with rasterio.open(out) as ds:
        rows = ds.block_shapes[0][0]
    assert rows % 4 == 0 and rows > 4
    np.testing.assert_array_equal(read_patches(out, start=123, count=77), data[123:200])
