"""Fully-convolutional tiles batched into one model call (``tile_batch``)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from terrapatch.engines import Engine, load_engine
from terrapatch.errors import InputError
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.serve.execution import batches_of
from terrapatch.testing import make_scene
from terrapatch.testing.onnx_models import super_resolution_onnx
from terrapatch.tiling import Tile


class CountingEngine(Engine):
    """An ONNX engine that records the batch size of every call."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.path, inner.inputs, inner.outputs)
        self.inner = inner
        self.batches: list[int] = []

    def _run(self, feed, outputs):
        self.batches.append(int(next(iter(feed.values())).shape[0]))
        return self.inner._run(feed, outputs)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    scene = make_scene(folder, size=90, n_points=10)
    model = super_resolution_onnx(folder / "sr.onnx", bands=(4,), factors=(2,), names=("x",))
    return scene, model


def read(path):
    with rasterio.open(path) as ds:
        return ds.read()


def test_batched_tiles_give_the_same_map_in_fewer_calls(case, tmp_path):
    scene, model = case
    src = [Source(scene.img_10m, name="source1")]
    one = CountingEngine(load_engine(model))
    a = serve(src, model, tmp_path / "a.tif", fullyconv=True, spcscale=0.5, tile_size=40,
              engine=one, quiet=True)
    many = CountingEngine(load_engine(model))
    b = serve(src, model, tmp_path / "b.tif", fullyconv=True, spcscale=0.5, tile_size=40,
              engine=many, tile_batch=3, quiet=True)
    np.testing.assert_array_equal(read(a.path), read(b.path))
    # 176 px → 5 tiles per axis (4 of 40 px + one of 16): the last column and row differ
    assert a.tiles == b.tiles == 25
    assert max(many.batches) == 3 and max(one.batches) == 1
    assert len(many.batches) < len(one.batches)


def test_nodata_tiles_are_skipped_inside_a_batch(case, tmp_path):
    scene, model = case
    src = [Source(scene.img_10m, nodata=0, name="source1")]
    with rasterio.open(scene.img_10m) as ds:
        profile, data = ds.profile, ds.read()
    data[:, :40, :] = 0  # the top rows of tiles see only nodata
    path = tmp_path / "holes.tif"
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    src = [Source(path, nodata=0, name="source1")]
    a = serve(src, model, tmp_path / "a.tif", fullyconv=True, spcscale=0.5, tile_size=32,
              quiet=True)
    b = serve(src, model, tmp_path / "b.tif", fullyconv=True, spcscale=0.5, tile_size=32,
              tile_batch=4, quiet=True)
    assert a.skipped_tiles == b.skipped_tiles > 0
    np.testing.assert_array_equal(read(a.path), read(b.path))


def test_groups_keep_order_and_size():
    tiles = [Tile(i, (c, 0, w, 8), (c, 0, w, 8))
             for i, (c, w) in enumerate(((0, 8), (8, 8), (16, 8), (24, 3)))]
    groups = batches_of(tiles, 2)
    assert [len(g) for g in groups] == [2, 1, 1]
    assert [t for g in groups for t in g] == tiles


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_tile_batch_is_one_line(case, tmp_path, value):
    scene, model = case
    with pytest.raises(InputError, match=rf"tile_batch: {value!r} must be an integer"):
        serve([Source(scene.img_10m, name="source1")], model, tmp_path / "x.tif",
              fullyconv=True, spcscale=0.5, tile_batch=value, quiet=True)
    assert not (tmp_path / "x.tif").exists()
