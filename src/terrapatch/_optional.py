"""Optional dependencies: import them on first use, quietly, or fail in one line naming the extra.

terrapatch's core (extraction, selection, ONNX serving, Dask, STAC) never imports
TensorFlow or Keras; the ``tensorflow`` extra brings them for training, SavedModel
and ``.keras`` serving and export, the ``report`` extra brings matplotlib. Every
lazy import of these goes through this module:

- :func:`require` imports a module or raises :class:`~terrapatch.errors.MissingExtraError`
  (one line: what needed it, why the import failed, ``pip install 'terrapatch[EXTRA]'``);
- :func:`import_tensorflow` and :func:`import_keras` do the same inside
  :func:`tensorflow_startup`, which keeps TensorFlow's C++ start-up log off the
  terminal.

Why a context and not only ``TF_CPP_MIN_LOG_LEVEL``: since TensorFlow 2.19 its
native libraries log through Abseil, which writes everything logged before
``absl::InitializeLog()`` (oneDNN notice, CUDA probing, ``cuInit`` failures on
machines without a GPU) to stderr whatever the level. :func:`tensorflow_startup`
sets ``TF_CPP_MIN_LOG_LEVEL`` to ``"2"`` unless the user set it, and while
TensorFlow loads and probes its devices it captures file descriptor 2 and drops
the log lines below that level (at level 2 and above, the start-up ``E`` lines too:
they are device probing, real failures raise Python exceptions). Every other line
is written back to stderr; dropped lines go to the ``terrapatch`` logger at DEBUG
level. ``TF_CPP_MIN_LOG_LEVEL=0`` turns the filter off.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

from terrapatch.errors import MissingExtraError

__all__ = [
    "EXTRAS",
    "available",
    "import_keras",
    "import_tensorflow",
    "missing_extra_message",
    "require",
    "set_tensorflow_log_level",
    "tensorflow_startup",
]

#: Top-level module → (extra that installs it, name in messages).
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorflow": ("tensorflow", "TensorFlow"),
    "keras": ("tensorflow", "Keras"),
    "tf2onnx": ("tensorflow", "tf2onnx"),
    "onnx": ("tensorflow", "onnx"),
    "matplotlib": ("report", "matplotlib"),
    "sklearn": ("classical", "scikit-learn"),
    "skops": ("classical", "skops"),
    "torch": ("torch", "PyTorch"),
    "jax": ("jax", "JAX"),
}

_log = logging.getLogger("terrapatch")

# Abseil (TF ≥ 2.19): "I0000 00:00:1796166960.862298    4401 port.cc:153] ..."
# older TF:          "2024-05-01 10:00:00.123456: I tensorflow/core/...cc:182] ..."
_LOG_LINE = re.compile(
    r"^(?:(?P<a>[IWEF])\d{4} [\d:.]+\s+\d+ |\d{4}-\d\d-\d\d [\d:.]+: (?P<b>[IWEF]) )\S+:\d+\] "
)
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called"
_CONTINUATION = ("To enable the following instructions:",)

_lock = threading.RLock()
_capturing = False
_devices_probed = False


def set_tensorflow_log_level() -> None:
    """Set ``TF_CPP_MIN_LOG_LEVEL`` to ``"2"`` (warnings and info hidden) unless already set."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _filter(text: str, level: int) -> str:
    """Drop TensorFlow's native log lines below ``level`` from ``text``; return the rest."""
    dropped_severities = {"I", "W", "E"} if level >= 2 else {"I"} if level == 1 else set()
    kept: list[str] = []
    previous_dropped = False
    for line in text.splitlines(keepends=True):
        match = _LOG_LINE.match(line)
        severity = (match.group("a") or match.group("b")) if match else None
        drop = (
            (severity is not None and severity in dropped_severities)
            or (level >= 1 and line.startswith(_ABSL_BANNER))
            or (previous_dropped and line.startswith(_CONTINUATION))
        )
        if drop:
            _log.debug("tensorflow: %s", line.rstrip())
        else:
            kept.append(line)
        previous_dropped = drop
    return "".join(kept)


@contextlib.contextmanager
def _captured_stderr(level: int) -> Iterator[None]:
    """Route file descriptor 2 to a temporary file; write back what :func:`_filter` keeps."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = _filter(tmp.read().decode("utf-8", errors="replace"), level)
            if rest:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.stderr.write(rest)
                    sys.stderr.flush()


@contextlib.contextmanager
def tensorflow_startup() -> Iterator[None]:
    """Context for code that may import TensorFlow (or Keras) for the first time.

    Sets ``TF_CPP_MIN_LOG_LEVEL`` (:func:`set_tensorflow_log_level`); if TensorFlow
    is not loaded and probed yet, filters its native start-up log out of stderr
    while the block runs, and probes its devices (``tf.config.list_physical_devices``,
    which does not fix the device configuration) before leaving, so that the CUDA
    probing lines are filtered too. Re-entrant and thread-safe; costs nothing once
    TensorFlow has started.

    Examples
    --------
    >>> from terrapatch._optional import tensorflow_startup
    >>> with tensorflow_startup():
    ...     import keras  # doctest: +SKIP
    """
    global _capturing, _devices_probed
    set_tensorflow_log_level()
    level = _log_level()
    if _devices_probed or level < 1:
        yield
        return
    with _lock:
        if _capturing:  # nested: the outer block filters
            yield
            return
        _capturing = True
        try:
            with _captured_stderr(level):
                yield
                tf = sys.modules.get("tensorflow")
                if tf is not None and not _devices_probed:
                    _devices_probed = True
                    with contextlib.suppress(Exception):
                        tf.config.list_physical_devices()
        finally:
            _capturing = False


def available(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def missing_extra_message(modules: tuple[str, ...], what: str, reason: str,
                          hint: str = "") -> tuple[str, str]:
    """One-line message for ``what`` needing ``modules``; returns ``(message, extra)``."""
    extras = sorted({EXTRAS.get(m, ("all", m))[0] for m in modules})
    extra = extras[0] if len(extras) == 1 else "all"
    names = [EXTRAS.get(m, ("all", m))[1] for m in modules]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    them = "it" if len(names) == 1 else "them"
    message = (f"{what} needs {listed}, which cannot be imported here ({reason}); "
               f"install {them} with pip install 'terrapatch[{extra}]'")
    return message + (f" ({hint})" if hint else ""), extra


def require(module: str, what: str, *, also: tuple[str, ...] = (), hint: str = "",
            error: type[MissingExtraError] = MissingExtraError) -> ModuleType:
    """Import ``module`` or raise ``error`` saying which extra to install.

    Parameters
    ----------
    module
        Module to import (its top-level package must be in :data:`EXTRAS`).
    what
        What needs it, starting the message, e.g. ``"model: serving the Keras
        model 'm.keras'"``.
    also
        Other modules of the same need, named in the message (e.g. ``("keras",)``).
    hint
        Extra advice appended in parentheses.
    error
        Exception class raised (a :class:`~terrapatch.errors.MissingExtraError`).

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    MissingExtraError
        If the import fails; the message is one line.
    """
    top = module.split(".", 1)[0]
    try:
        if top in ("tensorflow", "keras", "tf2onnx"):
            with tensorflow_startup():
                return importlib.import_module(module)
        return importlib.import_module(module)
    except ImportError as exc:
        order = list(EXTRAS)
        names = tuple(sorted(dict.fromkeys((top, *also)),
                             key=lambda m: order.index(m) if m in order else len(order)))
        message, extra = missing_extra_message(names, what, _reason(exc), hint)
        raise error(message, extra=extra, package=exc.name or top) from None


def import_tensorflow(what: str, *, hint: str = "",
                      error: type[MissingExtraError] = MissingExtraError) -> ModuleType:
    """``import tensorflow`` quietly (:func:`tensorflow_startup`), or fail naming the extra."""
    return require("tensorflow", what, hint=hint, error=error)


def import_keras(what: str, *, hint: str = "",
                 error: type[MissingExtraError] = MissingExtraError) -> ModuleType:
    """``import keras`` quietly (its TensorFlow backend included), or fail naming the extra."""
    return require("keras", what, also=("tensorflow",), hint=hint, error=error)
