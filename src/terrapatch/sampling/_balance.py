"""The ``balanced`` strategy of grid selection: a subset of candidates with even class shares.

:func:`class_index` turns label values into class indices for the per-candidate
class histograms; :func:`balanced_subset` picks the candidates (a random spatial
share, then greedy by rarity while the summed histogram gets closer to uniform).
"""

from __future__ import annotations

import math

import numpy as np

from terrapatch.errors import InputError, NoSamplesError
from terrapatch.progress import logger


def class_index(labels: np.ndarray, valid: np.ndarray, classes: np.ndarray,
                parameter: str) -> np.ndarray:
    """Index of each label in ``classes`` (-1 where not valid); unknown labels are an error.

    ``classes`` is ``0 .. nclasses - 1`` when labels can be unknown: the error names
    ``parameter`` (the label raster's) and ``nclasses``.
    """
    pos = np.searchsorted(classes, labels)
    pos_c = np.clip(pos, 0, len(classes) - 1)
    known = classes[pos_c] == labels
    if (valid & ~known).any():
        value = labels[valid & ~known][0]
        raise InputError(f"{parameter}: label value {value} is not one of the classes "
                         f"{classes.min()}..{classes.max()} (nclasses={len(classes)})")
    return np.where(valid, pos_c, -1)


def balanced_subset(hist: np.ndarray, spatial_proportion: float, seed: int) -> np.ndarray:
    """Choose candidates so that the summed class histogram is as even as possible.

    1. A share ``spatial_proportion`` of the candidates is drawn uniformly at random
       (spatial coverage).
    2. The others are visited by decreasing rarity score ``sum_k h_k / T_k`` (``T_k``: pixels
       of class k over all candidates; ties in random order) and a candidate is kept when
       it increases the cosine similarity between the summed histogram and the uniform one.

    Classes absent from every candidate are left out of the target.
    """
    rng = np.random.default_rng(seed)
    n = hist.shape[0]
    h = hist.astype(np.float64)
    totals = h.sum(axis=0)
    present = totals > 0
    if not present.any():
        raise NoSamplesError("label_image: no candidate window holds a labelled pixel")
    if (~present).any():
        logger.warning("balanced grid selection: %d class(es) absent from every candidate "
                       "window are left out of the balance", int((~present).sum()))
    h = h[:, present]
    totals = totals[present]
    keep = np.zeros(n, dtype=bool)
    n_seed = min(n, round(spatial_proportion * n))
    if n_seed:
        keep[rng.choice(n, n_seed, replace=False)] = True
    cum = h[keep].sum(axis=0)
    rest = np.flatnonzero(~keep)
    score = (h[rest] / totals).sum(axis=1)
    order = rest[np.lexsort((rng.random(len(rest)), -score))]
    k = h.shape[1]

    def cosine(v: np.ndarray) -> float:
        norm = float(np.sqrt((v * v).sum()))
        return -1.0 if norm == 0 else float(v.sum()) / (norm * math.sqrt(k))

    best = cosine(cum)
    for i in order:
        candidate = cum + h[i]
        c = cosine(candidate)
        if c > best + 1e-12:
            keep[i] = True
            cum, best = candidate, c
    logger.info("balanced grid selection: %d of %d candidates kept (%d spatial), class "
                "shares %s", int(keep.sum()), n, n_seed,
                np.round(cum / max(cum.sum(), 1), 3).tolist())
    return keep
