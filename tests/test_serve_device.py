"""``device`` (``--device``): where serving runs the model; the CPU path of the GPU code."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import rasterio

from terrapatch.cli import main
from terrapatch.engines import load_engine
from terrapatch.errors import InputError
from terrapatch.raster import Source
from terrapatch.serve import prepare_serve, serve
from terrapatch.serve.plan import GPU_TILE_BATCH
from terrapatch.testing import make_scene
from terrapatch.testing.onnx_models import super_resolution_onnx

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device")
    scene = make_scene(folder, size=64, n_points=10)
    model = super_resolution_onnx(folder / "sr.onnx", bands=(4,), factors=(2,), names=("x",))
    return scene, model


def test_cpu_and_auto_give_one_map(case, tmp_path):
    scene, model = case
    src = [Source(scene.img_10m, name="source1")]
    maps = []
    for device in ("cpu", "auto", "CPU"):
        s = serve(src, model, tmp_path / f"{device}.tif", fullyconv=True, spcscale=0.5,
                  device=device, quiet=True)
        with rasterio.open(s.path) as ds:
            maps.append(ds.read())
    for other in maps[1:]:
        np.testing.assert_array_equal(other, maps[0])


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    scene, model = case
    with pytest.raises(InputError, match=r"^device: 'cuda' asked, but onnxruntime .* finds "
                                         r"no CUDA GPU here") as info:
        serve([Source(scene.img_10m, name="source1")], model, tmp_path / "x.tif",
              fullyconv=True, spcscale=0.5, device="cuda", quiet=True)
    assert "\n" not in str(info.value)
    rc = main(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-model.dir",
               str(model), "-model.fullyconv", "on", "-output.spcscale", "0.5", "-out",
               str(tmp_path / "x.tif"), "--device", "cuda"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1 and "device: 'cuda'" in err[0]
    assert not list(tmp_path.iterdir())


def test_bad_device_names_the_choices(case, tmp_path):
    scene, model = case
    with pytest.raises(InputError, match=r"device: 'tpu' is not a device; expected one of "
                                         r"auto, cpu, cuda"):
        serve([Source(scene.img_10m, name="source1")], model, tmp_path / "x.tif",
              fullyconv=True, spcscale=0.5, device="tpu", quiet=True)


def test_tile_batch_default_follows_the_engine_device(case):
    scene, model = case
    src = [Source(scene.img_10m, name="source1")]
    engine = load_engine(model, device="cpu")
    assert engine.device == "cpu"
    assert prepare_serve(src, model, fullyconv=True, spcscale=0.5, engine=engine).tile_batch == 1
    engine.device = "cuda"  # the GPU path of the same code, on a CPU engine
    job = prepare_serve(src, model, fullyconv=True, spcscale=0.5, engine=engine)
    assert job.tile_batch == GPU_TILE_BATCH
    assert prepare_serve(src, model, fullyconv=True, spcscale=0.5, engine=engine,
                         tile_batch=2).tile_batch == 2


def test_device_on_an_application_without_a_model_warns(case, tmp_path, capsys):
    scene, _ = case
    rc = main(["PatchesSelection", "-in", str(scene.img_10m), "-grid.step", "16",
               "-grid.psize", "16", "-outtrain", str(tmp_path / "t.gpkg"), "-outvalid",
               str(tmp_path / "v.gpkg"), "--device", "cpu"])
    assert rc == 0
    assert "--device is ignored" in capsys.readouterr().err
