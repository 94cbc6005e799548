"""The map file a serving run produces: format, creation profile, pending folder, commit.

A map is a GeoTIFF (default), a Cloud-Optimized GeoTIFF (``gdal:of:COG``, with
overviews) or a VRT mosaic of block files (``map.vrt``). While a run works, every
file it writes lives in one hidden *pending folder* beside the output
(``.map.tif.pending/``), locked by the run (:class:`PendingOutput`): a second run
on the same output is refused, the folder of a dead run (its lock released by the
kernel, even after ``kill -9``) is cleared by the next run, or kept as the state
to resume from with ``resume=True``. Only a complete map is moved to its final
name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from terrapatch.errors import InputError, OutputError
from terrapatch.progress import logger
from terrapatch.writer import (
    cannot_write,
    check_writable,
    current_umask,
    geotiff_profile,
    is_write_failure,
)

__all__ = [
    "DRIVERS",
    "MapFormat",
    "PendingOutput",
    "default_overview_resampling",
]

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


def check_output_error(exc: BaseException, target: Path, parameter: str) -> BaseException:
    """An :class:`OutputError` naming the output for an I/O failure, else ``exc``."""
    return cannot_write(exc, target, parameter) if is_write_failure(exc) else exc
