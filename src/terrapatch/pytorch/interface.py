"""Named inputs and outputs of a PyTorch model: how terrapatch's placeholders map to its call.

PyTorch models take positional arguments, not named tensors. :func:`read_interface`
names them, for the three kinds of model terrapatch serves:

- an :class:`torch.nn.Module`: the argument names of ``forward``
  (:func:`inspect.signature`; arguments with a default are left to it), or, for an
  argument that is a dict of tensors, its keys (read from a :mod:`torch.fx` trace);
- a ``torch.export`` :class:`~torch.export.ExportedProgram`: the names of its user
  inputs (its graph signature), or the keys of a dict input (its input tree spec);
- a TorchScript module: the argument names of its ``forward`` schema, or the
  constant keys a dict argument is indexed with in its graph.

Outputs are named from what the model returns: a tensor is :data:`SINGLE_OUTPUT`,
a tuple or list gives ``output_0``, ``output_1``, ..., a dict gives its keys
(:func:`name_outputs`). The structure is read before running when the model shows
it (fx trace, output tree spec, schema), else assumed to be one tensor.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from terrapatch.engines import TensorInfo
from terrapatch.errors import ModelError

__all__ = ["SINGLE_OUTPUT", "Interface", "name_outputs", "numpy_dtype", "read_interface"]

#: Name of the output of a model that returns one tensor.
SINGLE_OUTPUT = "output"

#: One positional argument: a tensor (its name) or a dict of tensors (its keys).
Slot = str | tuple[str, ...]


@dataclass
class Interface:
    """How named tensors become a model call, and its outputs names.

    Attributes
    ----------
    inputs
        Input name → description, channels first (shapes None when not static).
    outputs
        Output name → description (shapes None when not static).
    pack
        Named tensors → ``(args, kwargs)`` of the call.
    structure
        What the model returns: ``"tensor"``, ``"sequence"`` or ``"dict"``, or None
        when unknown before running.
    aliases
        Other accepted output names → output name (``output_0`` for a single tensor).
    """

    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    pack: Callable[[Mapping[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]
    structure: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)


def numpy_dtype(value: Any, default: np.dtype | None = None) -> np.dtype:
    """Numpy dtype of a torch dtype (``default``, else float32, when there is none)."""
    if isinstance(value, torch.dtype):
        return np.dtype(torch.empty((), dtype=value).numpy().dtype)
    return default if default is not None else np.dtype("float32")


def _unknown(names: Sequence[str], dtype: np.dtype) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, None, dtype) for n in names}


def _slots_pack(slots: Sequence[Slot]) -> Callable[[Mapping[str, Any]],
                                                    tuple[tuple[Any, ...], dict[str, Any]]]:
    """Pack named tensors as positional arguments (a tensor or a dict per slot)."""

    def pack(feed: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(feed[s] if isinstance(s, str) else {k: feed[k] for k in s} for s in slots)
        return args, {}

    return pack


def _flat(slots: Sequence[Slot]) -> list[str]:
    names = [n for s in slots for n in ((s,) if isinstance(s, str) else s)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelError(f"model: the PyTorch model's inputs are named {dupes} more than "
                         "once (argument names and dict keys)")
    return names


def _outputs_from(structure: str | None, count: int, keys: Sequence[str],
                  output_names: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """Output names (and aliases) for a return structure."""
    if output_names:
        return list(output_names), {}
    if structure == "dict":
        return list(keys), {}
    if structure == "sequence":
        return [f"output_{i}" for i in range(count)], {}
    return [SINGLE_OUTPUT], {"output_0": SINGLE_OUTPUT}


def name_outputs(result: Any, output_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Name what a model returned: a tensor, a tuple or list of tensors, or a dict of them.

    Parameters
    ----------
    result
        The model's return value.
    output_names
        Names given by the user for a tensor or a sequence (in order); a dict keeps its
        keys.

    Raises
    ------
    ModelError
        If the value is none of these, or ``output_names`` does not fit it.
    """
    if isinstance(result, torch.Tensor):
        items: list[tuple[str, Any]] = [(SINGLE_OUTPUT, result)]
    elif isinstance(result, Mapping):
        return {str(k): v for k, v in result.items()}
    elif isinstance(result, tuple | list):
        items = [(f"output_{i}", v) for i, v in enumerate(result)]
    else:
        raise ModelError(f"the PyTorch model returned a {type(result).__name__}; terrapatch "
                         "serves a tensor, a tuple or list of tensors, or a dict of tensors")
    if output_names:
        if len(output_names) != len(items):
            raise ModelError(f"output_names: {list(output_names)} names {len(output_names)} "
                             f"output(s), but the PyTorch model returned {len(items)}")
        return dict(zip(output_names, (v for _, v in items), strict=True))
    return dict(items)


# ---------------------------------------------------------------------- nn.Module


def _fx_interface(module: torch.nn.Module) -> tuple[dict[str, list[str]], str | None,
                                                    int, list[str]]:
    """From an fx trace: dict keys read per argument, return structure, count and keys."""
    graph = torch.fx.symbolic_trace(module).graph
    keys: dict[str, list[str]] = {}
    output: Any = None
    for node in graph.nodes:
        if node.op == "placeholder":
            users = list(node.users)
            if users and all(u.op == "call_function" and u.target is operator.getitem
                             and isinstance(u.args[1], str) for u in users):
                keys[node.target] = list(dict.fromkeys(u.args[1] for u in users))
        elif node.op == "output":
            output = node.args[0]
    if isinstance(output, Mapping):
        return keys, "dict", len(output), [str(k) for k in output]
    if isinstance(output, tuple | list):
        return keys, "sequence", len(output), []
    return keys, "tensor", 1, []


def _looks_like_dict(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    origin = getattr(annotation, "__origin__", None)
    return origin in (dict, Mapping) or str(text).split("[")[0].split(".")[-1] in (
        "dict", "Dict", "Mapping")


def module_interface(module: torch.nn.Module, output_names: Sequence[str] | None = None,
                     input_keys: Mapping[str, Sequence[str]] | None = None) -> Interface:
    """Interface of a Python :class:`torch.nn.Module` (see the module docstring)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model: cannot read the arguments of {type(module).__name__}.forward:"
                         f" {exc}") from None
    params = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ModelError(f"model: {type(module).__name__}.forward takes *{p.name}; "
                             "terrapatch names inputs by argument: give them names")
        if p.default is p.empty:
            params.append(p)
    try:
        traced_keys, structure, count, out_keys = _fx_interface(module)
        reason = ""
    except Exception as exc:  # data-dependent Python: the trace is only a hint
        traced_keys, structure, count, out_keys = {}, None, 1, []
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    given = dict(input_keys or {})
    slots: list[Slot] = []
    for p in params:
        if p.name in given:
            slots.append(tuple(given[p.name]))
        elif p.name in traced_keys:
            slots.append(tuple(traced_keys[p.name]))
        elif _looks_like_dict(p.annotation):
            raise ModelError(f"input_keys: cannot find the keys of the dict argument {p.name!r}"
                             f" of {type(module).__name__}.forward (torch.fx could not trace "
                             f"it: {reason}); give input_keys={{{p.name!r}: [...]}}")
        else:
            slots.append(p.name)
    dtype = next((numpy_dtype(q.dtype) for q in module.parameters()
                  if q.is_floating_point()), np.dtype("float32"))
    names, aliases = _outputs_from(structure, count, out_keys, output_names)
    return Interface(_unknown(_flat(slots), dtype), _unknown(names, dtype), _slots_pack(slots),
                     structure, aliases)


# ---------------------------------------------------------------------- torch.export


def _shape_info(name: str, value: Any) -> TensorInfo:
    """Description of a fake tensor from an exported graph: symbolic sizes become None."""
    if not isinstance(value, torch.Tensor):
        return TensorInfo(name, None, np.dtype("float32"))
    dims = tuple(int(d) if isinstance(d, int) else None for d in value.shape)
    return TensorInfo(name, dims, numpy_dtype(value.dtype))


def _leaf_names(spec: Any, fallback: Sequence[str]) -> list[str]:
    """Leaf names of a tree spec: the innermost dict key on a leaf's path, else ``fallback``."""
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = list(fallback)
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        keys = [k.key for k in path if isinstance(k, pytree.MappingKey)]
        if keys and (len(path) > 2 or not fallback):
            names[leaf] = str(keys[-1])
    return names


def program_interface(program: torch.export.ExportedProgram,
                      output_names: Sequence[str] | None = None) -> Interface:
    """Interface of a ``torch.export`` program (see the module docstring)."""
    signature = program.graph_signature
    user_inputs = list(signature.user_inputs)
    in_spec = program.call_spec.in_spec
    out_spec = program.call_spec.out_spec
    names = _leaf_names(in_spec, [str(n) for n in user_inputs]) if in_spec else list(
        map(str, user_inputs))
    _flat(names)
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = {name: _shape_info(name, nodes[str(node)].meta.get("val"))
              for name, node in zip(names, user_inputs, strict=True)}
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [getattr(v, "meta", {}).get("val") for v in pytree.tree_leaves(output_node.args)]
    structure, keys = "tensor", []
    if out_spec is not None:
        tree = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
        if isinstance(tree, Mapping):
            structure, keys = "dict", [str(k) for k in tree]
        elif isinstance(tree, tuple | list):
            structure = "sequence"
    out_names, aliases = _outputs_from(structure, len(values), keys, output_names)
    outputs = {n: (_shape_info(n, v) if len(values) == len(out_names) else
                   TensorInfo(n, None, np.dtype("float32")))
               for n, v in zip(out_names, values + [None] * len(out_names), strict=False)}

    def pack(feed: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = pytree.tree_unflatten([feed[n] for n in names], in_spec)
        return tuple(args), dict(kwargs)

    return Interface(inputs, outputs, pack, structure, aliases)


# ---------------------------------------------------------------------- TorchScript


def _constant(value: Any) -> Any:
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def script_interface(module: torch.jit.ScriptModule,
                     output_names: Sequence[str] | None = None) -> Interface:
    """Interface of a TorchScript module (see the module docstring)."""
    forward: Any = module.forward
    schema, graph = forward.schema, forward.graph
    graph_inputs = list(graph.inputs())[1:]  # after self
    nodes = list(graph.nodes())
    slots: list[Slot] = []
    for arg, value in zip(schema.arguments[1:], graph_inputs, strict=True):
        if arg.default_value is not None:
            continue
        if isinstance(arg.type, torch._C.DictType):
            keys = [_constant(n.inputsAt(1)) for n in nodes if n.kind() == "aten::__getitem__"
                    and n.inputsAt(0).unique() == value.unique()]
            if not keys or not all(isinstance(k, str) for k in keys):
                raise ModelError(f"model: cannot find the keys of the dict argument "
                                 f"{arg.name!r} of the TorchScript forward (not indexed with "
                                 "constant strings)")
            slots.append(tuple(dict.fromkeys(keys)))
        else:
            slots.append(arg.name)
    returns = schema.returns[0].type
    structure: str | None = "tensor"
    count, keys = 1, []
    if isinstance(returns, torch._C.TupleType):
        structure, count = "sequence", len(returns.elements())
    elif isinstance(returns, torch._C.ListType):
        structure, count = None, 1
    elif isinstance(returns, torch._C.DictType):
        made = graph.return_node().inputsAt(0).node()
        found = [_constant(made.inputsAt(i)) for i in range(0, made.inputsSize(), 2)] if (
            made.kind() == "prim::DictConstruct") else []
        structure, keys = ("dict", [str(k) for k in found]) if found and None not in found \
            else (None, [])
    names, aliases = _outputs_from(structure, count, keys, output_names)
    dtype = np.dtype("float32")
    return Interface(_unknown(_flat(slots), dtype), _unknown(names, dtype), _slots_pack(slots),
                     structure, aliases)


def read_interface(model: Any, output_names: Sequence[str] | None = None,
                   input_keys: Mapping[str, Sequence[str]] | None = None) -> Interface:
    """Interface of an ``nn.Module``, TorchScript module or ``torch.export`` program."""
    if isinstance(model, torch.export.ExportedProgram):
        return program_interface(model, output_names)
    if isinstance(model, torch.jit.ScriptModule):
        return script_interface(model, output_names)
    return module_interface(model, output_names, input_keys)
