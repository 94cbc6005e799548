"""PatchesExtraction bad input: one case each, via the facade and (for a few) the CLI.

Every case asserts that the error names the parameter and the offending value,
that no output (nor temporary) file is left behind, and, through the CLI, that
the run exits with code 2 and prints one line on stderr without a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pyogrio
import pytest
from affine import Affine

from terrapatch.apps import PatchesExtraction
from terrapatch.cli import main
from terrapatch.errors import (
    CRSMismatchError,
    GeometryError,
    InputError,
    MissingInputError,
    NoSamplesError,
    OutputError,
    ParameterError,
    TerrapatchError,
)
from terrapatch.patches import read_patches
from terrapatch.testing import coordinate_raster, write_raster
from terrapatch.vector import write_points

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"


@dataclass
class Env:
    d: Path
    out: Path
    c10: Path
    c20: Path
    vec: Path


@pytest.fixture
def env(tmp_path) -> Env:
    c10 = coordinate_raster(tmp_path / "c10.tif", 80, 80, Affine(10, 0, L, 0, -10, T), crs=CRS)
    c20 = coordinate_raster(tmp_path / "c20.tif", 40, 40, Affine(20, 0, L, 0, -20, T), crs=CRS)
    vec = write_points(tmp_path / "p.geojson", np.array([L + 305.0, L + 405.0]),
                       np.array([T - 305.0, T - 505.0]), {"class": np.array([1, 2])}, crs=CRS)
    out = tmp_path / "out"
    out.mkdir()
    return Env(tmp_path, out, c10, c20, vec)


def params(env: Env, **over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "source1.il": [env.c10], "source1.patchsizex": 16, "source1.patchsizey": 16,
        "source1.out": env.out / "o10.tif",
        "source2.il": [env.c20], "source2.patchsizex": 8, "source2.patchsizey": 8,
        "source2.out": env.out / "o20.tif",
        "vec": env.vec, "field": "class", "outlabels": env.out / "l.tif",
    }
    p.update({k.replace("_", "."): v for k, v in over.items()})
    return {k: v for k, v in p.items() if v is not None}


def argv(p: dict[str, Any]) -> list[str]:
    tokens = ["PatchesExtraction", "--quiet"]
    for key, value in p.items():
        tokens.append(f"-{key}")
        if isinstance(value, list | tuple):
            tokens.extend(os.fspath(v) for v in value)
        elif isinstance(value, bool):
            tokens.append("true" if value else "false")
        else:
            tokens.append(os.fspath(value) if isinstance(value, Path) else str(value))
    return tokens


def geojson(path: Path, features: list[dict], crs: str = "EPSG::32631") -> Path:
    path.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:{crs}"}},
        "features": features}))
    return path


def point(x: float, y: float, **props: Any) -> dict:
    return {"type": "Feature", "properties": props,
            "geometry": {"type": "Point", "coordinates": [x, y]}}


def leftovers(env: Env) -> list[str]:
    return sorted(p.name for p in env.out.iterdir())


# ---------------------------------------------------------------- the cases
# Each returns (parameters, expected error type, fragments the message must contain).

Case = Callable[[Env], tuple[dict[str, Any], type[Exception], list[str]]]


def missing_file(env):
    nope = env.d / "nope.tif"
    return params(env, source2_il=[nope]), MissingInputError, ["source2.il", "nope.tif"]


def unreadable_raster(env):
    bad = env.d / "bad.tif"
    bad.write_text("this is not a raster\n")
    return (params(env, source1_il=[bad]), InputError,
            ["source1.il", "bad.tif", "not a readable raster"])


def crs_mismatch_sources(env):
    other = coordinate_raster(env.d / "c20_32632.tif", 40, 40, Affine(20, 0, L, 0, -20, T),
                              crs="EPSG:32632")
    return (params(env, source2_il=[other]), CRSMismatchError,
            ["source2.il", "EPSG:32632", "EPSG:32631"])


def crs_mismatch_vector(env):
    vec = write_points(env.d / "p32632.gpkg", np.array([L + 305.0]), np.array([T - 305.0]),
                       {"class": np.array([1])}, crs="EPSG:32632")
    return (params(env, vec=vec), CRSMismatchError,
            ["vec", "p32632.gpkg", "EPSG:32632", "EPSG:32631", "reproject"])


def missing_field(env):
    return params(env, field="label"), InputError, ["field", "'label'", "class"]


def missing_vector(env):
    return params(env, vec=env.d / "none.gpkg"), MissingInputError, ["vec", "none.gpkg"]


def unreadable_vector(env):
    bad = env.d / "bad.geojson"
    bad.write_text("{ not json")
    return params(env, vec=bad), InputError, ["vec", "bad.geojson"]


def no_features(env):
    vec = env.d / "empty.gpkg"
    pyogrio.raw.write(vec, geometry=np.array([], dtype=object),
                      field_data=[np.array([], dtype=np.int64)], fields=["class"], crs=CRS,
                      driver="GPKG", geometry_type="Point")
    return params(env, vec=vec), NoSamplesError, ["vec", "'class'"]


def only_null_features(env):
    vec = geojson(env.d / "nulls.geojson", [point(L + 305, T - 305, **{"class": None}),
                                            point(L + 405, T - 405, other=3)])
    return params(env, vec=vec), NoSamplesError, ["vec", "'class'", "2 features without it"]


def all_outside(env):
    vec = write_points(env.d / "far.geojson", np.array([L + 5.0, L - 1000.0, L + 795.0]),
                       np.array([T - 5.0, T - 100.0, T - 795.0]),
                       {"class": np.array([1, 2, 3])}, crs=CRS)
    return (params(env, vec=vec), NoSamplesError,
            ["vec", "3 samples", "outside", "source1 rejects 3", "source2 rejects 3"])


def all_nodata(env):
    flat = write_raster(env.d / "flat20.tif", np.full((1, 40, 40), 4, np.int16),
                        Affine(20, 0, L, 0, -20, T), crs=CRS)
    return (params(env, source2_il=[flat], source2_nodata=4), NoSamplesError,
            ["vec", "nodata", "source2 rejects 2"])


def patch_size_zero(env):
    return (params(env, source1_patchsizex=0), InputError,
            ["source1.patchsize", "0×16", "≥ 1"])


def patch_size_negative(env):
    return (params(env, source2_patchsizey=-3), InputError, ["source2.patchsize", "8×-3"])


def patch_larger_than_image(env):
    return (params(env, source1_patchsizex=100, source1_patchsizey=100), InputError,
            ["source1", "100×100", "larger than the image", "80×80"])


def unknown_key(env):
    return (params(env, **{"source1.patchsize": 16}), ParameterError,
            ["source1.patchsize", "unknown parameter", "did you mean"])


def unknown_global_key(env):
    return params(env, **{"vector": env.vec}), ParameterError, ["vector", "unknown parameter"]


def source_option_without_il(env):
    return (params(env, source2_il=None, source2_out=None, source2_patchsizey=None),
            ParameterError, ["source2.il", "source2.patchsizex"])


def missing_output_directory(env):
    target = env.d / "missing" / "o10.tif"
    return params(env, source1_out=target), OutputError, ["source1.out", "missing"]


def missing_labels_directory(env):
    target = env.d / "nowhere" / "l.tif"
    return params(env, outlabels=target), OutputError, ["outlabels", "nowhere"]


def output_is_a_directory(env):
    (env.d / "adir.tif").mkdir()
    return params(env, source2_out=env.d / "adir.tif"), OutputError, ["source2.out", "adir.tif"]


def unknown_pixel_type(env):
    return (params(env), InputError, ["source1.out", "uint7"])


def unknown_extended_key(env):
    return (params(env, source2_out=f"{env.out / 'o20.tif'}?&colour=red"), InputError,
            ["source2.out", "colour"])


def non_point_geometry(env):
    vec = geojson(env.d / "lines.geojson", [
        point(L + 305, T - 305, **{"class": 1}),
        {"type": "Feature", "properties": {"class": 2},
         "geometry": {"type": "LineString",
                      "coordinates": [[L + 100, T - 100], [L + 300, T - 300]]}},
    ])
    return params(env, vec=vec), InputError, ["vec", "lines.geojson", "feature 1", "LineString",
                                              "not a point"]


def list_on_different_grids(env):
    shifted = coordinate_raster(env.d / "shifted.tif", 80, 80, Affine(10, 0, L + 10, 0, -10, T),
                                crs=CRS)
    return (params(env, source1_il=[env.c10, shifted]), GeometryError,
            ["source1.il", "shifted.tif", "not on the grid"])


def list_of_different_sizes(env):
    small = coordinate_raster(env.d / "small.tif", 60, 80, Affine(10, 0, L, 0, -10, T), crs=CRS)
    return (params(env, source1_il=[env.c10, small]), GeometryError,
            ["source1.il", "small.tif", "60×80", "80×80"])


def rotated_raster(env):
    rotated = coordinate_raster(env.d / "rotated.tif", 40, 40, Affine(20, 1, L, 1, -20, T),
                                crs=CRS)
    return params(env, source2_il=[rotated]), GeometryError, ["source2.il", "rotated"]


def no_georeference(env):
    plain = env.d / "plain.tif"
    import rasterio
    with rasterio.open(plain, "w", driver="GTiff", width=80, height=80, count=1,
                       dtype="uint8") as ds:
        ds.write(np.zeros((1, 80, 80), np.uint8))
    return params(env, source1_il=[plain]), GeometryError, ["source1.il", "plain.tif",
                                                            "georeference"]


CASES: dict[str, Case] = {f.__name__: f for f in [
    missing_file, unreadable_raster, crs_mismatch_sources, crs_mismatch_vector, missing_field,
    missing_vector, unreadable_vector, no_features, only_null_features, all_outside, all_nodata,
    patch_size_zero, patch_size_negative, patch_larger_than_image, unknown_key,
    unknown_global_key, source_option_without_il, missing_output_directory,
    missing_labels_directory, output_is_a_directory, unknown_extended_key, non_point_geometry,
    list_on_different_grids, list_of_different_sizes, no_georeference, rotated_raster,
]}


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_facade_error_names_parameter_and_value(env, case):
    p, exc_type, fragments = CASES[case](env)
    with pytest.raises(exc_type) as info:
        PatchesExtraction(p, quiet=True)
    assert isinstance(info.value, TerrapatchError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    assert leftovers(env) == []


def test_facade_unknown_pixel_type(env):
    _, exc_type, fragments = unknown_pixel_type(env)
    app = PatchesExtraction(params(env, source1_out=None, source2_out=None, outlabels=None),
                            quiet=True)
    with pytest.raises(exc_type) as info:
        app.write({"source1.out": env.out / "o10.tif", "source2.out": env.out / "o20.tif"},
                  pixel_type={"source1.out": "uint7"})
    for fragment in fragments:
        assert fragment in str(info.value)
    assert leftovers(env) == []


CLI_CASES = ["missing_file", "unreadable_raster", "crs_mismatch_sources", "crs_mismatch_vector",
             "missing_field", "all_outside", "all_nodata", "patch_size_negative",
             "patch_larger_than_image", "unknown_key", "source_option_without_il",
             "missing_output_directory", "non_point_geometry", "list_on_different_grids"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_error_exits_2_with_one_line(env, case, capsys, monkeypatch):
    monkeypatch.delenv("OTB_TF_NSOURCES", raising=False)
    p, _, fragments = CASES[case](env)
    code = main(argv(p))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("terrapatch PatchesExtraction: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert leftovers(env) == []


def test_cli_unknown_pixel_type(env, capsys):
    p = params(env)
    tokens = argv(p)
    i = tokens.index("-source1.out")
    tokens.insert(i + 2, "uint7")
    assert main(tokens) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "source1.out" in err and "uint7" in err
    assert leftovers(env) == []


def test_cli_debug_raises_with_traceback(env):
    p, exc_type, _ = missing_file(env)
    with pytest.raises(exc_type):
        main([*argv(p), "--debug"])


def test_vector_reprojection_fixes_crs_mismatch(env):
    from rasterio.warp import transform
    x, y = np.array([L + 305.0, L + 405.0]), np.array([T - 305.0, T - 505.0])
    lon, lat = transform(CRS, "EPSG:4326", x, y)
    vec = write_points(env.d / "ll.gpkg", np.array(lon), np.array(lat),
                       {"class": np.array([1, 2])}, crs="EPSG:4326")
    with pytest.raises(CRSMismatchError, match="EPSG:4326"):
        PatchesExtraction(params(env, vec=vec), quiet=True)
    assert leftovers(env) == []
    app = PatchesExtraction(params(env, vec=vec, vec_reproject=True), quiet=True)
    assert app.result.n_collected == 2
    p20 = read_patches(env.out / "o20.tif")
    # 20 m cells (15, 15) and (20, 25): windows start 4 cells up-left.
    assert (p20[0, 0, 0, 0], p20[0, 0, 0, 1]) == (11, 11)
    assert (p20[1, 0, 0, 0], p20[1, 0, 0, 1]) == (16, 21)


def test_polygon_without_the_field_is_skipped_not_an_error(env):
    vec = geojson(env.d / "mixed.geojson", [
        point(L + 305, T - 305, **{"class": 1}),
        {"type": "Feature", "properties": {"name": "area"},
         "geometry": {"type": "Polygon", "coordinates": [[[L, T], [L + 50, T], [L + 50, T - 50],
                                                          [L, T]]]}},
    ])
    app = PatchesExtraction(params(env, vec=vec), quiet=True)
    assert app.result.n_collected == 1
    assert app.result.n_skipped == 1


def test_multipoint_with_the_field_is_an_error(env):
    vec = geojson(env.d / "mp.geojson", [
        {"type": "Feature", "properties": {"class": 2},
         "geometry": {"type": "MultiPoint", "coordinates": [[L + 305, T - 305]]}},
    ])
    with pytest.raises(InputError, match=r"feature 0 .* MultiPoint, not a point"):
        PatchesExtraction(params(env, vec=vec), quiet=True)
    assert leftovers(env) == []


def test_non_numeric_label_is_an_error_naming_the_value(env):
    vec = geojson(env.d / "words.geojson", [point(L + 305, T - 305, **{"class": "forest"})])
    with pytest.raises(InputError, match=r"field: value 'forest' of field 'class'"):
        PatchesExtraction(params(env, vec=vec), quiet=True)
    assert leftovers(env) == []


def test_bad_outpoints_extension_fails_before_writing(env):
    # Was a bug (fixed in 8b558fc): the format was checked after the images were written.
    with pytest.raises(InputError, match=r"outpoints: .*pts\.csv"):
        PatchesExtraction(params(env, outpoints=env.out / "pts.csv"), quiet=True)
    assert leftovers(env) == []


def test_sourcek_option_without_il_names_both_keys_with_n_sources(env):
    with pytest.raises(ParameterError, match=r"source3\.il: missing, but source3\.nodata"):
        PatchesExtraction(params(env, source3_nodata=0), n_sources=3, quiet=True)
    assert leftovers(env) == []


def test_n_sources_below_one_is_rejected(env):
    with pytest.raises(InputError, match=r"n_sources: 0"):
        PatchesExtraction(params(env), n_sources=0, quiet=True)


def test_invalid_otb_tf_nsources(env, monkeypatch):
    monkeypatch.setenv("OTB_TF_NSOURCES", "two")
    with pytest.raises(InputError, match=r"OTB_TF_NSOURCES: 'two'"):
        PatchesExtraction(params(env), quiet=True)
    assert leftovers(env) == []


def test_not_an_integer_patch_size(env):
    with pytest.raises(InputError, match=r"source1\.patchsizex: '1\.5' is not an integer"):
        PatchesExtraction(params(env, source1_patchsizex="1.5"), quiet=True)


def test_python_api_requires_patch_size(env):
    from terrapatch.extraction import extract_patches
    from terrapatch.raster import Source
    with pytest.raises(InputError, match=r"source1\.patch_size: missing"):
        extract_patches([Source(env.c10)], env.vec, "class", [env.out / "o.tif"], quiet=True)
    with pytest.raises(InputError, match=r"outputs: 1 paths given for 2 sources"):
        extract_patches([Source(env.c10, 4), Source(env.c20, 2, name="source2")], env.vec,
                        "class", [env.out / "o.tif"], quiet=True)
    assert leftovers(env) == []


def test_errors_are_builtin_subclasses():
    assert issubclass(MissingInputError, FileNotFoundError)
    assert issubclass(OutputError, OSError)
    assert issubclass(ParameterError, KeyError)
    assert str(ParameterError("x: unknown")) == "x: unknown"   # not KeyError's quoted repr
