"""Benchmark: one training epoch of the seed model fed by DatasetFromPatchesImages vs NumPy.

Writes random patches images (10 m 16×16×4, 20 m 8×8×6, labels 1×1) in a temporary
directory, then times epochs of ``model.fit`` on the same samples fed three ways:
in-memory NumPy arrays (``model.fit(x=dict, y=dict)``, the reference),
``DatasetFromPatchesImages`` in memory, and ``DatasetFromPatchesImages`` streaming
from disk. Each mode has its own model (same seed), warmed up by a short fit so that
tracing is not timed; timed epochs are interleaved across modes and the best of
``--repeats`` counts, which keeps the comparison fair on a shared machine. Prints
samples/s and the ratio ``numpy rate / dataset rate`` (target ≤ 1.15), then a final
``RESULT training ...`` line.

    python benchmarks/bench_training.py --n_samples 20000 --batch_size 8
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import terrapatch as otbtf
from terrapatch.patches import write_patches_image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_dual_source.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_dual_source", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_random_patches(directory: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "img_10m": rng.integers(0, 10000, (n, 16, 16, 4)).astype("uint16"),
        "img_20m": rng.integers(0, 10000, (n, 8, 8, 6)).astype("uint16"),
        "labels": rng.integers(0, 6, (n, 1, 1, 1)).astype("uint8"),
    }
    for key, array in arrays.items():
        _, psy, psx, bands = array.shape
        write_patches_image(directory / f"{key}.tif", [array], n_patches=n,
                            patch_size_x=psx, patch_size_y=psy, bands=bands,
                            dtype=array.dtype)
    return arrays


def build_model(example, element_spec):
    keras.utils.set_random_seed(0)
    model = example.DualSrcFCNNModel(dataset_element_spec=element_spec)
    model.compile(
        loss={example.tgt_key: keras.losses.CategoricalCrossentropy()},
        optimizer=keras.optimizers.Adam(2e-4),
        metrics={example.tgt_key: example.seed_metrics()},
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_samples", type=int, default=20000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed epochs per feeding mode, interleaved; the best counts")
    parser.add_argument("--no_streaming", action="store_true", help="skip the streaming run")
    args = parser.parse_args(argv)
    example = load_example()
    n, batch = args.n_samples, args.batch_size
    used = (n // batch) * batch

    with tempfile.TemporaryDirectory(prefix="terrapatch-bench-training-") as tmp:
        start = time.perf_counter()
        arrays = write_random_patches(Path(tmp), n)
        print(f"wrote {n} random samples in {time.perf_counter() - start:.1f} s")
        files = {key: [str(Path(tmp) / f"{key}.tif")] for key in arrays}

        # Reference: the same samples as NumPy arrays in memory.
        x = {example.inp1_key: arrays["img_10m"], example.inp2_key: arrays["img_20m"]}
        y = {example.tgt_key: np.eye(6, dtype="float32")[arrays["labels"][..., 0]]}
        runs: dict[str, tuple[object, dict]] = {}
        spec = otbtf.DatasetFromPatchesImages(files).get_tf_dataset(
            batch, example.dataset_preprocessing_fn, [example.tgt_key]).element_spec
        runs["numpy"] = (build_model(example, spec),
                         {"x": x, "y": y, "batch_size": batch, "shuffle": True})
        modes = [("memory", False)] + ([] if args.no_streaming else [("streaming", True)])
        for label, streaming in modes:
            start = time.perf_counter()
            dataset = otbtf.DatasetFromPatchesImages(files, use_streaming=streaming)
            tf_ds = dataset.get_tf_dataset(batch, example.dataset_preprocessing_fn,
                                           [example.tgt_key])
            print(f"dataset ({label}) set up in {time.perf_counter() - start:.2f} s")
            runs[label] = (build_model(example, tf_ds.element_spec), {"x": tf_ds})

        for model, kwargs in runs.values():  # trace the train functions (not timed)
            model.fit(**kwargs, epochs=1, steps_per_epoch=args.warmup_steps, verbose=0)
        seconds: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(args.repeats):  # interleaved, so load changes hit every mode
            for label, (model, kwargs) in runs.items():
                start = time.perf_counter()
                model.fit(**kwargs, epochs=1, verbose=0)
                seconds[label].append(time.perf_counter() - start)

    rates = {label: used / min(times) for label, times in seconds.items()}
    for label, times in seconds.items():
        ratio = "" if label == "numpy" else f"  ratio {rates['numpy'] / rates[label]:.3f}"
        print(f"{label:10s}: best {min(times):6.2f} s/epoch (all: "
              f"{', '.join(f'{t:.2f}' for t in times)})  {rates[label]:6.0f} samples/s{ratio}")
    parts = [f"n_samples={n}", f"batch_size={batch}", f"numpy={rates['numpy']:.0f}/s"]
    for label in runs:
        if label != "numpy":
            parts.append(f"dataset_{label}={rates[label]:.0f}/s")
            parts.append(f"ratio_{label}={rates['numpy'] / rates[label]:.3f}")
    print("RESULT training " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
