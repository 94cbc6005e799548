"""Assemble block GeoTIFFs into one GeoTIFF by copying their compressed tiles, unchanged.

The block sink's workers compress their blocks; decompressing and compressing every
tile again at the end would make the one assembling process the bottleneck the
workers were meant to remove. When the blocks are tiled like the final file (same
tile size, same creation options, block origins on the final's tile grid), each of
their internal tiles *is* a tile of the final file: :func:`copy_tiles` creates the
final GeoTIFF empty (GDAL, ``SPARSE_OK``: every tag, no tile), appends each block
tile's bytes as they are and writes the tile offsets and sizes into the final
file's first IFD. Pure I/O, in bounded memory (one tile at a time).

When the layout does not allow it (untiled or band-interleaved output, JPEG's shared
tables, tiles not on the grid, a classic TIFF that would pass 4 GiB) it returns
False and the caller decodes and re-encodes instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rasterio

from terrapatch.tiling import Block, Box

__all__ = ["can_copy_tiles", "copy_tiles"]

#: Compressions whose tiles are self-contained (no table shared in the IFD).
SELF_CONTAINED = {None, "none", "deflate", "lzw", "zstd", "lzma", "packbits", "lerc",
                  "lerc_deflate", "lerc_zstd", "webp"}
TILE_OFFSETS, TILE_BYTE_COUNTS = 324, 325
_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8


def can_copy_tiles(profile: dict[str, Any], blocks: Sequence[Block], box: Box) -> bool:
    """Whether every block lies on the final file's tile grid, tiled like it."""
    if not profile.get("tiled") or str(profile.get("interleave", "pixel")).lower() != "pixel":
        return False
    if str(profile.get("compress", "none")).lower() not in {str(c) for c in SELF_CONTAINED}:
        return False
    tx, ty = int(profile["blockxsize"]), int(profile["blockysize"])
    bx, by, bw, bh = box
    for block in blocks:
        c, r, w, h = block.target
        if (c - bx) % tx or (r - by) % ty:
            return False
        if (w % tx and c + w != bx + bw) or (h != ty and r + h != by + bh):
            return False
    return True


def _ifd_entries(handle: Any) -> tuple[str, bool, dict[int, tuple[int, int, int, int]]]:
    """Byte order, BigTIFF flag and ``tag → (type, count, value_or_offset, entry_pos)``."""
    handle.seek(0)
    head = handle.read(16)
    order = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(order + "H", head[2:4])[0]
    big = magic == 43
    if big:
        ifd = struct.unpack(order + "Q", head[8:16])[0]
    else:
        ifd = struct.unpack(order + "I", head[4:8])[0]
    handle.seek(ifd)
    count_fmt, entry_size = ("Q", 20) if big else ("H", 12)
    n = struct.unpack(order + count_fmt, handle.read(8 if big else 2))[0]
    entries = {}
    start = handle.tell()
    raw = handle.read(n * entry_size)
    for i in range(n):
        chunk = raw[i * entry_size:(i + 1) * entry_size]
        if big:
            tag, typ, count, value = struct.unpack(order + "HHQQ", chunk)
        else:
            tag, typ, count, value = struct.unpack(order + "HHII", chunk)
        entries[tag] = (typ, count, value, start + i * entry_size)
    return order, big, entries


def _write_array(handle: Any, order: str, big: bool, entry: tuple[int, int, int, int],
                 values: Sequence[int]) -> None:
    """Write ``values`` into a TIFF array tag, inline or at its offset."""
    typ, count, value, position = entry
    fmt, _size = _TYPES[typ]
    if count != len(values):
        raise ValueError(f"tag holds {count} values, {len(values)} given")
    data = struct.pack(f"{order}{count}{fmt}", *values)
    inline = 8 if big else 4
    if len(data) <= inline:
        handle.seek(position + (12 if big else 8))
        handle.write(data.ljust(inline, b"\0"))
    else:
        handle.seek(value)
        handle.write(data)


def copy_tiles(blocks: Sequence[Block], block_paths: Sequence[Path], box: Box,
               profile: dict[str, Any], path: Path,
               describe: Callable[[Any], None] | None = None) -> bool:
    """Write ``path`` (profile of the whole box) from the blocks' compressed tiles.

    ``describe`` is called with the new dataset open for writing (colour table, tags).
    Returns False, having written nothing useful, when the layout does not allow it.
    """
    if not can_copy_tiles(profile, blocks, box):
        return False
    tx, ty = int(profile["blockxsize"]), int(profile["blockysize"])
    bx, by, bw, bh = box
    across, down = -(-bw // tx), -(-bh // ty)
    with rasterio.open(path, "w", sparse_ok=True, **profile) as dataset:
        if describe is not None:
            describe(dataset)
    offsets = [0] * (across * down)
    sizes = [0] * (across * down)
    with open(path, "r+b") as out:
        order, big, entries = _ifd_entries(out)
        if TILE_OFFSETS not in entries or TILE_BYTE_COUNTS not in entries \
                or entries[TILE_OFFSETS][1] != across * down:
            return False
        limit = 2**64 if big else 2**32
        out.seek(0, os.SEEK_END)
        position = out.tell()
        for block, block_path in zip(blocks, block_paths, strict=True):
            c, r, w, _h = block.target
            col0, row = (c - bx) // tx, (r - by) // ty
            with rasterio.open(block_path) as src, open(block_path, "rb") as raw:
                if src.block_shapes[0] != (ty, tx) or src.profile.get("tiled") is not True:
                    return False
                for k in range(-(-w // tx)):
                    offset = src.get_tag_item(f"BLOCK_OFFSET_{k}_0", "TIFF", bidx=1)
                    size = src.get_tag_item(f"BLOCK_SIZE_{k}_0", "TIFF", bidx=1)
                    index = row * across + col0 + k
                    if not offset or not size:  # a sparse tile: leave it sparse
                        continue
                    raw.seek(int(offset))
                    data = raw.read(int(size))
                    if position + len(data) >= limit:
                        return False
                    out.write(data)
                    offsets[index], sizes[index] = position, len(data)
                    position += len(data)
        _write_array(out, order, big, entries[TILE_OFFSETS], offsets)
        _write_array(out, order, big, entries[TILE_BYTE_COUNTS], sizes)
    return True
