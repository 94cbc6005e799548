"""The legend of a class map: colour table and category names, as QGIS shows them.

QGIS draws a raster that has a colour table with its "Paletted" renderer and labels
each entry with GDAL's *category names* of the band. A GeoTIFF holds the colour table
itself (rasterio's ``write_colormap``); GDAL keeps category names, which TIFF has no tag
for, in the file's PAM sidecar ``map.tif.aux.xml`` (``<CategoryNames>`` of
``<PAMRasterBand band="1">``). rasterio has no API for category names, so
:func:`apply_legend` writes that sidecar itself (merged into an existing one), which
GDAL, and so QGIS and ``gdalinfo``, read back. A map committed from a pending folder
must carry the sidecar along (:meth:`~terrapatch.writer.PendingOutput.commit` with
``sidecars=LEGEND_SIDECARS``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from terrapatch.errors import InputError

__all__ = ["LEGEND_DTYPES", "LEGEND_SIDECARS", "apply_legend", "legend_sidecar",
           "read_category_names"]

#: Pixel types a class map with a legend may have (GDAL colour tables need them).
LEGEND_DTYPES = ("uint8", "uint16")
#: Sidecar suffixes that carry a map's legend (GDAL's PAM file).
LEGEND_SIDECARS = (".aux.xml",)


def legend_sidecar(path: str | os.PathLike[str]) -> Path:
    """The PAM sidecar holding the category names of ``path``: ``map.tif.aux.xml``."""
    return Path(os.fspath(path) + LEGEND_SIDECARS[0])


def _colour_table(colormap: Mapping[int, Sequence[int]]) -> dict[int, tuple[int, ...]]:
    table: dict[int, tuple[int, ...]] = {}
    for value, colour in colormap.items():
        rgba = tuple(int(c) for c in colour)
        if int(value) < 0 or len(rgba) not in (3, 4) or not all(0 <= c <= 255 for c in rgba):
            raise InputError(f"colormap: entry {value!r}: {colour!r} is not a class value "
                             "≥ 0 with an (r, g, b[, a]) colour in 0..255")
        table[int(value)] = rgba if len(rgba) == 4 else (*rgba, 255)
    return table


def apply_legend(path: str | os.PathLike[str],
                 colormap: Mapping[int, Sequence[int]] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
    """Give the class map ``path`` (closed) a colour table and category names.

    Parameters
    ----------
    path
        A one-band ``uint8`` or ``uint16`` GeoTIFF, e.g. the finished map in its
        pending folder, before it is committed.
    colormap
        Class value → ``(r, g, b[, a])``; written into the file (skipped when the file
        already has these colours, so a COG keeps its layout), or None.
    class_names
        Category names, index = class value (``""`` for unused values); written to the
        PAM sidecar :func:`legend_sidecar`, merged into an existing one, or None.

    Raises
    ------
    InputError
        If the map has more than one band or another pixel type, or a colour is invalid.
    """
    import rasterio

    if not colormap and not class_names:
        return
    table = _colour_table(colormap) if colormap else None
    with rasterio.open(path) as dataset:
        dtype, count = dataset.dtypes[0], dataset.count
        current: dict[int, tuple[int, ...]] = {}
        if table:
            try:
                current = dict(dataset.colormap(1))
            except ValueError:  # no colour table yet
                current = {}
    if count != 1 or dtype not in LEGEND_DTYPES:
        raise InputError(f"colormap: a legend needs a one-band {' or '.join(LEGEND_DTYPES)} "
                         f"class map; {os.fspath(path)!r} has {count} band(s) of {dtype}")
    if table and any(current.get(k) != v for k, v in table.items()):
        with rasterio.open(path, "r+") as dataset:
            dataset.write_colormap(1, table)
    if class_names:
        _write_category_names(legend_sidecar(path), [str(n) for n in class_names])


def _write_category_names(sidecar: Path, names: Sequence[str]) -> None:
    """Set band 1's ``<CategoryNames>`` in a PAM file (created, or merged; atomically)."""
    root = None
    if sidecar.is_file():
        try:
            root = ET.parse(sidecar).getroot()
        except ET.ParseError:
            root = None
        if root is not None and root.tag != "PAMDataset":
            root = None
    if root is None:
        root = ET.Element("PAMDataset")
    band = next((b for b in root.findall("PAMRasterBand") if b.get("band") == "1"), None)
    if band is None:
        band = ET.SubElement(root, "PAMRasterBand", band="1")
    for old in band.findall("CategoryNames"):
        band.remove(old)
    categories = ET.Element("CategoryNames")
    for name in names:
        ET.SubElement(categories, "Category").text = name
    band.insert(0, categories)
    ET.indent(root)
    tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    try:
        ET.ElementTree(root).write(tmp, encoding="unicode")
        os.replace(tmp, sidecar)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_category_names(path: str | os.PathLike[str]) -> list[str] | None:
    """Band 1's category names as GDAL reads them (through a VRT copy), or None.

    rasterio has no category-name API: this asks GDAL to describe the raster as a VRT
    (which lists ``<CategoryNames>``), so it proves what GDAL, and QGIS, see. GDAL
    looks for the sidecar even where remote reads told it not to list directories
    (``GDAL_DISABLE_READDIR_ON_OPEN``, :func:`terrapatch.raster.configure_remote_reads`).
    """
    import tempfile

    import rasterio
    import rasterio.shutil

    with tempfile.TemporaryDirectory() as folder, \
            rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="FALSE"):
        vrt = Path(folder) / "legend.vrt"
        rasterio.shutil.copy(os.fspath(path), vrt, driver="VRT")
        root = ET.parse(vrt).getroot()
    band = next((b for b in root.iter("VRTRasterBand") if b.get("band") == "1"), None)
    names = None if band is None else band.find("CategoryNames")
    return None if names is None else [c.text or "" for c in names.findall("Category")]
