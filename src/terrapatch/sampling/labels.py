"""Label-image selection: pixel centres drawn per class from a label raster.

:func:`select_from_label_image` counts the labelled pixels of each class of a label
raster (by strips), sets per-class quotas (``constant``, ``total``, ``smallest``,
``all``) and picks the pixels at random or with OTBTF's stride through the
rank-selection engine (:mod:`._ranks`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.progress import logger
from terrapatch.raster import PathLike
from terrapatch.sampling._ranks import Strip, random_ranks, rank_selection
from terrapatch.sampling._rasters import class_counts, label_strips, open_raster
from terrapatch.sampling.samples import Samples

#: Label-image selection strategies.
LABEL_STRATEGIES = ("constant", "total", "smallest", "all")


def select_from_label_image(
    label_image: PathLike,
    *,
    strategy: str = "constant",
    count: int = 1000,
    total: int = 1000,
    nodata: float | None = None,
    pad: int = 0,
    method: str = "random",
    seed: int = 0,
    rebase: bool = False,
    quiet: bool = False,
) -> Samples:
    """Draw pixel centres per class from a label raster.

    Parameters
    ----------
    label_image
        Single-band raster of integer class values (band 1 is used).
    strategy
        ``constant``: ``count`` points per class; when a class has fewer pixels, every
        class gets the smallest class's count (OTBTF's cap, logged as a warning).
        ``total``: ``total`` points shared among classes in proportion to their pixel
        counts (error if larger than the labelled pixels). ``smallest``: as many points per
        class as the smallest class has pixels. ``all``: every labelled pixel.
    count, total
        Quotas of ``constant`` (points per class) and ``total`` (points in all).
    nodata
        Label value to ignore. Pixels equal to the file's own nodata, and NaN, are always
        ignored.
    pad
        Border, in pixels, excluded on every side.
    method
        ``random``: the points of a class are drawn uniformly without replacement with a
        NumPy generator seeded by ``seed``. ``strided``: OTBTF's pick, every
        ``step``-th pixel of a class in raster order (reference §6.3).
    seed
        Random seed (``random``).
    rebase
        OTBTF's ``class = value - smallest value`` (classes start at 0). Default: the
        label value itself.
    quiet
        No progress bar.

    Returns
    -------
    Samples
        Points at pixel centres, in raster order, with field ``class``.
    """
    if strategy not in LABEL_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is not one of {', '.join(LABEL_STRATEGIES)}")
    if method not in ("random", "strided"):
        raise InputError(f"method: {method!r} is not one of random, strided")
    if strategy == "constant" and count < 1:
        raise InputError(f"count: {count!r} must be ≥ 1")
    if strategy == "total" and total < 1:
        raise InputError(f"total: {total!r} must be ≥ 1")
    if pad < 0:
        raise InputError(f"pad: {pad!r} must be ≥ 0")
    info = open_raster(label_image, "label_image")
    grid = info.grid
    if 2 * pad >= grid.width or 2 * pad >= grid.height:
        raise InputError(f"pad: {pad} leaves no pixel in {info.path!r} "
                         f"({grid.width}×{grid.height})")
    if info.bands > 1:
        logger.warning("label selection: %s has %d bands; band 1 is used",
                       info.path, info.bands)

    def strips() -> Iterator[Strip]:
        return label_strips(info, pad, nodata, quiet)

    classes, counts = class_counts(strips())
    if len(classes) == 0:
        raise NoSamplesError(f"label_image: {info.path!r} has no labelled pixel "
                             f"(nodata={nodata}, file nodata={info.nodata}, pad={pad})")
    targets, steps = _label_quotas(strategy, counts, classes, count, total, method)
    if method == "random":
        ranks = random_ranks(counts, targets, np.random.default_rng(seed))
    else:
        ranks = [s * np.arange(1, t + 1, dtype=np.int64) - 1 for s, t in
                 zip(steps, targets, strict=True)]
    cols, rows, cls, _ = rank_selection(strips, classes, counts, ranks, pad)
    x, y = grid.xy_of(cols, rows)
    if rebase:
        cls = cls - int(classes[0])
        missing = np.setdiff1d(np.arange(classes[0], classes[-1] + 1), classes)
        if len(missing):
            logger.warning("label selection: classes %s have no pixel; re-based "
                           "codes are not contiguous", missing.tolist())
    logger.info("label selection: %d points (%s) from %d labelled pixels, strategy "
                "%s, %s pick", len(x), ", ".join(f"class {c}: {t}" for c, t in
                                                 zip(classes.tolist(), targets.tolist(),
                                                     strict=True)),
                int(counts.sum()), strategy, method)
    return Samples(x, y, {"class": cls}, grid.crs)


def _label_quotas(strategy: str, counts: np.ndarray, classes: np.ndarray, count: int,
                  total: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-class targets and strides (the strides serve OTBTF's ``strided`` pick)."""
    smallest = int(counts.min())
    if strategy == "constant":
        target = count
        if count > smallest:
            small = int(classes[int(np.argmin(counts))])
            logger.warning("label selection: count=%d exceeds the smallest class "
                           "(class %d: %d pixels); taking %d points per class",
                           count, small, smallest, smallest)
            target = smallest
        return np.full(len(counts), target, dtype=np.int64), counts // target
    if strategy == "total":
        n = int(counts.sum())
        if total > n:
            raise InputError(f"total: {total} points requested but only {n} "
                             "labelled pixels are available")
        step = max(1, n // total)
        steps = np.full(len(counts), step, dtype=np.int64)
        if method == "strided":  # OTBTF: every step-th pixel of each class
            return counts // step, steps
        exact = counts * (total / n)
        targets = np.minimum(np.floor(exact).astype(np.int64), counts)
        left = total - int(targets.sum())
        if left:  # largest remainders first (ties: class order)
            order = np.argsort(-(exact - targets), kind="stable")
            order = order[targets[order] < counts[order]]
            targets[order[:left]] += 1
        return targets, steps
    if strategy == "smallest":
        return np.full(len(counts), smallest, dtype=np.int64), counts // smallest
    return counts.copy(), np.ones(len(counts), dtype=np.int64)

