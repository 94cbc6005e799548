"""How a raster output is written: GeoTIFF profiles and map formats.

:class:`MapFormat` says how a map is written (GeoTIFF, Cloud-Optimized GeoTIFF with
overviews, VRT mosaic); :func:`geotiff_profile` is the tiled, compressed GeoTIFF every
raster output starts from (OTB's ``out.tif?&box=...&gdal:co:...`` spelling of these
options is read in :mod:`terrapatch.apps._extended`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.errors import InputError
from terrapatch.progress import logger


def geotiff_profile(
    width: int,
    height: int,
    count: int,
    dtype: np.dtype,
    *,
    crs: object = None,
    transform: object = None,
    nodata: float | None = None,
    creation_options: Mapping[str, str] | None = None,
    block: int = 256,
) -> dict[str, object]:
    """Return a rasterio profile for a tiled (when large enough), DEFLATE-compressed GeoTIFF.

    User ``creation_options`` (GDAL names, e.g. ``COMPRESS``) override the defaults.
    BIGTIFF is set to ``IF_SAFER`` so outputs above 4 GB work.
    """
    profile: dict[str, object] = {
        "driver": "GTiff",
        "width": int(width),
        "height": int(height),
        "count": int(count),
        "dtype": np.dtype(dtype).name,
        "compress": "deflate",
        "bigtiff": "IF_SAFER",
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    if width >= block and height >= block:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    if np.dtype(dtype).kind in "iu" and np.dtype(dtype).itemsize > 1:
        profile["predictor"] = 2
    for key, value in (creation_options or {}).items():
        profile[key.lower()] = value
    return profile



#: Output formats a map can be written in, by GDAL driver name.
DRIVERS = ("GTiff", "COG", "VRT")
#: File name extensions accepted for each output driver.
EXTENSIONS = {"GTiff": (".tif", ".tiff"), "COG": (".tif", ".tiff"), "VRT": (".vrt",)}
#: Resampling methods GDAL accepts for overviews.
RESAMPLINGS = ("NEAREST", "MODE", "AVERAGE", "BILINEAR", "CUBIC", "CUBICSPLINE", "LANCZOS",
               "RMS", "GAUSS")


def default_overview_resampling(dtype: np.dtype) -> str:
    """Overview resampling that fits a map: ``NEAREST`` for integer (class) maps, or ``AVERAGE``."""
    return "NEAREST" if np.dtype(dtype).kind in "iub" else "AVERAGE"


@dataclass(frozen=True)
class MapFormat:
    """How a map is written.

    Attributes
    ----------
    driver
        ``GTiff``, ``COG`` or ``VRT`` (a mosaic of block files kept beside it).
    creation_options
        User GDAL creation options (override terrapatch's defaults).
    overview_resampling
        Resampling of a COG's overviews (None: :func:`default_overview_resampling`).
    colormap
        Colour table of band 1, class value → ``(r, g, b[, a])``, or None.
    class_names
        Category names of band 1 (index = class value), or None.
    """

    driver: str = "GTiff"
    creation_options: dict[str, str] = field(default_factory=dict)
    overview_resampling: str | None = None
    colormap: dict[int, tuple[int, ...]] | None = None
    class_names: tuple[str, ...] | None = None

    @classmethod
    def for_path(cls, path: str | os.PathLike[str], driver: str | None = None,
                 creation_options: dict[str, str] | None = None,
                 overview_resampling: str | None = None,
                 colormap: dict[int, tuple[int, ...]] | None = None,
                 class_names: tuple[str, ...] | list[str] | None = None) -> MapFormat:
        """The format of an output path: ``.vrt`` → VRT, ``driver`` (e.g. ``COG``), else GTiff.

        Raises
        ------
        InputError
            If the driver is unknown, or the extension does not match it (``map.png``).
        """
        suffix = Path(path).suffix.lower()
        name = {d.upper(): d for d in DRIVERS}.get((driver or "").upper()) if driver else None
        if driver and name is None:
            raise InputError(f"out: output format {driver!r} is not supported "
                             f"(choose {', '.join(DRIVERS)})")
        if name is None:
            name = "VRT" if suffix == ".vrt" else "GTiff"
        if suffix not in EXTENSIONS[name]:
            raise InputError(
                f"out: {os.fspath(path)!r} has extension {suffix or '(none)'!r}, which does not "
                f"match the {name} format (use {' or '.join(EXTENSIONS[name])})"
            )
        options = {k.upper(): str(v) for k, v in (creation_options or {}).items()}
        resampling = overview_resampling or options.pop("OVERVIEW_RESAMPLING", None)
        if resampling is not None:
            resampling = resampling.upper()
            if resampling not in RESAMPLINGS:
                raise InputError(f"overview_resampling: {resampling!r} is not one of "
                                 f"{', '.join(RESAMPLINGS)}")
            if name != "COG":
                logger.warning("overview resampling %s ignored: only COG outputs get overviews",
                               resampling)
        cmap = None
        if colormap:
            cmap = {}
            for value, colour in colormap.items():
                rgba = tuple(int(c) for c in colour)
                if len(rgba) not in (3, 4) or not all(0 <= c <= 255 for c in rgba) \
                        or int(value) < 0:
                    raise InputError(f"colormap: entry {value!r}: {colour!r} is not a class value "
                                     "≥ 0 with an (r, g, b[, a]) colour in 0..255")
                cmap[int(value)] = rgba
        names = tuple(str(n) for n in class_names) if class_names else None
        return cls(name, options, resampling, cmap, names)

    @property
    def blocks_only(self) -> bool:
        """Whether the map is its block files (a VRT mosaic), never assembled."""
        return self.driver == "VRT"

    def tiff_profile(self, width: int, height: int, count: int, dtype: np.dtype,
                     crs: Any, transform: Any, nodata: float | None) -> dict[str, Any]:
        """Profile of a tiled GeoTIFF holding the map (or one block of it)."""
        options = {k: v for k, v in self.creation_options.items()
                   if k not in COG_ONLY_OPTIONS}
        return geotiff_profile(width, height, count, dtype, crs=crs, transform=transform,
                               nodata=nodata, creation_options=options)

    def cog_options(self, dtype: np.dtype) -> dict[str, str]:
        """Creation options of the COG driver: DEFLATE, 512² blocks, overviews, all cores."""
        options = {
            "COMPRESS": "DEFLATE",
            "BLOCKSIZE": "512",
            "BIGTIFF": "IF_SAFER",
            "NUM_THREADS": "ALL_CPUS",
            "OVERVIEWS": "IGNORE_EXISTING",
            "OVERVIEW_RESAMPLING": self.overview_resampling or default_overview_resampling(dtype),
        }
        if np.dtype(dtype).kind in "iu" and np.dtype(dtype).itemsize > 1:
            options["PREDICTOR"] = "YES"
        for key, value in self.creation_options.items():
            if key not in GTIFF_ONLY_OPTIONS:
                options[key] = value
        return options


#: Creation options only the COG driver knows (not passed to intermediate GeoTIFFs).
COG_ONLY_OPTIONS = frozenset({"BLOCKSIZE", "OVERVIEWS", "OVERVIEW_RESAMPLING",
                               "OVERVIEW_COMPRESS", "OVERVIEW_QUALITY", "OVERVIEW_PREDICTOR",
                               "TILING_SCHEME", "ALIGNED_LEVELS", "ADD_ALPHA", "WARP_RESAMPLING",
                               "TARGET_SRS", "RES", "EXTENT", "STATISTICS", "LEVEL"})
#: GeoTIFF layout options the COG driver sets itself.
GTIFF_ONLY_OPTIONS = frozenset({"TILED", "BLOCKXSIZE", "BLOCKYSIZE", "INTERLEAVE", "PROFILE",
                                 "COPY_SRC_OVERVIEWS"})

