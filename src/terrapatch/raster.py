"""Raster sources: open one file or a list of files stacked as bands, read windows.

A :class:`Source` is what OTBTF calls ``sourceK``: an image list whose bands are
concatenated in list order, plus the per-source settings (patch size or
receptive field, nodata value, model input name). Unlike OTBTF, the images of a
list must share their grid (size, transform and CRS), not only their size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from terrapatch.errors import GeometryError, InputError, MissingInputError
from terrapatch.geometry import Grid

PathLike = str | os.PathLike[str]


def _as_pair(
    value: int | Sequence[int] | None, keys: tuple[str, str]
) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        pair = (int(value), int(value))
    else:
        items = tuple(value)
        if len(items) != 2:
            raise InputError(f"{keys[0]}: expected one size or (x, y), got {value!r}")
        pair = (int(items[0]), int(items[1]))
    for key, size in zip(keys, pair, strict=True):
        if size < 1:
            raise InputError(
                f"{key}: {size} is not a valid size (patch {pair[0]}×{pair[1]}; sizes must be ≥ 1)"
            )
    return pair


def is_remote(path: str) -> bool:
    """Whether ``path`` is a GDAL virtual or remote path (``/vsi…``, ``http(s)://``, ``s3://``…)."""
    return path.startswith("/vsi") or "://" in path


@dataclass(frozen=True)
class _FileInfo:
    grid: Grid
    count: int
    dtype: np.dtype


class Source:
    """One input source: a raster, or several rasters stacked as bands.

    Parameters
    ----------
    path_or_paths
        A raster path, or a list of raster paths on the same grid stacked band-wise
        (first file's bands first).
    patch_size
        Patch size (extraction) or receptive field (serving) in this source's pixels:
        an int or ``(x, y)``.
    nodata
        Value marking missing data in this source, or None. Extraction drops a sample
        when any band of any pixel of its patch equals it; serving skips a tile whose
        input is entirely equal to it.
    placeholder
        Name of the model input fed with this source (serving).
    name
        Label used in error messages, e.g. ``"source1"``.
    size_keys
        Parameter names of the x and y sizes in error messages (``rfieldx``, ``rfieldy``
        when serving).
    """

    def __init__(
        self,
        path_or_paths: PathLike | Sequence[PathLike],
        patch_size: int | Sequence[int] | None = None,
        nodata: float | None = None,
        placeholder: str | None = None,
        name: str = "source1",
        size_keys: tuple[str, str] = ("patchsizex", "patchsizey"),
    ) -> None:
        if isinstance(path_or_paths, str | os.PathLike):
            given: tuple[str, ...] = (os.fspath(path_or_paths),)
        else:
            given = tuple(os.fspath(p) for p in path_or_paths)
        # Absolute paths, so the source means the same files in Dask workers.
        paths = tuple(p if is_remote(p) else os.path.abspath(p) for p in given)
        if not paths:
            raise InputError(f"{name}.il: no image given")
        self.paths = paths
        self.name = name
        self.patch_size = _as_pair(patch_size, (f"{name}.{size_keys[0]}",
                                                f"{name}.{size_keys[1]}"))
        self.nodata = None if nodata is None else float(nodata)
        self.placeholder = placeholder

    def __repr__(self) -> str:
        return (f"Source({list(self.paths)!r}, patch_size={self.patch_size}, "
                f"nodata={self.nodata}, placeholder={self.placeholder!r}, name={self.name!r})")

    @cached_property
    def _files(self) -> tuple[_FileInfo, ...]:
        infos = []
        for path in self.paths:
            if not is_remote(path) and not Path(path).exists():
                raise MissingInputError(f"{self.name}.il: file {path!r} does not exist")
            try:
                with rasterio.open(path) as ds:
                    transform, width, height, crs = ds.transform, ds.width, ds.height, ds.crs
                    count, dtypes = ds.count, ds.dtypes
            except RasterioIOError as exc:
                raise InputError(f"{self.name}.il: {path!r} is not a readable raster ({exc})") \
                    from None
            if transform.is_identity and crs is None:
                raise GeometryError(
                    f"{self.name}.il: {path!r} has no georeference; terrapatch needs north-up "
                    "georeferenced rasters"
                )
            grid = Grid(transform, width, height, crs, f"{self.name}.il ({path})")
            infos.append(_FileInfo(grid, count, np.result_type(*dtypes)))
        first = infos[0].grid
        for path, info in zip(self.paths[1:], infos[1:], strict=True):
            g = info.grid
            if (g.width, g.height) != (first.width, first.height):
                raise GeometryError(
                    f"{self.name}.il: {path!r} is {g.width}×{g.height} pixels but "
                    f"{self.paths[0]!r} is {first.width}×{first.height}; images stacked in one "
                    "source must share their grid"
                )
            if not g.transform.almost_equals(first.transform) or g.crs != first.crs:
                raise GeometryError(
                    f"{self.name}.il: {path!r} is not on the grid of {self.paths[0]!r} "
                    "(different origin, spacing or CRS); images stacked in one source must "
                    "share their grid"
                )
        return tuple(infos)

    @cached_property
    def grid(self) -> Grid:
        """Grid of the stacked source (the first image's)."""
        first = self._files[0].grid
        return Grid(first.transform, first.width, first.height, first.crs, f"{self.name}.il")

    @property
    def bands(self) -> int:
        """Total number of bands of the stack."""
        return sum(f.count for f in self._files)

    @property
    def dtype(self) -> np.dtype:
        """Common numpy dtype of all bands."""
        return np.result_type(*(f.dtype for f in self._files))

    def open(self) -> SourceReader:
        """Open the files for reading windows; use as a context manager."""
        _ = self._files
        return SourceReader(self)


class SourceReader:
    """Open handles on a source's files; reads windows as ``(bands, rows, cols)`` arrays.

    Not thread-safe: open one reader per thread.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.dtype = source.dtype
        self.bands = source.bands
        self._datasets: list[rasterio.io.DatasetReader] = []
        try:
            for path in source.paths:
                self._datasets.append(rasterio.open(path))
        except RasterioIOError as exc:
            self.close()
            raise InputError(f"{source.name}.il: cannot open {path!r} ({exc})") from None
        except BaseException:
            self.close()
            raise

    def read(self, window: Window) -> np.ndarray:
        """Read a window (inside the raster) of every band, stacked in list order."""
        rows, cols = int(window.height), int(window.width)
        out = np.empty((self.bands, rows, cols), dtype=self.dtype)
        b = 0
        for path, ds in zip(self.source.paths, self._datasets, strict=True):
            try:
                ds.read(window=window, out=out[b:b + ds.count])
            except RasterioIOError as exc:
                raise InputError(
                    f"{self.source.name}.il: cannot read {window!r} of {path!r} ({exc})"
                ) from None
            b += ds.count
        return out

    def close(self) -> None:
        """Close the underlying datasets."""
        for ds in self._datasets:
            ds.close()
        self._datasets = []

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def patches_from_region(
    region: np.ndarray, col_offsets: np.ndarray, row_offsets: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Cut patches out of a ``(bands, rows, cols)`` region; returns ``(n, ry, rx, bands)``.

    ``col_offsets`` / ``row_offsets`` are the patches' first column / row relative to the
    region. The windows are strided views over the region; only the result is copied.
    """
    rx, ry = size
    view = np.lib.stride_tricks.sliding_window_view(region, (ry, rx), axis=(1, 2))
    # view: (bands, R-ry+1, C-rx+1, ry, rx)
    picked = view[:, row_offsets, col_offsets]  # (bands, n, ry, rx)
    return np.ascontiguousarray(picked.transpose(1, 2, 3, 0))


def nodata_mask(values: np.ndarray, nodata: float) -> np.ndarray:
    """Where ``values`` equal ``nodata``, compared in the array's own type.

    NaN matches NaN. A nodata value that an integer type cannot hold (negative for
    unsigned, fractional, out of range) never matches, and large integers are compared
    exactly (OTBTF compares in float32, which confuses values above 2**24).
    """
    if np.isnan(nodata):
        if values.dtype.kind == "f":
            return np.isnan(values)
        return np.zeros(values.shape, dtype=bool)
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        if not float(nodata).is_integer() or not info.min <= nodata <= info.max:
            return np.zeros(values.shape, dtype=bool)
        return np.asarray(values == values.dtype.type(int(nodata)))
    if values.dtype.kind == "b":
        return np.asarray(values == bool(nodata))
    return np.asarray(values == values.dtype.type(nodata))
