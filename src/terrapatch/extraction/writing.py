"""Writing one extraction's patches images and labels image from its patch buffers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from terrapatch.extraction.spool import array_chunks, buffer_chunks
from terrapatch.patches import write_patches_image

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Writing:
    """How the patches images and the labels image of an extraction are written."""

    sizes: tuple[tuple[int, int], ...]
    bands: tuple[int, ...]
    spacings: tuple[tuple[float, float], ...]
    dtypes: tuple[np.dtype, ...]
    options: tuple[dict[str, str], ...]
    keys: tuple[str, ...]
    labels_dtype: np.dtype
    labels_options: dict[str, str]


def write_outputs(
    writing: Writing,
    buffers: Sequence[np.ndarray | None],
    positions: np.ndarray,
    labels: np.ndarray,
    outputs: Sequence[PathLike | None],
    labels_out: PathLike | None,
) -> None:
    """Write the candidates at ``positions`` to the patches images and the labels image."""
    n = len(positions)
    for i, (buf, out) in enumerate(zip(buffers, outputs, strict=True)):
        if out is None or buf is None:
            continue
        rx, ry = writing.sizes[i]
        write_patches_image(
            out, buffer_chunks(buf, positions), n_patches=n, patch_size_x=rx, patch_size_y=ry,
            bands=writing.bands[i], dtype=writing.dtypes[i], spacing=writing.spacings[i],
            creation_options=writing.options[i], parameter=writing.keys[i], planar=True,
        )
    if labels_out is not None:
        write_patches_image(
            labels_out, array_chunks(labels), n_patches=n, patch_size_x=1, patch_size_y=1,
            bands=1, dtype=writing.labels_dtype, creation_options=writing.labels_options,
            parameter="labels_out", planar=True,
        )
