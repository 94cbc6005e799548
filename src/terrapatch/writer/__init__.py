"""Writing outputs: pixel types, formats, atomic outputs, locks, and the checks before a run.

Every file terrapatch writes goes through a locked pending folder beside it
(:class:`PendingOutput`, :func:`atomic_output`, :func:`atomic_directory`,
:func:`output_group`): it is written there and renamed only when complete, so an
interrupted or failed run never leaves a half-written file under the final name, a
second run on the same output is refused while the first lives, and a dead run's
leftovers are removed by the next one. Before any work, :func:`check_outputs` (and
:func:`claim_outputs`, which also takes the locks) refuses outputs that would destroy an
input or another output, wrong extensions and invalid GDAL creation options.

Modules: :mod:`~terrapatch.writer.pixels` (pixel types, conversion),
:mod:`~terrapatch.writer.formats` (extended file names, GeoTIFF profiles, map formats),
:mod:`~terrapatch.writer.pending` (pending folders, locks, atomic commits),
:mod:`~terrapatch.writer.checks` (the checks and claims),
:mod:`~terrapatch.writer.legend` (a class map's colour table and category names).
"""

from terrapatch.writer.checks import (
    OUTPUT_KINDS,
    Output,
    check_creation_option,
    check_outputs,
    claim_outputs,
    creation_option_list,
    vrt_members,
)
from terrapatch.writer.formats import (
    DRIVERS,
    EXTENSIONS,
    RESAMPLINGS,
    MapFormat,
    default_overview_resampling,
    geotiff_profile,
)
from terrapatch.writer.legend import (
    LEGEND_DTYPES,
    LEGEND_SIDECARS,
    apply_legend,
    legend_sidecar,
    read_category_names,
)
from terrapatch.writer.pending import (
    PendingOutput,
    atomic_directory,
    atomic_output,
    cannot_write,
    check_writable,
    claimed,
    current_umask,
    failure_reason,
    final_path,
    is_staged,
    is_write_failure,
    output_group,
    pending_folder,
)
from terrapatch.writer.pixels import PIXEL_TYPES, convert_pixels, count_unfit, pixel_dtype

__all__ = [
    "DRIVERS",
    "EXTENSIONS",
    "LEGEND_DTYPES",
    "LEGEND_SIDECARS",
    "OUTPUT_KINDS",
    "PIXEL_TYPES",
    "RESAMPLINGS",
    "MapFormat",
    "Output",
    "PendingOutput",
    "apply_legend",
    "atomic_directory",
    "atomic_output",
    "cannot_write",
    "check_creation_option",
    "check_outputs",
    "check_writable",
    "claim_outputs",
    "claimed",
    "convert_pixels",
    "count_unfit",
    "creation_option_list",
    "current_umask",
    "default_overview_resampling",
    "failure_reason",
    "final_path",
    "geotiff_profile",
    "is_staged",
    "is_write_failure",
    "legend_sidecar",
    "output_group",
    "pending_folder",
    "pixel_dtype",
    "read_category_names",
    "vrt_members",
]
