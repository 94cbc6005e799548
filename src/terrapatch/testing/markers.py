"""Pytest markers that skip a test when an optional dependency is missing, saying which.

Use them in place of ``pytest.importorskip`` for terrapatch's optional extras, so
that an import error in a hard dependency (or in terrapatch itself) fails loudly
instead of skipping::

    from terrapatch.testing.markers import requires_torch

    @requires_torch
    def test_my_torch_model(): ...

Each marker names the extra that installs the module (``pip install
'terrapatch[torch]'``). Needs ``pytest``.
"""

from __future__ import annotations

import pytest

from terrapatch._optional import EXTRAS, available

__all__ = [
    "requires",
    "requires_jax",
    "requires_matplotlib",
    "requires_onnx",
    "requires_sklearn",
    "requires_skops",
    "requires_tensorboard",
    "requires_tensorflow",
    "requires_torch",
]


def requires(*modules: str) -> pytest.MarkDecorator:
    """A ``skipif`` marker: skip unless every module in ``modules`` can be imported."""
    missing = [m for m in modules if not available(m)]
    extras = sorted({EXTRAS.get(m, ("dev", m))[0] for m in missing})
    reason = (f"needs {', '.join(missing)} (pip install 'terrapatch[{','.join(extras)}]')"
              if missing else "")
    return pytest.mark.skipif(bool(missing), reason=reason)


#: TensorFlow and Keras (the ``tensorflow`` extra).
requires_tensorflow = requires("tensorflow", "keras")
#: onnx, to build test models (the ``tensorflow`` extra).
requires_onnx = requires("onnx")
#: PyTorch (the ``torch`` extra).
requires_torch = requires("torch")
#: JAX (the ``jax`` extra).
requires_jax = requires("jax")
#: scikit-learn (the ``classical`` extra).
requires_sklearn = requires("sklearn")
#: skops (the ``classical`` extra).
requires_skops = requires("skops")
#: matplotlib (the ``report`` extra).
requires_matplotlib = requires("matplotlib")
#: TensorBoard (a development dependency).
requires_tensorboard = requires("tensorboard")
