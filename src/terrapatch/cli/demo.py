"""The ``terrapatch demo`` command: its options, passed to :func:`.demo_workflow.run_demo`."""

from __future__ import annotations

from collections.abc import Sequence

from terrapatch.cli.parsing import CommandParser
from terrapatch.spelling import respelled

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``terrapatch demo [OUTDIR] [--size N] [--epochs N] [--quiet]``; returns the exit code."""
    from terrapatch.cli.demo_workflow import MAX_SIZE, MIN_SIZE, run_demo

    parser = CommandParser(prog="terrapatch demo",
                           description="The seed's whole workflow on a synthetic scene.")
    parser.add_argument("outdir", nargs="?", default="demo_out", help="output directory")
    parser.add_argument("--size", type=int, default=512, help="10 m scene size in pixels "
                        f"(even, {MIN_SIZE}..{MAX_SIZE})")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs per model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(list(argv or []))
    with respelled({"size": "--size", "epochs": "--epochs"}):
        return run_demo(args.outdir, args.size, args.epochs, args.quiet)
