"""The seed page's own scripts run on terrapatch with only their imports and data paths changed.

The seed (OTBTF's "Dealing with multiple sources" tutorial, ../shared/reference/seed.txt)
is read at test time; its extraction, training and four inference scripts are run on a
synthetic 10 m / 20 m scene big enough for the seed's ``box=2000:2000:500:500``. Also
runs our walkthrough (examples/seed) on the real Brandenburg Sentinel-2 pair.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.testing import make_scene, mosaic_vrt
from terrapatch.testing.markers import requires_tensorboard

REPO = Path(__file__).resolve().parents[1]
SEED_TEXT = REPO.parent / "shared" / "reference" / "seed.txt"
END_MARKERS = ("\nNote\n", "\nQuestion\n", "\nFully convolutional mode\n", "\nSolution")


def seed_scripts() -> list[str]:
    """The code blocks of the seed that start with ``import pyotb``, in page order."""
    text = SEED_TEXT.read_text()
    blocks, start = [], text.find("import pyotb")
    while start >= 0:
        ends = [i for m in END_MARKERS if (i := text.find(m, start)) >= 0]
        end = min(ends) if ends else len(text)
        blocks.append(text[start:end])
        start = text.find("import pyotb", end)
    return blocks


def adapt(code: str, data: Path) -> str:
    """Change only the import lines and the data paths."""
    code = code.replace("import pyotb\n", "from terrapatch import apps as pyotb\n")
    code = code.replace("import otbtf\n", "import terrapatch as otbtf\n")
    code = code.replace("from mymetrics import FScore\n", "from terrapatch.metrics import FScore\n")
    return code.replace('"/data/', f'"{data}/')


def run(code: str, path: Path, argv: list[str], monkeypatch) -> None:
    path.write_text(code)
    monkeypatch.setattr("sys.argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")


@pytest.mark.slow
@requires_tensorboard
def test_seed_scripts_extract_train_and_map(tmp_path, monkeypatch):
    if not SEED_TEXT.is_file():
        pytest.skip(f"seed page not available at {SEED_TEXT} (needs ../shared beside the repo)")
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    scene = make_scene(tmp_path / "scene", size=512, n_points=2500, seed=5)
    # The seed's Tokyo images, as 10 × 10 mosaics of the scene (5120² at 10 m).
    mosaic_vrt(scene.img_10m, 10, data / "s2_tokyo_10m.tif")
    mosaic_vrt(scene.img_20m, 10, data / "s2_tokyo_20m.tif")
    shutil.copy(scene.points_train, data / "pos_a.geojson")
    shutil.copy(scene.points_valid, data / "pos_b.geojson")

    blocks = seed_scripts()
    assert len(blocks) == 5, "extraction + four inference scripts expected in the seed page"
    extraction, *inference = blocks
    run(adapt(extraction, data), tmp_path / "extract.py", [], monkeypatch)
    for prefix in ("a_", "b_"):
        for name in ("img_10m_2src", "img_20m_2src", "labels_2src"):
            assert (data / f"{prefix}{name}.tif").is_file()

    text = SEED_TEXT.read_text()
    start = text.index("import argparse\nimport otbtf")
    training = text[start:text.index("Command:", start)]
    model = data / "models" / "model2_dualsrc.keras"
    run(adapt(training, data), tmp_path / "train.py",
        ["--model", str(model), "--log_dir", str(data / "logs"), "--epochs", "1"], monkeypatch)
    savedmodel = data / "models" / "model2_dualsrc_savedmodel"
    subprocess.run([sys.executable, str(REPO / "examples" / "savedmodel.py"), "--model",
                    str(model), "--savedmodel", str(savedmodel)], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    maps = {}
    for i, code in enumerate(inference):
        run(adapt(code, data), tmp_path / f"infer{i}.py", ["--savedmodel", str(savedmodel)],
            monkeypatch)
    for path in sorted(data.glob("map_*.tif")):
        with rasterio.open(path) as ds:
            maps[path.name] = (ds.transform, ds.read(1), ds.dtypes[0], ds.crs)
    assert sorted(maps) == ["map_fcn_2_sources_fcn.tif", "map_fcn_2_sources_fcn_spc2.tif",
                            "map_fcn_2_sources_pb.tif", "map_fcn_2_sources_pb_spc2.tif"]
    # Output grid: 20 m cells whose windows fit; pixel 0 is 20 m cell 4 (rf 8 → 4 before);
    # box pixel 2000 → x = x0 + (4 + 2000) * 20 in all four variants (no 5 m shift).
    x0, y0 = scene.transform_20m.c, scene.transform_20m.f
    expected = Affine(20, 0, x0 + 2004 * 20, 0, -20, y0 - 2004 * 20)
    reference = maps["map_fcn_2_sources_pb.tif"][1]
    assert reference.shape == (500, 500)
    assert len(np.unique(reference)) > 1
    for name, (transform, values, dtype, crs) in maps.items():
        assert transform.almost_equals(expected), name
        assert dtype == "uint8" and crs == scene.crs
        assert np.array_equal(values, reference), name


@pytest.mark.slow
@pytest.mark.realdata
@requires_tensorboard
def test_walkthrough_on_real_sentinel2(real_data, tmp_path):
    env = dict(os.environ, TERRAPATCH_REAL_DATA=str(real_data),
               TERRAPATCH_SEED_OUT=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2")
    folder = REPO / "examples" / "seed"
    steps = [["prepare_data.py"], ["part_2_sample_extraction_2_sources.py"],
             ["part_2_train_fcn_2_sources.py", "--epochs", "1"], ["part_2_savedmodel.py"]]
    variants = ("pb", "pb_switched", "fcn", "fcn_switched")
    steps += [[f"part_2_inference_2_sources_{v}.py"] for v in variants]
    for step in steps:
        subprocess.run([sys.executable, *step], cwd=folder, env=env, check=True,
                       capture_output=True)
    maps = {}
    for v in variants:
        with rasterio.open(tmp_path / f"map_2_sources_{v}.tif") as ds:
            maps[v] = (ds.transform, ds.read(1))
    transform, reference = maps["pb"]
    # Brandenburg 20 m grid starts at (330000, 5822040); box 100:50 on the rf-8 output grid.
    assert transform.almost_equals(Affine(20, 0, 330000 + 104 * 20, 0, -20,
                                          5822040 - 54 * 20))
    assert reference.shape == (300, 500)
    for v, (t, values) in maps.items():
        assert t.almost_equals(transform), v
        assert np.array_equal(values, reference), v
