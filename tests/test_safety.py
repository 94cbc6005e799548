"""Nothing lost, ever: a user's data is never touched, and every failure is one clean line.

One table of trials (:data:`TRIALS`) covers every application: each row is a command
line, the exit code it must give, the parameter its one stderr line must name, and
runs in a fresh copy of a small scene whose files must all be unchanged afterwards,
with nothing left beside them. A new application adds rows, not code. Then: a property
test drawing random output paths among the inputs, each other and fresh names, and real
signals (SIGINT, SIGTERM, kill -9) sent to a real extraction process mid-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.errors
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from terrapatch.cli import main
from terrapatch.errors import TerrapatchError
from terrapatch.extraction import extract_patches
from terrapatch.raster import Source
from terrapatch.testing import coordinate_raster, make_scene, mosaic_vrt, write_raster
from terrapatch.vector import write_points
from terrapatch.writer import PendingOutput

LONG = "x" * 250

# ---------------------------------------------------------------- the scene


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    """A small scene, a model, polygons, a truncated raster, a VRT and odd inputs."""
    d = tmp_path_factory.mktemp("safety") / "scene"
    scene = make_scene(d, size=128, n_points=200)
    pytest.importorskip("onnx")
    from terrapatch.testing.onnx_models import conv_onnx, single_conv_onnx

    conv_onnx(d / "model.onnx")
    single_conv_onnx(d / "single.onnx", bands=4, kernel=3, name="x")
    noise = np.random.default_rng(0).integers(0, 255, (1, 128, 128), dtype=np.uint8)
    with rasterio.open(scene.labels_10m) as ds:
        transform = ds.transform
    full = write_raster(d / "full.tif", noise, transform, tiled=True, blockxsize=16,
                        blockysize=16)
    data = full.read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    full.unlink()
    with rasterio.open(scene.labels_10m) as ds:
        x0, y0 = ds.transform.c, ds.transform.f
    import shapely

    squares = [shapely.box(x0 + 100, y0 - 500, x0 + 500, y0 - 100),
               shapely.box(x0 + 600, y0 - 900, x0 + 900, y0 - 600)]
    import pyogrio

    pyogrio.raw.write(d / "polygons.json", geometry=shapely.to_wkb(squares),
                      field_data=[np.array([1, 2])], fields=["class"], crs="EPSG:32631",
                      driver="GeoJSON", geometry_type="Polygon")
    write_points(d / "big_classes.gpkg", [x0 + 405.0, x0 + 605.0], [y0 - 405.0, y0 - 605.0],
                 {"class": np.array([300, -1])}, crs="EPSG:32631")
    write_points(d / "nan.gpkg", [x0 + 405.0, np.nan], [y0 - 405.0, y0 - 605.0],
                 {"class": np.array([1, 2])}, crs="EPSG:32631")
    with zipfile.ZipFile(d / "dummy.keras", "w") as z:  # a zip: passes the file check
        z.writestr("config.json", "{}")
    (d / "corrupt.keras").write_bytes(b"not a zip at all")
    with warnings.catch_warnings():  # no georeference, on purpose
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(d / "plain.png", "w", driver="PNG", width=32, height=32, count=1,
                           dtype="uint8") as ds:
            ds.write(np.ones((1, 32, 32), np.uint8))
    for aux in d.glob("*.aux.xml"):
        aux.unlink()
    return d


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file and folder below ``folder`` (hidden included)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = os.fspath(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- the table

EXTRACT = ["PatchesExtraction", "-source1.il", "{d}/s2_10m.tif", "-source1.patchsizex", "16",
           "-source1.patchsizey", "16", "-source2.il", "{d}/s2_20m.tif",
           "-source2.patchsizex", "8", "-source2.patchsizey", "8", "-source2.out", "{d}/b.tif",
           "-vec", "{d}/points_train.geojson", "-field", "class"]
SERVE = ["TensorflowModelServe", "-source1.il", "{d}/s2_10m.tif", "-source1.rfieldx", "8",
         "-source1.placeholder", "input_10m", "-source2.il", "{d}/s2_20m.tif",
         "-source2.rfieldx", "4", "-source2.placeholder", "input_20m",
         "-model.dir", "{d}/model.onnx", "-model.fullyconv", "true", "-output.spcscale", "2"]
SELECT = ["PatchesSelection", "-in", "{d}/labels_10m.tif", "-grid.step", "16",
          "-grid.psize", "16"]
LABELS = ["LabelImageSampleSelection", "-inref", "{d}/labels_10m.tif"]
STATS = ["DensePolygonClassStatistics", "-in", "{d}/labels_10m.tif", "-vec",
         "{d}/polygons.json", "-field", "class"]
POLYS = ["PolygonSampleSelection", "-in", "{d}/labels_10m.tif", "-vec", "{d}/polygons.json",
         "-field", "class"]
DEEPTRAIN = ["TrainClassifierFromDeepFeatures", "-source1.il", "{d}/s2_10m.tif",
             "-source1.nodata", "0", "-model.dir", "{d}/single.onnx",
             "-vd", "{d}/points_train.geojson", "-sample.vfn", "class"]
DEEPCLASSIFY = ["ImageClassifierFromDeepFeatures", "-source1.il", "{d}/s2_10m.tif",
                "-deepmodel.dir", "{d}/single.onnx", "-model", "{d}/c.skops"]
CONFUSION = ["ComputeConfusionMatrix", "-in", "{d}/labels_10m.tif", "-ref", "vector",
             "-ref.vector.in", "{d}/polygons.json", "-ref.vector.field", "class"]


def held(name: str) -> Callable[[Path], contextlib.AbstractContextManager[Any]]:
    """Setup: another run (here, this process) holds the lock of output ``name``."""
    return lambda d: PendingOutput(d / name)


def hard_link(d: Path) -> None:
    os.link(d / "s2_10m.tif", d / "link.tif")


def sym_link(d: Path) -> None:
    os.symlink(d / "s2_20m.tif", d / "sym.tif")


def shards_hold_input(d: Path) -> None:
    (d / "a_shards").mkdir()
    shutil.copy(d / "s2_10m.tif", d / "a_shards" / "a-00000.tif")


def model_folder(d: Path) -> None:
    (d / "sm").mkdir()
    shutil.copy(d / "dummy.keras", d / "sm" / "m.keras")


def vrt_input(d: Path) -> None:
    """Setup: ``mosaic.vrt`` reads this folder's ``s2_10m.tif`` (disguised as ``.tif`` too)."""
    mosaic_vrt(d / "s2_10m.tif", 1, d / "mosaic.vrt")
    mosaic_vrt(d / "s2_10m.tif", 1, d / "disguised.tif")


def blocks_hold_input(d: Path) -> None:
    (d / "map.blocks").mkdir()
    shutil.copy(d / "s2_20m.tif", d / "map.blocks" / "in.tif")


def stale(d: Path) -> None:
    """Setup: what a killed run left beside output a.tif (the lock is free)."""
    (d / ".a.tif.pending").mkdir()
    (d / ".a.tif.pending" / "lock").write_text("99999999")
    (d / ".a.tif.pending" / "a.tif").write_bytes(b"half written")
    (d / ".a.tif.pending" / "terrapatch-extract-x").mkdir()
    (d / ".a.tif.1a2b3c4d.part.tif").write_bytes(b"older version's temporary")
    (d / ".a.12345678.pending.tif").write_bytes(b"older version's group file")


@dataclass(frozen=True)
class Trial:
    """One row: a command (``{d}`` is the row's folder), exit code, parameter named.

    ``contains`` must appear in the error line (or, for exit 0, in the one warning
    line); ``setup`` prepares the folder (and may return a context manager held while
    the command runs).
    """

    id: str
    argv: list[str]
    code: int = 2
    parameter: str | None = None
    contains: str = ""
    setup: Callable[[Path], Any] | None = None
    extra: tuple[str, ...] = field(default=())


TRIALS = [
    # 1. no output may be an input of the same run
    Trial("serve-out-is-source1", [*SERVE, "-out", "{d}/s2_10m.tif"], parameter="out",
          contains="is also source1.il"),
    Trial("serve-out-is-source2", [*SERVE, "-out", "{d}/s2_20m.tif"], parameter="out",
          contains="is also source2.il"),
    Trial("serve-out-is-a-vrt-member", [*SERVE[:2], "{d}/mosaic.vrt", *SERVE[3:], "-out",
                                        "{d}/s2_10m.tif"], parameter="out",
          contains="is also source1.il", setup=vrt_input),
    Trial("extract-out-is-a-member-of-a-vrt-named-tif", [*EXTRACT[:2], "{d}/disguised.tif",
                                                          *EXTRACT[3:], "-source1.out",
                                                          "{d}/s2_10m.tif"],
          parameter="source1.out", contains="is also source1.il", setup=vrt_input),
    Trial("serve-out-in-a-stacked-list", [*SERVE[:2], "{d}/s2_20m.tif", "{d}/labels_10m.tif",
                                          *SERVE[3:], "-out", "{d}/labels_10m.tif"],
          parameter="out", contains="is also source1.il"),
    Trial("serve-vrt-blocks-hold-an-input", [*SERVE[:8], "{d}/map.blocks/in.tif",
                                             *SERVE[9:], "-out", "{d}/map.vrt"],
          parameter="out", contains="would be replaced", setup=blocks_hold_input),
    Trial("extract-out-is-its-input", [*EXTRACT, "-source1.out", "{d}/s2_10m.tif"],
          parameter="source1.out", contains="is also source1.il"),
    Trial("extract-out-is-another-input", [*EXTRACT, "-source1.out", "{d}/a.tif",
                                           "-source2.out", "{d}/s2_10m.tif"],
          parameter="source2.out", contains="is also source1.il"),
    Trial("extract-out-spelled-differently", [*EXTRACT, "-source1.out",
                                              "{d}/sub/../s2_10m.tif"],
          parameter="source1.out", contains="is also source1.il",
          setup=lambda d: (d / "sub").mkdir()),
    Trial("extract-out-hard-link-of-input", [*EXTRACT, "-source1.out", "{d}/link.tif"],
          parameter="source1.out", contains="is also source1.il", setup=hard_link),
    Trial("extract-out-symlink-to-input", [*EXTRACT, "-source1.out", "{d}/a.tif",
                                           "-source2.out", "{d}/sym.tif"],
          parameter="source2.out", contains="is also source2.il", setup=sym_link),
    Trial("extract-outpoints-is-vec", [*EXTRACT, "-source1.out", "{d}/a.tif", "-outpoints",
                                       "{d}/points_train.geojson"], parameter="outpoints",
          contains="is also vec"),
    Trial("extract-shards-folder-holds-input", [*EXTRACT[:2], "{d}/a_shards/a-00000.tif",
                                                *EXTRACT[3:], "-source1.out", "{d}/a.tif",
                                                "-shards", "true"],
          parameter="source1.out", contains="would be replaced", setup=shards_hold_input),
    Trial("polygons-out-is-vec", [*POLYS, "-out", "{d}/polygons.json"], parameter="out",
          contains="is also vec"),
    Trial("stats-out-is-vec", [*STATS, "-out", "{d}/polygons.json"], parameter="out",
          contains="is also vec"),
    Trial("export-savedmodel-holds-model", ["export", "{d}/sm/m.keras", "--savedmodel",
                                            "{d}/sm"], parameter="--savedmodel",
          contains="would be replaced", setup=model_folder),
    # 2. no two outputs of one run share a path
    Trial("extract-two-sources-one-file", [*EXTRACT, "-source1.out", "{d}/a.tif",
                                           "-source2.out", "{d}/./a.tif"],
          parameter="source2.out", contains="is also source1.out"),
    Trial("extract-labels-on-a-source-out", [*EXTRACT, "-source1.out", "{d}/a.tif",
                                             "-outlabels", "{d}/a.tif"],
          parameter="outlabels", contains="is also source1.out"),
    Trial("select-train-is-valid", [*SELECT, "-outtrain", "{d}/t.gpkg", "-outvalid",
                                    "{d}/t.gpkg"], parameter="outvalid",
          contains="is also outtrain"),
    Trial("polygons-classmap-is-out", [*POLYS, "-out", "{d}/p.json", "-outclassmap",
                                       "{d}/p.json"], parameter="outclassmap",
          contains="is also out"),
    Trial("export-onnx-inside-savedmodel", ["export", "{d}/dummy.keras", "--savedmodel",
                                            "{d}/sm2", "--onnx", "{d}/sm2/m.onnx"],
          parameter="--onnx", contains="is inside --savedmodel=",
          setup=lambda d: (d / "sm2").mkdir()),
    # 3. extensions match the driver; creation options are checked
    Trial("serve-png", [*SERVE, "-out", "{d}/map.png"], parameter="out", contains=".png"),
    Trial("extract-png", [*EXTRACT, "-source1.out", "{d}/a.png"], parameter="source1.out",
          contains="GDAL reads as PNG"),
    Trial("extract-labels-jpg", [*EXTRACT, "-source1.out", "{d}/a.tif", "-outlabels",
                                 "{d}/l.jpg"], parameter="outlabels", contains="JPEG"),
    Trial("select-txt", [*SELECT, "-outtrain", "{d}/t.txt"], parameter="outtrain",
          contains="vector format"),
    Trial("stats-gpkg", [*STATS, "-out", "{d}/s.gpkg"], parameter="out",
          contains=".json or .xml"),
    Trial("export-onnx-extension", ["export", "{d}/dummy.keras", "--onnx", "{d}/m.pb"],
          parameter="--onnx", contains=".onnx"),
    Trial("extract-compress-nope", [*EXTRACT, "-source1.out",
                                    "{d}/a.tif?&gdal:co:COMPRESS=NOPE"],
          parameter="source1.out", contains="'NOPE' is not one of"),
    Trial("extract-unknown-option", [*EXTRACT, "-source1.out", "{d}/a.tif", "-outlabels",
                                     "{d}/l.tif?&gdal:co:FOO=1"], parameter="outlabels",
          contains="FOO=1 is not a creation option"),
    Trial("serve-compress-nope", [*SERVE, "-out", "{d}/m.tif?&gdal:co:COMPRESS=NOPE"],
          parameter="out", contains="'NOPE' is not one of"),
    Trial("serve-cog-blocksize-text", [*SERVE, "-out",
                                       "{d}/m.tif?&gdal:of:COG&gdal:co:BLOCKSIZE=abc"],
          parameter="out", contains="not an integer"),
    # 4. concurrent runs: a lock beside the output names the holder
    Trial("extract-locked", [*EXTRACT, "-source1.out", "{d}/a.tif"],
          parameter="source1.out", contains="another terrapatch run (pid",
          setup=held("a.tif")),
    Trial("select-locked", [*SELECT, "-outtrain", "{d}/t.gpkg"], parameter="outtrain",
          contains="lock", setup=held("t.gpkg")),
    Trial("labels-locked", [*LABELS, "-outvec", "{d}/v.gpkg"], parameter="outvec",
          contains="another terrapatch run", setup=held("v.gpkg")),
    Trial("stats-locked", [*STATS, "-out", "{d}/s.json"], parameter="out",
          contains="another terrapatch run", setup=held("s.json")),
    Trial("polygons-locked", [*POLYS, "-out", "{d}/p.gpkg"], parameter="out",
          contains="another terrapatch run", setup=held("p.gpkg")),
    Trial("serve-locked", [*SERVE, "-out", "{d}/m.tif"], parameter="out",
          contains="another terrapatch run", setup=held("m.tif")),
    # 5. values that do not fit the labels' pixel type
    Trial("extract-class-300-in-uint8", [*EXTRACT[:-4], "-vec", "{d}/big_classes.gpkg",
                                         "-field", "class", "-source1.out", "{d}/a.tif",
                                         "-outlabels", "{d}/l.tif"],
          parameter="outlabels", contains="class values -1, 300"),
    Trial("extract-class-300-clamped", [*EXTRACT[:-4], "-vec", "{d}/big_classes.gpkg",
                                        "-field", "class", "-source1.out", "{d}/a.tif",
                                        "-outlabels", "{d}/l.tif", "-outlabels.clamp", "true"],
          code=0, contains="2 sample(s) with class values -1, 300 clamped"),
    # 6. unwritable places, names too long: one line, not a traceback
    Trial("serve-proc", [*SERVE, "-out", "/proc/terrapatch.tif"], parameter="out",
          contains="cannot write"),
    Trial("extract-proc", [*EXTRACT, "-source1.out", "/proc/a.tif"], parameter="source1.out",
          contains="cannot write"),
    Trial("extract-sys", [*EXTRACT, "-source1.out", "{d}/a.tif", "-outlabels", "/sys/l.tif"],
          parameter="outlabels", contains="cannot write"),
    Trial("select-proc", [*SELECT, "-outtrain", "/proc/t.gpkg"], parameter="outtrain",
          contains="cannot write"),
    Trial("labels-proc", [*LABELS, "-outvec", "/proc/v.gpkg"], parameter="outvec",
          contains="cannot write"),
    Trial("stats-proc", [*STATS, "-out", "/proc/s.json"], parameter="out",
          contains="cannot write"),
    Trial("polygons-proc", [*POLYS, "-out", "/proc/p.gpkg"], parameter="out",
          contains="cannot write"),
    Trial("export-onnx-proc", ["export", "{d}/dummy.keras", "--onnx", "/proc/m.onnx"],
          parameter="--onnx", contains="cannot write"),
    Trial("demo-proc", ["demo", "/proc/terrapatch_demo"], parameter="outdir",
          contains="cannot write"),
    Trial("extract-name-too-long", [*EXTRACT, "-source1.out", f"{{d}}/{LONG}.tif"],
          parameter="source1.out", contains="too long"),
    Trial("serve-name-too-long", [*SERVE, "-out", f"{{d}}/{LONG}.tif"], parameter="out",
          contains="too long"),
    Trial("select-name-too-long", [*SELECT, "-outtrain", f"{{d}}/{LONG}.gpkg"],
          parameter="outtrain", contains="too long"),
    Trial("extract-path-component-too-long", [*EXTRACT, "-source1.out",
                                              f"{{d}}/{LONG * 2}/a.tif"],
          parameter="source1.out", contains="cannot write"),
    # 7. damaged inputs and bad arguments: one line naming them
    Trial("select-truncated-raster", [*SELECT[:2], "{d}/truncated.tif", *SELECT[3:],
                                      "-nodata", "0", "-outtrain", "{d}/t.gpkg"],
          parameter="in", contains="cannot read"),
    Trial("labels-truncated-raster", [*LABELS[:2], "{d}/truncated.tif", "-outvec",
                                      "{d}/v.gpkg"], parameter="inref",
          contains="cannot read"),
    Trial("serve-corrupt-keras", [*SERVE[:14], "{d}/corrupt.keras", *SERVE[15:], "-out",
                                  "{d}/m.tif"], parameter="model.dir",
          contains="not a zip archive"),
    Trial("export-corrupt-keras", ["export", "{d}/corrupt.keras", "--onnx", "{d}/m.onnx"],
          parameter="model", contains="not a zip archive"),
    Trial("select-png-without-georeference", [*SELECT[:2], "{d}/plain.png", *SELECT[3:],
                                              "-outtrain", "{d}/t.gpkg"],
          parameter="in", contains="no georeference"),
    Trial("demo-size-text", ["demo", "{d}/demo", "--size", "abc"], parameter="argument --size",
          contains="invalid int value"),
    Trial("demo-size-odd", ["demo", "{d}/demo", "--size", "7"], parameter="--size",
          contains="even number"),
    Trial("demo-folder-is-a-file", ["demo", "{d}/s2_10m.tif"], parameter="outdir",
          contains="is not a folder"),
    # ComputeConfusionMatrix
    Trial("confusion-out-is-in", [*CONFUSION, "-out", "{d}/labels_10m.tif"], parameter="out",
          contains="is also in"),
    Trial("confusion-out-is-ref", [*CONFUSION, "-out", "{d}/polygons.json"], parameter="out",
          contains="is also ref.vector.in"),
    Trial("confusion-txt", [*CONFUSION, "-out", "{d}/m.txt"], parameter="out",
          contains="a confusion matrix is written as .csv"),
    Trial("confusion-missing-field", [*CONFUSION[:-1], "klass", "-out", "{d}/m.csv"],
          parameter="ref.vector.field", contains="'klass' is not a field"),
    Trial("confusion-locked", [*CONFUSION, "-out", "{d}/m.csv"], parameter="out",
          contains="another terrapatch run", setup=held("m.csv")),
    Trial("confusion-proc", [*CONFUSION, "-out", "/proc/m.csv"], parameter="out",
          contains="cannot write"),
    Trial("confusion-truncated-map", [*CONFUSION[:2], "{d}/truncated.tif", *CONFUSION[3:],
                                      "-out", "{d}/m.csv"], parameter="in",
          contains="cannot read"),
    Trial("confusion-writes-csv", [*CONFUSION, "-out", "{d}/m.csv"], code=0,
          contains="absent from the reference"),
    # TrainClassifierFromDeepFeatures, ImageClassifierFromDeepFeatures
    Trial("deeptrain-skops-only", [*DEEPTRAIN, "-out", "{d}/c.txt"], parameter="out",
          contains="a classifier is written as .skops"),
    Trial("deeptrain-locked", [*DEEPTRAIN, "-out", "{d}/c.skops"], parameter="out",
          contains="another terrapatch run", setup=held("c.skops")),
    Trial("deeptrain-polygons", [*DEEPTRAIN[:8], "{d}/polygons.json", *DEEPTRAIN[9:],
                                 "-out", "{d}/c.skops"], parameter="vd", contains="point"),
    Trial("deeptrain-writes-classifier", [*DEEPTRAIN, "-out", "{d}/c.skops"], code=0),
    Trial("deepclassify-out-is-source1", [*DEEPCLASSIFY, "-out", "{d}/s2_10m.tif"],
          parameter="out", contains="is also source1.il"),
    Trial("deepclassify-model-not-skops", [*DEEPCLASSIFY[:6], "-model", "{d}/dummy.keras",
                                           "-out", "{d}/m.tif"], parameter="model",
          contains="not a skops file"),
    Trial("deepclassify-model-missing", [*DEEPCLASSIFY, "-out", "{d}/m.tif"],
          parameter="model", contains="does not exist"),
    Trial("deepclassify-proc", [*DEEPCLASSIFY, "-out", "/proc/m.tif"], parameter="out",
          contains="cannot write"),
    # 8. what succeeds: dead runs' leftovers are removed, NaN points skipped in one line
    Trial("extract-removes-stale-leftovers", [*EXTRACT, "-source1.out", "{d}/a.tif"], code=0,
          setup=stale),
    Trial("extract-nan-coordinates", [*EXTRACT[:-4], "-vec", "{d}/nan.gpkg", "-field",
                                      "class", "-source1.out", "{d}/a.tif"], code=0,
          contains="1 feature(s) of"),
]


@pytest.mark.parametrize("trial", TRIALS, ids=[t.id for t in TRIALS])
def test_trial(trial: Trial, scene_dir: Path, tmp_path: Path, capsys) -> None:
    d = tmp_path / "work"
    shutil.copytree(scene_dir, d)
    before = snapshot(d)
    hold = trial.setup(d) if trial.setup else None
    before_run = snapshot(d)
    with hold if isinstance(hold, contextlib.AbstractContextManager) else \
            contextlib.nullcontext():
        code = main([a.format(d=d) for a in trial.argv] + ["--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    after = snapshot(d)
    app = trial.argv[0]
    assert code == trial.code, lines
    if trial.code != 0:
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"terrapatch {app}: error: {trial.parameter}"), lines[0]
        assert trial.contains in lines[0], lines[0]
        assert after == (before if hold is not None else before_run)  # untouched, nothing left
    else:
        assert len(lines) == (1 if trial.contains else 0), lines
        assert trial.contains in (lines[0] if lines else "")
        for name, digest in before.items():  # every input unchanged
            assert after.get(name) == digest, name
        assert hidden(d) == []   # no pending folder, no older temporaries


def test_every_application_has_rows() -> None:
    from terrapatch.apps import REGISTRY
    from terrapatch.cli import COMMANDS

    covered = {t.argv[0] for t in TRIALS}
    assert set(REGISTRY) | set(COMMANDS) <= covered


# ---------------------------------------------------------------- property


CHOICES = ("s2_10m.tif", "s2_20m.tif", "./s2_20m.tif", "points_train.geojson", "link.tif",
           "a.tif", "b.tif", "a.tif", "l.tif", "p.gpkg", "p.shp", "sub/../b.tif")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.one_of(st.none(), st.sampled_from(CHOICES)), min_size=4,
                      max_size=4))
def test_random_output_paths_never_destroy_an_input(names, scene_dir) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in ("s2_10m.tif", "s2_20m.tif", "points_train.geojson"):
            shutil.copy(scene_dir / name, d / name)
        os.link(d / "s2_10m.tif", d / "link.tif")
        (d / "sub").mkdir()
        inputs = snapshot(d)
        out1, out2, labels, points = (None if n is None else d / n for n in names)
        sources = [Source(d / "s2_10m.tif", 16, name="source1"),
                   Source(d / "s2_20m.tif", 8, name="source2")]
        try:
            extract_patches(sources, d / "points_train.geojson", "class", [out1, out2],
                            labels_out=labels, points_out=points, quiet=True)
        except TerrapatchError:
            pass
        after = snapshot(d)
        for name, digest in inputs.items():
            assert after.get(name) == digest, (name, names)
        assert hidden(d) == []


# ---------------------------------------------------------------- real signals

SLOW_EXTRACTION = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from terrapatch import raster
    from terrapatch.cli import main
    from terrapatch.extraction import reading, spool

    reading.UNIT_MIN, reading.CHUNK, reading.READ_THREADS = 16, 32, 1
    spool.MEMMAP_BYTES = 1          # spool the patches (in the output's pending folder)
    marker, delay = Path(sys.argv[1]), float(sys.argv[2])
    real, reads = raster.SourceReader.read, [0]

    def read(self, window):
        reads[0] += 1
        if reads[0] == 40:
            marker.write_text("reading")
        time.sleep(delay)
        return real(self, window)

    raster.SourceReader.read = read
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> dict[str, Path]:
    """A 10 m / 20 m pair in 16-pixel tiles and 2000 points: reads take a few seconds."""
    d = tmp_path_factory.mktemp("signals")
    L, T = 500000.0, 4000000.0
    tiles = {"tiled": True, "blockxsize": 16, "blockysize": 16}
    fine = coordinate_raster(d / "fine.tif", 256, 256, Affine(10, 0, L, 0, -10, T),
                             dtype="uint16", **tiles)
    coarse = coordinate_raster(d / "coarse.tif", 128, 128, Affine(20, 0, L, 0, -20, T),
                               dtype="uint16", **tiles)
    rng = np.random.default_rng(0)
    vec = write_points(d / "points.gpkg", L + rng.uniform(100, 2460, 2000),
                       T - rng.uniform(100, 2460, 2000), {"class": rng.integers(0, 5, 2000)},
                       crs="EPSG:32631")
    script = d / "slow_extraction.py"
    script.write_text(SLOW_EXTRACTION)
    return {"fine": fine, "coarse": coarse, "vec": vec, "script": script}


def extraction_args(data: dict[str, Path], out: Path) -> list[str]:
    return ["PatchesExtraction", "-source1.il", str(data["fine"]), "-source1.patchsizex", "8",
            "-source1.patchsizey", "8", "-source1.out", str(out / "a.tif"),
            "-source2.il", str(data["coarse"]), "-source2.patchsizex", "4",
            "-source2.patchsizey", "4", "-source2.out", str(out / "b.tif"),
            "-vec", str(data["vec"]), "-field", "class", "-outlabels", str(out / "l.tif"),
            "--quiet"]


@contextlib.contextmanager
def slow_run(data: dict[str, Path], out: Path, delay: float = 0.01) -> Iterator[Any]:
    """A real extraction process, yielded once it is reading (its outputs locked)."""
    marker = out / "marker"
    proc = subprocess.Popen([sys.executable, str(data["script"]), str(marker), str(delay),
                             *extraction_args(data, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "the extraction did not start reading"
            time.sleep(0.02)
        marker.unlink()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("how", ["sigint", "sigterm", "kill9"])
def test_real_signals_mid_extraction_leave_nothing(big_pair, tmp_path, capsys, how):
    out = tmp_path / "out"
    out.mkdir()
    with slow_run(big_pair, out) as proc:
        assert hidden(out) == [".a.tif.pending", ".b.tif.pending", ".l.tif.pending"]
        if how == "sigterm":  # meanwhile, a second run on the same outputs is refused at once
            assert main(extraction_args(big_pair, out)) == 2
            err = capsys.readouterr().err.strip()
            assert f"another terrapatch run (pid {proc.pid})" in err and "lock" in err
        sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "kill9": signal.SIGKILL}[how]
        proc.send_signal(sig)
        _, err_bytes = proc.communicate(timeout=60)
    err = err_bytes.decode()
    assert proc.returncode == {"sigint": 130, "sigterm": 143, "kill9": -9}[how], err
    if how == "kill9":
        # the dead run's pending folders (and its spool) stay until the next run ...
        assert ".a.tif.pending" in hidden(out)
        assert main(extraction_args(big_pair, out)) == 0
        assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif", "l.tif"]
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        word = "interrupted" if how == "sigint" else "terminated (SIGTERM)"
        assert lines == [f"terrapatch PatchesExtraction: {word}"], lines
        assert list(out.iterdir()) == []


def test_full_disk_during_extraction_names_the_output(big_pair, tmp_path):
    """A file-size limit makes every write past 64 kB fail as on a full disk."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "limited.py"
    script.write_text(textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        from terrapatch.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    proc = subprocess.run([sys.executable, str(script), *extraction_args(big_pair, out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    ours = [x for x in proc.stderr.splitlines() if x.startswith("terrapatch")]
    assert "Traceback" not in proc.stderr and len(ours) == 1, proc.stderr
    assert ours[0].startswith(f"terrapatch PatchesExtraction: error: source1.out: cannot write "
                              f"'{out / 'a.tif'}' (")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- maps: clamping is counted


def test_serve_summary_counts_clamped_pixels(scene_dir, tmp_path, caplog):
    from terrapatch.serve import serve

    sources = [Source(scene_dir / "s2_10m.tif", 3, name="source1")]  # raw convolution
    wide = serve(sources, scene_dir / "single.onnx", tmp_path / "f.tif", fullyconv=True,
                 quiet=True)
    with rasterio.open(wide.path) as ds:
        values = ds.read()
    narrow = serve(sources, scene_dir / "single.onnx", tmp_path / "u.tif", fullyconv=True,
                   pixel_type="uint8", quiet=True)
    assert wide.clamped == 0
    # uint8 truncates: -0.5 and 255.9 fit; -1 and 256 do not
    assert narrow.clamped == int(((values <= -1) | (values >= 256)).sum()) > 0
    assert f"out: {narrow.clamped} pixel value(s) outside the range of uint8" in caplog.text


def test_fractional_offset_between_sources_is_one_warning(scene_dir, tmp_path, caplog):
    with rasterio.open(scene_dir / "s2_20m.tif") as ds:
        data, t = ds.read(), ds.transform
    shifted = write_raster(tmp_path / "shifted.tif", data,
                           Affine(t.a, 0, t.c + 5, 0, t.e, t.f), crs="EPSG:32631")
    extract_patches([Source(scene_dir / "s2_10m.tif", 16, name="source1"),
                     Source(shifted, 8, name="source2")], scene_dir / "points_train.geojson",
                    "class", [tmp_path / "a.tif", None], quiet=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("source2: its grid is offset from source1's by 0.5 px "
                                  "(5 m) in x")
    assert "nearest pixel" in warnings[0]
