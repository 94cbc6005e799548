"""A classifier over a model's features as a serving engine (here and on workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from terrapatch.deepfeatures._common import CLASSES_OUTPUT, PROBABILITIES_OUTPUT
from terrapatch.deepfeatures.classifiers import (
    ClassifierBundle,
    cached_classifier,
    check_feature_size,
)
from terrapatch.deepfeatures.features import _check_rank
from terrapatch.engines import Engine, TensorInfo
from terrapatch.errors import (
    ModelError,
)
from terrapatch.serve.layouts import with_layout


class ClassifierEngine(Engine):
    """A feature model followed by a classifier, as one engine that serving can run.

    Its inputs are the model's; its outputs are ``classes`` (int32, one channel, the
    class of each pixel's features) and, when the classifier gives probabilities,
    ``probabilities`` (float32, one channel per class, in :attr:`ClassifierBundle.classes`
    order). Each batch runs the model for the feature output ``(N, H, W, C)`` (or
    ``(N, C)``), classifies the ``N·H·W`` vectors and reshapes back.

    Parameters
    ----------
    inner
        The feature model, with channels-last tensors.
    bundle
        The classifier.
    feature_output
        The model output giving the features (default: the bundle's).

    Errors name the ``classifier`` and the ``feature_output``.
    """

    kind = "deep-features classifier"

    def __init__(self, inner: Engine, bundle: ClassifierBundle,
                 feature_output: str | None = None) -> None:
        output = inner.resolve_output(feature_output or bundle.feature_output, "feature_output")
        _check_rank(inner, output)
        info = inner.outputs[output]
        static = None if info.shape is None else info.shape[-1]
        if static is not None:
            check_feature_size(bundle, int(static), output)
        spatial: tuple[int | None, ...] = (None, None, None) if info.rank != 2 else (None,)
        outputs = {CLASSES_OUTPUT: TensorInfo(CLASSES_OUTPUT, (*spatial, 1), np.dtype("int32"))}
        if hasattr(bundle.estimator, "predict_proba"):
            outputs[PROBABILITIES_OUTPUT] = TensorInfo(
                PROBABILITIES_OUTPUT, (*spatial, len(bundle.classes)), np.dtype("float32"))
        super().__init__(inner.path, inner.inputs, outputs)
        self.inner = inner
        self.bundle = bundle
        self.feature_output = output

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        array = np.asarray(self.inner.run(feed, [self.feature_output])[self.feature_output])
        if array.ndim not in (2, 4):
            raise ModelError(f"feature_output: {self.feature_output!r} gave shape "
                             f"{tuple(array.shape)}; expected rank 4 [N, H, W, C] or 2 [N, C]")
        lead, channels = array.shape[:-1], int(array.shape[-1])
        check_feature_size(self.bundle, channels, self.feature_output)
        flat = array.reshape(-1, channels)
        result: dict[str, Any] = {}
        for name in dict.fromkeys(outputs):
            if name == CLASSES_OUTPUT:
                result[name] = self.bundle.predict(flat).reshape(*lead, 1)
            else:
                proba = self.bundle.predict_proba(flat)
                result[name] = proba.reshape(*lead, proba.shape[-1])
        return result


@dataclass(frozen=True)
class ClassifierWrapper:
    """Picklable ``engine → ClassifierEngine`` for serving's engine wrappers (Dask workers).

    Appended to :attr:`terrapatch.serve.TileRunner.engine_wrappers`, it turns the feature
    model a worker loads into the same :class:`ClassifierEngine` as in this process;
    the classifier is loaded once per worker process (:func:`cached_classifier`).

    Attributes
    ----------
    classifier
        Absolute path of the classifier file.
    feature_output
        The model's feature output.
    model_layout
        The model's tensor layout (``"nchw"`` models are seen channels-last first).
    stamp
        ``(mtime_ns, size)`` of the classifier file when the run started.
    """

    classifier: str
    feature_output: str
    model_layout: str = "nhwc"
    stamp: tuple[int, int] | None = None

    def __call__(self, engine: Engine) -> Engine:
        """The classifier engine over ``engine``."""
        bundle = cached_classifier(self.classifier, self.stamp)
        return ClassifierEngine(with_layout(engine, self.model_layout), bundle,
                                self.feature_output)

