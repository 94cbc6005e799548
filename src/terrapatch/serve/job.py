"""A planned serving run (:class:`ServeJob`) and what it wrote (:class:`ServeSummary`).

The flow (docs/serve.md)::

    prepare_serve (plan.py) ── binding (inputs/outputs) ── probe (rf/ef) ── geometry
         │
    ServeJob.run ── PendingOutput (lock, leftovers, resume state)
         ├─ ordered sink: tiles → pipeline (local threads) or Dask pixels → OrderedWriter
         └─ block sink:   blocks → pipeline + BlockSink (local) or Dask write_block (workers)
                          → journal → assemble (GeoTIFF) | VRT mosaic
         └─ COG: GDAL's COG driver copies the GeoTIFF, with overviews → commit

:class:`~terrapatch.serve.execution.Execution` carries out one run: the local
driver runs the model in this process with a reader and a writer thread, the Dask
driver ships blocks of tiles to a cluster. Either way the map is the same
(invariant I4), and only a complete map appears under its name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

import terrapatch
from terrapatch import cluster
from terrapatch.engines import Engine
from terrapatch.errors import InputError
from terrapatch.geometry import Grid, Layout
from terrapatch.progress import logger
from terrapatch.raster import Source, is_remote
from terrapatch.serve import distributed
from terrapatch.serve.execution import Execution
from terrapatch.serve.journal import fingerprint, hash_files
from terrapatch.serve.probe import (
    ModelGeometry,
)
from terrapatch.serve.recorded import Recorded
from terrapatch.serve.runner import ServeStats, TileRunner
from terrapatch.tiling import Box, Tile
from terrapatch.writer import (
    LEGEND_DTYPES,
    MapFormat,
    Output,
    PendingOutput,
    cannot_write,
    check_outputs,
    convert_pixels,
    is_write_failure,
    pixel_dtype,
)

__all__ = [
    "CLUSTER_BLOCK_TILES",
    "SINKS",
    "ServeJob",
    "ServeSummary",
]

#: Most tiles per block (one cluster task, one block file).
CLUSTER_BLOCK_TILES = 8
#: Tasks per worker thread aimed at when choosing the ordered sink's block size.
CLUSTER_TASKS_PER_THREAD = 4
#: Blocks per run aimed at by the block sink's default block size (independent of the
#: cluster, so that a run resumes on any number of workers).
BLOCKS_PER_RUN = 16
#: Where finished tiles go: one ordered writer, or block files written where computed.
SINKS = ("ordered", "blocks")


@dataclass(frozen=True)
class ServeSummary:
    """What :func:`serve` wrote.

    Attributes
    ----------
    path
        Output file.
    width, height, bands
        Size of the written raster.
    dtype
        Pixel type written.
    transform, crs
        Georeference of the written raster (the box of the output grid).
    box
        ``(col_off, row_off, width, height)`` of the written part of the output grid.
    output_grid
        The full output grid.
    geometry
        Receptive fields, expression field and spcscale served.
    derived
        Whether the geometry was (partly) derived from the model.
    fullyconv
        Mode.
    output_names
        Outputs stacked as bands.
    tile_size
        Tile size used.
    tiles, skipped_tiles
        Number of tiles, and of tiles filled with the background because a source was
        entirely nodata.
    seconds, read_seconds, compute_seconds, write_seconds
        Wall time of the run, and time spent reading, in the model and writing (these
        overlap).
    driver
        Format written: ``GTiff``, ``COG`` or ``VRT``.
    sink
        ``ordered`` (one writer) or ``blocks`` (block files, assembled or mosaicked).
    blocks, resumed_blocks
        Blocks of the block sink, and how many of them an earlier run had finished.
    assemble_seconds
        Time spent assembling blocks and converting to COG, after the tiles.
    clamped
        Pixel values (band by band) outside the range of an integer pixel type, clamped
        to it (NaN written as 0 included), in the tiles this run computed (a resumed run
        does not count the blocks of the earlier one).
    margin
        Output pixels by which tiles overlapped (the halo of a same-padded model).
    coverage
        ``inset`` (every receptive field inside every source) or ``full`` (source 1's
        whole extent, windows padded past the edges).
    model_layout
        ``nhwc`` (channels last) or ``nchw`` (channels first) model tensors.
    """

    path: Path
    width: int
    height: int
    bands: int
    dtype: str
    transform: Affine
    crs: Any
    box: Box
    output_grid: Grid
    geometry: ModelGeometry
    derived: bool
    fullyconv: bool
    output_names: tuple[str, ...]
    tile_size: tuple[int, int]
    tiles: int
    skipped_tiles: int
    seconds: float
    read_seconds: float
    compute_seconds: float
    write_seconds: float
    driver: str = "GTiff"
    sink: str = "ordered"
    blocks: int = 0
    resumed_blocks: int = 0
    assemble_seconds: float = 0.0
    clamped: int = 0
    margin: tuple[int, int] = (0, 0)
    coverage: str = "inset"
    model_layout: str = "nhwc"

    @property
    def pixels_per_second(self) -> float:
        """Output pixels written per second of wall time."""
        return self.width * self.height / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class ServeJob:
    """A validated serving run: engine, geometry, layout, tile plan; :meth:`run` writes it.

    Build it with :func:`prepare_serve`.
    """

    sources: list[Source]
    engine: Engine
    layout: Layout
    geometry: ModelGeometry
    derived: bool
    runner: TileRunner
    box: Box
    tile_size: tuple[int, int]
    tiles: tuple[Tile, ...]
    model_path: str | None = None
    margin: tuple[int, int] = (0, 0)
    tile_batch: int = 1
    recorded: Recorded = field(default_factory=Recorded)

    @property
    def output_grid(self) -> Grid:
        """The full output grid."""
        return self.layout.output_grid.grid

    @property
    def transform(self) -> Affine:
        """Transform of the written raster (box origin)."""
        return self.output_grid.transform @ Affine.translation(self.box[0], self.box[1])

    def block_cache_bytes(self, dtype: np.dtype) -> int:
        """GDAL block cache for this run: a row of tiles of every source and of the output.

        Enough to decompress every input block once (tiles of a row share blocks with
        the next row through their context), small enough that memory depends on the
        tile size and the raster width, not on the raster size. Never above GDAL's
        current setting.
        """
        from rasterio.env import get_gdal_config

        current = get_gdal_config("GDAL_CACHEMAX")
        col, row, width, height = self.tiles[0].window if self.tiles else (0, 0, 1, 1)
        total = 0
        for source, grid, region in zip(self.sources, self.layout.grids,
                                        self.layout.tile_regions(col, row, width, height),
                                        strict=True):
            rows = int(region.height) + 2 * 256
            total += grid.width * rows * source.bands * source.dtype.itemsize
        total += self.box[2] * (self.tile_size[1] + 256) * self.runner.bands * dtype.itemsize
        wanted = max(64 * 2**20, int(1.5 * total))
        try:
            limit = int(current)
        except (TypeError, ValueError):
            return wanted
        if limit < 100_000:  # GDAL reads small values as megabytes
            limit *= 2**20
        return min(wanted, limit)

    def default_block_tiles(self, threads: int) -> int:
        """Tiles per cluster task of the ordered sink for ``threads`` task slots.

        At most :data:`CLUSTER_BLOCK_TILES`, fewer when that would give a worker thread
        fewer than :data:`CLUSTER_TASKS_PER_THREAD` tasks.
        """
        per_task = len(self.tiles) // max(1, CLUSTER_TASKS_PER_THREAD * threads)
        return max(1, min(CLUSTER_BLOCK_TILES, per_task))

    def block_sink_tiles(self) -> int:
        """Tiles per block of the block sink: a function of the plan only (resumable anywhere).

        At most :data:`CLUSTER_BLOCK_TILES`, fewer for plans of under
        :data:`BLOCKS_PER_RUN` full blocks.
        """
        return max(1, min(CLUSTER_BLOCK_TILES, len(self.tiles) // BLOCKS_PER_RUN))

    def cluster_runner(self) -> TileRunner:
        """The tile runner to ship to a cluster: absolute paths, the model as a path.

        Raises
        ------
        InputError
            If the model was given in memory (workers need a file or directory).
        """
        return distributed.movable_runner(self.runner, self.model_path)

    def journal_parts(self, settings: Mapping[str, Any]) -> dict[str, str]:
        """Hashes tying a resume journal to this run: inputs, model, parameters, version.

        Raises
        ------
        InputError
            If the model is in memory (it cannot be hashed: resume needs a model file).
        """
        if self.model_path is None:
            raise InputError("resume: resuming needs the model as a file or SavedModel "
                             "directory (an in-memory model cannot be tied to a journal)")
        inputs = []
        for source in self.sources:
            stamps = []
            for path in source.paths:
                if is_remote(path):
                    stamps.append(path)
                else:
                    stat = os.stat(path)
                    stamps.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
            inputs.append([source.name, stamps, source.bands, source.dtype.name, source.nodata,
                           list(source.grid.transform)[:6], source.grid.width,
                           source.grid.height])
        runner = self.runner
        parameters = {
            "fields": self.geometry.fields, "efield": self.geometry.efield,
            "spcscale": float(self.geometry.spcscale), "fullyconv": runner.fullyconv,
            "inputs": runner.input_names, "outputs": runner.output_names,
            "user_inputs": {k: np.asarray(v).tolist() for k, v in runner.user_inputs.items()},
            "box": self.box, "tile_size": self.tile_size, "margin": self.margin,
            "coverage": self.layout.coverage, "pad": runner.pad,
            "model_layout": runner.model_layout,
            "normalizations": [None if c is None else [c[0].tolist(), c[1].tolist()]
                               for c in runner.normalizations],
            "argmax": None if runner.argmax is None else [runner.argmax.threshold,
                                                          runner.argmax.below],
            **settings,
        }
        model = hash_files(distributed.model_files(self.model_path))
        return {"inputs": fingerprint(inputs), "model": model,
                "parameters": fingerprint(parameters), "version": terrapatch.__version__}

    def run(self, out: str | os.PathLike[str], pixel_type: str | np.dtype = "float32",
            rounding: bool = False, background: float | None = None,
            creation_options: Mapping[str, str] | None = None, quiet: bool = False,
            prefetch: int = 2, scheduler: Any = None, workers: int | None = None,
            block_tiles: int | None = None, resume: bool = False,
            output_format: str | None = None, overview_resampling: str | None = None,
            colormap: Mapping[int, Sequence[int]] | None = None,
            class_names: Sequence[str] | None = None,
            sink: str | None = None) -> ServeSummary:
        """Compute every tile and write the map ``out`` (atomically); see :func:`serve`."""
        dtype = pixel_dtype(pixel_type, parameter="out (pixel type)")
        fill = convert_pixels(np.asarray([background or 0.0], dtype=np.float64), dtype)[0]
        if block_tiles is not None and int(block_tiles) < 1:
            raise InputError(f"block_tiles: {block_tiles!r} must be ≥ 1")
        if sink is not None and sink not in SINKS:
            raise InputError(f"sink: {sink!r} is not one of {', '.join(SINKS)}")
        if colormap is None and class_names is None and self.runner.bands == 1 \
                and dtype.name in LEGEND_DTYPES:
            # A class map gets the classes the model records (names and colours).
            colormap = self.recorded.defaults.get("colormap")
            class_names = self.recorded.defaults.get("class_names")
        fmt = MapFormat.for_path(
            out, output_format, dict(creation_options or {}), overview_resampling,
            {int(k): tuple(v) for k, v in colormap.items()} if colormap else None,
            list(class_names) if class_names else None)
        self.check_outputs(out, output_format, creation_options)
        if (fmt.colormap or fmt.class_names) and self.runner.bands != 1:
            raise InputError(f"colormap: class colours and names need a one-band map; this "
                             f"one has {self.runner.bands} bands (serve the class output only)")
        if (fmt.colormap or fmt.class_names) and dtype.name not in LEGEND_DTYPES:
            raise InputError(f"colormap: class colours and names need a "
                             f"{' or '.join(LEGEND_DTYPES)} map; this one is {dtype.name} "
                             "(give pixel_type='uint8')")
        on_cluster = scheduler is not None or workers is not None
        blocks_sink = resume or fmt.blocks_only or (on_cluster and sink != "ordered")
        if sink == "ordered" and blocks_sink:
            why = "resume" if resume else "a VRT output"
            raise InputError(f"sink: 'ordered' cannot be used with {why}, which needs the "
                             "block sink")
        bw, bh = self.box[2], self.box[3]
        # The background becomes the output's nodata only when given: with OTBTF's default
        # of 0, a nodata tag would hide class 0 of every classification map.
        nodata = None if background is None else float(fill)
        profile = fmt.tiff_profile(bw, bh, self.runner.bands, dtype, self.output_grid.crs,
                                   self.transform, nodata)
        stats = ServeStats()
        run = Execution(self, fmt, dtype, rounding, fill, nodata, profile, stats, quiet, prefetch)
        start = time.perf_counter()
        try:
            with PendingOutput(out, resume=resume) as pending, \
                    rasterio.Env(GDAL_CACHEMAX=self.block_cache_bytes(dtype)):
                run.pending = pending
                if on_cluster:
                    with cluster.client_for(scheduler, workers) as client:
                        where = run.on_cluster(client, blocks_sink, block_tiles, resume)
                else:
                    where = "in process"
                    if blocks_sink:
                        run.blocks_locally(block_tiles, resume)
                    else:
                        run.ordered_locally()
                run.finish()
        except Exception as exc:
            if is_write_failure(exc):  # disk full, quota, I/O error: name the user's output
                raise cannot_write(exc, out, "out") from exc
            raise
        seconds = time.perf_counter() - start
        if run.clamped:
            logger.warning("out: %d pixel value(s) outside the range of %s were clamped to it "
                           "(OTB's conversion); choose a wider pixel type to keep them",
                           run.clamped, dtype.name)
        logger.info(
            "wrote %s: %d×%d px, %d band(s) %s, %s, %d tile(s) (%d skipped), %.1f s, %.0f px/s "
            "(%s)", os.fspath(out), bw, bh, self.runner.bands, dtype.name, fmt.driver,
            len(self.tiles), stats.skipped, seconds, bw * bh / max(seconds, 1e-9), where,
        )
        runner = self.runner
        return ServeSummary(
            path=Path(out), width=bw, height=bh, bands=runner.bands, dtype=dtype.name,
            transform=self.transform, crs=self.output_grid.crs, box=self.box,
            output_grid=self.output_grid, geometry=self.geometry, derived=self.derived,
            fullyconv=runner.fullyconv, output_names=tuple(runner.output_names),
            tile_size=self.tile_size, tiles=len(self.tiles), skipped_tiles=stats.skipped,
            seconds=seconds, read_seconds=stats.read, compute_seconds=stats.compute,
            write_seconds=stats.write, driver=fmt.driver,
            sink="blocks" if blocks_sink else "ordered", blocks=run.n_blocks,
            resumed_blocks=run.resumed, assemble_seconds=run.assemble_seconds,
            clamped=run.clamped, margin=self.margin, coverage=self.layout.coverage,
            model_layout=runner.model_layout,
        )

    def check_outputs(self, out: str | os.PathLike[str], output_format: str | None = None,
                      creation_options: Mapping[str, str] | None = None) -> None:
        """Refuse a map ``out`` that would replace an input, or is not written as named.

        See :func:`terrapatch.writer.check_outputs`.
        """
        check_map_output(out, self.sources, self.model_path, output_format, creation_options)


def check_map_output(out: str | os.PathLike[str], sources: Sequence[Any], model: Any,
                     output_format: str | None = None,
                     creation_options: Mapping[str, str] | None = None) -> None:
    """:func:`terrapatch.writer.check_outputs` for a map: the sources and model are inputs."""
    inputs: dict[str, Any] = {f"{s.name}.paths": s.paths for s in sources
                              if isinstance(s, Source)}
    if isinstance(model, str | os.PathLike):
        inputs["model"] = model
    check_outputs({"out": Output(out, "map", output_format, dict(creation_options or {}))},
                  inputs)
