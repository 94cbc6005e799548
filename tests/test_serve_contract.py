"""Serving a self-describing model: the recorded contract fills what the caller leaves out."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from terrapatch.cli import main
from terrapatch.contract import (
    ContractClass,
    ContractInput,
    ContractOutput,
    Framework,
    ServingContract,
    write_contract,
)
from terrapatch.errors import InputError, ModelError
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.serve.transforms import Normalization
from terrapatch.testing import make_scene
from terrapatch.testing.markers import requires_onnx
from terrapatch.testing.onnx_models import conv_onnx
from terrapatch.writer import read_category_names

pytestmark = requires_onnx

CLASSES = (ContractClass(0, "water", "#0000ff"), ContractClass(1, "crop", "#ffff00"),
           ContractClass(2, "forest", "#00aa00"))


def contract(rf10=8, rf20=4, bands20=6, scale=1.0):
    return ServingContract(
        Framework("ONNX", "1.17.0"),
        (ContractInput("input_10m", 4, (rf10, rf10), ("B04", "B03", "B02", "B08"), 10.0,
                       Normalization(scale=scale), None, "nhwc", "uint16"),
         ContractInput("input_20m", bands20, (rf20, rf20), None, 20.0, None, None, "nhwc",
                       "uint16")),
        (ContractOutput("scores", (1, 1), 2.0, 3, "float32", CLASSES),),
        kind="fully-convolutional", name="seed-like")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contract")
    scene = make_scene(folder, size=64, n_points=10)
    plain = conv_onnx(folder / "plain.onnx")
    described = conv_onnx(folder / "described.onnx")
    write_contract(described, contract())
    return scene, plain, described


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.colormap(1) if ds.count == 1 and ds.dtypes[0] == "uint8" else None


def test_the_model_alone_is_enough(case, tmp_path):
    scene, plain, described = case
    rc = main(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-source2.il",
               str(scene.img_20m), "-model.dir", str(described), "-out",
               str(tmp_path / "map.tif")])
    assert rc == 0
    # the same map as with every parameter given by hand, on the model without a contract
    explicit = serve([Source(scene.img_10m, 8, placeholder="input_10m", name="source1"),
                      Source(scene.img_20m, 4, placeholder="input_20m", name="source2")],
                     plain, tmp_path / "explicit.tif", output_names=["scores"],
                     fullyconv=True, spcscale=2, efield=1,
                     normalization=[Normalization(scale=1.0), None], quiet=True)
    values, _ = read(tmp_path / "map.tif")
    np.testing.assert_array_equal(values, read(explicit.path)[0])
    with rasterio.open(tmp_path / "map.tif") as ds:
        assert ds.transform.a == 20.0 and ds.count == 3


def test_explicit_parameters_override_the_recorded_ones(case, tmp_path):
    scene, _, described = case
    sources = [Source(scene.img_10m, name="source1"), Source(scene.img_20m, name="source2")]
    recorded = serve(sources, described, tmp_path / "a.tif", quiet=True)
    assert recorded.fullyconv and recorded.geometry.fields == ((8, 8), (4, 4))
    patch = serve(sources, described, tmp_path / "b.tif", fullyconv=False, quiet=True)
    assert not patch.fullyconv
    np.testing.assert_allclose(read(patch.path)[0], read(recorded.path)[0], atol=1e-4)
    # an explicit spcscale wins over the recorded 2 (and this model cannot serve at 1)
    with pytest.raises(ModelError, match=r"spcscale=1"):
        serve(sources, described, tmp_path / "c.tif", spcscale=1, quiet=True)
    given = serve([Source(scene.img_10m, 10, name="source1"),
                   Source(scene.img_20m, 5, name="source2")], described, tmp_path / "d.tif",
                  quiet=True)
    assert given.geometry.fields == ((10, 10), (5, 5))


def test_a_class_map_carries_the_legend(case, tmp_path):
    scene, _, described = case
    rc = main(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-source2.il",
               str(scene.img_20m), "-model.dir", str(described), "-output.argmax", "on",
               "-out", str(tmp_path / "classes.tif"), "uint8"])
    assert rc == 0
    values, colours = read(tmp_path / "classes.tif")
    assert set(np.unique(values)) <= {0, 1, 2}
    assert colours[0][:3] == (0, 0, 255) and colours[2][:3] == (0, 170, 0)
    assert read_category_names(tmp_path / "classes.tif") == ["water", "crop", "forest"]
    # a float score map gets no legend, and no error
    rc = main(["TensorflowModelServe", "-source1.il", str(scene.img_10m), "-source2.il",
               str(scene.img_20m), "-model.dir", str(described), "-out",
               str(tmp_path / "scores.tif")])
    assert rc == 0 and not (tmp_path / "scores.tif.aux.xml").exists()


def test_sources_that_do_not_match_the_contract_are_named(case, tmp_path, capsys):
    scene, _, _ = case
    wrong = conv_onnx(tmp_path / "wrong.onnx")
    write_contract(wrong, contract())
    with pytest.raises(InputError, match=r"^source2: the model's contract expects 6 bands "
                                         r"for 'input_20m', the raster has 4$"):
        serve([Source(scene.img_10m, name="source1"), Source(scene.img_10m, name="source2")],
              wrong, tmp_path / "x.tif", quiet=True)
    with pytest.raises(InputError, match=r"^sources: the model's contract records 2 input"):
        serve([Source(scene.img_10m, name="source1")], wrong, tmp_path / "x.tif", quiet=True)
    assert not (tmp_path / "x.tif").exists()


def test_a_model_without_a_contract_works_as_before(case, tmp_path):
    scene, plain, _ = case
    sources = [Source(scene.img_10m, 8, placeholder="input_10m", name="source1"),
               Source(scene.img_20m, 4, placeholder="input_20m", name="source2")]
    s = serve(sources, plain, tmp_path / "pb.tif", spcscale=2, quiet=True)
    assert not s.fullyconv and s.output_names == ("scores",)


def test_classes_files_and_export_options_refuse_bad_input_in_one_line(tmp_path):
    from terrapatch.cli.export import main as export
    from terrapatch.serve.describe import read_classes

    good = tmp_path / "classes.json"
    good.write_text('{"0": ["water", "#0000ff"], "3": "urban"}')
    assert [(c.value, c.name, c.color) for c in read_classes(good)] == [
        (0, "water", "#0000ff"), (3, "urban", None)]
    cases = {"rows.csv": ("value,name\nzero,water\n", r"'zero', 'water'.* is not value,name"),
             "empty.csv": ("value,name,color\n", r"lists no class"),
             "list.json": ("[1, 2]", r"must map class values to names"),
             "broken.json": ("{", r"is not JSON")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=rf"^classes: .*{name}.*{message}"):
            read_classes(tmp_path / name)
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    for argv, message in (
            (["--source", "input_10m"], r"--source: 'input_10m' is not of the form"),
            (["--source", "a=x.tif", "--nodata", "b=0"], r"--nodata: b is not a --source"),
            (["--scale", "a=2"], r"--source: give the rasters")):
        with pytest.raises(InputError, match=message):
            export([str(model), "--onnx", str(tmp_path / "out.onnx"), *argv])
    assert not (tmp_path / "out.onnx").exists()
