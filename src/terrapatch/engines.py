"""Model engines: run a saved model on numpy batches (TF SavedModel, Keras, ONNX, PyTorch).

One interface for the formats terrapatch serves::

    engine = Engine.load("model_dir")           # SavedModel dir, .keras, .onnx, .pt2 or .pt file
    engine.input_names, engine.output_names     # names as the model declares them
    engine.run({"input_20m": a, "input_10m": b}, ["estimated_labels"])  # -> {name: ndarray}

Inputs are converted to the dtype the model declares. Names are resolved the way
OTBTF users expect: an output is found by its signature key first (a SavedModel's
``serving_default`` output key, a Keras model's output dict key, an ONNX output
name), then by the name of the Keras layer that produces it (Keras files only:
SavedModel and ONNX files do not keep layer names), and a ``name:0`` suffix is
ignored. Every failure is a :class:`~terrapatch.errors.ModelError` naming the model
and listing what it offers.

Only the ONNX engine is in terrapatch's core install: TensorFlow and Keras are
imported when a SavedModel or ``.keras`` model is opened, never for an ONNX one;
without the ``tensorflow`` extra those raise a one-line
:class:`~terrapatch.errors.MissingEngineError` saying what to install. PyTorch
models (an in-memory :class:`torch.nn.Module`, a ``torch.export`` ``.pt2`` file, a
TorchScript ``.pt`` / ``.pth`` file) are served by
:class:`terrapatch.pytorch.TorchEngine`, with the ``torch`` extra.

Every engine runs where ``device`` says (:func:`check_device`): ``"cpu"``,
``"cuda"`` (an error in one line when the engine finds no CUDA GPU) or ``"auto"``
(the default: the GPU when the engine finds one, else the CPU).
"""

from __future__ import annotations

import abc
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from terrapatch._optional import import_keras, import_tensorflow, require
from terrapatch.errors import InputError, MissingEngineError, ModelError

if TYPE_CHECKING:
    from terrapatch.pytorch.engine import TorchEngine

__all__ = [
    "DEVICES",
    "Engine",
    "KerasEngine",
    "ModelRunError",
    "OnnxEngine",
    "SavedModelEngine",
    "TensorInfo",
    "check_device",
    "load_engine",
    "resolve_device",
    "savedmodel_graph",
]

#: Values of the ``device`` parameter of :func:`load_engine` and of the engines.
DEVICES = ("auto", "cpu", "cuda")

#: Suffixes of the PyTorch model files :func:`load_engine` opens (``.pt2``: torch.export).
TORCH_SUFFIXES = (".pt2", ".pt", ".pth")


class ModelRunError(ModelError):
    """The model failed while running on a batch (usually inconsistent input shapes).

    Attributes
    ----------
    detail
        The first informative line of the engine's own error.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype of a model input or output.

    Attributes
    ----------
    name
        Name as the model declares it (signature key, dict key or ONNX name).
    shape
        Static shape, ``None`` for unknown dimensions; ``None`` when even the rank
        is unknown.
    dtype
        Numpy dtype.
    """

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype

    @property
    def rank(self) -> int | None:
        """Number of dimensions, or None when unknown."""
        return None if self.shape is None else len(self.shape)

    def describe(self) -> str:
        """``name (shape, dtype)`` for messages."""
        dims = "?" if self.shape is None else "[" + ", ".join(
            "None" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name} {dims} {self.dtype.name}"


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TF errors start with a generic line; prefer the first informative one.
    informative = [ln for ln in lines if not ln.startswith(("Graph execution error",
                                                             "Detected at node",
                                                             "File ", "Traceback"))]
    line = (informative or lines or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[:limit] + " …"


def check_device(device: Any, parameter: str = "device") -> str:
    """Normalise a device name (``"auto"``, ``"cpu"`` or ``"cuda"``), or raise naming ``parameter``.

    Raises
    ------
    InputError
        If ``device`` is none of :data:`DEVICES` (the message lists them).
    """
    text = str(device).strip().lower()
    if text not in DEVICES:
        raise InputError(f"{parameter}: {device!r} is not a device; expected one of "
                         f"{', '.join(DEVICES)}")
    return text


def resolve_device(device: Any, has_gpu: bool, what: str, parameter: str = "device") -> str:
    """Where to run: ``"cuda"`` or ``"cpu"``, from ``device`` and whether a GPU is usable.

    Parameters
    ----------
    device
        ``"auto"`` (``"cuda"`` when ``has_gpu``, else ``"cpu"``), ``"cpu"`` or ``"cuda"``.
    has_gpu
        Whether the engine's runtime sees a usable CUDA GPU.
    what
        The runtime and model, for the message, e.g. ``"onnxruntime for 'm.onnx'"``.
    parameter
        Parameter name quoted in error messages.

    Raises
    ------
    InputError
        If ``device`` is not a device, or is ``"cuda"`` and ``has_gpu`` is False (one
        line naming ``parameter`` and the value).
    """
    text = check_device(device, parameter)
    if text == "auto":
        return "cuda" if has_gpu else "cpu"
    if text == "cuda" and not has_gpu:
        raise InputError(f"{parameter}: {device!r} asked, but {what} finds no CUDA GPU here; "
                         f"use {parameter}='cpu' or {parameter}='auto'")
    return text


def _strip_index(name: str) -> str:
    """``"output:0"`` → ``"output"`` (OTBTF matches names truncated at the first ``:``)."""
    return name.split(":", 1)[0]


class Engine(abc.ABC):
    """A loaded model that runs on numpy arrays.

    Subclasses fill :attr:`inputs`, :attr:`outputs` (name → :class:`TensorInfo`) and
    :attr:`aliases` (other accepted output names → output name), and implement
    :meth:`_run`. Use :meth:`load` to open a model file or directory.

    Attributes
    ----------
    path
        Where the model was loaded from (``"<memory>"`` for in-memory models).
    """

    kind: ClassVar[str] = "model"
    #: Layout of image tensors when the shapes do not tell: ``"nhwc"`` (channels last).
    layout: ClassVar[str] = "nhwc"

    def __init__(self, path: str, inputs: Mapping[str, TensorInfo],
                 outputs: Mapping[str, TensorInfo], aliases: Mapping[str, str] | None = None,
                 ) -> None:
        self.path = path
        self.inputs: dict[str, TensorInfo] = dict(inputs)
        self.outputs: dict[str, TensorInfo] = dict(outputs)
        self.aliases: dict[str, str] = {k: v for k, v in (aliases or {}).items()
                                        if k not in self.outputs}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, inputs={list(self.inputs)}, "
                f"outputs={list(self.outputs)})")

    # ------------------------------------------------------------------ names

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the model inputs."""
        return tuple(self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the model outputs."""
        return tuple(self.outputs)

    def resolve_input(self, name: str, parameter: str = "placeholder") -> str:
        """Return the input called ``name`` (``name:0`` accepted), or raise naming ``parameter``."""
        if name in self.inputs:
            return name
        base = _strip_index(name)
        if base in self.inputs:
            return base
        raise ModelError(
            f"{parameter}: {name!r} is not an input of the {self.kind} {self.path}; "
            f"its inputs are: {', '.join(i.describe() for i in self.inputs.values())}"
        )

    def resolve_output(self, name: str, parameter: str = "output_names") -> str:
        """Return the output called ``name``: signature key first, then layer name."""
        for candidate in (name, _strip_index(name)):
            if candidate in self.outputs:
                return candidate
            if candidate in self.aliases:
                return self.aliases[candidate]
        extra = ""
        if self.aliases:
            extra = f" (or by layer name: {', '.join(sorted(self.aliases))})"
        raise ModelError(
            f"{parameter}: {name!r} is not an output of the {self.kind} {self.path}; "
            f"its outputs are: {', '.join(sorted(self.outputs))}{extra}"
        )

    # ------------------------------------------------------------------ running

    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model on a batch.

        Parameters
        ----------
        inputs
            Input name → array (converted to the input's dtype when needed). Every
            model input must be given.
        outputs
            Names of the outputs to compute (resolved with :meth:`resolve_output`).

        Returns
        -------
        dict
            Requested name (as given) → numpy array.
        """
        feed: dict[str, np.ndarray] = {}
        for name, value in inputs.items():
            key = self.resolve_input(name, "inputs")
            info = self.inputs[key]
            array = np.asarray(value)
            if array.dtype != info.dtype:
                array = array.astype(info.dtype)
            feed[key] = array
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise ModelError(f"model {self.path}: no value given for input(s) {missing}")
        keys = [self.resolve_output(n) for n in outputs]
        try:
            result = self._run(feed, keys)
        except ModelError:
            raise
        except Exception as exc:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items())
            detail = _first_line(exc)
            raise ModelRunError(
                f"the {self.kind} {self.path} failed on inputs {shapes}: {detail}", detail
            ) from exc
        return {name: np.asarray(result[key]) for name, key in zip(outputs, keys, strict=True)}

    @abc.abstractmethod
    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        """Run on converted inputs; return output name → array-like."""

    # ------------------------------------------------------------------ loading

    @staticmethod
    def load(model: Any, parameter: str = "model", device: str = "auto") -> Engine:
        """Open a model: SavedModel directory, ``.keras``, ``.onnx``, ``.pt2`` or ``.pt`` file.

        ``model`` may also be an :class:`Engine` (returned as is), an in-memory
        :class:`keras.Model` or an in-memory :class:`torch.nn.Module`. See
        :func:`load_engine`.
        """
        return load_engine(model, parameter, device=device)


def savedmodel_graph(path: str | os.PathLike[str]) -> Path | None:
    """The graph file of a SavedModel directory (``saved_model.pb``, else ``.pbtxt``), or None.

    None when ``path`` is not a directory holding one.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    for name in ("saved_model.pb", "saved_model.pbtxt"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_engine(model: Any, parameter: str = "model", device: str = "auto") -> Engine:
    """Open ``model`` with the engine matching its format.

    Parameters
    ----------
    model
        A TensorFlow SavedModel directory, a ``.keras`` file, an ``.onnx`` file, a
        ``torch.export`` program (``.pt2``), a TorchScript file (``.pt``, ``.pth``);
        or an in-memory :class:`keras.Model`, :class:`torch.nn.Module` (TorchScript
        modules included) or ``torch.export.ExportedProgram``; or an :class:`Engine`,
        returned as is.
    parameter
        Parameter name quoted in error messages.
    device
        ``"auto"`` (default: the GPU when the engine's runtime finds one), ``"cpu"``
        or ``"cuda"`` (an :class:`~terrapatch.errors.InputError` naming ``device``
        when there is no GPU). Ignored for an :class:`Engine` given as is.

    Returns
    -------
    Engine
        PyTorch models give a :class:`terrapatch.pytorch.TorchEngine`, which takes
        channels-first tensors (``layout = "nchw"``, like an ONNX export of it);
        serving wraps it in :class:`~terrapatch.serve.layouts.ChannelsFirstEngine`.
    """
    if isinstance(model, Engine):
        return model
    device = check_device(device)
    if not isinstance(model, str | os.PathLike):
        # An in-memory Keras or torch model implies its library is loaded already: never
        # import it here.
        keras = sys.modules.get("keras")
        if keras is not None and isinstance(model, keras.Model):
            return KerasEngine.from_model(model, device=device)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(model, torch.nn.Module | torch.export.ExportedProgram):
            return _torch_engine()(model, parameter=parameter, device=device)
        raise ModelError(f"{parameter}: expected a model path, got {type(model).__name__}")
    path = Path(model)
    text = os.fspath(model)
    if not path.exists():
        raise ModelError(f"{parameter}: model {text!r} does not exist")
    if path.is_dir():
        if savedmodel_graph(path) is None:
            raise ModelError(
                f"{parameter}: directory {text!r} is not a TensorFlow SavedModel "
                "(no saved_model.pb inside)"
            )
        return SavedModelEngine(text, parameter=parameter, device=device)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return KerasEngine(text, parameter=parameter, device=device)
    if suffix == ".onnx":
        return OnnxEngine(text, parameter=parameter, device=device)
    if suffix in TORCH_SUFFIXES:
        require("torch", f"{parameter}: serving the PyTorch model {text!r}", hint=_ONNX_HINT,
                error=MissingEngineError)
        return _torch_engine()(text, parameter=parameter, device=device)
    raise ModelError(
        f"{parameter}: {text!r} is not a model terrapatch can serve (expected a SavedModel "
        "directory, a .keras, .onnx, .pt2 (torch.export) or .pt (TorchScript) file)"
    )


def _torch_engine() -> type[TorchEngine]:
    """:class:`terrapatch.pytorch.engine.TorchEngine`, imported on first use (it imports torch)."""
    from terrapatch.pytorch.engine import TorchEngine

    return TorchEngine


# ---------------------------------------------------------------------- TF SavedModel

_ONNX_HINT = "an ONNX export of the model serves without this extra"


class SavedModelEngine(Engine):
    """A TensorFlow SavedModel, run through its ``serving_default`` signature.

    Parameters
    ----------
    path
        SavedModel directory.
    tags
        Tag set to load (default ``serve``).
    signature
        Signature to use; default ``serving_default`` if present, else the first.
    parameter
        Parameter name quoted in error messages.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"`` (see :func:`tensorflow_device`).
    """

    kind = "SavedModel"

    def __init__(self, path: str, tags: Sequence[str] | None = None,
                 signature: str | None = None, parameter: str = "model",
                 device: str = "auto") -> None:
        tf = import_tensorflow(f"{parameter}: serving the SavedModel {path!r}", hint=_ONNX_HINT,
                               error=MissingEngineError)
        self.device, self._tf_device = tensorflow_device(tf, device, f"the SavedModel {path!r}")
        try:
            with tf.device(self._tf_device):
                loaded = tf.saved_model.load(path, tags=list(tags) if tags else None)
        except Exception as exc:
            raise ModelError(
                f"{parameter}: cannot load the SavedModel {path!r}: {_first_line(exc)}"
            ) from None
        signatures = dict(loaded.signatures)
        if not signatures:
            raise ModelError(
                f"{parameter}: the SavedModel {path!r} has no signature to serve "
                "(inspect it with `saved_model_cli show --all --dir ...`)"
            )
        if signature is None:
            signature = "serving_default" if "serving_default" in signatures else next(
                iter(signatures))
        if signature not in signatures:
            raise ModelError(f"{parameter}: signature {signature!r} not in {sorted(signatures)}")
        fn = signatures[signature]
        _, kw_specs = fn.structured_input_signature
        inputs = {k: _tf_info(k, s) for k, s in kw_specs.items()}
        outs = fn.structured_outputs
        if not isinstance(outs, Mapping):
            outs = {"output_0": outs}
        outputs = {k: _tf_info(k, s) for k, s in outs.items()}
        super().__init__(path, inputs, outputs)
        self._loaded = loaded  # keep the variables alive
        self._fn = fn
        self.signature = signature

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        import tensorflow as tf

        with tf.device(self._tf_device):
            result = self._fn(**{k: tf.convert_to_tensor(v) for k, v in feed.items()})
        return {k: result[k].numpy() for k in outputs}


def tensorflow_device(tf: Any, device: str, model: str,
                      parameter: str = "device") -> tuple[str, str]:
    """``(device, tf_device)``: ``"cuda"``/``"cpu"`` and the ``tf.device`` scope to run in.

    A GPU counts when ``tf.config.list_physical_devices("GPU")`` lists one (it is
    visible to TensorFlow); the model then runs under ``tf.device("/GPU:0")``, else
    under ``tf.device("/CPU:0")``.
    """
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    where = resolve_device(device, has_gpu, f"TensorFlow (for {model})", parameter)
    return where, "/GPU:0" if where == "cuda" else "/CPU:0"


def check_keras_file(path: str | os.PathLike[str], parameter: str = "model") -> None:
    """Refuse a ``.keras`` file that is not a zip archive (damaged, truncated, renamed).

    Keras reports such a file as "File not found" although it exists.
    """
    text = os.fspath(path)
    if os.path.isfile(text) and not zipfile.is_zipfile(text):
        raise ModelError(f"{parameter}: cannot load the Keras model {text!r}: the file exists "
                         "but is not a zip archive, as .keras files are (damaged, truncated "
                         "or of another format)")


def _tf_info(name: str, spec: Any) -> TensorInfo:
    shape = spec.shape
    dims = None if shape.rank is None else tuple(shape.as_list())
    return TensorInfo(name, dims, np.dtype(spec.dtype.as_numpy_dtype))


# ---------------------------------------------------------------------- Keras


def _register_layers() -> None:
    """Import the modules whose layers saved terrapatch models use."""
    import importlib

    for module in ("terrapatch.layers", "terrapatch.metrics"):
        try:
            importlib.import_module(module)
        except ImportError:  # pragma: no cover - modules of the package
            pass


class KerasEngine(Engine):
    """A Keras 3 model (``.keras`` file, or an in-memory :class:`keras.Model`).

    Outputs are named by the model's output dict keys (by the producing layers' names
    for models with list outputs); the layer names are accepted as aliases. Under the
    TensorFlow backend the model runs through a ``tf.function`` restricted to the
    requested outputs.

    Parameters
    ----------
    path
        ``.keras`` file.
    parameter
        Parameter name quoted in error messages.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``: under the TensorFlow backend, where the
        model runs (see :func:`tensorflow_device`); other backends place it themselves.
    """

    kind = "Keras model"

    def __init__(self, path: str, parameter: str = "model",
                 _model: Any = None, device: str = "auto") -> None:
        keras = import_keras(f"{parameter}: serving the Keras model {path!r}", hint=_ONNX_HINT,
                             error=MissingEngineError)
        self._tf_device: str | None = None
        self.device = check_device(device)
        if keras.backend.backend() == "tensorflow":
            self.device, self._tf_device = tensorflow_device(
                sys.modules["tensorflow"], device, f"the Keras model {path!r}")
        if _model is None:
            check_keras_file(path, parameter)
            _register_layers()
            try:
                _model = keras.saving.load_model(path, compile=False)
            except Exception as exc:
                raise ModelError(
                    f"{parameter}: cannot load the Keras model {path!r}: {_first_line(exc)}"
                ) from None
        model = _model
        in_struct = model.input
        if isinstance(in_struct, Mapping):
            in_items = list(in_struct.items())
        else:
            tensors = in_struct if isinstance(in_struct, list | tuple) else [in_struct]
            in_items = [(t.name, t) for t in tensors]
        out_struct = model.output
        if isinstance(out_struct, Mapping):
            out_items = list(out_struct.items())
        else:
            tensors = out_struct if isinstance(out_struct, list | tuple) else [out_struct]
            out_items = list(zip(model.output_names, tensors, strict=True))
        aliases: dict[str, str] = {}
        for key, tensor in out_items:
            history = getattr(tensor, "_keras_history", None)
            if history is not None:
                aliases.setdefault(history.operation.name, key)
        super().__init__(
            path,
            {k: TensorInfo(k, tuple(t.shape), np.dtype(t.dtype)) for k, t in in_items},
            {k: TensorInfo(k, tuple(t.shape), np.dtype(t.dtype)) for k, t in out_items},
            aliases,
        )
        self.model = model
        self._input_struct_is_dict = isinstance(in_struct, Mapping)
        self._input_tensors = dict(in_items)
        self._output_tensors = dict(out_items)
        self._functions: dict[tuple[str, ...], Any] = {}

    @classmethod
    def from_model(cls, model: Any, device: str = "auto") -> KerasEngine:
        """Wrap an in-memory :class:`keras.Model`."""
        return cls("<memory>", _model=model, device=device)

    def _function(self, outputs: tuple[str, ...]) -> Any:
        fn = self._functions.get(outputs)
        if fn is not None:
            return fn
        import keras

        sub = keras.Model(inputs=self._input_tensors,
                          outputs={k: self._output_tensors[k] for k in outputs})
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # One trace for every input size: the model's input shapes with a free batch
            # (rows and columns stay free when the model leaves them free).
            signature = [{
                k: tf.TensorSpec(None if t.shape is None else (None, *tuple(t.shape)[1:]),
                                 tf.as_dtype(self.inputs[k].dtype), name=k)
                for k, t in self._input_tensors.items()
            }]
            fn = tf.function(lambda feed: sub(feed, training=False), input_signature=signature)
        else:  # pragma: no cover - other backends run eagerly
            def fn(feed: dict[str, Any]) -> Any:
                return sub(feed, training=False)
        self._functions[outputs] = fn
        return fn

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        import keras

        fn = self._function(tuple(dict.fromkeys(outputs)))
        if self._tf_device is None:
            result = fn(feed)
        else:
            import tensorflow as tf

            with tf.device(self._tf_device):
                result = fn(feed)
        return {k: keras.ops.convert_to_numpy(result[k]) for k in outputs}


# ---------------------------------------------------------------------- ONNX

_ONNX_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint64)": "uint64", "tensor(uint32)": "uint32",
    "tensor(uint16)": "uint16", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


#: Environment variable giving onnxruntime's intra-op threads (like TensorFlow's
#: ``TF_NUM_INTRAOP_THREADS``), so that several worker processes share a machine's cores.
ONNX_THREADS_ENV = "TERRAPATCH_ONNX_THREADS"


def _env_threads(name: str) -> int:
    """A positive thread count from the environment, else 0."""
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


class OnnxEngine(Engine):
    """An ONNX model run with onnxruntime (CPU, or CUDA: see ``device``).

    Names ending in ``:0`` (as tf2onnx writes them) are also reachable without it.

    Parameters
    ----------
    path
        ``.onnx`` file.
    parameter
        Parameter name quoted in error messages.
    threads
        Intra-op threads (0: ``TERRAPATCH_ONNX_THREADS`` if set, else onnxruntime's
        default, all cores; local Dask clusters set it to ``cores // workers``).
    device
        ``"auto"`` (onnxruntime's ``CUDAExecutionProvider`` when available, else the
        CPU), ``"cpu"`` or ``"cuda"`` (an error when the CUDA provider is not
        available or does not start).
    """

    kind = "ONNX model"

    def __init__(self, path: str, parameter: str = "model", threads: int = 0,
                 device: str = "auto") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # probing failures are expected
        threads = threads or _env_threads(ONNX_THREADS_ENV)
        if threads:
            options.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning: serving reads and writes tiles in
        # other threads while the model runs, and spinning workers would starve them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        cuda = "CUDAExecutionProvider"
        what = f"onnxruntime (for the ONNX model {path!r})"
        self.device = resolve_device(device, cuda in ort.get_available_providers(), what)
        providers = [cuda, "CPUExecutionProvider"] if self.device == "cuda" else [
            "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:
            raise ModelError(
                f"{parameter}: cannot load the ONNX model {path!r}: {_first_line(exc)}"
            ) from None
        if self.device == "cuda" and cuda not in session.get_providers():
            if check_device(device) == "cuda":  # the provider is installed but did not start
                resolve_device(device, False, what)
            self.device = "cpu"

        def info(arg: Any) -> TensorInfo:
            dims = tuple(d if isinstance(d, int) else None for d in arg.shape)
            dtype = np.dtype(_ONNX_TYPES.get(arg.type, "float32"))
            return TensorInfo(_strip_index(arg.name), dims, dtype)

        ins = {_strip_index(a.name): info(a) for a in session.get_inputs()}
        outs = {_strip_index(a.name): info(a) for a in session.get_outputs()}
        super().__init__(path, ins, outs)
        self._onnx_in = {_strip_index(a.name): a.name for a in session.get_inputs()}
        self._onnx_out = {_strip_index(a.name): a.name for a in session.get_outputs()}
        self.session = session

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        names = [self._onnx_out[k] for k in outputs]
        values = self.session.run(names, {self._onnx_in[k]: v for k, v in feed.items()})
        return dict(zip(outputs, values, strict=True))
