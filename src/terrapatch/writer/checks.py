"""The check of a run's outputs before any work, and the claims that lock them for the run.

:func:`check_outputs` refuses, in one line naming the parameter and the value:

- an output that is one of the run's inputs: the same real path or the same inode, where
  a VRT input's member files (read from the VRT), every file of a stacked list, a
  shapefile's sidecars and a raster's ``.ovr`` / ``.aux.xml`` / ``.msk`` count as inputs;
  an output inside an input folder (a SavedModel), or a folder output that would replace
  a folder holding an input;
- two outputs on one path, counting the files a format writes beside its output (a
  shapefile's ``.dbf``, a VRT mosaic's ``.blocks`` folder);
- an extension that does not match the format terrapatch writes (``map.png`` for a
  GeoTIFF), naming the driver GDAL would read it with;
- a GDAL creation option the driver does not know, or a value it does not accept
  (``COMPRESS=NOPE``), checked against the driver's own creation option list;
- a folder where the output's pending folder cannot be created (``/proc``, ``/sys``, a
  read-only file system) or a file name too long for the file system.

:func:`claim_outputs` runs the check, then locks every output's pending folder for the
whole run (:func:`~terrapatch.writer.pending.claimed`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from terrapatch.errors import InputError
from terrapatch.progress import logger
from terrapatch.writer.formats import GTIFF_ONLY_OPTIONS, MapFormat
from terrapatch.writer.pending import PendingOutput, cannot_write, check_writable, claimed

PathLike = str | os.PathLike[str]

#: Kinds of output: what the output is called in messages, and the extensions it may have
#: (None: any name; the vector formats come from :data:`terrapatch.vector.VECTOR_DRIVERS`,
#: the map formats from :class:`~terrapatch.writer.MapFormat`).
OUTPUT_KINDS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "patches": ("patches image", (".tif", ".tiff")),
    "map": ("map", None),
    "vector": ("vector file", None),
    "statistics": ("statistics file", (".json", ".xml")),
    "json": ("JSON file", (".json",)),
    "onnx": ("ONNX model", (".onnx",)),
    "png": ("PNG image", (".png",)),
    "markdown": ("report", (".md",)),
    "classifier": ("classifier", (".skops",)),
    "folder": ("folder", None),
}
#: Files a shapefile is made of, beside its ``.shp``.
SHAPEFILE_PARTS = (".shp", ".dbf", ".shx", ".prj", ".cpg", ".sbn", ".sbx", ".qix", ".qpj")
#: Sidecars GDAL may keep beside a raster input (overviews, statistics, masks).
RASTER_SIDECARS = (".aux.xml", ".ovr", ".msk")
#: Nested VRTs followed when listing a VRT input's member files.
VRT_DEPTH = 8


@dataclass(frozen=True)
class Output:
    """An output a run will write, as :func:`check_outputs` sees it.

    Attributes
    ----------
    path
        The output path (without extended file name options).
    kind
        One of :data:`OUTPUT_KINDS`.
    driver
        For maps, the output format (``"COG"``, ``"VRT"``; None: from the extension).
    creation_options
        GDAL creation options given for it (``gdal:co:KEY=VALUE``), checked against the
        driver that writes it.
    """

    path: PathLike
    kind: str = "patches"
    driver: str | None = None
    creation_options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _File:
    """One file (or folder) of a run, with what identifies it on disk."""

    parameter: str
    shown: str
    real: str
    inode: tuple[int, int] | None
    folder: bool

    @classmethod
    def of(cls, parameter: str, shown: PathLike, path: PathLike, folder: bool) -> _File:
        real = os.path.realpath(path)
        try:
            stat = os.stat(real)
            inode: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
        except OSError:
            inode = None
        return cls(parameter, os.fspath(shown), real, inode, folder)

    def same(self, other: _File) -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)

    def holds(self, other: _File) -> bool:
        """Whether this is a folder and ``other`` lies inside it."""
        return self.folder and other.real.startswith(self.real.rstrip(os.sep) + os.sep)


def _as_list(paths: PathLike | Sequence[PathLike] | None) -> list[PathLike]:
    if paths is None:
        return []
    if isinstance(paths, str | os.PathLike):
        return [paths]
    return list(paths)


def vrt_members(path: PathLike, depth: int = VRT_DEPTH) -> list[Path]:
    """The local files a VRT reads (its ``SourceFilename`` entries), nested VRTs followed."""
    from terrapatch.raster import is_remote

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    folder = Path(path).parent
    members: list[Path] = []
    for element in root.iter("SourceFilename"):
        name = (element.text or "").strip()
        if not name or is_remote(name) or name.startswith("/vsi"):
            continue
        member = folder / name if element.get("relativeToVRT") == "1" else Path(name)
        members.append(member)
        if depth > 0 and member.is_file() and _is_vrt(member):
            members.extend(vrt_members(member, depth - 1))
    return members


def _input_files(parameter: str, path: PathLike) -> list[_File]:
    """An input and the files it is made of (VRT members, shapefile parts, sidecars)."""
    from terrapatch.raster import is_remote

    text = os.fspath(path)
    if is_remote(text) or not os.path.exists(text):
        return []
    if os.path.isdir(text):
        return [_File.of(parameter, text, text, True)]
    files = [_File.of(parameter, text, text, False)]
    p = Path(text)
    parts = [p.with_suffix(s) for s in SHAPEFILE_PARTS] if p.suffix.lower() == ".shp" else []
    parts += [Path(text + s) for s in RASTER_SIDECARS]
    files += [_File.of(parameter, text, part, False) for part in parts if part.exists()]
    if _is_vrt(p):
        files += [_File.of(parameter, text, member, False) for member in vrt_members(p)]
    return files


def _is_vrt(path: Path) -> bool:
    """Whether ``path`` is a GDAL VRT (by its content: GDAL ignores the extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip()
    except OSError:
        return False
    return head.startswith(b"<VRTDataset")


def _written_files(parameter: str, output: Output) -> list[_File]:
    """What writing ``output`` creates: the file, and the files its format puts beside it."""
    p = Path(output.path)
    files = [_File.of(parameter, p, p, output.kind == "folder")]
    suffix = p.suffix.lower()
    if output.kind == "vector" and suffix == ".shp":
        files += [_File.of(parameter, p, p.with_suffix(s), False) for s in SHAPEFILE_PARTS[1:5]]
    if output.kind == "map" and (suffix == ".vrt" or (output.driver or "").upper() == "VRT"):
        files.append(_File.of(parameter, p, p.with_name(f"{p.stem}.blocks"), True))
    return files


def _check_extension(parameter: str, output: Output) -> None:
    """The extension must be one the output's format is written with."""
    what, allowed = OUTPUT_KINDS[output.kind]
    if output.kind == "vector":
        from terrapatch.vector import vector_driver

        vector_driver(output.path, parameter)
        return
    if allowed is None:
        return
    suffix = Path(output.path).suffix.lower()
    if suffix in allowed:
        return
    hint = ""
    with contextlib.suppress(Exception):
        from rasterio.drivers import driver_from_extension

        hint = f", which GDAL reads as {driver_from_extension(os.fspath(output.path))}"
    raise InputError(
        f"{parameter}: {os.fspath(output.path)!r} has extension {suffix or '(none)'!r}{hint}; "
        f"a {what} is written as {' or '.join(allowed)}"
    )


def _check_options(parameter: str, output: Output) -> None:
    """GDAL creation options of a raster output, against the driver that writes it."""
    if output.kind == "map":
        fmt = MapFormat.for_path(output.path, output.driver, dict(output.creation_options))
        for key, value in fmt.creation_options.items():
            driver = "GTiff" if fmt.driver != "COG" or key in GTIFF_ONLY_OPTIONS else "COG"
            check_creation_option(driver, key, value, parameter)
    elif output.kind == "patches":
        for key, value in output.creation_options.items():
            check_creation_option("GTiff", key, value, parameter)


def _probe(parameter: str, path: PathLike) -> None:
    """Fail, naming the output, when its folder cannot hold a pending folder (``/proc``)."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    try:
        probe = tempfile.mkdtemp(prefix=".terrapatch-probe-", dir=parent)
    except OSError as exc:
        raise cannot_write(exc, path, parameter) from None
    shutil.rmtree(probe, ignore_errors=True)


def _given(outputs: Mapping[str, Output | PathLike | None]) -> dict[str, Output]:
    return {key: o if isinstance(o, Output) else Output(o) for key, o in outputs.items()
            if o is not None and os.fspath(o.path if isinstance(o, Output) else o)}


def check_outputs(outputs: Mapping[str, Output | PathLike | None],
                  inputs: Mapping[str, PathLike | Sequence[PathLike] | None] | None = None,
                  ) -> None:
    """Check every output of a run before any work starts (see the module's list).

    Parameters
    ----------
    outputs
        Parameter → output (a path is a patches image); None entries are not written.
    inputs
        Parameter → input path or paths (a stacked list); remote inputs are skipped.

    Raises
    ------
    InputError
        For an output that is an input or shares a path with another output, a wrong
        extension or an invalid creation option.
    OutputError
        For an output that cannot be written where it is.
    """
    given = _given(outputs)
    read = [f for parameter, paths in (inputs or {}).items() for path in _as_list(paths)
            for f in _input_files(parameter, path)]
    written: list[_File] = []
    for parameter, output in given.items():
        check_writable(output.path, parameter, directory=output.kind == "folder")
        _check_extension(parameter, output)
        _check_options(parameter, output)
        _probe(parameter, output.path)
        what = OUTPUT_KINDS[output.kind][0]
        for mine in _written_files(parameter, output):
            side = "" if mine.real == os.path.realpath(output.path) else \
                f" writes {os.path.basename(mine.real)!r}, which"
            for other in read:
                if mine.same(other) or other.holds(mine):
                    relation = "is inside" if other.holds(mine) and not mine.same(other) \
                        else "is also"
                    raise InputError(f"{parameter}: {mine.shown!r}{side} {relation} "
                                     f"{other.parameter}={other.shown!r}; the {what} would "
                                     "replace its input")
                if mine.holds(other):
                    raise InputError(f"{parameter}: {mine.shown!r} would be replaced, but it "
                                     f"holds {other.parameter}={other.shown!r}")
            for other in written:
                if mine.same(other):
                    raise InputError(f"{parameter}: {mine.shown!r}{side} is also "
                                     f"{other.parameter}={other.shown!r}; give each output "
                                     "its own name")
                if mine.holds(other) or other.holds(mine):
                    inner, outer = (other, mine) if mine.holds(other) else (mine, other)
                    raise InputError(f"{parameter}: {inner.parameter}={inner.shown!r} is "
                                     f"inside {outer.parameter}={outer.shown!r}, a folder "
                                     "written as a whole; give each output its own place")
        written.extend(_written_files(parameter, output))


@contextlib.contextmanager
def claim_outputs(outputs: Mapping[str, Output | PathLike | None],
                  inputs: Mapping[str, PathLike | Sequence[PathLike] | None] | None = None,
                  ) -> Iterator[dict[str, PendingOutput]]:
    """:func:`check_outputs`, then hold every output's locked pending folder for the run.

    A second run on one of the outputs fails at once, naming the lock and the PID of
    the run holding it; a dead run's leftovers are removed. Yields parameter → pending
    folder; the outputs are written through :func:`~terrapatch.writer.atomic_output`,
    :func:`~terrapatch.writer.atomic_directory` or :func:`~terrapatch.writer.output_group`
    by the same thread.
    """
    check_outputs(outputs, inputs)
    with contextlib.ExitStack() as stack:
        yield {key: stack.enter_context(claimed(output.path, key, output.kind == "folder"))
               for key, output in _given(outputs).items()}


# ---------------------------------------------------------------- GDAL creation options


@dataclass(frozen=True)
class OptionSpec:
    """One creation option of a GDAL driver, from its ``DMD_CREATIONOPTIONLIST``."""

    name: str
    type: str
    values: tuple[str, ...] = ()

    def problem(self, value: str) -> str | None:
        """Why GDAL would ignore ``value`` (or, for a number that is not one, crash on it).

        A number outside the range the list documents is not a problem: GDAL warns but
        uses it (``BLOCKSIZE=64`` makes a valid COG).
        """
        text = str(value).strip()
        if self.type == "string-select" and self.values:
            if text.upper() not in {v.upper() for v in self.values}:
                return f"{text!r} is not one of {', '.join(self.values)}"
        elif self.type in ("int", "integer", "float"):
            try:
                int(text) if self.type != "float" else float(text)
            except ValueError:
                return f"{text!r} is not {'an integer' if self.type != 'float' else 'a number'}"
        elif self.type == "boolean" and text.upper() not in (
                "YES", "NO", "TRUE", "FALSE", "ON", "OFF", "1", "0"):
            return f"{text!r} is not YES or NO"
        return None


@functools.cache
def _gdal() -> ctypes.CDLL | None:
    """The GDAL library of rasterio, for the driver metadata rasterio does not expose."""
    import rasterio

    package = Path(rasterio.__file__).parent
    candidates = [*glob.glob(os.fspath(package.parent / "rasterio.libs" / "libgdal*")),
                  *glob.glob(os.fspath(package / ".dylibs" / "libgdal*"))]
    system = ctypes.util.find_library("gdal")
    candidates += [system] if system else []
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            lib.GDALGetDriverByName.restype = ctypes.c_void_p
            lib.GDALGetDriverByName.argtypes = [ctypes.c_char_p]
            lib.GDALGetMetadataItem.restype = ctypes.c_char_p
            lib.GDALGetMetadataItem.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                ctypes.c_char_p]
        except (OSError, AttributeError):
            continue
        return lib
    return None


@functools.cache
def creation_option_list(driver: str) -> dict[str, OptionSpec] | None:
    """The creation options of a GDAL raster driver (None when they cannot be read)."""
    import rasterio

    lib = _gdal()
    if lib is None:
        return None
    with rasterio.Env():  # the drivers are registered
        handle = lib.GDALGetDriverByName(driver.encode("ascii"))
        text = lib.GDALGetMetadataItem(handle, b"DMD_CREATIONOPTIONLIST", None) \
            if handle else None
    if not text:
        return None
    try:
        root = ET.fromstring(text.decode("utf-8", "replace"))
    except ET.ParseError:
        return None
    specs: dict[str, OptionSpec] = {}
    for option in root.iter("Option"):
        name = option.get("name", "").upper()
        values = tuple((v.text or "").strip() for v in option.iter("Value")) + tuple(
            a for v in option.iter("Value") for a in (v.get("alias"),) if a)
        spec = OptionSpec(name, option.get("type", "string").lower(), values)
        for key in (name, option.get("alias", "").upper(),
                    option.get("deprecated_alias", "").upper()):
            if key:
                specs[key] = spec
    return specs


def check_creation_option(driver: str, key: str, value: str, parameter: str) -> None:
    """Refuse, naming ``parameter``, a creation option GDAL's ``driver`` would not accept.

    GDAL itself only warns (``CPLE_NotSupported``) and writes the file without it.
    """
    specs = creation_option_list(driver)
    if specs is None:
        logger.debug("creation options of %s cannot be read: %s=%s not checked", driver,
                     key, value)
        return
    spec = specs.get(key.upper())
    if spec is None:
        import difflib

        close = difflib.get_close_matches(key.upper(), list(specs), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise InputError(f"{parameter}: gdal:co:{key}={value} is not a creation option of "
                         f"GDAL's {driver} driver{hint}")
    problem = spec.problem(value)
    if problem is not None:
        raise InputError(f"{parameter}: gdal:co:{key}={value} is not valid for GDAL's "
                         f"{driver} driver: {problem}")
