"""Shared pytest fixtures: real data location, a labelled scene, log messages, quiet TensorFlow."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine

from terrapatch.testing import coordinate_raster, write_raster

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_DATA = Path(
    os.environ.get("TERRAPATCH_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/real")
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Directory of the real rasters (../shared/data/real); skips when absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not available at {REAL_DATA} (needs ../shared beside the repo)")
    return REAL_DATA


class _Messages(logging.Handler):
    """Keeps the message of every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture()
def log_messages() -> Iterator[list[str]]:
    """Messages of the ``terrapatch`` log records at INFO and above, in order.

    The handler sits on the ``terrapatch`` logger itself, so the messages are kept
    whatever the logger's propagation, and after its filters (a facade's respelling).
    """
    log = logging.getLogger("terrapatch")
    handler, level = _Messages(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(level)


#: The labelled scene's grid: 10 m pixels, origin (1000, 5000), EPSG:32631.
T10 = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)


@dataclass(frozen=True)
class LabelScene:
    """A 40×30 coordinate raster, labels 0/1/2 by bands of 10 rows, a raster of 1.5 on
    the same grid, and two polygons of classes ``crop`` and ``wood`` (field ``fclass``)."""

    dir: Path
    img: Path
    lab: Path
    frac: Path
    vec: Path


@pytest.fixture()
def label_scene(tmp_path: Path) -> LabelScene:
    """The selection tests' scene, written in ``tmp_path``."""
    img = coordinate_raster(tmp_path / "img.tif", 40, 30, T10)
    labels = (np.arange(30)[:, None] // 10 + np.zeros((1, 40), int)).astype(np.uint8)
    lab = write_raster(tmp_path / "lab.tif", labels, T10)
    frac = write_raster(tmp_path / "frac.tif", np.full((30, 40), 1.5, np.float32), T10)
    geoms = [shapely.box(1000, 4800, 1100, 4900), shapely.box(1200, 4750, 1300, 4850)]
    vec = tmp_path / "poly.gpkg"
    pyogrio.raw.write(vec, geometry=shapely.to_wkb(np.array(geoms, dtype=object)),
                      field_data=[np.array(["crop", "wood"], dtype=object)],
                      fields=["fclass"], crs="EPSG:32631", driver="GPKG",
                      geometry_type="Polygon")
    return LabelScene(tmp_path, img, lab, frac, vec)
