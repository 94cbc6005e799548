"""TorchEngine: nn.Module, .pt2 and .pt models served like the module itself; names; errors; device.

Every map of a two-source 10 m / 20 m scene is compared with the module applied to
the whole rasters in memory, in patch-based and fully-convolutional modes, so that
the channels-first conversion, the input names and the geometry are all checked at
once. Errors are checked to be one line naming the parameter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil
import sys

import numpy as np
import pytest
import rasterio
from affine import Affine

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from terrapatch.engines import load_engine  # noqa: E402
from terrapatch.errors import InputError, ModelError  # noqa: E402
from terrapatch.pytorch import TorchEngine, export_onnx, save_program  # noqa: E402
from terrapatch.raster import Source  # noqa: E402
from terrapatch.serve import ChannelsFirstEngine, prepare_serve, serve  # noqa: E402
from terrapatch.testing.rasters import write_raster  # noqa: E402

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
N20 = 20  # 20 m pixels per side (the 10 m raster is twice as large)
RF10, RF20 = 8, 4
SPECS = {"x10": (4, RF10), "x20": (6, RF20)}


class TwoBranch(nn.Module):
    """10 m branch (1 × 1 conv, 2 × 2 mean) and 20 m branch, concatenated; valid 4 × 4 head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.b10 = nn.Sequential(nn.Conv2d(4, 5, 1), nn.ReLU(), nn.AvgPool2d(2))
        self.b20 = nn.Sequential(nn.Conv2d(6, 5, 1), nn.ReLU())
        self.head = nn.Conv2d(10, classes, RF20)

    def forward(self, x10: torch.Tensor, x20: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.cat([self.b10(x10), self.b20(x20)], 1))
        return {"logits": logits, "prob": logits.softmax(1)}


class DictInput(nn.Module):
    """The same network taking one dict of tensors and returning one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TwoBranch()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(inputs["x10"], inputs["x20"])["logits"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 10 m (4 bands) / 20 m (6 bands) pair of random reflectances on nested grids."""
    directory = tmp_path_factory.mktemp("torch_pair")
    rng = np.random.default_rng(0)
    p10 = write_raster(directory / "s10.tif",
                       rng.integers(0, 1000, (4, 2 * N20, 2 * N20), dtype=np.uint16),
                       Affine(10.0, 0.0, L, 0.0, -10.0, T), CRS)
    p20 = write_raster(directory / "s20.tif",
                       rng.integers(0, 1000, (6, N20, N20), dtype=np.uint16),
                       Affine(20.0, 0.0, L, 0.0, -20.0, T), CRS)
    return p10, p20


@pytest.fixture(scope="module")
def module():
    return TwoBranch().eval()


@pytest.fixture(scope="module")
def files(module, tmp_path_factory):
    directory = tmp_path_factory.mktemp("torch_models")
    pt2 = save_program(module, directory / "two.pt2", SPECS)
    pt = directory / "two.pt"
    torch.jit.save(torch.jit.script(module), pt)
    return {"pt2": pt2, "pt": pt}


def sources(p10, p20, rf=True, placeholders=("x20", "x10")):
    """20 m as source1 (output on the 20 m grid), 10 m as source2."""
    return [Source(p20, RF20 if rf else None, placeholder=placeholders[0], name="source1"),
            Source(p10, RF10 if rf else None, placeholder=placeholders[1], name="source2")]


def expected_map(module, p10, p20, output="logits"):
    """The module on the whole rasters: (classes, rows, cols) on the 20 m grid, inset by rf/2."""
    with rasterio.open(p10) as a, rasterio.open(p20) as b:
        x10 = torch.from_numpy(a.read().astype(np.float32))[None]
        x20 = torch.from_numpy(b.read().astype(np.float32))[None]
    with torch.no_grad():
        result = module({"x10": x10, "x20": x20}) if isinstance(module, DictInput) else module(
            x10, x20)
    return (result[output] if isinstance(result, dict) else result)[0].numpy()


def assert_map_is_the_module(path, full, tol=1e-5):
    with rasterio.open(path) as ds:
        got, transform = ds.read(), ds.transform
    col = round((transform.c - L) / 20.0) - RF20 // 2  # first window's column, 20 m pixels
    row = round((T - transform.f) / 20.0) - RF20 // 2
    assert got.shape[0] == full.shape[0] and got.shape[1] > 0
    np.testing.assert_allclose(got, full[:, row:row + got.shape[1], col:col + got.shape[2]],
                               rtol=tol, atol=tol)


# ------------------------------------------------------------------------- serving


@pytest.mark.parametrize("kind", ["module", "pt2", "pt"])
@pytest.mark.parametrize("fullyconv", [False, True])
def test_every_kind_serves_the_module_itself(module, files, pair, kind, fullyconv, tmp_path):
    model = module if kind == "module" else files[kind]
    out = serve(sources(*pair), model, tmp_path / "map.tif", "logits", fullyconv=fullyconv,
                tile_size=8, quiet=True)
    assert_map_is_the_module(out.path, expected_map(module, *pair))


def test_serving_wraps_the_channels_first_engine_once(module, pair):
    job = prepare_serve(sources(*pair), module, "prob", fullyconv=True)
    assert isinstance(job.engine, ChannelsFirstEngine)
    assert isinstance(job.engine.inner, TorchEngine)
    # An engine given as is, or the nchw layout given explicitly: still one conversion.
    again = prepare_serve(sources(*pair), module, "prob", fullyconv=True,
                          engine=TorchEngine(module), model_layout="nchw")
    assert isinstance(again.engine.inner, TorchEngine)


@pytest.mark.parametrize("fullyconv", [False, True])
def test_receptive_fields_are_derived_from_a_torch_model(module, pair, fullyconv):
    job = prepare_serve(sources(*pair, rf=False), module, "logits", fullyconv=fullyconv)
    assert job.derived
    assert job.geometry.fields == ((RF20, RF20), (RF10, RF10))
    assert job.geometry.efield == (1, 1)


def test_dict_input_module_serves_by_key(pair, tmp_path):
    model = DictInput().eval()
    engine = load_engine(model)
    assert engine.input_names == ("x10", "x20") and engine.output_names == ("output",)
    out = serve(sources(*pair), model, tmp_path / "d.tif", "output", fullyconv=True,
                quiet=True)
    assert_map_is_the_module(out.path, expected_map(model, *pair))


# ------------------------------------------------------------------------- names


def test_names_of_arguments_dicts_and_outputs(module, files):
    for model in (module, files["pt2"], files["pt"]):
        engine = load_engine(model)
        assert isinstance(engine, TorchEngine) and engine.layout == "nchw"
        assert engine.input_names == ("x10", "x20")
        assert engine.output_names == ("logits", "prob")
    program = load_engine(files["pt2"])
    assert program.inputs["x10"].shape == (None, 4, None, None)  # static channels
    assert load_engine(module).inputs["x10"].shape is None  # nn.Module: no static shapes

    class Tuple(nn.Module):
        def forward(self, a, b, scale=2.0):  # an argument with a default is not an input
            return a * scale, b + 1

    engine = load_engine(Tuple())
    assert engine.input_names == ("a", "b")
    assert engine.output_names == ("output_0", "output_1")
    result = engine.run({"a": np.ones((1, 1, 2, 2)), "b": np.zeros((1, 1, 2, 2))},
                        ["output_1", "output_0"])
    np.testing.assert_array_equal(result["output_0"], 2.0)
    np.testing.assert_array_equal(result["output_1"], 1.0)
    single = load_engine(nn.Conv2d(2, 1, 1))
    assert single.input_names == ("input",) and single.output_names == ("output",)
    assert single.resolve_output("output_0") == "output"
    named = TorchEngine(Tuple(), output_names=["double", "plus_one"])
    assert named.run({"a": np.ones((1, 1, 1, 1)), "b": np.ones((1, 1, 1, 1))},
                     ["plus_one"])["plus_one"].item() == 2.0


def test_dict_input_of_programs_and_scripts(tmp_path):
    model = DictInput().eval()
    feed = {"x10": np.ones((1, 4, 8, 8), np.float32), "x20": np.ones((1, 6, 4, 4), np.float32)}
    reference = load_engine(model).run(feed, ["output"])["output"]
    pt2 = save_program(model, tmp_path / "d.pt2", SPECS)
    pt = tmp_path / "d.pt"
    torch.jit.save(torch.jit.script(model), pt)
    for path in (pt2, pt):
        engine = load_engine(path)
        assert engine.input_names == ("x10", "x20"), path
        np.testing.assert_allclose(engine.run(feed, ["output"])["output"], reference, rtol=1e-6)


# ------------------------------------------------------------------------- errors


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


def test_argument_names_matching_no_placeholder(module, pair):
    with pytest.raises(ModelError) as err:
        prepare_serve(sources(*pair, placeholders=("input_20m", "input_10m")), module, "logits")
    text = one_line(err)
    assert "source1.placeholder" in text and "'input_20m'" in text
    assert "x10" in text and "x20" in text


def test_a_pt2_that_is_not_a_program(files, tmp_path):
    script = tmp_path / "script.pt2"
    shutil.copy(files["pt"], script)
    with pytest.raises(ModelError) as err:
        load_engine(script)
    assert "TorchScript" in one_line(err) and "name it .pt" in one_line(err)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelError) as err:
        load_engine(garbage)
    assert one_line(err).startswith("model: ") and "not a zip archive" in one_line(err)
    state = tmp_path / "weights.pt"
    torch.save(TwoBranch().state_dict(), state)
    with pytest.raises(ModelError) as err:
        load_engine(state)
    assert "state dict" in one_line(err)
    program = tmp_path / "program.pt"
    shutil.copy(files["pt2"], program)
    with pytest.raises(ModelError) as err:
        load_engine(program)
    assert "name it .pt2" in one_line(err)


def test_unnamed_dict_keys_and_var_arguments():
    class Branchy(nn.Module):
        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            if inputs["a"].sum() > 0:  # data-dependent: fx cannot trace it
                return inputs["a"]
            return inputs["b"]

    with pytest.raises(ModelError) as err:
        load_engine(Branchy())
    assert "input_keys" in one_line(err) and "'inputs'" in one_line(err)
    engine = TorchEngine(Branchy(), input_keys={"inputs": ["a", "b"]})
    assert engine.input_names == ("a", "b")

    class Star(nn.Module):
        def forward(self, *tensors):
            return tensors[0]

    with pytest.raises(ModelError) as err:
        load_engine(Star())
    assert "*tensors" in one_line(err)


def test_device(module, tmp_path):
    assert TorchEngine(module, device="cpu").device == "cpu"
    assert TorchEngine(module, device="auto").device == ("cuda" if torch.cuda.is_available()
                                                         else "cpu")
    with pytest.raises(InputError) as err:
        load_engine(module, device="gpu")
    assert "device" in one_line(err) and "'gpu'" in one_line(err)
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU error cannot be checked")
    with pytest.raises(InputError) as err:
        load_engine(module, device="cuda")
    assert one_line(err).startswith("device: 'cuda'")
    onnx_path = export_onnx(module, tmp_path / "m.onnx", SPECS)
    assert load_engine(onnx_path, device="cpu").device == "cpu"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError) as err:
            load_engine(onnx_path, device="cuda")
        assert one_line(err).startswith("device: 'cuda'") and "onnxruntime" in one_line(err)


def test_torch_is_never_imported_for_other_models(tmp_path):
    import subprocess

    code = ("import sys; from terrapatch.engines import load_engine\n"
            "try:\n    load_engine(object())\nexcept Exception:\n    pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------- ONNX export


def test_onnx_export_round_trip_serves_like_the_module(module, pair, tmp_path):
    path = export_onnx(module, tmp_path / "two.onnx", SPECS)
    engine = load_engine(path)
    assert engine.input_names == ("x10", "x20") and set(engine.output_names) == {"logits",
                                                                                  "prob"}
    assert engine.inputs["x20"].shape == (None, 6, None, None)  # channels first, free sizes
    out = serve(sources(*pair), path, tmp_path / "onnx.tif", "logits", fullyconv=True,
                quiet=True)
    assert_map_is_the_module(out.path, expected_map(module, *pair), tol=1e-4)  # other kernels
    with pytest.raises(InputError) as err:
        export_onnx(module, tmp_path / "bad.onnx", {"x10": (4, 8)})
    assert "inputs" in one_line(err) and not (tmp_path / "bad.onnx").exists()


def test_without_torch_the_error_names_the_extra(files, monkeypatch):
    from terrapatch.errors import MissingEngineError

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingEngineError) as err:
        load_engine(files["pt2"])
    assert "pip install 'terrapatch[torch]'" in one_line(err)
    assert one_line(err).startswith("model: ")
