"""The OTBTF-compatible application framework: parameter specs, keys, sources, outputs.

An application declares its parameters once (:class:`Param`); this module turns
pyotb-style keyword arguments (``source1_il=...``), dotted keys
(``"source1.il"``), dicts and command-line tokens into validated values, and
hands them to the application's ``run`` method, which calls the plain Python
API. Every bad key or value raises a one-line :class:`~terrapatch.errors.ParameterError`
or :class:`~terrapatch.errors.InputError` naming the parameter.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from terrapatch.apps._extended import (
    ExtendedFilename,
    parse_extended_filename,
    split_extended_path,
)
from terrapatch.errors import InputError, ParameterError
from terrapatch.progress import configure_logging, logger
from terrapatch.raster import Source
from terrapatch.spelling import SOURCE, respelled
from terrapatch.writer import (
    pixel_dtype,
)

_SOURCE_KEY = re.compile(r"^source(\d+)\.(.+)$")

#: OTBTF spelling of a source's neutral identifiers (:mod:`terrapatch.spelling`), for
#: the applications that read patches (``patchsizex``) and those that feed a model
#: (``rfieldx``). A source's rasters are its ``il``.
SOURCE_NAMES = {SOURCE: f"{SOURCE}.il", f"{SOURCE}.paths": f"{SOURCE}.il",
                f"{SOURCE}.nodata": f"{SOURCE}.nodata"}
PATCH_SOURCE_NAMES = {**SOURCE_NAMES, f"{SOURCE}.patch_size": f"{SOURCE}.patchsizex/y",
                      f"{SOURCE}.patch_size[0]": f"{SOURCE}.patchsizex",
                      f"{SOURCE}.patch_size[1]": f"{SOURCE}.patchsizey"}
MODEL_SOURCE_NAMES = {**SOURCE_NAMES, f"{SOURCE}.patch_size": f"{SOURCE}.rfieldx/y",
                      f"{SOURCE}.patch_size[0]": f"{SOURCE}.rfieldx",
                      f"{SOURCE}.patch_size[1]": f"{SOURCE}.rfieldy",
                      f"{SOURCE}.placeholder": f"{SOURCE}.placeholder"}
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}

#: Parameter kinds: how a value is parsed and shown in ``-help``.
KINDS = ("str", "int", "float", "bool", "path", "paths", "strs", "choice", "out", "outvec")


@dataclass(frozen=True)
class Param:
    """One application parameter.

    Attributes
    ----------
    key
        Dotted OTB key (``"vec"``, ``"output.names"``); for per-source parameters the
        part after ``sourceK.`` (``"il"``, ``"patchsizex"``).
    kind
        One of :data:`KINDS`. ``out`` is an output raster (with a pixel type),
        ``outvec`` an output vector, ``paths`` an image list, ``strs`` a string list.
    help
        One-line description shown by ``-help``.
    default
        Value used when the parameter is not given.
    required
        Whether the parameter must be given.
    choices
        Allowed values for ``choice`` parameters.
    pixel_type
        Default pixel type of an ``out`` parameter.
    """

    key: str
    kind: str
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    pixel_type: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}")


@dataclass(frozen=True)
class OutputSpec:
    """A resolved output: path, pixel type and extended-filename options."""

    path: str
    pixel_type: str
    ext: ExtendedFilename


def normalize_key(key: str) -> str:
    """Map pyotb keyword spelling to the dotted key: ``source1_il`` → ``source1.il``."""
    return key.strip().lstrip("-").replace("_", ".")


def coerce(param: Param, value: Any, key: str) -> Any:
    """Convert a Python or command-line value to the parameter's type, or raise."""
    kind = param.kind
    if value is None:
        return None
    if kind in ("str", "path", "out", "outvec"):
        if isinstance(value, list | tuple):
            if len(value) != 1:
                raise InputError(f"{key}: expected one value, got {list(value)!r}")
            value = value[0]
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if kind == "paths":
        items = [value] if isinstance(value, str | os.PathLike) else list(value)
        if not items:
            raise InputError(f"{key}: empty image list")
        return tuple(os.fspath(v) for v in items)
    if kind == "strs":
        if isinstance(value, str):
            return tuple(value.split())
        return tuple(str(v) for v in value)
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise InputError(f"{key}: expected one value, got {list(value)!r}")
        value = value[0]
    if kind == "int":
        if isinstance(value, bool):
            raise InputError(f"{key}: {value!r} is not an integer")
        try:
            number = float(value) if isinstance(value, str) else value
            if float(number) != int(float(number)):
                raise ValueError
            return int(float(number))
        except (TypeError, ValueError):
            raise InputError(f"{key}: {value!r} is not an integer") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"{key}: {value!r} is not a number") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InputError(f"{key}: {value!r} is not a boolean (use true or false)")
    if kind == "choice":
        text = str(value)
        if text not in param.choices:
            raise InputError(f"{key}: {text!r} is not one of {', '.join(param.choices)}")
        return text
    raise AssertionError(kind)  # pragma: no cover


def sources_from_env() -> int:
    """Number of sources from ``OTB_TF_NSOURCES`` (default 1; invalid values are an error)."""
    text = os.environ.get("OTB_TF_NSOURCES", "").strip()
    if not text:
        return 1
    match = re.match(r"^[+-]?\d+", text)
    if not match:
        raise InputError(f"OTB_TF_NSOURCES: {text!r} is not an integer")
    return max(1, int(match.group(0)))


class App:
    """Base class of the OTBTF-compatible applications.

    Subclasses set :attr:`name`, :attr:`description`, :attr:`params`,
    :attr:`source_params` (empty for single-input apps), :attr:`primary_output` and
    :attr:`spelling` (the OTBTF key of each neutral identifier the core may name in
    an error or a log record, :mod:`terrapatch.spelling`), and implement :meth:`run`.

    Parameters
    ----------
    *args
        Dicts of parameters (dotted or underscore keys).
    n_sources
        Number of ``sourceK`` groups; default: ``OTB_TF_NSOURCES``, raised to the highest
        K among the keys given.
    quiet
        Hide progress bars.
    pixel_types
        ``{output_key: pixel_type}`` for outputs (the CLI's trailing ``uint8``).
    scheduler
        Dask scheduler address or ``distributed.Client`` for applications that can run
        on a cluster (extraction, serving).
    workers
        Number of local Dask worker processes for those applications.
    resume
        Resume an interrupted run from its journal (applications that support it:
        serving).
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``: where applications that run a model on
        rasters (serving) run it; None: auto.
    **kwargs
        Parameters in pyotb spelling (``source1_il=...``, ``model_fullyconv=True``).

    The application runs as soon as one of its outputs is given, like pyotb; otherwise
    call :meth:`write` (or :meth:`execute`).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    source_params: ClassVar[tuple[Param, ...]] = ()
    primary_output: ClassVar[str] = "out"
    supports_cluster: ClassVar[bool] = False
    supports_resume: ClassVar[bool] = False
    supports_device: ClassVar[bool] = False
    spelling: ClassVar[Mapping[str, str]] = {}

    def __init__(self, *args: Mapping[str, Any], n_sources: int | None = None,
                 quiet: bool = False, pixel_types: Mapping[str, str] | None = None,
                 scheduler: Any = None, workers: int | None = None, resume: bool = False,
                 device: str | None = None, **kwargs: Any) -> None:
        self.values: dict[str, Any] = {}
        self.pixel_types: dict[str, str] = {
            normalize_key(k): str(v) for k, v in (pixel_types or {}).items()}
        self.quiet = quiet
        self.scheduler = scheduler
        self.workers = workers
        self.resume = bool(resume)
        self.device = device
        self.result: Any = None
        self.executed = False
        given: dict[str, Any] = {}
        for mapping in args:
            if not isinstance(mapping, Mapping):
                raise InputError(f"{self.name}: positional arguments must be dicts, "
                                 f"got {type(mapping).__name__}")
            given.update({normalize_key(k): v for k, v in mapping.items()})
        given.update({normalize_key(k): v for k, v in kwargs.items()})
        highest = max((int(m.group(1)) for k in given if (m := _SOURCE_KEY.match(k))), default=0)
        if n_sources is not None and int(n_sources) < 1:
            raise InputError(f"n_sources: {n_sources!r} must be ≥ 1")
        base = int(n_sources) if n_sources is not None else sources_from_env()
        self.n_sources = max(base, highest) if self.source_params else 0
        for key, value in given.items():
            self.set(key, value)
        if any(self.values.get(p.key) for p in self.params if p.kind in ("out", "outvec")) or any(
            self.values.get(f"source{k}.{p.key}")
            for k in range(1, self.n_sources + 1) for p in self.source_params
            if p.kind in ("out", "outvec")
        ):
            self.execute()

    # ------------------------------------------------------------ parameters

    @classmethod
    def all_keys(cls, n_sources: int) -> dict[str, Param]:
        """Every dotted key of the application for ``n_sources`` sources."""
        keys: dict[str, Param] = {}
        for k in range(1, n_sources + 1):
            for p in cls.source_params:
                keys[f"source{k}.{p.key}"] = p
        for p in cls.params:
            keys[p.key] = p
        return keys

    def _param(self, key: str) -> Param:
        keys = self.all_keys(self.n_sources)
        if key in keys:
            return keys[key]
        close = difflib.get_close_matches(key, list(keys), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ParameterError(f"{key}: unknown parameter of {self.name}{hint}")

    def set(self, key: str, value: Any) -> None:
        """Set one parameter (dotted or underscore key)."""
        key = normalize_key(key)
        param = self._param(key)
        if value is True and param.kind != "bool":
            raise InputError(f"{key}: missing value (a {param.kind} is expected)")
        self.values[key] = coerce(param, value, key)

    def get(self, key: str) -> Any:
        """Value of a parameter, or its default."""
        key = normalize_key(key)
        param = self._param(key)
        value = self.values.get(key)
        return param.default if value is None else value

    def source(self, k: int, key: str) -> Any:
        """Value of ``sourceK.key``."""
        return self.get(f"source{k}.{key}")

    def output(self, key: str) -> OutputSpec | None:
        """The resolved output for ``key`` (path without extended options), or None."""
        value = self.values.get(key)
        if not value:
            return None
        param = self._param(key)
        path, ext = split_extended_path(value)
        pixel_type = self.pixel_types.get(key, param.pixel_type)
        pixel_dtype(pixel_type, parameter=key)
        return OutputSpec(os.fspath(path), pixel_type, parse_extended_filename(ext, key))

    def _check(self) -> None:
        for k in range(1, self.n_sources + 1):
            given = [p.key for p in self.source_params if f"source{k}.{p.key}" in self.values]
            if given and f"source{k}.il" not in self.values:
                raise ParameterError(
                    f"source{k}.il: missing, but source{k}.{given[0]} is given "
                    f"(every source{k}.* option needs source{k}.il)"
                )
        for key, param in self.all_keys(self.n_sources).items():
            if param.required and self.values.get(key) in (None, "", ()):
                raise ParameterError(f"{key}: missing mandatory parameter of {self.name}")

    # ------------------------------------------------------------ running

    def write(
        self,
        out: str | os.PathLike[str] | Mapping[str, str] | None = None,
        pixel_type: str | Mapping[str, str] | None = None,
        ext_fname: str | None = None,
    ) -> Any:
        """Set outputs and run, like pyotb's ``write``.

        Parameters
        ----------
        out
            Path of the primary output, or ``{output_key: path}``.
        pixel_type
            Pixel type of every output, or ``{output_key: pixel_type}``.
        ext_fname
            Extended file name options appended to every output
            (``"box=2000:2000:500:500&gdal:co:COMPRESS=DEFLATE"``).
        """
        targets: dict[str, Any]
        if out is None:
            targets = {}
        elif isinstance(out, Mapping):
            targets = {normalize_key(k): v for k, v in out.items()}
        else:
            targets = {self.primary_output: out}
        for key, path in targets.items():
            self.set(key, path)
        outputs = [k for k, p in self.all_keys(self.n_sources).items()
                   if p.kind == "out" and self.values.get(k)]
        if isinstance(pixel_type, Mapping):
            for key, value in pixel_type.items():
                self.pixel_types[normalize_key(key)] = str(value)
        elif pixel_type is not None:
            for key in outputs:
                self.pixel_types[key] = str(pixel_type)
        if ext_fname:
            for key in outputs:
                path = str(self.values[key])
                sep = "&" if "?" in path else "?&"
                self.values[key] = f"{path}{sep}{ext_fname}"
        return self.execute()

    def execute(self) -> Any:
        """Validate the parameters and run the application."""
        self._check()
        if not logger.handlers:  # like OTB applications, report to stderr by default
            configure_logging(quiet=self.quiet)
        if (self.scheduler is not None or self.workers is not None) and \
                not self.supports_cluster:
            logger.warning("%s runs in process: --workers / --dask-scheduler are ignored",
                           self.name)
        if self.device is not None and not self.supports_device:
            logger.warning("%s: --device is ignored (it applies to TensorflowModelServe)",
                           self.name)
        if self.resume and not self.supports_resume:
            raise InputError(f"--resume: {self.name} cannot resume; rerun it without --resume")
        with respelled(self.spelling):
            self.result = self.run()
        self.executed = True
        return self.result

    def run(self) -> Any:  # pragma: no cover - abstract
        """Run the application with the validated parameters."""
        raise NotImplementedError

    # ------------------------------------------------------------ command line

    @classmethod
    def help_text(cls, n_sources: int) -> str:
        """The ``-help`` text for ``n_sources`` sources."""
        lines = [f"{cls.name}: {cls.description}", "", "Parameters:"]
        keys = cls.all_keys(n_sources if cls.source_params else 0)
        width = max((len(k) for k in keys), default=10) + 2
        current = None
        for key, p in keys.items():
            group = key.split(".")[0] if key.startswith("source") else ""
            if group and group != current:
                lines.append(f"  [{group}]")
                current = group
            if not group and current is not None:
                lines.append("  [general]")
                current = None
            kind = p.kind if p.kind != "choice" else "|".join(p.choices)
            flags = " (mandatory)" if p.required else (
                f" (default {p.default})" if p.default not in (None, (), "") else "")
            lines.append(f"    -{key:<{width}} <{kind}> {p.help}{flags}")
        lines += ["", f"Sources: {n_sources} (set OTB_TF_NSOURCES, or give sourceK.* keys)"
                  if cls.source_params else "",
                  "Options: --quiet (no progress bars), --debug (full tracebacks)"
                  + (", --resume (continue an interrupted run)" if cls.supports_resume else "")
                  + (",\n  --workers N (local Dask cluster), --dask-scheduler ADDRESS"
                     if cls.supports_cluster else "")]
        return "\n".join(line for line in lines if line is not None)

    @classmethod
    def parse_argv(cls, argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """Parse OTB-style tokens ``-key value [value...]`` into values and pixel types."""
        values: dict[str, Any] = {}
        pixel_types: dict[str, str] = {}
        key: str | None = None
        tokens: list[str] = []

        def flush() -> None:
            if key is None:
                return
            if not tokens:
                values[key] = True  # bare boolean flag
                return
            values[key] = tokens[0] if len(tokens) == 1 else list(tokens)

        for token in argv:
            if token.startswith("-") and len(token) > 1 and not _is_number(token):
                flush()
                key = normalize_key(token)
                tokens = []
            elif key is None:
                raise InputError(f"unexpected value {token!r}: values must follow a -key")
            else:
                tokens.append(token)
        flush()
        n = max((int(m.group(1)) for k in values if (m := _SOURCE_KEY.match(k))), default=0)
        keys = cls.all_keys(max(n, sources_from_env()))
        for k, v in list(values.items()):
            p = keys.get(k)
            if p is not None and p.kind == "out" and isinstance(v, list):
                if len(v) != 2:
                    raise InputError(f"{k}: expected a path and an optional pixel type, got {v!r}")
                values[k], pixel_types[k] = v[0], v[1]
        return values, pixel_types


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def xy_pair(x: int | None, y: int | None) -> tuple[int, int] | None:
    """``(x, y)`` from an OTB ``…x`` / ``…y`` pair of keys: y defaults to x; None without x.

    Only a missing y takes x's value: ``-optim.tilesizey 0`` stays 0, and is refused.
    """
    return None if x is None else (x, x if y is None else y)


def efield_and_tile_size(app: App) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``output.efieldx/y`` and ``optim.tilesizex/y`` as pairs (None when not given).

    ``efieldy`` alone is an error (OTBTF derives nothing from it); ``tilesizey`` alone
    gives square tiles.
    """
    ex, ey = app.get("output.efieldx"), app.get("output.efieldy")
    if ex is None and ey is not None:
        raise InputError("output.efieldx: missing, but output.efieldy is given")
    tx, ty = app.get("optim.tilesizex"), app.get("optim.tilesizey")
    return xy_pair(ex, ey), xy_pair(ty if tx is None else tx, ty)


def model_sources(app: App) -> list[Source]:
    """``sourceK.il/rfieldx/rfieldy/nodata/placeholder`` as sources (fields None when not given).

    For the applications that feed a model (TensorflowModelServe, the deep-features
    applications), whose :data:`MODEL_SOURCE_NAMES` spell the receptive field
    ``sourceK.rfieldx``.
    """
    sources = []
    for k in range(1, app.n_sources + 1):
        il = app.source(k, "il")
        if not il:
            continue
        rx, ry = app.source(k, "rfieldx"), app.source(k, "rfieldy")
        if rx is None and ry is not None:
            raise InputError(f"source{k}.rfieldx: missing, but source{k}.rfieldy is given")
        sources.append(Source(il, patch_size=xy_pair(rx, ry),
                              nodata=app.source(k, "nodata"),
                              placeholder=app.source(k, "placeholder"), name=f"source{k}"))
    if not sources:
        raise InputError(f"source1.il: missing mandatory parameter of {app.name}")
    return sources
