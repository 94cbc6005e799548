"""The deep-features applications: OTBTF's keys over :mod:`terrapatch.deepfeatures`.

OTBTF builds ``TrainClassifierFromDeepFeatures`` and ``ImageClassifierFromDeepFeatures`` as
composites: the ``sourceK.*``, ``model.*`` (``deepmodel.*`` in
``ImageClassifierFromDeepFeatures``), ``output.*`` and ``optim.*`` groups of
``TensorflowModelServe``, plus OTB's ``TrainImagesClassifier`` keys (``vd``,
``valid``, ``out``, ``sample.*``, ``classifier.*``, ``rand``) or ``ImageClassifier``
keys (``model``, ``out``, ``nodatalabel``). The classifier is a scikit-learn
estimator saved as a ``.skops`` file (see ``docs/deepfeatures.md``).

The core names parameters by its keywords (:mod:`terrapatch.spelling`); each
application's ``spelling`` gives their OTBTF keys: :data:`TRAIN_NAMES`,
:data:`CLASSIFY_NAMES`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from terrapatch.apps._base import (
    MODEL_SOURCE_NAMES,
    App,
    Param,
    efield_and_tile_size,
    model_sources,
)
from terrapatch.apps.serve import SERVE_NAMES, parse_user_placeholders
from terrapatch.deepfeatures import TrainSummary, classify, train_deep_classifier
from terrapatch.errors import InputError
from terrapatch.progress import logger
from terrapatch.serve import ServeSummary

_RAM = Param("ram", "int", "accepted for OTB compatibility; ignored")

#: The per-source keys OTBTF shares from TensorflowModelServe.
SOURCE_PARAMS = (
    Param("il", "paths", "input image(s), stacked as bands", required=True),
    Param("rfieldx", "int", "receptive field width in this source's pixels (default: the "
          "classifier's when classifying, else derived from the model)"),
    Param("rfieldy", "int", "receptive field height (default: rfieldx, or derived)"),
    Param("placeholder", "str", "model input fed by this source (default: the free inputs "
          "in alphabetical order)"),
    Param("nodata", "float", "training: drop samples whose patch holds this value; "
          "classifying: skip tiles whose input is entirely this value"),
)


def _model_params(group: str) -> tuple[Param, ...]:
    """The deep model's keys (``model.*`` or ``deepmodel.*``)."""
    return (
        Param(f"{group}.dir", "path", "feature model: SavedModel directory, .keras or .onnx "
              "file", required=True),
        Param(f"{group}.userplaceholders", "strs", "extra model inputs: name=value, "
              "name=(v1, v2...), name=true|false"),
        Param(f"{group}.fullyconv", "bool", "fully-convolutional mode" + (
            " (training features are computed patch by patch at the points)"
            if group == "model" else ""), default=False),
        Param(f"{group}.layout", "choice", "image tensors channels last (nhwc) or first "
              "(nchw); default: detected from the model", choices=("nhwc", "nchw")),
        Param(f"{group}.tagsets", "strs", "SavedModel tags (accepted for compatibility; the "
              "serving signature is used)"),
    )


_OPTIM = (
    Param("optim.disabletiling", "bool", "compute the whole output as one tile",
          default=False),
    Param("optim.tilesizex", "int", "tile width in output pixels (default 256 "
          "fully-convolutional, 64 patch-based)"),
    Param("optim.tilesizey", "int", "tile height (default: tilesizex)"),
)


def _model_names(group: str) -> dict[str, str]:
    """OTBTF keys of the feature model's neutral identifiers, its keys under ``group``."""
    return {**MODEL_SOURCE_NAMES,
            "model": f"{group}.dir", "user_placeholders": f"{group}.userplaceholders",
            "fullyconv": f"{group}.fullyconv", "model_layout": f"{group}.layout",
            "feature_output": "output.names", "output_names": "output.names",
            **{k: SERVE_NAMES[k] for k in ("spcscale", "workers", "scheduler")}}


#: TrainClassifierFromDeepFeatures: :func:`~terrapatch.deepfeatures.train_deep_classifier`'s
#: identifiers (and those of the feature model) → OTBTF keys.
TRAIN_NAMES = {**_model_names("model"), "vector": "vd", "reproject": "vd.reproject",
               "valid": "valid", "field": "sample.vfn", "max_per_class": "sample.mt",
               "classifier": "classifier", "seed": "rand", "out": "out"}
#: ImageClassifierFromDeepFeatures: :func:`~terrapatch.deepfeatures.classify`'s identifiers
#: → OTBTF keys: the feature model is ``deepmodel.*``, the classifier ``model``.
CLASSIFY_NAMES = {**_model_names("deepmodel"), "classifier": "model",
                  "background": "nodatalabel", "pixel_type": "out (pixel type)", "out": "out",
                  **{k: SERVE_NAMES[k] for k in (
                      "efield", "efield[0]", "efield[1]", "tile_size", "tile_size[0]",
                      "tile_size[1]", "disable_tiling")}}


def _user_placeholders(app: App, group: str) -> dict[str, np.ndarray]:
    """``{group}.userplaceholders`` parsed (errors name that key, not serving's)."""
    return parse_user_placeholders(app.get(f"{group}.userplaceholders") or (),
                                   f"{group}.userplaceholders")


def _spcscale(value: Any) -> Any:
    """``output.spcscale`` as an int when whole (the core refuses other values)."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def _single_output(app: App) -> str | None:
    """The one feature output of ``output.names``, or None."""
    names = list(app.get("output.names") or ())
    if len(names) > 1:
        raise InputError(f"output.names: one feature output is used, got {' '.join(names)}")
    return names[0] if names else None


#: classifier choice → (terrapatch name, {OTB key suffix: (sklearn parameter, converter)}).
_CLASSIFIERS: dict[str, tuple[str, dict[str, tuple[str, Any]]]] = {
    "rf": ("rf", {"nbtrees": ("n_estimators", int), "max": ("max_depth", int),
                  "min": ("min_samples_split", lambda v: max(2, int(v))),
                  "var": ("max_features", lambda v: int(v) if int(v) > 0 else "sqrt")}),
    "knn": ("knn", {"k": ("n_neighbors", int)}),
    "libsvm": ("svm", {"k": ("kernel", str), "c": ("C", float), "gamma": ("gamma", float)}),
    "dt": ("dt", {"max": ("max_depth", int),
                  "min": ("min_samples_split", lambda v: max(2, int(v)))}),
    "bayes": ("bayes", {}),
}


class TrainClassifierFromDeepFeatures(App):
    """Train a classifier on a deep model's features at labelled points (OTBTF app).

    Examples
    --------
    >>> from terrapatch.apps import TrainClassifierFromDeepFeatures  # doctest: +SKIP
    >>> TrainClassifierFromDeepFeatures(
    ...     source1_il="s2_10m.tif", source1_rfieldx=16, source1_rfieldy=16,
    ...     model_dir="features.onnx", output_names="features",
    ...     vd="train.gpkg", sample_vfn="class", classifier="rf",
    ...     classifier_rf_nbtrees=200, out="classifier.skops")
    """

    name = "TrainClassifierFromDeepFeatures"
    description = ("train a classical classifier (random forest by default) on a deep model's "
                   "features at labelled points; save it as a .skops file")
    primary_output = "out"
    supports_cluster = True
    spelling = TRAIN_NAMES
    source_params = SOURCE_PARAMS
    params = (
        *_model_params("model"),
        Param("output.names", "strs", "the model's feature output, [N, 1, 1, C] or [N, C] per "
              "patch (default: first output in alphabetical order)"),
        Param("output.spcscale", "float", "sampling grid spacing in source-1 pixels (the "
              "classified map's spacing; integer)", default=1.0),
        *(Param(p.key, p.kind, "accepted for compatibility; ignored (features are computed "
                "at the points only)", default=p.default) for p in _OPTIM),
        Param("vd", "paths", "training points (GeoJSON, GPKG, Shapefile…)", required=True),
        Param("vd.reproject", "bool", "reproject points to source 1's CRS if they differ",
              default=False),
        Param("valid", "paths", "validation points: overall accuracy and kappa are reported"),
        Param("sample.vfn", "str", "integer class field of the points", default="class"),
        Param("sample.mt", "int", "at most this many training samples per class, drawn with "
              "rand (-1: all)", default=1000),
        Param("classifier", "choice", "classifier", default="rf", choices=tuple(_CLASSIFIERS)),
        Param("classifier.rf.nbtrees", "int", "random forest: number of trees", default=100),
        Param("classifier.rf.max", "int", "random forest: maximum tree depth", default=5),
        Param("classifier.rf.min", "int", "random forest: samples a node needs to be split",
              default=10),
        Param("classifier.rf.var", "int", "random forest: features tried per split (0: "
              "square root of the feature count)", default=0),
        Param("classifier.knn.k", "int", "k nearest neighbours (standardised features): k",
              default=32),
        Param("classifier.libsvm.k", "choice", "SVM (standardised features): kernel",
              default="linear", choices=("linear", "rbf", "poly", "sigmoid")),
        Param("classifier.libsvm.c", "float", "SVM: cost C", default=1.0),
        Param("classifier.libsvm.gamma", "float", "SVM: kernel gamma (rbf, poly, sigmoid)",
              default=1.0),
        Param("classifier.dt.max", "int", "decision tree: maximum depth", default=65535),
        Param("classifier.dt.min", "int", "decision tree: samples a node needs to be split",
              default=10),
        Param("rand", "int", "random seed (classifier, sample.mt)", default=0),
        Param("out", "outvec", "output classifier (.skops; scikit-learn, loaded safely)",
              required=True),
        _RAM,
    )

    def classifier_params(self) -> tuple[str, dict[str, Any]]:
        """The chosen classifier's terrapatch name and scikit-learn parameters."""
        choice = self.get("classifier")
        name, keys = _CLASSIFIERS[choice]
        params = {}
        for suffix, (sk_name, convert) in keys.items():
            params[sk_name] = convert(self.get(f"classifier.{choice}.{suffix}"))
        ignored = sorted(k for k in self.values if k.startswith("classifier.")
                         and not k.startswith(f"classifier.{choice}."))
        if ignored:
            logger.warning("%s ignored: the classifier is %s", ", ".join(ignored), choice)
        return name, params

    def run(self) -> TrainSummary:
        """Sample the features, train the classifier and write it."""
        sources = model_sources(self)
        if self.get("model.tagsets"):
            logger.info("model.tagsets ignored: the SavedModel's serving signature is used")
        name, params = self.classifier_params()
        valid = self.get("valid")
        return train_deep_classifier(
            sources, self.get("model.dir"), list(self.get("vd")), self.get("sample.vfn"),
            self.get("out"), classifier=name, params=params, seed=self.get("rand"),
            feature_output=_single_output(self),
            spcscale=_spcscale(self.get("output.spcscale")),
            max_per_class=self.get("sample.mt"),
            valid=list(valid) if valid else None,
            user_placeholders=_user_placeholders(self, "model"),
            model_layout=self.get("model.layout"),
            reproject=bool(self.get("vd.reproject")), quiet=self.quiet,
            scheduler=self.scheduler, workers=self.workers,
        )


class ImageClassifierFromDeepFeatures(App):
    """Classify rasters with a deep model's features and a saved classifier (OTBTF app).

    Examples
    --------
    >>> from terrapatch.apps import ImageClassifierFromDeepFeatures  # doctest: +SKIP
    >>> ImageClassifierFromDeepFeatures(
    ...     source1_il="s2_10m.tif", deepmodel_dir="features.onnx",
    ...     model="classifier.skops",
    ... ).write("map.tif", pixel_type="uint8", ext_fname="box=0:0:500:500")
    """

    name = "ImageClassifierFromDeepFeatures"
    description = ("classify rasters with a deep model's features and a classifier trained by "
                   "TrainClassifierFromDeepFeatures; write a GeoTIFF map of classes")
    primary_output = "out"
    supports_cluster = True
    spelling = CLASSIFY_NAMES
    source_params = SOURCE_PARAMS
    params = (
        *_model_params("deepmodel"),
        Param("output.names", "strs", "the model's feature output (default: the one the "
              "classifier was trained on)"),
        Param("output.spcscale", "float", "output spacing in source-1 pixels (default: the "
              "one the classifier was trained with)"),
        Param("output.efieldx", "int", "expression field width (fully-convolutional mode; "
              "default: derived from the model)"),
        Param("output.efieldy", "int", "expression field height (default: efieldx)"),
        *_OPTIM,
        Param("model", "path", "classifier file (.skops) from TrainClassifierFromDeepFeatures",
              required=True),
        Param("imstat", "path", "not supported: the classifier is trained on the features as "
              "they are"),
        Param("nodatalabel", "float", "value of tiles skipped because a source is entirely "
              "nodata, also the map's nodata (unset: 0, and no nodata value)"),
        Param("confmap", "out", "not supported (terrapatch writes the classes only)"),
        Param("out", "out", "output map of classes: .tif (add ?&gdal:of:COG for a "
              "Cloud-Optimized GeoTIFF) or .vrt", required=True, pixel_type="uint8"),
        _RAM,
    )

    def run(self) -> ServeSummary:
        """Classify and write the map."""
        for key, why in (("imstat", "features are classified as the classifier was "
                          "trained on them, without statistics"),
                         ("confmap", "confidence maps are not written; use the Python "
                          "API's outputs=('probabilities',)")):
            if self.values.get(key):
                raise InputError(f"{key}: not supported ({why})")
        sources = model_sources(self)
        efield, tile_size = efield_and_tile_size(self)
        if self.get("deepmodel.tagsets"):
            logger.info("deepmodel.tagsets ignored: the SavedModel's serving signature is "
                        "used")
        out = self.output("out")
        assert out is not None  # required parameter, checked by App
        return classify(
            sources, self.get("deepmodel.dir"), self.get("model"), out.path,
            feature_output=_single_output(self),
            fullyconv=bool(self.get("deepmodel.fullyconv")),
            spcscale=_spcscale(self.get("output.spcscale")),
            efield=efield,
            tile_size=tile_size,
            box=out.ext.box, pixel_type=out.pixel_type,
            background=self.get("nodatalabel"),
            creation_options=out.ext.creation_options or None, quiet=self.quiet,
            user_placeholders=_user_placeholders(self, "deepmodel"),
            disable_tiling=bool(self.get("optim.disabletiling")),
            scheduler=self.scheduler, workers=self.workers,
            output_format=out.ext.driver, model_layout=self.get("deepmodel.layout"),
        )
