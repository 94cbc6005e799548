"""Benchmark: serving at scale — who writes, resume, COG, and the figures of the other benches.

Measured in one run, on the same generated 10 m (4 bands) / 20 m (6 bands) uint16 DEFLATE
rasters and a two-source ONNX model with a 6-band float32 output (the map is a 6-band
float32 DEFLATE GeoTIFF, the case where one writer limits a cluster):

- in process (ordered writer) against a LocalCluster of 2 workers × 1 thread, with the
  block sink (workers write their blocks) and with the ordered sink (pixels sent to the
  client, which writes): time and identical maps;
- bytes the client receives per block with each sink (pickled task results);
- time of a resumed half-finished run ÷ half of the full run (resume=True both);
- COG ÷ plain GeoTIFF time, in process;
- when their modules are present: remote ÷ local input time and the over-read ratio
  (``bench_remote``), extraction ÷ its floor (``bench_extraction``), FCN end-to-end ÷ pure
  compute on real-data-like and synthetic inputs (``fcn_overhead``).

Timed runs are repeated twice and the best kept. Ends with ``RESULT scale_* ...`` lines.

    python benchmarks/bench_scale.py [--size 2048] [--work DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import workdir, write_source
from terrapatch.raster import Source
from terrapatch.serve import prepare_serve, serve
from terrapatch.testing import faults
from terrapatch.testing.onnx_models import conv_onnx

TILE = 256
#: Timed runs are repeated and the best kept (the machine may be shared).
REPEATS = 2


def sources(p20: Path, p10: Path) -> list[Source]:
    """20 m as source 1 (rf 4), 10 m as source 2 (rf 8) for the test ONNX model."""
    return [Source(p20, 4, placeholder="input_20m", name="source1"),
            Source(p10, 8, placeholder="input_10m", name="source2")]


def timed(func: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def same_map(a: Path, b: Path) -> bool:
    """Whether two rasters hold the same pixels."""
    with rasterio.open(a) as da, rasterio.open(b) as db:
        return bool(np.array_equal(da.read(), db.read()))


def client_bytes(job: Any, runner: Any, store: Any, block: Any) -> tuple[int, int]:
    """Pickled bytes of one block's task result: ``(block sink status, ordered pixels)``."""
    from terrapatch.serve import serve_block, write_block

    status = write_block(runner, block, store)
    pixels = serve_block(runner, block.tiles, "float32")
    return len(pickle.dumps(status)), len(pickle.dumps(pixels))


def cluster_runs(srcs: list[Source], model: Path, work: Path, reference: Path
                 ) -> dict[str, Any]:
    """Serve on a LocalCluster (2 × 1) with each sink; per-block bytes to the client."""
    import distributed

    from terrapatch.serve.sinks import BlockStore
    from terrapatch.tiling import plan_blocks

    out: dict[str, Any] = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        serve(srcs, str(model), work / "warm.tif", fullyconv=True, quiet=True,
              tile_size=TILE, box=(0, 0, 256, 256), scheduler=c)  # load the model once
        for _ in range(REPEATS):
            for sink in ("blocks", "ordered"):
                path = work / f"dask_{sink}.tif"
                seconds, summary = timed(serve, srcs, str(model), path, fullyconv=True,
                                         quiet=True, tile_size=TILE, scheduler=c, sink=sink)
                best = min(seconds, out.get(sink, {}).get("seconds", seconds))
                out[sink] = {"seconds": best, "identical": same_map(path, reference),
                             "blocks": summary.blocks or None}
    job = prepare_serve(srcs, str(model), fullyconv=True, tile_size=TILE)
    block = plan_blocks(job.tiles, job.block_sink_tiles())[len(job.tiles) // 16]
    folder = work / "bytes_blocks"
    folder.mkdir(exist_ok=True)
    grid = job.output_grid
    from terrapatch.writer import MapFormat

    store = BlockStore(folder, MapFormat(), job.runner.bands, "float32", grid.crs,
                       grid.transform, None, np.float32(0))
    runner = job.cluster_runner()
    out["bytes_status"], out["bytes_pixels"] = client_bytes(job, runner, store, block)
    out["tiles_per_block"] = len(block.tiles)
    return out


def resume_ratio(srcs: list[Source], model: Path, work: Path, reference: Path
                 ) -> dict[str, Any]:
    """A full resumable run, then a run stopped half-way and resumed: time ratio."""
    full_s, _ = timed(serve, srcs, str(model), work / "full.tif", fullyconv=True, quiet=True,
                      tile_size=TILE, resume=True)
    job = prepare_serve(srcs, str(model), fullyconv=True, tile_size=TILE)
    half = len(job.tiles) // 2
    job.runner = faults.FailingRunner(job.runner, at=half)
    target = work / "resumed.tif"
    try:
        job.run(target, quiet=True, resume=True)
    except RuntimeError:
        pass
    resumed_s, summary = timed(serve, srcs, str(model), target, fullyconv=True, quiet=True,
                               tile_size=TILE, resume=True)
    size = target.stat().st_size
    return {"full_s": full_s, "resumed_s": resumed_s, "ratio": resumed_s / (full_s / 2),
            "assemble_s": summary.assemble_seconds,
            "assemble_mb_s": size / 1e6 / max(summary.assemble_seconds, 1e-9),
            "resumed_blocks": summary.resumed_blocks, "blocks": summary.blocks,
            "identical_bytes": target.read_bytes() == reference.read_bytes()}


def cog_ratio(srcs: list[Source], model: Path, work: Path, plain_s: float) -> dict[str, Any]:
    """COG output time against the plain GeoTIFF's, and its validity."""
    from rio_cogeo.cogeo import cog_validate

    path = work / "map_cog.tif"
    seconds, summary = timed(serve, srcs, str(model), path, fullyconv=True, quiet=True,
                             tile_size=TILE, output_format="COG")
    return {"seconds": seconds, "ratio": seconds / plain_s, "valid": cog_validate(str(path))[0],
            "assemble_s": summary.assemble_seconds}


def optional(module: str, function: str, *args: Any) -> Any:
    """Call ``module.function(*args)`` if the benchmark module exists, else None."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    func = getattr(mod, function, None)
    return None if func is None else func(*args)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print RESULT lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="output side at 20 m")
    parser.add_argument("--work", type=Path, default=None, help="work folder (kept)")
    parser.add_argument("--own-only", action="store_true",
                        help="skip the figures of the other benchmark modules")
    args = parser.parse_args(argv)
    tmp, work = workdir(args.work, "bench_scale_")
    try:
        size = args.size
        p20 = write_source(work / f"s20_{size}.tif", size + 3, 6, 20.0, 1)
        p10 = write_source(work / f"s10_{size}.tif", 2 * (size + 3), 4, 10.0, 2)
        model = conv_onnx(work / "model6.onnx", classes=6)
        srcs = sources(p20, p10)
        serve(srcs, str(model), work / "warm.tif", fullyconv=True, quiet=True,
              box=(0, 0, 256, 256))
        plain_s = float("inf")
        for _ in range(REPEATS):
            seconds, ref = timed(serve, srcs, str(model), work / "ref.tif", fullyconv=True,
                                 quiet=True, tile_size=TILE)
            plain_s = min(plain_s, seconds)
        px = ref.width * ref.height
        dask = cluster_runs(srcs, model, work, ref.path)
        res = resume_ratio(srcs, model, work, ref.path)
        cog = cog_ratio(srcs, model, work, plain_s)
        print(f"RESULT scale_dask output={ref.width}x{ref.height}x6_float32_deflate "
              f"in_process_s={plain_s:.2f} ({px / plain_s / 1e6:.2f}M_px/s) "
              f"dask_blocks_s={dask['blocks']['seconds']:.2f} "
              f"dask_ordered_s={dask['ordered']['seconds']:.2f} "
              f"ratio_blocks={dask['blocks']['seconds'] / plain_s:.2f} "
              f"ratio_ordered={dask['ordered']['seconds'] / plain_s:.2f} "
              f"identical={dask['blocks']['identical'] and dask['ordered']['identical']}")
        print(f"RESULT scale_client_bytes tiles_per_block={dask['tiles_per_block']} "
              f"block_sink={dask['bytes_status']}B ordered_sink={dask['bytes_pixels']}B")
        print(f"RESULT scale_resume full_s={res['full_s']:.2f} resumed_s={res['resumed_s']:.2f} "
              f"resumed_blocks={res['resumed_blocks']}/{res['blocks']} "
              f"ratio_to_half={res['ratio']:.2f} byte_identical={res['identical_bytes']} "
              f"assembly_s={res['assemble_s']:.2f} ({res['assemble_mb_s']:.0f}_MB/s_tile_copy)")
        print(f"RESULT scale_cog cog_s={cog['seconds']:.2f} gtiff_s={plain_s:.2f} "
              f"ratio={cog['ratio']:.2f} valid={cog['valid']}")
        if args.own_only:
            return 0
        remote = optional("bench_remote", "run", work / "remote")
        if remote:
            print("RESULT scale_remote " + " ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in remote.items() if not isinstance(v, dict | list)))
        for kind in ("synthetic", "real"):
            fcn = optional("fcn_overhead", "measure", work / f"fcn_{kind}", kind)
            if fcn:
                print(f"RESULT scale_fcn_{kind} ratio={fcn['ratio']:.3f} "
                      f"e2e_s={fcn['e2e_s']:.2f} compute_s={fcn['compute_s']:.2f}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
