"""Tensor helpers for dataset preprocessing and models (OTBTF's ``otbtf.ops``)."""

from __future__ import annotations

from typing import Any

from terrapatch.errors import InputError

__all__ = ["one_hot"]


def one_hot(labels: Any, nb_classes: int) -> Any:
    """One-hot encode integer labels that carry a trailing axis of size 1.

    Parameters
    ----------
    labels
        Integer (or integral float) labels of shape ``(..., 1)``, e.g. a labels patch
        ``(1, 1, 1)`` or a batch ``(B, 1, 1, 1)``.
    nb_classes
        Number of classes (depth of the encoding). Labels outside
        ``[0, nb_classes)`` encode as all zeros.

    Returns
    -------
    tensor
        float32 tensor of shape ``(..., nb_classes)``. A TensorFlow tensor when
        ``labels`` is one (inside ``tf.data`` pipelines), else a tensor of the Keras
        backend.

    Raises
    ------
    InputError
        If ``nb_classes`` is not a positive integer or the last axis is not of size 1.

    Examples
    --------
    >>> one_hot(np.array([[[2]]], dtype="uint8"), nb_classes=4).numpy()
    array([[[0., 0., 1., 0.]]], dtype=float32)
    """
    if isinstance(nb_classes, bool) or int(nb_classes) != nb_classes or nb_classes <= 0:
        raise InputError(f"one_hot: nb_classes={nb_classes!r} must be a positive integer")
    depth = int(nb_classes)
    last = labels.shape[-1] if len(labels.shape) else None
    if len(labels.shape) == 0 or (last is not None and last != 1):
        raise InputError(
            f"one_hot: labels of shape {tuple(labels.shape)} must end with an axis of size 1"
        )
    if _is_tf_tensor(labels):
        import tensorflow as tf

        index = tf.squeeze(tf.cast(labels, tf.int32), axis=-1)
        return tf.one_hot(index, depth, dtype=tf.float32)
    from keras import ops

    index = ops.squeeze(ops.cast(labels, "int32"), axis=-1)
    return ops.one_hot(index, depth, dtype="float32")


def _is_tf_tensor(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("tensorflow")
