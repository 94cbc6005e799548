"""Benchmark: TensorflowModelServe of the seed model over synthetic 10 m / 20 m rasters.

Measured in one run, on the same generated files (uint16, tiled, DEFLATE):

- fully-convolutional serving over a ``--size``² output (default 4000×4000 px at 20 m,
  i.e. 20 m and 10 m inputs of 4007² and 8014² pixels): output px/s, and the ratio of
  end-to-end time to the model's pure compute time on the same tiles (inputs read
  beforehand, model calls only; target ≤ 1.10);
- the same with the ONNX engine, and the ratio of a naive sequential
  read → onnxruntime → write loop over the same tiles to it (when ONNX export works);
- patch-based serving over a ``--pb-size``² output: px/s and end-to-end / compute
  (target ≤ 1.25);
- peak RSS of fully-convolutional serving for two output sizes 4× apart in area, each in
  its own subprocess (target ratio ≤ 1.2).

Timed runs are repeated ``--repeats`` times and the best is kept (the machine may be
shared). Ends with ``RESULT serve_* ...`` lines.

    python benchmarks/bench_serve.py [--size 4000] [--pb-size 400] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from terrapatch.engines import load_engine
from terrapatch.raster import Source
from terrapatch.serve import ServeJob, prepare_serve
from terrapatch.writer import geotiff_profile

X0, Y0 = 600000.0, 5000000.0
CRS = "EPSG:32631"
BLOCK = 1024


def _pattern(bands: int, seed: int, low: int = 0) -> np.ndarray:
    """A 1024² block of reflectance-like texture (smooth fields + noise), uint16 ≥ ``low``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:BLOCK, 0:BLOCK] / BLOCK
    out = np.empty((bands, BLOCK, BLOCK), dtype=np.uint16)
    for b in range(bands):
        fx, fy, phase = rng.uniform(2, 9, 3)
        field = 2500 + 1500 * np.sin(2 * np.pi * (fx * xx + phase)) * np.cos(2 * np.pi * fy * yy)
        out[b] = np.clip(field + rng.normal(0, 150, field.shape), low, 10000).astype(np.uint16)
    return out


def write_source(path: Path, size: int, bands: int, spacing: float, seed: int) -> Path:
    """Write a ``size``² raster by tiling a generated block (fast, compressible)."""
    if path.exists():
        return path
    block = _pattern(bands, seed)
    profile = geotiff_profile(size, size, bands, np.dtype("uint16"), crs=CRS,
                              transform=Affine(spacing, 0, X0, 0, -spacing, Y0))
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as ds:
        for r in range(0, size, BLOCK):
            for c in range(0, size, BLOCK):
                h, w = min(BLOCK, size - r), min(BLOCK, size - c)
                ds.write(block[:, :h, :w], window=Window(c, r, w, h))
    tmp.rename(path)
    return path


def workdir(path: Path | None, prefix: str) -> tuple[Any, Path]:
    """``(TemporaryDirectory or None, directory)``: ``path`` if given, else a temp dir."""
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        return tmp, Path(tmp.name)
    path.mkdir(parents=True, exist_ok=True)
    return None, path


def make_pair(directory: Path, size: int) -> tuple[Path, Path]:
    """20 m and 10 m rasters whose seed-model output grid is ``size``² at 20 m."""
    p20 = write_source(directory / f"s20_{size}.tif", size + 7, 6, 20.0, 1)
    p10 = write_source(directory / f"s10_{size}.tif", 2 * (size + 7), 4, 10.0, 2)
    return p20, p10


def sources(p20: Path, p10: Path) -> list[Source]:
    """Seed Q1: 20 m as source1 (rf 8), 10 m as source2 (rf 16)."""
    return [Source(p20, 8, placeholder="input_20m", name="source1"),
            Source(p10, 16, placeholder="input_10m", name="source2")]


def compute_only(job: ServeJob) -> float:
    """Seconds spent in model calls over the job's tiles, inputs read beforehand."""
    runner = job.runner
    readers = runner.open_readers()
    total = 0.0
    try:
        for tile in job.tiles:
            feed = runner.read(readers, tile)
            if feed is None:
                continue
            start = time.perf_counter()
            job.engine.run(feed, runner.output_names)
            total += time.perf_counter() - start
    finally:
        for reader in readers:
            reader.close()
    return total


def naive_onnx(job: ServeJob, onnx_path: Path, out: Path) -> float:
    """A sequential read → onnxruntime → write loop over the same tiles and windows."""
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    grid = job.output_grid
    profile = geotiff_profile(grid.width, grid.height, 1, np.dtype("uint8"), crs=grid.crs,
                              transform=grid.transform)
    datasets = [rasterio.open(p) for s in job.sources for p in s.paths]
    with rasterio.open(out, "w", **profile) as dst:
        for tile in job.tiles:
            col, row, w, h = tile.window
            feed = {}
            for ds, name, region in zip(datasets, job.runner.input_names,
                                        job.layout.tile_regions(col, row, w, h), strict=True):
                data = ds.read(window=region)
                feed[name] = data.transpose(1, 2, 0)[None].astype(np.float32)
            (labels,) = session.run(["estimated_labels"], feed)
            dst.write(labels[0, :, :, 0].astype(np.uint8)[None], window=Window(col, row, w, h))
    for ds in datasets:
        ds.close()
    return time.perf_counter() - start


def timed_serve(job: ServeJob, out: Path) -> float:
    """Wall seconds of a full serving run (file written and renamed)."""
    return job.run(out, "uint8", quiet=True).seconds


def rss_child(p20: str, p10: str, model: str, out: str, tile: int) -> None:
    """Serve in this process; print RSS (MiB) before serving, peak while serving, as JSON."""
    import threading

    import psutil

    job = prepare_serve(sources(Path(p20), Path(p10)), model, "estimated_labels",
                        fullyconv=True, tile_size=tile)
    process = psutil.Process()
    before = process.memory_info().rss / 2**20
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = job.run(out, "uint8", quiet=True)
    done.set()
    sampler.join()
    print(json.dumps({
        "before_mb": before, "serving_peak_mb": peak[0],
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pixels": summary.width * summary.height, "seconds": summary.seconds,
    }))


def measure_rss(work: Path, size: int, model: Path, tile: int) -> dict[str, float]:
    """Run :func:`rss_child` in a subprocess for a ``size``² output."""
    p20, p10 = make_pair(work, size)
    proc = subprocess.run(
        [sys.executable, __file__, "--rss-child", os.fspath(p20), os.fspath(p10),
         os.fspath(model), os.fspath(work / f"rss_{size}.tif"), str(tile)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    """Run the benchmark and print RESULT lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4000, help="FCN output size (px)")
    parser.add_argument("--pb-size", type=int, default=400, help="patch-based output size")
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=(2000, 4000))
    parser.add_argument("--tile", type=int, default=None, help="FCN tile (default: serve's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep generated rasters here between runs")
    parser.add_argument("--rss-child", nargs=5, metavar=("P20", "P10", "MODEL", "OUT", "TILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        p20, p10, model, out, tile = args.rss_child
        rss_child(p20, p10, model, out, int(tile))
        return 0

    from terrapatch.serve import DEFAULT_TILE_FCN
    from terrapatch.testing.models import seed_model

    tile = args.tile or DEFAULT_TILE_FCN
    tmp, work = workdir(args.workdir, "bench_serve_")
    try:
        keras_path = work / "seed.keras"
        seed_model(seed=0).save(keras_path)
        savedmodel, onnx = work / "seed_savedmodel", None
        try:
            from terrapatch.export import export_model

            written = export_model(keras_path, savedmodel=savedmodel, onnx=work / "seed.onnx")
            onnx = written.get("onnx")
        except Exception as exc:  # ONNX export is optional for this benchmark
            print(f"ONNX export unavailable ({exc}); naive ONNX comparison skipped")
            if not savedmodel.exists():
                seed_model(seed=0).export(savedmodel, format="tf_saved_model", verbose=False)

        t0 = time.perf_counter()
        p20, p10 = make_pair(work, args.size)
        print(f"generated inputs {args.size + 7}² (20 m) and {2 * args.size + 14}² (10 m) "
              f"in {time.perf_counter() - t0:.1f} s")

        # --- fully-convolutional, SavedModel engine
        engine = load_engine(savedmodel)
        job = prepare_serve(sources(p20, p10), savedmodel, "estimated_labels",
                            fullyconv=True, tile_size=tile, engine=engine)
        pixels = job.box[2] * job.box[3]
        e2e, compute = [], []
        for _ in range(max(1, args.repeats)):
            e2e.append(timed_serve(job, work / "fcn.tif"))
            compute.append(compute_only(job))
        fcn_rate = pixels / min(e2e)
        fcn_ratio = min(e2e) / min(compute)
        print(f"FCN SavedModel {job.box[2]}×{job.box[3]} tile {tile}: e2e {min(e2e):.1f} s "
              f"({fcn_rate / 1e6:.3f} Mpx/s), compute {min(compute):.1f} s, "
              f"e2e/compute {fcn_ratio:.3f} (runs {e2e}, {compute})")

        # --- fully-convolutional, ONNX engine vs a naive loop
        naive_ratio = onnx_rate = float("nan")
        if onnx is not None:
            onnx_job = prepare_serve(sources(p20, p10), onnx, "estimated_labels",
                                     fullyconv=True, tile_size=tile)
            ours, naive = [], []
            for _ in range(max(1, args.repeats)):
                ours.append(timed_serve(onnx_job, work / "fcn_onnx.tif"))
                naive.append(naive_onnx(onnx_job, onnx, work / "naive.tif"))
            onnx_rate = pixels / min(ours)
            naive_ratio = min(naive) / min(ours)
            print(f"FCN ONNX: ours {min(ours):.1f} s ({onnx_rate / 1e6:.3f} Mpx/s), naive "
                  f"loop {min(naive):.1f} s, naive/ours {naive_ratio:.2f}")

        # --- patch-based
        pb20, pb10 = make_pair(work, args.pb_size)
        pb_job = prepare_serve(sources(pb20, pb10), savedmodel, "estimated_labels",
                               engine=engine)
        pb_e2e, pb_compute = [], []
        for _ in range(max(1, args.repeats)):
            pb_e2e.append(timed_serve(pb_job, work / "pb.tif"))
            pb_compute.append(compute_only(pb_job))
        pb_pixels = pb_job.box[2] * pb_job.box[3]
        pb_rate = pb_pixels / min(pb_e2e)
        pb_ratio = min(pb_e2e) / min(pb_compute)
        print(f"PB SavedModel {pb_job.box[2]}×{pb_job.box[3]} tile {pb_job.tile_size[0]}: "
              f"e2e {min(pb_e2e):.1f} s ({pb_rate:.0f} px/s), compute {min(pb_compute):.1f} s, "
              f"e2e/compute {pb_ratio:.3f}")

        # --- peak RSS, two output sizes 4x apart in area
        small, large = args.rss_sizes
        rss_small = measure_rss(work, small, savedmodel, tile)
        rss_large = measure_rss(work, large, savedmodel, tile)
        # Peak RSS sampled while serving (ru_maxrss would include the parent's, inherited
        # across fork/exec on Linux).
        rss_ratio = rss_large["serving_peak_mb"] / rss_small["serving_peak_mb"]
        grow_small = rss_small["serving_peak_mb"] - rss_small["before_mb"]
        grow_large = rss_large["serving_peak_mb"] - rss_large["before_mb"]
        print(f"peak RSS: {small}² {rss_small['serving_peak_mb']:.0f} MiB (serving adds "
              f"{grow_small:.0f} MiB to {rss_small['before_mb']:.0f}), {large}² "
              f"{rss_large['serving_peak_mb']:.0f} MiB (adds {grow_large:.0f} MiB to "
              f"{rss_large['before_mb']:.0f}), ratio {rss_ratio:.3f}")

        print(f"RESULT serve_fcn size={job.box[2]}x{job.box[3]} tile={tile} "
              f"px_per_s={fcn_rate:.0f} e2e_over_compute={fcn_ratio:.3f} "
              f"onnx_px_per_s={onnx_rate:.0f} naive_onnx_over_ours={naive_ratio:.2f}")
        print(f"RESULT serve_pb size={pb_job.box[2]}x{pb_job.box[3]} "
              f"tile={pb_job.tile_size[0]} px_per_s={pb_rate:.0f} "
              f"e2e_over_compute={pb_ratio:.3f}")
        print(f"RESULT serve_rss sizes={small}x{small},{large}x{large} "
              f"peak_mb={rss_small['serving_peak_mb']:.0f},{rss_large['serving_peak_mb']:.0f} "
              f"ratio={rss_ratio:.3f} serving_growth_mb={grow_small:.0f},{grow_large:.0f}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
