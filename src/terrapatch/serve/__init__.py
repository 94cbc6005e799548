"""ModelServe: apply a model to whole rasters, streaming tile by tile into a map.

:func:`serve` is terrapatch's ``TensorflowModelServe``: N sources, each at its own
resolution with its receptive field, feed a model (TF SavedModel, ``.keras`` or
ONNX, see :mod:`terrapatch.engines`) in *patch-based* mode (one patch per source
per output pixel) or *fully-convolutional* mode (one tensor per source per tile),
and the outputs are stacked as bands of a georeferenced map on the output grid of
:class:`terrapatch.geometry.Layout`.

The package has one module per job (docs/serve.md shows the flow):

- :mod:`~terrapatch.serve.binding`: which model input each source feeds, which
  outputs are served;
- :mod:`~terrapatch.serve.layouts`: channels-last or channels-first model tensors;
- :mod:`~terrapatch.serve.probe`: receptive fields and expression field derived
  from the model, and checked; the halo of same-padded models;
- :mod:`~terrapatch.serve.transforms`: input normalisation, output argmax;
- :mod:`~terrapatch.serve.runner`: one tile (read → infer → assemble);
- :mod:`~terrapatch.serve.pipeline`: local threads (read ahead, write behind);
- :mod:`~terrapatch.serve.caches`: per-worker model and reader caches;
- :mod:`~terrapatch.serve.distributed`: blocks of tiles as Dask tasks;
- :mod:`~terrapatch.serve.sinks`: where tiles go (ordered GeoTIFF writer, block
  files), assembly, COG and VRT;
- :mod:`~terrapatch.serve.tilecopy`: assembly by copying compressed tiles;
- :mod:`~terrapatch.serve.journal`: the resume journal;
- :mod:`~terrapatch.serve.execution`: one run (sink choice, local and Dask drivers,
  assembly and commit);
- :mod:`~terrapatch.serve.recorded`: the model's recorded contract as defaults;
- :mod:`~terrapatch.serve.plan`: :func:`prepare_serve` (binding, geometry, tiles);
- :mod:`~terrapatch.serve.job`: :class:`ServeJob` (one planned run) and
  :class:`ServeSummary`;
- :mod:`~terrapatch.serve.api`: :func:`serve`, plan and run in one call.

:mod:`terrapatch.writer` gives the map's format (:class:`~terrapatch.writer.MapFormat`)
and its locked pending folder (:class:`~terrapatch.writer.PendingOutput`), which any
output can use.
"""

from terrapatch.serve.api import serve
from terrapatch.serve.caches import cached_engine
from terrapatch.serve.distributed import BlockResult, serve_block, write_block
from terrapatch.serve.job import CLUSTER_BLOCK_TILES, SINKS, ServeJob, ServeSummary
from terrapatch.serve.journal import BlockStatus
from terrapatch.serve.layouts import ChannelsFirstEngine, detect_layout
from terrapatch.serve.plan import (
    DEFAULT_TILE_FCN,
    DEFAULT_TILE_PB,
    GPU_TILE_BATCH,
    PB_BATCH_BYTES,
    PlanOptions,
    prepare_serve,
)
from terrapatch.serve.probe import ModelGeometry, derive_geometry, measure_halo
from terrapatch.serve.runner import ServeStats, TileRunner
from terrapatch.serve.transforms import Argmax, Normalization
from terrapatch.tiling import Block, Tile, plan_blocks, plan_tiles
from terrapatch.writer import MapFormat

__all__ = [
    "CLUSTER_BLOCK_TILES",
    "DEFAULT_TILE_FCN",
    "DEFAULT_TILE_PB",
    "GPU_TILE_BATCH",
    "PB_BATCH_BYTES",
    "SINKS",
    "Argmax",
    "Block",
    "BlockResult",
    "BlockStatus",
    "ChannelsFirstEngine",
    "MapFormat",
    "ModelGeometry",
    "Normalization",
    "PlanOptions",
    "ServeJob",
    "ServeStats",
    "ServeSummary",
    "Tile",
    "TileRunner",
    "cached_engine",
    "derive_geometry",
    "detect_layout",
    "measure_halo",
    "plan_blocks",
    "plan_tiles",
    "prepare_serve",
    "serve",
    "serve_block",
    "write_block",
]
