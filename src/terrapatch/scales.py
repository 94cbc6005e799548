"""Serving and sampling scales: ``spcscale`` as an integer ``k`` or ``1/k``, checked and named.

:func:`check_spcscale` reads what users type (``2``, ``0.25``, ``"1/3"``, a
``Fraction``) and refuses the rest naming the nearest valid values;
:func:`check_factor` is the integer-only check of extraction's ``factor``;
:func:`format_scale` writes a scale back as users write it. The geometry these scales
drive is in :mod:`terrapatch.geometry`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from terrapatch.errors import InputError

__all__ = [
    "MAX_SCALE_DENOMINATOR",
    "check_factor",
    "check_spcscale",
    "format_scale",
    "scale_value",
]

#: Largest ``k`` of a super-resolution scale ``1/k`` (and largest serving unit, in output
#: pixels, that :func:`terrapatch.geometry.serving_steps` searches for).
MAX_SCALE_DENOMINATOR = 64
#: A typed scale within this of a whole number is that number (``2.0000001`` is 2).
WHOLE_TOLERANCE = 1e-6


def check_factor(value: Any, parameter: str = "factor") -> int:
    """Return a sampling-grid factor as an int; raise unless it is a positive integer."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < 1:
        raise InputError(
            f"{parameter}: {value!r} is not a positive integer "
            "(terrapatch keeps the sampling grid on source-1 grid lines)"
        )
    return int(number)


def _scale_number(value: Any) -> float:
    """``value`` as a float: a number, or a string such as ``"0.25"`` or ``"1/4"``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, Fraction):
        return float(value)
    if isinstance(value, str) and "/" in value:
        return float(Fraction(value.strip()))
    return float(value)


def _nearest_scales(number: float) -> str:
    """The valid scales (``k`` or ``1/k``) on either side of an invalid positive number."""
    if number >= 1:
        below, above = math.floor(number), math.ceil(number)
        return f"{below} or {above}"
    k = 1 / number  # between two integers k0 < k < k0 + 1
    k0 = min(math.floor(k), MAX_SCALE_DENOMINATOR)
    candidates = [Fraction(1, k0 + 1), Fraction(1, k0)] if k0 >= 1 else [Fraction(1, 2)]
    return " or ".join(format_scale(c) for c in candidates)


def check_spcscale(value: Any, parameter: str = "spcscale") -> Fraction:
    """Return a serving scale: an integer ``k ≥ 1`` or ``1/k`` (``2 ≤ k ≤ 64``), exactly.

    Floats such as 0.25 or 0.333333 are recognised as ``1/k`` within a relative
    1e-5 (six typed digits); ``"1/3"`` is accepted too.

    Raises
    ------
    InputError
        Naming ``parameter``, the value and the nearest valid scales otherwise.
    """
    try:
        number = _scale_number(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise InputError(f"{parameter}: {value!r} is not a number (give an integer k, "
                         "e.g. 2, or 1/k, e.g. 0.5 or 0.25)") from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{parameter}: {value!r} must be positive: an integer k (1, 2, …) "
                         "or 1/k for super-resolution (0.5, 0.25, …)")
    if number >= 1 - WHOLE_TOLERANCE:
        if abs(number - round(number)) <= WHOLE_TOLERANCE:
            return Fraction(round(number))
    else:
        k = 1 / number  # 1/k typed with six digits (0.333333) is within 1e-5 of it
        if abs(k - round(k)) <= 1e-5 * k and 2 <= round(k) <= MAX_SCALE_DENOMINATOR:
            return Fraction(1, round(k))
    raise InputError(
        f"{parameter}: {value!r} is neither an integer k nor 1/k (the output grid must nest "
        f"with source 1's); the nearest valid values are {_nearest_scales(number)}"
    )


def scale_value(scale: Fraction | int) -> int | Fraction:
    """A checked scale as an ``int`` when whole (extraction, coarse serving), else a Fraction."""
    fraction = Fraction(scale)
    return int(fraction) if fraction.denominator == 1 else fraction


def format_scale(scale: Fraction | int | float) -> str:
    """A scale as users write it: ``2``, ``0.25``, ``0.333333`` (for 1/3)."""
    fraction = Fraction(scale).limit_denominator(MAX_SCALE_DENOMINATOR)
    if fraction.denominator == 1:
        return str(fraction.numerator)
    return f"{float(fraction):.6g}"
