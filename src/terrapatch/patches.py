"""The OTBTF "patches image" format: writing and reading stacks of patches.

A patches image holds ``n`` patches of ``patch_size_y × patch_size_x`` pixels
stacked vertically: width = patch width, height = ``n × patch height``, one band
per source band; patch ``i`` occupies rows ``i*psy … i*psy + psy - 1``. A labels
image is the same format with 1 × 1 patches. terrapatch records the patch size
and count in the file's metadata (``TERRAPATCH_PATCH_SIZE_X`` /
``TERRAPATCH_PATCH_SIZE_Y`` / ``TERRAPATCH_N_PATCHES``) so that non-square
patches read back correctly; files without these tags (e.g. written by OTBTF)
are read with OTBTF's square-patch assumption.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from terrapatch.errors import InputError, MissingInputError
from terrapatch.writer import atomic_output, convert_pixels, geotiff_profile

TAG_PATCH_SIZE_X = "TERRAPATCH_PATCH_SIZE_X"
TAG_PATCH_SIZE_Y = "TERRAPATCH_PATCH_SIZE_Y"
TAG_N_PATCHES = "TERRAPATCH_N_PATCHES"


@dataclass(frozen=True)
class PatchesInfo:
    """Layout of one patches image.

    Attributes
    ----------
    path
        File path.
    n_patches
        Number of patches stacked in the file.
    patch_size_x, patch_size_y
        Patch width and height in pixels.
    bands
        Number of bands (channels) per patch.
    dtype
        Pixel data type.
    from_metadata
        True when the patch size came from terrapatch metadata, False when it was
        inferred with the square-patch assumption.
    """

    path: Path
    n_patches: int
    patch_size_x: int
    patch_size_y: int
    bands: int
    dtype: np.dtype
    from_metadata: bool

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """Shape of one patch as ``(rows, cols, bands)``."""
        return (self.patch_size_y, self.patch_size_x, self.bands)


def _open(path: str | os.PathLike[str], parameter: str) -> rasterio.io.DatasetReader:
    if not Path(path).exists():
        raise MissingInputError(f"{parameter}: file {os.fspath(path)!r} does not exist")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(
            f"{parameter}: {os.fspath(path)!r} is not a readable raster ({exc})"
        ) from None


def read_patches_info(path: str | os.PathLike[str], parameter: str = "patches") -> PatchesInfo:
    """Return the layout of the patches image at ``path``.

    Raises
    ------
    InputError
        If the file is not a raster or its size is not a whole number of patches.
    """
    with _open(path, parameter) as ds:
        tags = ds.tags()
        width, height, bands = ds.width, ds.height, ds.count
        dtype = np.dtype(ds.dtypes[0])
    if TAG_PATCH_SIZE_X in tags and TAG_PATCH_SIZE_Y in tags:
        psx, psy = int(tags[TAG_PATCH_SIZE_X]), int(tags[TAG_PATCH_SIZE_Y])
        from_metadata = True
    else:
        psx = psy = width
        from_metadata = False
    if psx != width or psy <= 0 or height % psy != 0:
        raise InputError(
            f"{parameter}: {os.fspath(path)!r} is not a patches image: size {width}×{height} "
            f"is not a stack of {psx}×{psy} patches"
        )
    n = height // psy
    if from_metadata and TAG_N_PATCHES in tags and int(tags[TAG_N_PATCHES]) != n:
        raise InputError(
            f"{parameter}: {os.fspath(path)!r} declares {tags[TAG_N_PATCHES]} patches "
            f"but holds {n}"
        )
    return PatchesInfo(Path(path), n, psx, psy, bands, dtype, from_metadata)


def read_patches(
    path: str | os.PathLike[str],
    start: int = 0,
    count: int | None = None,
    info: PatchesInfo | None = None,
) -> np.ndarray:
    """Read patches ``start … start+count-1`` as an array ``(count, rows, cols, bands)``."""
    info = info or read_patches_info(path)
    if count is None:
        count = info.n_patches - start
    if start < 0 or count < 0 or start + count > info.n_patches:
        raise InputError(
            f"patches: range [{start}, {start + count}) outside the {info.n_patches} patches "
            f"of {os.fspath(path)!r}"
        )
    psx, psy = info.patch_size_x, info.patch_size_y
    with rasterio.open(path) as ds:
        data = ds.read(window=Window(0, start * psy, psx, count * psy))
    # (bands, count*psy, psx) -> (count, psy, psx, bands)
    return np.ascontiguousarray(
        data.reshape(info.bands, count, psy, psx).transpose(1, 2, 3, 0)
    )


def write_patches_image(
    path: str | os.PathLike[str],
    chunks: Iterable[np.ndarray],
    *,
    n_patches: int,
    patch_size_x: int,
    patch_size_y: int,
    bands: int,
    dtype: np.dtype | str = "float32",
    spacing: tuple[float, float] = (1.0, 1.0),
    creation_options: Mapping[str, str] | None = None,
    parameter: str = "out",
    planar: bool = False,
) -> Path:
    """Write a patches image from chunks of patches, atomically, streaming.

    Chunk ``j`` is written to the rows of its patches as soon as it comes, so memory is
    bounded by one chunk whatever ``n_patches`` is.

    Parameters
    ----------
    path
        Output GeoTIFF path.
    chunks
        Arrays of shape ``(k, patch_size_y, patch_size_x, bands)`` (``(bands, k,
        patch_size_y, patch_size_x)`` when ``planar``) whose ``k`` sum to ``n_patches``;
        written in order.
    dtype
        Output pixel type; values are converted with OTB's clamp-then-truncate rule.
    spacing
        Pixel spacing ``(sx, sy)`` of the source, recorded in the dummy geotransform
        (OTBTF writes the same: no CRS, origin at ``(-sx/2, sy/2)``).
    creation_options
        Extra GDAL creation options (e.g. ``{"COMPRESS": "DEFLATE"}``); uncompressed
        by default, like OTBTF.
    parameter
        Parameter name used in error messages.
    planar
        Chunks are band-planar, the layout of the file: written without a transpose.
    """
    dtype = np.dtype(dtype)
    sx, sy = abs(spacing[0]), abs(spacing[1])
    profile = geotiff_profile(
        patch_size_x, n_patches * patch_size_y, bands, dtype,
        transform=Affine(sx, 0.0, -sx / 2.0, 0.0, -sy, sy / 2.0),
        creation_options=creation_options,
    )
    profile.pop("tiled", None)
    profile.pop("blockxsize", None)
    profile.pop("blockysize", None)
    if not any(k.upper() == "COMPRESS" for k in (creation_options or {})):
        # Like OTBTF: uncompressed unless asked (float patches barely compress, and
        # DEFLATE would dominate extraction time).
        profile.pop("compress", None)
        profile.pop("predictor", None)
    profile["interleave"] = "band"  # bands are written as planes: no pixel interleaving
    rows_per_strip = patch_size_y * max(1, 16384 // max(1, patch_size_x * patch_size_y))
    profile["blockysize"] = min(rows_per_strip, n_patches * patch_size_y)
    with atomic_output(path, parameter) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.update_tags(**{
                TAG_PATCH_SIZE_X: str(patch_size_x),
                TAG_PATCH_SIZE_Y: str(patch_size_y),
                TAG_N_PATCHES: str(n_patches),
            })
            written = 0
            for chunk in chunks:
                k = chunk.shape[1 if planar else 0]
                if k == 0:
                    continue
                if written + k > n_patches:
                    raise ValueError("more patches than declared")
                block = convert_pixels(chunk, dtype)
                if not planar:  # (k, psy, psx, bands) -> (bands, k, psy, psx)
                    block = block.transpose(3, 0, 1, 2)
                block = np.ascontiguousarray(block).reshape(bands, k * patch_size_y,
                                                            patch_size_x)
                dst.write(block, window=Window(0, written * patch_size_y,
                                               patch_size_x, k * patch_size_y))
                written += k
            if written != n_patches:
                raise ValueError(f"wrote {written} patches, expected {n_patches}")
    return Path(path)
