"""One vocabulary per layer: the core names parameters neutrally, the facade in OTBTF keys.

The same bad value is given once through the Python API (the message starts with the
neutral identifier, the keyword the caller typed) and once through the
TensorflowModelServe application and CLI (the message starts with the OTBTF key).
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from terrapatch.apps import TensorflowModelServe
from terrapatch.apps.serve import SERVE_NAMES
from terrapatch.cli import main
from terrapatch.errors import GeometryError, InputError, ModelError
from terrapatch.raster import Source
from terrapatch.serve import serve
from terrapatch.spelling import SOURCE, Spelling, respelled
from terrapatch.testing import make_scene
from terrapatch.testing.onnx_models import segmentation_onnx, single_conv_onnx

TABLE = {
    "spcscale": "output.spcscale",
    "tile_size": "optim.tilesizex/y",
    "tile_size[0]": "optim.tilesizex",
    "model": "model.dir",
    "margin": "output.margin",
    SOURCE: f"{SOURCE}.il",
    f"{SOURCE}.paths": f"{SOURCE}.il",
    f"{SOURCE}.patch_size": f"{SOURCE}.rfieldx/y",
    f"{SOURCE}.patch_size[1]": f"{SOURCE}.rfieldy",
}
SPELL = Spelling(TABLE)


# ------------------------------------------------------------------ the translation itself


@pytest.mark.parametrize(("neutral", "spelled"), [
    ("spcscale: 1.5 is neither", "output.spcscale: 1.5 is neither"),
    ("source2.patch_size[1]: 0 must be ≥ 1", "source2.rfieldy: 0 must be ≥ 1"),
    ("source1: file 'x.tif' does not exist", "source1.il: file 'x.tif' does not exist"),
    ("source3 (b.tif): rotated", "source3.il (b.tif): rotated"),
    ("model: the model is bad; give a larger tile_size",
     "model.dir: the model is bad; give a larger optim.tilesizex/y"),
    ("margin: 8 px; give margin=16 or a model", "output.margin: 8 px; give output.margin=16 "
                                                "or a model"),
    ("inconsistent: give sourceK.patch_size and spcscale=2",
     "inconsistent: give sourceK.rfieldx/y and output.spcscale=2"),
])
def test_subjects_and_mentions_are_respelled(neutral, spelled):
    assert SPELL(neutral) == spelled


@pytest.mark.parametrize("text", [
    "the model and its margin are fine",              # English words in the body
    "file '/data/source1.tif' is missing",            # a path holding an identifier
    "file 'source1.tif' is missing",
    "source1.rfieldx: 0 must be ≥ 1",                 # already in the facade's spelling
    "output.spcscale: 1.5",
    "tile_sizes and my_tile_size stay",               # identifiers inside longer words
    "models: two given",
])
def test_text_that_names_no_identifier_is_untouched(text):
    assert SPELL(text) == text


_WORDS = st.sampled_from(["the", "raster", "is", "at", "10 m", "'a.tif'", "(3×3)", ";", "model",
                          "margin", "source1.tif", "/x/source2"])


@given(st.lists(_WORDS, max_size=12))
def test_prose_without_identifiers_is_untouched(words):
    text = "why: " + " ".join(words)
    assert SPELL(text) == text


@given(st.integers(1, 99), st.sampled_from(["[1]", ""]))
def test_every_source_number_keeps_its_own_name(k, axis):
    assert SPELL(f"source{k}.patch_size{axis}: 0") == \
        f"source{k}.{'rfieldy' if axis else 'rfieldx/y'}: 0"


def test_respelled_keeps_the_class_and_the_traceback():
    def fail():
        raise GeometryError("source2: CRS differs; give source2.patch_size")

    with pytest.raises(GeometryError) as info, respelled(TABLE):
        fail()
    assert str(info.value) == "source2.il: CRS differs; give source2.rfieldx/y"
    assert info.traceback[-1].name == "fail"


def test_respelled_blocks_nest_innermost_first():
    with pytest.raises(InputError, match=r"^output\.spcscale: bad$"), respelled(TABLE), \
            respelled({"factor": "spcscale"}):
        raise InputError("factor: bad")


def test_log_records_are_respelled_inside_the_block_only(log_messages):
    log = logging.getLogger("terrapatch")
    with respelled(TABLE):
        log.warning("tile_size: %d×%d enlarged to %s", 16, 16, "tile_size=32")
    log.warning("tile_size: outside")
    assert log_messages == ["optim.tilesizex/y: 16×16 enlarged to optim.tilesizex/y=32",
                            "tile_size: outside"]


# ------------------------------------------------------------------ both spellings, served


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("spelling"), size=64, n_points=10)


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    return single_conv_onnx(tmp_path_factory.mktemp("m") / "conv.onnx", bands=4, kernel=3)


def _core(scene, conv, tmp_path, rfield=None, **options):
    source = Source(scene.img_10m, patch_size=rfield, name="source1")
    return serve([source], conv, tmp_path / "map.tif", quiet=True, **options)


def _cli(scene, conv, tmp_path, capsys, *extra):
    argv = ["TensorflowModelServe", "--quiet", "-source1.il", str(scene.img_10m),
            "-model.dir", str(conv), *extra, "-out", str(tmp_path / "map.tif"), "float"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    prefix = "terrapatch TensorflowModelServe: error: "
    assert err[0].startswith(prefix), err[0]
    return err[0][len(prefix):]


# (Python keywords, OTBTF arguments, neutral message start, OTBTF message start)
PAIRS = {
    "receptive field 0": (dict(rfield=(0, 0)), ["-source1.rfieldx", "0"],
                          "source1.patch_size[0]: 0 must be ≥ 1", "source1.rfieldx: 0 must be ≥ 1"),
    "receptive field y 0": (dict(rfield=(3, 0)), ["-source1.rfieldx", "3", "-source1.rfieldy", "0"],
                            "source1.patch_size[1]: 0 must be ≥ 1",
                            "source1.rfieldy: 0 must be ≥ 1"),
    "receptive field too large": (dict(rfield=99), ["-source1.rfieldx", "99"],
                                  "source1.patch_size: 99×99 is larger than the image",
                                  "source1.rfieldx/y: 99×99 is larger than the image"),
    "spcscale": (dict(spcscale=1.5), ["-output.spcscale", "1.5"],
                 "spcscale: 1.5 is neither an integer k nor 1/k",
                 "output.spcscale: 1.5 is neither an integer k nor 1/k"),
    "tile size": (dict(tile_size=(8, 0)), ["-optim.tilesizex", "8", "-optim.tilesizey", "0"],
                  "tile_size[1]: 0 must be ≥ 1", "optim.tilesizey: 0 must be ≥ 1"),
    "tile batch": (dict(fullyconv=True, tile_batch=0), ["-model.fullyconv", "on",
                                                        "-optim.tilebatch", "0"],
                   "tile_batch: 0 must be an integer ≥ 1", "optim.tilebatch: 0 must be an "
                                                           "integer ≥ 1"),
    "efield in patch-based": (dict(efield=4), ["-output.efieldx", "4"],
                              "efield: 4×4 in patch-based mode",
                              "output.efieldx/y: 4×4 in patch-based mode"),
    "threshold without argmax": (dict(threshold=0.5), ["-output.threshold", "0.5"],
                                 "threshold: 0.5 needs argmax=True",
                                 "output.threshold: 0.5 needs output.argmax=True"),
    "unknown output": (dict(output_names=["nope"]), ["-output.names", "nope"],
                       "output_names: 'nope' is not an output",
                       "output.names: 'nope' is not an output"),
}


@pytest.mark.parametrize("case", list(PAIRS))
def test_one_error_two_spellings(scene, conv, tmp_path, capsys, case):
    keywords, argv, neutral, spelled = PAIRS[case]
    with pytest.raises((InputError, ModelError)) as info:
        _core(scene, conv, tmp_path, **keywords)
    assert str(info.value).startswith(neutral), str(info.value)
    assert "\n" not in str(info.value)
    message = _cli(scene, conv, tmp_path, capsys, *argv)
    assert message.startswith(spelled), message
    assert not list(tmp_path.iterdir())


def test_the_facade_and_the_cli_read_alike(scene, conv, tmp_path):
    with pytest.raises(InputError, match=r"^source1\.rfieldx: 0 must be ≥ 1"):
        TensorflowModelServe(source1_il=scene.img_10m, source1_rfieldx=0, model_dir=conv,
                             out=tmp_path / "map.tif")


def test_a_warning_reads_in_the_spelling_of_its_caller(scene, tmp_path, log_messages):
    same = segmentation_onnx(tmp_path / "same.onnx", bands=4, layers=2, width=4)
    (tmp_path / "b").mkdir()
    serve([Source(scene.img_10m)], same, tmp_path / "a.tif", fullyconv=True, tile_size=1,
          quiet=True)
    TensorflowModelServe(source1_il=scene.img_10m, model_dir=same, model_fullyconv=True,
                         optim_tilesizex=1, out=tmp_path / "b" / "map.tif", quiet=True)
    enlarged = [line for line in log_messages if "enlarged to" in line]
    assert [line.split(":")[0] for line in enlarged] == ["tile_size", "optim.tilesizex/y"]


def test_every_spelling_is_a_parameter_of_the_application():
    keys = set(TensorflowModelServe.all_keys(3))
    options = {"--device", "--resume", "--workers", "--dask-scheduler"}
    for neutral, spelled in SERVE_NAMES.items():
        if neutral == "serving":
            assert spelled == TensorflowModelServe.name
            continue
        for k in (1, 3):
            shown = spelled.replace(SOURCE, f"source{k}")
            if shown.endswith("x/y"):
                assert {shown[:-2], shown[:-3] + "y"} <= keys, (neutral, shown)
            else:
                assert shown in keys | options, (neutral, shown)


def test_a_cluster_failure_names_the_application():
    failed = "serving: task 3 failed on the cluster after 2 retries: RuntimeError: boom"
    assert Spelling(SERVE_NAMES)(failed) == failed.replace("serving", "TensorflowModelServe")
