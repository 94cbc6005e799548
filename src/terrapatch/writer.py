"""Writing rasters: pixel types, extended file names, GeoTIFF profiles, atomic outputs.

Every file terrapatch writes goes through :func:`atomic_output`: it is written
under a temporary name beside its final path and renamed only when complete,
so an interrupted or failed run never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from terrapatch.errors import InputError, OutputError, TerrapatchError

#: OTB pixel type names (and numpy spellings) → numpy dtypes.
PIXEL_TYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("uint8"),
    "int8": np.dtype("int8"),
    "int16": np.dtype("int16"),
    "uint16": np.dtype("uint16"),
    "int32": np.dtype("int32"),
    "uint32": np.dtype("uint32"),
    "float": np.dtype("float32"),
    "float32": np.dtype("float32"),
    "double": np.dtype("float64"),
    "float64": np.dtype("float64"),
}


def pixel_dtype(pixel_type: str | np.dtype | type | None, default: str = "float32",
                parameter: str = "pixel_type") -> np.dtype:
    """Return the numpy dtype for an OTB pixel type name such as ``"uint8"`` or ``"float"``.

    Parameters
    ----------
    pixel_type
        A name from :data:`PIXEL_TYPES`, a numpy dtype, or None for ``default``.
    default
        Pixel type used when ``pixel_type`` is None.
    parameter
        Parameter name quoted in the error message.
    """
    if pixel_type is None:
        pixel_type = default
    if isinstance(pixel_type, str):
        key = pixel_type.strip().lower()
        if key not in PIXEL_TYPES:
            raise InputError(
                f"{parameter}: unknown pixel type {pixel_type!r}; "
                f"choose one of {', '.join(sorted(PIXEL_TYPES))}"
            )
        return PIXEL_TYPES[key]
    dtype = np.dtype(pixel_type)
    if dtype not in PIXEL_TYPES.values():
        raise InputError(f"{parameter}: unsupported pixel type {dtype.name!r}")
    return dtype


def convert_pixels(values: np.ndarray, dtype: np.dtype, rounding: bool = False) -> np.ndarray:
    """Convert values to ``dtype`` the way OTB does: clamp to the type's range, then truncate.

    Float → integer conversion truncates toward zero (0.9 → 0 for uint8) unless
    ``rounding`` is True, in which case values are rounded half away from zero
    first. NaN becomes 0 in integer types. Float → float is a plain cast.
    """
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    if values.dtype.kind in "iu":
        src = np.iinfo(values.dtype)
        if src.min >= info.min and src.max <= info.max:
            return values.astype(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)
    work = values.astype(np.float64, copy=True)
    if rounding:
        work = np.sign(work) * np.floor(np.abs(work) + 0.5)
    np.nan_to_num(work, copy=False, nan=0.0)
    np.clip(work, info.min, info.max, out=work)
    return np.trunc(work).astype(dtype)


@dataclass(frozen=True)
class ExtendedFilename:
    """Options parsed from an OTB extended file name (``box=...&gdal:co:KEY=VALUE``).

    Attributes
    ----------
    box
        ``(startx, starty, sizex, sizey)`` in output-grid pixels, or None.
    creation_options
        GDAL creation options from ``gdal:co:KEY=VALUE`` entries (keys upper-cased).
    driver
        Output format from a ``gdal:of:NAME`` entry (upper-cased, e.g. ``COG``), or None.
    """

    box: tuple[int, int, int, int] | None = None
    creation_options: dict[str, str] = field(default_factory=dict)
    driver: str | None = None


def split_extended_path(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Split ``"out.tif?&box=0:0:10:10"`` into ``(Path("out.tif"), "box=0:0:10:10")``."""
    text = os.fspath(path)
    if "?" not in text:
        return Path(text), ""
    base, _, ext = text.partition("?")
    return Path(base), ext.lstrip("&")


def parse_extended_filename(text: str | None, parameter: str = "ext_fname") -> ExtendedFilename:
    """Parse an OTB extended file name string such as ``"box=0:0:64:64&gdal:co:COMPRESS=LZW"``.

    Keys other than ``box``, ``gdal:co:*`` and ``gdal:of:NAME`` (output format, e.g.
    ``gdal:of:COG``) are rejected with an error naming them, except OTB streaming hints
    (``streaming:*``), which are accepted and ignored.
    """
    box = None
    driver: str | None = None
    options: dict[str, str] = {}
    if not text:
        return ExtendedFilename()
    for item in text.strip().lstrip("?").split("&"):
        item = item.strip()
        if not item:
            continue
        if item.lower().startswith("gdal:of:"):
            driver = item[len("gdal:of:"):].strip().upper()
            if not driver:
                raise InputError(f"{parameter}: entry {item!r} names no output format")
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"{parameter}: entry {item!r} is not of the form key=value")
        low = key.strip().lower()
        if low == "box":
            parts = value.split(":")
            try:
                numbers = tuple(int(p) for p in parts)
            except ValueError:
                numbers = ()
            if len(numbers) != 4 or numbers[2] <= 0 or numbers[3] <= 0:
                raise InputError(
                    f"{parameter}: box={value!r} must be startx:starty:sizex:sizey "
                    "with integer start and positive sizes"
                )
            box = (numbers[0], numbers[1], numbers[2], numbers[3])
        elif low.startswith("gdal:co:"):
            options[key.strip()[len("gdal:co:"):].upper()] = value.strip()
        elif low.startswith("streaming:"):
            continue
        else:
            raise InputError(
                f"{parameter}: unsupported extended file name key {key!r} "
                "(supported: box, gdal:co:KEY, gdal:of:NAME, streaming:*)"
            )
    return ExtendedFilename(box=box, creation_options=options, driver=driver)


def check_writable(path: str | os.PathLike[str], parameter: str) -> Path:
    """Fail early, naming ``parameter``, when ``path`` cannot be written."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"{parameter}: {os.fspath(path)!r} is a directory, not a file name")
    if not parent.is_dir():
        raise OutputError(f"{parameter}: directory {os.fspath(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parameter}: directory {os.fspath(parent)!r} is not writable")
    return target


def current_umask() -> int:
    """The process umask, read without changing it (os.umask is racy with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def cannot_write(exc: BaseException, path: str | os.PathLike[str], parameter: str) -> OutputError:
    """The one-line error for an I/O failure ``exc`` while writing the output ``path``.

    GDAL's generic "Write failed. See previous exception" is replaced by the cause it
    chains (e.g. "File too large", "No space left on device").
    """
    reason = str(exc)
    seen = exc
    while "previous exception" in reason and (seen.__cause__ or seen.__context__):
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        reason = str(seen)
    reason = reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__
    return OutputError(f"{parameter}: cannot write {os.fspath(path)!r} ({reason})")


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an I/O failure of GDAL or the OS (not one of terrapatch's errors)."""
    from rasterio.errors import RasterioError

    return isinstance(exc, OSError | RasterioError) and not isinstance(exc, TerrapatchError)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], parameter: str = "out") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    the final path is left untouched; I/O failures (disk full, permission) become an
    :class:`OutputError` naming ``parameter``. The file gets the usual permissions
    (``0o666`` minus the umask), not the private mode of temporary files.
    """
    target = check_writable(path, parameter)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".part" + target.suffix, dir=target.parent or "."
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        for sidecar in (".aux.xml",):
            leftover = Path(str(tmp) + sidecar)
            if leftover.exists():
                leftover.unlink()
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_write_failure(exc):
            raise cannot_write(exc, path, parameter) from exc
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], parameter: str = "out") -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` on success.

    An existing directory at ``path`` is replaced only once the new one is complete.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{parameter}: {os.fspath(path)!r} exists and is not a directory")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parameter}: directory {os.fspath(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parameter}: directory {os.fspath(parent)!r} is not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "previous")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise cannot_write(exc, path, parameter) from exc
        raise


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


@contextlib.contextmanager
def output_group() -> Iterator[Callable[..., Path]]:
    """Commit several outputs together: all appear under their final names, or none does.

    Yields ``stage(path, parameter="out") -> pending_path``: write each output to its
    pending path (a hidden name unique to this group, same extension). When the block
    ends without error every pending file (and its sidecars, e.g. a shapefile's
    ``.dbf``) is renamed to its final name; on error they are all removed, and I/O
    failures become an :class:`OutputError` naming the output's parameter.
    """
    token = secrets.token_hex(4)
    staged: list[tuple[Path, Path, str]] = []

    def stage(path: str | os.PathLike[str], parameter: str = "out") -> Path:
        target = check_writable(path, parameter)
        pending = target.with_name(f".{target.stem}.{token}.pending{target.suffix}")
        staged.append((pending, target, parameter))
        return pending

    def family(pending: Path) -> list[Path]:
        prefix = pending.stem + "."
        return [p for p in pending.parent.iterdir() if p.name.startswith(prefix)]

    current = "out"
    try:
        yield stage
        for pending, target, parameter in staged:
            current = parameter
            for item in family(pending):
                os.chmod(item, 0o666 & ~current_umask())
            for item in family(pending):
                os.replace(item, target.with_name(target.stem + item.name[len(pending.stem):]))
    except BaseException as exc:
        for pending, _, _ in staged:
            for item in family(pending) if pending.parent.is_dir() else []:
                with contextlib.suppress(OSError):
                    item.unlink()
        if is_write_failure(exc):
            where = staged[-1] if staged else None
            name = where[1] if where else "output"
            raise cannot_write(exc, name, where[2] if where else current) from exc
        raise
