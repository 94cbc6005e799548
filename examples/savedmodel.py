"""Convert a trained ``.keras`` model into a TensorFlow SavedModel (and optionally ONNX).

The SavedModel's ``serving_default`` signature takes the model inputs by name
(``input_10m``, ``input_20m``) and returns the outputs by key (``estimated``,
``estimated_labels``, ``features``, ...), with free batch, rows and columns, so it
serves in patch-based or fully-convolutional mode. Example::

    python examples/savedmodel.py --model model2_dualsrc.keras \
        --savedmodel model2_dualsrc_savedmodel

Same as ``terrapatch export model2_dualsrc.keras --savedmodel model2_dualsrc_savedmodel``.
"""

from __future__ import annotations

import argparse
import sys

from terrapatch.errors import TerrapatchError
from terrapatch.export import export_model


def main(argv=None):
    """Export the model; print the outputs written."""
    parser = argparse.ArgumentParser(description="Convert a .keras model to a SavedModel")
    parser.add_argument("--model", required=True, help="input .keras model file")
    parser.add_argument("--savedmodel", required=True, help="output SavedModel directory")
    parser.add_argument("--onnx", default=None, help="also write this ONNX file")
    params = parser.parse_args(argv)
    try:
        written = export_model(params.model, savedmodel=params.savedmodel, onnx=params.onnx)
    except TerrapatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
