"""Pixels on the way in and out of the model: input normalisation, output argmax.

Field models expect their inputs scaled (``/255``, per-band mean and standard
deviation) and emit class scores that users want as a class map. Instead of a
hand-wrapped graph, serving takes a :class:`Normalization` per source, applied to
every tile after reading (nodata is detected on the raw values first), and an
:class:`Argmax` applied to each output before writing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from terrapatch.errors import InputError

__all__ = ["Argmax", "Normalization", "check_normalizations"]

Values = float | Sequence[float]


def _vector(value: Values, bands: int, parameter: str) -> np.ndarray:
    """One value per band from a scalar or a per-band sequence, or raise naming ``parameter``."""
    array = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if array.ndim != 1 or array.size not in (1, bands):
        raise InputError(f"{parameter}: {value!r} must be one value or one per band ({bands})")
    if not np.isfinite(array).all():
        raise InputError(f"{parameter}: {value!r} must be finite")
    return np.broadcast_to(array, (bands,)).copy()


@dataclass(frozen=True)
class Normalization:
    """Scale the values of one source before the model: ``((x · scale + offset) - mean) / std``.

    Each field is one value, or one per band of the source. For example
    ``Normalization(scale=1 / 255)`` for 8-bit images, or
    ``Normalization(mean=[..], std=[..])`` for a model trained on standardised bands.
    """

    scale: Values = 1.0
    offset: Values = 0.0
    mean: Values = 0.0
    std: Values = 1.0

    def coefficients(self, bands: int, name: str = "source1") -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` per band such that the model gets ``x · a + b``.

        Raises
        ------
        InputError
            If a field has the wrong length, is not finite, or ``std`` is 0; the
            message names ``<name>.scale`` (``.offset``, ``.mean``, ``.std``).
        """
        scale = _vector(self.scale, bands, f"{name}.scale")
        offset = _vector(self.offset, bands, f"{name}.offset")
        mean = _vector(self.mean, bands, f"{name}.mean")
        std = _vector(self.std, bands, f"{name}.std")
        if (std == 0).any():
            raise InputError(f"{name}.std: {self.std!r} must not be 0")
        return scale / std, (offset - mean) / std

    @property
    def identity(self) -> bool:
        """Whether this normalisation leaves every value unchanged."""
        return self == Normalization()


def check_normalizations(normalizations: Sequence[Normalization | None] | None,
                         names: Sequence[str], bands: Sequence[int],
                         dtypes: Sequence[np.dtype]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Coefficients per source (None where nothing changes), checked against the model.

    Raises
    ------
    InputError
        If there are more normalisations than sources, a field is invalid, or a
        source is normalised into an integer model input.
    """
    items = list(normalizations or [])
    if len(items) > len(names):
        raise InputError(f"normalization: {len(items)} given for {len(names)} source(s)")
    items += [None] * (len(names) - len(items))
    result: list[tuple[np.ndarray, np.ndarray] | None] = []
    for item, name, count, dtype in zip(items, names, bands, dtypes, strict=True):
        if item is None or item.identity:
            result.append(None)
            continue
        if not isinstance(item, Normalization):
            raise InputError(f"{name}.scale: expected a Normalization, got {type(item).__name__}")
        coefficients = item.coefficients(count, name)
        if not np.issubdtype(dtype, np.floating):
            raise InputError(f"{name}.scale: the model input takes {np.dtype(dtype).name} "
                             "values; normalising needs a floating-point input")
        result.append(coefficients)
    return result


def normalize(values: np.ndarray, coefficients: tuple[np.ndarray, np.ndarray], axis: int,
              dtype: np.dtype) -> np.ndarray:
    """``values · a + b`` along the band ``axis``, as ``dtype``.

    Computed in float64 and rounded once to ``dtype``, so that ``x · (1/255)`` gives
    the float32 of ``x / 255``, as a model's own preprocessing in NumPy does.
    """
    a, b = coefficients
    shape = [1] * values.ndim
    shape[axis] = a.size
    out = values.astype(np.float64, copy=True)
    out *= a.reshape(shape)
    out += b.reshape(shape)
    return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class Argmax:
    """Class index of the highest score of each output, optionally thresholded.

    Attributes
    ----------
    threshold
        Pixels whose highest score is below it get ``below`` (None: no threshold).
        Must lie in [0, 1] (scores are probabilities, e.g. after a softmax).
    below
        Value written where the highest score is below ``threshold``.
    """

    threshold: float | None = None
    below: float = 255

    def __post_init__(self) -> None:
        t = self.threshold
        if t is not None and not (np.isfinite(t) and 0.0 <= float(t) <= 1.0):
            raise InputError(f"threshold: {t!r} must lie in [0, 1]")
        if not np.isfinite(self.below):
            raise InputError(f"below_threshold: {self.below!r} must be finite")

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """``(rows, cols, 1)`` classes of ``(rows, cols, channels)`` scores."""
        classes = np.argmax(scores, axis=-1)[..., None]
        if self.threshold is None:
            return np.asarray(classes.astype(np.int32))
        best = np.max(scores, axis=-1, keepdims=True)
        out = classes.astype(np.float64 if float(self.below) % 1 else np.int64)
        out[best < self.threshold] = self.below
        return np.asarray(out)
