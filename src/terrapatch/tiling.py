"""Output tiling: the box served, tiles aligned on the expression field, blocks of tiles.

:func:`crop_box` crops a user's box to the output grid; :func:`plan_tiles` cuts it into
:class:`Tile` objects (computed windows aligned on the expression field, optionally
overlapping by a margin, and the part each writes); :func:`plan_blocks` groups tiles
into :class:`Block` objects (one cluster task, one block file). All in output-grid
pixels; the windows each tile reads come from :class:`terrapatch.geometry.Layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from terrapatch.errors import GeometryError, InputError

__all__ = ["Block", "Box", "Tile", "align_size", "crop_box", "plan_blocks", "plan_tiles"]

#: ``(col_off, row_off, width, height)`` in output-grid pixels.
Box = tuple[int, int, int, int]


def crop_box(box: Sequence[int] | None, width: int, height: int) -> tuple[Box, bool]:
    """Crop a ``(startx, starty, sizex, sizey)`` box to a ``width × height`` grid.

    Returns the cropped box and whether cropping changed it; None gives the whole
    grid.

    Raises
    ------
    InputError
        If the box is malformed or has a non-positive size.
    GeometryError
        If the box does not overlap the grid.
    """
    if box is None:
        return (0, 0, width, height), False
    if len(box) != 4:
        raise InputError(f"box: expected (startx, starty, sizex, sizey), got {box!r}")
    bx, by, bw, bh = (int(v) for v in box)
    if bw < 1 or bh < 1:
        raise InputError(f"box: size {bw}×{bh} must be positive")
    x0, y0 = max(bx, 0), max(by, 0)
    x1, y1 = min(bx + bw, width), min(by + bh, height)
    if x1 <= x0 or y1 <= y0:
        raise GeometryError(
            f"box={bx}:{by}:{bw}:{bh} does not overlap the output grid ({width}×{height} "
            "pixels; box coordinates are output-grid pixel indices)"
        )
    cropped = (x0, y0, x1 - x0, y1 - y0)
    return cropped, cropped != (bx, by, bw, bh)


def align_size(size: tuple[int, int], efield: tuple[int, int]) -> tuple[int, int]:
    """Enlarge a tile size to the next multiple of the expression field, per axis."""
    return (-(-size[0] // efield[0]) * efield[0], -(-size[1] // efield[1]) * efield[1])


@dataclass(frozen=True)
class Tile:
    """One unit of work: an aligned block of output pixels and the part of it to write.

    Attributes
    ----------
    index
        Position in the plan.
    window
        ``(col_off, row_off, width, height)`` computed, in output-grid pixels; aligned
        on the expression field.
    target
        ``(col_off, row_off, width, height)`` written (inside ``window`` and the box).
    """

    index: int
    window: Box
    target: Box


def plan_tiles(width: int, height: int, box: Box, tile_size: tuple[int, int],
               efield: tuple[int, int], margin: tuple[int, int] = (0, 0),
               computed: tuple[int, int] | None = None) -> tuple[Tile, ...]:
    """Cut ``box`` of a ``width × height`` output grid into tiles aligned on ``efield``.

    The tile grid is anchored at the box origin (rounded down to the expression
    field), so tiles match the blocks of the written file; each tile's window is its
    target enlarged by ``margin`` output pixels on every side (the halo of a
    same-padded model, computed and cropped away), then to the expression field,
    and cropped to the computable extent ``computed`` (default: the grid). Tiles are
    in row-major order.
    """
    bx, by, bw, bh = box
    tx, ty = tile_size
    ex, ey = efield
    mx, my = margin
    cw, ch = computed or (width, height)
    ax, ay = bx - bx % ex, by - by % ey
    tiles: list[Tile] = []
    for y0 in range(ay, by + bh, ty):
        for x0 in range(ax, bx + bw, tx):
            tcx0, tcy0 = max(x0, bx), max(y0, by)
            tcx1, tcy1 = min(x0 + tx, bx + bw), min(y0 + ty, by + bh)
            if tcx1 <= tcx0 or tcy1 <= tcy0:
                continue
            wx0, wy0 = max(0, tcx0 - mx), max(0, tcy0 - my)
            wx0, wy0 = wx0 - wx0 % ex, wy0 - wy0 % ey
            wx1 = min(cw, -(-(tcx1 + mx) // ex) * ex)
            wy1 = min(ch, -(-(tcy1 + my) // ey) * ey)
            tiles.append(Tile(len(tiles), (wx0, wy0, wx1 - wx0, wy1 - wy0),
                              (tcx0, tcy0, tcx1 - tcx0, tcy1 - tcy0)))
    return tuple(tiles)


@dataclass(frozen=True)
class Block:
    """Consecutive tiles of one tile row: one task on a cluster, one file of a block sink.

    Attributes
    ----------
    index
        Position in the plan.
    tiles
        The tiles, left to right.
    """

    index: int
    tiles: tuple[Tile, ...]

    @property
    def target(self) -> Box:
        """``(col_off, row_off, width, height)`` covered by the tiles' targets."""
        first, last = self.tiles[0].target, self.tiles[-1].target
        return (first[0], first[1], last[0] + last[2] - first[0], first[3])


def plan_blocks(tiles: Sequence[Tile], block_tiles: int) -> tuple[Block, ...]:
    """Group a row-major tile plan into blocks of at most ``block_tiles`` tiles of one row.

    A block never spans two tile rows, so its targets form one rectangle.
    """
    if block_tiles < 1:
        raise InputError(f"block_tiles: {block_tiles!r} must be ≥ 1")
    blocks: list[Block] = []
    current: list[Tile] = []
    for tile in tiles:
        if current and (tile.target[1] != current[0].target[1] or len(current) == block_tiles):
            blocks.append(Block(len(blocks), tuple(current)))
            current = []
        current.append(tile)
    if current:
        blocks.append(Block(len(blocks), tuple(current)))
    return tuple(blocks)
