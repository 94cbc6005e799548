"""PatchesExtraction application: OTBTF's parameter keys over :func:`terrapatch.extract_patches`."""

from __future__ import annotations

from terrapatch.apps._base import PATCH_SOURCE_NAMES, App, Param
from terrapatch.errors import InputError
from terrapatch.extraction import ExtractionSummary, extract_patches
from terrapatch.raster import Source
from terrapatch.spelling import SOURCE

#: OTBTF keys of :func:`~terrapatch.extract_patches`'s identifiers, and the
#: application's name for the core's log records (``extraction: …``).
EXTRACTION_NAMES = {
    **PATCH_SOURCE_NAMES, f"{SOURCE}.output": f"{SOURCE}.out", "vector": "vec",
    "labels_out": "outlabels", "points_out": "outpoints",
    "labels_pixel_type": "outlabels pixel type", "clamp_labels": "outlabels.clamp",
    "factor": "grid.factor", "reproject": "vec.reproject", "extraction": "PatchesExtraction",
}


class PatchesExtraction(App):
    """Extract patches from N sources at sample points (OTBTF ``PatchesExtraction``).

    Examples
    --------
    >>> from terrapatch.apps import PatchesExtraction  # doctest: +SKIP
    >>> PatchesExtraction(n_sources=2, source1_il="s2_10m.tif", source1_patchsizex=16,
    ...                   source1_patchsizey=16, source1_out="p10.tif", source1_nodata=0,
    ...                   source2_il="s2_20m.tif", source2_patchsizex=8, source2_patchsizey=8,
    ...                   source2_out="p20.tif", source2_nodata=0,
    ...                   vec="points.geojson", field="class", outlabels="labels.tif")
    """

    name = "PatchesExtraction"
    description = ("cut one patch per labelled point from each source, at its own resolution, "
                   "and write patches images")
    primary_output = "source1.out"
    supports_cluster = True
    spelling = EXTRACTION_NAMES
    source_params = (
        Param("il", "paths", "input image(s), stacked as bands", required=True),
        Param("out", "out", "output patches image", required=True, pixel_type="float32"),
        Param("patchsizex", "int", "patch width in this source's pixels", required=True),
        Param("patchsizey", "int", "patch height in this source's pixels", required=True),
        Param("nodata", "float", "drop samples whose patch holds this value in any band"),
    )
    params = (
        Param("vec", "path", "sample points (GeoJSON, GPKG, Shapefile…)", required=True),
        Param("field", "str", "integer label field of the points", required=True),
        Param("outlabels", "out", "output labels image (1 × N)", pixel_type="uint8"),
        Param("outlabels.clamp", "bool", "clamp class values the labels' pixel type cannot "
              "hold (with a warning; those classes merge) instead of failing", default=False),
        Param("outpoints", "outvec", "output vector of the kept points with their patch index"),
        Param("grid.factor", "int", "sampling grid spacing in source-1 pixels "
              "(default: coarsest spacing / source-1 spacing when integer)"),
        Param("vec.reproject", "bool", "reproject points to source 1's CRS if they differ",
              default=False),
        Param("shards", "bool", "write each output as shards, one per 2048-px block of "
              "source 1 (OUT_shards/OUT-NNNNN.tif), by the Dask workers on a cluster",
              default=False),
    )

    def run(self) -> ExtractionSummary:
        """Run the extraction."""
        n = self.n_sources
        sources = [
            Source(self.source(k, "il"),
                   patch_size=(self.source(k, "patchsizex"), self.source(k, "patchsizey")),
                   nodata=self.source(k, "nodata"), name=f"source{k}")
            for k in range(1, n + 1)
        ]
        outs = [self.output(f"source{k}.out") for k in range(1, n + 1)]
        labels = self.output("outlabels")
        for key, spec in [*((f"source{k}.out", o) for k, o in enumerate(outs, start=1)),
                          ("outlabels", labels)]:
            if spec is not None and spec.ext.box is not None:
                raise InputError(f"{key}: box= is not supported for PatchesExtraction outputs")
        options = {f"source{k}.output": o.ext.creation_options
                   for k, o in enumerate(outs, start=1) if o is not None}
        if labels is not None:
            options["labels_out"] = labels.ext.creation_options
        return extract_patches(
            sources, self.get("vec"), self.get("field"),
            [o.path if o else None for o in outs],
            labels_out=labels.path if labels else None,
            points_out=self.get("outpoints"),
            pixel_types=[o.pixel_type if o else None for o in outs],
            labels_pixel_type=labels.pixel_type if labels else None,
            output_options=options,
            factor=self.get("grid.factor"),
            reproject=bool(self.get("vec.reproject")),
            quiet=self.quiet,
            scheduler=self.scheduler,
            workers=self.workers,
            shards=bool(self.get("shards")),
            clamp_labels=bool(self.get("outlabels.clamp")),
        )
