"""ModelBase: a Keras 3 functional model built from a dataset's element spec (OTBTF's).

A subclass implements :meth:`ModelBase.get_outputs` (and usually
:meth:`ModelBase.normalize_inputs`); the base class creates one ``keras.Input`` per
dataset input with free rows and columns (so the trained model runs on any spatial
size when served), adds cropped copies of the image outputs for serving
(``<key>_crop<N>``), and wraps everything into ``self.model``, a
:class:`keras.Model` whose outputs are the dict keys returned by ``get_outputs``.
Unknown attributes (``compile``, ``fit``, ``save``, ``summary``, ...) are forwarded
to that Keras model.

The model is built with Keras layers and ``keras.ops`` only, so it trains under any
Keras 3 backend (``KERAS_BACKEND`` tensorflow, torch or jax), fed by a ``tf.data``
dataset or by the numpy batches of
:meth:`terrapatch.dataset.DatasetFromPatchesImages.get_keras_dataset`; its ``.keras``
file loads under every backend (serving and export load it under TensorFlow).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from terrapatch._optional import tensorflow_startup
from terrapatch.errors import InputError, MissingInputError, ModelError

with tensorflow_startup():
    import keras

__all__ = [
    "DEFAULT_INFERENCE_CROPPING",
    "ModelBase",
    "allow_outputs_without_targets",
    "cropped_tensor_name",
    "load_model",
]

log = logging.getLogger(__name__)

#: Crops added by :meth:`ModelBase.postprocess_outputs` when none are given.
DEFAULT_INFERENCE_CROPPING: tuple[int, ...] = (16, 32, 64, 96, 128)


def cropped_tensor_name(name: str, crop: int) -> str:
    """Return the name of the cropped copy of output ``name``: ``f"{name}_crop{crop}"``."""
    return f"{name}_crop{crop}"


def _inputs_spec(dataset_element_spec: Any) -> Mapping[str, Any]:
    spec = dataset_element_spec
    if isinstance(spec, tuple | list):
        if not spec:
            raise InputError("dataset_element_spec: empty tuple")
        spec = spec[0]
    if not isinstance(spec, Mapping) or not spec:
        raise InputError(
            "dataset_element_spec: expected the element_spec of a dataset built with "
            "targets_keys, i.e. a tuple (inputs dict, targets dict), got "
            f"{type(dataset_element_spec).__name__}"
        )
    return spec


def _outputs_with_targets(y: Any, y_pred: Any) -> Any:
    """Return the part of ``y_pred`` that has a target in ``y`` (dicts), else ``y_pred``."""
    if isinstance(y, Mapping) and isinstance(y_pred, Mapping) and set(y) < set(y_pred):
        return {key: value for key, value in y_pred.items() if key in y}
    return y_pred


def allow_outputs_without_targets(model: keras.Model) -> keras.Model:
    """Let ``model`` compute its compiled metrics on the outputs that have a target.

    Keras 3 requires a target for every output of a multi-output model as soon as
    metrics are compiled, even when ``metrics`` names only some outputs; a
    :class:`ModelBase` model has extra outputs (class ids, features, cropped copies)
    that never have one. This replaces ``compute_metrics`` on this instance only (the
    loss already ignores outputs without a target): the model stays a plain
    functional model, so its ``.keras`` files load without terrapatch's model code.
    :func:`load_model` applies it again when it restores the compiled state.

    Returns
    -------
    keras.Model
        The same model.
    """
    compute_metrics = model.compute_metrics

    def compute_metrics_on_targets(x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        return compute_metrics(x, y, _outputs_with_targets(y, y_pred), sample_weight)

    model.compute_metrics = compute_metrics_on_targets
    return model


class ModelBase(abc.ABC):
    """Base class of terrapatch models: dataset spec in, Keras functional model out.

    Parameters
    ----------
    dataset_element_spec
        ``element_spec`` of the batched training dataset: a tuple ``(inputs, targets)``
        of dicts of ``tf.TensorSpec`` (as built by ``get_tf_dataset(...,
        targets_keys=...)``) or of :class:`keras.KerasTensor` (``get_keras_dataset``);
        a dict of input specs is accepted too, and any spec with a ``shape``. The
        first axis of every spec is the batch axis.
    input_keys
        Keys of the inputs to create (default: every key of the inputs spec).
    inference_cropping
        Crops for the extra ``<key>_crop<N>`` outputs (default
        ``[16, 32, 64, 96, 128]``; an empty list also means the default, as in OTBTF).

    Attributes
    ----------
    model : keras.Model
        The functional model, named after the subclass.

    Notes
    -----
    Inputs are float32 ``keras.Input`` s named after their dataset key; the per-sample
    shape is the spec's without the batch axis, with rows and columns set to None for
    inputs of rank 3 or more. Raw values are cast to float32 on entry; cast or scale
    them in :meth:`normalize_inputs`, which is part of the model and so applies
    identically when serving.
    """

    def __init__(
        self,
        dataset_element_spec: Any,
        input_keys: Sequence[str] | None = None,
        inference_cropping: Sequence[int] | None = None,
    ) -> None:
        spec = _inputs_spec(dataset_element_spec)
        if input_keys is None:
            input_keys = list(spec)
        else:
            input_keys = list(input_keys)
            missing = [key for key in input_keys if key not in spec]
            if missing:
                raise InputError(
                    f"input_keys: {missing} not in the dataset inputs {sorted(spec)}"
                )
        if not input_keys:
            raise InputError("input_keys: no input to create")
        self.dataset_input_keys = input_keys
        self.dataset_shapes = {
            key: self._per_sample_shape(key, spec[key]) for key in input_keys
        }
        crops = list(inference_cropping or DEFAULT_INFERENCE_CROPPING)
        for crop in crops:
            if isinstance(crop, bool) or int(crop) != crop or crop <= 0:
                raise InputError(
                    f"inference_cropping: {crop!r} is not a positive integer "
                    f"(got {list(inference_cropping or [])})"
                )
        self.inference_cropping = [int(c) for c in crops]
        self.model: keras.Model = self.create_network()

    @staticmethod
    def _per_sample_shape(key: str, tensor_spec: Any) -> tuple[int | None, ...]:
        shape = getattr(tensor_spec, "shape", None)
        if shape is None:
            raise InputError(f"dataset_element_spec[{key!r}]: not a tensor spec")
        dims = list(shape.as_list() if hasattr(shape, "as_list") else shape)
        if not dims:
            raise InputError(
                f"dataset_element_spec[{key!r}]: scalar spec; expected a batched dataset "
                "(first axis = batch)"
            )
        # Like OTBTF: the spec is a batched dataset's, the first axis is the batch.
        return tuple(dims[1:])

    def __getattr__(self, name: str) -> Any:
        """Forward unknown attributes (``fit``, ``compile``, ``save``, ...) to ``self.model``."""
        if name == "model" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    # -- building ---------------------------------------------------------------------

    def get_inputs(self) -> dict[str, keras.KerasTensor]:
        """Create one float32 ``keras.Input`` per input key, rows and columns free."""
        inputs = {}
        for key in self.dataset_input_keys:
            shape = list(self.dataset_shapes[key])
            if len(shape) >= 3:
                shape[0] = shape[1] = None
            inputs[key] = keras.Input(shape=tuple(shape), name=key)
        return inputs

    def normalize_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Return the inputs as the network expects them (default: unchanged).

        Override to cast and scale, e.g.
        ``{k: keras.ops.cast(v, "float32") * 1e-4 for k, v in inputs.items()}``.
        """
        log.warning("ModelBase.normalize_inputs is not overridden: inputs are not normalized")
        return dict(inputs)

    @abc.abstractmethod
    def get_outputs(self, normalized_inputs: dict[str, Any]) -> dict[str, Any]:
        """Build the network and return its outputs as a dict ``{key: tensor}``.

        The keys become the model's output names (and the SavedModel/ONNX output
        names); they must include the target keys used by the loss.
        """

    def postprocess_outputs(
        self,
        outputs: dict[str, Any],
        inputs: dict[str, Any] | None = None,
        normalized_inputs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return extra outputs: ``<key>_crop<N>`` for every rank-4 output and crop.

        Each is the output without ``N`` pixels on every side (empty when the output
        is smaller than ``2·N``, e.g. during training on small patches), for serving
        with ``receptive field − expression field = 2·N``. Outputs of other ranks get
        no cropped copies.
        """
        # Imported here: terrapatch.layers registers the layers that saved models need.
        from terrapatch.layers import CropBorder

        extra: dict[str, Any] = {}
        for key, tensor in outputs.items():
            if len(tensor.shape) != 4:
                continue
            for crop in self.inference_cropping:
                name = cropped_tensor_name(key, crop)
                if name in outputs:
                    continue
                extra[name] = CropBorder(crop, name=name)(tensor)
        return extra

    def create_network(self) -> keras.Model:
        """Build ``inputs → normalize_inputs → get_outputs → postprocess_outputs`` as a model."""
        inputs = self.get_inputs()
        normalized = self.normalize_inputs(dict(inputs))
        outputs = self.get_outputs(normalized)
        if not isinstance(outputs, Mapping) or not outputs:
            raise ModelError(
                f"{type(self).__name__}.get_outputs must return a non-empty dict of "
                f"tensors, got {type(outputs).__name__}"
            )
        outputs = dict(outputs)
        extra = self.postprocess_outputs(outputs, inputs=inputs, normalized_inputs=normalized)
        clash = sorted(set(extra) & set(outputs))
        if clash:
            raise ModelError(f"postprocess_outputs: keys {clash} already used by get_outputs")
        all_outputs = {**outputs, **extra}
        self._output_keys = list(all_outputs)
        model = keras.Model(inputs=inputs, outputs=all_outputs, name=type(self).__name__)
        return allow_outputs_without_targets(model)

    # -- conveniences -----------------------------------------------------------------

    @property
    def output_keys(self) -> list[str]:
        """Names of the model outputs (the dict keys), in order."""
        return list(self._output_keys)

    def summary(self, strategy: Any = None, **kwargs: Any) -> None:
        """Print the Keras summary (on the chief worker only when ``strategy`` is given)."""
        if strategy is not None and not _is_chief(strategy):
            return
        self.model.summary(**kwargs)

    def plot(self, output_path: str | os.PathLike[str], strategy: Any = None,
             show_shapes: bool = False) -> None:
        """Plot the model graph to ``output_path`` (needs pydot and graphviz)."""
        if strategy is not None and not _is_chief(strategy):
            return
        keras.utils.plot_model(self.model, os.fspath(output_path), show_shapes=show_shapes)


def _is_chief(strategy: Any) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    return getattr(resolver, "task_type", None) in (None, "chief") or \
        (getattr(resolver, "task_type", None) == "worker" and resolver.task_id == 0)


def load_model(path: str | os.PathLike[str], safe_mode: bool = True,
               compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model that may use terrapatch layers and metrics.

    Parameters
    ----------
    path
        ``.keras`` file written by ``model.save`` or ``keras.callbacks.ModelCheckpoint``.
    safe_mode
        Keras safe mode (no arbitrary code deserialized); terrapatch objects are
        registered, so they load in safe mode.
    compile
        Restore the optimizer, loss and metrics too.

    Raises
    ------
    MissingInputError
        If the file does not exist.
    ModelError
        If Keras cannot load it.
    """
    import terrapatch.layers  # registers the layers
    import terrapatch.metrics  # noqa: F401  (registers the metrics)

    if not os.path.exists(path):
        raise MissingInputError(f"model: file {os.fspath(path)!r} does not exist")
    try:
        model = keras.saving.load_model(path, safe_mode=safe_mode, compile=compile)
    except Exception as exc:  # Keras raises ValueError, TypeError, OSError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model: cannot load {os.fspath(path)!r}: {first}") from exc
    return allow_outputs_without_targets(model) if compile else model
