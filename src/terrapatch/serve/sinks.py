"""Where finished tiles go: one ordered GeoTIFF writer, or block files, and their assembly.

Two sinks take the tiles of a map:

- :class:`OrderedWriter` writes tiles in plan order into one GeoTIFF (one writer:
  the local pipeline's writer thread, or a cluster client receiving pixels).
- :class:`BlockStore` writes each block (consecutive tiles of one tile row) as its
  own tiled GeoTIFF in the pending folder's ``blocks/``, atomically; cluster
  workers write their blocks themselves and report a :class:`BlockStatus`, never
  pixels. :class:`BlockSink` feeds a store from the local pipeline.

At the end, blocks are assembled by a streaming copy in tile order
(:func:`assemble_blocks`, one tile in memory at a time, the same writes as the
ordered writer, hence the same file), or kept as a VRT mosaic (:func:`write_vrt`).
A GeoTIFF becomes a Cloud-Optimized GeoTIFF with overviews by GDAL's COG driver
(:func:`to_cog`), which streams too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

from terrapatch.serve.journal import BlockStatus
from terrapatch.tiling import Block, Box, Tile
from terrapatch.writer import MapFormat

__all__ = [
    "BlockSink",
    "BlockStore",
    "OrderedWriter",
    "assemble_blocks",
    "to_cog",
    "write_vrt",
]


class OrderedWriter:
    """Write tiles of a map box, in plan order, into one GeoTIFF.

    Parameters
    ----------
    path
        File to write (a pending file).
    profile
        rasterio profile of the whole box.
    box
        ``(col_off, row_off, width, height)`` of the box in the output grid.
    fill
        Value of tiles given as None (skipped for nodata).
    map_format
        Colour table and category names to attach.
    """

    def __init__(self, path: Path, profile: dict[str, Any], box: Box, fill: Any,
                 map_format: MapFormat | None = None) -> None:
        self.path = path
        self.profile = profile
        self.box = box
        self.fill = fill
        self.map_format = map_format
        self._dataset: Any = None

    def __enter__(self) -> OrderedWriter:
        self._dataset = rasterio.open(self.path, "w", **self.profile)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._dataset is None:
            return
        try:
            if exc is None and self.map_format is not None:
                describe_classes(self._dataset, self.map_format)
        finally:
            self._dataset.close()
            self._dataset = None

    def put(self, tile: Tile, pixels: np.ndarray | None) -> None:
        """Write a tile's ``(bands, rows, cols)`` pixels (None: the background)."""
        tc, tr, tw, th = tile.target
        if pixels is None:
            pixels = np.full((self.profile["count"], th, tw), self.fill,
                             dtype=self.profile["dtype"])
        self._dataset.write(pixels, window=Window(tc - self.box[0], tr - self.box[1], tw, th))


def describe_classes(dataset: Any, map_format: MapFormat) -> None:
    """Attach a class map's colour table to band 1 of an open dataset.

    Its category names go to the finished map's PAM sidecar, where GDAL and QGIS read
    them (:func:`terrapatch.writer.apply_legend`), or into a VRT's XML.
    """
    if map_format.colormap:
        dataset.write_colormap(1, map_format.colormap)


@dataclass(frozen=True)
class BlockStore:
    """Block files of one map in a pending folder (picklable: workers write into it).

    Attributes
    ----------
    folder
        Absolute path of the ``blocks/`` folder.
    map_format
        Format of the map (block files use its GeoTIFF creation options).
    bands, dtype
        Bands and pixel type of the map.
    crs, grid_transform
        CRS and transform of the full output grid.
    nodata
        Nodata value written, or None.
    fill
        Value of tiles skipped for nodata.
    tiling
        ``(x, y)`` internal tile size of the final map, given to every block file so
        that their tiles can be copied as they are (None: the map is not tiled).
    """

    folder: Path
    map_format: MapFormat
    bands: int
    dtype: str
    crs: Any
    grid_transform: Affine
    nodata: float | None
    fill: Any
    tiling: tuple[int, int] | None = None

    @staticmethod
    def name(block: Block) -> str:
        """File name of a block."""
        return f"b{block.index:07d}.tif"

    def path(self, block: Block) -> Path:
        """Path of a block's file."""
        return self.folder / self.name(block)

    def write(self, block: Block, pixels: Sequence[np.ndarray | None],
              timings: tuple[float, float] = (0.0, 0.0)) -> BlockStatus:
        """Write a block's tiles (``(bands, rows, cols)`` each, None: background) atomically.

        Parameters
        ----------
        block
            The block.
        pixels
            Pixels of each tile of the block, in the output pixel type.
        timings
            Read and model seconds spent on the block, to report.
        """
        start = time.perf_counter()
        bc, br, bw, bh = block.target
        transform = self.grid_transform @ Affine.translation(bc, br)
        profile = self.map_format.tiff_profile(bw, bh, self.bands, np.dtype(self.dtype),
                                               self.crs, transform, self.nodata)
        if self.tiling is not None:
            profile.update(tiled=True, blockxsize=self.tiling[0], blockysize=self.tiling[1])
        final = self.path(block)
        part = final.with_name(f".{final.name}.{os.getpid()}.part.tif")
        skipped = 0
        try:
            with rasterio.open(part, "w", **profile) as dataset:
                for tile, values in zip(block.tiles, pixels, strict=True):
                    tc, tr, tw, th = tile.target
                    if values is None:
                        skipped += 1
                        values = np.full((self.bands, th, tw), self.fill, dtype=self.dtype)
                    dataset.write(values, window=Window(tc - bc, tr - br, tw, th))
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return BlockStatus(block.index, final.name, final.stat().st_size, timings[0],
                           timings[1], time.perf_counter() - start, skipped)


class BlockSink:
    """Collect the local pipeline's tiles into blocks; write each block when complete.

    Parameters
    ----------
    store
        Where blocks are written.
    blocks
        The blocks to compute, whose tiles arrive in order.
    on_block
        Called with each finished block's status (e.g. the journal's ``record``).
    """

    def __init__(self, store: BlockStore, blocks: Sequence[Block],
                 on_block: Any) -> None:
        self.store = store
        self.on_block = on_block
        self._block_of = {t.index: b for b in blocks for t in b.tiles}
        self._pending: dict[int, list[np.ndarray | None]] = {}

    def put(self, tile: Tile, pixels: np.ndarray | None) -> None:
        """Take a tile's pixels; write its block once the block's last tile arrived."""
        block = self._block_of[tile.index]
        buffer = self._pending.setdefault(block.index, [])
        buffer.append(pixels)
        if len(buffer) == len(block.tiles):
            del self._pending[block.index]
            self.on_block(self.store.write(block, buffer))


def assemble_blocks(store: BlockStore, blocks: Sequence[Block], writer: OrderedWriter) -> None:
    """Copy block files into an ordered writer, tile by tile, in plan order (re-encoding).

    The fallback of :func:`terrapatch.serve.tilecopy.copy_tiles`, which copies the
    compressed tiles when the blocks lie on the map's tile grid.
    """
    for block in blocks:
        bc, br = block.target[0], block.target[1]
        with rasterio.open(store.path(block)) as source:
            for tile in block.tiles:
                tc, tr, tw, th = tile.target
                writer.put(tile, source.read(window=Window(tc - bc, tr - br, tw, th)))


def to_cog(source: Path, destination: Path, map_format: MapFormat, dtype: np.dtype) -> None:
    """Copy a GeoTIFF (or VRT) into a Cloud-Optimized GeoTIFF with overviews (streaming)."""
    rasterio.shutil.copy(source, destination, driver="COG", **map_format.cog_options(dtype))


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16",
               "uint32": "UInt32", "int32": "Int32", "float32": "Float32",
               "float64": "Float64"}


def write_vrt(path: Path, store: BlockStore, blocks: Sequence[Block], box: Box,
              folder_name: str) -> None:
    """Write a VRT mosaic of the block files (referenced as ``folder_name/bNNN.tif``)."""
    bx, by, bw, bh = box
    transform = store.grid_transform @ Affine.translation(bx, by)
    gdal_type = _GDAL_TYPES[np.dtype(store.dtype).name]
    lines = [f'<VRTDataset rasterXSize="{bw}" rasterYSize="{bh}">']
    if store.crs is not None:
        lines.append(f"  <SRS>{escape(store.crs.to_wkt())}</SRS>")
    lines.append("  <GeoTransform>" + ", ".join(repr(float(v)) for v in transform.to_gdal())
                 + "</GeoTransform>")
    for band in range(1, store.bands + 1):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
        if store.nodata is not None:
            lines.append(f"    <NoDataValue>{store.nodata!r}</NoDataValue>")
        if band == 1:
            lines.extend(_vrt_classes(store.map_format))
        for block in blocks:
            c, r, w, h = block.target
            lines.append(
                '    <SimpleSource>'
                f'<SourceFilename relativeToVRT="1">{escape(folder_name)}/'
                f'{store.name(block)}</SourceFilename>'
                f'<SourceBand>{band}</SourceBand>'
                f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                f'<DstRect xOff="{c - bx}" yOff="{r - by}" xSize="{w}" ySize="{h}"/>'
                '</SimpleSource>'
            )
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _vrt_classes(map_format: MapFormat) -> list[str]:
    lines = []
    if map_format.colormap:
        lines.append("    <ColorInterp>Palette</ColorInterp>")
        lines.append("    <ColorTable>")
        for value in range(max(map_format.colormap) + 1):
            rgba = map_format.colormap.get(value, (0, 0, 0, 0))
            c4 = rgba[3] if len(rgba) == 4 else 255
            lines.append(f'      <Entry c1="{rgba[0]}" c2="{rgba[1]}" c3="{rgba[2]}" c4="{c4}"/>')
        lines.append("    </ColorTable>")
    if map_format.class_names:
        lines.append("    <CategoryNames>")
        lines.extend(f"      <Category>{escape(n)}</Category>" for n in map_format.class_names)
        lines.append("    </CategoryNames>")
    return lines
