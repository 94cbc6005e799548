"""Ready-made models: the seed's dual-source Sentinel-2 classifier and a single-source baseline.

Both are valid-convolution networks whose output is at 20 m spacing, so they serve
patch-based and fully-convolutionally on the same grid:

* :class:`DualSourceClassifier`: the seed's ``DualSrcFCNNModel``, a 10 m branch
  (16 × 16 × 4 → 1 × 1, with one 2 × 2 pooling) and a 20 m branch (8 × 8 × 6 → 1 × 1)
  concatenated, then a 1 × 1 softmax classifier;
* :class:`SingleSourceClassifier`: the 10 m branch alone, the baseline the seed
  compares the dual-source model with;
* :class:`Source20mClassifier`: the 20 m branch alone (the other single-source
  baseline of the accuracy study).

Inputs are ``input_10m`` / ``input_20m``; outputs ``estimated`` (softmax),
``estimated_labels`` (class id) and ``features``.
"""

from __future__ import annotations

from typing import Any

from terrapatch._optional import tensorflow_startup
from terrapatch.layers import Argmax
from terrapatch.model import ModelBase

with tensorflow_startup():
    import keras

INPUT_10M = "input_10m"
INPUT_20M = "input_20m"
TARGET = "estimated"


def _conv(x: Any, depth: int, kernel: int, name: str, activation: str = "relu") -> Any:
    return keras.layers.Conv2D(depth, kernel, strides=1, activation=activation,
                               padding="valid", name=name)(x)


def branch_10m(x: Any) -> Any:
    """10 m branch: 16 × 16 → 1 × 1 at 20 m spacing (five valid convs, 2 × 2 pool, conv 2)."""
    for depth, kernel, name in ((16, 5, "conv11"), (16, 3, "conv12"), (16, 3, "conv13"),
                                (32, 3, "conv14"), (32, 3, "conv15")):
        x = _conv(x, depth, kernel, name)
    x = keras.layers.MaxPool2D(pool_size=(2, 2), name="pool")(x)
    return _conv(x, 32, 2, "feats1")


def branch_20m(x: Any) -> Any:
    """20 m branch: 8 × 8 → 1 × 1 (three valid 3 × 3 convs, conv 2)."""
    for name in ("conv21", "conv22", "conv23"):
        x = _conv(x, 32, 3, name)
    return _conv(x, 32, 2, "feats2")


def classifier_head(features: Any, class_nb: int) -> dict[str, Any]:
    """Softmax scores, class ids and features of a 1 × 1 classifier on ``features``."""
    estim = _conv(features, class_nb, 1, "softmax_layer", activation="softmax")
    return {TARGET: estim, "estimated_labels": Argmax(name="argmax_layer")(estim),
            "features": features}


def dual_source_outputs(x10: Any, x20: Any, class_nb: int) -> dict[str, Any]:
    """Outputs of the seed's dual-source network on normalised 10 m and 20 m inputs."""
    feats = keras.layers.Concatenate(name="feats", axis=-1)([branch_10m(x10), branch_20m(x20)])
    return classifier_head(feats, class_nb)


class _Classifier(ModelBase):
    """Common part: class count and reflectance scaling (DN × 1e-4, as in the seed)."""

    def __init__(self, dataset_element_spec: Any, class_nb: int = 6, **kwargs: Any) -> None:
        self.class_nb = class_nb
        super().__init__(dataset_element_spec, **kwargs)

    def normalize_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Scale Sentinel-2 digital numbers to reflectances."""
        return {key: keras.ops.cast(value, "float32") * 1e-4 for key, value in inputs.items()}


class DualSourceClassifier(_Classifier):
    """The seed's dual-source (10 m + 20 m) classifier."""

    def get_outputs(self, normalized_inputs: dict[str, Any]) -> dict[str, Any]:
        """Two branches merged at 20 m spacing, then the classifier."""
        return dual_source_outputs(normalized_inputs[INPUT_10M], normalized_inputs[INPUT_20M],
                                   self.class_nb)


class SingleSourceClassifier(_Classifier):
    """Baseline: the 10 m branch alone (output at 20 m spacing)."""

    def get_outputs(self, normalized_inputs: dict[str, Any]) -> dict[str, Any]:
        """The 10 m branch, then the classifier."""
        return classifier_head(branch_10m(normalized_inputs[INPUT_10M]), self.class_nb)


class Source20mClassifier(_Classifier):
    """Baseline: the 20 m branch alone."""

    def get_outputs(self, normalized_inputs: dict[str, Any]) -> dict[str, Any]:
        """The 20 m branch, then the classifier."""
        return classifier_head(branch_20m(normalized_inputs[INPUT_20M]), self.class_nb)
