"""Accuracy reports and quicklooks: confusion matrices, per-class scores, class-coloured PNGs.

The scores need numpy only; the PNGs need matplotlib (the ``report`` extra,
``pip install 'terrapatch[report]'``), imported when a PNG is drawn. Figures are
drawn on their own Agg canvas: matplotlib's global backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from terrapatch._optional import require
from terrapatch.evaluation import ConfusionMatrix
from terrapatch.writer import atomic_output

#: Default class colours (RGB 0–255), cycled when there are more classes.
PALETTE = (
    (31, 119, 180), (44, 160, 44), (255, 187, 120), (214, 39, 40), (152, 223, 138),
    (140, 86, 75), (148, 103, 189), (23, 190, 207), (188, 189, 34), (127, 127, 127),
)


@dataclass(frozen=True)
class ClassScores:
    """Per-class precision, recall, F1 and support, plus overall accuracy and kappa."""

    class_names: tuple[str, ...]
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    overall_accuracy: float
    kappa: float

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes present in the reference."""
        present = self.support > 0
        return float(self.f1[present].mean()) if present.any() else 0.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix ``[true, predicted]`` for labels in ``[0, n_classes)``."""
    return _matrix(y_true, y_pred, n_classes).matrix.copy()


def _matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> ConfusionMatrix:
    """:class:`~terrapatch.evaluation.ConfusionMatrix` of the labels in ``[0, n_classes)``."""
    return ConfusionMatrix.from_arrays(np.asarray(y_true, dtype=np.int64).ravel(),
                                       np.asarray(y_pred, dtype=np.int64).ravel(),
                                       labels=range(n_classes))


def class_scores(y_true: np.ndarray, y_pred: np.ndarray,
                 class_names: Sequence[str]) -> ClassScores:
    """Per-class scores of predicted labels against reference labels (0 where 0/0)."""
    cm = _matrix(y_true, y_pred, len(class_names))

    def zero(values: np.ndarray | float) -> Any:
        return np.nan_to_num(values, nan=0.0)

    return ClassScores(tuple(class_names), cm.matrix.copy(), zero(cm.precision),
                       zero(cm.recall), zero(cm.f1), cm.support.copy(),
                       float(zero(cm.overall_accuracy)), float(zero(cm.kappa)))


def scores_table(results: Mapping[str, ClassScores]) -> str:
    """Markdown table of per-class F1 / precision / recall, one column group per model."""
    names = next(iter(results.values())).class_names
    header = "| class | " + " | ".join(f"{m} P | {m} R | {m} F1" for m in results) + " |"
    rule = "|---|" + "---|---|---|" * len(results)
    lines = [header, rule]
    for c, name in enumerate(names):
        cells = " | ".join(f"{s.precision[c]:.3f} | {s.recall[c]:.3f} | {s.f1[c]:.3f}"
                           for s in results.values())
        lines.append(f"| {name} | {cells} |")
    for label, attr in (("overall accuracy", "overall_accuracy"), ("kappa", "kappa"),
                        ("macro F1", "macro_f1")):
        cells = " | ".join(f" | | {getattr(s, attr):.3f}" for s in results.values())
        lines.append(f"| **{label}** |{cells} |")
    return "\n".join(lines)


def _figure(what: str, **kwargs: Any) -> Any:
    """A new :class:`matplotlib.figure.Figure`, or a one-line error naming the ``report`` extra."""
    return require("matplotlib.figure", what).Figure(**kwargs)


def _colors(n: int) -> np.ndarray:
    return np.array([PALETTE[i % len(PALETTE)] for i in range(n)], dtype=np.uint8)


def quicklook(
    map_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    class_names: Sequence[str],
    title: str | None = None,
    max_size: int = 800,
) -> Path:
    """Write a PNG of a class map with class colours and a legend (decimated to ``max_size``).

    Pixels equal to the map's nodata value (or outside the classes) are shown in white.

    Raises
    ------
    MissingExtraError
        If matplotlib is not installed (``pip install 'terrapatch[report]'``).
    """
    fig = _figure("quicklook: drawing a PNG", figsize=(8, 6), dpi=100)
    from matplotlib.patches import Patch

    with rasterio.open(map_path) as ds:
        scale = max(1.0, max(ds.width, ds.height) / max_size)
        shape = (max(1, int(ds.height / scale)), max(1, int(ds.width / scale)))
        data = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
        nodata = ds.nodata
    colors = _colors(len(class_names))
    rgb = np.full((*data.shape, 3), 255, dtype=np.uint8)
    valid = (data >= 0) & (data < len(class_names))
    if nodata is not None:
        valid &= data != nodata
    rgb[valid] = colors[data[valid].astype(np.int64)]
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or Path(map_path).name)
    handles = [Patch(color=colors[i] / 255, label=f"{i} {n}") for i, n in enumerate(class_names)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    with atomic_output(png_path, "quicklook") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(png_path)


def confusion_png(
    scores: Mapping[str, ClassScores], png_path: str | os.PathLike[str]
) -> Path:
    """Write the confusion matrices of several models side by side as one PNG.

    Raises
    ------
    MissingExtraError
        If matplotlib is not installed (``pip install 'terrapatch[report]'``).
    """
    fig = _figure("confusion_png: drawing a PNG", figsize=(5.5 * len(scores), 5), dpi=100)
    axes = fig.subplots(1, len(scores), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items(), strict=True):
        cm = s.confusion
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
        ticks = range(len(s.class_names))
        ax.set_xticks(ticks, s.class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, s.class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(f"{name} (OA {s.overall_accuracy:.3f})")
    fig.tight_layout()
    with atomic_output(png_path, "confusion") as tmp:
        fig.savefig(tmp, format="png")
    return Path(png_path)
