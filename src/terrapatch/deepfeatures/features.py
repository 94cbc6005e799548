"""Deep features at labelled points: bind a model to sources, one vector per patch.

Errors and log records name parameters by their neutral identifiers
(:mod:`terrapatch.spelling`): ``model``, ``feature_output``, ``spcscale``,
``user_placeholders``, ``vector``, ``field``, ``source1.patch_size``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.deepfeatures._common import FEATURE_BATCH, FEATURE_BATCH_BYTES, PathLike
from terrapatch.engines import Engine, load_engine
from terrapatch.errors import (
    InputError,
    ModelError,
)
from terrapatch.extraction import ExtractionSummary, extract_patches
from terrapatch.patches import read_patches, read_patches_info
from terrapatch.progress import logger
from terrapatch.raster import Source, check_sources
from terrapatch.scales import check_factor
from terrapatch.serve import derive_geometry
from terrapatch.serve.binding import resolve_inputs, resolve_outputs
from terrapatch.serve.layouts import detect_layout, with_layout
from terrapatch.spelling import respelled
from terrapatch.vector import PointSet, read_points
from terrapatch.writer import (
    PIXEL_TYPES,
)

#: Serving names the model outputs ``output_names``; the feature model has one of them.
_OUTPUT_IS_FEATURE_OUTPUT = {"output_names": "feature_output"}
#: The extraction core's sampling-grid factor, as :func:`sample_features` calls it.
_EXTRACTION_NAMES = {"factor": "spcscale"}


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
        Constant extra inputs (``user_placeholders``).
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
            f"feature_output: {output!r} gives shape {shape} for {n} patch(es); a feature "
            "output must give one vector per patch, [N, 1, 1, C] (channels last) or [N, C]: "
            "give the receptive fields (sourceK.patch_size) at which the model emits one "
            "pixel per patch, or another output"
        )
    flat = array.reshape(n, shape[-1])
    if channels is not None and flat.shape[1] != channels:
        raise ModelError(f"feature_output: {output!r} gives {flat.shape[1]} features per "
                         f"patch, {channels} on an earlier batch")
    return flat


def _check_rank(engine: Engine, output: str) -> None:
    """Refuse a feature output whose static rank is neither 4 nor 2."""
    info = engine.outputs[output]
    if info.rank not in (None, 2, 4):
        raise ModelError(
            f"feature_output: {info.describe()} has rank {info.rank}; a feature output must "
            "be [N, 1, 1, C] per patch (rank 4, channels last) or [N, C] (rank 2)"
        )


def _with_fields(sources: Sequence[Source], fields: Sequence[tuple[int, int]]) -> list[Source]:
    """Copies of the sources with their patch size set to the receptive fields."""
    out = []
    for source, rf in zip(sources, fields, strict=True):
        copied = copy.copy(source)
        copied.patch_size = (int(rf[0]), int(rf[1]))
        out.append(copied)
    return out


def _feature_output(engine: Engine, feature_output: str | Sequence[str] | None) -> str:
    """The one output giving the features, resolved and checked (default: the first)."""
    if feature_output is None or isinstance(feature_output, str):
        names = [feature_output] if feature_output else []
    else:
        names = [n for n in feature_output if n]
    if len(names) > 1:
        raise InputError(f"feature_output: one feature output is used, got {names}")
    with respelled(_OUTPUT_IS_FEATURE_OUTPUT):  # serving's output_names, here one output
        output = resolve_outputs(engine, names)[0]
    _check_rank(engine, output)
    return output


def open_feature_model(
    sources: Sequence[Source],
    model: Any,
    feature_output: str | Sequence[str] | None = None,
    spcscale: int = 1,
    user_placeholders: Mapping[str, Any] | None = None,
    model_layout: str | None = None,
    engine: Engine | None = None,
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
        The output giving the features; default: the first output in alphabetical order.
    spcscale
        Sampling-grid factor, as in serving (positive integer).
    user_placeholders
        Constant extra inputs, name → array.
    model_layout
        ``"nhwc"`` or ``"nchw"`` model tensors; None: detected, as in serving.
    engine
        An already loaded engine to use instead of opening ``model``.

    Raises
    ------
    ModelError
        For an unknown input or output name, a feature output whose rank is neither 4
        nor 2, or one that does not give one vector per patch at the receptive fields.
    """
    sources = check_sources(sources)
    spcscale = check_factor(spcscale, "spcscale")
    _ = [s.grid for s in sources]  # opens every source: missing files fail here
    if engine is None:
        engine = load_engine(model, "model")
    user_inputs = {engine.resolve_input(k, "user_placeholders"): np.asarray(v)
                   for k, v in (user_placeholders or {}).items()}
    input_names = resolve_inputs(engine, sources, user_inputs)
    layout = detect_layout(engine, sources, input_names, model_layout)
    engine = with_layout(engine, layout)
    output = _feature_output(engine, feature_output)
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
    bound = _with_fields(sources, fields)
    probe = {n: np.zeros((2, ry, rx, s.bands), dtype=engine.inputs[n].dtype)
             for n, s, (rx, ry) in zip(input_names, bound, fields, strict=True)}
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
                quiet: bool, scheduler: Any, workers: int | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, ExtractionSummary]:
    """Features, labels and coordinates of the samples of one point set."""
    outputs = [folder / f"source{i + 1}.tif" for i in range(len(fm.sources))]
    kept_path = folder / "kept.gpkg"
    with respelled(_EXTRACTION_NAMES):
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

    Raises
    ------
    NoSamplesError
        If no sample survives.
    """
    vectors = [vector] if isinstance(vector, str | os.PathLike | PointSet) else list(vector)
    if not vectors:
        raise InputError("vector: no vector file given")
    crs = model.sources[0].grid.crs
    parts: list[tuple[np.ndarray, ...]] = []
    summaries = []
    with tempfile.TemporaryDirectory(prefix="terrapatch-deepfeatures-") as tmp:
        for v in vectors:
            points = v if isinstance(v, PointSet) else read_points(
                v, field, crs=crs, reproject=reproject, parameter="vector")
            *arrays, summary = _sample_one(model, points, field, Path(tmp), quiet, scheduler,
                                           workers)
            parts.append(tuple(arrays))
            summaries.append(summary)
    features, labels, xs, ys = (np.concatenate([p[k] for p in parts]) for k in range(4))
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise ModelError(f"feature_output: {model.output!r} gives NaN or infinite values for "
                         f"{bad} sample(s)")
    logger.info("deep features: %d sample(s) × %d feature(s) from %r", len(labels),
                model.channels, model.output)
    return FeatureSamples(features, labels.astype(np.int64), xs, ys, model.output,
                          tuple(summaries))

