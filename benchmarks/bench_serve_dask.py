"""Benchmark: TensorflowModelServe on a Dask LocalCluster vs in process, on the same cores.

The seed model (SavedModel) serves, fully-convolutionally, the synthetic 20 m / 10 m
pair of ``bench_serve.py`` (same generator, imported from it) over a ``--size``²
output (default 3000×3000 px at 20 m):

- in process (reader thread, model, writer thread; TensorFlow uses every core);
- on a ``LocalCluster`` of ``--workers`` single-threaded worker processes (default 2),
  blocks of tiles as tasks, this process writing the blocks in order. The cluster is
  started and the model loaded on every worker before timing (a long-lived cluster).

Prints both rates, their ratio (cluster time / in-process time; target ≤ 1.15) and
whether the two maps are identical byte for byte. Timed runs alternate and are
repeated ``--repeats`` times; the best of each is kept. The machine's load average
is printed before and after (the machine may be shared).

For the scaling note (``docs/scaling.md``), the per-tile costs are measured in a
separate sequential pass over ``--cost-tiles`` tiles, one stage at a time with
nothing running beside it: read (decode the tile's input regions), compute (the
model call, TensorFlow on every core) and write (convert, write, compress on
flush), each in wall seconds and in CPU seconds of this process (core-seconds).
Also printed: the bytes a tile reads (compressed on disk, and decoded), sends from
a worker to the writer, and writes. The stage sums of the two timed runs are
printed too, but they overlap and share the cores, so they are not costs.
Ends with a ``RESULT serve_dask ...`` line.

    python benchmarks/bench_serve_dask.py [--size 3000] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio
from rasterio.windows import Window

from bench_serve import make_pair, sources, workdir
from terrapatch import cluster
from terrapatch.serve import ServeJob, ServeSummary, cached_engine, prepare_serve
from terrapatch.writer import convert_pixels, geotiff_profile


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def input_bytes_per_tile(job: ServeJob) -> tuple[float, float]:
    """Mean bytes a tile reads: (compressed on disk, decoded), from its input regions."""
    decoded = 0.0
    compressed = 0.0
    for tile in job.tiles:
        col, row, w, h = tile.window
        for source, region in zip(job.sources, job.layout.tile_regions(col, row, w, h),
                                  strict=True):
            raw = int(region.width) * int(region.height) * source.bands * source.dtype.itemsize
            decoded += raw
            on_disk = sum(os.path.getsize(p) for p in source.paths)
            full = source.grid.width * source.grid.height * source.bands * source.dtype.itemsize
            compressed += raw * on_disk / full
    return compressed / len(job.tiles), decoded / len(job.tiles)


def sequential_costs(job: ServeJob, count: int, out: Path, pixel_type: str = "uint8",
                     creation_options: dict[str, str] | None = None
                     ) -> dict[str, tuple[float, float]]:
    """Per-tile (wall, CPU) seconds of read, compute and write, one stage at a time."""
    runner = job.runner
    tiles = list(job.tiles[:count])
    dtype = np.dtype(pixel_type)
    profile = geotiff_profile(job.box[2], job.box[3], runner.bands, dtype,
                              crs=job.output_grid.crs, transform=job.transform,
                              creation_options=creation_options)
    totals = {k: [0.0, 0.0] for k in ("read", "compute", "write")}

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(stage: str, since: tuple[float, float]) -> tuple[float, float]:
        now = clock()
        totals[stage][0] += now[0] - since[0]
        totals[stage][1] += now[1] - since[1]
        return now

    readers = runner.open_readers()
    try:
        with rasterio.open(out, "w", **profile) as dataset:
            for tile in tiles:
                mark = clock()
                feed = runner.read(readers, tile)
                mark = add("read", mark)
                assert feed is not None
                values = runner.infer(job.engine, tile, feed)
                mark = add("compute", mark)
                pixels = convert_pixels(values, dtype).transpose(2, 0, 1)
                tc, tr, tw, th = tile.target
                dataset.write(pixels, window=Window(tc - job.box[0], tr - job.box[1], tw, th))
                add("write", mark)
            mark = clock()
        add("write", mark)  # blocks still cached are compressed and written on close
    finally:
        for reader in readers:
            reader.close()
    return {k: (v[0] / len(tiles), v[1] / len(tiles)) for k, v in totals.items()}


def per_tile(summary: ServeSummary) -> tuple[float, float, float]:
    """Read, compute and write seconds per tile (sums of the stages, not wall time)."""
    n = max(1, summary.tiles - summary.skipped_tiles)
    return (summary.read_seconds / n, summary.compute_seconds / n,
            summary.write_seconds / summary.tiles)


def main() -> int:
    """Run the benchmark and print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=3000, help="output size (px, 20 m)")
    parser.add_argument("--tile", type=int, default=None, help="tile size (default: serve's)")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--block-tiles", type=int, default=None, help="tiles per task")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cost-tiles", type=int, default=48,
                        help="tiles of the sequential per-tile cost pass")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep generated rasters and models here between runs")
    args = parser.parse_args()
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)

    from terrapatch.testing.models import seed_model

    tmp, work = workdir(args.workdir, "bench_serve_dask_")
    try:
        print(f"{os.cpu_count()} CPU cores; load average {load()}")
        savedmodel = work / "seed_savedmodel"
        if not (savedmodel / "saved_model.pb").exists():
            seed_model(seed=0).export(savedmodel, format="tf_saved_model", verbose=False)
        t0 = time.perf_counter()
        p20, p10 = make_pair(work, args.size)
        print(f"inputs {args.size + 7}² (20 m) and {2 * args.size + 14}² (10 m) ready in "
              f"{time.perf_counter() - t0:.1f} s")
        job = prepare_serve(sources(p20, p10), savedmodel, "estimated_labels",
                            fullyconv=True, tile_size=args.tile)
        pixels = job.box[2] * job.box[3]
        compressed_in, decoded_in = input_bytes_per_tile(job)
        costs = sequential_costs(job, args.cost_tiles, work / "costs.tif")
        # The write cost of a float32 map of class probabilities (6 bands), for comparison.
        float_job = prepare_serve(sources(p20, p10), savedmodel, "estimated", fullyconv=True,
                                  tile_size=args.tile, engine=job.engine)
        n_float = max(4, args.cost_tiles // 4)
        float_writes = {}
        for codec in ("DEFLATE", "ZSTD", "NONE"):
            path = work / f"costs_f32_{codec}.tif"
            cost = sequential_costs(float_job, n_float, path, "float32", {"COMPRESS": codec})
            size = os.path.getsize(path) / n_float if codec != "NONE" else \
                float_job.tile_size[0] * float_job.tile_size[1] * float_job.runner.bands * 4
            float_writes[codec] = (cost["write"][0], size)

        with cluster.client_for(None, args.workers) as client:
            t0 = time.perf_counter()
            model = os.path.abspath(savedmodel)  # the path the tasks will load
            client.run(lambda path: type(cached_engine(path)).__name__, model)
            print(f"LocalCluster of {args.workers} worker(s) × 1 thread ready, model loaded "
                  f"on every worker in {time.perf_counter() - t0:.1f} s")
            local_runs: list[ServeSummary] = []
            dask_runs: list[ServeSummary] = []
            for k in range(max(1, args.repeats)):
                local_runs.append(job.run(work / "local.tif", "uint8", quiet=True))
                dask_runs.append(job.run(work / "dask.tif", "uint8", quiet=True,
                                         scheduler=client, block_tiles=args.block_tiles))
                print(f"run {k + 1}: in process {local_runs[-1].seconds:.2f} s, "
                      f"Dask {dask_runs[-1].seconds:.2f} s (load {load()})")
            blocks = job.default_block_tiles(cluster.total_threads(client)) \
                if args.block_tiles is None else args.block_tiles

        with rasterio.open(work / "local.tif") as a, rasterio.open(work / "dask.tif") as b:
            identical = a.read().tobytes() == b.read().tobytes()
        out_bytes = os.path.getsize(work / "dask.tif") / len(job.tiles)
        sent_bytes = job.tile_size[0] * job.tile_size[1] * job.runner.bands  # uint8 pixels
        local = min(local_runs, key=lambda s: s.seconds)
        remote = min(dask_runs, key=lambda s: s.seconds)
        ratio = remote.seconds / local.seconds
        lr, lc, lw = per_tile(local)
        dr, dc, dw = per_tile(remote)
        tile = job.tile_size[0]
        print(f"output {job.box[2]}×{job.box[3]} px, {len(job.tiles)} tiles of {tile}², "
              f"{blocks} tile(s) per task")
        print(f"in process: {local.seconds:.2f} s, {pixels / local.seconds / 1e6:.3f} M px/s")
        print(f"Dask ({args.workers} workers × 1 thread): {remote.seconds:.2f} s, "
              f"{pixels / remote.seconds / 1e6:.3f} M px/s; ratio Dask / in process "
              f"{ratio:.3f} (target ≤ 1.15); maps identical: {identical}")
        (rw, rc), (cw, cc), (ww, wc) = costs["read"], costs["compute"], costs["write"]
        print(f"per-tile costs, sequential pass over {min(args.cost_tiles, len(job.tiles))} "
              f"tiles (wall ms / CPU ms): read {rw * 1e3:.1f} / {rc * 1e3:.1f}, compute "
              f"{cw * 1e3:.1f} / {cc * 1e3:.1f}, write {ww * 1e3:.1f} / {wc * 1e3:.1f}")
        sent_float = job.tile_size[0] * job.tile_size[1] * float_job.runner.bands * 4
        print(f"writing a float32 {float_job.runner.bands}-band map of probabilities instead "
              f"({sent_float / 1e3:.0f} kB sent per tile), write per tile: " + ", ".join(
                  f"{codec} {w * 1e3:.1f} ms ({size / 1e3:.0f} kB)"
                  for codec, (w, size) in float_writes.items()))
        print(f"stage sums of the timed runs, per tile (overlapping, not costs): in process "
              f"read {lr * 1e3:.1f} ms, compute {lc * 1e3:.1f} ms, write {lw * 1e3:.1f} ms; "
              f"Dask workers read {dr * 1e3:.1f} ms, compute {dc * 1e3:.1f} ms, writer "
              f"{dw * 1e3:.1f} ms")
        print(f"per tile: reads {compressed_in / 1e6:.2f} MB compressed ({decoded_in / 1e6:.2f} "
              f"MB decoded), sends {sent_bytes / 1e3:.1f} kB to the writer, writes "
              f"{out_bytes / 1e3:.1f} kB")
        print(f"load average after: {load()}")
        print(f"RESULT serve_dask size={job.box[2]}x{job.box[3]} tile={tile} "
              f"workers={args.workers} block_tiles={blocks} "
              f"inproc_px_per_s={pixels / local.seconds:.0f} "
              f"dask_px_per_s={pixels / remote.seconds:.0f} ratio={ratio:.3f} "
              f"identical={identical} read_ms_per_tile={rw * 1e3:.1f} "
              f"compute_ms_per_tile={cw * 1e3:.1f} compute_cpu_ms_per_tile={cc * 1e3:.1f} "
              f"write_ms_per_tile={ww * 1e3:.1f} in_mb_per_tile={compressed_in / 1e6:.2f} "
              f"out_kb_per_tile={out_bytes / 1e3:.1f} "
              f"write_f32_deflate_ms_per_tile={float_writes['DEFLATE'][0] * 1e3:.1f} "
              f"cores={os.cpu_count()} load1={os.getloadavg()[0]:.2f}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
