"""Pixel types: OTB names → numpy dtypes, and OTB's conversion of values to a pixel type."""

from __future__ import annotations

import numpy as np

from terrapatch.errors import InputError

#: OTB pixel type names (and numpy spellings) → numpy dtypes.
PIXEL_TYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("uint8"),
    "int8": np.dtype("int8"),
    "int16": np.dtype("int16"),
    "uint16": np.dtype("uint16"),
    "int32": np.dtype("int32"),
    "uint32": np.dtype("uint32"),
    "float": np.dtype("float32"),
    "float32": np.dtype("float32"),
    "double": np.dtype("float64"),
    "float64": np.dtype("float64"),
}


def pixel_dtype(pixel_type: str | np.dtype | type | None, default: str = "float32",
                parameter: str = "pixel_type") -> np.dtype:
    """Return the numpy dtype for an OTB pixel type name such as ``"uint8"`` or ``"float"``.

    Parameters
    ----------
    pixel_type
        A name from :data:`PIXEL_TYPES`, a numpy dtype, or None for ``default``.
    default
        Pixel type used when ``pixel_type`` is None.
    parameter
        Parameter name quoted in the error message.
    """
    if pixel_type is None:
        pixel_type = default
    if isinstance(pixel_type, str):
        key = pixel_type.strip().lower()
        if key not in PIXEL_TYPES:
            raise InputError(
                f"{parameter}: unknown pixel type {pixel_type!r}; "
                f"choose one of {', '.join(sorted(PIXEL_TYPES))}"
            )
        return PIXEL_TYPES[key]
    dtype = np.dtype(pixel_type)
    if dtype not in PIXEL_TYPES.values():
        raise InputError(f"{parameter}: unsupported pixel type {dtype.name!r}")
    return dtype


def convert_pixels(values: np.ndarray, dtype: np.dtype, rounding: bool = False) -> np.ndarray:
    """Convert values to ``dtype`` the way OTB does: clamp to the type's range, then truncate.

    Float → integer conversion truncates toward zero (0.9 → 0 for uint8) unless
    ``rounding`` is True, in which case values are rounded half away from zero
    first. NaN becomes 0 in integer types. Float → float is a plain cast.
    """
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    if values.dtype.kind in "iu":
        src = np.iinfo(values.dtype)
        if src.min >= info.min and src.max <= info.max:
            return values.astype(dtype)
        return np.asarray(np.clip(values, info.min, info.max).astype(dtype))
    work = values.astype(np.float64, copy=True)
    if rounding:
        work = np.sign(work) * np.floor(np.abs(work) + 0.5)
    np.nan_to_num(work, copy=False, nan=0.0)
    np.clip(work, info.min, info.max, out=work)
    return np.trunc(work).astype(dtype)



def count_unfit(values: np.ndarray, dtype: np.dtype, rounding: bool = False) -> int:
    """How many of ``values`` :func:`convert_pixels` clamps into ``dtype`` (NaN included).

    A float value is clamped when its truncated (or, with ``rounding``, rounded) value
    lies outside the integer type's range: 255.9 fits uint8, 256.0 does not. Float
    types clamp nothing.
    """
    dtype = np.dtype(dtype)
    if values.dtype == dtype or dtype.kind == "f" or values.size == 0:
        return 0
    info = np.iinfo(dtype)
    if values.dtype.kind in "iub":
        src = np.iinfo(values.dtype) if values.dtype.kind != "b" else np.iinfo(np.uint8)
        if src.min >= info.min and src.max <= info.max:
            return 0
        return int(np.count_nonzero((values < info.min) | (values > info.max)))
    margin = 0.5 if rounding else 1.0
    inside = (values > info.min - margin) & (values < info.max + margin)
    return int(values.size - np.count_nonzero(inside))
