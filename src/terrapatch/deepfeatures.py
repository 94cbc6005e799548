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
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import terrapatch
from terrapatch.engines import Engine, TensorInfo, load_engine
from terrapatch.errors import (
    InputError,
    MissingExtraError,
    MissingInputError,
    ModelError,
    TerrapatchError,
)
from terrapatch.extraction import ExtractionSummary, extract_patches
from terrapatch.geometry import check_factor
from terrapatch.patches import read_patches, read_patches_info
from terrapatch.progress import logger
from terrapatch.raster import Source, check_sources
from terrapatch.serve import ServeJob, ServeSummary, derive_geometry, prepare_serve
from terrapatch.serve.binding import resolve_inputs, resolve_outputs
from terrapatch.serve.caches import worker_name
from terrapatch.serve.layouts import detect_layout, with_layout
from terrapatch.vector import PointSet, read_points
from terrapatch.writer import (
    PIXEL_TYPES,
    Output,
    atomic_output,
    check_outputs,
    claim_outputs,
    pixel_dtype,
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
    "respelled",
    "sample_features",
    "save_classifier",
    "train_classifier",
    "train_deep_classifier",
    "trusted_type",
]

PathLike = str | os.PathLike[str]

#: Classifiers known by name (any scikit-learn classifier instance is accepted too).
CLASSIFIERS = ("rf", "svm", "knn", "dt", "bayes")
#: ``format`` entry of a saved bundle.
BUNDLE_FORMAT = "terrapatch-deep-features-classifier"
#: Bytes of patches (all sources) run through the model at once when sampling.
FEATURE_BATCH_BYTES = 64 * 2**20
#: Most patches per model call when sampling.
FEATURE_BATCH = 4096
#: Output names of a :class:`ClassifierEngine`.
CLASSES_OUTPUT = "classes"
PROBABILITIES_OUTPUT = "probabilities"
#: Top-level modules whose classes a classifier file may hold.
TRUSTED_MODULES = ("sklearn", "numpy")

# Classifier files are an output kind of their own (checked like every output).


def _classical(what: str) -> tuple[ModuleType, ModuleType]:
    """Import scikit-learn and skops, or raise naming the ``classical`` extra."""
    try:
        sklearn = importlib.import_module("sklearn")
        skops_io = importlib.import_module("skops.io")
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs scikit-learn and skops, which cannot be imported here "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else 'ImportError'}); "
            "install them with pip install 'terrapatch[classical]'",
            extra="classical", package=exc.name,
        ) from None
    return sklearn, skops_io


@contextlib.contextmanager
def respelled(names: Mapping[str, str]) -> Iterator[None]:
    """Errors starting with a parameter of ``names`` (``"vec: ..."``) name its new key instead.

    The error is re-raised as it is (same class), only its first word changes.
    """
    try:
        yield
    except TerrapatchError as exc:
        key, sep, rest = str(exc).partition(":")
        if sep and key in names and exc.args:
            exc.args = (f"{names[key]}:{rest}", *exc.args[1:])
        raise


def _as_features(array: np.ndarray) -> np.ndarray:
    """Feature rows as the classifier sees them, in training and in serving alike."""
    return np.ascontiguousarray(array, dtype=np.float32)


# ---------------------------------------------------------------------- the feature model


@dataclass(frozen=True)
class FeatureModel:
    """A deep model bound to sources, giving one feature vector per patch.

    Build it with :func:`open_feature_model`.

    Attributes
    ----------
    engine
        The model, seen with channels-last tensors.
    sources
        The sources, their ``patch_size`` set to the receptive fields.
    input_names
        Model input fed by each source.
    output
        The feature output (resolved name).
    channels
        Features per patch (``C``).
    spcscale
        Sampling-grid factor (the classified map's spacing in source-1 pixels).
    model_layout
        ``"nhwc"`` or ``"nchw"``: the model's own tensor layout.
    user_inputs
        Constant extra inputs (``model.userplaceholders``).
    derived
        Whether the receptive fields were derived from the model.
    """

    engine: Engine
    sources: tuple[Source, ...]
    input_names: tuple[str, ...]
    output: str
    channels: int
    spcscale: int
    model_layout: str
    user_inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    derived: bool = False

    @property
    def fields(self) -> tuple[tuple[int, int], ...]:
        """Receptive field ``(rx, ry)`` of each source."""
        return tuple(s.patch_size for s in self.sources)  # type: ignore[misc]

    def batch_size(self) -> int:
        """Patches per model call: :data:`FEATURE_BATCH_BYTES` of float32 patches at most."""
        per_patch = sum(4 * rx * ry * s.bands
                        for s, (rx, ry) in zip(self.sources, self.fields, strict=True))
        return max(1, min(FEATURE_BATCH, FEATURE_BATCH_BYTES // max(1, per_patch)))

    def features(self, patches: Sequence[np.ndarray]) -> np.ndarray:
        """Feature vectors ``(n, C)`` of patches ``(n, ry, rx, bands)``, one array per source.

        Raises
        ------
        ModelError
            If the feature output does not give one ``C``-vector per patch.
        """
        n = int(patches[0].shape[0])
        out = np.empty((n, self.channels), dtype=np.float32)
        step = self.batch_size()
        for a in range(0, n, step):
            feed = {name: p[a:a + step] for name, p in zip(self.input_names, patches,
                                                              strict=True)}
            feed.update(self.user_inputs)
            result = self.engine.run(feed, [self.output])[self.output]
            out[a:a + step] = _per_patch(result, min(step, n - a), self.output, self.channels)
        return out


def _per_patch(array: np.ndarray, n: int, output: str, channels: int | None) -> np.ndarray:
    """``(n, C)`` from a feature output ``(n, 1, 1, C)`` or ``(n, C)``, or raise."""
    shape = tuple(array.shape)
    ok = (array.ndim == 4 and shape[:3] == (n, 1, 1)) or (array.ndim == 2 and shape[0] == n)
    if not ok:
        raise ModelError(
            f"output.names: feature output {output!r} gives shape {shape} for {n} patch(es); "
            "a feature output must give one vector per patch, [N, 1, 1, C] (channels last) "
            "or [N, C]: give the receptive fields (sourceK.rfieldx/y) at which the model "
            "emits one pixel per patch, or another output"
        )
    flat = array.reshape(n, shape[-1])
    if channels is not None and flat.shape[1] != channels:
        raise ModelError(f"output.names: feature output {output!r} gives {flat.shape[1]} "
                         f"features per patch, {channels} on an earlier batch")
    return flat


def _check_rank(engine: Engine, output: str) -> None:
    """Refuse a feature output whose static rank is neither 4 nor 2."""
    info = engine.outputs[output]
    if info.rank not in (None, 2, 4):
        raise ModelError(
            f"output.names: feature output {info.describe()} has rank {info.rank}; a feature "
            "output must be [N, 1, 1, C] per patch (rank 4, channels last) or [N, C] (rank 2)"
        )


def _with_fields(sources: Sequence[Source], fields: Sequence[tuple[int, int]]) -> list[Source]:
    """Copies of the sources with their patch size set to the receptive fields."""
    out = []
    for source, rf in zip(sources, fields, strict=True):
        copied = copy.copy(source)
        copied.patch_size = (int(rf[0]), int(rf[1]))
        out.append(copied)
    return out


def open_feature_model(
    sources: Sequence[Source],
    model: Any,
    feature_output: str | Sequence[str] | None = None,
    spcscale: int = 1,
    user_placeholders: Mapping[str, Any] | None = None,
    model_layout: str | None = None,
    engine: Engine | None = None,
    model_parameter: str = "model.dir",
) -> FeatureModel:
    """Open a feature model on sources, as patch-based serving would, and check it.

    Parameters
    ----------
    sources
        :class:`~terrapatch.raster.Source` objects, source 1 first; ``patch_size`` is
        the receptive field (None: derived from the model, like serving does),
        ``placeholder`` the model input (None: the free inputs in alphabetical order).
    model
        SavedModel directory, ``.keras`` or ``.onnx`` file (or an in-memory model).
    feature_output
        The output giving the features (``output.names``); default: the first output in
        alphabetical order.
    spcscale
        Sampling-grid factor, as in serving (positive integer).
    user_placeholders
        Constant extra inputs, name → array.
    model_layout
        ``"nhwc"`` or ``"nchw"`` model tensors; None: detected, as in serving.
    engine
        An already loaded engine to use instead of opening ``model``.
    model_parameter
        Parameter naming the model in errors.

    Raises
    ------
    ModelError
        For an unknown input or output name, a feature output whose rank is neither 4
        nor 2, or one that does not give one vector per patch at the receptive fields.
    """
    sources = check_sources(sources)
    spcscale = check_factor(spcscale, "output.spcscale")
    _ = [s.grid for s in sources]  # opens every source: missing files fail here
    if engine is None:
        engine = load_engine(model, model_parameter)
    user_inputs = {engine.resolve_input(k, "model.userplaceholders"): np.asarray(v)
                   for k, v in (user_placeholders or {}).items()}
    input_names = resolve_inputs(engine, sources, user_inputs)
    layout = detect_layout(engine, sources, input_names, model_layout)
    engine = with_layout(engine, layout)
    if feature_output is None or isinstance(feature_output, str):
        names = [feature_output] if feature_output else []
    else:
        names = [n for n in feature_output if n]
    if len(names) > 1:
        raise InputError(f"output.names: one feature output is used, got {names}")
    output = resolve_outputs(engine, names)[0]
    _check_rank(engine, output)
    given = [s.patch_size for s in sources]
    derived = any(f is None for f in given)
    if derived:
        found = derive_geometry(engine, sources, input_names, [output], False, spcscale,
                                user_inputs)
        fields = [g if g is not None else d for g, d in zip(given, found.fields, strict=True)]
        logger.info("receptive fields derived from the model: %s", ", ".join(
            f"{s.name} {rx}×{ry}" for s, (rx, ry) in zip(sources, fields, strict=True)))
    else:
        fields = given  # type: ignore[assignment]
    bound = _with_fields(sources, fields)  # type: ignore[arg-type]
    probe = {n: np.zeros((2, ry, rx, s.bands), dtype=engine.inputs[n].dtype)
             for n, s, (rx, ry) in zip(input_names, bound, fields, strict=True)}  # type: ignore[misc]
    probe.update(user_inputs)
    result = engine.run(probe, [output])[output]
    channels = int(_per_patch(result, 2, output, None).shape[1])
    return FeatureModel(engine, tuple(bound), tuple(input_names), output, channels, spcscale,
                        layout, user_inputs, derived)


# ---------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class FeatureSamples:
    """Feature vectors at labelled points.

    Attributes
    ----------
    features
        ``(n, C)`` float32, one row per kept sample.
    labels
        ``(n,)`` int64 class of each sample.
    x, y
        Coordinates of the kept samples (source 1's CRS).
    feature_output
        The model output the features come from.
    extraction
        What each vector file's extraction kept and rejected.
    """

    features: np.ndarray
    labels: np.ndarray
    x: np.ndarray
    y: np.ndarray
    feature_output: str
    extraction: tuple[ExtractionSummary, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _extraction_type(source: Source) -> str:
    """Pixel type keeping the source's values exactly in the extracted patches."""
    name = source.dtype.name
    return name if name in PIXEL_TYPES else "float64"


def _sample_one(fm: FeatureModel, points: PointSet, field_name: str, folder: Path,
                quiet: bool, scheduler: Any, workers: int | None, parameter: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, ExtractionSummary]:
    """Features, labels and coordinates of the samples of one point set."""
    outputs = [folder / f"source{i + 1}.tif" for i in range(len(fm.sources))]
    kept_path = folder / "kept.gpkg"
    with respelled({"vec": parameter, "grid.factor": "output.spcscale"}):
        summary = extract_patches(
            fm.sources, points, field_name, outputs, points_out=kept_path,
            pixel_types=[_extraction_type(s) for s in fm.sources], factor=fm.spcscale,
            quiet=quiet, scheduler=scheduler, workers=workers)
    import pyogrio

    _, _, _, columns = pyogrio.raw.read(kept_path, columns=["feature"], read_geometry=False)
    kept = np.asarray(columns[0], dtype=np.int64)
    infos = [read_patches_info(p) for p in outputs]
    chunk = fm.batch_size()
    features = np.empty((len(kept), fm.channels), dtype=np.float32)
    for a in range(0, len(kept), chunk):
        count = min(chunk, len(kept) - a)
        patches = [read_patches(p, a, count, info) for p, info in zip(outputs, infos,
                                                                          strict=True)]
        features[a:a + count] = fm.features(patches)
    for p in [*outputs, kept_path]:
        p.unlink()
    return features, points.labels[kept], points.x[kept], points.y[kept], summary


def sample_features(
    model: FeatureModel,
    vector: PathLike | PointSet | Sequence[PathLike | PointSet],
    field: str,
    reproject: bool = False,
    quiet: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
    parameter: str = "vec",
) -> FeatureSamples:
    """Features of the model at labelled points.

    Each point's patches are those :func:`~terrapatch.extraction.extract_patches`
    cuts with the model's receptive fields on the sampling grid of factor
    ``model.spcscale``: exactly what patch-based serving feeds for the output pixel
    containing the point (invariant I2). Samples whose patch leaves a source, or
    holds a source's nodata value, are dropped, as in extraction.

    Parameters
    ----------
    model
        The feature model (:func:`open_feature_model`).
    vector
        Point file(s) or :class:`~terrapatch.vector.PointSet` (source 1's CRS).
    field
        Integer class field.
    reproject
        Reproject points in another CRS instead of failing.
    quiet
        No progress bar.
    scheduler, workers
        Read the patches on a Dask cluster (see :func:`extract_patches`); the model
        runs here.
    parameter
        Parameter naming the vector file in errors.

    Raises
    ------
    NoSamplesError
        If no sample survives.
    """
    vectors = [vector] if isinstance(vector, str | os.PathLike | PointSet) else list(vector)
    if not vectors:
        raise InputError(f"{parameter}: no vector file given")
    crs = model.sources[0].grid.crs
    parts: list[tuple[np.ndarray, ...]] = []
    summaries = []
    with tempfile.TemporaryDirectory(prefix="terrapatch-deepfeatures-") as tmp:
        for v in vectors:
            points = v if isinstance(v, PointSet) else read_points(
                v, field, crs=crs, reproject=reproject, parameter=parameter)
            *arrays, summary = _sample_one(model, points, field, Path(tmp), quiet, scheduler,
                                           workers, parameter)
            parts.append(tuple(arrays))  # type: ignore[arg-type]
            summaries.append(summary)
    features, labels, xs, ys = (np.concatenate([p[k] for p in parts]) for k in range(4))
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise ModelError(f"output.names: feature output {model.output!r} gives NaN or "
                         f"infinite values for {bad} sample(s)")
    logger.info("deep features: %d sample(s) × %d feature(s) from %r", len(labels),
                model.channels, model.output)
    return FeatureSamples(features, labels.astype(np.int64), xs, ys, model.output,
                          tuple(summaries))


# ---------------------------------------------------------------------- training


def _estimator(name: str, params: Mapping[str, Any], seed: int) -> Any:
    """A new scikit-learn classifier for a :data:`CLASSIFIERS` name."""
    _classical(f"classifier {name!r}")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    kwargs = dict(params)
    try:
        if name == "rf":
            kwargs = {"n_estimators": 100, "n_jobs": 1, "random_state": seed, **kwargs}
            return RandomForestClassifier(**kwargs)
        if name == "dt":
            return DecisionTreeClassifier(**{"random_state": seed, **kwargs})
        if name == "svm":  # features on very different scales: standardised first
            return make_pipeline(StandardScaler(), SVC(**{"random_state": seed, **kwargs}))
        if name == "knn":
            return make_pipeline(StandardScaler(), KNeighborsClassifier(**kwargs))
        if name == "bayes":
            return GaussianNB(**kwargs)
    except TypeError as exc:
        raise InputError(f"classifier: {name}: {exc}") from None
    raise InputError(f"classifier: {name!r} is not one of {', '.join(CLASSIFIERS)} "
                     "(or a scikit-learn classifier)")


def train_classifier(features: np.ndarray, labels: np.ndarray, classifier: Any = "rf",
                     params: Mapping[str, Any] | None = None, seed: int = 0) -> Any:
    """Fit a classifier on feature vectors.

    Parameters
    ----------
    features
        ``(n, C)`` feature vectors.
    labels
        ``(n,)`` integer classes (at least two distinct).
    classifier
        ``"rf"`` (random forest, 100 trees), ``"svm"`` (RBF SVM on standardised
        features), ``"knn"`` (k nearest neighbours on standardised features), ``"dt"``
        (decision tree), ``"bayes"`` (Gaussian naive Bayes), or a scikit-learn
        classifier instance (cloned, then fitted).
    params
        Keyword arguments of the scikit-learn estimator (``{"n_estimators": 200}``,
        ``{"C": 10}``); not with an instance.
    seed
        ``random_state`` of the estimators that take one.

    Returns
    -------
    estimator
        The fitted scikit-learn estimator.

    Raises
    ------
    InputError
        For mismatched or non-finite inputs, a single class, or an unknown classifier.
    """
    x = _as_features(np.asarray(features))
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise InputError(f"features: shape {x.shape} does not fit labels of shape {y.shape} "
                         "(expected (n, C) and (n,))")
    if x.shape[0] == 0:
        raise InputError("features: no sample to train on")
    if not np.isfinite(x).all():
        raise InputError("features: NaN or infinite values")
    if y.dtype.kind not in "iu":
        raise InputError(f"labels: classes must be integers, got {y.dtype.name}")
    info = np.iinfo(np.int32)
    if y.min() < info.min or y.max() > info.max:
        raise InputError("labels: classes must fit a 32-bit integer")
    if len(np.unique(y)) < 2:
        raise InputError(f"labels: only one class ({int(y[0])}) among the {len(y)} samples; "
                         "a classifier needs at least two")
    if isinstance(classifier, str):
        estimator = _estimator(classifier.lower(), params or {}, seed)
    else:
        _classical("classifier")
        from sklearn.base import clone, is_classifier

        if params:
            raise InputError("params: give the parameters in the classifier instance")
        if not is_classifier(classifier):
            raise InputError(f"classifier: {type(classifier).__name__} is not a scikit-learn "
                             "classifier")
        estimator = clone(classifier)
    try:
        estimator.fit(x, y.astype(np.int64))
        estimator.predict(x[:1])  # e.g. k nearest neighbours with k > samples fails here
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "ValueError"
        raise InputError(f"classifier: cannot train on {len(y)} samples × {x.shape[1]} "
                         f"features: {reason}") from None
    return estimator


# ---------------------------------------------------------------------- saving and loading


@dataclass(frozen=True)
class ClassifierBundle:
    """A fitted classifier and what its features are.

    Attributes
    ----------
    estimator
        The fitted scikit-learn classifier.
    n_features
        Length of the feature vectors it was trained on.
    feature_output
        Name of the model output the features came from.
    classes
        Its classes, in its order.
    fields
        Receptive field of each source at training (the classification default).
    spcscale
        Sampling-grid factor at training.
    classifier
        The classifier's name (``"rf"``) or class name.
    terrapatch_version
        Version that trained it.
    """

    estimator: Any
    n_features: int
    feature_output: str
    classes: tuple[int, ...]
    fields: tuple[tuple[int, int], ...] = ()
    spcscale: int = 1
    classifier: str = "rf"
    terrapatch_version: str = terrapatch.__version__

    @classmethod
    def of(cls, estimator: Any, model: FeatureModel, classifier: Any = "rf"
           ) -> ClassifierBundle:
        """The bundle of an estimator fitted on ``model``'s features."""
        name = classifier if isinstance(classifier, str) else type(classifier).__name__
        return cls(estimator, model.channels, model.output,
                   tuple(int(c) for c in estimator.classes_), model.fields, model.spcscale,
                   name)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class of each feature vector ``(n, C)`` → ``(n,)`` int32."""
        x = _as_features(features)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InputError(f"features: shape {x.shape}; the classifier takes "
                             f"(n, {self.n_features})")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.int32)
        return np.asarray(self.estimator.predict(x)).astype(np.int32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of each class (in :attr:`classes` order) → ``(n, K)`` float32."""
        x = _as_features(features)
        if not hasattr(self.estimator, "predict_proba"):
            raise InputError(f"classifier: {self.classifier} gives no class probabilities")
        if x.shape[0] == 0:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        return np.asarray(self.estimator.predict_proba(x), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The dict saved in the skops file (plain Python and scikit-learn objects only)."""
        return {"format": BUNDLE_FORMAT, "estimator": self.estimator,
                "n_features": int(self.n_features), "feature_output": str(self.feature_output),
                "classes": [int(c) for c in self.classes],
                "fields": [[int(a), int(b)] for a, b in self.fields],
                "spcscale": int(self.spcscale), "classifier": str(self.classifier),
                "terrapatch_version": str(self.terrapatch_version)}


def trusted_type(name: str) -> bool:
    """Whether a type named in a skops file may be loaded: a scikit-learn or NumPy class.

    The name must resolve, in an already importable module of those packages, to a
    class (not a function or any other object).
    """
    module, _, attr = name.rpartition(".")
    if not module or module.split(".")[0] not in TRUSTED_MODULES:
        return False
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    return isinstance(obj, type)


def _untrusted(types: Sequence[str]) -> list[str]:
    return sorted(t for t in types if not trusted_type(t))


def save_classifier(bundle: ClassifierBundle, path: PathLike, parameter: str = "out") -> Path:
    """Write the bundle as a skops file, atomically; return its path.

    Raises
    ------
    InputError
        If the estimator holds types :func:`load_classifier` would refuse (not
        scikit-learn or NumPy classes).
    """
    _, sio = _classical(f"{parameter}: saving a classifier")
    data = sio.dumps(bundle.to_dict())
    refused = _untrusted(sio.get_untrusted_types(data=data))
    if refused:
        raise InputError(f"{parameter}: the classifier holds types terrapatch refuses to load "
                         f"({', '.join(refused)}); use scikit-learn estimators")
    with atomic_output(path, parameter) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def _bundle_error(parameter: str, path: PathLike, why: str) -> InputError:
    return InputError(f"{parameter}: {os.fspath(path)!r} is not a terrapatch classifier "
                      f"({why})")


def load_classifier(path: PathLike, parameter: str = "classifier") -> ClassifierBundle:
    """Load a classifier saved by :func:`save_classifier`, safely.

    The file is read with :func:`skops.io.load`; it is loaded only when every type it
    holds beyond skops' own defaults is a scikit-learn or NumPy class
    (:func:`trusted_type`). Anything else (a class of another package, a function) is
    refused before any object is built. Pickles are never loaded.

    Raises
    ------
    MissingInputError
        If the file does not exist.
    InputError
        For a file that is not a skops file, holds an untrusted type, or is not a
        terrapatch classifier.
    """
    _, sio = _classical(f"{parameter}: loading a classifier")
    text = os.fspath(path)
    if not os.path.isfile(text):
        what = "is a directory" if os.path.isdir(text) else "does not exist"
        raise MissingInputError(f"{parameter}: classifier {text!r} {what}")
    try:
        types = list(sio.get_untrusted_types(file=text))
    except Exception as exc:  # zipfile.BadZipFile, KeyError, JSON errors: not a skops file
        raise _bundle_error(parameter, text, f"not a skops file: {type(exc).__name__}") \
            from None
    refused = _untrusted(types)
    if refused:
        raise InputError(
            f"{parameter}: {text!r} holds types terrapatch does not load: {', '.join(refused)} "
            "(only scikit-learn and NumPy classes are trusted); it was not loaded"
        )
    try:
        data = sio.load(text, trusted=types)
    except Exception as exc:
        raise _bundle_error(parameter, text, f"skops cannot load it: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise _bundle_error(parameter, text, "no terrapatch bundle inside")
    estimator = data.get("estimator")
    from sklearn.base import is_classifier

    if not is_classifier(estimator) or not hasattr(estimator, "classes_"):
        raise _bundle_error(parameter, text, "its estimator is not a fitted classifier")
    try:
        bundle = ClassifierBundle(
            estimator, int(data["n_features"]), str(data["feature_output"]),
            tuple(int(c) for c in data["classes"]),
            tuple((int(a), int(b)) for a, b in data.get("fields", ())),
            int(data.get("spcscale", 1)), str(data.get("classifier", "")),
            str(data.get("terrapatch_version", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise _bundle_error(parameter, text, f"bad entry {exc}") from None
    n_in = getattr(estimator, "n_features_in_", bundle.n_features)
    if int(n_in) != bundle.n_features:
        raise _bundle_error(parameter, text, f"its estimator takes {n_in} features, the "
                            f"bundle says {bundle.n_features}")
    return bundle


_BUNDLES: dict[str, tuple[tuple[int, int], ClassifierBundle]] = {}
_BUNDLES_LOCK = threading.Lock()


def _stamp(path: str, parameter: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        raise ModelError(f"{parameter}: classifier {path!r} does not exist on "
                         f"{worker_name()} (it must be visible to every worker at the same "
                         "path)") from None
    return (stat.st_mtime_ns, stat.st_size)


def cached_classifier(path: str, stamp: tuple[int, int] | None = None,
                      parameter: str = "classifier") -> ClassifierBundle:
    """The classifier at ``path``, loaded once per process (again when the file changes).

    With ``stamp`` (``(mtime_ns, size)`` seen when the run started), a file changed
    since is an error: every tile of a map must come from the same classifier.
    """
    current = _stamp(path, parameter)
    if stamp is not None and tuple(stamp) != current:
        raise ModelError(f"{parameter}: classifier {path!r} changed since the run started "
                         f"(on {worker_name()})")
    with _BUNDLES_LOCK:
        cached = _BUNDLES.get(path)
        if cached is not None and cached[0] == current:
            return cached[1]
    bundle = load_classifier(path, parameter)
    with _BUNDLES_LOCK:
        _BUNDLES[path] = (current, bundle)
    return bundle


# ---------------------------------------------------------------------- the classifier engine


def check_feature_size(bundle: ClassifierBundle, channels: int, output: str,
                       parameter: str = "classifier") -> None:
    """Refuse a classifier trained on another number of features than the model gives."""
    if channels != bundle.n_features:
        raise InputError(
            f"{parameter}: the classifier was trained on {bundle.n_features} features "
            f"(output {bundle.feature_output!r}), but output.names {output!r} gives "
            f"{channels} per pixel"
        )


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
    parameter
        Parameter naming the classifier in errors.
    """

    kind = "deep-features classifier"

    def __init__(self, inner: Engine, bundle: ClassifierBundle, feature_output: str | None = None,
                 parameter: str = "classifier") -> None:
        output = inner.resolve_output(feature_output or bundle.feature_output, "output.names")
        _check_rank(inner, output)
        info = inner.outputs[output]
        static = None if info.shape is None else info.shape[-1]
        if static is not None:
            check_feature_size(bundle, int(static), output, parameter)
        spatial: tuple[int | None, ...] = (None, None, None) if info.rank != 2 else (None,)
        outputs = {CLASSES_OUTPUT: TensorInfo(CLASSES_OUTPUT, (*spatial, 1), np.dtype("int32"))}
        if hasattr(bundle.estimator, "predict_proba"):
            outputs[PROBABILITIES_OUTPUT] = TensorInfo(
                PROBABILITIES_OUTPUT, (*spatial, len(bundle.classes)), np.dtype("float32"))
        super().__init__(inner.path, inner.inputs, outputs)
        self.inner = inner
        self.bundle = bundle
        self.feature_output = output
        self.parameter = parameter

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        array = np.asarray(self.inner.run(feed, [self.feature_output])[self.feature_output])
        if array.ndim not in (2, 4):
            raise ModelError(f"output.names: feature output {self.feature_output!r} gave shape "
                             f"{tuple(array.shape)}; expected rank 4 [N, H, W, C] or 2 [N, C]")
        lead, channels = array.shape[:-1], int(array.shape[-1])
        check_feature_size(self.bundle, channels, self.feature_output, self.parameter)
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
    parameter
        Parameter naming the classifier in errors.
    """

    classifier: str
    feature_output: str
    model_layout: str = "nhwc"
    stamp: tuple[int, int] | None = None
    parameter: str = "classifier"

    def __call__(self, engine: Engine) -> Engine:
        """The classifier engine over ``engine``."""
        bundle = cached_classifier(self.classifier, self.stamp, self.parameter)
        return ClassifierEngine(with_layout(engine, self.model_layout), bundle,
                                self.feature_output, self.parameter)


# ---------------------------------------------------------------------- training run


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
        raise InputError("sample.mt: 0 samples per class leaves nothing to train on "
                         "(-1: every sample)")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(samples.labels):
        idx = np.flatnonzero(samples.labels == c)
        keep.append(idx if len(idx) <= limit else rng.choice(idx, limit, replace=False))
    order = np.sort(np.concatenate(keep))
    if len(order) == len(samples):
        return samples
    logger.info("sample.mt: %d of %d samples kept (at most %d per class)", len(order),
                len(samples), limit)
    return FeatureSamples(samples.features[order], samples.labels[order], samples.x[order],
                          samples.y[order], samples.feature_output, samples.extraction)


def _inputs(sources: Sequence[Source], model: Any, model_parameter: str) -> dict[str, Any]:
    inputs: dict[str, Any] = {f"{s.name}.il": s.paths for s in sources if isinstance(s, Source)}
    if isinstance(model, str | os.PathLike):
        inputs[model_parameter] = model
    return inputs


def _vector_inputs(vector: Any, parameter: str) -> dict[str, Any]:
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
    names: Mapping[str, str] | None = None,
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
    names
        Parameter names in errors, by role: ``vector``, ``valid``, ``model``, ``out``
        (defaults ``vec``, ``valid``, ``model.dir``, ``out``).

    Returns
    -------
    TrainSummary
    """
    start = time.perf_counter()
    names = {"vector": "vec", "valid": "valid", "model": "model.dir", "out": "out",
             **(names or {})}
    inputs = {**_inputs(sources, model, names["model"]),
              **_vector_inputs(vector, names["vector"]),
              **_vector_inputs(valid, names["valid"])}
    _classical(f"{names['out']}: training a classifier")
    with claim_outputs({names["out"]: Output(out, "classifier")}, inputs):
        fm = open_feature_model(sources, model, feature_output, spcscale, user_placeholders,
                                model_layout, model_parameter=names["model"])
        samples = sample_features(fm, vector, field, reproject, quiet, scheduler, workers,
                                  names["vector"])
        samples = _cap_per_class(samples, max_per_class, seed)
        estimator = train_classifier(samples.features, samples.labels, classifier, params, seed)
        bundle = ClassifierBundle.of(estimator, fm, classifier)
        training = Validation.of(samples.labels, bundle.predict(samples.features))
        validation = None
        if valid is not None:
            checks = sample_features(fm, valid, field, reproject, quiet, scheduler, workers,
                                     names["valid"])
            validation = Validation.of(checks.labels, bundle.predict(checks.features))
            logger.info("validation: overall accuracy %.4f, kappa %.4f on %d sample(s)",
                        validation.overall_accuracy, validation.kappa, validation.n)
        path = save_classifier(bundle, out, names["out"])
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
    classifier_parameter: str = "classifier",
    model_parameter: str = "model.dir",
) -> ServeJob:
    """Validate a classification run and plan its tiles (a :class:`~terrapatch.serve.ServeJob`).

    Parameters are those of :func:`classify`. The job's runner carries a
    :class:`ClassifierWrapper`, so that Dask workers classify as this process does.
    """
    text = os.fspath(classifier)
    bundle = load_classifier(text, classifier_parameter)
    sources = _fields_for(list(sources), bundle)
    fm = open_feature_model(sources, model, feature_output or bundle.feature_output,
                            bundle.spcscale if spcscale is None else spcscale,
                            user_placeholders, model_layout, model_parameter=model_parameter)
    if fm.output != bundle.feature_output:
        logger.warning("output.names: classifying features of %r with a classifier trained "
                       "on %r", fm.output, bundle.feature_output)
    check_feature_size(bundle, fm.channels, fm.output, classifier_parameter)
    engine = ClassifierEngine(fm.engine, bundle, fm.output, classifier_parameter)
    wanted = [outputs] if isinstance(outputs, str) else list(outputs)
    for name in wanted:
        engine.resolve_output(name, "outputs")
    job = prepare_serve(list(fm.sources), model, output_names=wanted, fullyconv=fullyconv,
                        spcscale=fm.spcscale, efield=efield, tile_size=tile_size, box=box,
                        user_placeholders=user_placeholders, disable_tiling=disable_tiling,
                        engine=engine, model_layout="nhwc")
    path = os.path.abspath(text)
    job.runner.engine_wrappers.append(ClassifierWrapper(
        path, fm.output, fm.model_layout, _stamp(path, classifier_parameter),
        classifier_parameter))
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
    classifier_parameter: str = "classifier",
    model_parameter: str = "model.dir",
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
    classifier_parameter, model_parameter
        Parameter names of the classifier and of the model in errors.

    Returns
    -------
    ServeSummary
    """
    from terrapatch import cluster

    dtype = pixel_dtype(pixel_type, parameter="out (pixel type)")
    inputs = {**_inputs(sources, model, model_parameter), classifier_parameter: classifier}
    # Before anything loads: no input replaced, the right extension, valid options.
    check_outputs({"out": Output(out, "map", output_format, dict(creation_options or {}))},
                  inputs)

    def run(client: Any) -> ServeSummary:
        job = prepare_classify(sources, model, classifier, feature_output, fullyconv, spcscale,
                               efield, tile_size, box, user_placeholders, disable_tiling,
                               model_layout, outputs, classifier_parameter, model_parameter)
        if client is not None:
            cluster.check_worker_paths(client, [os.path.abspath(os.fspath(classifier))],
                                       {os.path.abspath(os.fspath(classifier)):
                                        classifier_parameter})
        return job.run(out, dtype, background=background, creation_options=creation_options,
                       quiet=quiet, scheduler=client, output_format=output_format)

    if scheduler is None and workers is None:
        return run(None)
    with cluster.client_for(scheduler, workers) as client:
        return run(client)
