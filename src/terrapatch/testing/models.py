"""Small Keras 3 models for tests and benchmarks of serving: the seed model, identities, a U-Net.

Every builder returns a plain functional :class:`keras.Model` with random (seeded)
weights, so tests can serve it in memory, save it as ``.keras``, export it as a
SavedModel or ONNX file, and compare the maps. The custom layer used here is
registered with Keras, so saved files load again in safe mode once this module
has been imported.

Examples
--------
>>> from terrapatch.testing.models import seed_model
>>> model = seed_model()  # doctest: +SKIP
>>> sorted(model.output_names)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from terrapatch._optional import tensorflow_startup
from terrapatch.engines import Engine

with tensorflow_startup():
    import keras
    from keras import ops

__all__ = [
    "SEED_CLASSES",
    "L2Norm",
    "MultiplyScalar",
    "RecordingEngine",
    "ReshapeOutput",
    "dense_patch_model",
    "identity_model",
    "norm_model",
    "scale_model",
    "seed_model",
    "unet_model",
]

#: Number of classes of the seed's DualSrcFCNNModel.
SEED_CLASSES = 6


@keras.saving.register_keras_serializable(package="terrapatch_testing")
class ReshapeOutput(keras.layers.Layer):
    """Reshape ``[b, h, w, c]`` images to one of the output ranks OTBTF accepts.

    Parameters
    ----------
    rank
        4: unchanged ``[b, h, w, c]``; 3: ``[b, h, w]`` (c must be 1);
        2: ``[b·h·w, c]``; 1: ``[b·h·w]`` (c must be 1).
    name
        Layer name.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.
    """

    def __init__(self, rank: int, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if rank not in (1, 2, 3, 4):
            raise ValueError(f"ReshapeOutput: rank={rank!r} must be 1, 2, 3 or 4")
        self.rank = int(rank)

    def call(self, inputs: Any) -> Any:
        """Return ``inputs`` reshaped to the requested rank."""
        if self.rank == 4:
            return inputs
        if self.rank == 3:
            return ops.squeeze(inputs, axis=-1)
        channels = inputs.shape[-1]
        if self.rank == 2:
            return ops.reshape(inputs, (-1, channels))
        return ops.reshape(inputs, (-1,))

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        """Return the static output shape."""
        b, h, w, c = tuple(input_shape)
        if self.rank == 4:
            return (b, h, w, c)
        if self.rank == 3:
            return (b, h, w)
        return (None, c) if self.rank == 2 else (None,)

    def get_config(self) -> dict[str, Any]:
        """Return the layer configuration."""
        return {**super().get_config(), "rank": self.rank}


@keras.saving.register_keras_serializable(package="terrapatch_testing")
class L2Norm(keras.layers.Layer):
    """Euclidean norm over the last axis, keeping it (``[b, h, w, c]`` → ``[b, h, w, 1]``)."""

    def call(self, inputs: Any) -> Any:
        """Return ``sqrt(sum(inputs², axis=-1, keepdims=True))``."""
        return ops.sqrt(ops.sum(ops.square(inputs), axis=-1, keepdims=True))

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        """Return the input shape with a last axis of 1."""
        return (*tuple(input_shape)[:-1], 1)


def seed_model(class_nb: int = SEED_CLASSES, seed: int = 0, scale: float = 1e-4) -> keras.Model:
    """The seed's DualSrcFCNNModel as a plain functional model with random weights.

    Inputs ``input_10m`` ``(None, None, 4)`` and ``input_20m`` ``(None, None, 6)``
    (float32, scaled by ``scale``); dict outputs ``estimated`` (softmax,
    ``class_nb`` channels), ``estimated_labels`` (int64 argmax, last axis kept) and
    ``features`` (64 channels). Receptive fields 16 (10 m) and 8 (20 m), output at
    20 m spacing; valid convolutions only, so it serves patch-based and
    fully-convolutionally.

    Parameters
    ----------
    class_nb
        Number of classes.
    seed
        Seed of the random weights.
    scale
        Input scaling of the seed's ``normalize_inputs`` (1e-4 for reflectance DN).
    """
    from terrapatch.zoo import dual_source_outputs

    keras.utils.set_random_seed(seed)
    inp1 = keras.Input((None, None, 4), name="input_10m")
    inp2 = keras.Input((None, None, 6), name="input_20m")
    net1 = keras.layers.Rescaling(scale, name="normalize_10m")(inp1)
    net2 = keras.layers.Rescaling(scale, name="normalize_20m")(inp2)

    outputs = dual_source_outputs(net1, net2, class_nb)
    return keras.Model(
        inputs={"input_10m": inp1, "input_20m": inp2},
        outputs=outputs,
        name="DualSrcFCNNModel",
    )


def identity_model(bands: int = 1, rank: int = 4, name: str = "x",
                   output: str = "y", dtype: str = "float32") -> keras.Model:
    """A model whose output is its input, reshaped to ``rank`` (see :class:`ReshapeOutput`).

    Served with a receptive field and expression field of 1, the map equals the input
    raster, in both patch-based and fully-convolutional modes.

    Parameters
    ----------
    bands
        Number of input channels (must be 1 for ranks 1 and 3).
    rank
        Output rank: 4 ``[b, h, w, c]``, 3 ``[b, h, w]``, 2 ``[b·h·w, c]``, 1 ``[b·h·w]``.
    name, output
        Input and output names.
    dtype
        Input dtype.
    """
    if rank in (1, 3) and bands != 1:
        raise ValueError(f"identity_model: rank {rank} needs bands=1, got {bands}")
    inp = keras.Input((None, None, bands), name=name, dtype=dtype)
    out = ReshapeOutput(rank, name=output)(inp)
    return keras.Model(inputs={name: inp}, outputs={output: out}, name=f"identity_rank{rank}")


def norm_model(bands: int = 3, rfield: int = 4, name: str = "x", output: str = "y") -> keras.Model:
    """OTBTF's no-data test model: ``y = ‖x‖₂`` over the channels, per pixel.

    Parameters
    ----------
    bands
        Number of input channels.
    rfield
        Unused by the computation (kept to document the test geometry RF = EF).
    name, output
        Input and output names.
    """
    del rfield
    inp = keras.Input((None, None, bands), name=name)
    out = L2Norm(name=output)(inp)
    return keras.Model(inputs={name: inp}, outputs={output: out}, name="l2norm")


def dense_patch_model(bands: int = 2, patch: int = 5, name: str = "x",
                      output: str = "y", seed: int = 0) -> keras.Model:
    """A patch classifier with a static input size: flatten → dense (patch-based only).

    Its ``patch × patch`` input size is static, so serving derives the receptive field
    from the model without probing.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((patch, patch, bands), name=name)
    out = keras.layers.Dense(3, name="dense")(keras.layers.Flatten()(inp))
    return keras.Model(inputs={name: inp}, outputs={output: out}, name="dense_patch")


def unet_model(bands: int = 3, classes: int = 2, crop: int = 16, seed: int = 0) -> keras.Model:
    """A small same-padded U-Net with a ``<output>_crop<crop>`` output (expression field > 1).

    One 2×2 pooling level, so inputs need even sizes; its receptive field radius is
    far below ``crop``, so the cropped output of a tile does not depend on the tile.
    Outputs: ``estimated`` (same size as the input, softmax) and
    ``estimated_crop<crop>`` (``crop`` pixels removed on every side).

    Parameters
    ----------
    bands
        Input channels (input name ``input``).
    classes
        Output channels.
    crop
        Border removed by the cropped output.
    seed
        Seed of the random weights.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, bands), name="input")
    x = keras.layers.Rescaling(1e-2, name="normalize")(inp)
    skip = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="enc1")(x)
    down = keras.layers.MaxPool2D(2, name="down")(skip)
    mid = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="mid")(down)
    up = keras.layers.UpSampling2D(2, name="up")(mid)
    cat = keras.layers.Concatenate(name="cat")([up, skip])
    est = keras.layers.Conv2D(classes, 3, padding="same", activation="softmax",
                              name="estimated")(cat)
    cropped = keras.layers.Cropping2D(crop, name=f"estimated_crop{crop}")(est)
    return keras.Model(inputs={"input": inp},
                       outputs={"estimated": est, f"estimated_crop{crop}": cropped},
                       name="unet")


@keras.saving.register_keras_serializable(package="terrapatch_testing")
class MultiplyScalar(keras.layers.Layer):
    """Multiply images by the first value of a shape-``[1]`` tensor: call on ``(x, s)``."""

    def call(self, inputs: Sequence[Any]) -> Any:
        """Return ``x * s[0]``."""
        x, s = inputs
        return x * ops.cast(ops.reshape(s, (-1,))[0], x.dtype)

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        """Return the shape of ``x``."""
        return tuple(input_shape[0])


def scale_model(bands: int = 1, name: str = "x", scale: str = "scale",
                output: str = "y") -> keras.Model:
    """``y = x · scale[0]``, with ``scale`` a shape-``[1]`` input (a user placeholder)."""
    inp = keras.Input((None, None, bands), name=name)
    factor = keras.Input((), name=scale)
    out = MultiplyScalar(name=output)([inp, factor])
    return keras.Model(inputs={name: inp, scale: factor}, outputs={output: out},
                       name="scaled")


class RecordingEngine(Engine):
    """Wrap an engine and record every batch it is fed (for train/serve consistency tests).

    Parameters
    ----------
    inner
        The engine that computes the outputs.
    fail_after
        Raise a :class:`RuntimeError` (an engine failure) once this many data batches
        have run; all-zero batches (serving's geometry probes) are not counted.

    Attributes
    ----------
    feeds
        One dict ``{input name: array}`` per call, in call order (probes included).
    """

    kind = "recording engine"

    def __init__(self, inner: Engine, fail_after: int | None = None) -> None:
        super().__init__(inner.path, inner.inputs, inner.outputs, inner.aliases)
        self.inner = inner
        self.fail_after = fail_after
        self.feeds: list[dict[str, np.ndarray]] = []

    @property
    def data_feeds(self) -> list[dict[str, np.ndarray]]:
        """Recorded calls holding some non-zero value (not geometry probes)."""
        return [f for f in self.feeds if any(np.any(v) for v in f.values())]

    def _run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
        is_data = any(np.any(v) for v in feed.values())
        if is_data and self.fail_after is not None and len(self.data_feeds) >= self.fail_after:
            raise RuntimeError(f"simulated failure after {self.fail_after} batch(es)")
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.inner._run(feed, outputs)
