"""Sample selection: choose where patches will be cut (grids, label images, labelled polygons).

Four jobs, each a plain function over rasters and vectors:

* :func:`select_patches` (OTBTF ``PatchesSelection``, :mod:`.grid`): a regular grid
  of candidate patches on a reference raster, filtered by nodata / mask, split into
  train / valid / test groups (``split``, ``chessboard``, ``all``, ``balanced``).
* :func:`select_from_label_image` (OTBTF ``LabelImageSampleSelection``,
  :mod:`.labels`): pixel centres drawn per class from a label raster.
* :func:`polygon_class_statistics` (OTBTF ``DensePolygonClassStatistics``,
  :mod:`.polygons`): per-class and per-polygon pixel counts of polygons rasterised
  on a grid.
* :func:`sample_polygons` (:mod:`.polygons`): points drawn per class inside
  labelled polygons.

Their results and writers are in :mod:`.samples`.

Placement rule
--------------
Points are placed through :mod:`terrapatch.geometry`: a candidate patch is kept only
if it is the window of a cell of the extraction's sampling grid G (``factor`` 1 for
one source; 2 when a 10 m image is source 1 beside 20 m sources), and its point is
that cell's centre, so the patch extracted at a point is exactly the patch the grid
validated. With ``factor`` 1 the point is the centre of pixel ``start + psize // 2``
for odd and even sizes alike; OTBTF's even-size shift to the pixel's bottom-left
corner (reference §11.2) is not reproduced.

Every raster is read by strips of rows whose size is bounded by
:data:`STRIP_BYTES`, so memory does not grow with the raster.
"""

from terrapatch.raster import PathLike
from terrapatch.sampling._rasters import STRIP_BYTES
from terrapatch.sampling.grid import (
    PATCH_STRATEGIES,
    candidate_starts,
    patch_reference_pixels,
    select_patches,
    split_sequence,
)
from terrapatch.sampling.labels import LABEL_STRATEGIES, select_from_label_image
from terrapatch.sampling.polygons import (
    EDGE_MARGIN,
    POLYGON_STRATEGIES,
    polygon_class_statistics,
    sample_polygons,
)
from terrapatch.sampling.samples import (
    GROUPS,
    PatchSelection,
    PolygonSamples,
    PolygonStatistics,
    Samples,
    write_class_map,
)

__all__ = [
    "EDGE_MARGIN",
    "GROUPS",
    "LABEL_STRATEGIES",
    "PATCH_STRATEGIES",
    "POLYGON_STRATEGIES",
    "STRIP_BYTES",
    "PatchSelection",
    "PathLike",
    "PolygonSamples",
    "PolygonStatistics",
    "Samples",
    "candidate_starts",
    "patch_reference_pixels",
    "polygon_class_statistics",
    "sample_polygons",
    "select_from_label_image",
    "select_patches",
    "split_sequence",
    "write_class_map",
]
