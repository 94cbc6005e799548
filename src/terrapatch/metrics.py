"""Keras metrics for segmentation and classification training (F-score per class)."""

from __future__ import annotations

from typing import Any

from terrapatch._optional import tensorflow_startup

with tensorflow_startup():
    import keras
    from keras import ops


__all__ = ["FScore"]


@keras.saving.register_keras_serializable(package="terrapatch")
class FScore(keras.metrics.Metric):
    """F-beta score of one class (or of all entries) over an epoch.

    Counts true positives, false positives and false negatives exactly like
    :class:`keras.metrics.Precision` and :class:`keras.metrics.Recall` with the same
    ``class_id`` and threshold, so ``fscore = (1+β²)·P·R / (β²·P + R)`` of the
    precision ``P`` and recall ``R`` Keras reports beside it. Meant for one-hot targets
    and softmax (or sigmoid) outputs: ``y_true[..., class_id]`` is the truth (non-zero
    = positive) and ``y_pred[..., class_id] > threshold`` the prediction.

    Parameters
    ----------
    class_id
        Channel of the class to score; None scores every entry of the tensors
        (micro-average over classes).
    threshold
        Prediction threshold (Keras's default 0.5).
    beta
        Weight of recall relative to precision (1: F1-score).
    name
        Metric name (default ``"fscore"`` or ``"fscore_cls<class_id>"``).
    dtype
        Dtype of the metric result.

    Notes
    -----
    An epoch without any positive (true or predicted) gives 0, as Keras's precision
    and recall do.
    """

    def __init__(
        self,
        class_id: int | None = None,
        threshold: float = 0.5,
        beta: float = 1.0,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        if name is None:
            name = "fscore" if class_id is None else f"fscore_cls{class_id}"
        super().__init__(name=name, dtype=dtype)
        if beta <= 0:
            raise ValueError(f"FScore: beta={beta!r} must be positive")
        self.class_id = None if class_id is None else int(class_id)
        self.threshold = float(threshold)
        self.beta = float(beta)
        self.true_positives = self.add_variable((), initializer="zeros", name="tp")
        self.false_positives = self.add_variable((), initializer="zeros", name="fp")
        self.false_negatives = self.add_variable((), initializer="zeros", name="fn")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Accumulate the counts of one batch."""
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        if self.class_id is not None:
            y_true = y_true[..., self.class_id]
            y_pred = y_pred[..., self.class_id]
        truth = ops.cast(ops.not_equal(y_true, 0), "float32")
        predicted = ops.cast(ops.greater(y_pred, self.threshold), "float32")
        weight = ops.ones_like(truth)
        if sample_weight is not None:
            sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            while len(sample_weight.shape) < len(truth.shape):
                sample_weight = ops.expand_dims(sample_weight, -1)
            weight = weight * sample_weight
        self.true_positives.assign_add(ops.sum(truth * predicted * weight))
        self.false_positives.assign_add(ops.sum((1.0 - truth) * predicted * weight))
        self.false_negatives.assign_add(ops.sum(truth * (1.0 - predicted) * weight))

    def result(self) -> Any:
        """Return the F-beta score of the counts accumulated so far."""
        b2 = self.beta * self.beta
        tp = self.true_positives
        numerator = (1.0 + b2) * tp
        denominator = numerator + b2 * self.false_negatives + self.false_positives
        return ops.where(ops.greater(denominator, 0.0),
                         numerator / ops.maximum(denominator, 1e-12), 0.0)

    def reset_state(self) -> None:
        """Reset the counts to zero."""
        for variable in (self.true_positives, self.false_positives, self.false_negatives):
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self) -> dict[str, Any]:
        """Return the metric configuration."""
        return {**super().get_config(), "class_id": self.class_id,
                "threshold": self.threshold, "beta": self.beta}
