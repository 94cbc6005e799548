"""Option parsing shared by terrapatch's own commands: one-line usage errors, option names.

The plain API names its parameters in Python (``size``, ``spcscale``); a command
shows its users the option they typed (``--size``): :func:`option_errors` renames the
parameter at the head of an error raised inside it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from typing import NoReturn

from terrapatch.errors import InputError, TerrapatchError

__all__ = ["CommandParser", "option_errors"]


class CommandParser(argparse.ArgumentParser):
    """Argument parser of terrapatch's own commands: usage errors are one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Raise the usage error (``argument --size: invalid int value``) as an InputError."""
        raise InputError(message)


@contextlib.contextmanager
def option_errors(names: Mapping[str, str]) -> Iterator[None]:
    """Rename ``parameter:`` at the head of errors raised inside to the command's option."""
    try:
        yield
    except TerrapatchError as exc:
        text = str(exc)
        head, sep, rest = text.partition(": ")
        if sep and head in names:
            raise type(exc)(f"{names[head]}: {rest}") from None
        raise
