"""Keras layers for remote-sensing models: argmax/max heads, no-data masks, scalar tiling, crops.

Every layer is registered with ``keras.saving.register_keras_serializable`` under the
package ``"terrapatch"``, so a ``.keras`` file that uses them loads again in safe mode
once this module has been imported (``import terrapatch.layers``, or
:func:`terrapatch.model.load_model`). The layers are written with ``keras.ops`` and
therefore run on any Keras backend (tensorflow, torch, jax), and a ``.keras`` file
saved under one backend loads under another; :class:`Argmax` uses ``tf.math.argmax``
directly under the TensorFlow backend, because Keras's own argmax adds bit-level
operations (negative-zero handling) that ONNX converters cannot translate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from terrapatch._optional import tensorflow_startup

with tensorflow_startup():
    import keras
    from keras import ops


__all__ = ["ApplyMask", "Argmax", "CropBorder", "DilatedMask", "Max", "ScalarsTile"]

_PACKAGE = "terrapatch"


def _index_dtype() -> str:
    """Dtype of :class:`Argmax` indices: int64, or int32 under JAX without 64-bit types.

    JAX computes in 32 bits unless ``jax_enable_x64`` is set, and truncates int64
    requests to int32 with a warning; the layer then declares int32 outright. A
    ``.keras`` file saved under JAX gives int64 indices again under TensorFlow.
    """
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.read("jax_enable_x64"):  # type: ignore[no-untyped-call]
            return "int32"
    return "int64"


def _argmax_last_axis(x: Any) -> Any:
    """Return the argmax of ``x`` over its last axis (:func:`_index_dtype`), exportable to ONNX."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.math.argmax(x, axis=-1, output_type=tf.int64)
    return ops.cast(ops.argmax(x, axis=-1), _index_dtype())


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Argmax(keras.layers.Layer):
    """Index of the largest value over the last axis (class id from class scores).

    Parameters
    ----------
    name
        Layer name.
    expand_last_dim
        Keep a trailing axis of size 1 (``[B, H, W, C]`` → ``[B, H, W, 1]``), as OTBTF
        does, so the result is a one-band image when served. Ignored when ``one_hot``.
    one_hot
        Return the one-hot encoding of the argmax (float32, same shape as the input)
        instead of the index.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.

    Notes
    -----
    The index is int64 (OTBTF's dtype, and ONNX ``ArgMax``'s); under the JAX backend
    without ``jax_enable_x64`` it is int32, JAX's widest integer type then.
    """

    def __init__(
        self,
        name: str | None = None,
        expand_last_dim: bool = True,
        one_hot: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.expand_last_dim = bool(expand_last_dim)
        self.one_hot = bool(one_hot)

    def call(self, inputs: Any) -> Any:
        """Return the argmax of ``inputs`` over the last axis."""
        index = _argmax_last_axis(inputs)
        if self.one_hot:
            depth = inputs.shape[-1]
            if depth is None:
                raise ValueError("Argmax(one_hot=True) needs a known number of channels")
            return ops.one_hot(index, depth, dtype="float32")
        if self.expand_last_dim:
            return ops.expand_dims(index, axis=-1)
        return index

    def compute_output_spec(self, inputs: Any) -> keras.KerasTensor:
        """Return the symbolic output: integer index or float32 one-hot."""
        shape = tuple(inputs.shape)
        if self.one_hot:
            return keras.KerasTensor(shape, dtype="float32")
        if self.expand_last_dim:
            return keras.KerasTensor((*shape[:-1], 1), dtype=_index_dtype())
        return keras.KerasTensor(shape[:-1], dtype=_index_dtype())

    def get_config(self) -> dict[str, Any]:
        """Return the layer configuration."""
        return {**super().get_config(), "expand_last_dim": self.expand_last_dim,
                "one_hot": self.one_hot}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Max(keras.layers.Layer):
    """Largest value over the last axis, keeping a trailing axis of size 1.

    Parameters
    ----------
    name
        Layer name.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, inputs: Any) -> Any:
        """Return ``max(inputs, axis=-1, keepdims=True)``."""
        return ops.max(inputs, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        """Return the input shape with a last axis of size 1."""
        return (*tuple(input_shape)[:-1], 1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DilatedMask(keras.layers.Layer):
    """No-data mask dilated by a square neighbourhood.

    The mask is 1 where the input equals ``nodata_value``, 0 elsewhere; it is then
    dilated with a ``(2·radius+1)²`` square (max filter, "same" padding), channel by
    channel. Output dtype is uint8, shape is the input shape (``[B, H, W, C]``).

    Parameters
    ----------
    nodata_value
        Input value that marks no-data.
    radius
        Dilation radius in pixels (0: no dilation).
    name
        Layer name.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.
    """

    def __init__(
        self, nodata_value: float, radius: int, name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        if int(radius) != radius or radius < 0:
            raise ValueError(f"DilatedMask: radius={radius!r} must be a non-negative integer")
        self.nodata_value = float(nodata_value)
        self.radius = int(radius)

    def call(self, inputs: Any) -> Any:
        """Return the dilated uint8 no-data mask of ``inputs``."""
        mask = ops.cast(ops.equal(inputs, ops.cast(self.nodata_value, inputs.dtype)), "float32")
        if self.radius > 0:
            size = 2 * self.radius + 1
            mask = ops.max_pool(mask, pool_size=size, strides=1, padding="same")
        return ops.cast(mask, "uint8")

    def compute_output_spec(self, inputs: Any) -> keras.KerasTensor:
        """Return a uint8 tensor of the input's shape."""
        return keras.KerasTensor(tuple(inputs.shape), dtype="uint8")

    def get_config(self) -> dict[str, Any]:
        """Return the layer configuration."""
        return {**super().get_config(), "nodata_value": self.nodata_value,
                "radius": self.radius}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ApplyMask(keras.layers.Layer):
    """Replace the values of ``x`` by ``out_nodata`` where ``mask`` is 1.

    Call it on ``(mask, x)``; the mask broadcasts against ``x`` (a one-channel mask
    masks every channel).

    Parameters
    ----------
    out_nodata
        Value written where the mask is 1.
    name
        Layer name.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.
    """

    def __init__(self, out_nodata: float, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.out_nodata = float(out_nodata)

    def call(self, inputs: Sequence[Any]) -> Any:
        """Return ``where(mask == 1, out_nodata, x)`` for ``inputs = (mask, x)``."""
        mask, x = inputs
        fill = ops.cast(self.out_nodata, x.dtype)
        return ops.where(ops.equal(mask, ops.cast(1, mask.dtype)), fill, x)

    def compute_output_spec(self, inputs: Sequence[Any]) -> keras.KerasTensor:
        """Return a tensor of ``x``'s shape and dtype."""
        return keras.KerasTensor(tuple(inputs[1].shape), dtype=inputs[1].dtype)

    def get_config(self) -> dict[str, Any]:
        """Return the layer configuration."""
        return {**super().get_config(), "out_nodata": self.out_nodata}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ScalarsTile(keras.layers.Layer):
    """Tile per-sample scalars over the rows and columns of a reference image.

    Call it on ``(ref, [s1, s2, …])`` where ``ref`` is ``[B, H, W, C]`` and each
    scalar input is ``[B]`` or ``[B, 1]``; the result is ``[B, H, W, n]`` with
    channel ``k`` equal to ``s_k`` everywhere (dtype of the scalars).

    Parameters
    ----------
    name
        Layer name.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, inputs: Sequence[Any]) -> Any:
        """Return the scalars stacked on a last axis and broadcast to ``ref``'s size."""
        ref, scalars = inputs
        columns = [ops.reshape(s, (-1, 1)) for s in scalars]
        stacked = ops.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]
        stacked = ops.expand_dims(ops.expand_dims(stacked, 1), 1)  # [B, 1, 1, n]
        zeros = ops.zeros_like(ops.cast(ref[..., :1], stacked.dtype))  # [B, H, W, 1]
        return zeros + stacked

    def compute_output_spec(self, inputs: Sequence[Any]) -> keras.KerasTensor:
        """Return a ``[B, H, W, n]`` tensor with the scalars' dtype."""
        ref, scalars = inputs
        shape = tuple(ref.shape)
        return keras.KerasTensor((*shape[:3], len(scalars)), dtype=scalars[0].dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CropBorder(keras.layers.Layer):
    """Remove ``crop`` pixels from each side of ``[B, H, W, C]`` tensors.

    Unlike :class:`keras.layers.Cropping2D`, a tensor smaller than ``2·crop`` gives an
    empty result instead of an error, so :class:`terrapatch.model.ModelBase` can add
    cropped outputs that are meaningless (empty) during training on small patches and
    useful when serving large tiles.

    Parameters
    ----------
    crop
        Number of pixels removed on every side (positive).
    name
        Layer name.
    **kwargs
        Other :class:`keras.layers.Layer` arguments.
    """

    def __init__(self, crop: int, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if int(crop) != crop or crop <= 0:
            raise ValueError(f"CropBorder: crop={crop!r} must be a positive integer")
        self.crop = int(crop)

    def call(self, inputs: Any) -> Any:
        """Return ``inputs[:, crop:-crop, crop:-crop, :]``."""
        c = self.crop
        return inputs[:, c:-c, c:-c, :]

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        """Return the input shape with rows and columns reduced by ``2·crop`` (floor 0)."""
        b, h, w, ch = tuple(input_shape)
        return (b, None if h is None else max(h - 2 * self.crop, 0),
                None if w is None else max(w - 2 * self.crop, 0), ch)

    def get_config(self) -> dict[str, Any]:
        """Return the layer configuration."""
        return {**super().get_config(), "crop": self.crop}
