"""Shared command line of the four inference scripts (model path, output, box)."""

import argparse

from paths import OUT, savedmodel

# The seed maps box=2000:2000:500:500 of a Tokyo scene; the Brandenburg scene's 20 m
# output grid is about 760 × 376 pixels, so the walkthrough maps a box inside it.
BOX = "box=100:50:500:300"


def parse(description, default_name):
    """Parse --savedmodel and --out; return the namespace."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--savedmodel", default=savedmodel, help="SavedModel directory")
    parser.add_argument("--out", default=str(OUT / default_name), help="output map")
    return parser.parse_args()
