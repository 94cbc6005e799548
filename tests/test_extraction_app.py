"""The OTBTF facade of PatchesExtraction (``terrapatch.apps``): keywords, dicts, ``write``.

The same coordinate rasters as tests/test_extraction.py (band 1 = column, band 2 =
row), so every patch shows the window it was cut from. The command line is tested
in tests/test_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.apps import PatchesExtraction
from terrapatch.errors import ParameterError
from terrapatch.extraction import ExtractionSummary
from terrapatch.patches import read_patches
from terrapatch.testing import assert_coordinate_patch, coordinate_raster
from terrapatch.vector import write_points

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
# 20 m cells (j, i) and offsets (dx, dy) inside them, as in tests/test_extraction.py.
CELLS = [(4, 4, 0.0, 0.0), (5, 9, 15.0, 5.0), (20, 17, 10.0, 10.0), (33, 36, 19.999, 19.999),
         (36, 35, 5.0, 15.0), (11, 28, 12.5, 0.0)]


def points(path: Path, x, y, labels, crs: str = CRS) -> Path:
    return write_points(path, np.asarray(x, float), np.asarray(y, float),
                        {"class": np.asarray(labels)}, crs=crs)


def in_cell(spacing: float, j: int, i: int, dx: float, dy: float) -> tuple[float, float]:
    """Point at offset (dx, dy) metres (dy downwards) inside pixel (j, i) of a grid at (L, T)."""
    return L + spacing * j + dx, T - spacing * i - dy


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """20 m (40×40) and 10 m (80×80) coordinate rasters sharing the corner (L, T)."""
    d = tmp_path_factory.mktemp("pair")
    return (coordinate_raster(d / "c20.tif", 40, 40, Affine(20, 0, L, 0, -20, T), crs=CRS),
            coordinate_raster(d / "c10.tif", 80, 80, Affine(10, 0, L, 0, -10, T), crs=CRS))


@pytest.fixture
def facade_inputs(tmp_path, pair):
    c20, c10 = pair
    xy = [in_cell(20, j, i, dx, dy) for j, i, dx, dy in CELLS]
    vec = points(tmp_path / "p.geojson", [p[0] for p in xy], [p[1] for p in xy],
                 np.arange(len(xy)) + 10)
    return c10, c20, vec


def _check_pair_outputs(o10: Path, o20: Path) -> None:
    p10, p20 = read_patches(o10), read_patches(o20)
    assert len(p10) == len(p20) == len(CELLS)
    for n, (j, i, _, _) in enumerate(CELLS):
        assert_coordinate_patch(p10[n], 2 * j - 8, 2 * i - 8)
        assert_coordinate_patch(p20[n], j - 4, i - 4)


def test_facade_keywords_execute_when_outputs_are_given(tmp_path, facade_inputs, monkeypatch):
    monkeypatch.delenv("OTB_TF_NSOURCES", raising=False)
    c10, c20, vec = facade_inputs
    app = PatchesExtraction(
        n_sources=2,
        source1_il=str(c10), source1_patchsizex=16, source1_patchsizey=16,
        source1_out=str(tmp_path / "o10.tif"),
        source2_il=[str(c20)], source2_patchsizex=8, source2_patchsizey=8,
        source2_out=str(tmp_path / "o20.tif"),
        vec=str(vec), field="class", outlabels=str(tmp_path / "l.tif"), quiet=True)
    assert app.executed
    assert isinstance(app.result, ExtractionSummary)
    assert app.result.n_collected == len(CELLS)
    _check_pair_outputs(tmp_path / "o10.tif", tmp_path / "o20.tif")
    with rasterio.open(tmp_path / "l.tif") as ds:
        assert ds.dtypes[0] == "uint8"
        assert ds.read(1).ravel().tolist() == list(range(10, 10 + len(CELLS)))


def test_facade_without_outputs_does_not_run(tmp_path, facade_inputs):
    c10, _, vec = facade_inputs
    app = PatchesExtraction(source1_il=c10, source1_patchsizex=4, source1_patchsizey=4,
                            vec=vec, field="class", quiet=True)
    assert not app.executed
    assert list(tmp_path.glob("*.tif")) == []


def test_facade_dotted_dict_and_write(tmp_path, facade_inputs, monkeypatch):
    monkeypatch.delenv("OTB_TF_NSOURCES", raising=False)
    c10, c20, vec = facade_inputs
    app = PatchesExtraction({
        "source1.il": c10, "source1.patchsizex": 16, "source1.patchsizey": 16,
        "source2.il": c20, "source2.patchsizex": "8", "source2.patchsizey": 8.0,
        "vec": vec, "field": "class"}, quiet=True)
    assert app.n_sources == 2   # inferred from the keys
    assert not app.executed
    result = app.write({"source1.out": tmp_path / "o10.tif", "source2_out": tmp_path / "o20.tif",
                        "outlabels": tmp_path / "l.tif"},
                       pixel_type="int16", ext_fname="gdal:co:COMPRESS=DEFLATE")
    assert result.n_collected == len(CELLS)
    for name in ("o10.tif", "o20.tif", "l.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert ds.dtypes[0] == "int16", name
            assert ds.compression == rasterio.enums.Compression.deflate, name
    _check_pair_outputs(tmp_path / "o10.tif", tmp_path / "o20.tif")


def test_facade_write_pixel_type_mapping(tmp_path, facade_inputs):
    c10, c20, vec = facade_inputs
    app = PatchesExtraction(source1_il=c10, source1_patchsizex=16, source1_patchsizey=16,
                            source2_il=c20, source2_patchsizex=8, source2_patchsizey=8,
                            vec=vec, field="class", quiet=True)
    app.write({"source1.out": tmp_path / "o10.tif", "source2.out": tmp_path / "o20.tif",
               "outlabels": tmp_path / "l.tif"},
              pixel_type={"source1.out": "uint8", "outlabels": "int32"})
    dtypes = {}
    for name in ("o10.tif", "o20.tif", "l.tif"):
        with rasterio.open(tmp_path / name) as ds:
            dtypes[name] = ds.dtypes[0]
            assert ds.compression is None
    assert dtypes == {"o10.tif": "uint8", "o20.tif": "float32", "l.tif": "int32"}


def test_facade_n_sources_inferred_from_keys(tmp_path, facade_inputs, monkeypatch):
    monkeypatch.delenv("OTB_TF_NSOURCES", raising=False)
    c10, c20, vec = facade_inputs
    app = PatchesExtraction(source1_il=c10, source1_patchsizex=16, source1_patchsizey=16,
                            source1_out=tmp_path / "o10.tif",
                            source2_il=c20, source2_patchsizex=8, source2_patchsizey=8,
                            source2_out=tmp_path / "o20.tif", vec=vec, field="class", quiet=True)
    assert app.n_sources == 2 and app.executed
    _check_pair_outputs(tmp_path / "o10.tif", tmp_path / "o20.tif")


def test_facade_honours_otb_tf_nsources(tmp_path, facade_inputs, monkeypatch):
    c10, c20, vec = facade_inputs
    monkeypatch.setenv("OTB_TF_NSOURCES", "3")
    with pytest.raises(ParameterError, match=r"source3\.il: missing"):
        PatchesExtraction(source1_il=c10, source1_patchsizex=16, source1_patchsizey=16,
                          source1_out=tmp_path / "o10.tif",
                          source2_il=c20, source2_patchsizex=8, source2_patchsizey=8,
                          source2_out=tmp_path / "o20.tif", vec=vec, field="class", quiet=True)
    assert not list(tmp_path.glob("*.tif"))
    monkeypatch.setenv("OTB_TF_NSOURCES", "2")
    app = PatchesExtraction(source1_il=c10, source1_patchsizex=16, source1_patchsizey=16,
                            source1_out=tmp_path / "o10.tif", vec=vec, field="class",
                            quiet=True, **{"source2.il": c20, "source2.patchsizex": 8,
                                           "source2.patchsizey": 8,
                                           "source2.out": tmp_path / "o20.tif"})
    assert app.n_sources == 2
    _check_pair_outputs(tmp_path / "o10.tif", tmp_path / "o20.tif")
    # An explicit n_sources wins over the variable.
    app = PatchesExtraction(n_sources=1, source1_il=c10, source1_patchsizex=16,
                            source1_patchsizey=16, vec=vec, field="class", quiet=True)
    assert app.n_sources == 1


def test_facade_reproject_and_grid_factor_keys(tmp_path, facade_inputs):
    from rasterio.warp import transform
    c10, c20, _ = facade_inputs
    x, y = in_cell(20, 12, 14, 15.0, 5.0)
    lon, lat = transform(CRS, "EPSG:4326", [x], [y])
    vec = points(tmp_path / "ll.geojson", lon, lat, [1], crs="EPSG:4326")
    app = PatchesExtraction(source1_il=c10, source1_patchsizex=16, source1_patchsizey=16,
                            source2_il=c20, source2_patchsizex=8, source2_patchsizey=8,
                            vec=vec, field="class", vec_reproject=True, grid_factor=2,
                            quiet=True)
    summary = app.write({"source1.out": tmp_path / "o10.tif", "source2.out": tmp_path / "o20.tif"})
    assert summary.factor == 2
    assert_coordinate_patch(read_patches(tmp_path / "o10.tif")[0], 2 * 12 - 8, 2 * 14 - 8)
    assert_coordinate_patch(read_patches(tmp_path / "o20.tif")[0], 12 - 4, 14 - 4)


def test_facade_extended_filename_applies_to_its_own_output_only(tmp_path, facade_inputs):
    # Was a bug (fixed in 8b558fc): one output's gdal:co options applied to every output.
    c10, c20, vec = facade_inputs
    PatchesExtraction(source1_il=c10, source1_patchsizex=16, source1_patchsizey=16,
                      source1_out=f"{tmp_path / 'o10.tif'}?&gdal:co:COMPRESS=DEFLATE",
                      source2_il=c20, source2_patchsizex=8, source2_patchsizey=8,
                      source2_out=tmp_path / "o20.tif", outlabels=tmp_path / "l.tif",
                      vec=vec, field="class", quiet=True)
    with rasterio.open(tmp_path / "o10.tif") as ds:
        assert ds.compression == rasterio.enums.Compression.deflate
    for name in ("o20.tif", "l.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert ds.compression is None, name
