"""Writing rasters: pixel types, extended file names, GeoTIFF/COG profiles, atomic outputs, locks.

Every file terrapatch writes goes through :func:`atomic_output` (or
:class:`PendingOutput`): it is written under a temporary name beside its final
path and renamed only when complete, so an interrupted or failed run never leaves
a half-written file under the final name. :class:`PendingOutput` also locks the
output against a second run, clears a dead run's leftovers, and can keep the state
of an interrupted run for resuming. :class:`MapFormat` says how a map is written
(GeoTIFF, Cloud-Optimized GeoTIFF with overviews, VRT mosaic).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from terrapatch.errors import InputError, OutputError, TerrapatchError
from terrapatch.progress import logger

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


# ============================================================================ map outputs

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
                   if k not in _COG_ONLY_OPTIONS}
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
            if key not in _GTIFF_ONLY_OPTIONS:
                options[key] = value
        return options


#: Creation options only the COG driver knows (not passed to intermediate GeoTIFFs).
_COG_ONLY_OPTIONS = frozenset({"BLOCKSIZE", "OVERVIEWS", "OVERVIEW_RESAMPLING",
                               "OVERVIEW_COMPRESS", "OVERVIEW_QUALITY", "OVERVIEW_PREDICTOR",
                               "TILING_SCHEME", "ALIGNED_LEVELS", "ADD_ALPHA", "WARP_RESAMPLING",
                               "TARGET_SRS", "RES", "EXTENT", "STATISTICS", "LEVEL"})
#: GeoTIFF layout options the COG driver sets itself.
_GTIFF_ONLY_OPTIONS = frozenset({"TILED", "BLOCKXSIZE", "BLOCKYSIZE", "INTERLEAVE", "PROFILE",
                                 "COPY_SRC_OVERVIEWS"})


class PendingOutput:
    """The locked pending folder of one output; commits the finished map to its name.

    Parameters
    ----------
    path
        Final output path.
    resume
        Keep what the folder holds (the state of an interrupted run) instead of
        clearing it, and keep it when this run fails.
    parameter
        Name of the output parameter in messages.

    Raises
    ------
    OutputError
        If another live run holds the folder, or it cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], resume: bool = False,
                 parameter: str = "out") -> None:
        self.target = Path(os.path.abspath(check_writable(path, parameter)))
        self.resume = resume
        self.parameter = parameter
        self.dir = self.target.with_name(f".{self.target.name}.pending")
        self._lock: int | None = None

    def __enter__(self) -> PendingOutput:
        try:
            self.dir.mkdir(exist_ok=True)
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise cannot_write(exc, self.target, self.parameter) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"{self.parameter}: another terrapatch run (pid {owner}) is writing "
                    f"{os.fspath(self.target)!r}; wait for it or stop it"
                ) from None
            raise cannot_write(exc, self.target, self.parameter) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._lock = fd
        stale = [p for p in self.dir.iterdir() if p.name != "lock"]
        if stale and not self.resume:
            logger.info("removing the leftovers of an earlier run on %s", self.target)
            for item in stale:
                _remove(item)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        keep = exc is not None and self.resume and any(
            p.name not in ("lock",) for p in self.dir.iterdir())
        try:
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                for item in self.dir.glob("*.part*"):
                    _remove(item)
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
        if exc is not None and keep:
            logger.warning("%s: interrupted; the finished blocks are kept in %s: rerun with "
                           "--resume (resume=True) to compute only the missing ones",
                           self.target.name, self.dir)

    def file(self, name: str) -> Path:
        """A path inside the pending folder."""
        return self.dir / name

    def commit(self, finished: Path) -> None:
        """Move a finished file of the pending folder to the output's name."""
        try:
            os.chmod(finished, 0o666 & ~current_umask())
            os.replace(finished, self.target)
        except OSError as exc:
            raise cannot_write(exc, self.target, self.parameter) from exc

    def commit_folder(self, finished: Path, name: str) -> Path:
        """Move a finished folder (a VRT's blocks) beside the output, replacing an old one."""
        final = self.target.with_name(name)
        old = None
        try:
            os.chmod(finished, 0o777 & ~current_umask())
            if final.exists():
                old = self.dir / "previous-blocks"
                os.replace(final, old)
            os.replace(finished, final)
        except OSError as exc:
            raise cannot_write(exc, final, self.parameter) from exc
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


