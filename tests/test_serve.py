"""ModelServe: invariants I2–I5, hand-computed georeference, ranks, nodata, pixel types, box."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.engines import KerasEngine
from terrapatch.errors import GeometryError
from terrapatch.raster import Source
from terrapatch.serve import plan_tiles, prepare_serve, serve
from terrapatch.testing import assert_same_map, coordinate_raster, read_raster, write_raster
from terrapatch.testing.models import (
    RecordingEngine,
    dense_patch_model,
    identity_model,
    norm_model,
    scale_model,
    seed_model,
    unet_model,
)

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"


def t10(x0=L, y0=T):
    return Affine(10.0, 0.0, x0, 0.0, -10.0, y0)


def t20(x0=L, y0=T):
    return Affine(20.0, 0.0, x0, 0.0, -20.0, y0)


def write_pair(directory, n20, seed=0, x0_10=L):
    """A 10 m (4 bands) / 20 m (6 bands) pair of random reflectances on nested grids."""
    rng = np.random.default_rng(seed)
    p10 = write_raster(directory / f"s10_{n20}_{seed}.tif",
                       rng.integers(0, 10000, (4, 2 * n20, 2 * n20), dtype=np.uint16),
                       t10(x0_10), CRS)
    p20 = write_raster(directory / f"s20_{n20}_{seed}.tif",
                       rng.integers(0, 10000, (6, n20, n20), dtype=np.uint16), t20(), CRS)
    return p10, p20


def sources_q1(p10, p20, rf=True):
    """Seed Q1: 20 m as source1."""
    return [Source(p20, 8 if rf else None, placeholder="input_20m", name="source1"),
            Source(p10, 16 if rf else None, placeholder="input_10m", name="source2")]


def sources_q2(p10, p20, rf=True):
    """Seed Q1 switched: 10 m as source1 (with spcscale 2)."""
    return [Source(p10, 16 if rf else None, placeholder="input_10m", name="source1"),
            Source(p20, 8 if rf else None, placeholder="input_20m", name="source2")]


@pytest.fixture(scope="module")
def seed():
    return KerasEngine.from_model(seed_model(seed=1))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), 48)


OUTS = ["estimated", "features", "estimated_labels"]


# ------------------------------------------------------------------------- I3 / I5


def test_i3_i5_four_seed_variants_give_one_grid_and_one_map(seed, pair, tmp_path):
    p10, p20 = pair
    maps = {}
    for name, srcs, f in (("q1", sources_q1(p10, p20), 1), ("q2", sources_q2(p10, p20), 2)):
        for fc in (False, True):
            s = serve(srcs, seed, tmp_path / f"{name}_{fc}.tif", output_names=OUTS,
                      fullyconv=fc, spcscale=f, quiet=True)
            assert s.bands == 6 + 64 + 1
            maps[(name, fc)] = read_raster(s.path)
    ref, ref_t, _, ref_crs = maps[("q1", False)][:4]
    # Hand computation: 20 m cell j reads 20 m cols j-4..j+3 and 10 m cols 2j-8..2j+7,
    # all inside for j = 4..44 -> 41 pixels starting at x = L + 4*20.
    assert ref_t == Affine(20.0, 0.0, L + 80, 0.0, -20.0, T - 80)
    assert ref.shape == (71, 41, 41)
    assert ref_crs.to_epsg() == 32631
    for key, (values, transform, _, crs, *_) in maps.items():
        assert transform == ref_t, key
        assert crs == ref_crs
        np.testing.assert_allclose(values[:70], ref[:70], atol=2e-5, err_msg=str(key))
        probs = ref[:6]
        top2 = np.sort(probs, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-4
        assert np.array_equal(values[70][clear], ref[70][clear]), key
    # The map is not trivially constant.
    assert ref[:6].std(axis=(1, 2)).max() > 1e-4


def test_automatic_geometry_matches_the_seed_values(seed, pair, tmp_path):
    p10, p20 = pair
    for fc in (False, True):
        job = prepare_serve(sources_q1(p10, p20, rf=False), seed, "estimated", fullyconv=fc)
        assert job.derived
        assert job.geometry.fields == ((8, 8), (16, 16))
        assert job.geometry.efield == (1, 1)
        job2 = prepare_serve(sources_q2(p10, p20, rf=False), seed, "estimated",
                             fullyconv=fc, spcscale=2)
        assert job2.geometry.fields == ((16, 16), (8, 8))
    explicit = serve(sources_q1(p10, p20), seed, tmp_path / "explicit.tif", "features",
                     fullyconv=True, quiet=True)
    auto = serve(sources_q1(p10, p20, rf=False), seed, tmp_path / "auto.tif", "features",
                 fullyconv=True, quiet=True)
    assert not explicit.derived and auto.derived
    assert_same_map(explicit.path, auto.path)


def test_static_input_size_gives_the_patch_size(tmp_path):
    rng = np.random.default_rng(0)
    src = write_raster(tmp_path / "two.tif", rng.random((2, 20, 30), dtype=np.float32), t10())
    model = dense_patch_model(bands=2, patch=5)
    s = serve([Source(src)], model, tmp_path / "d.tif", quiet=True)
    assert s.geometry.fields == ((5, 5),) and s.derived
    values = read_raster(s.path).values
    assert values.shape == (3, 16, 26)
    # Pixel (0, 0) is the model applied to the 5x5 patch at the top-left corner.
    with rasterio.open(src) as ds:
        patch = ds.read(window=((0, 5), (0, 5))).transpose(1, 2, 0)[None]
    expected = np.asarray(model({"x": patch})["y"])[0]
    np.testing.assert_allclose(values[:, 0, 0], expected, atol=1e-5)


# ------------------------------------------------------------------------- I4


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("bigpair"), 100, seed=5)


def test_i4_tiling_invariance_fcn(seed, big_pair, tmp_path):
    p10, p20 = big_pair
    full = None
    for tile in (333, 64, 16):
        s = serve(sources_q1(p10, p20), seed, tmp_path / f"t{tile}.tif", "estimated",
                  fullyconv=True, tile_size=tile, quiet=True)
        assert s.tiles == {333: 1, 64: 4, 16: 36}[tile]
        values = read_raster(s.path).values
        if full is None:
            full, full_t = values, s.transform
            assert values.shape == (6, 93, 93)
        np.testing.assert_allclose(values, full, atol=2e-6, err_msg=f"tile {tile}")
        boxed = serve(sources_q1(p10, p20), seed, tmp_path / f"b{tile}.tif", "estimated",
                      fullyconv=True, tile_size=tile, box=(5, 7, 50, 40), quiet=True)
        bvalues, btransform = read_raster(boxed.path)[:2]
        assert bvalues.shape == (6, 40, 50)
        assert btransform == full_t @ Affine.translation(5, 7)
        np.testing.assert_allclose(bvalues, full[:, 7:47, 5:55], atol=2e-6)


def test_i4_tiling_invariance_patch_based(seed, pair, tmp_path):
    p10, p20 = pair
    ref = read_raster(serve(sources_q1(p10, p20), seed, tmp_path / "pb.tif", "estimated",
                      tile_size=(64, 64), quiet=True).path).values
    for tile, box in ((16, None), (7, (3, 2, 20, 33)), ((333, 5), (0, 30, 41, 11))):
        s = serve(sources_q1(p10, p20), seed, tmp_path / "pbt.tif", "estimated",
                  tile_size=tile, box=box, quiet=True)
        bx, by, bw, bh = box or (0, 0, 41, 41)
        np.testing.assert_allclose(read_raster(s.path).values, ref[:, by:by + bh, bx:bx + bw],
                                   atol=2e-6)


def test_plan_tiles_cover_the_box_once():
    tiles = plan_tiles(100, 90, (5, 7, 50, 40), (16, 16), (4, 4))
    covered = np.zeros((90, 100), dtype=int)
    for t in tiles:
        c, r, w, h = t.target
        covered[r:r + h, c:c + w] += 1
        wc, wr, ww, wh = t.window
        assert wc % 4 == 0 and wr % 4 == 0 and ww % 4 == 0 and wh % 4 == 0
        assert wc <= c and wr <= r and c + w <= wc + ww and r + h <= wr + wh
    assert covered[7:47, 5:55].min() == 1 and covered.sum() == 50 * 40


# ------------------------------------------------------------------------- expression field


def test_efield_with_crop_output_matches_in_memory_model(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 200, (3, 100, 100)).astype(np.float32)
    src = write_raster(tmp_path / "img.tif", image, t10(), CRS)
    model = unet_model(bands=3, crop=16)
    full = np.asarray(model({"input": image.transpose(1, 2, 0)[None]})["estimated"])[0]
    maps = {}
    for tile in (32, 64, 40):
        s = serve([Source(src, 64)], model, tmp_path / f"u{tile}.tif", "estimated_crop16",
                  fullyconv=True, efield=32, tile_size=tile, quiet=True)
        # OTBTF's worked example: RF 64, EF 32 -> gt0 = L + 160, 64x64.
        assert s.transform == Affine(10.0, 0.0, L + 160, 0.0, -10.0, T - 160)
        assert (s.width, s.height) == (64, 64)
        assert s.tile_size == ({40: (64, 64)}.get(tile, (tile, tile)))
        maps[tile] = read_raster(s.path).values
        np.testing.assert_allclose(maps[tile].transpose(1, 2, 0), full[16:80, 16:80],
                                   atol=1e-5)
    auto = serve([Source(src)], model, tmp_path / "uauto.tif", "estimated_crop16",
                 fullyconv=True, quiet=True)
    assert auto.derived and auto.geometry.efield == (2, 2)
    assert auto.geometry.fields == ((34, 34),)
    assert auto.transform == Affine(10.0, 0.0, L + 160, 0.0, -10.0, T - 160)
    np.testing.assert_allclose(read_raster(auto.path).values[:, :64, :64], maps[32], atol=1e-5)
    # rf given without ef: the expression field is derived to match it (OTBTF needs 32).
    fitted = prepare_serve([Source(src, 64)], model, "estimated_crop16", fullyconv=True)
    assert fitted.geometry.efield == (32, 32)


# ------------------------------------------------------------------------- geometry by hand


@pytest.mark.parametrize(("rf", "x0", "size"), [(16, L + 80, 85), (33, L + 160, 68)])
def test_single_source_grid_by_hand(tmp_path, rf, x0, size):
    src = write_raster(tmp_path / "one.tif", np.ones((1, 100, 100), np.float32), t10(), CRS)
    s = serve([Source(src)], dense_patch_model(bands=1, patch=rf), tmp_path / "o.tif",
              quiet=True)
    assert s.geometry.fields == ((rf, rf),)
    assert s.transform == Affine(10.0, 0.0, x0, 0.0, -10.0, T - (x0 - L))
    assert (s.width, s.height) == (size, size)


def test_spcscale_subsamples_source1_pixels(tmp_path):
    src = coordinate_raster(tmp_path / "coords.tif", 23, 17, t10(), CRS)
    s = serve([Source(src, 1)], identity_model(bands=2), tmp_path / "sub.tif", spcscale=2,
              quiet=True)
    values, transform = read_raster(s.path)[:2]
    # Cell k of G reads source pixel 2k (its reference pixel); grid lines on source1's.
    assert transform == Affine(20.0, 0.0, L, 0.0, -20.0, T)
    assert values.shape == (2, 9, 12)
    assert np.array_equal(values[0], np.tile(np.arange(0, 23, 2), (9, 1)))
    assert np.array_equal(values[1], np.tile(np.arange(0, 17, 2)[:, None], (1, 12)))


@pytest.mark.parametrize("fullyconv", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_identity_models_of_every_output_rank(tmp_path, rank, fullyconv):
    bands = 1 if rank in (1, 3) else 2
    rng = np.random.default_rng(rank)
    data = rng.normal(size=(bands, 17, 23)).astype(np.float32)
    src = write_raster(tmp_path / "in.tif", data, t10(), CRS)
    s = serve([Source(src, 1)], identity_model(bands=bands, rank=rank), tmp_path / "id.tif",
              fullyconv=fullyconv, efield=1, tile_size=(8, 5), quiet=True)
    values, transform = read_raster(s.path)[:2]
    assert transform == t10()
    assert np.array_equal(values, data)


def test_box_is_in_output_grid_pixels(tmp_path):
    src = coordinate_raster(tmp_path / "coords.tif", 30, 20, t10(), CRS)
    model = identity_model(bands=2)
    # RF 1: output pixel (i, j) is source pixel (i, j); box (3, 4, 5, 6) is cols 3..7.
    s = serve([Source(src, 1)], model, tmp_path / "b.tif", box=(3, 4, 5, 6), quiet=True)
    values, transform = read_raster(s.path)[:2]
    assert transform == Affine(10.0, 0.0, L + 30, 0.0, -10.0, T - 40)
    assert values.shape == (2, 6, 5)
    assert values[0, 0].tolist() == [3, 4, 5, 6, 7] and values[1, :, 0].tolist() == list(
        range(4, 10))
    cropped = serve([Source(src, 1)], model, tmp_path / "c.tif", box=(-2, 15, 5, 50),
                    quiet=True)
    assert cropped.box == (0, 15, 3, 5)
    assert read_raster(cropped.path).values.shape == (2, 5, 3)
    with pytest.raises(GeometryError, match=r"box=30:0:5:5 does not overlap the output grid "
                                            r"\(30×20"):
        serve([Source(src, 1)], model, tmp_path / "d.tif", box=(30, 0, 5, 5), quiet=True)
    assert not (tmp_path / "d.tif").exists()


# ------------------------------------------------------------------------- nodata, types


def test_nodata_tiles_are_skipped_and_filled_with_bv(tmp_path):
    """OTBTF's nodata test: y = ||x||2, RF = EF = tile = 4, bv 1024."""
    rng = np.random.default_rng(4)
    data = rng.uniform(1, 10, (3, 16, 20)).astype(np.float32)
    data[:, 0:4, 0:4] = 0  # one aligned 4x4 block
    data[:, 8:16, 0:8] = 0  # four aligned 4x4 blocks = one aligned 8x8 block
    data[:, 13, 17] = 0  # one pixel only: computed (norm 0), never skipped
    src = write_raster(tmp_path / "nd.tif", data, t10(), CRS)
    s = serve([Source(src, 4, nodata=0)], norm_model(bands=3), tmp_path / "norm.tif",
              fullyconv=True, efield=4, tile_size=4, background=1024, quiet=True)
    assert s.tiles == 20 and s.skipped_tiles == 5
    values, transform, _, _, nodata = read_raster(s.path)[:5]
    assert transform == t10() and nodata == 1024
    expected = np.sqrt((data.astype(np.float64) ** 2).sum(axis=0))
    expected[0:4, 0:4] = 1024
    expected[8:16, 0:8] = 1024
    np.testing.assert_allclose(values[0], expected, rtol=1e-6)
    assert values[0, 13, 17] == 0
    # With 8x8 tiles the first block shares its tile with data: OTBTF's chunk-level rule.
    s2 = serve([Source(src, 4, nodata=0)], norm_model(bands=3), tmp_path / "norm8.tif",
               fullyconv=True, efield=4, tile_size=8, background=1024, quiet=True)
    assert s2.skipped_tiles == 1
    values8 = read_raster(s2.path).values[0]
    assert values8[0:4, 0:4].max() == 0 and values8[8:16, 0:8].min() == 1024
    # Without output.bv: skipped tiles are 0 and the map has no nodata value.
    s3 = serve([Source(src, 4, nodata=0)], norm_model(bands=3), tmp_path / "norm0.tif",
               fullyconv=True, efield=4, tile_size=4, quiet=True)
    values0, _, _, _, nodata0 = read_raster(s3.path)[:5]
    assert nodata0 is None and values0[0, 0:4, 0:4].max() == 0


def test_pixel_type_clamps_then_truncates_or_rounds(tmp_path):
    data = np.array([[[-3.7, 0.9, 255.6, 300.0, 1.5, -0.5]]], dtype=np.float32)
    src = write_raster(tmp_path / "v.tif", data, t10(), CRS)
    model = identity_model(bands=1)
    cases = [("uint8", False, [0, 0, 255, 255, 1, 0]),
             ("uint8", True, [0, 1, 255, 255, 2, 0]),
             ("int16", False, [-3, 0, 255, 300, 1, 0]),
             ("float32", False, [-3.7, 0.9, 255.6, 300.0, 1.5, -0.5])]
    for pixel_type, rounding, expected in cases:
        s = serve([Source(src, 1)], model, tmp_path / "p.tif", pixel_type=pixel_type,
                  rounding=rounding, quiet=True)
        values, _, dtype = read_raster(s.path)[:3]
        assert dtype == pixel_type
        np.testing.assert_allclose(values[0, 0], np.array(expected, dtype=pixel_type))


def test_user_placeholders_are_fed_every_batch(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    src = write_raster(tmp_path / "x.tif", data, t10(), CRS)
    for fc in (False, True):
        s = serve([Source(src, 1)], scale_model(), tmp_path / "s.tif", "y", fullyconv=fc,
                  efield=1, user_placeholders={"scale": np.array([2.5], np.float32)},
                  tile_size=3, quiet=True)
        np.testing.assert_allclose(read_raster(s.path).values, data * 2.5)


def test_creation_options_and_layout_of_the_file(seed, pair, tmp_path):
    p10, p20 = pair
    s = serve(sources_q1(p10, p20), seed, tmp_path / "co.tif", "estimated_labels",
              fullyconv=True, pixel_type="uint8", creation_options={"COMPRESS": "LZW"},
              quiet=True)
    with rasterio.open(s.path) as ds:
        assert ds.compression.name.lower() == "lzw"
        assert ds.count == 1 and ds.dtypes[0] == "uint8"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ------------------------------------------------------------------------- I2


@pytest.mark.parametrize("source1", ["10m", "20m"])
def test_i2_extracted_patches_are_what_patch_based_serving_feeds(tmp_path, source1):
    from terrapatch import extraction
    from terrapatch.patches import read_patches
    from terrapatch.testing import make_scene
    from terrapatch.vector import write_points

    scene = make_scene(tmp_path / "scene", size=128, n_points=10, seed=7)
    rng = np.random.default_rng(11)
    n = 40
    px = rng.uniform(20, 80, n)  # inside, away from the nodata swath on the right
    py = rng.uniform(10, 118, n)
    px[:4] = [20.0, 40.0, 41.0, 60.5]  # exact pixel corners and edges too
    py[:4] = [20.0, 21.0, 40.0, 60.0]
    x = scene.transform_10m.c + px * 10.0
    y = scene.transform_10m.f - py * 10.0
    pts = write_points(tmp_path / "pts.gpkg", x, y, {"class": np.zeros(n, np.int64)},
                       crs=scene.crs)

    def sources():
        s10 = Source(scene.img_10m, 16, placeholder="input_10m", name="s10")
        s20 = Source(scene.img_20m, 8, placeholder="input_20m", name="s20")
        return [s10, s20] if source1 == "10m" else [s20, s10]

    outs = [tmp_path / "p_a.tif", tmp_path / "p_b.tif"]
    summary = extraction.extract_patches(sources(), pts, "class", outs, quiet=True)
    assert summary.n_collected == n
    extracted = {src.placeholder: read_patches(out) for src, out in zip(sources(), outs,
                                                                        strict=True)}
    recorder = RecordingEngine(KerasEngine.from_model(seed_model()))
    s = serve(sources(), None, tmp_path / "map.tif", "estimated", spcscale=2 if
              source1 == "10m" else 1, disable_tiling=True, engine=recorder, quiet=True)
    (batch,) = recorder.data_feeds  # one tile: one batch, pixels in row-major order
    inv = ~s.transform
    for k in range(n):
        col, row = (int(np.floor(v)) for v in inv @ (x[k], y[k]))
        index = row * s.width + col
        for name in ("input_10m", "input_20m"):
            np.testing.assert_array_equal(batch[name][index], extracted[name][k],
                                          err_msg=f"sample {k} {name}")


def test_a_tile_is_an_independent_picklable_task(tmp_path, pair):
    """TileRunner: tile -> array with no shared state, so tiles can be distributed."""
    import pickle

    p10, p20 = pair
    model_path = tmp_path / "seed.keras"
    seed_model(seed=1).save(model_path)
    job = prepare_serve(sources_q1(p10, p20), model_path, "estimated", fullyconv=True,
                        tile_size=16)
    full = read_raster(job.run(tmp_path / "m.tif", quiet=True).path).values
    runner = pickle.loads(pickle.dumps(job.runner))  # opens its own readers and engine
    for tile in (job.tiles[0], job.tiles[-1], job.tiles[4]):
        values = runner(tile)
        c, r, w, h = tile.target
        np.testing.assert_allclose(values.transpose(2, 0, 1), full[:, r:r + h, c:c + w],
                                   atol=2e-6)
    runner.close()


def test_patch_based_default_tile_bounded_by_batch_bytes():
    from terrapatch.serve import DEFAULT_TILE_PB, PB_BATCH_BYTES, ModelGeometry
    from terrapatch.serve.plan import _pb_default_tile

    class Big:
        bands = 13

    geometry = ModelGeometry(fields=((64, 64),), efield=(1, 1), spcscale=1)
    side = _pb_default_tile([Big()], geometry)
    assert side < DEFAULT_TILE_PB
    assert side * side * 64 * 64 * 13 * 4 <= PB_BATCH_BYTES < (side + 1) ** 2 * 64 * 64 * 13 * 4
