"""Option parsing shared by terrapatch's own commands: one-line usage errors.

The plain API names its parameters in Python (``size``, ``spcscale``); a command
shows its users the option they typed (``--size``) by running the API inside
:func:`terrapatch.spelling.respelled` with its table of options.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from terrapatch.errors import InputError

__all__ = ["CommandParser"]


class CommandParser(argparse.ArgumentParser):
    """Argument parser of terrapatch's own commands: usage errors are one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Raise the usage error (``argument --size: invalid int value``) as an InputError."""
        raise InputError(message)
