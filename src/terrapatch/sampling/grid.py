"""Grid selection: patches on a regular grid of a raster, split into train / valid / test.

:func:`select_patches` lays the candidate patches of :func:`candidate_starts` on a
reference raster, keeps those that are windows of cells of the extraction's
sampling grid G (:class:`terrapatch.geometry.Layout`), drops those with nodata /
masked pixels or an unlabelled reference pixel (one scan by strips of rows), and
assigns train / valid / test groups: ``chessboard``, ``split``
(:func:`split_sequence`), ``all`` or ``balanced`` (:mod:`._balance`). Each point is
the centre of its G cell, so the patch extracted at a point is the patch validated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from terrapatch._params import size_pair
from terrapatch.errors import InputError, NoSamplesError
from terrapatch.geometry import Layout
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import PathLike
from terrapatch.sampling._balance import balanced_subset, class_index
from terrapatch.sampling._rasters import (
    Raster,
    RasterReader,
    check_same_grid,
    class_counts,
    label_strips,
    open_raster,
    pixel_valid,
    read_labels,
    strip_plan,
    strip_window,
)
from terrapatch.sampling.samples import PatchSelection, Samples
from terrapatch.scales import check_factor

#: Grid selection strategies.
PATCH_STRATEGIES = ("chessboard", "split", "all", "balanced")


def candidate_starts(size: int, psize: int, step: int, offset: int = 0) -> np.ndarray:
    """First pixels of the candidate patches along one axis of a ``size``-pixel raster.

    Patch starts ``s`` with ``0 ≤ s ≤ size - psize`` and ``s ≡ offset + 1 (mod step)``.
    This is OTBTF's grid (its centres ``c = s + psize // 2`` satisfy
    ``(c - psize//2 - 1) mod step == offset mod step``: with offset 0 the first patch
    starts at pixel 1), made consistent at ``offset ≡ step - 1`` where OTBTF admits the
    patch starting at pixel 0 only when ``nodata`` is set; terrapatch always admits it.
    """
    for name, value in (("psize", psize), ("step", step)):
        if value < 1:
            raise InputError(f"{name}: {value} must be ≥ 1")
    first = (offset + 1) % step
    return np.arange(first, size - psize + 1, step, dtype=np.int64)


def _on_sampling_grid(layout: Layout, starts: np.ndarray,
                      dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the candidate starts that are windows of cells of G; return (cells, starts)."""
    if len(starts) == 0:
        return starts, starts
    f = layout.factor
    lo = (int(starts[0]) - layout.fields[0][dim]) // f - 2
    hi = (int(starts[-1]) + layout.fields[0][dim]) // f + 2
    cells = np.arange(lo, hi + 1, dtype=np.int64)
    windows = layout.window_starts(cells, dim, 0)
    index = np.clip(np.searchsorted(windows, starts), 0, len(windows) - 1)
    hit = windows[index] == starts
    if not hit.any():
        phase = int(windows[len(windows) // 2]) % f
        raise InputError(
            f"offset[{dim}]: with factor={f} patches must start on the sampling grid "
            f"(start ≡ {phase} mod {f}), but every candidate start is ≡ {int(starts[0]) % f}; "
            "change the offset or the step"
        )
    return cells[index[hit]], starts[hit]


def patch_reference_pixels(starts: np.ndarray, psize: int) -> np.ndarray:
    """Reference pixel of patches starting at ``starts``: ``start + psize // 2``.

    Extraction cuts ``[ref - psize // 2, ref - psize // 2 + psize)`` around the pixel that
    contains a point, so a point at this pixel's centre gives back exactly the patch.
    """
    return np.asarray(starts, dtype=np.int64) + psize // 2


def split_sequence(n: int, proportions: Sequence[float]) -> np.ndarray:
    """OTBTF's deterministic interleaved group sequence for ``split`` (reference §6.1).

    ``inc_g = sum(props) / prop_g``; each slot takes the group with the smallest running
    count (the first on ties) and adds its increment; groups with proportion 0 are never
    picked. Counts are float32 as in OTBTF. E.g. 50/25/25 gives ``0,1,2,0,0,1,2,0,…`` and
    0.8/0.1/0.1 gives ``0,1,2,0,0,0,0,0,0,0,0,1,2,0,…``.
    """
    props = np.asarray(proportions, dtype=np.float32)
    if (props < 0).any() or not np.isfinite(props).all() or props.sum() <= 0:
        raise InputError(f"proportions: {list(map(float, proportions))} must be ≥ 0 and not "
                         "all 0")
    total = np.float32(props.sum())
    counts = [np.float32(0.0) if p > 0 else np.float32(np.inf) for p in props]
    incs = [np.float32(total / p) if p > 0 else np.float32(0.0) for p in props]
    out = np.empty(n, dtype=np.int8)
    for i in range(n):
        g = 0
        for k in range(1, len(counts)):
            if counts[k] < counts[g]:
                g = k
        out[i] = g
        counts[g] = np.float32(counts[g] + incs[g])
    return out


def _normalise_proportions(proportions: Sequence[float]) -> tuple[float, ...]:
    """Train, valid and test shares summing to 1 (missing ones 0); bad shares are an error."""
    props = tuple(float(p) for p in proportions)
    if len(props) not in (1, 2, 3):
        raise InputError(f"proportions: expected 1 to 3 values, got {props!r}")
    for index, p in enumerate(props):
        if not math.isfinite(p) or p < 0:
            raise InputError(f"proportions[{index}]: {p!r} must be a finite number ≥ 0")
    total = sum(props)
    if total <= 0:
        raise InputError(f"proportions: {list(props)} sum to 0; give e.g. (50, 25, 25) or "
                         "(0.8, 0.1, 0.1)")
    return tuple(p / total for p in props) + (0.0,) * (3 - len(props))


def select_patches(
    image: PathLike,
    psize: int | Sequence[int],
    step: int | Sequence[int],
    *,
    offset: int | Sequence[int] = 0,
    nodata: float | None = None,
    mask: PathLike | None = None,
    strategy: str = "chessboard",
    proportions: Sequence[float] = (50.0, 25.0, 25.0),
    shuffle: bool = False,
    seed: int = 0,
    label_image: PathLike | None = None,
    nclasses: int | None = None,
    spatial_proportion: float = 0.25,
    factor: int = 1,
    quiet: bool = False,
) -> PatchSelection:
    """Select patches on a regular grid of a reference raster.

    Parameters
    ----------
    image
        Reference raster: defines the grid and, with ``nodata``, valid pixels.
    psize
        Patch size in pixels (int or ``(x, y)``).
    step
        Grid step between candidate patches in pixels (int or ``(x, y)``).
    offset
        Grid offset (int or ``(x, y)``), taken modulo the step: patch starts are
        ``s ≡ offset + 1 (mod step)`` as in OTBTF (:func:`candidate_starts`).
    nodata
        A pixel whose bands all equal this value is invalid; a patch is kept only if every
        pixel of its ``psize`` window is valid. None: every pixel of ``image`` is valid
        (the file's own nodata is *not* used, as in OTBTF).
    mask
        Raster on the grid of ``image``; a pixel is valid where the mask is non-zero
        (OTBTF requires exactly 1). Every pixel of the window must be valid.
    strategy
        ``chessboard`` (groups 0/1 alternate on the grid), ``split`` (proportions),
        ``all`` (everything in group 0) or ``balanced`` (subset with a balanced class
        histogram, then chessboard groups).
    proportions
        ``split`` shares of train, valid, test (percentages or fractions; normalised; a
        0 share means the group is not produced).
    shuffle
        ``split``: shuffle the group sequence with a NumPy generator seeded by ``seed``
        (proportions stay exact) instead of the deterministic interleaved sequence.
    seed
        Seed of every random choice (split shuffle, balanced selection).
    label_image
        Label raster on the grid of ``image``. Each point gets field ``class`` = its value
        at the point's reference pixel; patches whose reference pixel is the label's
        nodata are dropped. Required for ``balanced``.
    nclasses
        ``balanced``: classes are ``0 .. nclasses-1`` (other values are an error). None:
        the distinct values of ``label_image``.
    spatial_proportion
        ``balanced``: share of candidates drawn uniformly at random first.
    factor
        Factor of the extraction's sampling grid G in pixels of ``image`` (2 when the
        points will feed a 10 m + 20 m extraction with the 10 m image as source 1). Only
        candidate patches that are windows of G cells are kept, and each point is placed
        at the centre of its G cell, so extraction cuts exactly the validated patch
        (:mod:`terrapatch.geometry`).
    quiet
        No progress bar.

    Returns
    -------
    PatchSelection
        Points (reference-pixel centres), groups and windows.

    Examples
    --------
    >>> sel = select_patches("label.tif", psize=32, step=32, strategy="split",
    ...                      proportions=(80, 10, 10), label_image="label.tif")  # doctest: +SKIP
    >>> sel.write("train.gpkg", "valid.gpkg", "test.gpkg")  # doctest: +SKIP
    """
    if strategy not in PATCH_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is not one of {', '.join(PATCH_STRATEGIES)}")
    px, py = size_pair(psize, "psize")
    stx, sty = size_pair(step, "step")
    ox, oy = size_pair(offset, "offset", minimum=None)
    props = _normalise_proportions(proportions) if strategy == "split" else (1.0, 0.0, 0.0)
    if strategy == "balanced":
        _check_balanced(label_image, nclasses, spatial_proportion)

    info = open_raster(image, "image")
    grid = info.grid
    width, height = grid.width, grid.height
    if px > width or py > height:
        raise InputError(f"psize: patch {px}×{py} does not fit in {info.path!r} "
                         f"({width}×{height} pixels)")
    if nodata is None and info.nodata is not None:
        logger.info("grid selection: %s declares nodata %s but nodata is not set; every pixel "
                    "counts as valid", info.path, info.nodata)
    mask_info = open_raster(mask, "mask") if mask is not None else None
    if mask_info is not None:
        check_same_grid(info, mask_info)
    label_info = open_raster(label_image, "label_image") if label_image is not None else None
    if label_info is not None:
        check_same_grid(info, label_info)

    layout = Layout((grid,), ((px, py),), factor=check_factor(factor, "factor"))
    cx, sx = _on_sampling_grid(layout, candidate_starts(width, px, stx, ox), 0)
    cy, sy = _on_sampling_grid(layout, candidate_starts(height, py, sty, oy), 1)
    if len(sx) == 0 or len(sy) == 0:
        raise NoSamplesError(
            f"grid: no candidate patch fits in {info.path!r} ({width}×{height}) with "
            f"psize={px}×{py}, step={stx}×{sty}, offset={ox}, {oy}"
        )
    n_candidates = len(sx) * len(sy)

    classes: np.ndarray | None = None
    if strategy == "balanced":
        assert label_info is not None
        if nclasses is not None:
            classes = np.arange(nclasses, dtype=np.int64)
        else:
            classes, _ = class_counts(label_strips(label_info, 0, None, quiet=True))
            if len(classes) == 0:
                raise NoSamplesError(f"label_image: {label_info.path!r} has no labelled pixel")

    scan = _scan_grid(info, sx, sy, (px, py), nodata, mask_info, label_info, classes,
                      quiet=quiet)
    valid = scan.valid
    n_invalid = int((~valid).sum())
    if not valid.any():
        raise NoSamplesError(
            f"image: none of the {n_candidates} candidate patches of {info.path!r} is fully valid "
            f"(nodata={nodata}, mask={os.fspath(mask) if mask is not None else None}"
            + (", or their reference pixel has no label" if label_info is not None else "")
            + ")"
        )
    jj, ii = np.meshgrid(np.arange(len(sx)), np.arange(len(sy)))  # row-major order
    ii, jj = ii[valid], jj[valid]
    start_cols, start_rows = sx[jj], sy[ii]
    pos_x = (start_cols - sx[0]) // stx
    pos_y = (start_rows - sy[0]) // sty
    chess = ((pos_x + pos_y) % 2).astype(np.int8)
    keep = np.ones(len(ii), dtype=bool)

    if strategy == "chessboard":
        groups = chess
    elif strategy == "all":
        groups = np.zeros(len(ii), dtype=np.int8)
    elif strategy == "split":
        groups = split_sequence(len(ii), props)
        if shuffle:
            groups = np.random.default_rng(seed).permutation(groups)
    else:
        assert scan.histograms is not None
        keep = balanced_subset(scan.histograms[valid], spatial_proportion, seed)
        groups = chess
    start_cols, start_rows, groups = start_cols[keep], start_rows[keep], groups[keep]
    x, y = layout.cell_centres(cx[jj[keep]], cy[ii[keep]])
    fields: dict[str, np.ndarray] = {"id": np.arange(len(x), dtype=np.int64)}
    if scan.labels is not None:
        fields["class"] = scan.labels[valid][keep]
    samples = Samples(x, y, fields, grid.crs)
    selection = PatchSelection(samples, groups.astype(np.int8), (start_cols, start_rows),
                               (px, py), grid, n_candidates, n_invalid)
    logger.info("grid selection: %d of %d candidate patches valid, %d selected (%s) with "
                "strategy %s", n_candidates - n_invalid, n_candidates, len(selection),
                ", ".join(f"{k} {v}" for k, v in selection.counts().items()), strategy)
    return selection


def _check_balanced(label_image: PathLike | None, nclasses: int | None,
                    spatial_proportion: float) -> None:
    """Raise unless the parameters of the ``balanced`` strategy are usable."""
    if label_image is None:
        raise InputError("label_image: required with strategy balanced")
    if not 0.0 <= spatial_proportion <= 1.0:
        raise InputError(f"spatial_proportion: {spatial_proportion!r} must be in [0, 1]")
    if nclasses is not None and nclasses < 2:
        raise InputError(f"nclasses: {nclasses!r} must be ≥ 2")


@dataclass
class _GridScan:
    valid: np.ndarray
    labels: np.ndarray | None = None
    histograms: np.ndarray | None = None


def _scan_grid(info: Raster, sx: np.ndarray, sy: np.ndarray, psize: tuple[int, int],
               nodata: float | None, mask_info: Raster | None,
               label_info: Raster | None, classes: np.ndarray | None,
               quiet: bool = False) -> _GridScan:
    """Validity, reference-pixel label and (balanced) class histogram of every candidate."""
    px, py = psize
    width = info.grid.width
    ny, nx = len(sy), len(sx)
    scan = _GridScan(valid=np.ones((ny, nx), dtype=bool))
    if nodata is None and mask_info is None and label_info is None:
        return scan
    if label_info is not None:
        scan.labels = np.zeros((ny, nx), dtype=np.int64)
    if classes is not None:
        scan.histograms = np.zeros((ny, nx, len(classes)), dtype=np.int64)
    per_pixel = 1
    if nodata is not None:
        per_pixel += info.bands * info.dtype.itemsize
    if mask_info is not None:
        per_pixel += mask_info.bands * mask_info.dtype.itemsize
    if label_info is not None:
        per_pixel += (label_info.bands * label_info.dtype.itemsize + 9
                      + (16 if classes is not None else 0))
    plan = strip_plan(sy, py, width, per_pixel)
    ref_cols = patch_reference_pixels(sx, px)
    ref_rows = patch_reference_pixels(sy, py)
    with ExitStack() as stack:

        def reader(raster: Raster | None) -> RasterReader | None:
            return None if raster is None else stack.enter_context(raster.open())

        image = reader(info if nodata is not None else None)
        mask, label = reader(mask_info), reader(label_info)
        bar = stack.enter_context(progress_bar(len(plan), "selecting", unit="strip",
                                               quiet=quiet))
        for i0, i1 in plan:
            r0 = int(sy[i0])
            window = strip_window(r0, int(sy[i1 - 1]) + py, width)
            ok: np.ndarray | None = None
            if image is not None and nodata is not None:
                ok = pixel_valid(image.read(window), nodata)
            if mask is not None:
                m = mask.band1(window) != 0
                ok = m if ok is None else ok & m
            lab = lab_ok = cidx = None
            if label is not None and label_info is not None:
                lab, lab_ok = read_labels(label.band1(window), (label_info.nodata,),
                                          label_info.parameter)
                if classes is not None:
                    cidx = class_index(lab, lab_ok, classes, label_info.parameter)
            for i in range(i0, i1):
                rr = int(sy[i]) - r0
                if ok is not None:
                    col_ok = ok[rr:rr + py].all(axis=0)
                    bad = np.concatenate([[0], np.cumsum(~col_ok)])
                    scan.valid[i] &= (bad[sx + px] - bad[sx]) == 0
                if lab is not None and lab_ok is not None and scan.labels is not None:
                    ref_r = int(ref_rows[i]) - r0
                    scan.labels[i] = lab[ref_r, ref_cols]
                    scan.valid[i] &= lab_ok[ref_r, ref_cols]
                if cidx is not None and scan.histograms is not None:
                    block = cidx[rr:rr + py]
                    for k in range(scan.histograms.shape[2]):
                        cs = np.concatenate([[0], np.cumsum((block == k).sum(axis=0))])
                        scan.histograms[i, :, k] = cs[sx + px] - cs[sx]
            bar.update(1)
    return scan
