"""Checks of user parameters shared by every layer: one value or an ``(x, y)`` pair of sizes.

Errors name the parameter given by the caller (a neutral name in the core, the OTBTF
spelling when the facade passes one) and the value, in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from terrapatch.errors import InputError

__all__ = ["optional_pair", "size_pair"]


def size_pair(value: Any, parameter: str | tuple[str, str], minimum: int | None = 1
              ) -> tuple[int, int]:
    """``(x, y)`` integers from one integer or a pair, each at least ``minimum``.

    Parameters
    ----------
    value
        An integer (used for both axes) or a sequence of two integers.
    parameter
        Neutral identifier in errors (``tile_size``). When a pair is given, an axis out
        of range is named ``tile_size[0]`` or ``tile_size[1]``; a pair of names names
        the axes explicitly.
    minimum
        Smallest value allowed (None: any integer).

    Raises
    ------
    InputError
        One line naming the parameter and the value.
    """
    keys = (parameter, parameter) if isinstance(parameter, str) else parameter
    if isinstance(parameter, str) and not isinstance(value, int | np.integer):
        keys = (f"{parameter}[0]", f"{parameter}[1]")
    if isinstance(value, bool):
        raise InputError(f"{_name(parameter)}: {value!r} is not an integer or an (x, y) pair")
    if isinstance(value, int | np.integer):
        pair = (int(value), int(value))
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise InputError(f"{_name(parameter)}: {value!r} is not an integer or an (x, y) "
                             "pair") from None
        if len(items) != 2:
            raise InputError(f"{_name(parameter)}: expected one integer or (x, y), got {value!r}")
        try:
            pair = (_integer(items[0]), _integer(items[1]))
        except (TypeError, ValueError):
            raise InputError(f"{_name(parameter)}: {value!r} is not an integer or an (x, y) "
                             "pair") from None
    if minimum is not None:
        for key, size in zip(keys, pair, strict=True):
            if size < minimum:
                raise InputError(f"{key}: {size} must be ≥ {minimum} (got {pair[0]}×{pair[1]})")
    return pair


def optional_pair(value: Any, parameter: str | tuple[str, str], minimum: int | None = 1
                  ) -> tuple[int, int] | None:
    """:func:`size_pair`, or None when ``value`` is None (the default applies)."""
    return None if value is None else size_pair(value, parameter, minimum)


def _name(parameter: str | tuple[str, str]) -> str:
    """How an error about the whole pair names it."""
    return parameter if isinstance(parameter, str) else parameter[0]


def _integer(value: Any) -> int:
    """An integer from an int or an integral float; raise ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)

