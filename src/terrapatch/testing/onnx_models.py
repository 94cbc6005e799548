"""Small ONNX test models built directly with ``onnx.helper`` (no TensorFlow needed).

:func:`conv_onnx` writes a two-source fully-convolutional model in terrapatch's
channels-last convention: each input ``[N, H, W, C]`` goes through a valid
``k × k`` convolution (source 1) or a valid ``k/2 × k/2`` convolution (source 2,
at twice the spacing), the two are added and a ReLU gives ``[N, H-k+1, W-k+1,
classes]``. Weights are seeded, so the model's values can be compared across
runs and processes. :func:`segmentation_onnx` writes the shape most of the field
exports from PyTorch: channels first ``[N, C, H, W]``, a stack of 3 × 3
convolutions (same-padded, or valid) and a softmax over the classes.
:func:`super_resolution_onnx` writes a super-resolution model: per source a valid
3 × 3 convolution and a pixel shuffle (``DepthToSpace``) by that source's factor,
the sources added. Needs the
``onnx`` package (the ``tensorflow`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "conv_onnx",
    "segmentation_onnx",
    "single_conv_onnx",
    "super_resolution_onnx",
    "unet_onnx",
]


def _conv_branch(helper: Any, name: str, bands: int, classes: int, kernel: int,
                 rng: np.random.Generator, nodes: list[Any], inits: list[Any],
                 stride: int = 1) -> str:
    """NHWC input → transpose → conv (valid) → transpose back; returns the output name."""
    weights = rng.normal(0, 0.5, (classes, bands, kernel, kernel)).astype(np.float32)
    inits.append(helper.make_tensor(f"{name}_w", 1, weights.shape, weights.ravel()))
    nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=1))
    nodes.append(helper.make_node("Transpose", [f"{name}_f"], [f"{name}_nchw"],
                             perm=[0, 3, 1, 2]))
    nodes.append(helper.make_node("Conv", [f"{name}_nchw", f"{name}_w"], [f"{name}_conv"],
                             kernel_shape=[kernel, kernel], strides=[stride, stride]))
    return f"{name}_conv"


def conv_onnx(path: str | os.PathLike[str], bands: tuple[int, int] = (4, 6), classes: int = 3,
              kernel: int = 4, seed: int = 0, names: tuple[str, str] = ("input_10m", "input_20m"),
              output: str = "scores") -> Path:
    """Write a two-source (10 m + 20 m) valid-convolution ONNX model; return its path.

    Source 1 (``names[0]``, fine) gets a ``2k × 2k`` kernel with stride 2, source 2
    (``names[1]``, coarse) a ``k × k`` kernel: both give one output pixel per coarse
    pixel, so with the output at the coarse spacing the receptive fields are ``2k``
    and ``k`` and the expression field is 1.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []
    fine = _conv_branch(helper, names[0], bands[0], classes, 2 * kernel, rng, nodes, inits, 2)
    coarse = _conv_branch(helper, names[1], bands[1], classes, kernel, rng, nodes, inits)
    scale = np.full((1,), 1e-3, np.float32)
    inits.append(helper.make_tensor("scale", TensorProto.FLOAT, (1,), scale))
    nodes.append(helper.make_node("Add", [fine, coarse], ["sum"]))
    nodes.append(helper.make_node("Mul", ["sum", "scale"], ["scaled"]))
    nodes.append(helper.make_node("Relu", ["scaled"], ["relu"]))
    nodes.append(helper.make_node("Transpose", ["relu"], [output], perm=[0, 2, 3, 1]))
    return _save(path, "terrapatch_test_conv", nodes, inits, dict(zip(names, bands,
                                                                       strict=True)),
                 output, classes)


def _save(path: str | os.PathLike[str], name: str, nodes: list[Any], inits: list[Any],
          inputs: dict[str, int], output: str, classes: int) -> Path:
    """Check and write a graph with uint16 NHWC inputs (name → bands) and a float output."""
    from onnx import TensorProto

    return _write(path, name, nodes, inits,
                  {n: (TensorProto.UINT16, [None, None, None, b]) for n, b in inputs.items()},
                  {output: [None, None, None, classes]})


def _write(path: str | os.PathLike[str], name: str, nodes: list[Any], inits: list[Any],
           inputs: dict[str, tuple[int, list[int | None]]],
           outputs: dict[str, list[int | None]]) -> Path:
    """Check and write a graph: inputs name → (ONNX type, shape), float outputs name → shape."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, kind, shape) for n, (kind, shape) in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in outputs.items()],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    target = Path(path)
    onnx.save(model, target)
    return target


def single_conv_onnx(path: str | os.PathLike[str], bands: int = 4, classes: int = 3,
                     kernel: int = 3, seed: int = 0, name: str = "x",
                     output: str = "scores") -> Path:
    """Write a one-source valid ``kernel × kernel`` convolution ONNX model; return its path."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []
    conv = _conv_branch(helper, name, bands, classes, kernel, rng, nodes, inits)
    nodes.append(helper.make_node("Transpose", [conv], [output], perm=[0, 2, 3, 1]))
    return _save(path, "terrapatch_test_single_conv", nodes, inits, {name: bands}, output,
                 classes)


def segmentation_onnx(path: str | os.PathLike[str], bands: int = 3, classes: int = 4,
                      layers: int = 4, width: int = 16, same: bool = True, seed: int = 0,
                      name: str = "input", output: str = "output",
                      static_channels: bool = True) -> Path:
    """Write a channels-first segmentation model ``[N, bands, H, W] → [N, classes, H, W]``.

    ``layers`` 3 × 3 convolutions (``width`` channels, ReLU between) then a softmax
    over the classes (axis 1). Same-padded (``same``: pads 1, the output keeps the
    input size, halo ``layers`` px) or valid (the output is ``2·layers`` px smaller,
    receptive field ``2·layers + 1``). Float32 input; seeded random weights.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []
    current, channels = name, bands
    for i in range(layers):
        out_channels = classes if i == layers - 1 else width
        weights = rng.normal(0, (2.0 / (9 * channels)) ** 0.5,
                             (out_channels, channels, 3, 3)).astype(np.float32)
        bias = rng.normal(0, 0.1, (out_channels,)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, weights.shape,
                                        weights.ravel()))
        inits.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, bias.shape, bias))
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"conv{i}"],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1] if same else
                                      [0, 0, 0, 0]))
        current = f"conv{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
        channels = out_channels
    nodes.append(helper.make_node("Softmax", [current], [output], axis=1))
    channels_in = bands if static_channels else None
    return _write(path, "terrapatch_test_segmentation", nodes, inits,
                  {name: (TensorProto.FLOAT, [None, channels_in, None, None])},
                  {output: [None, classes, None, None]})


def unet_onnx(path: str | os.PathLike[str], bands: int = 3, classes: int = 4, width: int = 8,
              seed: int = 0, name: str = "input", output: str = "output") -> Path:
    """Write a one-level channels-first U-Net ``[N, bands, H, W] → [N, classes, H, W]``.

    Same-padded 3 × 3 convolution, 2 × 2 max pooling, a convolution at half
    resolution, nearest ×2 upsampling concatenated with the skip connection, a
    convolution to the classes and a softmax. Its input sizes must be even (the
    model's expression field is 2); seeded random weights.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    shapes = {"w1": (width, bands, 3, 3), "w2": (width, width, 3, 3),
              "w3": (classes, 2 * width, 3, 3)}
    inits = [helper.make_tensor(k, TensorProto.FLOAT, shape,
                                rng.normal(0, 0.3, shape).astype(np.float32).ravel())
             for k, shape in shapes.items()]
    inits.append(helper.make_tensor("scales", TensorProto.FLOAT, (4,), [1, 1, 2, 2]))
    same = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", [name, "w1"], ["c1"], pads=same),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=same),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Resize", ["r2", "", "scales"], ["u2"], mode="nearest"),
             helper.make_node("Concat", ["r1", "u2"], ["skip"], axis=1),
             helper.make_node("Conv", ["skip", "w3"], ["c3"], pads=same),
             helper.make_node("Softmax", ["c3"], [output], axis=1)]
    return _write(path, "terrapatch_test_unet", nodes, inits,
                  {name: (TensorProto.FLOAT, [None, bands, None, None])},
                  {output: [None, classes, None, None]})


def super_resolution_onnx(path: str | os.PathLike[str], bands: tuple[int, ...] = (4,),
                          factors: tuple[int, ...] = (4,), channels: int = 4, seed: int = 0,
                          names: tuple[str, ...] = ("input",), output: str = "output") -> Path:
    """Write a channels-last super-resolution model; return its path.

    Source ``i`` (``[N, H_i, W_i, bands[i]]``, float32) goes through a valid 3 × 3
    convolution to ``channels · factors[i]²`` maps and a pixel shuffle by
    ``factors[i]``: ``[N, factors[i]·(H_i - 2), factors[i]·(W_i - 2), channels]``. The
    sources' outputs are added, so they must agree: one source at ``spcscale = 1/k``
    with ``factors = (k,)``, or 10 m + 20 m into 5 m with ``factors = (2, 4)``. Each
    output pixel depends on the 3 × 3 source pixels around the one containing it
    (receptive field ``m + 2`` source pixels for ``k·m`` output pixels).
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []
    branches = []
    for name, b, k in zip(names, bands, factors, strict=True):
        weights = rng.normal(0, 0.3, (channels * k * k, b, 3, 3)).astype(np.float32)
        inits.append(helper.make_tensor(f"{name}_w", TensorProto.FLOAT, weights.shape,
                                        weights.ravel()))
        nodes.append(helper.make_node("Transpose", [name], [f"{name}_nchw"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Conv", [f"{name}_nchw", f"{name}_w"], [f"{name}_conv"],
                                      kernel_shape=[3, 3]))
        nodes.append(helper.make_node("DepthToSpace", [f"{name}_conv"], [f"{name}_sr"],
                                      blocksize=k, mode="CRD"))
        branches.append(f"{name}_sr")
    total = branches[0]
    for i, other in enumerate(branches[1:]):
        nodes.append(helper.make_node("Add", [total, other], [f"sum{i}"]))
        total = f"sum{i}"
    nodes.append(helper.make_node("Transpose", [total], [output], perm=[0, 2, 3, 1]))
    return _write(path, "terrapatch_test_super_resolution", nodes, inits,
                  {n: (TensorProto.FLOAT, [None, None, None, b])
                   for n, b in zip(names, bands, strict=True)},
                  {output: [None, None, None, channels]})
