"""Export a trained ``.keras`` model for serving: TensorFlow SavedModel and ONNX.

Both exports keep the model's names: the inputs are the ``keras.Input`` names (the
dataset keys, e.g. ``input_10m``) and the outputs are the keys of the dict returned
by :meth:`terrapatch.model.ModelBase.get_outputs` (e.g. ``estimated_labels``), with
batch, rows and columns left dynamic. The SavedModel's ``serving_default`` signature
is what OTBTF's ``TensorflowModelServe`` reads; the ONNX file is converted with
tf2onnx from the same traced function, so the three agree numerically. Command
line: ``terrapatch export MODEL.keras --savedmodel DIR --onnx FILE``
(:mod:`terrapatch.cli.export`, which also records the serving contract). Exporting
needs the ``tensorflow`` extra (TensorFlow, Keras, tf2onnx, onnx); without it the
export fails in one line saying ``pip install 'terrapatch[tensorflow]'``.

Both exports trace the model with ``tf.function``, so they run under Keras's
TensorFlow backend only; a model trained under torch or jax is exported from its
``.keras`` file in a TensorFlow-backend process (``KERAS_BACKEND=tensorflow
terrapatch export MODEL.keras ...``), and an export asked for under another backend
fails in one line saying so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from terrapatch._optional import import_keras, import_tensorflow, require, tensorflow_startup
from terrapatch.engines import check_keras_file
from terrapatch.errors import (
    InputError,
    MissingEngineError,
    MissingInputError,
    ModelError,
)
from terrapatch.writer import (
    Output,
    atomic_directory,
    atomic_output,
    claim_outputs,
)

__all__ = ["export_model", "export_onnx", "export_savedmodel"]


def _tensorflow() -> Any:
    """TensorFlow, imported quietly, or a one-line error naming the ``tensorflow`` extra."""
    return import_tensorflow("export: exporting a model", error=MissingEngineError)


def _backend_error(backend: str) -> ModelError:
    """Return the one-line error for an export asked for under Keras backend ``backend``."""
    return ModelError(
        "export: the SavedModel and ONNX exports need KERAS_BACKEND=tensorflow (this "
        f"process runs Keras on {backend}); save the model as .keras and run "
        "`KERAS_BACKEND=tensorflow terrapatch export MODEL.keras --savedmodel DIR "
        "--onnx FILE`"
    )


def _check_backend() -> None:
    """Fail in one line unless Keras runs on its TensorFlow backend in this process."""
    keras = import_keras("export: exporting a model", error=MissingEngineError)
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise _backend_error(backend)


def _input_signature(model: Any) -> list[Any]:
    """Return one ``tf.TensorSpec`` per model input, named after the input."""
    tf = _tensorflow()

    specs = []
    for tensor in model.inputs:
        name = tensor.name
        specs.append(tf.TensorSpec(shape=tuple(tensor.shape), dtype=tensor.dtype, name=name))
    return specs


def _serving_function(model: Any) -> Any:
    """Return a ``tf.function`` taking the inputs positionally, returning a dict of outputs."""
    tf = _tensorflow()

    specs = _input_signature(model)
    names = [spec.name for spec in specs]
    dict_inputs = isinstance(getattr(model, "input", None), dict)

    @tf.function(input_signature=specs)
    def serve(*args: Any) -> Any:
        inputs: Any = dict(zip(names, args, strict=True)) if dict_inputs else list(args)
        if not dict_inputs and len(args) == 1:
            inputs = args[0]
        outputs = model(inputs, training=False)
        if not isinstance(outputs, dict):
            flat = outputs if isinstance(outputs, list | tuple) else [outputs]
            outputs = dict(zip(model.output_names, flat, strict=True))
        return outputs

    return serve


def export_savedmodel(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a TensorFlow SavedModel directory at ``path`` (atomically).

    The ``serving_default`` signature takes the model inputs by name and returns the
    model outputs by key; an existing directory at ``path`` is replaced.

    Raises
    ------
    ModelError
        If Keras does not run on its TensorFlow backend in this process.
    """
    target = Path(path)
    tf = _tensorflow()
    _check_backend()

    serve = _serving_function(model)
    module = tf.Module()
    module.model = model  # tracks the variables
    module.serve = serve
    with atomic_directory(target, "savedmodel") as tmp:
        tf.saved_model.save(module, os.fspath(tmp),
                            signatures={"serving_default": serve.get_concrete_function()})
    return target


def export_onnx(model: Any, path: str | os.PathLike[str], opset: int | None = None) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically), converted by tf2onnx.

    tf2onnx converts the same traced function as the SavedModel export; terrapatch's
    :class:`terrapatch.layers.Argmax` uses ``tf.math.argmax`` under TensorFlow, which
    converts to ONNX ``ArgMax`` (Keras's own argmax adds bit operations ONNX lacks).

    Input names are the model input names, output names the output keys; batch, rows
    and columns are dynamic.

    Raises
    ------
    MissingEngineError
        If tf2onnx or onnx is missing (a :class:`ModelError`).
    ModelError
        If tf2onnx cannot convert an operation of the model, or Keras does not run on
        its TensorFlow backend in this process.
    """
    tf2onnx = _onnx_converter()
    _check_backend()
    serve = _serving_function(model)
    specs = _input_signature(model)
    with atomic_output(path, "onnx") as tmp:
        try:
            onnx_model, _ = tf2onnx.convert.from_function(
                serve, input_signature=specs, opset=opset, output_path=os.fspath(tmp)
            )
        except Exception as exc:
            raise ModelError(f"onnx: tf2onnx cannot convert the model: {exc}") from exc
        _check_onnx_graph(onnx_model)
    return Path(path)


def _onnx_converter() -> Any:
    """``tf2onnx`` (with ``onnx``), imported quietly, or a one-line error naming the extra."""
    require("onnx", "onnx: exporting to ONNX", also=("tf2onnx",), error=MissingEngineError)
    return require("tf2onnx", "onnx: exporting to ONNX", error=MissingEngineError)


def _check_onnx_graph(onnx_model: Any) -> None:
    """Fail when tf2onnx left TensorFlow operations it could not convert in the graph."""
    onnx = require("onnx", "onnx: checking the ONNX graph", error=MissingEngineError)

    try:
        onnx.checker.check_model(onnx_model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnx: the converted graph is invalid: {first}") from exc


def export_model(
    model_path: str | os.PathLike[str],
    savedmodel: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | None = None,
    opset: int | None = None,
) -> dict[str, Path]:
    """Export a ``.keras`` model to a SavedModel directory and/or an ONNX file.

    Parameters
    ----------
    model_path
        ``.keras`` file (e.g. written by ``keras.callbacks.ModelCheckpoint``); loaded
        in Keras safe mode with terrapatch's layers and metrics registered.
    savedmodel
        Output SavedModel directory (replaced if it exists).
    onnx
        Output ONNX file.
    opset
        ONNX opset (default: tf2onnx's).

    Returns
    -------
    dict
        ``{"savedmodel": path, "onnx": path}`` for the outputs written.

    Raises
    ------
    InputError
        If neither output is requested.
    MissingInputError
        If ``model_path`` does not exist.
    MissingEngineError
        If the ``tensorflow`` extra (TensorFlow, Keras, tf2onnx for ONNX) is missing.
    ModelError
        If the model cannot be loaded or converted, or Keras does not run on its
        TensorFlow backend in this process (``KERAS_BACKEND`` torch or jax: export
        the ``.keras`` file from a TensorFlow-backend process).
    OutputError
        If an output cannot be written.
    """
    if savedmodel is None and onnx is None:
        raise InputError("export: give at least one output, savedmodel or onnx")
    if not os.path.isfile(model_path):
        raise MissingInputError(f"model: file {os.fspath(model_path)!r} does not exist")
    check_keras_file(model_path, "model")
    outputs = {"savedmodel": None if savedmodel is None else Output(savedmodel, "folder"),
               "onnx": None if onnx is None else Output(onnx, "onnx")}
    written: dict[str, Path] = {}
    with claim_outputs(outputs, {"model": model_path}):
        # Fail before loading anything when the tensorflow extra is incomplete.
        import_keras(f"export: exporting the Keras model {os.fspath(model_path)!r}",
                     error=MissingEngineError)
        _check_backend()
        if onnx is not None:
            _onnx_converter()
        with tensorflow_startup():
            from terrapatch.model import load_model

        model = load_model(model_path)
        if savedmodel is not None:
            written["savedmodel"] = export_savedmodel(model, savedmodel)
        if onnx is not None:
            written["onnx"] = export_onnx(model, onnx, opset=opset)
    return written
