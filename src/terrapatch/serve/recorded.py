"""Serving parameters recorded with the model (its contract): fill in what the caller left out.

A model exported by ``terrapatch export`` carries a
:class:`~terrapatch.contract.ServingContract` (docs/models.md). Serving reads it and
uses each recorded value only where the caller gave none: placeholders, receptive
fields and nodata per source, output names, mode, expression field, spcscale,
normalisation, tensor layout, and the class colours and names of the map. Sources
are matched to the contract's inputs by placeholder when they name one, else by
position; a source whose band count differs from the recorded one is an error.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from terrapatch.contract import (
    ContractInput,
    ServingContract,
    contract_defaults,
    read_contract,
)
from terrapatch.errors import InputError
from terrapatch.raster import Source

__all__ = ["Recorded", "recorded_for"]


@dataclass
class Recorded:
    """A model's contract as serving defaults (empty when the model records none).

    Attributes
    ----------
    contract
        The contract, or None.
    defaults
        :func:`~terrapatch.contract.contract_defaults` of it (``{}`` without one).
    """

    contract: ServingContract | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def value(self, given: Any, key: str, fallback: Any) -> Any:
        """``given`` when the caller gave it (not None), else the recorded value or ``fallback``."""
        if given is not None:
            return given
        recorded = self.defaults.get(key)
        return fallback if recorded is None else recorded

    def sources(self, sources: Sequence[Source]) -> list[Source]:
        """The sources with recorded placeholders, receptive fields and nodata filled in.

        Raises
        ------
        InputError
            If the number of sources or a source's band count differs from the
            contract (naming the source and both counts).
        """
        if self.contract is None:
            return list(sources)
        inputs = self.contract.inputs
        if len(sources) != len(inputs):
            raise InputError(
                f"sources: the model's contract records {len(inputs)} input(s) "
                f"({', '.join(i.placeholder for i in inputs)}), {len(sources)} source(s) given")
        by_name = {i.placeholder: i for i in inputs}
        filled = []
        for position, source in enumerate(sources):
            item = by_name.get(source.placeholder or "", inputs[position])
            _check_bands(source, item)
            done = copy.copy(source)
            if done.placeholder is None:
                done.placeholder = item.placeholder
            if done.patch_size is None:
                done.patch_size = item.receptive_field
            if done.nodata is None and item.nodata is not None:
                done.nodata = float(item.nodata)
            filled.append(done)
        return filled

    def normalizations(self, given: Sequence[Any] | None, sources: Sequence[Source]
                       ) -> list[Any] | None:
        """Per-source normalisation: the caller's where given, else the recorded one."""
        if self.contract is None:
            return None if given is None else list(given)
        by_name = {i.placeholder: i.normalization for i in self.contract.inputs}
        chosen = list(given) if given is not None else [None] * len(sources)
        return [g if g is not None else by_name.get(s.placeholder or "")
                for g, s in zip(chosen, sources, strict=True)]


def _check_bands(source: Source, item: ContractInput) -> None:
    if source.bands == item.bands:
        return
    listed = ""
    if item.band_names:
        shown = list(item.band_names[:3]) + (["…"] if len(item.band_names) > 3 else [])
        listed = f" ({', '.join(shown)})"
    raise InputError(f"{source.name}: the model's contract expects {item.bands} bands"
                     f"{listed} for {item.placeholder!r}, the raster has {source.bands}")


def recorded_for(model: Any) -> Recorded:
    """The contract of ``model`` (a path) as serving defaults; empty for other models."""
    if not isinstance(model, str | os.PathLike) or not os.path.exists(model):
        return Recorded()
    contract = read_contract(model)
    if contract is None:
        return Recorded()
    return Recorded(contract, contract_defaults(contract))
