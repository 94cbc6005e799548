"""Raster sources: open files, URLs or STAC assets stacked as bands, and read windows.

A :class:`Source` is what OTBTF calls ``sourceK``: an image list whose bands are
concatenated in list order, plus the per-source settings (patch size or
receptive field, nodata value, model input name). Unlike OTBTF, the images of a
list must share their grid (size, transform and CRS), not only their size.

An image may be a local path, a URL (``https://``, ``http://``, ``s3://``, ``gs://``)
or a GDAL virtual path (``/vsicurl/…``, ``/vsis3/…``), or a STAC Item with asset keys
(``"item.json#B04,B03"``, see :mod:`terrapatch.stac`). Remote images are read with
the GDAL options of :data:`REMOTE_READ_OPTIONS` (see :func:`configure_remote_reads`).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from terrapatch._params import optional_pair
from terrapatch.errors import GeometryError, InputError, MissingInputError
from terrapatch.geometry import Grid

if TYPE_CHECKING:
    import pystac

    from terrapatch.stac import StacAsset

PathLike = str | os.PathLike[str]


def is_remote(path: str) -> bool:
    """Whether ``path`` is a GDAL virtual or remote path (``/vsi…``, ``http(s)://``, ``s3://``…)."""
    return path.startswith("/vsi") or "://" in path


#: GDAL configuration options for reading remote rasters (COGs over HTTP, S3, …).
#: :func:`configure_remote_reads` sets each one as an environment variable unless the
#: environment already has it; GDAL reads environment variables as configuration
#: options, so they hold in every thread and in Dask worker processes. An option set
#: in ``rasterio.Env(...)`` or exported before the run wins over these defaults.
#:
#: ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS`` is deliberately left unset: any URL is readable,
#: including signed URLs with a query string and STAC hrefs without ``.tif``.
REMOTE_READ_OPTIONS: dict[str, str] = {
    # Do not list the remote "directory" looking for side-car files (.aux.xml, .ovr,
    # .msk): saves requests at every open, and some servers cannot list at all.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Fetch adjacent byte ranges (a row of COG tiles of one window) in one request.
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # Over HTTP/2, run parallel requests on one connection.
    "GDAL_HTTP_MULTIPLEX": "YES",
    # Cache the bytes read in each open file (headers, blocks shared by neighbouring
    # tiles): VSI_CACHE_SIZE bytes per open file handle.
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(16 * 2**20),
    # Retry transient HTTP failures (429, 5xx) three times, after 0.5 s, 1 s, 2 s.
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
}


def configure_remote_reads() -> dict[str, str]:
    """Set GDAL's remote-read options (:data:`REMOTE_READ_OPTIONS`) where the user has not.

    Uses ``os.environ.setdefault``: a value already in the environment is kept. Called
    by :class:`Source` and :class:`SourceReader` whenever a path is remote, so it also
    runs in Dask workers before they open a remote raster. Idempotent and cheap.

    Returns
    -------
    dict of str to str
        The value in force of each option of :data:`REMOTE_READ_OPTIONS`.
    """
    for key, value in REMOTE_READ_OPTIONS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in REMOTE_READ_OPTIONS}


#: URL schemes → GDAL virtual file system prefix.
_VSI_PREFIXES = {"http": "/vsicurl/", "https": "/vsicurl/", "ftp": "/vsicurl/",
                 "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}


def gdal_path(path: str | os.PathLike[str]) -> str:
    """The spelling GDAL reads for a local path, a URL or a GDAL virtual path.

    ``http(s)://`` and ``ftp://`` URLs become ``/vsicurl/<url>``, ``s3://bucket/key``
    ``/vsis3/bucket/key`` (``gs://`` → ``/vsigs/``, ``az://`` → ``/vsiaz/``),
    ``file://`` URLs local paths; ``/vsi…`` paths and other strings are kept (local
    paths are not made absolute here).

    Parameters
    ----------
    path
        The path or URL as given.

    Returns
    -------
    str
        A path GDAL (and ``rasterio.open``) reads.
    """
    text = os.fspath(path)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    lowered = scheme.lower()
    if lowered in ("http", "https", "ftp"):
        return _VSI_PREFIXES[lowered] + text
    if lowered in _VSI_PREFIXES:
        return _VSI_PREFIXES[lowered] + rest
    if lowered == "file":
        return urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
    return text


def shown_path(path: str) -> str:
    """A GDAL path as the user would write it (``/vsicurl/https://x`` → ``https://x``)."""
    if path.startswith("/vsicurl/") and "://" in path:
        return path[len("/vsicurl/"):]
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
        A raster, or a list of rasters on the same grid stacked band-wise (first
        raster's bands first). Each is a local path, a URL (``https://``, ``http://``,
        ``s3://``, ``gs://``), a GDAL virtual path (``/vsicurl/…``, ``/vsis3/…``), or a
        STAC Item with asset keys, ``"item.json#B04,B03,B02"`` (a local file or URL
        ending in ``.json``, or any Item URL prefixed with ``stac:``), which stands for
        those assets in that order (see :mod:`terrapatch.stac` and :meth:`from_stac`).
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
        The source's neutral identifier in error messages (``"source1"``; its patch size
        is ``source1.patch_size``), which a facade respells (:mod:`terrapatch.spelling`).

    Attributes
    ----------
    paths
        The rasters as GDAL reads them: local paths made absolute (so that the source
        means the same files in Dask workers), URLs as ``/vsicurl/…`` / ``/vsis3/…``
        paths, STAC Items replaced by their assets' paths.

    Raises
    ------
    InputError
        For an empty list, an invalid size, or a STAC Item that cannot be read or lacks
        an asset key (the files themselves are opened, and checked, on first use).
    """

    def __init__(
        self,
        path_or_paths: PathLike | Sequence[PathLike],
        patch_size: int | Sequence[int] | None = None,
        nodata: float | None = None,
        placeholder: str | None = None,
        name: str = "source1",
    ) -> None:
        if isinstance(path_or_paths, str | os.PathLike):
            given: tuple[str, ...] = (os.fspath(path_or_paths),)
        else:
            given = tuple(os.fspath(p) for p in path_or_paths)
        paths: list[str] = []
        #: GDAL path → the STAC asset it comes from, for messages.
        self._assets: dict[str, StacAsset] = {}
        for text in given:
            spec = _stac_spec(text)
            if spec is None:
                paths.append(_resolve(text))
                continue
            from terrapatch import stac

            for asset in stac.resolve_assets(spec[0], spec[1], parameter=name):
                paths.append(_resolve(asset.path))
                self._assets[paths[-1]] = asset
        if not paths:
            raise InputError(f"{name}: no image given")
        self.paths = tuple(paths)
        if any(is_remote(p) for p in self.paths):
            configure_remote_reads()
        self.name = name
        self.patch_size = optional_pair(patch_size, f"{name}.patch_size")
        self.nodata = None if nodata is None else float(nodata)
        self.placeholder = placeholder

    @classmethod
    def from_stac(
        cls,
        item: pystac.Item | str | os.PathLike[str],
        assets: str | Sequence[str],
        patch_size: int | Sequence[int] | None = None,
        nodata: float | None = None,
        placeholder: str | None = None,
        name: str = "source1",
    ) -> Source:
        """A source stacking assets of a STAC Item as bands, in the order of ``assets``.

        Parameters
        ----------
        item
            A ``pystac.Item``, or the path or URL of an Item JSON file. Relative asset
            hrefs are resolved against the Item's own location.
        assets
            Asset keys, a list or one comma-separated string (``"B04,B03,B02"``).
        patch_size, nodata, placeholder, name
            As for :class:`Source`.

        Returns
        -------
        Source
            The source; equivalent to ``Source("item.json#B04,B03,B02", ...)``.

        Raises
        ------
        InputError
            If the Item cannot be read or lacks one of the keys (the message lists the
            available keys).
        """
        from terrapatch import stac

        keys = stac.split_keys(assets) if isinstance(assets, str) else list(assets)
        resolved = stac.resolve_assets(item, keys, parameter=name)
        source = cls([a.path for a in resolved], patch_size=patch_size, nodata=nodata,
                     placeholder=placeholder, name=name)
        for path, asset in zip(source.paths, resolved, strict=True):
            source._assets[path] = asset
        return source

    def __repr__(self) -> str:
        return (f"Source({list(self.paths)!r}, patch_size={self.patch_size}, "
                f"nodata={self.nodata}, placeholder={self.placeholder!r}, name={self.name!r})")

    def describe(self, path: str) -> str:
        """How error messages name one of :attr:`paths` (a URL as given, a STAC asset)."""
        asset = getattr(self, "_assets", {}).get(path)
        return asset.label if asset is not None else repr(shown_path(path))

    def _open_error(self, path: str, exc: RasterioIOError) -> InputError:
        """The one-line error for a raster that cannot be opened."""
        what = self.describe(path)
        if is_remote(path):
            return InputError(f"{self.name}: cannot read {what} ({_one_line(exc)})")
        hint = ""
        if path.lower().endswith(".json"):
            hint = "; for a STAC Item, give asset keys: 'item.json#KEY1,KEY2'"
        return InputError(f"{self.name}: {what} is not a readable raster "
                          f"({_one_line(exc)}){hint}")

    @cached_property
    def _files(self) -> tuple[_FileInfo, ...]:
        infos = []
        for path in self.paths:
            if not is_remote(path) and not Path(path).exists():
                raise MissingInputError(f"{self.name}: file {path!r} does not exist")
            if is_remote(path):
                configure_remote_reads()
            try:
                with rasterio.open(path) as ds:
                    transform, width, height, crs = ds.transform, ds.width, ds.height, ds.crs
                    count, dtypes = ds.count, ds.dtypes
            except RasterioIOError as exc:
                raise self._open_error(path, exc) from None
            if transform.is_identity and crs is None:
                raise GeometryError(
                    f"{self.name}: {self.describe(path)} has no georeference; terrapatch "
                    "needs north-up georeferenced rasters"
                )
            grid = Grid(transform, width, height, crs, f"{self.name} ({shown_path(path)})")
            infos.append(_FileInfo(grid, count, np.result_type(*dtypes)))
        first = infos[0].grid
        for path, info in zip(self.paths[1:], infos[1:], strict=True):
            g = info.grid
            same_size = (g.width, g.height) == (first.width, first.height)
            if _same_grid(g, first):
                continue
            if path in self._assets and self.paths[0] in self._assets:
                same = [self._assets[p].key for p, i in zip(self.paths, infos, strict=True)
                        if p in self._assets and _same_grid(i.grid, first)]
                raise GeometryError(self._stac_grid_message(path, first, g, same))
            if not same_size:
                raise GeometryError(
                    f"{self.name}: {self.describe(path)} is {g.width}×{g.height} pixels "
                    f"but {self.describe(self.paths[0])} is {first.width}×{first.height}; "
                    "images stacked in one source must share their grid"
                )
            raise GeometryError(
                f"{self.name}: {self.describe(path)} is not on the grid of "
                f"{self.describe(self.paths[0])} (different origin, spacing or CRS); images "
                "stacked in one source must share their grid"
            )
        return tuple(infos)

    def _stac_grid_message(self, path: str, first: Grid, other: Grid, same: list[str]) -> str:
        def size(g: Grid) -> str:
            return f"{abs(g.transform.a):g} m, {g.width}×{g.height} px"

        asset, ref = self._assets[path], self._assets[self.paths[0]]
        item = ref.item if ref.item == asset.item else "ITEM"
        return (
            f"{self.name}: asset {asset.key!r} ({size(other)}) is not on the grid of asset "
            f"{ref.key!r} ({size(first)}) of STAC item {item!r}; assets stacked in one "
            "source must share their grid (size, origin, spacing, CRS): give each grid its "
            f"own source, e.g. source1.paths '{item}#{','.join(same)}' and "
            f"source2.paths '{item}#{asset.key}'"
        )

    @cached_property
    def grid(self) -> Grid:
        """Grid of the stacked source (the first image's)."""
        first = self._files[0].grid
        return Grid(first.transform, first.width, first.height, first.crs, f"{self.name}")

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


def _same_grid(a: Grid, b: Grid) -> bool:
    return ((a.width, a.height) == (b.width, b.height) and a.crs == b.crs
            and a.transform.almost_equals(b.transform))


def _resolve(text: str) -> str:
    """GDAL path of one given image: URLs to ``/vsi…`` paths, local paths made absolute."""
    path = gdal_path(text)
    return path if is_remote(path) else os.path.abspath(path)


def _stac_spec(text: str) -> tuple[str, list[str]] | None:
    """``(item href, asset keys)`` when ``text`` is the STAC spelling, else None."""
    base, sep, keys = text.rpartition("#")
    if not sep:
        return None
    explicit = base.startswith("stac:")
    if explicit:
        base = base[len("stac:"):]
    if not explicit and not base.split("?", 1)[0].lower().endswith((".json", ".geojson")):
        return None
    from terrapatch import stac

    return base, stac.split_keys(keys, parameter=text)


def check_sources(sources: Sequence[Source]) -> list[Source]:
    """The sources as a list, or an input error: none given, or not :class:`Source` objects."""
    items = list(sources)
    if not items:
        raise InputError("source1: at least one source is required")
    for s in items:
        if not isinstance(s, Source):
            raise InputError(f"sources: expected terrapatch.Source objects, got {type(s).__name__}")
    return items


class SourceReader:
    """Open handles on a source's files; reads windows as ``(bands, rows, cols)`` arrays.

    Not thread-safe: open one reader per thread.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.dtype = source.dtype
        self.bands = source.bands
        self._datasets: list[rasterio.io.DatasetReader] = []
        if any(is_remote(p) for p in source.paths):
            configure_remote_reads()  # also in a Dask worker that unpickled the source
        try:
            for path in source.paths:
                self._datasets.append(rasterio.open(path))
        except RasterioIOError as exc:
            self.close()
            raise InputError(f"{source.name}: cannot open {source.describe(path)} "
                             f"({_one_line(exc)})") from None
        except BaseException:
            self.close()
            raise

    def read(self, window: Window, interleave: str = "band",
             pad: str | float | None = None) -> np.ndarray:
        """Read a window of every band, stacked in list order.

        ``interleave="band"`` gives ``(bands, rows, cols)``; ``"pixel"`` gives ``(rows,
        cols, bands)``, the layout models take, filled by GDAL directly (no transposed
        copy afterwards). The window must lie inside the raster unless ``pad`` says
        how to fill what lies outside: ``"reflect"`` (mirrored about the edge pixels)
        or a constant value.
        """
        if pad is not None:
            inner = _inside(window, self.source.grid.width, self.source.grid.height)
            if inner is not None:
                return self._read_padded(window, inner, interleave, pad)
        rows, cols = int(window.height), int(window.width)
        if interleave == "pixel":
            pixels = np.empty((rows, cols, self.bands), dtype=self.dtype)
            out = pixels.transpose(2, 0, 1)  # a strided view GDAL fills band by band
        else:
            pixels = out = np.empty((self.bands, rows, cols), dtype=self.dtype)
        b = 0
        for path, ds in zip(self.source.paths, self._datasets, strict=True):
            try:
                ds.read(window=window, out=out[b:b + ds.count])
            except RasterioIOError as exc:
                raise InputError(
                    f"{self.source.name}: cannot read {window!r} of "
                    f"{self.source.describe(path)} ({_one_line(exc)})"
                ) from None
            b += ds.count
        return pixels

    def _read_padded(self, window: Window, inner: Window, interleave: str,
                     pad: str | float) -> np.ndarray:
        """Read ``inner`` (the part of ``window`` inside the raster) and pad it to ``window``."""
        c0, r0 = int(window.col_off), int(window.row_off)
        ic, ir = int(inner.col_off), int(inner.row_off)
        before = (ir - r0, ic - c0)
        after = (r0 + int(window.height) - ir - int(inner.height),
                 c0 + int(window.width) - ic - int(inner.width))
        if int(inner.width) == 0:
            if pad == "reflect":
                raise GeometryError(f"{self.source.name}: window {window!r} lies outside "
                                    "the raster: nothing to reflect")
            shape = ((int(window.height), int(window.width), self.bands)
                     if interleave == "pixel" else
                     (self.bands, int(window.height), int(window.width)))
            return np.full(shape, pad, dtype=self.dtype)
        data = self.read(inner, interleave)
        widths = [(0, 0)] * 3
        spatial = (0, 1) if interleave == "pixel" else (1, 2)
        for axis, lo, hi in zip(spatial, before, after, strict=True):
            widths[axis] = (lo, hi)
        if pad == "reflect":
            if min(data.shape[a] for a in spatial) > 1:
                return np.pad(data, widths, mode="reflect")
            return np.pad(data, widths, mode="edge")
        return np.pad(data, widths, mode="constant",
                      constant_values=np.asarray(pad).astype(data.dtype))

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


def _inside(window: Window, width: int, height: int) -> Window | None:
    """The part of ``window`` inside a ``width × height`` raster (None: all of it).

    A window that misses the raster gives an empty window (width and height 0).
    """
    c0, r0 = int(window.col_off), int(window.row_off)
    c1, r1 = c0 + int(window.width), r0 + int(window.height)
    if c0 >= 0 and r0 >= 0 and c1 <= width and r1 <= height:
        return None
    ic0, ir0, ic1, ir1 = max(c0, 0), max(r0, 0), min(c1, width), min(r1, height)
    if ic1 <= ic0 or ir1 <= ir0:
        return Window(0, 0, 0, 0)
    return Window(ic0, ir0, ic1 - ic0, ir1 - ir0)


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
            return np.asarray(np.isnan(values))
        return np.zeros(values.shape, dtype=bool)
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        if not float(nodata).is_integer() or not info.min <= nodata <= info.max:
            return np.zeros(values.shape, dtype=bool)
        return np.asarray(values == values.dtype.type(int(nodata)))
    if values.dtype.kind == "b":
        return np.asarray(values == bool(nodata))
    return np.asarray(values == values.dtype.type(nodata))
