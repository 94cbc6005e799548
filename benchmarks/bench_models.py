"""Serving the new model kinds: super-resolution, PyTorch vs its ONNX export, tile batching.

Each figure is a ratio measured in this one run (the machine is shared):

* ``super_resolution``: a 4-band 10 m raster served at ``spcscale 0.25`` (valid 3 × 3
  convolution + ×4 pixel shuffle, ONNX) end to end, against the model alone on the
  same tiles (pure compute), with the read / model / write seconds of the run;
* ``torch``: a two-source (10 m + 20 m) torch module served natively (TorchEngine)
  against its ONNX export (onnxruntime), same map;
* ``tile_batch``: the same fully-convolutional run with 1 and with 4 tiles per model
  call (on a CPU batching is expected to change little; on a GPU it feeds the device).

Prints ``RESULT`` lines for ``run_all.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio

from terrapatch.raster import Source
from terrapatch.serve import prepare_serve, serve
from terrapatch.testing import make_scene
from terrapatch.testing.onnx_models import super_resolution_onnx

SIZE = 1024  # 10 m pixels a side


def best_of(runs: int, func):
    times = []
    result = None
    for _ in range(runs):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return min(times), result


def pure_compute(job) -> float:
    """Seconds the engine takes on every tile's inputs, read beforehand."""
    readers = job.runner.open_readers()
    feeds = [(t, job.runner.read(readers, t)) for t in job.tiles]
    start = time.perf_counter()
    for _, feed in feeds:
        if feed is not None:
            job.engine.run(feed, job.runner.output_names)
    return time.perf_counter() - start


def super_resolution(work: Path, scene) -> None:
    model = super_resolution_onnx(work / "sr.onnx", bands=(4,), factors=(4,), names=("x",))
    src = [Source(scene.img_10m, name="source1")]
    seconds, summary = best_of(2, lambda: serve(src, model, work / "sr.tif", fullyconv=True,
                                                spcscale=0.25, quiet=True))
    job = prepare_serve(src, model, fullyconv=True, spcscale=0.25)
    compute = min(pure_compute(job) for _ in range(2))
    px = summary.width * summary.height
    # A one-convolution model: the run is bound by writing 4 float32 bands (DEFLATE), not
    # by the model; the stage seconds say where the time goes.
    print(f"RESULT super_resolution output_mpx={px / 1e6:.1f} mpx_per_s={px / seconds / 1e6:.2f} "
          f"e2e_over_compute={seconds / compute:.2f} read_s={summary.read_seconds:.2f} "
          f"compute_s={summary.compute_seconds:.2f} write_s={summary.write_seconds:.2f} "
          f"wall_s={seconds:.2f}")


def torch_vs_onnx(work: Path, scene) -> None:
    import torch

    from terrapatch.pytorch import export_onnx

    class TwoBranch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fine = torch.nn.Conv2d(4, 16, 4, stride=2)
            self.coarse = torch.nn.Conv2d(6, 16, 2)
            self.head = torch.nn.Conv2d(16, 5, 1)

        def forward(self, input_10m: torch.Tensor, input_20m: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fine(input_10m / 1e4) + self.coarse(input_20m / 1e4)))

    torch.manual_seed(0)
    module = TwoBranch().eval()
    onnx_path = export_onnx(module, work / "two_branch.onnx",
                            {"input_10m": (4, 4), "input_20m": (6, 2)})
    sources = [Source(scene.img_10m, placeholder="input_10m", name="source1"),
               Source(scene.img_20m, placeholder="input_20m", name="source2")]
    t_torch, a = best_of(2, lambda: serve(sources, module, work / "torch.tif", fullyconv=True,
                                          spcscale=2, quiet=True))
    t_onnx, b = best_of(2, lambda: serve(sources, onnx_path, work / "onnx.tif",
                                         fullyconv=True, spcscale=2, quiet=True))
    with rasterio.open(a.path) as x, rasterio.open(b.path) as y:
        diff = float(np.abs(x.read() - y.read()).max())
    px = a.width * a.height
    print(f"RESULT torch_engine output_mpx={px / 1e6:.2f} torch_mpx_per_s={px / t_torch / 1e6:.2f} "
          f"onnx_mpx_per_s={px / t_onnx / 1e6:.2f} torch_over_onnx={t_torch / t_onnx:.2f} "
          f"max_abs_diff={diff:.2g}")


def tile_batch(work: Path, scene) -> None:
    model = super_resolution_onnx(work / "sr2.onnx", bands=(4,), factors=(2,), names=("x",))
    src = [Source(scene.img_10m, name="source1")]
    times = {}
    for batch in (1, 4):
        times[batch], _ = best_of(2, lambda b=batch: serve(
            src, model, work / f"b{b}.tif", fullyconv=True, spcscale=0.5, tile_size=128,
            tile_batch=b, quiet=True))
    print(f"RESULT tile_batch seconds_1={times[1]:.2f} seconds_4={times[4]:.2f} "
          f"batch4_over_batch1={times[4] / times[1]:.2f}")


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        scene = make_scene(work / "scene", size=SIZE, n_points=10)
        super_resolution(work, scene)
        torch_vs_onnx(work, scene)
        tile_batch(work, scene)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
