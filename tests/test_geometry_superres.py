"""Geometry at fractional scales (spcscale = 1/k): parsing, nesting and invariants I1–I5."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from terrapatch.errors import GeometryError, InputError
from terrapatch.geometry import Layout, serving_steps
from terrapatch.scales import check_spcscale, format_scale
from terrapatch.testing.strategies import grid, nested_sources

# ---------------------------------------------------------------- the scale parameter


@pytest.mark.parametrize("value, expected", [
    (1, Fraction(1)), (3, Fraction(3)), (2.0, Fraction(2)), ("4", Fraction(4)),
    (0.5, Fraction(1, 2)), (0.25, Fraction(1, 4)), ("0.25", Fraction(1, 4)),
    (1 / 3, Fraction(1, 3)), (0.333333333, Fraction(1, 3)), ("1/8", Fraction(1, 8)),
    (Fraction(1, 5), Fraction(1, 5)),
])
def test_valid_scales(value, expected):
    assert check_spcscale(value) == expected


@pytest.mark.parametrize("value, message", [
    (1.5, r"spcscale: 1.5 is neither an integer k nor 1/k .* are 1 or 2$"),
    (0.3, r"spcscale: 0.3 .* nearest valid values are 0.25 or 0.333333$"),
    (0.7, r"spcscale: 0.7 .* nearest valid values are 0.5 or 1$"),
    (2.5, r"nearest valid values are 2 or 3$"),
    (0, r"spcscale: 0 must be positive"),
    (-2, r"spcscale: -2 must be positive"),
    (float("nan"), r"spcscale: nan must be positive"),
    ("half", r"spcscale: 'half' is not a number"),
    (True, r"spcscale: True is not a number"),
    (1 / 100, r"nearest valid values are 0.015625"),  # past k = 64
])
def test_invalid_scales_name_the_nearest_valid_ones(value, message):
    with pytest.raises(InputError, match=message):
        check_spcscale(value)


def test_format_scale_round_trips():
    for k in range(2, 65):
        assert check_spcscale(format_scale(Fraction(1, k))) == Fraction(1, k)
    assert format_scale(2) == "2" and format_scale(Fraction(1, 4)) == "0.25"


def test_extraction_keeps_integer_factors():
    g = grid(10.0, 50)
    from terrapatch.scales import check_factor

    with pytest.raises(InputError, match=r"grid\.factor: 0\.5 is not a positive integer"):
        check_factor(0.5, "grid.factor")
    assert Layout((g,), ((4, 4),), factor=0.5).factor == Fraction(1, 2)


# ---------------------------------------------------------------- hand-checked cases


def test_single_source_quarter_scale_by_hand():
    """10 m source, rf 3, ef 4 at 2.5 m: 4×4 output pixels per source pixel."""
    g = grid(10.0, 20, 12, x0=1000.0, y0=2000.0)
    lay = Layout((g,), ((3, 3),), factor=0.25, efield=(4, 4))
    out = lay.output_grid
    # the first source pixel with its 3×3 neighbourhood inside is pixel 1
    assert out.grid.transform.almost_equals(
        type(out.grid.transform)(2.5, 0, 1010.0, 0, -2.5, 1990.0))
    assert (out.width, out.height) == (4 * 18, 4 * 10)
    cols, rows = lay.tile_starts(0, 0, 8, 4, 0)
    assert cols.tolist() == [0, 1] and rows.tolist() == [0]  # one 3×3 window per source px
    assert lay.tile_regions(0, 0, 8, 8)[0] == Window(0, 0, 4, 4)


def test_patch_based_cell_takes_its_source_pixel_window():
    g = grid(10.0, 30)
    coarse = Layout((g,), ((6, 6),))
    fine = Layout((g,), ((6, 6),), factor=Fraction(1, 3))
    cells = np.arange(-6, 80)
    assert np.array_equal(fine.window_starts(cells, 0, 0),
                          coarse.window_starts(cells // 3, 0, 0))


def test_ten_and_twenty_metres_into_five_by_hand():
    """10 m + 20 m into 5 m with blocks of 4 output px = one 20 m pixel (ef 4)."""
    g10 = grid(10.0, 40, 40, x0=0.0, y0=400.0)
    g20 = grid(20.0, 20, 20, x0=0.0, y0=400.0)
    lay = Layout((g10, g20), ((4, 4), (3, 3)), factor=0.5, efield=(4, 4))
    out = lay.output_grid
    # the first 20 m pixel with a 3×3 neighbourhood is pixel 1, at x = 20 m
    assert out.grid.transform.c == 20.0 and out.grid.spacing == (5.0, 5.0)
    assert out.width == 4 * 18
    c10, _ = lay.tile_starts(0, 0, 8, 4, 0)
    c20, _ = lay.tile_starts(0, 0, 8, 4, 1)
    assert c10.tolist() == [1, 3] and c20.tolist() == [0, 1]  # both cover x ∈ [10, 50) etc.


def test_blocks_start_on_lines_shared_by_every_source():
    # source 2's corner is one 10 m pixel off source 1's: its 20 m lines are odd 10 m lines
    g10 = grid(10.0, 40, x0=0.0, y0=400.0)
    g20 = grid(20.0, 19, x0=10.0, y0=390.0)
    lay = Layout((g10, g20), ((4, 4), (3, 3)), factor=0.5, efield=(4, 4))
    origin = lay.output_grid.grid.transform
    assert (origin.c - 10.0) % 20.0 == 0 and (390.0 - origin.f) % 20.0 == 0


def test_no_overlap_at_fractional_scale_is_an_error():
    g10, g20 = grid(10.0, 10), grid(20.0, 5, x0=300000.0 + 80.0)
    with pytest.raises(GeometryError, match="no output pixel has its full receptive field"):
        _ = Layout((g10, g20), ((6, 6), (3, 3)), factor=0.5).output_grid


# ---------------------------------------------------------------- invariants


@st.composite
def super_resolution_layouts(draw):
    """Nested sources served at 1/k with blocks of whole serving units (FCN SR models).

    Every source's field spans the block's units plus the same ground context on
    each side, so the fields have equal ground extent (I1's hypotheses).
    """
    grids, _ = draw(nested_sources(max_sources=3))
    k = draw(st.sampled_from([2, 3, 4]))
    steps = serving_steps(grids, Fraction(1, k), True)
    assume(steps is not None)
    units = draw(st.integers(1, 3))
    context = draw(st.integers(0, 2))
    fields = tuple((d[0] * (units + 2 * context), d[1] * (units + 2 * context))
                   for d in steps.sources)
    efield = (steps.outputs[0] * units, steps.outputs[1] * units)
    assume(all(rx <= g.width and ry <= g.height for g, (rx, ry) in zip(grids, fields,
                                                                          strict=True)))
    try:
        lay = Layout(tuple(grids), fields, factor=Fraction(1, k), efield=efield)
        out = lay.output_grid
    except GeometryError:
        assume(False)
        raise
    # Tiny draws may have no block on lines shared by every source: the layout then
    # centres windows to the nearest pixel, outside I1's hypotheses.
    t = out.grid.transform
    assume(all(on_lines(t.c, g.x0, g.spacing[0]) and on_lines(t.f, g.y0, g.spacing[1])
               for g in grids))
    return lay, out, k


def on_lines(value: float, origin: float, spacing: float) -> bool:
    u = (value - origin) / spacing
    return abs(u - round(u)) < 1e-6


def ground(lay: Layout, source: int, col: int, row: int) -> tuple[float, float, float, float]:
    g = lay.grids[source]
    rx, ry = lay.fields[source]
    sx, sy = g.spacing
    return (round(g.x0 + col * sx, 6), round(g.x0 + (col + rx) * sx, 6),
            round(g.y0 - row * sy, 6), round(g.y0 - (row + ry) * sy, 6))


@settings(max_examples=150, deadline=None)
@given(super_resolution_layouts())
def test_output_pixels_nest_in_source_one_pixels(case):
    lay, out, k = case
    ref = lay.grids[0]
    t = out.grid.transform
    assert np.isclose(t.a * k, ref.spacing[0]) and np.isclose(-t.e * k, ref.spacing[1])
    # the output's corner and every k-th output line are source-1 grid lines
    for edge in range(0, out.width + 1, k):
        u = (t.c + edge * t.a - ref.x0) / ref.spacing[0]
        assert abs(u - round(u)) < 1e-6
    for edge in range(0, out.height + 1, k):
        u = (ref.y0 - (t.f + edge * t.e)) / ref.spacing[1]
        assert abs(u - round(u)) < 1e-6


@settings(max_examples=150, deadline=None)
@given(super_resolution_layouts())
def test_i1_block_windows_cover_the_same_ground_centred_on_the_block(case):
    lay, out, _ = case
    ex, ey = lay.efield
    starts = [lay.tile_starts(0, 0, out.width // ex * ex, out.height // ey * ey, i)
              for i in range(len(lay.grids))]
    t = out.grid.transform
    for n in {0, len(starts[0][0]) // 2, len(starts[0][0]) - 1}:
        m = min(n, len(starts[0][1]) - 1)
        extents = {ground(lay, i, int(c[n]), int(r[m])) for i, (c, r) in enumerate(starts)}
        assert len(extents) == 1, extents
        left, right, top, bottom = extents.pop()
        block_x = t.c + (n * ex + ex / 2) * t.a
        block_y = t.f + (m * ey + ey / 2) * t.e
        assert np.isclose((left + right) / 2, block_x) and np.isclose((top + bottom) / 2, block_y)
    for i, (c, r) in enumerate(starts):  # validity: inside every source
        g, (rx, ry) = lay.grids[i], lay.fields[i]
        assert c.min() >= 0 and c.max() + rx <= g.width
        assert r.min() >= 0 and r.max() + ry <= g.height


@settings(max_examples=100, deadline=None)
@given(nested_sources(), st.sampled_from([2, 3, 4]), st.data())
def test_i2_extracted_patch_is_what_every_nested_output_pixel_is_served(sources, k, data):
    """A sample extracted at f = 1 feeds patch-based serving at 1/k for every output pixel
    inside the sample's source-1 pixel."""
    grids, fields = sources
    extraction = Layout(tuple(grids), tuple(fields), factor=1)
    serving = Layout(tuple(grids), tuple(fields), factor=Fraction(1, k))
    try:
        out = serving.output_grid
    except GeometryError:
        assume(False)
        raise
    col = data.draw(st.integers(0, out.width - 1))
    row = data.draw(st.integers(0, out.height - 1))
    fx, fy = data.draw(st.floats(0.01, 0.99)), data.draw(st.floats(0.01, 0.99))
    x, y = out.grid.transform @ (col + fx, row + fy)
    extracted = extraction.sample_windows(np.array([x]), np.array([y]))
    for i in range(len(grids)):
        served_c, served_r = serving.tile_starts(col, row, 1, 1, i)
        assert (extracted[i][0][0], extracted[i][1][0]) == (served_c[0], served_r[0])


@settings(max_examples=100, deadline=None)
@given(super_resolution_layouts(), st.integers(1, 4))
def test_i3_one_large_block_reads_what_its_small_blocks_read(case, m):
    """An SR block of m units reads the union of the windows of its m one-unit blocks."""
    lay, out, k = case
    ex, ey = lay.efield
    steps = serving_steps(lay.grids, lay.factor, True)
    assert steps is not None
    small_e = steps.outputs
    units = (ex // small_e[0], ey // small_e[1])
    small_fields = tuple((rx - d[0] * (units[0] - 1), ry - d[1] * (units[1] - 1))
                         for (rx, ry), d in zip(lay.fields, steps.sources, strict=True))
    small = Layout(lay.grids, small_fields, factor=lay.factor, efield=small_e)
    assume(small.output_grid.grid.transform.almost_equals(out.grid.transform))
    width = min(out.width, ex * m)
    height = min(out.height, ey)
    assert lay.tile_regions(0, 0, width, height) == small.tile_regions(0, 0, width, height)
    assert k >= 2


@settings(max_examples=100, deadline=None)
@given(super_resolution_layouts(), st.integers(1, 5), st.integers(1, 5))
def test_i4_tiles_do_not_change_windows(case, tx, ty):
    lay, out, _ = case
    ex, ey = lay.efield
    width, height = out.width // ex * ex, out.height // ey * ey
    for i in range(len(lay.grids)):
        full_c, full_r = lay.tile_starts(0, 0, width, height, i)
        for c0 in range(0, width, tx * ex):
            w = min(tx * ex, width - c0)
            c, _ = lay.tile_starts(c0, 0, w, ey, i)
            assert np.array_equal(c, full_c[c0 // ex:(c0 + w) // ex])
        for r0 in range(0, height, ty * ey):
            h = min(ty * ey, height - r0)
            _, r = lay.tile_starts(0, r0, ex, h, i)
            assert np.array_equal(r, full_r[r0 // ey:(r0 + h) // ey])


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([2, 3]), st.sampled_from([2, 4]), st.integers(1, 3), st.integers(0, 2),
       st.sampled_from([1.0, 10.0]), st.integers(0, 3), st.integers(0, 3))
def test_i5_source_order_gives_one_grid_and_windows(ratio, k, units, context, unit, sx, sy):
    """Fine + coarse into a grid k times finer than the fine one, either source first."""
    fine = grid(unit, 30 * ratio + sx, 28 * ratio + sy, name="fine")
    coarse = grid(unit * ratio, 30, 28, name="coarse")
    span = units + 2 * context
    fields_fine, fields_coarse = (span * ratio, span * ratio), (span, span)
    e = (units * ratio * k, units * ratio * k)  # output pixels per block
    a = Layout((fine, coarse), (fields_fine, fields_coarse), factor=Fraction(1, k), efield=e)
    b = Layout((coarse, fine), (fields_coarse, fields_fine), factor=Fraction(1, k * ratio),
               efield=e)
    oa, ob = a.output_grid, b.output_grid
    assert oa.grid.transform.almost_equals(ob.grid.transform)
    assert (oa.width, oa.height) == (ob.width, ob.height)
    for ia, ib in ((0, 1), (1, 0)):
        assert all(np.array_equal(u, v) for u, v in zip(
            a.tile_starts(0, 0, oa.width, oa.height, ia),
            b.tile_starts(0, 0, ob.width, ob.height, ib), strict=True))
