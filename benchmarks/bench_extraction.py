"""Benchmark: PatchesExtraction of 20 000 samples from a 10 m + 20 m pair.

Prints samples/s and, measured in the same run on the same files:
- the ratio of a naive extraction (one windowed read per sample per source) to ours
  (target ≥ 5);
- the ratio of ours to one full read of all sources (target ≤ 2.0).

Usage: python benchmarks/bench_extraction.py [--size 4096] [--samples 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from terrapatch.extraction import extract_patches
from terrapatch.geometry import Layout, extraction_factor
from terrapatch.patches import write_patches_image
from terrapatch.raster import Source
from terrapatch.testing import make_scene
from terrapatch.vector import read_points, write_points


def make_inputs(directory: Path, size: int, n_samples: int) -> tuple[Path, Path, Path]:
    """Tile a generated 1024-pixel scene up to ``size`` pixels and draw random points."""
    scene = make_scene(directory / "scene", size=1024, n_points=10, seed=1, border=0)
    reps = size // 1024
    paths = []
    for src, name in ((scene.img_10m, "s2_10m_big.tif"), (scene.img_20m, "s2_20m_big.tif")):
        with rasterio.open(src) as ds:
            data = np.tile(ds.read(), (1, reps, reps))
            profile = ds.profile
        profile.update(width=data.shape[2], height=data.shape[1])
        path = directory / name
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        paths.append(path)
    rng = np.random.default_rng(0)
    x0, y0 = scene.transform_10m.c, scene.transform_10m.f
    extent = size * 10.0
    x = x0 + rng.uniform(0, extent, n_samples)
    y = y0 - rng.uniform(0, extent, n_samples)
    points = directory / "points.gpkg"
    write_points(points, x, y, {"class": rng.integers(0, 6, n_samples)}, crs=scene.crs)
    return paths[0], paths[1], points


def naive_extraction(sources: list[Source], points_path: Path, outdir: Path) -> int:
    """One windowed read per sample per source, windows from the same geometry module."""
    grids = [s.grid for s in sources]
    layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),
                    factor=extraction_factor(grids))
    points = read_points(points_path, "class", crs=grids[0].crs)
    starts = layout.sample_windows(points.x, points.y)
    datasets = [rasterio.open(s.paths[0]) for s in sources]
    kept: list[list[np.ndarray]] = [[] for _ in sources]
    labels = []
    for n in range(len(points)):
        patches = []
        for i, (source, ds) in enumerate(zip(sources, datasets, strict=True)):
            c, r = int(starts[i][0][n]), int(starts[i][1][n])
            rx, ry = source.patch_size
            if not layout.inside(i, np.array([c]), np.array([r]))[0]:
                break
            patch = ds.read(window=Window(c, r, rx, ry))
            if source.nodata is not None and (patch == source.nodata).any():
                break
            patches.append(patch.transpose(1, 2, 0))
        else:
            for i, p in enumerate(patches):
                kept[i].append(p)
            labels.append(points.labels[n])
    for ds in datasets:
        ds.close()
    for i, source in enumerate(sources):
        rx, ry = source.patch_size
        write_patches_image(outdir / f"naive_{i}.tif", [np.stack(kept[i])],
                            n_patches=len(kept[i]), patch_size_x=rx, patch_size_y=ry,
                            bands=source.bands, spacing=source.grid.spacing)
    return len(labels)


def full_read(sources: list[Source]) -> None:
    """Read every band of every source once, whole."""
    for source in sources:
        with rasterio.open(source.paths[0]) as ds:
            ds.read()


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="10 m image size (multiple of 1024)")
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        img10, img20, points = make_inputs(d, args.size, args.samples)
        sources = [Source(img10, 16, 0, name="source1"), Source(img20, 8, 0, name="source2")]
        full_read(sources)  # warm the OS cache for everyone
        timings: dict[str, float] = {}
        t = time.perf_counter()
        full_read(sources)
        timings["full_read"] = time.perf_counter() - t
        t = time.perf_counter()
        summary = extract_patches(sources, points, "class", [d / "p10.tif", d / "p20.tif"],
                                  labels_out=d / "labels.tif", quiet=True)
        timings["ours"] = time.perf_counter() - t
        t = time.perf_counter()
        n_naive = naive_extraction(sources, points, d)
        timings["naive"] = time.perf_counter() - t
        assert n_naive == summary.n_collected, (n_naive, summary.n_collected)
    rate = summary.n_collected / timings["ours"]
    vs_naive = timings["naive"] / timings["ours"]
    vs_full = timings["ours"] / timings["full_read"]
    print(f"extraction: {summary.n_collected} samples of {args.samples} from a "
          f"{args.size}² 10 m (4 bands) + {args.size // 2}² 20 m (6 bands) pair")
    print(f"  ours      {timings['ours']:7.2f} s  ({rate:,.0f} samples/s)")
    print(f"  naive     {timings['naive']:7.2f} s  (one windowed read per sample per source)")
    print(f"  full read {timings['full_read']:7.2f} s  (every source read once, whole)")
    print(f"RESULT extraction samples_per_s={rate:.0f} naive_over_ours={vs_naive:.2f} "
          f"ours_over_full_read={vs_full:.2f}")


if __name__ == "__main__":
    main()
