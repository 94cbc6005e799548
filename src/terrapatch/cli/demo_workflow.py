"""The demo (:func:`run_demo`, ``terrapatch demo``): the seed's whole workflow on a synthetic scene.

1. generate a Sentinel-2-like 10 m / 20 m scene with a label map;
2. select training / validation patches on a grid of the label map (PatchesSelection);
3. extract two-source patches (PatchesExtraction: 10 m 16 × 16, 20 m 8 × 8, nodata 0);
4. train the seed's dual-source model and a single-source (10 m) baseline;
5. export the dual-source model (SavedModel + ONNX);
6. map the scene patch-based and fully-convolutionally (TensorflowModelServe);
7. write quicklooks, a confusion-matrix PNG and ``report.md`` with per-class
   precision / recall / F1 on the validation samples, single vs dual source.

It needs every extra (``pip install 'terrapatch[all]'``): without one, it stops
before step 1 with a one-line error naming the extra to install.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch._optional import (
    EXTRAS,
    available,
    import_keras,
    missing_extra_message,
    set_tensorflow_log_level,
)
from terrapatch.apps import get_app
from terrapatch.errors import InputError, MissingExtraError
from terrapatch.progress import logger
from terrapatch.testing import CLASSES, make_scene
from terrapatch.writer import Output, atomic_output, cannot_write, claim_outputs

SOURCES = ("img_10m", "img_20m")
#: Smallest and largest scene (10 m pixels a side) the demo runs on: below, too few
#: patches to train on; above, the demo is no longer a demo.
MIN_SIZE, MAX_SIZE = 128, 8192

set_tensorflow_log_level()


def check_extras() -> None:
    """Fail in one line, before any work, when a package of the demo's extras is missing.

    Raises
    ------
    MissingExtraError
        Naming ``terrapatch[tensorflow]``, ``terrapatch[report]`` or ``terrapatch[all]``.
    """
    missing = tuple(m for m in EXTRAS if not available(m))
    if missing:
        message, extra = missing_extra_message(
            missing, "demo: the workflow (training, export, plots)", "not installed")
        raise MissingExtraError(message, extra=extra, package=missing[0])


class _Steps:
    """Times each step and logs it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        logger.info("demo: %s…", name)
        result = func(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        logger.info("demo: %s done in %.1f s", name, self.seconds[name])
        return result


def select(scene_dir: Path, out: Path, quiet: bool) -> dict[str, Path]:
    """Grid of 16 × 16 patches every 8 pixels on the label map, split 80 % / 20 % at random."""
    points = {"train": out / "points_train.gpkg", "valid": out / "points_valid.gpkg"}
    get_app("PatchesSelection")(
        {"in": scene_dir / "labels_10m.tif", "label": scene_dir / "labels_10m.tif",
         "nodata": 255, "grid.step": 8, "grid.psize": 16, "grid.offsetx": 7,
         "grid.offsety": 7, "grid.factor": 2, "strategy": "split", "strategy.split.random": True,
         "strategy.split.trainprop": 80, "strategy.split.validprop": 20,
         "outtrain": points["train"], "outvalid": points["valid"]}, quiet=quiet)
    return points


def extract(scene_dir: Path, points: dict[str, Path], out: Path,
            quiet: bool) -> dict[str, dict[str, str]]:
    """The seed's two-source PatchesExtraction, for the train and valid points."""
    written: dict[str, dict[str, str]] = {}
    for split, vec in points.items():
        files = {key: str(out / f"{split}_{key}_2src.tif") for key in (*SOURCES, "labels")}
        get_app("PatchesExtraction")(
            n_sources=2, quiet=quiet,
            source1_il=scene_dir / "s2_10m.tif", source1_patchsizex=16, source1_patchsizey=16,
            source1_out=files["img_10m"], source1_nodata=0,
            source2_il=scene_dir / "s2_20m.tif", source2_patchsizex=8, source2_patchsizey=8,
            source2_out=files["img_20m"], source2_nodata=0,
            vec=vec, field="class", outlabels=files["labels"],
        )
        written[split] = files
    return written


def _dataset(files: dict[str, str], keys: tuple[str, ...], batch: int, shuffle: bool) -> Any:
    import terrapatch as otbtf
    from terrapatch.zoo import TARGET

    names = {"img_10m": "input_10m", "img_20m": "input_20m"}

    def preprocessing(sample: dict[str, Any]) -> dict[str, Any]:
        inputs = {names[k]: sample[k] for k in keys}
        return {**inputs, TARGET: otbtf.ops.one_hot(sample["labels"], len(CLASSES))}

    dataset = otbtf.DatasetFromPatchesImages(
        filenames_dict={k: [files[k]] for k in (*keys, "labels")})
    return dataset.get_tf_dataset(batch, preprocessing_fn=preprocessing, targets_keys=[TARGET],
                                  drop_remainder=False, shuffle=shuffle, seed=0)


def train(patches: dict[str, dict[str, str]], out: Path, dual: bool, epochs: int) -> Path:
    """Train the dual-source model or the single-source baseline; return the .keras path."""
    keras = import_keras("demo: training")

    from terrapatch.metrics import FScore
    from terrapatch.zoo import TARGET, DualSourceClassifier, SingleSourceClassifier

    keras.utils.set_random_seed(0)
    keys = SOURCES if dual else SOURCES[:1]
    ds_train = _dataset(patches["train"], keys, 32, shuffle=True)
    ds_valid = _dataset(patches["valid"], keys, 64, shuffle=False)
    cls = DualSourceClassifier if dual else SingleSourceClassifier
    model = cls(dataset_element_spec=ds_train.element_spec, class_nb=len(CLASSES))
    model.compile(loss={TARGET: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(1e-3),
                  metrics={TARGET: [FScore(class_id=c, name=f"fscore_cls{c}")
                                    for c in range(len(CLASSES))]})
    path = out / ("model_dual_source.keras" if dual else "model_single_source.keras")
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), save_best_only=True,
                                                 monitor="val_loss", mode="min")
    model.fit(ds_train, epochs=epochs, validation_data=ds_valid, callbacks=[checkpoint],
              verbose=0)
    return path


def evaluate(model_path: Path, patches: dict[str, str], dual: bool) -> Any:
    """Per-class scores of a trained model on the validation patches."""
    from terrapatch.engines import Engine
    from terrapatch.patches import read_patches
    from terrapatch.report import class_scores

    engine = Engine.load(model_path)
    inputs = {"input_10m": read_patches(patches["img_10m"]).astype(np.float32)}
    if dual:
        inputs["input_20m"] = read_patches(patches["img_20m"]).astype(np.float32)
    predicted = engine.run(inputs, ["estimated_labels"])["estimated_labels"].ravel()
    reference = read_patches(patches["labels"]).ravel()
    return class_scores(reference, predicted, CLASSES)


def serve_maps(scene_dir: Path, models: dict[str, Path], out: Path,
               quiet: bool) -> dict[str, Path]:
    """Map the whole scene with the dual-source SavedModel (PB and FCN) and the baseline."""
    serve_app = get_app("TensorflowModelServe")
    common = {"source1.il": scene_dir / "s2_20m.tif", "source1.rfieldx": 8,
              "source1.placeholder": "input_20m", "source1.nodata": 0,
              "source2.il": scene_dir / "s2_10m.tif", "source2.rfieldx": 16,
              "source2.placeholder": "input_10m", "source2.nodata": 0,
              "output.names": "estimated_labels", "output.bv": 255}
    maps = {"dual_pb": out / "map_dual_source_pb.tif",
            "dual_fcn": out / "map_dual_source_fcn.tif",
            "single_fcn": out / "map_single_source_fcn.tif"}
    serve_app(common, {"model.dir": models["savedmodel"]}, quiet=quiet).write(
        maps["dual_pb"], pixel_type="uint8")
    serve_app(common, {"model.dir": models["onnx"], "model.fullyconv": True},
              quiet=quiet).write(maps["dual_fcn"], pixel_type="uint8")
    serve_app({"source1.il": scene_dir / "s2_10m.tif", "source1.rfieldx": 16,
               "source1.placeholder": "input_10m", "source1.nodata": 0,
               "model.dir": models["single"], "model.fullyconv": True, "output.spcscale": 2,
               "output.names": "estimated_labels", "output.bv": 255},
              quiet=quiet).write(maps["single_fcn"], pixel_type="uint8")
    return maps


def write_report(out: Path, scores: dict[str, Any], maps: dict[str, Path],
                 steps: _Steps, n_samples: dict[str, int]) -> Path:
    """Quicklooks, confusion matrices and report.md."""
    import rasterio

    from terrapatch.report import confusion_png, quicklook, scores_table

    pngs = {name: quicklook(path, path.with_suffix(".png"), CLASSES, title=path.stem)
            for name, path in maps.items()}
    labels_png = quicklook(out / "scene" / "labels_10m.tif", out / "labels_10m.png", CLASSES,
                           title="reference labels (10 m)")
    cm = confusion_png(scores, out / "confusion_matrices.png")
    with rasterio.open(maps["dual_pb"]) as a, rasterio.open(maps["dual_fcn"]) as b:
        same = float((a.read(1) == b.read(1)).mean())
        size = f"{a.width} × {a.height} px at {a.res[0]:g} m"
    lines = [
        "# terrapatch demo report", "",
        "The seed workflow (OTBTF's *Dealing with multiple sources*) on the synthetic "
        "Sentinel-2-like scene: PatchesSelection → PatchesExtraction (10 m 16 × 16 + 20 m "
        "8 × 8) → training → export → TensorflowModelServe.", "",
        f"Samples: {n_samples['train']} training, {n_samples['valid']} validation "
        "(16 × 16 patches every 8 pixels of the label map, split 80/20 at random, so "
        "validation patches neighbour training ones).", "",
        "## Validation scores (per class: precision, recall, F1)", "",
        scores_table(scores), "",
        f"![confusion matrices]({cm.name})", "",
        "## Maps", "",
        f"Output grid: {size}. Patch-based and fully-convolutional maps of the dual-source "
        f"model agree on {100 * same:.2f} % of the pixels (SavedModel vs ONNX engine).", "",
        f"![reference]({labels_png.name})", "",
        *[f"![{name}]({png.name})" for name, png in pngs.items()], "",
        "## Timings", "",
        "| step | seconds |", "|---|---|",
        *[f"| {name} | {sec:.1f} |" for name, sec in steps.seconds.items()],
        f"| **total** | {sum(steps.seconds.values()):.1f} |", "",
    ]
    path = out / "report.md"
    with atomic_output(path, "report") as tmp:
        tmp.write_text("\n".join(lines))
    return path


def run_demo(outdir: str | os.PathLike[str] = "demo_out", size: int = 512, epochs: int = 12,
             quiet: bool = False) -> int:
    """Run the demo into ``outdir`` (one demo per folder at a time); returns the exit code.

    Raises
    ------
    InputError
        If ``size`` is not an even number in ``MIN_SIZE..MAX_SIZE`` or ``epochs < 1``.
    """
    if not MIN_SIZE <= size <= MAX_SIZE or size % 2:
        raise InputError(f"size: {size} must be an even number of pixels in "
                         f"{MIN_SIZE}..{MAX_SIZE}")
    if epochs < 1:
        raise InputError(f"epochs: {epochs} must be ≥ 1")
    check_extras()
    out = Path(outdir)
    with claim_outputs({"outdir": Output(out, "folder")}):  # one demo per folder at a time
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_write(exc, out, "outdir") from None
        return _run(out, size, epochs, quiet)


def _run(out: Path, size: int, epochs: int, quiet: bool) -> int:
    """The demo's steps, writing into ``out``."""
    steps = _Steps()
    scene = steps.run("scene", make_scene, out / "scene", size=size)
    points = steps.run("selection", select, scene.directory, out, quiet)
    patches = steps.run("extraction", extract, scene.directory, points, out, quiet)
    dual = steps.run("training (dual source)", train, patches, out, True, epochs)
    single = steps.run("training (single source)", train, patches, out, False, epochs)

    from terrapatch.export import export_model
    from terrapatch.patches import read_patches_info

    exported = steps.run("export", export_model, dual,
                         savedmodel=out / "model_dual_source_savedmodel",
                         onnx=out / "model_dual_source.onnx")
    models = {"savedmodel": exported["savedmodel"], "onnx": exported["onnx"], "single": single}
    maps = steps.run("serving", serve_maps, scene.directory, models, out, quiet)
    scores = steps.run("evaluation", lambda: {
        "single": evaluate(single, patches["valid"], dual=False),
        "dual": evaluate(dual, patches["valid"], dual=True)})
    n_samples = {k: read_patches_info(v["labels"]).n_patches for k, v in patches.items()}
    report = write_report(out, scores, maps, steps, n_samples)
    logger.info("demo: overall accuracy single %.3f, dual %.3f; report: %s",
                scores["single"].overall_accuracy, scores["dual"].overall_accuracy, report)
    return 0
