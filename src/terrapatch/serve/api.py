"""The one-call entry point: plan a serving run and write its map (:func:`serve`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import numpy as np

from terrapatch import cluster
from terrapatch.errors import InputError
from terrapatch.raster import Source
from terrapatch.serve.job import ServeSummary, check_map_output
from terrapatch.serve.plan import PlanOptions, prepare_serve
from terrapatch.writer import (
    pixel_dtype,
)

__all__ = ["serve"]


def serve(
    sources: Sequence[Source],
    model: Any,
    out: str | os.PathLike[str],
    output_names: Sequence[str] | str | None = None,
    *,
    pixel_type: str | np.dtype = "float32",
    rounding: bool = False,
    background: float | None = None,
    creation_options: Mapping[str, str] | None = None,
    quiet: bool = False,
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
    **plan: Unpack[PlanOptions],
) -> ServeSummary:
    """Apply a model to whole rasters and write the map (GeoTIFF, COG or VRT mosaic).

    Parameters
    ----------
    sources, model
        As for :func:`~terrapatch.serve.prepare_serve`: the sources, source 1 first, and
        the model (a path, an in-memory Keras model or ``nn.Module``, or an engine).
    out
        Output path: a GeoTIFF (``.tif``), or a VRT mosaic of block files (``.vrt``,
        its blocks kept in the folder ``<stem>.blocks`` beside it). Written in a
        pending folder beside it and moved there when complete.
    output_names
        Model outputs written, stacked as bands (see :func:`prepare_serve`).
    pixel_type
        Output pixel type (``uint8``, ``int16``, ``float32``, ...): values are clamped to
        the type's range, then truncated (rounded when ``rounding``).
    rounding
        Round instead of truncating when converting to an integer pixel type.
    background
        Value of tiles skipped because a source's input is entirely nodata, also
        written as the output's nodata value. None: skipped tiles are 0 and the output
        has no nodata value (so class 0 stays visible).
    creation_options
        GDAL creation options overriding the defaults (tiled, DEFLATE, BIGTIFF=IF_SAFER).
    quiet
        No progress bar.
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
        Category names of band 1, by class value (GDAL category names: the PAM sidecar
        ``map.tif.aux.xml`` of a GeoTIFF, the XML of a VRT). Colours and names need a
        one-band ``uint8`` or ``uint16`` map.
    sink
        ``"ordered"`` (one writer here) or ``"blocks"`` (block files, written by the
        workers on a cluster). Default: blocks on a cluster, for ``resume`` and for VRT
        outputs; ordered otherwise.
    **plan
        The keyword arguments of :func:`prepare_serve` (:class:`PlanOptions`): mode
        (``fullyconv``), geometry (``spcscale``, ``efield``, ``tile_size``, ``box``,
        ``margin``, ``coverage``, ``padding``), model (``engine``, ``model_layout``,
        ``user_placeholders``, ``device``, ``tile_batch``, ``disable_tiling``) and
        values (``normalization``, ``argmax``, ``threshold``, ``below_threshold``).

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
        job = prepare_serve(sources, model, output_names, **plan)
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
