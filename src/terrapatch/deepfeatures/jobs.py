"""The applications' runs: train a classifier at points; classify whole rasters.

Errors and log records name parameters by the keywords of :func:`train_deep_classifier`
and :func:`classify` (``model``, ``classifier``, ``feature_output``, ``vector``,
``valid``, ``max_per_class``, ``out``…), which a facade respells
(:mod:`terrapatch.spelling`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.deepfeatures._common import CLASSES_OUTPUT, PathLike, _classical
from terrapatch.deepfeatures.classifiers import (
    ClassifierBundle,
    _stamp,
    check_feature_size,
    load_classifier,
    save_classifier,
    train_classifier,
)
from terrapatch.deepfeatures.engine import ClassifierEngine, ClassifierWrapper
from terrapatch.deepfeatures.features import (
    FeatureSamples,
    _with_fields,
    open_feature_model,
    sample_features,
)
from terrapatch.errors import (
    InputError,
)
from terrapatch.progress import logger
from terrapatch.raster import Source
from terrapatch.serve import ServeJob, ServeSummary, prepare_serve
from terrapatch.spelling import respelled
from terrapatch.vector import PointSet
from terrapatch.writer import (
    Output,
    check_outputs,
    claim_outputs,
    pixel_dtype,
)


@dataclass(frozen=True)
class Validation:
    """Accuracy of a classifier on validation samples.

    Attributes
    ----------
    n
        Validation samples.
    overall_accuracy
        Share of samples classified as their label.
    kappa
        Cohen's kappa.
    classes
        Labels of the confusion matrix's rows (reference) and columns (produced).
    confusion
        ``(K, K)`` counts: reference class (rows) × produced class (columns).
    """

    n: int
    overall_accuracy: float
    kappa: float
    classes: tuple[int, ...]
    confusion: np.ndarray

    @classmethod
    def of(cls, reference: np.ndarray, produced: np.ndarray) -> Validation:
        """Compare produced classes with reference ones."""
        reference, produced = np.asarray(reference), np.asarray(produced)
        classes = np.union1d(reference, produced)
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(matrix, (np.searchsorted(classes, reference),
                           np.searchsorted(classes, produced)), 1)
        n = int(matrix.sum())
        oa = float(np.trace(matrix) / n) if n else 0.0
        expected = float((matrix.sum(0) * matrix.sum(1)).sum() / n**2) if n else 0.0
        kappa = (oa - expected) / (1 - expected) if expected < 1 else 1.0
        return cls(n, oa, float(kappa), tuple(int(c) for c in classes), matrix)


@dataclass(frozen=True)
class TrainSummary:
    """What :func:`train_deep_classifier` did.

    Attributes
    ----------
    path
        The classifier file written.
    bundle
        The classifier and what its features are.
    samples
        The training features and labels.
    class_counts
        Training samples per class.
    training_accuracy
        Overall accuracy on the training samples.
    validation
        Accuracy on the validation samples, when given.
    seconds
        Wall time.
    """

    path: Path
    bundle: ClassifierBundle
    samples: FeatureSamples
    class_counts: dict[int, int]
    training_accuracy: float
    validation: Validation | None
    seconds: float


def _cap_per_class(samples: FeatureSamples, limit: int | None, seed: int) -> FeatureSamples:
    """At most ``limit`` samples per class, drawn at random (seeded), in their order."""
    if limit is None or limit < 0:
        return samples
    if limit == 0:
        raise InputError("max_per_class: 0 samples per class leaves nothing to train on "
                         "(-1: every sample)")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(samples.labels):
        idx = np.flatnonzero(samples.labels == c)
        keep.append(idx if len(idx) <= limit else rng.choice(idx, limit, replace=False))
    order = np.sort(np.concatenate(keep))
    if len(order) == len(samples):
        return samples
    logger.info("max_per_class: %d of %d samples kept (at most %d per class)", len(order),
                len(samples), limit)
    return FeatureSamples(samples.features[order], samples.labels[order], samples.x[order],
                          samples.y[order], samples.feature_output, samples.extraction)


#: Validation points are sampled as :func:`sample_features`' ``vector``.
_VALID_IS_VECTOR = {"vector": "valid"}
#: Classifying serves the classifier's ``outputs`` (serving's ``output_names``).
_OUTPUTS_ARE_OUTPUT_NAMES = {"output_names": "outputs"}


def _inputs(sources: Sequence[Source], model: Any) -> dict[str, Any]:
    """The sources' rasters and the model file, by neutral identifier (output checks)."""
    inputs: dict[str, Any] = {f"{s.name}.paths": s.paths for s in sources
                              if isinstance(s, Source)}
    if isinstance(model, str | os.PathLike):
        inputs["model"] = model
    return inputs


def _vector_inputs(vector: Any, parameter: str) -> dict[str, Any]:
    """The point files among ``vector`` (files or point sets) as inputs named ``parameter``."""
    items = [vector] if isinstance(vector, str | os.PathLike | PointSet) else list(vector or [])
    paths = [v for v in items if isinstance(v, str | os.PathLike)]
    return {parameter: paths} if paths else {}


def train_deep_classifier(
    sources: Sequence[Source],
    model: Any,
    vector: PathLike | PointSet | Sequence[PathLike | PointSet],
    field: str,
    out: PathLike,
    classifier: Any = "rf",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    feature_output: str | None = None,
    spcscale: int = 1,
    max_per_class: int | None = None,
    valid: PathLike | PointSet | Sequence[PathLike | PointSet] | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    model_layout: str | None = None,
    reproject: bool = False,
    quiet: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
) -> TrainSummary:
    """Train a classifier on a model's features at labelled points and save it (``.skops``).

    This is OTBTF's ``TrainClassifierFromDeepFeatures``: :func:`open_feature_model`,
    :func:`sample_features`, :func:`train_classifier`, :func:`save_classifier`.

    Parameters
    ----------
    sources, model, feature_output, spcscale, user_placeholders, model_layout
        The feature model (see :func:`open_feature_model`); receptive fields not given
        are derived from the model.
    vector, field
        Training points (one or several files) and their integer class field.
    out
        Classifier file (``.skops``), written atomically once trained.
    classifier, params, seed
        See :func:`train_classifier`.
    max_per_class
        At most this many training samples per class (drawn with ``seed``); None: all.
    valid
        Validation points (same field): their accuracy is logged and returned.
    reproject, quiet, scheduler, workers
        See :func:`sample_features`.

    Returns
    -------
    TrainSummary
    """
    start = time.perf_counter()
    inputs = {**_inputs(sources, model), **_vector_inputs(vector, "vector"),
              **_vector_inputs(valid, "valid")}
    _classical("out: training a classifier")
    with claim_outputs({"out": Output(out, "classifier")}, inputs):
        fm = open_feature_model(sources, model, feature_output, spcscale, user_placeholders,
                                model_layout)
        samples = sample_features(fm, vector, field, reproject, quiet, scheduler, workers)
        samples = _cap_per_class(samples, max_per_class, seed)
        estimator = train_classifier(samples.features, samples.labels, classifier, params, seed)
        bundle = ClassifierBundle.of(estimator, fm, classifier)
        training = Validation.of(samples.labels, bundle.predict(samples.features))
        validation = None
        if valid is not None:
            with respelled(_VALID_IS_VECTOR):
                checks = sample_features(fm, valid, field, reproject, quiet, scheduler,
                                         workers)
            validation = Validation.of(checks.labels, bundle.predict(checks.features))
            logger.info("validation: overall accuracy %.4f, kappa %.4f on %d sample(s)",
                        validation.overall_accuracy, validation.kappa, validation.n)
        path = save_classifier(bundle, out, "out")
    labels, counts = np.unique(samples.labels, return_counts=True)
    seconds = time.perf_counter() - start
    logger.info("wrote %s: %s trained on %d sample(s) × %d feature(s) of %r, %d class(es), "
                "training accuracy %.4f, %.1f s", os.fspath(out), bundle.classifier,
                len(samples), bundle.n_features, bundle.feature_output, len(labels),
                training.overall_accuracy, seconds)
    return TrainSummary(path, bundle, samples,
                        {int(c): int(k) for c, k in zip(labels, counts, strict=True)},
                        training.overall_accuracy, validation, seconds)


# ---------------------------------------------------------------------- classification run


def _fields_for(sources: Sequence[Source], bundle: ClassifierBundle) -> list[Source]:
    """Sources whose receptive fields default to those the classifier was trained with."""
    if len(bundle.fields) != len(sources):
        if bundle.fields:
            logger.warning("classifier trained with %d source(s), classifying with %d: "
                           "receptive fields not given are derived from the model",
                           len(bundle.fields), len(sources))
        return list(sources)
    out = []
    for s, trained in zip(sources, bundle.fields, strict=True):
        if s.patch_size is None:
            out.extend(_with_fields([s], [trained]))
            continue
        if tuple(s.patch_size) != tuple(trained):
            logger.warning("%s: receptive field %d×%d, but the classifier was trained on "
                           "features of %d×%d patches", s.name, *s.patch_size, *trained)
        out.append(s)
    return out


def prepare_classify(
    sources: Sequence[Source],
    model: Any,
    classifier: PathLike,
    feature_output: str | None = None,
    fullyconv: bool = False,
    spcscale: int | None = None,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    model_layout: str | None = None,
    outputs: Sequence[str] = (CLASSES_OUTPUT,),
) -> ServeJob:
    """Validate a classification run and plan its tiles (a :class:`~terrapatch.serve.ServeJob`).

    Parameters are those of :func:`classify`. The job's runner carries a
    :class:`ClassifierWrapper`, so that Dask workers classify as this process does.
    """
    text = os.fspath(classifier)
    bundle = load_classifier(text)
    sources = _fields_for(list(sources), bundle)
    fm = open_feature_model(sources, model, feature_output or bundle.feature_output,
                            bundle.spcscale if spcscale is None else spcscale,
                            user_placeholders, model_layout)
    if fm.output != bundle.feature_output:
        logger.warning("feature_output: classifying features of %r with a classifier trained "
                       "on %r", fm.output, bundle.feature_output)
    check_feature_size(bundle, fm.channels, fm.output)
    engine = ClassifierEngine(fm.engine, bundle, fm.output)
    wanted = [outputs] if isinstance(outputs, str) else list(outputs)
    for name in wanted:
        engine.resolve_output(name, "outputs")
    with respelled(_OUTPUTS_ARE_OUTPUT_NAMES):
        job = prepare_serve(list(fm.sources), model, output_names=wanted, fullyconv=fullyconv,
                            spcscale=fm.spcscale, efield=efield, tile_size=tile_size, box=box,
                            user_placeholders=user_placeholders,
                            disable_tiling=disable_tiling, engine=engine, model_layout="nhwc")
    path = os.path.abspath(text)
    job.runner.engine_wrappers.append(ClassifierWrapper(path, fm.output, fm.model_layout,
                                                        _stamp(path, "classifier")))
    return job


def classify(
    sources: Sequence[Source],
    model: Any,
    classifier: PathLike,
    out: PathLike,
    feature_output: str | None = None,
    fullyconv: bool = False,
    spcscale: int | None = None,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    pixel_type: str | np.dtype = "uint8",
    background: float | None = None,
    creation_options: Mapping[str, str] | None = None,
    quiet: bool = False,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
    output_format: str | None = None,
    model_layout: str | None = None,
    outputs: Sequence[str] = (CLASSES_OUTPUT,),
) -> ServeSummary:
    """Classify whole rasters with a model's features and a saved classifier; write the map.

    This is OTBTF's ``ImageClassifierFromDeepFeatures``: serving
    (:func:`terrapatch.serve.prepare_serve`, the same output grid, tiles, box, nodata
    and formats) with a :class:`ClassifierEngine` in place of the model.

    Parameters
    ----------
    sources
        The sources; receptive fields not given default to those of training (stored
        in the classifier), else are derived from the model.
    model
        The feature model (path; a path is needed on a Dask cluster).
    classifier
        Classifier file from :func:`train_deep_classifier` (``.skops``), loaded safely.
    out
        Output map (``.tif``, or ``.vrt``), written atomically.
    feature_output
        The model's feature output; default: the classifier's.
    fullyconv
        Fully-convolutional serving (for models valid in both modes the map is the same).
    spcscale
        Output spacing in source-1 pixels; default: that of training.
    efield, tile_size, box, background, creation_options, quiet, user_placeholders,
    disable_tiling, scheduler, workers, output_format, model_layout
        As in :func:`terrapatch.serve.serve`.
    pixel_type
        Pixel type of the map (default ``uint8``).
    outputs
        ``("classes",)`` (default), ``("probabilities",)`` or both, stacked as bands.

    Returns
    -------
    ServeSummary
    """
    from terrapatch import cluster

    dtype = pixel_dtype(pixel_type, parameter="pixel_type")
    inputs = {**_inputs(sources, model), "classifier": classifier}
    # Before anything loads: no input replaced, the right extension, valid options.
    check_outputs({"out": Output(out, "map", output_format, dict(creation_options or {}))},
                  inputs)

    def run(client: Any) -> ServeSummary:
        job = prepare_classify(sources, model, classifier, feature_output, fullyconv, spcscale,
                               efield, tile_size, box, user_placeholders, disable_tiling,
                               model_layout, outputs)
        if client is not None:
            path = os.path.abspath(os.fspath(classifier))
            cluster.check_worker_paths(client, [path], {path: "classifier"})
        return job.run(out, dtype, background=background, creation_options=creation_options,
                       quiet=quiet, scheduler=client, output_format=output_format)

    if scheduler is None and workers is None:
        return run(None)
    with cluster.client_for(scheduler, workers) as client:
        return run(client)
