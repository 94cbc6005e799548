"""A serving run: validate and plan it (:func:`prepare_serve`), then run it (:class:`ServeJob`).

The flow (docs/serve.md)::

    prepare_serve ── binding (inputs/outputs) ── probe (rf/ef) ── geometry (layout, tiles)
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

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

import terrapatch
from terrapatch import cluster
from terrapatch._params import optional_pair
from terrapatch.engines import Engine, check_device, load_engine
from terrapatch.errors import InputError, ModelError
from terrapatch.geometry import (
    COVERAGES,
    Box,
    Grid,
    Layout,
    ServingSteps,
    Tile,
    align_size,
    check_spcscale,
    crop_box,
    misalignments,
    plan_tiles,
    scale_value,
    serving_steps,
)
from terrapatch.progress import logger
from terrapatch.raster import Source, check_sources, is_remote
from terrapatch.serve import distributed
from terrapatch.serve.binding import resolve_inputs, resolve_outputs
from terrapatch.serve.execution import Execution
from terrapatch.serve.journal import fingerprint, hash_files
from terrapatch.serve.layouts import detect_layout, layout_known, with_layout
from terrapatch.serve.probe import (
    HALO_LIMIT,
    ModelGeometry,
    check_geometry,
    derive_geometry,
    efield_for_fields,
    measure_halo,
    probe_tile,
)
from terrapatch.serve.recorded import Recorded, recorded_for
from terrapatch.serve.runner import ServeStats, TileRunner
from terrapatch.serve.transforms import Argmax, Normalization, check_normalizations
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
    "DEFAULT_TILE_FCN",
    "DEFAULT_TILE_PB",
    "PB_BATCH_BYTES",
    "SINKS",
    "ServeJob",
    "ServeSummary",
    "prepare_serve",
    "serve",
]

#: Default tile size (output pixels) in fully-convolutional mode: large tiles amortise
#: the model call and the context margin (OTBTF's default of 16 is several times slower).
DEFAULT_TILE_FCN = 256
#: Default (largest) tile size in patch-based mode: 64×64 = 4096 patches per batch.
DEFAULT_TILE_PB = 64
#: Bytes of float32 patches one patch-based batch may hold: the default tile shrinks for
#: large receptive fields (e.g. 64×64×13 patches) so memory stays bounded.
PB_BATCH_BYTES = 256 * 2**20
#: Fully-convolutional tiles per model call when the model runs on a GPU.
GPU_TILE_BATCH = 4
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
    inputs: dict[str, Any] = {f"{s.name}.il": s.paths for s in sources if isinstance(s, Source)}
    if isinstance(model, str | os.PathLike):
        inputs["model.dir"] = model
    check_outputs({"out": Output(out, "map", output_format, dict(creation_options or {}))},
                  inputs)


def _pb_default_tile(sources: Sequence[Source], geometry: ModelGeometry) -> int:
    """Largest patch-based tile (≤ DEFAULT_TILE_PB) whose batch fits in PB_BATCH_BYTES."""
    per_pixel = sum(4 * rx * ry * s.bands
                    for s, (rx, ry) in zip(sources, geometry.fields, strict=True))
    side = math.isqrt(max(1, PB_BATCH_BYTES // max(1, per_pixel)))
    return max(1, min(DEFAULT_TILE_PB, side))


def prepare_serve(
    sources: Sequence[Source],
    model: Any,
    output_names: Sequence[str] | str | None = None,
    fullyconv: bool | None = None,
    spcscale: float | Fraction | str | None = None,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    engine: Engine | None = None,
    model_layout: str | None = None,
    margin: int | Sequence[int] | None = None,
    coverage: str | None = None,
    padding: str | float = "reflect",
    normalization: Sequence[Normalization | None] | None = None,
    argmax: bool = False,
    threshold: float | None = None,
    below_threshold: float = 255,
    tile_batch: int | None = None,
    device: str = "auto",
) -> ServeJob:
    """Validate a serving run and plan its tiles, without writing anything.

    Parameters are those of :func:`serve`. Loads the model, resolves its inputs,
    outputs and tensor layout, derives or checks the geometry (one small probe
    run), measures the halo of a same-padded model, builds the layout and the tile
    plan.
    """
    sources = check_sources(sources)
    grids = [s.grid for s in sources]  # opens every source: missing/unreadable files fail here
    recorded = recorded_for(model)
    fields_given = any(s.patch_size is not None for s in sources)
    sources = recorded.sources(sources)
    fullyconv = bool(recorded.value(fullyconv, "fullyconv", False))
    spcscale = recorded.value(spcscale, "spcscale", 1)
    if not fields_given:  # the recorded expression field goes with the recorded fields
        efield = recorded.value(efield, "efield", None)
    output_names = recorded.value(output_names or None, "output_names", None)
    model_layout = recorded.value(model_layout, "model_layout", None)
    normalization = recorded.normalizations(normalization, sources)
    device = check_device(device)
    if engine is None:
        engine = load_engine(model, device=device)
    model_path = model if isinstance(model, str | os.PathLike) else None
    user_inputs = {k: np.asarray(v) for k, v in (user_placeholders or {}).items()}
    user_inputs = {engine.resolve_input(k, "model.userplaceholders"): v
                   for k, v in user_inputs.items()}
    input_names = resolve_inputs(engine, sources, user_inputs)
    layout_guessed = model_layout is None and not layout_known(engine, input_names)
    model_layout = detect_layout(engine, sources, input_names, model_layout)
    engine = with_layout(engine, model_layout)
    outputs = resolve_outputs(engine, output_names)
    coverage = _check_coverage(coverage)
    pad = _check_padding(padding)
    if threshold is not None and not argmax:
        raise InputError(f"output.threshold: {threshold!r} needs output.argmax (the threshold "
                         "applies to the highest class score)")
    post = Argmax(threshold, below_threshold) if argmax else None
    given_margin = _margin(margin)
    spcscale = scale_value(check_spcscale(spcscale, "output.spcscale"))
    ef = optional_pair(efield, ("output.efieldx", "output.efieldy"))
    if not fullyconv and ef not in (None, (1, 1)):
        raise InputError(
            f"output.efieldx/y: {ef[0]}×{ef[1]} in patch-based mode; each patch gives one output "
            "pixel, so the expression field must be 1 (use model.fullyconv for larger ones)"
        )
    names = [s.name for s in sources]
    given = [s.patch_size for s in sources]
    derived = False
    if all(f is not None for f in given):
        geometry = ModelGeometry(tuple(given), ef or (1, 1), spcscale)  # type: ignore[arg-type]
        if fullyconv and ef is None:
            # OTBTF's default expression field is 1; otherwise derive it from the model.
            layout = Layout(tuple(grids), geometry.fields, factor=spcscale, efield=(1, 1))
            _, problem = probe_tile(engine, sources, layout, input_names, outputs, True,
                                     user_inputs, geometry)
            if problem:
                try:
                    found = derive_geometry(engine, sources, input_names, outputs, True,
                                            spcscale, user_inputs)
                except ModelError:  # reported with suggestions by _check_geometry below
                    found = None
                e = None if found is None else efield_for_fields(grids, geometry.fields,
                                                                  found, spcscale)
                if e is not None:
                    geometry = ModelGeometry(geometry.fields, e, spcscale)
                    derived = True
                    logger.info("expression field derived from the model: %d×%d", *e)
    else:
        with _layout_hint(layout_guessed, model_layout):
            found = derive_geometry(engine, sources, input_names, outputs, fullyconv,
                                    spcscale, user_inputs)
        fields = tuple(g if g is not None else d for g, d in zip(given, found.fields,
                                                                 strict=True))
        if ef is None:
            ef = found.efield if fullyconv else (1, 1)
        geometry = ModelGeometry(fields, ef, spcscale)
        derived = True
        logger.info("geometry derived from the model: %s", geometry.describe(names))

    steps = serving_steps(grids, spcscale, fullyconv)
    same_padded = bool(fullyconv and steps is not None and all(
        rf[d] * steps.outputs[d] == step[d] * geometry.efield[d]
        for rf, step in zip(geometry.fields, steps.sources, strict=True) for d in (0, 1)))
    if coverage is None:
        coverage = "full" if same_padded else "inset"
    layout = Layout(tuple(grids), geometry.fields, factor=spcscale, efield=geometry.efield,
                    coverage=coverage)
    for line in misalignments(grids):
        logger.warning("%s", line)
    out_grid = layout.output_grid
    with _layout_hint(layout_guessed, model_layout):
        channels = check_geometry(engine, sources, layout, input_names, outputs, fullyconv,
                                   user_inputs, geometry)
    dtypes = [engine.inputs[n].dtype for n in input_names]
    coefficients = check_normalizations(normalization, names, [s.bands for s in sources],
                                        dtypes)
    runner = TileRunner(sources, layout, input_names, dtypes, outputs, channels, fullyconv,
                        user_inputs, os.fspath(model_path) if model_path is not None else None,
                        model_layout=model_layout, normalizations=coefficients, argmax=post,
                        pad=pad if coverage == "full" else None, device=device)
    if given_margin is not None:
        margin_px = given_margin
    elif same_padded and steps is not None and not disable_tiling:
        margin_px = _measured_margin(engine, sources, input_names, outputs, user_inputs,
                                     steps, geometry.efield)
    else:
        margin_px = (0, 0)

    crop, cropped = crop_box(box, out_grid.width, out_grid.height)
    if cropped:
        logger.warning("box=%s cropped to the output grid: %d:%d:%d:%d",
                       ":".join(str(int(v)) for v in box or ()), *crop)
    ex, ey = geometry.efield
    if disable_tiling:
        size = (crop[2] + ex, crop[3] + ey)
    else:
        default = DEFAULT_TILE_FCN if fullyconv else _pb_default_tile(sources, geometry)
        size = optional_pair(tile_size, ("optim.tilesizex", "optim.tilesizey")) or (default,
                                                                                   default)
    if given_margin is not None and any(m > t for m, t in zip(given_margin, size,
                                                                 strict=True)):
        raise InputError(f"output.margin: {given_margin[0]} px is larger than the tile "
                         f"({size[0]}×{size[1]} px); give a larger optim.tilesizex/y")
    if any(m > t for m, t in zip(margin_px, size, strict=True)):
        enlarged = (max(size[0], 2 * margin_px[0]), max(size[1], 2 * margin_px[1]))
        logger.warning("optim.tilesizex/y %d×%d enlarged to %d×%d, twice the measured halo "
                       "of %d px", *size, *enlarged, margin_px[0])
        size = enlarged
    adjusted = align_size(size, geometry.efield)
    if adjusted != size and not disable_tiling:
        logger.warning("optim.tilesizex/y %d×%d enlarged to %d×%d, a multiple of the "
                       "expression field %d×%d", *size, *adjusted, ex, ey)
    tiles = plan_tiles(out_grid.width, out_grid.height, crop, adjusted, geometry.efield,
                       margin=margin_px, computed=layout.computed_size)
    logger.info("output grid %d×%d px at %g m (%s coverage), box %s, %d tile(s) of %d×%d "
                "overlapping by %d px (%s, %s model)", out_grid.width, out_grid.height,
                out_grid.grid.spacing[0], coverage, crop, len(tiles), *adjusted, margin_px[0],
                "fully-convolutional" if fullyconv else "patch-based", model_layout)
    batch = _tile_batch(tile_batch, getattr(engine, "device", "cpu"))
    return ServeJob(sources, engine, layout, geometry, derived, runner, crop, adjusted, tiles,
                    model_path=_model_path(model, engine), margin=margin_px, tile_batch=batch,
                    recorded=recorded)


def _tile_batch(value: int | None, device: str) -> int:
    """Tiles per model call (fully-convolutional), or raise naming optim.tilebatch.

    Default: :data:`GPU_TILE_BATCH` when the engine runs on a GPU, else 1 (a CPU is
    as busy with one tile as with several).
    """
    if value is None:
        return GPU_TILE_BATCH if device == "cuda" else 1
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise InputError(f"optim.tilebatch: {value!r} must be an integer ≥ 1")
    return int(value)


@contextlib.contextmanager
def _layout_hint(guessed: bool, layout: str) -> Iterator[None]:
    """Add to a model error that the tensor layout was assumed, not read from the model."""
    try:
        yield
    except ModelError as exc:
        if not guessed:
            raise
        other = "nchw" if layout == "nhwc" else "nhwc"
        raise ModelError(f"{exc}; the model's inputs have no static channel dimension, so "
                         f"terrapatch assumed {layout}: give model.layout {other} if the "
                         "model takes the other layout") from None


def _check_coverage(value: str | None) -> str | None:
    """``inset``, ``full`` or None (chosen from the model), or raise naming output.coverage."""
    if value is None:
        return None
    text = str(value).lower()
    if text not in COVERAGES:
        raise InputError(f"output.coverage: {value!r} is not one of {', '.join(COVERAGES)}")
    return text


def _check_padding(value: str | float) -> str | float:
    """``reflect`` or a finite constant, or raise naming output.padding."""
    if isinstance(value, str):
        if value.lower() == "reflect":
            return "reflect"
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"output.padding: {value!r} is neither reflect nor a "
                             "number") from None
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"output.padding: {value!r} must be finite or reflect")
    return number


def _margin(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """A margin ``(mx, my)`` ≥ 0 from one value or a pair, or raise naming output.margin."""
    if value is None:
        return None
    items = [value] if isinstance(value, int | float | np.number) else list(value)
    if len(items) not in (1, 2) or any(int(v) != v or v < 0 for v in items):
        raise InputError(f"output.margin: {value!r} must be an integer number of pixels ≥ 0 "
                         "(or a pair)")
    pair = (int(items[0]), int(items[-1]))
    return pair


def _measured_margin(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
                     outputs: Sequence[str], user_inputs: Mapping[str, np.ndarray],
                     steps: ServingSteps, efield: tuple[int, int]
                     ) -> tuple[int, int]:
    """The halo of a same-padded model, measured; a warning when it cannot be."""
    halo, problem = measure_halo(engine, input_names, [s.bands for s in sources], outputs,
                                 user_inputs, steps, efield=efield)
    if halo is None and "reached" in problem:
        raise ModelError(
            f"model.dir: the model's output keeps its input size (same padding), but {problem}; "
            f"give output.margin (e.g. {2 * HALO_LIMIT}) or serve with "
            "optim.disabletiling"
        )
    if halo is None:
        logger.warning("output.margin: the halo of this same-padded model could not be "
                       "measured (%s): tiles do not overlap, and pixels near tile edges may "
                       "differ from the model applied to the whole image; give output.margin",
                       problem)
        return (0, 0)
    if halo:
        logger.info("same-padded model: halo measured %d px; tiles overlap by %d px and crop "
                    "it (output.margin to override)", halo, halo)
    return (halo, halo)


def _model_path(model: Any, engine: Engine) -> str | None:
    """The model's file or directory, when it has one (for clusters and journals)."""
    if isinstance(model, str | os.PathLike):
        return os.path.abspath(os.fspath(model))
    path = str(getattr(engine, "path", "") or "")
    return os.path.abspath(path) if path and os.path.exists(path) else None


def serve(
    sources: Sequence[Source],
    model: Any,
    out: str | os.PathLike[str],
    output_names: Sequence[str] | str | None = None,
    fullyconv: bool | None = None,
    spcscale: float | Fraction | str | None = None,
    efield: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    box: Sequence[int] | None = None,
    pixel_type: str | np.dtype = "float32",
    rounding: bool = False,
    background: float | None = None,
    creation_options: Mapping[str, str] | None = None,
    quiet: bool = False,
    engine: Engine | None = None,
    user_placeholders: Mapping[str, Any] | None = None,
    disable_tiling: bool = False,
    prefetch: int = 2,
    scheduler: Any = None,
    workers: int | None = None,
    block_tiles: int | None = None,
    resume: bool = False,
    output_format: str | None = None,
    overview_resampling: str | None = None,
    colormap: Mapping[int, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    sink: str | None = None,
    model_layout: str | None = None,
    margin: int | Sequence[int] | None = None,
    coverage: str | None = None,
    padding: str | float = "reflect",
    normalization: Sequence[Normalization | None] | None = None,
    argmax: bool = False,
    threshold: float | None = None,
    below_threshold: float = 255,
    tile_batch: int | None = None,
    device: str = "auto",
) -> ServeSummary:
    """Apply a model to whole rasters and write the map (GeoTIFF, COG or VRT mosaic).

    Parameters
    ----------
    sources
        :class:`~terrapatch.raster.Source` objects, source 1 first: their
        ``patch_size`` is the receptive field (None: derived from the model),
        ``placeholder`` the model input they feed (None: the free inputs in
        alphabetical order), ``nodata`` their no-data value.
    model
        SavedModel directory, ``.keras`` file, ``.onnx`` file, in-memory
        :class:`keras.Model` or :class:`~terrapatch.engines.Engine`.
    out
        Output path: a GeoTIFF (``.tif``), or a VRT mosaic of block files (``.vrt``,
        its blocks kept in the folder ``<stem>.blocks`` beside it). Written in a
        pending folder beside it and moved there when complete.
    output_names
        Model outputs to write, stacked as bands in this order (signature keys or
        Keras layer names); default: the first output in alphabetical order.
    fullyconv
        Fully-convolutional mode: one tensor per source per tile; else patch-based.
    spcscale
        Output spacing in source-1 pixels: an integer ``k`` (coarser output) or ``1/k``
        (super-resolution: 0.5, 0.25, ``Fraction(1, 3)``; output pixels nested ``k × k``
        in every source-1 pixel). Other values are an error naming the nearest valid
        ones.
    efield
        Expression field ``ex`` or ``(ex, ey)`` (fully-convolutional mode); None:
        derived from the model (1 in patch-based mode).
    tile_size
        Tile size in output pixels (default :data:`DEFAULT_TILE_FCN` or
        :data:`DEFAULT_TILE_PB`), enlarged to a multiple of the expression field.
    box
        ``(startx, starty, sizex, sizey)`` in output-grid pixels: only that part is
        computed and written (cropped to the grid; no overlap is an error).
    pixel_type
        Output pixel type (``uint8``, ``int16``, ``float32``, ...): values are clamped to
        the type's range, then truncated (rounded when ``rounding``).
    rounding
        Round instead of truncating when converting to an integer pixel type.
    background
        Value of tiles skipped because a source's input is entirely nodata
        (``output.bv``), also written as the output's nodata value. None: skipped tiles
        are 0 and the output has no nodata value (so class 0 stays visible).
    creation_options
        GDAL creation options overriding the defaults (tiled, DEFLATE, BIGTIFF=IF_SAFER).
    quiet
        No progress bar.
    engine
        An already loaded engine to run instead of opening ``model``.
    user_placeholders
        Extra constant model inputs, name → array (``model.userplaceholders``).
    disable_tiling
        Compute the whole box as one tile (``optim.disabletiling``).
    prefetch
        Tiles read ahead and written behind (memory ∝ ``prefetch`` × tile size).
    scheduler
        Serve on a Dask cluster: a ``distributed.Client`` or a scheduler address
        (``"tcp://host:8786"``). The model must then be a path, and the model and the
        rasters must be visible to every worker at the same path (checked first).
    workers
        Serve on a local Dask cluster of this many single-threaded worker processes
        (when ``scheduler`` is None).
    block_tiles
        Tiles per block (a cluster task, a block file); default
        :meth:`ServeJob.block_sink_tiles` for the block sink,
        :meth:`ServeJob.default_block_tiles` for the ordered sink on a cluster.
    resume
        Keep a journal of finished blocks in the pending folder; after an
        interruption (Ctrl-C, kill, crash, lost cluster) a rerun with
        ``resume=True`` computes only the missing blocks and writes the same file.
        A journal of other inputs, model, parameters or version is refused.
    output_format
        ``"COG"`` for a Cloud-Optimized GeoTIFF with overviews (the CLI's
        ``?&gdal:of:COG``), ``"GTiff"`` (default for ``.tif``) or ``"VRT"``.
    overview_resampling
        Resampling of a COG's overviews (default ``NEAREST`` for integer maps,
        ``AVERAGE`` for float ones; also ``gdal:co:OVERVIEW_RESAMPLING``).
    colormap
        Colour table of band 1 (class value → ``(r, g, b[, a])``) for class maps.
    class_names
        Category names of band 1, by class value (tag ``CLASS_NAMES``; VRT categories).
    sink
        ``"ordered"`` (one writer here) or ``"blocks"`` (block files, written by the
        workers on a cluster). Default: blocks on a cluster, for ``resume`` and for VRT
        outputs; ordered otherwise.
    model_layout
        ``"nhwc"`` (channels last: TensorFlow, Keras) or ``"nchw"`` (channels first:
        PyTorch exports) image tensors, inputs and outputs alike. None: detected from
        the model's static channel dimensions and the sources' band counts.
    margin
        Output pixels by which tiles overlap (computed, then cropped), ``m`` or
        ``(mx, my)``. None: 0, except for same-padded models (output as large as the
        input), whose halo is measured by probing so that tiles equal the model applied
        to the whole image.
    coverage
        ``"inset"`` (OTBTF's: only pixels whose receptive fields lie inside every
        source) or ``"full"`` (source 1's whole extent; windows past the edges are
        filled as ``padding`` says). None: full for same-padded models, else inset.
    padding
        Fill of windows past a source's edges under full coverage: ``"reflect"`` or a
        constant value.
    normalization
        One :class:`~terrapatch.serve.Normalization` (or None) per source, applied to
        its values before the model (after nodata detection).
    argmax
        Write the class index of each output's highest score instead of the scores.
    threshold
        With ``argmax``: pixels whose highest score is below it get ``below_threshold``.
    below_threshold
        Value of pixels below ``threshold``.
    tile_batch
        Fully-convolutional tiles of one size stacked into one model call (in this
        process). Default: :data:`GPU_TILE_BATCH` on a GPU, else 1.
    device
        Where the model runs: ``"cpu"``, ``"cuda"`` (onnxruntime's CUDA provider,
        TensorFlow's GPU, torch CUDA; an error naming ``device`` when there is none) or
        ``"auto"`` (CUDA when the engine finds a GPU). Dask workers resolve it on
        their own machine.

    Returns
    -------
    ServeSummary
        Size, georeference, geometry and timings of what was written (on a cluster,
        read and model seconds are summed over the workers).

    Raises
    ------
    TerrapatchError
        On bad input (an :class:`~terrapatch.errors.InputError`, ``ModelError``, ...),
        an unreachable scheduler, a worker missing a file, or a task failing on the
        cluster after its retries; no file is left under ``out``.
    """
    dtype = pixel_dtype(pixel_type, parameter="out (pixel type)")
    if block_tiles is not None and int(block_tiles) < 1:
        raise InputError(f"block_tiles: {block_tiles!r} must be ≥ 1")
    # Before the model loads: no input replaced, the right extension, valid options.
    check_map_output(out, list(sources), model, output_format, creation_options)

    def prepare_and_run(client: Any) -> ServeSummary:
        job = prepare_serve(sources, model, output_names=output_names, fullyconv=fullyconv,
                            spcscale=spcscale, efield=efield, tile_size=tile_size, box=box,
                            user_placeholders=user_placeholders,
                            disable_tiling=disable_tiling, engine=engine,
                            model_layout=model_layout, margin=margin, coverage=coverage,
                            padding=padding, normalization=normalization, argmax=argmax,
                            threshold=threshold, below_threshold=below_threshold,
                            tile_batch=tile_batch, device=device)
        return job.run(out, dtype, rounding=rounding, background=background,
                       creation_options=creation_options, quiet=quiet, prefetch=prefetch,
                       scheduler=client, block_tiles=block_tiles, resume=resume,
                       output_format=output_format, overview_resampling=overview_resampling,
                       colormap=colormap, class_names=class_names, sink=sink)

    if scheduler is None and workers is None:
        return prepare_and_run(None)
    # Connect (or start the local cluster) first: an unreachable scheduler fails fast.
    with cluster.client_for(scheduler, workers) as client:
        return prepare_and_run(client)
