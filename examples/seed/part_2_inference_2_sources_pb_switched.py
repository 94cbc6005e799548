"""Step 4b: patch-based, sources switched: 10 m source 1, spcscale 2 gives a 20 m map."""

from _inference import BOX, parse
from paths import img_10m, img_20m

from terrapatch import apps as pyotb

params = parse(__doc__, "map_2_sources_pb_switched.tif")
infer = pyotb.TensorflowModelServe(
    n_sources=2,
    source1_il=img_10m,
    source1_rfieldx=16,
    source1_rfieldy=16,
    source1_placeholder="input_10m",
    source2_il=img_20m,
    source2_rfieldx=8,
    source2_rfieldy=8,
    source2_placeholder="input_20m",
    model_dir=params.savedmodel,
    output_spcscale=2,
    output_names="estimated_labels",
)
infer.write(params.out, pixel_type="uint8", ext_fname=BOX)
