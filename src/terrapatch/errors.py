"""Error hierarchy: every error terrapatch raises on purpose derives from TerrapatchError.

Each specific error also subclasses the matching builtin, so callers may catch
``ValueError`` or ``FileNotFoundError`` as usual, and the CLI can map every
``TerrapatchError`` to exit code 2 and one clean line.
"""

from __future__ import annotations


class TerrapatchError(Exception):
    """Base class of the errors terrapatch raises deliberately."""


class InputError(TerrapatchError, ValueError):
    """A parameter or an input file has an invalid value."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or directory does not exist."""


class GeometryError(TerrapatchError, ValueError):
    """Rasters, windows or grids are geometrically inconsistent."""


class CRSMismatchError(GeometryError):
    """Two inputs are in different coordinate reference systems."""


class NoSamplesError(TerrapatchError, ValueError):
    """No sample survived selection or extraction."""


class ModelError(TerrapatchError, ValueError):
    """A model cannot be loaded, or does not fit the requested geometry."""


class MissingExtraError(InputError, ImportError):
    """A feature needs an optional dependency set (an *extra*) that is not installed.

    The message says what to install, e.g. ``pip install 'terrapatch[tensorflow]'``.
    Also an :class:`ImportError`, so ``except ImportError`` keeps working.

    Attributes
    ----------
    extra
        The extra that provides the missing package (``"tensorflow"``, ``"report"``).
    name
        The module that could not be imported (:attr:`ImportError.name`).
    """

    def __init__(self, message: str, extra: str = "", package: str | None = None) -> None:
        super().__init__(message)
        self.extra = extra
        self.name = package


class MissingEngineError(MissingExtraError, ModelError):
    """A model needs a library of the ``tensorflow`` extra that is not installed.

    TensorFlow and Keras serve SavedModel and ``.keras`` files; tf2onnx exports
    them to ONNX (``pip install 'terrapatch[tensorflow]'``).
    """


class OutputError(TerrapatchError, OSError):
    """An output cannot be written."""


class ParameterError(InputError, KeyError):
    """An application parameter key is unknown or missing."""

    def __str__(self) -> str:
        # KeyError quotes its message; keep the message plain.
        return str(self.args[0]) if self.args else ""
