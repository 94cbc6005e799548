"""Rank selection: pick the pixels of each class whose rank, in raster order, was drawn.

The engine behind label-image and polygon sampling. A class raster is streamed as
strips (:data:`Strip`); a pixel is kept when its rank among the pixels of its class,
counted in raster order over the whole raster, is one of the ranks drawn for that
class beforehand (:func:`random_ranks`, or a stride). So the result does not depend
on the strip sizes, and memory stays bounded by one strip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

#: A strip of a class raster: first row, class values, validity, and optional keys
#: (polygon index), all ``(rows, cols)`` arrays over the scanned window's columns.
Strip = tuple[int, np.ndarray, np.ndarray, np.ndarray | None]


def rank_selection(
    strips: Callable[[], Iterator[Strip]],
    classes: np.ndarray,
    counts: np.ndarray,
    ranks: Sequence[np.ndarray],
    col0: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Pixels whose rank (raster order) within their class is in ``ranks[class]``.

    Parameters
    ----------
    strips
        Called once to stream the class raster, top to bottom.
    classes
        Sorted class values.
    counts
        Pixels of each class over the whole raster.
    ranks
        Per class, the ranks (0-based) to keep.
    col0
        Column of the strips' first column in the raster.

    Returns
    -------
    tuple of numpy.ndarray
        ``(cols, rows, classes, keys)`` of the kept pixels in raster order; ``keys`` is
        None when the strips carry none.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chosen = np.sort(np.concatenate([offsets[k] + np.asarray(r, np.int64)
                                     for k, r in enumerate(ranks)] or [np.empty(0, np.int64)]))
    empty = np.empty(0, dtype=np.int64)
    if len(chosen) == 0:
        return empty, empty, empty, None
    seen = np.zeros(len(classes), dtype=np.int64)
    out_c, out_r, out_k, out_key = [], [], [], []
    any_keys = False
    for row0, values, valid, keys in strips():
        flat = np.flatnonzero(valid)
        if len(flat) == 0:
            continue
        ci = np.searchsorted(classes, values.ravel()[flat])
        order = np.argsort(ci, kind="stable")
        sci = ci[order]
        first = np.searchsorted(sci, np.arange(len(classes)))
        global_rank = offsets[sci] + seen[sci] + (np.arange(len(sci)) - first[sci])
        pos = np.searchsorted(chosen, global_rank)
        hit = (pos < len(chosen)) & (chosen[np.minimum(pos, len(chosen) - 1)] == global_rank)
        picked = np.sort(flat[order[hit]])
        seen += np.bincount(ci, minlength=len(classes))
        w = values.shape[1]
        out_r.append(row0 + picked // w)
        out_c.append(col0 + picked % w)
        out_k.append(values.ravel()[picked])
        if keys is not None:
            any_keys = True
            out_key.append(keys.ravel()[picked])
    cols = np.concatenate(out_c) if out_c else empty
    rows = np.concatenate(out_r) if out_r else empty
    cls = np.concatenate(out_k).astype(np.int64) if out_k else empty
    key = (np.concatenate(out_key).astype(np.int64) if out_key else empty) if any_keys else None
    return cols, rows, cls, key


def random_ranks(counts: np.ndarray, targets: np.ndarray, rng: np.random.Generator
                 ) -> list[np.ndarray]:
    """Per class, ``targets[k]`` sorted ranks drawn without replacement among ``counts[k]``.

    Parameters
    ----------
    counts
        Pixels of each class.
    targets
        Points to draw per class (at most its count).
    rng
        The generator; classes are drawn in order, so a seed gives one result.

    Returns
    -------
    list of numpy.ndarray
        The ranks of each class, for :func:`rank_selection`.
    """
    return [np.sort(rng.choice(int(c), int(t), replace=False)) if t else np.empty(0, np.int64)
            for c, t in zip(counts, targets, strict=True)]
