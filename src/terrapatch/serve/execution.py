"""Executing one serving run: the local and Dask drivers, the sinks they feed, the end.

:class:`Execution` holds what one :meth:`~terrapatch.serve.ServeJob.run` needs once
the job is planned: the map's format and profile, the locked pending folder, and
which sink takes the tiles. Its drivers compute the tiles in this process (the
pipeline feeding the ordered writer or a block sink) or on a Dask cluster (workers
writing blocks, or sending pixels to the ordered writer); :meth:`Execution.finish`
assembles the blocks (copying compressed tiles when it can), writes a VRT mosaic
or converts to COG, and commits the map.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch import cluster
from terrapatch.progress import logger, progress_bar
from terrapatch.raster import SourceReader
from terrapatch.serve import distributed
from terrapatch.serve.journal import BlockStatus, Journal
from terrapatch.serve.pipeline import run_pipeline
from terrapatch.serve.runner import ServeStats, TileRunner
from terrapatch.serve.sinks import (
    BlockSink,
    BlockStore,
    OrderedWriter,
    assemble_blocks,
    describe_classes,
    to_cog,
    write_vrt,
)
from terrapatch.serve.tilecopy import copy_tiles
from terrapatch.tiling import Block, Tile, plan_blocks
from terrapatch.writer import (
    LEGEND_DTYPES,
    LEGEND_SIDECARS,
    MapFormat,
    PendingOutput,
    apply_legend,
    convert_pixels,
    count_unfit,
)

__all__ = ["Execution", "batches_of"]


def batches_of(tiles: Sequence[Tile], size: int) -> list[tuple[Tile, ...]]:
    """Consecutive tiles of one window size, ``size`` at most per group (in order)."""
    groups: list[tuple[Tile, ...]] = []
    current: list[Tile] = []
    for tile in tiles:
        if current and (len(current) == size or current[0].window[2:] != tile.window[2:]):
            groups.append(tuple(current))
            current = []
        current.append(tile)
    if current:
        groups.append(tuple(current))
    return groups


class Execution:
    """One :meth:`ServeJob.run`: the sink it uses, its pending folder, the two drivers."""

    def __init__(self, job: Any, fmt: MapFormat, dtype: np.dtype, rounding: bool,
                 fill: Any, nodata: float | None, profile: dict[str, Any], stats: ServeStats,
                 quiet: bool, prefetch: int) -> None:
        self.job = job
        self.fmt = fmt
        self.dtype = dtype
        self.rounding = rounding
        self.fill = fill
        self.nodata = nodata
        self.profile = profile
        self.stats = stats
        self.quiet = quiet
        self.prefetch = prefetch
        self.pending: PendingOutput | None = None
        self.store: BlockStore | None = None
        self.blocks: tuple[Block, ...] = ()
        self.n_blocks = 0
        self.resumed = 0
        self.assemble_seconds = 0.0
        self.map_file: Path | None = None
        #: Pixel values outside the output type's range, clamped (computed by this run).
        self.clamped = 0

    # ------------------------------------------------------------------ local

    def _local(self, tiles: Sequence[Tile], put: Any) -> None:
        """Serve ``tiles`` in this process: reader thread, model here, writer thread."""
        runner: TileRunner = self.job.runner
        stats, dtype = self.stats, self.dtype
        local: dict[str, list[SourceReader]] = {}

        def read(tile: Tile) -> dict[str, np.ndarray] | None:
            t0 = time.perf_counter()
            if "readers" not in local:
                local["readers"] = runner.open_readers()
            feed = runner.read(local["readers"], tile)
            stats.add("read", time.perf_counter() - t0)
            return feed

        def close_readers() -> None:
            for reader in local.pop("readers", []):
                reader.close()

        with progress_bar(len(tiles), "serving", unit="tile",
                          quiet=self.quiet) as bar:

            def write(tile: Tile, values: np.ndarray | None) -> None:
                t0 = time.perf_counter()
                if values is not None:  # one writer thread: no lock needed
                    self.clamped += count_unfit(values, dtype, self.rounding)
                pixels = None if values is None else \
                    convert_pixels(values, dtype, self.rounding).transpose(2, 0, 1)
                put(tile, pixels)
                stats.add("write", time.perf_counter() - t0)
                bar.update(1)

            def infer(tile: Tile, feed: dict[str, np.ndarray] | None) -> np.ndarray | None:
                if feed is None:
                    stats.add("skipped", 1)
                    return None
                return runner.infer(self.job.engine, tile, feed, stats)

            batch = self.job.tile_batch if runner.fullyconv else 1
            if batch <= 1:
                run_pipeline(tiles, read, infer, write, close_readers, self.prefetch)
                return

            def read_group(group: tuple[Tile, ...]) -> list[dict[str, np.ndarray] | None]:
                return [read(tile) for tile in group]

            def infer_group(group: tuple[Tile, ...],
                            feeds: list[dict[str, np.ndarray] | None]
                            ) -> list[np.ndarray | None]:
                return runner.infer_batch(self.job.engine, group, feeds, stats)

            def write_group(group: tuple[Tile, ...], values: list[np.ndarray | None]) -> None:
                for tile, tile_values in zip(group, values, strict=True):
                    write(tile, tile_values)

            run_pipeline(batches_of(tiles, batch), read_group, infer_group, write_group,
                         close_readers, max(1, self.prefetch // batch))

    def _writer(self) -> OrderedWriter:
        assert self.pending is not None
        self.map_file = self.pending.file("map.tif")
        return OrderedWriter(self.map_file, self.profile, self.job.box, self.fill, self.fmt)

    def ordered_locally(self) -> None:
        """The ordered sink in this process (the default)."""
        with self._writer() as writer:
            self._local(self.job.tiles, writer.put)

    def _open_blocks(self, block_tiles: int | None, resume: bool) -> tuple[Journal, list[Block]]:
        """Plan the blocks, open the journal; return it and the blocks still to compute."""
        assert self.pending is not None
        job = self.job
        size = int(block_tiles) if block_tiles else job.block_sink_tiles()
        self.blocks = plan_blocks(job.tiles, size)
        self.n_blocks = len(self.blocks)
        folder = self.pending.file("blocks")
        folder.mkdir(exist_ok=True)
        tiling = ((int(self.profile["blockxsize"]), int(self.profile["blockysize"]))
                  if self.profile.get("tiled") else None)
        self.store = BlockStore(folder, self.fmt, job.runner.bands, self.dtype.name,
                                job.output_grid.crs, job.output_grid.transform, self.nodata,
                                self.fill, tiling)
        settings = {"block_tiles": size, "dtype": self.dtype.name, "rounding": self.rounding,
                    "fill": float(self.fill), "nodata": self.nodata,
                    "format": [self.fmt.driver, self.fmt.creation_options,
                               self.fmt.overview_resampling],
                    "classes": [sorted((self.fmt.colormap or {}).items()),
                                self.fmt.class_names]}
        parts = job.journal_parts(settings) if resume else {"run": os.urandom(8).hex()}
        journal = Journal(self.pending.dir, self.pending.target, parts, resume)
        todo = [b for b in self.blocks if b.index not in journal.done]
        self.resumed = len(self.blocks) - len(todo)
        if self.resumed:
            logger.info("resuming %s: %d of %d block(s) already done, computing %d",
                        self.pending.target.name, self.resumed, len(self.blocks), len(todo))
        return journal, todo

    def _record(self, journal: Journal) -> Any:
        def record(status: BlockStatus) -> None:
            journal.record(status)
            self.stats.add("skipped", status.skipped)
        return record

    def blocks_locally(self, block_tiles: int | None, resume: bool) -> None:
        """The block sink in this process (resumable runs, VRT outputs)."""
        journal, todo = self._open_blocks(block_tiles, resume)
        assert self.store is not None
        try:
            sink = BlockSink(self.store, todo, self._record(journal))
            self._local([t for b in todo for t in b.tiles], sink.put)
        finally:
            journal.close()

    # ------------------------------------------------------------------ cluster

    def on_cluster(self, client: Any, blocks_sink: bool, block_tiles: int | None,
                   resume: bool) -> str:
        """Serve on a Dask cluster; returns a description of where."""
        job = self.job
        runner = job.cluster_runner()
        paths = distributed.worker_paths(runner)
        cluster.check_worker_paths(client, paths, labels=paths)
        threads = cluster.total_threads(client)
        if blocks_sink:
            journal, todo = self._open_blocks(block_tiles, resume)
            assert self.store is not None
            distributed.require_writable(client, self.store.folder)
            size = len(self.blocks[0].tiles) if self.blocks else 0
            where = (f"Dask, {len(client.nthreads())} worker(s), {threads} thread(s), "
                     f"{len(todo)} block(s) of ≤ {size} tile(s) written by the workers")
            logger.info("serving on %s: %s", client.scheduler.address, where)
            record = self._record(journal)

            def on_status(status: BlockStatus, clamped: int) -> None:
                self.clamped += clamped
                self.stats.add("read", status.read_seconds)
                self.stats.add("compute", status.compute_seconds)
                self.stats.add("write", status.write_seconds)
                record(status)

            try:
                distributed.run_blocks(client, runner, self.store, todo, self.rounding,
                                       on_status, self.quiet)
            finally:
                journal.close()
            return where
        size = int(block_tiles) if block_tiles else job.default_block_tiles(threads)
        blocks = plan_blocks(job.tiles, size)
        where = (f"Dask, {len(client.nthreads())} worker(s), {threads} thread(s), "
                 f"{len(blocks)} block(s) of ≤ {size} tile(s), written here")
        logger.info("serving on %s: %s", client.scheduler.address, where)
        with self._writer() as writer:

            def on_result(block: Block, result: distributed.BlockResult) -> None:
                pixels, read_seconds, compute_seconds, clamped = result
                self.clamped += clamped
                self.stats.add("read", read_seconds)
                self.stats.add("compute", compute_seconds)
                t0 = time.perf_counter()
                for tile, values in zip(block.tiles, pixels, strict=True):
                    if values is None:
                        self.stats.add("skipped", 1)
                    writer.put(tile, values)
                self.stats.add("write", time.perf_counter() - t0)

            distributed.run_pixels(client, runner, blocks, self.dtype.name, self.rounding,
                                   on_result, self.quiet)
        return where

    # ------------------------------------------------------------------ end

    def finish(self) -> None:
        """Assemble the blocks (or write the VRT), convert to COG, commit the map."""
        assert self.pending is not None
        pending, fmt = self.pending, self.fmt
        start = time.perf_counter()
        if self.store is not None and fmt.blocks_only:
            folder_name = f"{pending.target.stem}.blocks"
            vrt = pending.file("map.vrt")
            write_vrt(vrt, self.store, self.blocks, self.job.box, folder_name)
            pending.commit_folder(self.store.folder, folder_name)
            pending.commit(vrt)
            self.assemble_seconds = time.perf_counter() - start
            return
        if self.store is not None:
            store = self.store
            self.map_file = pending.file("map.tif")
            copied = copy_tiles(self.blocks, [store.path(b) for b in self.blocks],
                                self.job.box, self.profile, self.map_file,
                                lambda dataset: describe_classes(dataset, fmt))
            if not copied:
                logger.debug("blocks not on the map's tile grid: re-encoding them")
                with self._writer() as writer:
                    assemble_blocks(store, self.blocks, writer)
        assert self.map_file is not None
        final = self.map_file
        if fmt.driver == "COG":
            final = pending.file("map.cog.tif")
            to_cog(self.map_file, final, fmt, self.dtype)
        if self.store is not None or fmt.driver == "COG":
            self.assemble_seconds = time.perf_counter() - start
        if (fmt.colormap or fmt.class_names) and self.dtype.name in LEGEND_DTYPES:
            # Category names live in the PAM sidecar, where QGIS and GDAL read a legend.
            apply_legend(final, fmt.colormap, fmt.class_names)
        pending.commit(final, sidecars=LEGEND_SIDECARS)
