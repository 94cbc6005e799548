"""Binding a model to the sources: which model input each source feeds, which outputs are served.

Sources name their model input (``placeholder``) or take the free inputs in
alphabetical order; outputs are found by signature key or layer name. Every
mismatch (unknown name, an input fed twice or never) is an error naming the
parameter and listing what the model offers; band counts are checked with the
tensor layout (:mod:`terrapatch.serve.layouts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from terrapatch.engines import Engine
from terrapatch.errors import InputError, ModelError
from terrapatch.progress import logger
from terrapatch.raster import Source

__all__ = ["resolve_inputs", "resolve_outputs"]


def resolve_inputs(engine: Engine, sources: Sequence[Source],
                    user_inputs: Mapping[str, np.ndarray]) -> list[str]:
    """Model input of each source; unnamed sources take the remaining inputs alphabetically."""
    users = {engine.resolve_input(k, "user_placeholders") for k in user_inputs}
    named: list[str | None] = []
    for s in sources:
        if s.placeholder:
            named.append(engine.resolve_input(s.placeholder, f"{s.name}.placeholder"))
        else:
            named.append(None)
    free = sorted(n for n in engine.input_names if n not in users and n not in named)
    names: list[str] = []
    for s, name in zip(sources, named, strict=True):
        if name is None:
            if not free:
                raise ModelError(
                    f"{s.name}.placeholder: not given and no model input is left for it "
                    f"(inputs: {', '.join(engine.input_names)})"
                )
            name = free.pop(0)
            logger.info("%s feeds model input %r (first free input in alphabetical order)",
                        s.name, name)
        names.append(name)
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InputError(f"sourceK.placeholder: model input(s) {sorted(dupes)} fed by several "
                         "sources")
    unfed = [n for n in engine.input_names if n not in names and n not in users]
    if unfed:
        raise ModelError(
            f"model: model input(s) {unfed} are fed by no source and no "
            "user_placeholders entry"
        )
    return names


def resolve_outputs(engine: Engine, output_names: Sequence[str] | str | None) -> list[str]:
    """Model outputs to serve, resolved; default: the first output in alphabetical order."""
    if isinstance(output_names, str):
        output_names = output_names.split()
    names = [n for n in (output_names or []) if n]
    if not names:
        first = sorted(engine.output_names)[0]
        if len(engine.output_names) > 1:
            logger.warning("output_names not given: serving %r, the first of the model outputs "
                           "%s in alphabetical order", first, sorted(engine.output_names))
        return [first]
    return [engine.resolve_output(n, "output_names") for n in names]
