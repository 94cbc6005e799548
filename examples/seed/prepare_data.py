"""Step 0: stack the Brandenburg Sentinel-2 bands and draw labelled points from OSM polygons.

The seed starts from stacked 10 m / 20 m images and two point files with a ``class``
field; this builds them from the real data: bands stacked per resolution, and points
drawn inside OSM land-use polygons (balanced per class, random inside 20 m pixels,
80 % training / 20 % validation).
"""

import numpy as np
import rasterio
from paths import CLASS_NB, OSM, S2, img_10m, img_20m, pos_a, pos_b

from terrapatch.sampling import sample_polygons
from terrapatch.vector import write_points

BANDS = {img_10m: ["B04", "B03", "B02", "B08"],
         img_20m: ["B05", "B06", "B07", "B8A", "B11", "B12"]}

for out, bands in BANDS.items():
    arrays = []
    for band in bands:
        with rasterio.open(S2 / f"T33UUU_20170216T102101_{band}.jp2") as ds:
            arrays.append(ds.read(1))
            profile = ds.profile
    profile.update(driver="GTiff", count=len(arrays), compress="deflate", tiled=True,
                   blockxsize=256, blockysize=256)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(np.stack(arrays))
    print(f"wrote {out}")

drawn = sample_polygons(img_20m, OSM, "fclass", strategy="balanced", mode="random", seed=0,
                        quiet=True)
samples = drawn.samples
classes = np.asarray(samples.fields["class"])
assert classes.max() < CLASS_NB, drawn.class_names
order = np.random.default_rng(0).permutation(len(samples))
n_a = int(0.8 * len(order))
for path, idx in ((pos_a, order[:n_a]), (pos_b, order[n_a:])):
    write_points(path, samples.x[idx], samples.y[idx], {"class": classes[idx]}, crs=samples.crs)
    print(f"wrote {path}: {len(idx)} points")
print("classes:", drawn.class_names)
