"""Hypothesis strategies for geometry tests: random nested grids with their receptive fields.

These are the draws terrapatch's own property tests use (invariants I1–I5 of
docs/geometry.md); users' tests of their own layouts can use them too. Needs
``hypothesis`` (a development dependency).
"""

from __future__ import annotations

from typing import Any

from affine import Affine
from hypothesis import strategies as st

from terrapatch.geometry import Grid

__all__ = ["grid", "nested_sources"]

#: Outer corner of the grids drawn.
CORNER = (300000.0, 5000000.0)


def grid(spacing: float, width: int, height: int | None = None, x0: float = CORNER[0],
         y0: float = CORNER[1], name: str = "g", crs: Any = None) -> Grid:
    """A north-up grid of square pixels with its outer corner at ``(x0, y0)``."""
    return Grid(Affine(spacing, 0, x0, 0, -spacing, y0), width, height or width, crs, name)


@st.composite
def nested_sources(draw: st.DrawFn, bases: tuple[int, ...] = (2, 3),
                   units: tuple[float, ...] = (0.5, 1.0, 10.0, 28.5, 30.0),
                   max_sources: int = 3) -> tuple[list[Grid], list[tuple[int, int]]]:
    """2 to ``max_sources`` sources on nested grids, with fields of equal ground extent.

    Spacings are ``unit · base**p`` (``p`` in 0..2, source 1 any of them); corners are
    shifted by whole coarse pixels so that the grids nest; each source's receptive
    field spans the same ground (invariant I1's hypotheses). Returns ``(grids,
    fields)``, source 1 first.
    """
    base = draw(st.sampled_from(bases))
    unit = draw(st.sampled_from(units))
    n = draw(st.integers(2, max_sources))
    powers = [draw(st.integers(0, 2)) for _ in range(n)]
    extent_cells = draw(st.integers(1, 4)) * base ** max(powers)  # patch extent, in units
    corner_x = draw(st.integers(-5, 5)) * base ** 2 * unit + CORNER[0]
    corner_y = draw(st.integers(-5, 5)) * base ** 2 * unit + CORNER[1]
    grids, fields = [], []
    size_units = draw(st.integers(4, 10)) * extent_cells
    for i, p in enumerate(powers):
        k = base ** p
        shift_x, shift_y = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        x0 = corner_x + shift_x * k * unit
        y0 = corner_y - shift_y * k * unit
        width = size_units // k + draw(st.integers(0, 3))
        height = size_units // k + draw(st.integers(0, 3))
        grids.append(grid(k * unit, width, height, x0, y0, name=f"s{i + 1}"))
        fields.append((extent_cells // k, extent_cells // k))
    return grids, fields
