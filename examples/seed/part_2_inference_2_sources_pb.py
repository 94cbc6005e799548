"""Step 4a: patch-based map at 20 m; the 20 m image is source 1 (it sets the output spacing)."""

from _inference import BOX, parse
from paths import img_10m, img_20m

from terrapatch import apps as pyotb

params = parse(__doc__, "map_2_sources_pb.tif")
infer = pyotb.TensorflowModelServe(
    n_sources=2,
    source1_il=img_20m,
    source1_rfieldx=8,
    source1_rfieldy=8,
    source1_placeholder="input_20m",
    source2_il=img_10m,
    source2_rfieldx=16,
    source2_rfieldy=16,
    source2_placeholder="input_10m",
    model_dir=params.savedmodel,
    output_names="estimated_labels",
)
infer.write(params.out, pixel_type="uint8", ext_fname=BOX)
