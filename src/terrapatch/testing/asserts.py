"""Assertions for tests of maps, patches images and windows, with messages that say what differs.

Each helper raises :class:`AssertionError` naming the first property that differs
(size, CRS, transform, dtype, nodata, a patch size) or, for pixel values, how many
differ, the first one (its index and both values) and the largest difference. They
are what terrapatch's own tests use to compare a served map with a reference, two
extraction runs, or a window with its hand-computed value; users' tests of their
own models and layouts can use them the same way.

By default values must be identical: for floating-point rasters, bit for bit (NaN
equals NaN with the same bits, ``-0.0`` differs from ``0.0``). ``atol`` / ``rtol``
allow ``|actual - expected| <= atol + rtol · |expected|`` instead (NaN still equals
NaN).

Examples
--------
>>> from terrapatch.testing.asserts import assert_same_map
>>> assert_same_map("map.tif", "reference.tif")  # doctest: +SKIP
>>> assert_same_map("onnx.tif", "keras.tif", atol=1e-5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from terrapatch.patches import read_patches, read_patches_info

__all__ = [
    "Raster",
    "assert_coordinate_patch",
    "assert_same_map",
    "assert_same_patches",
    "assert_same_values",
    "assert_windows_equal",
    "read_raster",
]

#: Patches compared per read in :func:`assert_same_patches` (bounds the memory used).
PATCHES_PER_READ = 4096

#: A window: a rasterio :class:`~rasterio.windows.Window`, ``(col_off, row_off, width,
#: height)`` or rasterio's ``((row_start, row_stop), (col_start, col_stop))``.
WindowLike: TypeAlias = Window | Sequence[Any]


class Raster(NamedTuple):
    """A raster read whole: its values and what describes them (see :func:`read_raster`).

    Attributes
    ----------
    values
        Pixel values, ``(bands, rows, cols)``, or ``(rows, cols)`` when one band was read.
    transform
        Pixel-to-ground affine transform.
    dtype
        Pixel type name (e.g. ``"float32"``).
    crs
        Coordinate reference system, or None.
    nodata
        Nodata value, or None.
    profile
        The rasterio profile: driver, size, blocks, compression, interleave, ...
    tags
        The metadata tags of the default domain.
    path
        The path it was read from.
    """

    values: np.ndarray
    transform: Affine
    dtype: str
    crs: CRS | None
    nodata: float | None
    profile: dict[str, Any]
    tags: dict[str, str]
    path: str


def read_raster(path: str | os.PathLike[str], band: int | None = None) -> Raster:
    """Read the raster at ``path``: all bands, or only ``band`` (1-based) as a 2-D array.

    Examples
    --------
    >>> values, transform, dtype = read_raster("map.tif")[:3]  # doctest: +SKIP
    >>> read_raster("map.tif").nodata  # doctest: +SKIP
    """
    with rasterio.open(path) as ds:
        values = ds.read() if band is None else ds.read(band)
        return Raster(values, ds.transform, ds.dtypes[0], ds.crs, ds.nodata,
                      dict(ds.profile), dict(ds.tags()), os.fspath(path))


def _as_raster(raster: str | os.PathLike[str] | Raster) -> tuple[Raster, str]:
    if not isinstance(raster, Raster):
        raster = read_raster(raster)
    return raster, repr(raster.path)


def _same_scalar(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (nodata values, profile entries)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _bits(values: np.ndarray) -> np.ndarray:
    """``values`` as unsigned integers of the same width, for a bit-for-bit comparison."""
    if values.dtype.kind in "fc":
        return values.view(f"u{values.dtype.itemsize}")
    return values


def _where(index: tuple[int, ...], axes: Sequence[str] | None) -> str:
    if axes is None or len(axes) != len(index):
        return f"index {list(index)}"
    return ", ".join(f"{name} {i}" for name, i in zip(axes, index, strict=True))


def assert_same_values(actual: Any, expected: Any, *, atol: float = 0.0, rtol: float = 0.0,
                       axes: Sequence[str] | None = None, what: str = "values") -> None:
    """Assert that two arrays have the same shape, dtype and values.

    Parameters
    ----------
    actual, expected
        The arrays (anything :func:`numpy.asarray` takes).
    atol, rtol
        Tolerances: ``|actual - expected| <= atol + rtol · |expected|``. With both 0
        (the default) values must be identical, floats bit for bit.
    axes
        Names of the axes, used to say where the first difference is (e.g. ``("band",
        "row", "col")``).
    what
        What the arrays are, at the start of the message.

    Raises
    ------
    AssertionError
        Naming the shapes or dtypes that differ, or how many values differ, the first
        one and the largest difference.
    """
    a, b = np.asarray(actual), np.asarray(expected)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ: {a.shape} != {b.shape} (expected)")
    if a.dtype != b.dtype:
        raise AssertionError(f"{what}: dtypes differ: {a.dtype} != {b.dtype} (expected)")
    if atol == 0 and rtol == 0:
        if a.tobytes() == b.tobytes():
            return
        wrong = _bits(a) != _bits(b)
        rule = "bit for bit"
    else:
        if a.dtype.kind in "fc":
            ok = np.isclose(a, b, atol=atol, rtol=rtol, equal_nan=True)
        else:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            ok = diff <= atol + rtol * np.abs(b.astype(np.float64))
        wrong = ~ok
        rule = f"within atol={atol}, rtol={rtol}"
        if not wrong.any():
            return
    count = int(np.count_nonzero(wrong))
    first = tuple(int(i) for i in np.argwhere(wrong)[0]) if a.ndim else ()
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.abs(a.astype(np.float64) - b.astype(np.float64))[wrong]
    finite = delta[np.isfinite(delta)]
    largest = f"{finite.max():.6g}" if finite.size else "n/a (NaN or infinite values)"
    raise AssertionError(
        f"{what} differ ({rule}) at {count} of {a.size} elements; first at "
        f"{_where(first, axes)}: {a[first].item()!r} != {b[first].item()!r} (expected); "
        f"largest |difference| {largest}")


def assert_same_map(actual: str | os.PathLike[str] | Raster,
                    expected: str | os.PathLike[str] | Raster, *, atol: float = 0.0,
                    rtol: float = 0.0, check_georeference: bool = True,
                    check_layout: bool = False) -> None:
    """Assert that two rasters are the same map: size, bands, dtype, nodata and values.

    Parameters
    ----------
    actual, expected
        Raster paths, or :class:`Raster` tuples from :func:`read_raster` (to read a
        reference once for several comparisons).
    atol, rtol
        Value tolerances (see :func:`assert_same_values`); 0 means identical.
    check_georeference
        Also require the same CRS and transform (exactly).
    check_layout
        Also require the same file layout: the whole rasterio profile (driver, blocks,
        tiling, compression, interleave, ...) and the metadata tags.

    Raises
    ------
    AssertionError
        Saying what differs first: size, band count, dtype, nodata, CRS, transform,
        profile entries or tags, then values (count, first pixel as ``band`` (1-based),
        ``row``, ``col``, largest difference).

    Examples
    --------
    >>> reference = read_raster("reference.tif")  # doctest: +SKIP
    >>> assert_same_map("tiled.tif", reference, check_layout=True)  # doctest: +SKIP
    """
    a, name_a = _as_raster(actual)
    b, name_b = _as_raster(expected)
    where = f"maps {name_a} and {name_b}"

    def differ(prop: str, got: Any, want: Any) -> AssertionError:
        return AssertionError(f"{where}: {prop} differ: {got!r} != {want!r} (expected)")

    if a.values.shape != b.values.shape:
        raise differ("shapes (bands, rows, cols)", a.values.shape, b.values.shape)
    if a.dtype != b.dtype:
        raise differ("dtypes", a.dtype, b.dtype)
    if not _same_scalar(a.nodata, b.nodata):
        raise differ("nodata values", a.nodata, b.nodata)
    if check_georeference:
        if (a.crs is None) != (b.crs is None) or (a.crs is not None and a.crs != b.crs):
            raise differ("CRS", a.crs.to_string() if a.crs else None,
                         b.crs.to_string() if b.crs else None)
        if a.transform != b.transform:
            raise differ("transforms", tuple(a.transform)[:6], tuple(b.transform)[:6])
    if check_layout:
        keys = sorted(set(a.profile) | set(b.profile))
        changed = [k for k in keys if not _same_scalar(a.profile.get(k), b.profile.get(k))]
        if changed:
            raise differ(f"profile entries {changed}", {k: a.profile.get(k) for k in changed},
                         {k: b.profile.get(k) for k in changed})
        if a.tags != b.tags:
            keys = sorted(set(a.tags) | set(b.tags))
            changed = [k for k in keys if a.tags.get(k) != b.tags.get(k)]
            raise differ(f"tags {changed}", {k: a.tags.get(k) for k in changed},
                         {k: b.tags.get(k) for k in changed})
    band_axes = ("band index (0-based)", "row", "col") if a.values.ndim == 3 else ("row", "col")
    assert_same_values(a.values, b.values, atol=atol, rtol=rtol, axes=band_axes,
                       what=f"{where}: values")


def assert_same_patches(actual: str | os.PathLike[str], expected: str | os.PathLike[str], *,
                        atol: float = 0.0, rtol: float = 0.0,
                        check_georeference: bool = True) -> None:
    """Assert that two patches images (or labels images) hold the same patches.

    Compares the layout read by :func:`terrapatch.patches.read_patches_info`
    (number of patches, patch width and height, bands, dtype, whether the patch size
    came from terrapatch's metadata), then the patches themselves, a few thousand at
    a time.

    Parameters
    ----------
    actual, expected
        Paths of patches images written by extraction (or by OTBTF).
    atol, rtol
        Value tolerances (see :func:`assert_same_values`); 0 means identical.
    check_georeference
        Also require the same CRS and transform (the dummy geotransform records the
        source's pixel spacing).

    Raises
    ------
    AssertionError
        Saying which layout property differs, or where the first differing value is
        (patch, row, col, band, all 0-based).
    """
    a, b = read_patches_info(actual), read_patches_info(expected)
    where = f"patches images {os.fspath(actual)!r} and {os.fspath(expected)!r}"
    for prop in ("n_patches", "patch_size_x", "patch_size_y", "bands", "dtype",
                 "from_metadata"):
        got, want = getattr(a, prop), getattr(b, prop)
        if got != want:
            raise AssertionError(f"{where}: {prop} differ: {got!r} != {want!r} (expected)")
    if check_georeference:
        with rasterio.open(actual) as da, rasterio.open(expected) as db:
            if da.crs != db.crs:
                raise AssertionError(f"{where}: CRS differ: {da.crs} != {db.crs} (expected)")
            if da.transform != db.transform:
                raise AssertionError(f"{where}: transforms differ: {tuple(da.transform)[:6]}"
                                     f" != {tuple(db.transform)[:6]} (expected)")
    for start in range(0, a.n_patches, PATCHES_PER_READ):
        count = min(PATCHES_PER_READ, a.n_patches - start)
        pa = read_patches(actual, start, count, info=a)
        pb = read_patches(expected, start, count, info=b)
        try:
            assert_same_values(pa, pb, atol=atol, rtol=rtol,
                               axes=("patch", "row", "col", "band"), what=f"{where}: values")
        except AssertionError as exc:
            if start == 0:
                raise
            raise AssertionError(f"{exc} (patch numbers from {start})") from None


def _as_window(window: WindowLike) -> Window:
    if isinstance(window, Window):
        return window
    items: tuple[Any, ...] = tuple(window)
    if len(items) == 2 and all(isinstance(p, Sequence) and len(p) == 2 for p in items):
        (r0, r1), (c0, c1) = items
        return Window(c0, r0, c1 - c0, r1 - r0)
    if len(items) == 4:
        return Window(*items)
    raise TypeError(f"not a window: {window!r} (expected a rasterio Window, (col_off, "
                    "row_off, width, height) or ((row_start, row_stop), (col_start, col_stop)))")


def assert_windows_equal(actual: WindowLike, expected: WindowLike) -> None:
    """Assert that two windows have the same offsets and size, exactly.

    Each may be a rasterio :class:`~rasterio.windows.Window`, a tuple ``(col_off,
    row_off, width, height)`` (the Window's field order) or rasterio's
    ``((row_start, row_stop), (col_start, col_stop))``.

    Examples
    --------
    >>> from rasterio.windows import Window
    >>> assert_windows_equal(Window(2, 3, 4, 5), ((3, 8), (2, 6)))
    """
    a, b = _as_window(actual), _as_window(expected)
    fields = ("col_off", "row_off", "width", "height")
    changed = [f"{f} {getattr(a, f)!r} != {getattr(b, f)!r}" for f in fields
               if getattr(a, f) != getattr(b, f)]
    if changed:
        raise AssertionError(f"windows differ: {', '.join(changed)} (expected); "
                             f"{a!r} != {b!r}")


def assert_coordinate_patch(patch: Any, col_off: int, row_off: int) -> None:
    """Assert that a patch read from a coordinate raster is the window at ``(col_off, row_off)``.

    ``patch`` is ``(rows, cols, bands)`` (as :func:`terrapatch.patches.read_patches`
    returns one patch) cut from a raster written by
    :func:`~terrapatch.testing.rasters.coordinate_raster`: band 0 must hold columns
    ``col_off …`` and band 1 rows ``row_off …`` on every pixel. Other bands are not
    checked (slice them out first when the coordinates are not bands 0 and 1).

    Raises
    ------
    AssertionError
        Saying where the patch starts instead (its first pixel's column and row) or,
        if it holds no window, the first wrong pixel.
    """
    p = np.asarray(patch)
    if p.ndim != 3 or p.shape[2] < 2:
        raise AssertionError(f"patch of shape {p.shape} is not (rows, cols, bands ≥ 2)")
    ry, rx = p.shape[:2]
    cols = np.broadcast_to(np.arange(col_off, col_off + rx), (ry, rx))
    rows = np.broadcast_to(np.arange(row_off, row_off + ry)[:, None], (ry, rx))
    if np.array_equal(p[..., 0], cols) and np.array_equal(p[..., 1], rows):
        return
    start = f"col {p[0, 0, 0]!r}, row {p[0, 0, 1]!r}"
    prefix = (f"patch {rx}×{ry} is not the window at col_off={col_off}, row_off={row_off}: "
              f"its first pixel is at {start}")
    for band, want in ((0, cols), (1, rows)):
        try:
            assert_same_values(p[..., band], want.astype(p.dtype), axes=("row", "col"),
                               what=f"{prefix}; band {band} ({'cols' if band == 0 else 'rows'})")
        except AssertionError as exc:
            raise AssertionError(str(exc)) from None
    raise AssertionError(prefix)
