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


class OutputError(TerrapatchError, OSError):
    """An output cannot be written."""


class ParameterError(InputError, KeyError):
    """An application parameter key is unknown or missing."""

    def __str__(self) -> str:
        # KeyError quotes its message; keep the message plain.
        return str(self.args[0]) if self.args else ""
