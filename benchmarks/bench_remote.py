"""Benchmark: serving from COGs over HTTP vs from the same files on disk.

Two synthetic sources, a 10 m (4 bands) and a 20 m (6 bands) uint16 COG (256 × 256
tiles, DEFLATE; ``--size``² pixels at 20 m, default 2048, i.e. 4096² at 10 m), are
served with the seed model, fully convolutionally (tiles of 256 output pixels):

- from the local files, and from ``http://127.0.0.1:PORT/…``, a threaded loopback
  server with Range support (HTTP/1.1 keep-alive) run in a child process: wall time
  of each ``serve`` run (best of ``--repeats``) and the ratio remote ÷ local; the maps
  must be identical byte for byte;
- the HTTP requests and bytes the server sent during a remote ``serve`` (counted in
  its handler from the ``Content-Length`` of each response), per output tile, against
  the bytes the tiles' input regions need: the compressed sizes of the COG blocks that
  intersect some tile's region, each block once (read from GDAL's ``TIFF`` metadata
  domain, ``BLOCK_OFFSET_x_y`` / ``BLOCK_SIZE_x_y``). Over-read = fetched ÷ needed,
  headers included (target ≤ 1.5). Measured for the whole raster and for a box that
  is not on block boundaries (where GDAL's read-ahead can fetch past the box);
- the same whole-raster serve with GDAL's own defaults instead of terrapatch's
  :data:`~terrapatch.raster.REMOTE_READ_OPTIONS`;
- a read-only pass (no model) over the same tiles, local and remote, one tile after
  the other with one set of readers, giving the read-time ratio and the requests of
  each tile (median, max), and the bytes fetched when opening the files (headers).

Each remote run uses URLs with a query string of its own, so that GDAL's caches of an
earlier run do not hide requests. Timings are loopback figures: no network latency.

``run(work_dir)`` returns the figures as a dict; as a script it prints a markdown table
and a ``RESULT serve_remote ...`` line (see ``run_all.py``).

    python benchmarks/bench_remote.py [--size 2048] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio
from affine import Affine
from RangeHTTPServer import RangeRequestHandler, copy_byte_range
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import _pattern  # the same reflectance-like texture
from terrapatch.raster import REMOTE_READ_OPTIONS, Source, configure_remote_reads

X0, Y0 = 600000.0, 5000000.0
CRS = "EPSG:32631"
BLOCK = 256
PATTERN = 1024


# ---------------------------------------------------------------- inputs


def write_cog(path: Path, size: int, bands: int, spacing: float, seed: int) -> Path:
    """A ``size``² uint16 COG (256² blocks, DEFLATE) tiling a generated texture."""
    if path.exists():
        return path
    block = _pattern(bands, seed)
    reps = -(-size // PATTERN)
    data = np.ascontiguousarray(np.tile(block, (1, reps, reps))[:, :size, :size])
    profile = {"driver": "COG", "width": size, "height": size, "count": bands,
               "dtype": "uint16", "crs": CRS,
               "transform": Affine(spacing, 0, X0, 0, -spacing, Y0),
               "compress": "DEFLATE", "blocksize": BLOCK, "BIGTIFF": "NO"}
    tmp = path.with_name(path.stem + ".part.tif")
    with rasterio.open(tmp, "w", **profile) as ds:
        ds.write(data)
    tmp.rename(path)
    return path


def block_sizes(path: Path) -> dict[tuple[int, int], int]:
    """Compressed bytes of each block ``(col, row)`` of a tiled GeoTIFF (all bands)."""
    sizes: dict[tuple[int, int], int] = {}
    with rasterio.open(path) as ds:
        per_band = str(ds.profile.get("interleave", "")).lower() == "band"
        cols = -(-ds.width // ds.block_shapes[0][1])
        rows = -(-ds.height // ds.block_shapes[0][0])
        for r in range(rows):
            for c in range(cols):
                bidxs = range(1, ds.count + 1) if per_band else (1,)
                sizes[(c, r)] = sum(int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=b))
                                    for b in bidxs)
    return sizes


def blocks_of(window: Window, block: int = BLOCK) -> set[tuple[int, int]]:
    """Blocks ``(col, row)`` a window intersects."""
    c0, r0 = int(window.col_off), int(window.row_off)
    c1, r1 = c0 + int(window.width) - 1, r0 + int(window.height) - 1
    return {(c, r) for r in range(r0 // block, r1 // block + 1)
            for c in range(c0 // block, c1 // block + 1)}


# ---------------------------------------------------------------- server


class _Counter:
    """Requests and bytes sent by the server process (shared memory counters)."""

    def __init__(self, context: Any) -> None:
        self.requests = context.Value("q", 0)
        self.bytes = context.Value("q", 0)

    def add(self, nbytes: int) -> None:
        with self.requests.get_lock():
            self.requests.value += 1
            self.bytes.value += nbytes

    def snapshot(self) -> tuple[int, int]:
        with self.requests.get_lock():
            return int(self.requests.value), int(self.bytes.value)


class CountingRangeHandler(RangeRequestHandler):
    """Range handler (HTTP/1.1 keep-alive) recording each response's body length."""

    protocol_version = "HTTP/1.1"
    counter: _Counter

    def send_head(self) -> Any:
        self._length = 0
        head = super().send_head()
        self.counter.add(self._length if self.command == "GET" else 0)
        return head

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "content-length":
            self._length = int(value)
        super().send_header(keyword, value)

    def copyfile(self, source: Any, outputfile: Any) -> None:
        if not self.range:
            super().copyfile(source, outputfile)
            return
        start, stop = self.range
        copy_byte_range(source, outputfile, start, stop, bufsize=2**20)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _server_main(directory: str, counter: _Counter, ports: Any) -> None:
    """Body of the server process: serve ``directory`` on 127.0.0.1 until terminated."""
    handler = type("Handler", (CountingRangeHandler,), {"counter": counter})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=directory))
    httpd.daemon_threads = True
    ports.put(httpd.server_address[1])
    httpd.serve_forever()


@contextmanager
def loopback_server(directory: Path) -> Iterator[tuple[str, _Counter]]:
    """Serve ``directory`` on 127.0.0.1 (free port) from a child process.

    A separate process, so that the server neither competes with serving for the GIL
    nor deadlocks when GDAL does I/O while the caller holds the GIL (rasterio does so
    for some metadata calls, e.g. the directory listing GDAL makes when
    ``GDAL_DISABLE_READDIR_ON_OPEN`` is not set). Yields (base URL, counter).
    """
    context = multiprocessing.get_context("spawn")
    counter = _Counter(context)
    ports = context.Queue()
    process = context.Process(target=_server_main, args=(os.fspath(directory), counter, ports),
                              daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=60)}", counter
    finally:
        process.terminate()
        process.join(10)


# ---------------------------------------------------------------- runs


def _sources(p20: str, p10: str) -> list[Source]:
    return [Source(p20, 8, placeholder="input_20m", name="source1"),
            Source(p10, 16, placeholder="input_10m", name="source2")]


@contextmanager
def gdal_defaults() -> Iterator[None]:
    """Read with GDAL's own defaults: terrapatch's remote-read options removed meanwhile."""
    saved = {k: os.environ.pop(k) for k in REMOTE_READ_OPTIONS if k in os.environ}
    options = dict(REMOTE_READ_OPTIONS)
    REMOTE_READ_OPTIONS.clear()  # so that configure_remote_reads() sets nothing
    try:
        yield
    finally:
        REMOTE_READ_OPTIONS.update(options)
        os.environ.update(saved)


def _remote_serve(job: Any, model: Path, base: str, names: tuple[str, str], tag: str,
                  counter: _Counter, out: Path, box: tuple[int, int, int, int] | None = None
                  ) -> tuple[float, int, int]:
    """Serve from fresh URLs (a query string unseen by GDAL's caches): seconds, requests,
    bytes."""
    from terrapatch.serve import prepare_serve

    before = counter.snapshot()
    fresh = _sources(f"{base}/{names[0]}?{tag}", f"{base}/{names[1]}?{tag}")
    remote_job = prepare_serve(fresh, model, "estimated_labels", fullyconv=True,
                               engine=job.engine, box=box)
    seconds = remote_job.run(out, "uint8", quiet=True).seconds
    after = counter.snapshot()
    return seconds, after[0] - before[0], after[1] - before[1]


def _needed(job: Any, sizes: list[dict[tuple[int, int], int]]) -> tuple[int, int]:
    """Compressed bytes of the blocks the job's tiles read: each block once, and summed
    over the tiles (a block shared by two tiles counted twice)."""
    blocks: list[set[tuple[int, int]]] = [set() for _ in sizes]
    per_tile = 0
    for tile in job.tiles:
        col, row, w, h = tile.window
        for k, region in enumerate(job.layout.tile_regions(col, row, w, h)):
            touched = blocks_of(region)
            blocks[k] |= touched
            per_tile += sum(sizes[k][b] for b in touched)
    return sum(sizes[k][b] for k in range(len(sizes)) for b in blocks[k]), per_tile


def _read_pass(sources: list[Source], job: Any, counter: _Counter | None
               ) -> tuple[float, list[int], int]:
    """Read every tile's regions with fresh readers: seconds, requests per tile, open bytes."""
    before = counter.snapshot() if counter else (0, 0)
    start = time.perf_counter()
    readers = [s.open() for s in sources]
    opened = counter.snapshot() if counter else (0, 0)
    per_tile = []
    try:
        for tile in job.tiles:
            col, row, w, h = tile.window
            n0 = counter.snapshot()[0] if counter else 0
            for reader, region in zip(readers, job.layout.tile_regions(col, row, w, h),
                                      strict=True):
                reader.read(region)
            per_tile.append((counter.snapshot()[0] if counter else 0) - n0)
    finally:
        for reader in readers:
            reader.close()
    return time.perf_counter() - start, per_tile, opened[1] - before[1]


def run(work_dir: str | os.PathLike[str], size: int = 2048, repeats: int = 2,
        quiet: bool = True) -> dict[str, Any]:
    """Run the benchmark in ``work_dir`` (inputs are kept there); return the figures.

    Parameters
    ----------
    work_dir
        Folder of the generated COGs, the model and the maps.
    size
        Side of the 20 m source in pixels (the 10 m source is twice as large).
    repeats
        Timed serving runs of each kind; the best is kept.
    quiet
        Print nothing (else one line per step).

    Returns
    -------
    dict
        ``local_s``, ``remote_s``, ``time_ratio``, ``read_local_s``, ``read_remote_s``,
        ``read_ratio``, ``tiles``, ``requests``, ``requests_per_tile``,
        ``fetched_bytes``, ``needed_bytes``, ``over_read``, ``open_bytes``,
        ``tile_requests_median``, ``tile_requests_max``, ``identical``,
        ``defaults_remote_s``, ``defaults_requests_per_tile``, ``defaults_over_read``,
        ``box``, ``box_tiles``, ``box_requests``, ``box_fetched_bytes``,
        ``box_needed_bytes``, ``box_over_read``, ``options``.
    """
    from terrapatch.serve import prepare_serve
    from terrapatch.testing.models import seed_model

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    work = Path(work_dir)
    served = work / "served"
    served.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    p20 = write_cog(served / f"s20_{size}.tif", size, 6, 20.0, 1)
    p10 = write_cog(served / f"s10_{size}.tif", 2 * size, 4, 10.0, 2)
    say(f"inputs {size}² (20 m, 6 bands) and {2 * size}² (10 m, 4 bands) COGs: "
        f"{(p20.stat().st_size + p10.stat().st_size) / 2**20:.0f} MiB "
        f"({time.perf_counter() - t0:.1f} s)")
    model = work / "seed.keras"
    if not model.exists():
        seed_model(seed=0).save(model)

    local_sources = _sources(os.fspath(p20), os.fspath(p10))
    job = prepare_serve(local_sources, model, "estimated_labels", fullyconv=True)
    tiles = len(job.tiles)

    sizes = [block_sizes(p20), block_sizes(p10)]
    needed, per_tile_need = _needed(job, sizes)
    # A sub-window not on block boundaries: partial blocks, header share larger.
    box = (size // 3, size // 3 + 5, size // 4, size // 4)
    box_job = prepare_serve(local_sources, model, "estimated_labels", fullyconv=True, box=box,
                            engine=job.engine)
    box_needed, _ = _needed(box_job, sizes)

    with loopback_server(served) as (base, counter):
        options = configure_remote_reads()
        job.run(work / "local.tif", "uint8", quiet=True)  # warm-up (model, page cache)
        local_s, remote_s = [], []
        fetched = requests = 0
        names = (p20.name, p10.name)
        for i in range(max(1, repeats)):
            local_s.append(job.run(work / "local.tif", "uint8", quiet=True).seconds)
            seconds, requests, fetched = _remote_serve(job, model, base, names, f"run={i}",
                                                       counter, work / "remote.tif")
            remote_s.append(seconds)
            say(f"run {i}: local {local_s[-1]:.2f} s, remote {seconds:.2f} s, "
                f"{requests} requests, {fetched / 2**20:.1f} MiB")
        b_seconds, b_requests, b_fetched = _remote_serve(
            box_job, model, base, names, "box", counter, work / "box.tif", box=box)
        say(f"box {box}: remote {b_seconds:.2f} s, {b_requests} requests, "
            f"{b_fetched / 2**20:.1f} MiB for {box_needed / 2**20:.1f} MiB of blocks")
        with gdal_defaults():
            d_seconds, d_requests, d_fetched = _remote_serve(
                job, model, base, names, "defaults", counter, work / "defaults.tif")
        say(f"GDAL defaults: remote {d_seconds:.2f} s, {d_requests} requests, "
            f"{d_fetched / 2**20:.1f} MiB")
        with rasterio.open(work / "local.tif") as a, rasterio.open(work / "remote.tif") as b:
            identical = bool(np.array_equal(a.read(), b.read()))

        read_local, _, _ = _read_pass(local_sources, job, None)
        fresh = _sources(f"{base}/{p20.name}?read=1", f"{base}/{p10.name}?read=1")
        read_remote, per_tile, open_bytes = _read_pass(fresh, job, counter)
    result = {
        "size": size, "tiles": tiles,
        "local_s": min(local_s), "remote_s": min(remote_s),
        "time_ratio": min(remote_s) / min(local_s),
        "read_local_s": read_local, "read_remote_s": read_remote,
        "read_ratio": read_remote / read_local,
        "requests": requests, "requests_per_tile": requests / tiles,
        "fetched_bytes": fetched, "needed_bytes": needed, "per_tile_need_bytes": per_tile_need,
        "over_read": fetched / needed, "open_bytes": open_bytes,
        "tile_requests_median": statistics.median(per_tile),
        "tile_requests_max": max(per_tile),
        "identical": identical,
        "defaults_remote_s": d_seconds, "defaults_requests_per_tile": d_requests / tiles,
        "defaults_over_read": d_fetched / needed,
        "box": box, "box_tiles": len(box_job.tiles), "box_requests": b_requests,
        "box_fetched_bytes": b_fetched, "box_needed_bytes": box_needed,
        "box_over_read": b_fetched / box_needed,
        "options": {k: options.get(k, os.environ.get(k)) for k in
                    (*REMOTE_READ_OPTIONS, "CPL_VSIL_CURL_CHUNK_SIZE",
                     "CPL_VSIL_CURL_CACHE_SIZE")},
    }
    return result


def table(r: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    rows = [
        ("inputs", f"{r['size']}² 20 m × 6 bands + {2 * r['size']}² 10 m × 4 bands, "
                   f"uint16 COG, 256² DEFLATE"),
        ("output tiles (256² at 20 m)", f"{r['tiles']}"),
        ("serve local / remote", f"{r['local_s']:.2f} s / {r['remote_s']:.2f} s → "
                                 f"**{r['time_ratio']:.2f}×**"),
        ("reads only, local / remote", f"{r['read_local_s']:.2f} s / {r['read_remote_s']:.2f} s"
                                       f" → {r['read_ratio']:.2f}×"),
        ("HTTP requests per tile", f"{r['requests_per_tile']:.2f} (serve); read pass: median "
                                   f"{r['tile_requests_median']:g}, max "
                                   f"{r['tile_requests_max']}"),
        ("bytes fetched / needed", f"{r['fetched_bytes'] / 2**20:.1f} / "
                                   f"{r['needed_bytes'] / 2**20:.1f} MiB → "
                                   f"**{r['over_read']:.3f}×** (target ≤ 1.5)"),
        (f"box {r['box']} ({r['box_tiles']} tiles): fetched / needed",
         f"{r['box_fetched_bytes'] / 2**20:.2f} / {r['box_needed_bytes'] / 2**20:.2f} MiB → "
         f"**{r['box_over_read']:.3f}×**, {r['box_requests'] / r['box_tiles']:.2f} requests "
         "per tile"),
        ("GDAL defaults instead (remote)", f"{r['defaults_remote_s']:.2f} s, "
                                           f"{r['defaults_requests_per_tile']:.2f} requests "
                                           f"per tile, over-read "
                                           f"{r['defaults_over_read']:.3f}×"),
        ("bytes fetched at open (headers)", f"{r['open_bytes'] / 1024:.0f} KiB"),
        ("maps identical", "yes" if r["identical"] else "**NO**"),
    ]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main() -> int:
    """Run the benchmark, print the table and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="20 m source side (px)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep generated inputs here between runs")
    args = parser.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_remote_")
        work = Path(tmp.name)
    else:
        work = args.workdir
    try:
        r = run(work, size=args.size, repeats=args.repeats, quiet=False)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(table(r))
    print("options: " + " ".join(f"{k}={v}" for k, v in r["options"].items()))
    print(f"RESULT serve_remote size={r['size']} time_ratio={r['time_ratio']:.3f} "
          f"read_ratio={r['read_ratio']:.3f} requests_per_tile={r['requests_per_tile']:.2f} "
          f"over_read={r['over_read']:.3f} box_over_read={r['box_over_read']:.3f} "
          f"identical={r['identical']}")
    return 0 if r["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
