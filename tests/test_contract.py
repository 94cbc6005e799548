"""Serving contracts (ONNX metadata, SavedModel asset, sidecar), MLM Items, map legends."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from terrapatch._optional import available
from terrapatch.contract import (
    ASSET_NAME,
    METADATA_KEY,
    ContractClass,
    ContractInput,
    ContractOutput,
    Framework,
    ServingContract,
    _onnx_metadata,
    check_contract_sources,
    contract_defaults,
    contract_path,
    read_contract,
    write_contract,
)
from terrapatch.errors import InputError, MissingInputError, ModelError
from terrapatch.serve.transforms import Normalization
from terrapatch.writer import (
    PendingOutput,
    apply_legend,
    legend_sidecar,
    read_category_names,
)

DATA = Path(__file__).parent / "data"
MLM_SCHEMA = DATA / "mlm-v1.4.0-schema.json"
requires_onnx = pytest.mark.skipif(not available("onnx"), reason="needs onnx (tensorflow extra)")
requires_mlm = pytest.mark.skipif(not available("pystac.extensions.mlm"),
                                  reason="needs pystac-ext-mlm (mlm extra)")


def make_contract(**changes: Any) -> ServingContract:
    """Two sources (10 m and 20 m), one class output: the seed's shape."""
    inputs = (
        ContractInput("input_10m", 4, (8, 8), ("B02", "B03", "B04", "B08"), 10.0,
                      Normalization(scale=1 / 10000), 0, "nhwc", "uint16"),
        ContractInput("input_20m", 6, (4, 4), ("B05", "B06", "B07", "B8A", "B11", "B12"),
                      (20.0, 20.0), Normalization(mean=[1, 2, 3, 4, 5, 6], std=2.0), None,
                      "nhwc", "uint16"),
    )
    outputs = (ContractOutput("scores", (1, 1), 2.0, 3, "float32",
                              (ContractClass(0, "water", "#0000ff"),
                               ContractClass(2, "forest", "#00ff00"))),)
    fields: dict[str, Any] = {"framework": Framework("ONNX", "1.17.0"), "inputs": inputs,
                              "outputs": outputs, "kind": "fully-convolutional",
                              "name": "seed"}
    fields.update(changes)
    return ServingContract(**fields)


# ------------------------------------------------------------------ the contract


def test_json_round_trip() -> None:
    contract = make_contract()
    data = json.loads(contract.to_json())
    assert data["terrapatch_contract"] == 1
    assert data["inputs"][0]["spacing"] == [10.0, 10.0]
    assert ServingContract.from_json(contract.to_json()) == contract


def test_fractional_spcscale_round_trip() -> None:
    output = ContractOutput("hr", (4, 4), 0.25, 3)
    contract = make_contract(outputs=(output,))
    again = ServingContract.from_json(contract.to_json())
    assert again.outputs[0].spcscale == 0.25
    assert contract_defaults(again)["spcscale"] == Fraction(1, 4)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(extra=1), "(top level): unknown field 'extra'"),
    (lambda d: d.pop("inputs"), "(top level): missing field 'inputs'"),
    (lambda d: d.update(terrapatch_contract=9), "version 9 is newer"),
    (lambda d: d.update(kind="dense"), "kind: 'dense' is not one of"),
    (lambda d: d["inputs"][0].update(receptive_field=[0, 8]),
     "inputs['input_10m'].receptive_field: [0, 8] must be integers ≥ 1"),
    (lambda d: d["inputs"][1].update(band_names=["B05"]),
     "inputs['input_20m'].band_names: ['B05'] must be 6 non-empty names"),
    (lambda d: d["inputs"][1]["normalization"].update(mean=[1, 2]),
     "inputs['input_20m'].normalization.mean: [1, 2] must be one value or one per band"),
    (lambda d: d["inputs"][0].update(layout="hwc"), "layout: 'hwc' is not one of nhwc, nchw"),
    (lambda d: d["outputs"][0].update(spcscale=-1), "spcscale: -1 must be > 0"),
    (lambda d: d["outputs"][0]["classes"][0].update(color="blue"),
     "classes[0].color: 'blue' is not #rrggbb"),
    (lambda d: d["outputs"][0]["classes"][1].update(value=0), "class values [0, 0] repeat"),
    (lambda d: d["outputs"][0].update(unit="m"), "outputs[0]: unknown field 'unit'"),
])
def test_strict_validation(change: Any, message: str) -> None:
    data = make_contract().to_dict()
    change(data)
    with pytest.raises(ModelError) as caught:
        ServingContract.from_dict(data)
    text = str(caught.value)
    assert text.startswith("model contract: ") and message in text
    assert "\n" not in text


def test_outputs_share_one_grid() -> None:
    with pytest.raises(ModelError, match="serves all outputs on one grid"):
        make_contract(outputs=(ContractOutput("a", (1, 1), 1.0),
                               ContractOutput("b", (2, 2), 1.0)))


def test_invalid_json_is_one_line() -> None:
    with pytest.raises(ModelError, match=r"^model contract: not valid JSON"):
        ServingContract.from_json("{")


# ------------------------------------------------------------------ where it lives


@requires_onnx
def test_onnx_metadata_round_trip(tmp_path: Path) -> None:
    from terrapatch.testing.onnx_models import conv_onnx

    model = conv_onnx(tmp_path / "m.onnx")
    assert read_contract(model) is None  # a model without a contract serves as today
    contract = make_contract()
    assert write_contract(model, contract) == model
    assert read_contract(model) == contract
    # onnxruntime alone (the core install) reads it too
    text = _onnx_metadata(model, use_onnx=False)
    assert text is not None and ServingContract.from_json(text) == contract
    # rewriting replaces it, once; other metadata is kept
    import onnx

    proto = onnx.load(model)
    proto.metadata_props.add(key="author", value="me")
    onnx.save(proto, model)
    changed = make_contract(name="second")
    write_contract(model, changed)
    keys = [p.key for p in onnx.load(model).metadata_props]
    assert keys.count(METADATA_KEY) == 1 and "author" in keys
    assert read_contract(model) == changed
    assert not list(tmp_path.glob(".*pending*"))


def test_savedmodel_asset_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    assert read_contract(folder) is None
    where = write_contract(folder, make_contract())
    assert where == folder / "assets" / ASSET_NAME
    assert read_contract(folder) == make_contract()


@pytest.mark.slow
def test_savedmodel_export_keeps_serving(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from terrapatch.engines import load_engine
    from terrapatch.export import export_savedmodel
    from terrapatch.testing.models import identity_model

    folder = export_savedmodel(identity_model(bands=2), tmp_path / "sm")
    contract = make_contract(framework=Framework("TensorFlow", "2.18.0"))
    write_contract(folder, contract)
    assert read_contract(folder) == contract
    engine = load_engine(folder)  # the asset does not disturb loading
    assert engine is not None


@pytest.mark.parametrize("name", ["model.keras", "model.pt2", "model.pt"])
def test_sidecar(tmp_path: Path, name: str) -> None:
    model = tmp_path / name
    model.write_bytes(b"weights")
    assert read_contract(model) is None
    where = write_contract(model, make_contract())
    assert where == contract_path(model) == tmp_path / f"{name}.contract.json"
    assert read_contract(model) == make_contract()
    where.write_text('{"terrapatch_contract": 1}', encoding="utf-8")
    with pytest.raises(ModelError, match="missing field 'framework'"):
        read_contract(model)


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="does not exist"):
        read_contract(tmp_path / "none.onnx")
    with pytest.raises(MissingInputError, match="does not exist"):
        write_contract(tmp_path / "none.keras", make_contract())


# ------------------------------------------------------------------ serving


def test_contract_defaults() -> None:
    defaults = contract_defaults(make_contract())
    assert defaults["output_names"] == ["scores"]
    assert defaults["fullyconv"] is True
    assert defaults["spcscale"] == 2 and defaults["efield"] == (1, 1)
    assert defaults["model_layout"] == "nhwc"
    assert defaults["normalization"][0] == Normalization(scale=1 / 10000)
    assert defaults["sources"][0] == {"placeholder": "input_10m", "patch_size": (8, 8),
                                      "nodata": 0.0}
    assert defaults["colormap"] == {0: (0, 0, 255, 255), 2: (0, 255, 0, 255)}
    assert defaults["class_names"] == ["water", "", "forest"]


def test_check_contract_sources() -> None:
    contract = make_contract()
    check_contract_sources(contract, [4, 6])
    with pytest.raises(InputError) as caught:
        check_contract_sources(contract, [4, 4])
    assert str(caught.value) == ("source2: the model's contract expects 6 bands "
                                 "(B05, B06, B07, …), the raster has 4")
    with pytest.raises(InputError, match="expects 2 source"):
        check_contract_sources(contract, [4])


# ------------------------------------------------------------------ MLM Item


def _mlm_validator() -> Any:
    """The official MLM v1.4.0 schema, its external ``$ref``s resolved to permissive stubs.

    The schema refers to other STAC extension schemas (classification, raster,
    processing, ...) by URL; tests run offline, so every external document resolves to
    a stub that accepts anything at any JSON pointer: the MLM schema's own rules are
    checked in full, the other extensions' fields are not.
    """
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT7

    if not MLM_SCHEMA.is_file():
        pytest.skip(f"{MLM_SCHEMA.name} is not vendored (see tests/data/README.md)")

    class Permissive(dict[str, Any]):
        def __missing__(self, key: str) -> Permissive:
            return Permissive()

    def retrieve(uri: str) -> Any:
        return referencing.Resource.from_contents(Permissive(), default_specification=DRAFT7)

    schema = json.loads(MLM_SCHEMA.read_text(encoding="utf-8"))
    registry = referencing.Registry(retrieve=retrieve)
    return jsonschema.Draft7Validator(schema, registry=registry)


@requires_mlm
def test_mlm_item_fields(tmp_path: Path) -> None:
    from pystac.extensions.mlm import MLMExtension

    from terrapatch.mlm import mlm_item, mlm_item_path, write_mlm_item

    model = tmp_path / "seed.onnx"
    model.write_bytes(b"")
    item = mlm_item(make_contract(), model)
    ext = MLMExtension.ext(item)
    assert ext.mlm_name == "seed" and ext.framework == "ONNX"
    assert ext.framework_version == "1.17.0"
    assert [str(t) for t in ext.tasks] == ["classification", "semantic-segmentation"]
    first = ext.input[0]
    assert first.name == "input_10m" and first.input.shape == [-1, 8, 8, 4]
    assert first.input.dim_order == ["batch", "height", "width", "channel"]
    data = item.to_dict(include_self_link=False)
    props = data["properties"]
    assert props["mlm:input"][0]["value_scaling"] == [
        {"type": "z-score", "mean": 0.0, "stddev": 10000.0}]
    assert props["mlm:input"][1]["terrapatch:receptive_field"] == [4, 4]
    assert props["mlm:output"][0]["terrapatch:spcscale"] == 2.0
    classes = props["mlm:output"][0]["classification:classes"]
    assert classes[1] == {"value": 2, "name": "forest", "description": "forest",
                          "color_hint": "00FF00"}
    assert data["geometry"] is None and props["datetime"]
    asset = data["assets"]["model"]
    assert asset["roles"] == ["mlm:model"] and asset["mlm:artifact_type"] == "onnx.save"
    assert ServingContract.from_dict(props["terrapatch:contract"]) == make_contract()
    written = write_mlm_item(make_contract(), model)
    assert written == mlm_item_path(model) == tmp_path / "seed.onnx.stac.json"
    assert json.loads(written.read_text())["id"] == "seed"


@requires_mlm
@pytest.mark.parametrize("outputs", [
    None,
    (ContractOutput("hr", (4, 4), 0.25, 3),),
])
def test_mlm_item_validates_against_the_schema(tmp_path: Path, outputs: Any) -> None:
    from terrapatch.mlm import mlm_item

    validator = _mlm_validator()
    contract = make_contract() if outputs is None else make_contract(outputs=outputs)
    model = tmp_path / "model.keras"
    model.write_bytes(b"")
    data = mlm_item(contract, model).to_dict(include_self_link=False)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


# ------------------------------------------------------------------ legend


def _class_map(path: Path, dtype: str = "uint8", count: int = 1) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=count,
                       dtype=dtype, crs="EPSG:32631",
                       transform=rasterio.transform.from_origin(0, 40, 10, 10)) as out:
        out.write(np.arange(count * 16).reshape(count, 4, 4).astype(dtype) % 3)
    return path


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_apply_legend_readback(tmp_path: Path, dtype: str) -> None:
    path = _class_map(tmp_path / "map.tif", dtype)
    defaults = contract_defaults(make_contract())
    apply_legend(path, defaults["colormap"], defaults["class_names"])
    with rasterio.open(path) as src:
        colours = src.colormap(1)
    assert colours[0] == (0, 0, 255, 255) and colours[2] == (0, 255, 0, 255)
    assert read_category_names(path) == ["water", "", "forest"]
    apply_legend(path, None, ["a", "b"])  # replaces the names, keeps the colours
    assert read_category_names(path) == ["a", "b"]
    with rasterio.open(path) as src:
        assert src.colormap(1)[2] == (0, 255, 0, 255)


def test_legend_merges_into_existing_pam(tmp_path: Path) -> None:
    path = _class_map(tmp_path / "map.tif")
    legend_sidecar(path).write_text(
        '<PAMDataset><PAMRasterBand band="1"><Description>classes</Description>'
        '</PAMRasterBand></PAMDataset>', encoding="utf-8")
    apply_legend(path, class_names=["x", "y", "z"])
    text = legend_sidecar(path).read_text(encoding="utf-8")
    assert "<Description>classes</Description>" in text
    assert read_category_names(path) == ["x", "y", "z"]


def test_legend_needs_a_one_band_integer_map(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="one-band uint8 or uint16 class map"):
        apply_legend(_class_map(tmp_path / "f.tif", "float32"), {0: (1, 2, 3)})
    with pytest.raises(InputError, match="has 2 band"):
        apply_legend(_class_map(tmp_path / "two.tif", "uint8", 2), None, ["a"])


def test_commit_carries_the_legend(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    legend_sidecar(target).write_text("<PAMDataset/>", encoding="utf-8")  # stale
    with PendingOutput(target) as pending:
        finished = _class_map(pending.file("map.tif"))
        apply_legend(finished, {1: (255, 0, 0)}, ["a", "b"])
        pending.commit(finished, sidecars=(".aux.xml",))
    assert read_category_names(target) == ["a", "b"]
    with PendingOutput(target) as pending:  # a map without names: the old ones go
        finished = _class_map(pending.file("map.tif"))
        pending.commit(finished, sidecars=(".aux.xml",))
    assert not legend_sidecar(target).exists()
    assert read_category_names(target) is None
