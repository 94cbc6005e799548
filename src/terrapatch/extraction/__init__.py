"""PatchesExtraction: cut one patch per sample from each of N sources and write patches images.

The package's modules, one job each:

- :mod:`~terrapatch.extraction.job`: one run (checks, candidate windows, nodata
  rejection, the outputs, the :class:`ExtractionSummary`): :func:`extract_patches`;
- :mod:`~terrapatch.extraction.reading`: decode units, groups, the unit cache, regions and
  the vectorised gathers (each needed block decoded once, on threads or Dask tasks);
- :mod:`~terrapatch.extraction.spool`: the patch buffers (memory or a bounded memory-mapped
  spool) and their chunked reads;
- :mod:`~terrapatch.extraction.writing`: the patches images and labels image of a run;
- :mod:`~terrapatch.extraction.shards`: sharded outputs, one shard per spatial block.

Memory is bounded by the buffers and by a few tens of bytes of bookkeeping per sample,
not by the patches of all samples.
"""

from terrapatch.extraction.job import ExtractionSummary, extract_patches
from terrapatch.extraction.reading import patches_from_region
from terrapatch.extraction.shards import SHARDS_SUFFIX, shard_folder

__all__ = [
    "SHARDS_SUFFIX",
    "ExtractionSummary",
    "extract_patches",
    "patches_from_region",
    "shard_folder",
]
