"""The ``terrapatch demo`` command: the seed workflow on the embedded synthetic scene.

Steps: generate a Sentinel-2-like 10 m / 20 m scene with labelled points, then
extract two-source patches for the training and validation points, exactly as
the seed's ``PatchesExtraction`` script does (10 m patches 16 × 16, 20 m patches
8 × 8, nodata 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from terrapatch.apps import get_app
from terrapatch.progress import logger
from terrapatch.testing import make_scene


def extract(scene_dir: Path, out: Path, quiet: bool) -> dict[str, dict[str, Path]]:
    """Run the seed's two-source PatchesExtraction for the train and valid points."""
    patches_extraction = get_app("PatchesExtraction")
    written: dict[str, dict[str, Path]] = {}
    for split in ("train", "valid"):
        files = {
            "img_10m": out / f"{split}_img_10m_2src.tif",
            "img_20m": out / f"{split}_img_20m_2src.tif",
            "labels": out / f"{split}_labels_2src.tif",
        }
        patches_extraction(
            n_sources=2, quiet=quiet,
            source1_il=scene_dir / "s2_10m.tif", source1_patchsizex=16, source1_patchsizey=16,
            source1_out=files["img_10m"], source1_nodata=0,
            source2_il=scene_dir / "s2_20m.tif", source2_patchsizex=8, source2_patchsizey=8,
            source2_out=files["img_20m"], source2_nodata=0,
            vec=scene_dir / f"points_{split}.geojson", field="class",
            outlabels=files["labels"],
        )
        written[split] = files
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="terrapatch demo", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", default="demo_out", help="output directory")
    parser.add_argument("--size", type=int, default=512, help="10 m scene size in pixels")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scene = make_scene(out / "scene", size=args.size)
    logger.info("demo: scene written to %s", scene.directory)
    extract(scene.directory, out, args.quiet)
    logger.info("demo: done in %.1f s; outputs in %s", time.perf_counter() - start, out)
    return 0
