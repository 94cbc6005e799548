"""A classical classifier on a deep model's features: sample, train, save/load safely, classify.

OTBTF's ``TrainClassifierFromDeepFeatures`` and ``ImageClassifierFromDeepFeatures``
chain a deep model's *feature output* with a classical classifier. Here the
classifier is a scikit-learn estimator (a random forest by default) and the
flow is:

1. **Sample** (:func:`sample_features`): at every labelled point, the patches
   :func:`~terrapatch.extraction.extract_patches` cuts (the windows patch-based
   serving feeds for the output pixel holding the point: invariant I2) go
   through the model, one feature vector per patch.
2. **Train** (:func:`train_classifier`) and keep the estimator with what it
   was trained on (:class:`ClassifierBundle`: feature output, feature count,
   receptive fields, spcscale), saved as a skops file (:func:`save_classifier`).
3. **Load safely** (:func:`load_classifier`): a skops file is loaded only when
   every type it holds is a scikit-learn or NumPy class; nothing else, never a
   pickle.
4. **Classify** (:func:`classify`): serving itself streams the map, with a
   :class:`ClassifierEngine` (the model, then the classifier on every pixel's
   features) in place of the model, so tiles, box, nodata, COG/VRT outputs and
   Dask workers (:class:`ClassifierWrapper`) work as in
   :func:`terrapatch.serve.serve`.

scikit-learn and skops are the ``classical`` extra
(``pip install 'terrapatch[classical]'``); they are imported on first use.
Feature models take channels-last tensors (terrapatch's Keras models) or
channels-first ones (seen channels-last, as serving does).

One module per job: :mod:`~terrapatch.deepfeatures.features` (steps 1),
:mod:`~terrapatch.deepfeatures.classifiers` (2–3),
:mod:`~terrapatch.deepfeatures.engine` (the classifier as a serving engine),
:mod:`~terrapatch.deepfeatures.jobs` (the two applications' runs), and
:mod:`~terrapatch.deepfeatures._common` (names, limits, the extra).
"""

from __future__ import annotations

from terrapatch.deepfeatures._common import BUNDLE_FORMAT, CLASSIFIERS
from terrapatch.deepfeatures.classifiers import (
    ClassifierBundle,
    cached_classifier,
    check_feature_size,
    load_classifier,
    save_classifier,
    train_classifier,
    trusted_type,
)
from terrapatch.deepfeatures.engine import ClassifierEngine, ClassifierWrapper
from terrapatch.deepfeatures.features import (
    FeatureModel,
    FeatureSamples,
    open_feature_model,
    sample_features,
)
from terrapatch.deepfeatures.jobs import (
    TrainSummary,
    Validation,
    classify,
    prepare_classify,
    train_deep_classifier,
)

__all__ = [
    "BUNDLE_FORMAT",
    "CLASSIFIERS",
    "ClassifierBundle",
    "ClassifierEngine",
    "ClassifierWrapper",
    "FeatureModel",
    "FeatureSamples",
    "TrainSummary",
    "Validation",
    "cached_classifier",
    "check_feature_size",
    "classify",
    "load_classifier",
    "open_feature_model",
    "prepare_classify",
    "sample_features",
    "save_classifier",
    "train_classifier",
    "train_deep_classifier",
    "trusted_type",
]
