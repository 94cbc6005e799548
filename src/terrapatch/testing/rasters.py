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
