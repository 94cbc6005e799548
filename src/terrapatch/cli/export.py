"""The ``terrapatch export`` command: export a ``.keras`` model and record how it serves.

``terrapatch export model.keras --onnx model.onnx --savedmodel model_savedmodel`` writes
the exports (:func:`terrapatch.export.export_model`). With ``--source
PLACEHOLDER=RASTER`` for each input, it also plans a serving run of the exported
model on those rasters (receptive and expression fields derived from the model, or
given with ``--rfield``) and records the contract in every export, with a STAC MLM Item
beside it (:func:`terrapatch.serve.describe.record_contract`, docs/models.md); a
later ``TensorflowModelServe`` then needs only the rasters and the model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from terrapatch.cli.parsing import CommandParser
from terrapatch.errors import InputError
from terrapatch.spelling import SOURCE, respelled

__all__ = ["main"]


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="terrapatch export",
        description="Export a .keras model to a TensorFlow SavedModel and/or an ONNX file, "
                    "and record how it serves.")
    parser.add_argument("model", help="input .keras model file")
    parser.add_argument("--savedmodel", help="output SavedModel directory")
    parser.add_argument("--onnx", help="output ONNX file")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: tf2onnx's)")
    group = parser.add_argument_group(
        "serving contract (recorded in the exports, with a STAC MLM Item beside each)")
    group.add_argument("--source", action="append", default=[], metavar="PLACEHOLDER=RASTER",
                       help="a raster the model input PLACEHOLDER is served on (its bands, "
                            "spacing and nodata are recorded); repeat per input, source 1 "
                            "first")
    group.add_argument("--rfield", action="append", default=[], metavar="PLACEHOLDER=N",
                       help="receptive field of an input (default: derived from the model)")
    group.add_argument("--nodata", action="append", default=[], metavar="PLACEHOLDER=V",
                       help="no-data value of an input")
    group.add_argument("--bands", action="append", default=[], metavar="PLACEHOLDER=B1,B2",
                       help="band names of an input")
    group.add_argument("--scale", action="append", default=[], metavar="PLACEHOLDER=V",
                       help="the model takes the input's values times V")
    group.add_argument("--fullyconv", action="store_true",
                       help="the model serves fully-convolutionally (else patch-based)")
    group.add_argument("--spcscale", default=None, help="output spacing in source-1 pixels "
                       "(k, or 1/k for super-resolution; default 1)")
    group.add_argument("--efield", type=int, default=None,
                       help="expression field (default: derived from the model)")
    group.add_argument("--output", action="append", default=[], metavar="NAME",
                       help="model outputs served (default: the first)")
    group.add_argument("--classes", default=None, metavar="FILE",
                       help="class values, names and colours of the first output: CSV "
                            "value,name[,#rrggbb] or JSON {\"0\": [\"water\", \"#0000ff\"]}")
    group.add_argument("--name", default=None, help="model name recorded")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


#: The options of ``terrapatch export``, for the neutral identifiers the API names.
EXPORT_NAMES = {
    "savedmodel": "--savedmodel", "onnx": "--onnx", "spcscale": "--spcscale",
    "efield": "--efield", "efield[0]": "--efield", "efield[1]": "--efield",
    "output_names": "--output", "classes": "--classes", SOURCE: "--source",
    f"{SOURCE}.paths": "--source", f"{SOURCE}.patch_size": "--rfield",
    f"{SOURCE}.patch_size[0]": "--rfield", f"{SOURCE}.patch_size[1]": "--rfield",
    f"{SOURCE}.nodata": "--nodata", f"{SOURCE}.placeholder": "--source",
}


def _keyed(items: Sequence[str], option: str) -> dict[str, str]:
    """``PLACEHOLDER=VALUE`` items as a dict, or a one-line error naming the option."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(f"{option}: {item!r} is not of the form PLACEHOLDER=VALUE")
        pairs[key] = value
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``terrapatch export``; returns 0 (bad input raises a one-line error)."""
    args = _parser().parse_args(list(argv or []))
    from terrapatch.export import export_model

    sources = list(_keyed(args.source, "--source").items())
    options = {name: _keyed(getattr(args, name), f"--{name}")
               for name in ("rfield", "nodata", "bands", "scale")}
    if not sources and any(options.values()):
        raise InputError("--source: give the rasters the model serves on to record a contract")
    for name, values in options.items():
        unknown = sorted(set(values) - {p for p, _ in sources})
        if unknown:
            raise InputError(f"--{name}: {', '.join(unknown)} is not a --source placeholder")
    with respelled(EXPORT_NAMES):
        recorded = _contract_inputs(args, sources, options) if sources else None
        written = export_model(args.model, savedmodel=args.savedmodel, onnx=args.onnx,
                               opset=args.opset)
        for kind, path in written.items():
            print(f"{kind}: {os.fspath(path)}")
        if recorded is not None:
            _record(args, recorded, list(written.values()))
    return 0


def _contract_inputs(args: argparse.Namespace, sources: list[tuple[str, str]],
                     options: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The sources and what the contract records of them, checked before anything is written.

    Returns :func:`~terrapatch.serve.describe.record_contract`'s keywords for them.
    """
    from terrapatch.raster import Source
    from terrapatch.serve.describe import read_classes
    from terrapatch.serve.transforms import Normalization

    def number(name: str, placeholder: str) -> float | None:
        text = options[name].get(placeholder)
        try:
            return None if text is None else float(text)
        except ValueError:
            raise InputError(f"--{name}: {placeholder}={text!r} is not a number") from None

    rasters = []
    for k, (placeholder, path) in enumerate(sources):
        rf = number("rfield", placeholder)
        source = Source(path, None if rf is None else int(rf), nodata=number("nodata", placeholder),
                        placeholder=placeholder, name=f"source{k + 1}")
        _ = source.grid  # the rasters exist and are georeferenced
        rasters.append(source)
    scales = [number("scale", p) for p, _ in sources]
    return {
        "sources": rasters,
        "band_names": [None if p not in options["bands"] else options["bands"][p].split(",")
                       for p, _ in sources],
        "classes": read_classes(args.classes) if args.classes else None,
        "normalization": [None if s is None else Normalization(scale=s) for s in scales],
    }


def _record(args: argparse.Namespace, recorded: dict[str, Any],
            models: list[os.PathLike[str]]) -> None:
    """Plan a run of the first export on the sources; record the contract in every export."""
    from terrapatch.serve.describe import record_contract

    contract = record_contract(models, output_names=args.output or None, name=args.name,
                               fullyconv=args.fullyconv, spcscale=args.spcscale,
                               efield=args.efield, **recorded)
    fields = ", ".join(f"{i.placeholder} rf {i.receptive_field[0]}" for i in contract.inputs)
    print(f"contract: {fields}; efield {contract.outputs[0].expression_field[0]}, "
          f"spcscale {contract.outputs[0].spcscale:g} ({contract.kind})")
