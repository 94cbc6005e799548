"""Tiny GeoTIFF fixtures with explicit transforms, so expectations can be computed by hand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS


def write_raster(
    path: str | os.PathLike[str],
    data: np.ndarray,
    transform: Affine,
    crs: Any = "EPSG:32631",
    nodata: float | None = None,
    **options: Any,
) -> Path:
    """Write ``data`` (``(bands, rows, cols)`` or ``(rows, cols)``) as a GeoTIFF."""
    array = np.asarray(data)
    if array.ndim == 2:
        array = array[None]
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": array.shape[2], "height": array.shape[1],
        "count": array.shape[0], "dtype": array.dtype.name, "transform": transform,
        "crs": CRS.from_user_input(crs) if crs is not None else None,
    }
    if nodata is not None:
        profile["nodata"] = nodata
    profile.update(options)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return Path(path)


def coordinate_raster(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    transform: Affine,
    crs: Any = "EPSG:32631",
    dtype: str = "float32",
    **options: Any,
) -> Path:
    """Write a 2-band raster whose band 1 holds each pixel's column and band 2 its row.

    Any window read from it tells where it came from, which makes window checks exact.
    """
    rows, cols = np.mgrid[0:height, 0:width]
    return write_raster(path, np.stack([cols, rows]).astype(dtype), transform, crs, **options)


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16",
               "uint32": "UInt32", "int32": "Int32", "float32": "Float32",
               "float64": "Float64"}


def mosaic_vrt(src: str | os.PathLike[str], reps: int, path: str | os.PathLike[str]) -> Path:
    """Write a GDAL VRT repeating ``src`` ``reps × reps`` times: a large raster for free.

    The VRT keeps ``src``'s origin, spacing, CRS, bands and nodata; GDAL recognises it
    by its content, so ``path`` may end in ``.tif`` as a stand-in for a big image.
    """
    src = Path(src).resolve()
    with rasterio.open(src) as ds:
        width, height, count = ds.width, ds.height, ds.count
        gdal_type = _GDAL_TYPES[ds.dtypes[0]]
        t, crs, nodata = ds.transform, ds.crs, ds.nodata
    bands = []
    for b in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{src}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
            f'<DstRect xOff="{i * width}" yOff="{j * height}" xSize="{width}" '
            f'ySize="{height}"/></SimpleSource>'
            for j in range(reps) for i in range(reps))
        nd = f"<NoDataValue>{nodata}</NoDataValue>" if nodata is not None else ""
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{b}">{nd}{sources}'
                     "</VRTRasterBand>")
    srs = f"<SRS>{crs.to_wkt()}</SRS>" if crs is not None else ""
    xml = (f'<VRTDataset rasterXSize="{width * reps}" rasterYSize="{height * reps}">{srs}'
           f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>"
           + "".join(bands) + "</VRTDataset>")
    Path(path).write_text(xml)
    return Path(path)
