"""Step 1: two-source patch extraction (10 m patches 16 × 16, 20 m patches 8 × 8), pyotb style."""

from paths import img_10m, img_20m, pos_a, pos_b, prefix_a, prefix_b

from terrapatch import apps as pyotb

for vec, prefix in ((pos_a, prefix_a), (pos_b, prefix_b)):
    pyotb.PatchesExtraction(
        n_sources=2,
        source1_il=img_10m,
        source1_patchsizex=16,
        source1_patchsizey=16,
        source1_out=prefix + "img_10m_2src.tif",
        source1_nodata=0,
        source2_il=img_20m,
        source2_patchsizex=8,
        source2_patchsizey=8,
        source2_out=prefix + "img_20m_2src.tif",
        source2_nodata=0,
        vec=vec,
        field="class",
        outlabels=prefix + "labels_2src.tif",
    )
