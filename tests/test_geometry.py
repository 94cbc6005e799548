"""Geometry contract: hand-checked windows and grids, errors, and invariants I1, I2, I4, I5."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from terrapatch.errors import CRSMismatchError, GeometryError, InputError
from terrapatch.geometry import Grid, Layout, extraction_factor, floor_index
from terrapatch.testing.strategies import nested_sources

L, T = 500000.0, 4000000.0


def grid(spacing: float, width: int, height: int | None = None, x0: float = L, y0: float = T,
         name: str = "g", crs: object = None) -> Grid:
    return Grid(Affine(spacing, 0, x0, 0, -spacing, y0), width, height or width, crs, name)


# ---------------------------------------------------------------- point → pixel


def test_pixel_of_contains_point_and_boundaries_go_right_and_down():
    g = grid(10, 100)
    cols, rows = g.pixel_of(np.array([L + 175, L + 170, L + 0.0, L + 169.999]),
                            np.array([T - 175, T - 170, T - 0.0, T - 169.999]))
    assert cols.tolist() == [17, 17, 0, 16]
    assert rows.tolist() == [17, 17, 0, 16]


def test_floor_index_snaps_round_off_only():
    assert floor_index(np.array([2.9999999999, 3.0000000001, 2.5, -0.5, -1e-12])).tolist() == [
        3, 3, 2, -1, 0]


def test_pixel_of_non_representable_spacing():
    g = Grid(Affine(0.1, 0, 0.3, 0, -0.1, 0.7), 100, 100)
    cols, rows = g.pixel_of(np.array([0.3 + 0.1 * 7]), np.array([0.7 - 0.1 * 3]))
    assert (cols[0], rows[0]) == (7, 3)


# ---------------------------------------------------------------- reference §3.6


def test_single_source_windows_match_otbtf():
    g = grid(10, 100)
    odd = Layout((g,), ((33, 33),))
    (cols, rows), = odd.sample_windows(np.array([L + 175]), np.array([T - 175]))
    assert (cols[0], rows[0]) == (1, 1)  # window cols 1..33
    even = Layout((g,), ((32, 32),))
    (cols, rows), = even.sample_windows(np.array([L + 170]), np.array([T - 180]))
    assert (cols[0], rows[0]) == (1, 2)  # point at bottom-left corner of (17, 17)
    near = Layout((g,), ((16, 16),))
    (cols, rows), = near.sample_windows(np.array([L + 5]), np.array([T - 5]))
    assert (cols[0], rows[0]) == (-8, -8)
    assert not near.inside(0, cols, rows)[0]


# ---------------------------------------------------------------- reference §4.11 (with our fixes)


@pytest.fixture
def pair() -> tuple[Grid, Grid]:
    return grid(10, 64, name="s10"), grid(20, 32, name="s20")


def test_q1_twenty_metre_reference(pair):
    g10, g20 = pair
    lay = Layout((g20, g10), ((8, 8), (16, 16)))
    out = lay.output_grid
    assert out.grid.transform == Affine(20, 0, L + 80, 0, -20, T - 80)
    # OTBTF gives 24×24 because its 10 m window is shifted by 10 m; ours fits one more.
    assert (out.width, out.height) == (25, 25)
    c20, _ = lay.tile_starts(0, 0, 25, 25, 0)
    c10, _ = lay.tile_starts(0, 0, 25, 25, 1)
    j = np.arange(25)
    assert c20.tolist() == j.tolist()             # 20 m cols j..j+7
    assert c10.tolist() == (2 * j).tolist()       # 10 m cols 2j..2j+15: same ground
    regions = lay.tile_regions(0, 0, 4, 4)
    assert (regions[0].col_off, regions[0].width) == (0, 11)
    assert (regions[1].col_off, regions[1].width) == (0, 22)


def test_q2_switched_sources_same_grid_no_5m_shift(pair):
    g10, g20 = pair
    q1 = Layout((g20, g10), ((8, 8), (16, 16)))
    q2 = Layout((g10, g20), ((16, 16), (8, 8)), factor=2)
    assert q2.output_grid.grid.transform == q1.output_grid.grid.transform  # OTBTF: 5 m off
    assert (q2.output_grid.width, q2.output_grid.height) == (25, 25)
    for src_q1, src_q2 in ((0, 1), (1, 0)):
        assert np.array_equal(q1.tile_starts(0, 0, 25, 25, src_q1)[0],
                              q2.tile_starts(0, 0, 25, 25, src_q2)[0])
    # FCN tile of 16: the seed model's 20 m branch needs n + 7, the 10 m branch 2n + 14.
    r = q2.tile_regions(0, 0, 16, 16)
    assert (r[0].width, r[1].width) == (46, 23)


@pytest.mark.parametrize(
    ("rf", "ef", "offset", "size"),
    [(16, 1, 80, 85), (33, 1, 160, 68), (64, 32, 160, 64), (4, 4, 0, 100)],
)
def test_single_source_output_grid(rf, ef, offset, size):
    lay = Layout((grid(10, 100),), ((rf, rf),), efield=(ef, ef))
    out = lay.output_grid
    assert out.grid.transform.c == L + offset
    assert out.grid.transform.f == T - offset
    assert (out.width, out.height) == (size, size)
    region = lay.tile_regions(0, 0, ef, ef)[0]
    assert (region.col_off, region.width) == (0, rf)


def test_efield_block_windows_centre_the_block():
    lay = Layout((grid(10, 200),), ((64, 64),), efield=(32, 32))
    cols, _ = lay.tile_starts(0, 0, 96, 32, 0)
    k0 = lay.output_grid.cell_origin[0]
    # block [k, k+32) reads [k-16, k+48): 16 pixels of context on each side
    assert cols.tolist() == [k0 - 16, k0 + 16, k0 + 48]
    with pytest.raises(GeometryError, match="aligned"):
        lay.tile_regions(0, 0, 16, 32)


def test_virginia_like_offset_grids_snap_to_shared_lines():
    g10 = grid(10, 200, x0=435730.0, y0=4179460.0, name="s10")
    g20 = grid(20, 100, x0=435720.0, y0=4179460.0, name="s20")
    lay = Layout((g10, g20), ((16, 16), (8, 8)), factor=2)
    assert lay.offset == (1, 0)
    t = lay.output_grid.grid.transform
    assert ((t.c - 435720.0) / 20).is_integer()
    assert extraction_factor([g10, g20]) == 2
    assert extraction_factor([g20, g10]) == 1
    assert extraction_factor([grid(10, 50), grid(15, 30)]) == 1


# ---------------------------------------------------------------- errors


def test_rejects_rotation_and_south_up():
    with pytest.raises(GeometryError, match="rotated"):
        Grid(Affine(10, 0.5, L, 0, -10, T), 10, 10)
    with pytest.raises(GeometryError, match="north-up"):
        Grid(Affine(10, 0, L, 0, 10, T), 10, 10)


def test_rejects_crs_mismatch_naming_both():
    a = grid(10, 50, crs=CRS.from_epsg(32631), name="source1.il")
    b = grid(20, 25, crs=CRS.from_epsg(32632), name="source2.il")
    with pytest.raises(CRSMismatchError, match=r"source2.il: CRS EPSG:32632 .* EPSG:32631"):
        Layout((a, b), ((4, 4), (2, 2)))


def test_rejects_bad_sizes_and_factor():
    g = grid(10, 50, name="source1 (a.tif)")
    with pytest.raises(InputError, match=r"^source1\.patch_size: 51×4 is larger than the image"):
        Layout((g,), ((51, 4),))
    with pytest.raises(InputError, match=r"^source1\.patch_size: 0×4 must be ≥ 1"):
        Layout((g,), ((0, 4),))
    with pytest.raises(InputError, match=r"^factor: 1\.5 is neither"):
        Layout((g,), ((4, 4),), factor=1.5)
    with pytest.raises(InputError, match=r"^spcscale: 1\.5 is neither"):
        Layout((g,), ((4, 4),), factor=1.5, factor_key="spcscale")


def test_no_overlap_is_an_error():
    a = grid(10, 50, name="a")
    b = grid(10, 50, x0=L + 10000, name="b")
    with pytest.raises(GeometryError, match="do not overlap"):
        _ = Layout((a, b), ((4, 4), (4, 4))).output_grid


# ---------------------------------------------------------------- invariants (property tests)


def serving_layout(grids, fields):
    """Layout on the extraction grid G and its output grid; skips draws without overlap."""
    lay = Layout(tuple(grids), tuple(fields), factor=extraction_factor(grids))
    try:
        out = lay.output_grid
    except GeometryError:
        assume(False)
        raise
    return lay, out


def window_extent(lay: Layout, source: int, col: int, row: int) -> tuple[float, ...]:
    g = lay.grids[source]
    rx, ry = lay.fields[source]
    sx, sy = g.spacing
    return (g.x0 + col * sx, g.x0 + (col + rx) * sx, g.y0 - row * sy, g.y0 - (row + ry) * sy)


@settings(max_examples=150, deadline=None)
@given(nested_sources(), st.data())
def test_i1_co_registration_in_extraction(sources, data):
    grids, fields = sources
    lay = Layout(tuple(grids), tuple(fields), factor=extraction_factor(grids))
    left, bottom, right, top = grids[0].bounds
    xs = np.array(data.draw(st.lists(st.floats(left, right), min_size=1, max_size=20)))
    ys = np.array(data.draw(st.lists(st.floats(bottom, top), min_size=len(xs),
                                     max_size=len(xs))))
    starts = lay.sample_windows(xs, ys)
    for n in range(len(xs)):
        extents = {window_extent(lay, i, int(c[n]), int(r[n])) for i, (c, r) in enumerate(starts)}
        assert len(extents) == 1, extents


@settings(max_examples=150, deadline=None)
@given(nested_sources())
def test_i1_co_registration_in_serving_and_validity(sources):
    grids, fields = sources
    lay, out = serving_layout(grids, fields)
    starts = [lay.tile_starts(0, 0, out.width, out.height, i) for i in range(len(grids))]
    for n in (0, out.width // 2, out.width - 1):
        m = min(n, out.height - 1)
        extents = {window_extent(lay, i, int(c[n]), int(r[m])) for i, (c, r) in enumerate(starts)}
        assert len(extents) == 1
    for i, (c, r) in enumerate(starts):
        g, (rx, ry) = grids[i], fields[i]
        assert c.min() >= 0 and c.max() + rx <= g.width
        assert r.min() >= 0 and r.max() + ry <= g.height
    # maximality: the cell just left of the output has a window outside some source
    k0 = out.cell_origin[0]
    assert any(lay.window_starts(np.array([k0 - 1]), 0, i)[0] < 0 for i in range(len(grids)))


@settings(max_examples=100, deadline=None)
@given(nested_sources(), st.data())
def test_i2_extraction_windows_are_serving_windows(sources, data):
    grids, fields = sources
    lay, out = serving_layout(grids, fields)
    col = data.draw(st.integers(0, out.width - 1))
    row = data.draw(st.integers(0, out.height - 1))
    fx, fy = data.draw(st.floats(0, 0.999)), data.draw(st.floats(0, 0.999))
    x, y = out.grid.transform @ (col + fx, row + fy)
    px, py = out.grid.pixel_of(x, y)
    assume((int(px), int(py)) == (col, row))  # skip points rounded onto a neighbour
    extracted = lay.sample_windows(np.array([x]), np.array([y]))
    for i in range(len(grids)):
        served_c, served_r = lay.tile_starts(col, row, 1, 1, i)
        assert (extracted[i][0][0], extracted[i][1][0]) == (served_c[0], served_r[0])


@settings(max_examples=100, deadline=None)
@given(nested_sources(), st.integers(1, 7), st.integers(1, 7))
def test_i4_tiles_do_not_change_windows(sources, tile_x, tile_y):
    grids, fields = sources
    lay, out = serving_layout(grids, fields)
    for i in range(len(grids)):
        full_c, full_r = lay.tile_starts(0, 0, out.width, out.height, i)
        for c0 in range(0, out.width, tile_x):
            w = min(tile_x, out.width - c0)
            c, _ = lay.tile_starts(c0, 0, w, 1, i)
            assert np.array_equal(c, full_c[c0:c0 + w])
        for r0 in range(0, out.height, tile_y):
            h = min(tile_y, out.height - r0)
            _, r = lay.tile_starts(0, r0, 1, h, i)
            assert np.array_equal(r, full_r[r0:r0 + h])


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([2, 3, 4]),
    st.integers(1, 6),
    st.sampled_from([1.0, 10.0, 20.0]),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_i5_source_order_gives_one_grid_and_windows(ratio, coarse_rf, unit, sx, sy):
    fine = grid(unit, 40 * ratio + sx, 36 * ratio + sy, name="fine")
    coarse = grid(unit * ratio, 40, 36, x0=L + 0.0, name="coarse")
    fine_rf = coarse_rf * ratio
    a = Layout((coarse, fine), ((coarse_rf, coarse_rf), (fine_rf, fine_rf)))
    b = Layout((fine, coarse), ((fine_rf, fine_rf), (coarse_rf, coarse_rf)), factor=ratio)
    oa, ob = a.output_grid, b.output_grid
    assert oa.grid.transform.almost_equals(ob.grid.transform)
    assert (oa.width, oa.height) == (ob.width, ob.height)
    for ia, ib in ((0, 1), (1, 0)):
        ca, ra = a.tile_starts(0, 0, oa.width, oa.height, ia)
        cb, rb = b.tile_starts(0, 0, ob.width, ob.height, ib)
        assert np.array_equal(ca, cb) and np.array_equal(ra, rb)


# ---------------------------------------------------------------- tiles, blocks, boxes, ratios


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(1, 300), data=st.data())
def test_tiles_and_blocks_cover_the_box_once(width, height, data):
    """Tiles align on ef and cover the box once; blocks are rectangles of one tile row."""
    from terrapatch.tiling import align_size, crop_box, plan_blocks, plan_tiles

    ex, ey = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    x0, y0 = data.draw(st.integers(-20, width - 1)), data.draw(st.integers(-20, height - 1))
    box, _ = crop_box((x0, y0, data.draw(st.integers(max(1, 1 - x0), 400)),
                       data.draw(st.integers(max(1, 1 - y0), 400))), width, height)
    size = align_size((data.draw(st.integers(1, 90)), data.draw(st.integers(1, 90))), (ex, ey))
    assert size[0] % ex == 0 and size[1] % ey == 0
    tiles = plan_tiles(width, height, box, size, (ex, ey))
    covered = np.zeros((height, width), dtype=np.int64)
    for t in tiles:
        c, r, w, h = t.target
        covered[r:r + h, c:c + w] += 1
        wc, wr, ww, wh = t.window
        assert wc % ex == 0 and wr % ey == 0
        assert ww % ex == 0 or wc + ww == width
        assert wh % ey == 0 or wr + wh == height
        assert wc <= c and wr <= r and c + w <= wc + ww and r + h <= wr + wh
    bx, by, bw, bh = box
    assert covered[by:by + bh, bx:bx + bw].min() == 1 and covered.sum() == bw * bh
    n = data.draw(st.integers(1, 10))
    blocks = plan_blocks(tiles, n)
    assert [t for b in blocks for t in b.tiles] == list(tiles)  # plan order kept
    for block in blocks:
        assert 1 <= len(block.tiles) <= n
        c, r, w, h = block.target
        assert {t.target[1] for t in block.tiles} == {r}
        assert {t.target[3] for t in block.tiles} == {h}
        assert sum(t.target[2] for t in block.tiles) == w  # contiguous, left to right
        xs = [t.target[0] for t in block.tiles]
        assert xs == sorted(xs) and xs[0] == c


def test_crop_box_errors_and_warning_flag():
    from terrapatch.tiling import crop_box

    assert crop_box(None, 10, 20) == ((0, 0, 10, 20), False)
    assert crop_box((-5, 2, 10, 100), 10, 20) == ((0, 2, 5, 18), True)
    with pytest.raises(GeometryError, match=r"box=10:0:5:5 does not overlap the output grid "
                                            r"\(10×20 pixels"):
        crop_box((10, 0, 5, 5), 10, 20)
    with pytest.raises(InputError, match=r"box: size 0×5 must be positive"):
        crop_box((0, 0, 0, 5), 10, 20)
    with pytest.raises(InputError, match=r"box: expected \(startx, starty, sizex, sizey\)"):
        crop_box((0, 0, 5), 10, 20)


def test_spacing_ratios_use_the_one_tolerance():
    from terrapatch.geometry import SNAP_TOLERANCE, ServingSteps, serving_steps, spacing_ratios

    g10, g20, g60 = grid(10, 60), grid(20, 30), grid(60, 10)
    assert spacing_ratios([g10, g20, g60], (60.0, 60.0)) == [(6, 6), (3, 3), (1, 1)]
    assert spacing_ratios([g10, g20], (20.0 * (1 + SNAP_TOLERANCE / 10), 20.0)) == [
        (2, 2), (1, 1)]
    assert spacing_ratios([g10, g20], (30.0, 30.0)) is None  # 30 / 20 is not an integer
    assert spacing_ratios([g10, g20], (10.0, 10.0)) is None  # 10 / 20 < 1
    # serving: spcscale 1 on 20 m source 1; patch-based falls back to the coarsest spacing
    assert serving_steps([g20, g10], 1, True) == ServingSteps(((1, 1), (2, 2)))
    assert serving_steps([g10, g20], 1, False) == ServingSteps(((2, 2), (1, 1)))
    # fully-convolutional at 10 m over a 20 m source: one unit is two output pixels
    assert serving_steps([g10, g20], 1, True) == ServingSteps(((2, 2), (1, 1)), (2, 2))
    # super-resolution: 10 m + 20 m into 2.5 m, one unit = one 20 m pixel = 8 output pixels
    from fractions import Fraction
    assert serving_steps([g10, g20], Fraction(1, 4), True) == ServingSteps(
        ((2, 2), (1, 1)), (8, 8))
    assert serving_steps([g10, g20], Fraction(1, 4), False) == ServingSteps(((2, 2), (1, 1)))


def test_plan_blocks_refuses_empty_blocks():
    from terrapatch.tiling import plan_blocks

    with pytest.raises(InputError, match=r"block_tiles: 0 must be ≥ 1"):
        plan_blocks((), 0)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0.5, 10.0, 28.5, 30.0, 1 / 3]), st.integers(-50, 50),
       st.integers(-50, 50), st.integers(-10**6, 10**6), st.floats(0.0, 0.999))
def test_xy_of_inverts_pixel_of(spacing, col, row, shift, offset):
    g = grid(spacing, 10, 10, x0=L + shift * spacing / 7, y0=T - shift * spacing / 3)
    x, y = g.xy_of(col, row, offset)
    cols, rows = g.pixel_of(x, y)
    assert (int(cols), int(rows)) == (col, row)
    cx, cy = g.xy_of(np.array([col]), np.array([row]))
    assert np.isclose(cx[0], g.x0 + (col + 0.5) * spacing)
    assert np.isclose(cy[0], g.y0 - (row + 0.5) * spacing)
