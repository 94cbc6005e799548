"""Light workers: extraction and ONNX serving never import TensorFlow or Keras.

Each check runs in a fresh interpreter of the installed package (``sys.executable``),
so what the parent test process imported does not count. Missing extras are
simulated with a ``sys.meta_path`` finder that makes ``import tensorflow`` (and
keras, tf2onnx, onnx, matplotlib) fail as if they were not installed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from terrapatch._optional import _filter, missing_extra_message
from terrapatch.errors import (
    InputError,
    MissingEngineError,
    MissingExtraError,
    ModelError,
    TerrapatchError,
)
from terrapatch.testing import write_raster
from terrapatch.vector import write_points

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
TF_MODULES = ("tensorflow", "keras")
#: A native TensorFlow log line (Abseil or the older format), or Abseil's banner.
TF_LOG = re.compile(r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )"
                    r"|absl::InitializeLog", re.M)

BLOCKER = """
import sys

class _NotInstalled:
    '''Make some top-level packages look uninstalled.'''

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled({blocked!r}))
"""

CHILD = """
import json, sys
from terrapatch.extraction import extract_patches
from terrapatch.raster import Source
from terrapatch.serve import serve

work = sys.argv[1]
summary = extract_patches(
    [Source(f"{{work}}/s10.tif", 16, nodata=0), Source(f"{{work}}/s20.tif", 8, nodata=0)],
    f"{{work}}/points.gpkg", "class", [f"{{work}}/p10.tif", f"{{work}}/p20.tif"],
    f"{{work}}/labels.tif", quiet=True)
served = serve([Source(f"{{work}}/s20.tif", 8, placeholder="input_20m"),
                Source(f"{{work}}/s10.tif", 16, placeholder="input_10m")],
               f"{{work}}/seed.onnx", f"{{work}}/map.tif", output_names=["estimated_labels"],
               fullyconv=True, pixel_type="uint8", quiet=True)
print(json.dumps({{"patches": summary.n_collected,
                   "map": [served.width, served.height],
                   "loaded": sorted(m for m in {tf_modules!r} if m in sys.modules)}}))
"""

CLI_CHILD = """
import sys
from terrapatch.cli import main
code = main(sys.argv[1:])
print("LOADED", sorted(m for m in {tf_modules!r} if m in sys.modules))
sys.exit(code)
"""


def blocker(*names: str) -> str:
    return BLOCKER.format(blocked=sorted(names)) if names else ""


def run_child(code: str, *args: object, blocked: tuple[str, ...] = ()
              ) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, with ``blocked`` packages made uninstalled."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # terrapatch's own default must suffice
    source = blocker(*blocked) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", source, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def serve_argv(work: Path, model: Path, out: str = "cli_map.tif") -> list[str]:
    return ["TensorflowModelServe", "--quiet",
            "-source1.il", str(work / "s20.tif"), "-source1.rfieldx", "8",
            "-source1.placeholder", "input_20m",
            "-source2.il", str(work / "s10.tif"), "-source2.rfieldx", "16",
            "-source2.placeholder", "input_10m",
            "-model.dir", str(model), "-model.fullyconv", "on",
            "-output.names", "estimated_labels", "-out", str(work / out), "uint8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two sources (10 m, 4 bands; 20 m, 6 bands), points, and the seed model (.keras, .onnx)."""
    pytest.importorskip("tf2onnx")
    from terrapatch.export import export_model
    from terrapatch.testing.models import seed_model

    work = tmp_path_factory.mktemp("light")
    rng = np.random.default_rng(0)
    write_raster(work / "s10.tif", rng.integers(1, 10000, (4, 96, 96)).astype("uint16"),
                 Affine(10, 0, L, 0, -10, T), crs=CRS)
    write_raster(work / "s20.tif", rng.integers(1, 10000, (6, 48, 48)).astype("uint16"),
                 Affine(20, 0, L, 0, -20, T), crs=CRS)
    xs = L + np.array([205.0, 405.0, 605.0])
    ys = T - np.array([205.0, 405.0, 605.0])
    write_points(work / "points.gpkg", xs, ys, {"class": np.array([0, 1, 2])}, crs=CRS)
    seed_model().save(work / "seed.keras")
    export_model(work / "seed.keras", onnx=work / "seed.onnx")
    return work


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------- the core, in a fresh process


def test_import_terrapatch_loads_no_tensorflow():
    done = run_child(f"""
        import sys, terrapatch, terrapatch.extraction, terrapatch.serve, terrapatch.cli
        import terrapatch.engines, terrapatch.report, terrapatch.export
        import terrapatch.apps, terrapatch.cluster, terrapatch.cli.demo_workflow
        from terrapatch.engines import load_engine
        from terrapatch.errors import ModelError
        try:
            load_engine(object())
        except ModelError:
            pass
        print(sorted(m for m in {(*TF_MODULES, "matplotlib")!r} if m in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_extract_and_serve_onnx_without_tensorflow(work):
    done = run_child(CHILD.format(tf_modules=TF_MODULES), work)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["patches"] == 3
    assert result["map"][0] > 0 and result["map"][1] > 0
    assert (work / "p10.tif").is_file() and (work / "map.tif").is_file()
    assert not TF_LOG.search(done.stderr), done.stderr


def test_cli_serve_onnx_without_tensorflow(work):
    done = run_child(CLI_CHILD.format(tf_modules=TF_MODULES),
                     *serve_argv(work, work / "seed.onnx"))
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout
    assert (work / "cli_map.tif").is_file()


@pytest.mark.slow
def test_dask_workers_serving_onnx_load_no_tensorflow(work):
    done = run_child(f"""
        import sys
        from distributed import Client, LocalCluster
        from terrapatch.extraction import extract_patches
        from terrapatch.raster import Source
        from terrapatch.serve import serve

        def loaded():
            return sorted(m for m in {TF_MODULES!r} if m in sys.modules)

        work = {str(work)!r}
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            extract_patches([Source(f"{{work}}/s10.tif", 16), Source(f"{{work}}/s20.tif", 8)],
                            f"{{work}}/points.gpkg", "class",
                            [f"{{work}}/dask_p10.tif", f"{{work}}/dask_p20.tif"],
                            quiet=True, scheduler=client)
            serve([Source(f"{{work}}/s20.tif", 8, placeholder="input_20m"),
                   Source(f"{{work}}/s10.tif", 16, placeholder="input_10m")],
                  f"{{work}}/seed.onnx", f"{{work}}/dask_map.tif",
                  output_names=["estimated_labels"], fullyconv=True, tile_size=32,
                  pixel_type="uint8", quiet=True, scheduler=client)
            print("WORKERS", sorted(set(map(str, client.run(loaded).values()))))
        print("CLIENT", loaded())
    """)
    assert done.returncode == 0, done.stderr
    assert "WORKERS ['[]']" in done.stdout and "CLIENT []" in done.stdout
    assert (work / "dask_map.tif").is_file() and (work / "dask_p10.tif").is_file()


# ---------------------------------------------------------------- without the tensorflow extra


def test_training_api_without_the_extra_names_it():
    done = run_child("""
        import terrapatch
        from terrapatch.errors import MissingExtraError
        try:
            terrapatch.ModelBase
        except MissingExtraError as exc:
            print(exc)
    """, blocked=("tensorflow", "keras"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("terrapatch.ModelBase needs")
    assert "pip install 'terrapatch[tensorflow]'" in done.stdout


def test_onnx_serving_works_when_tensorflow_is_missing(work):
    done = run_child(CHILD.format(tf_modules=TF_MODULES), work,
                     blocked=("tensorflow", "keras", "tf2onnx", "onnx"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["loaded"] == []


@pytest.mark.parametrize("model", ["seed.keras", "savedmodel"])
def test_tensorflow_model_without_the_extra_is_one_line_exit_2(work, model):
    path = work / model
    if model == "savedmodel":  # a SavedModel directory: TensorFlow is needed before reading it
        path.mkdir(exist_ok=True)
        (path / "saved_model.pb").write_bytes(b"")
    done = run_child(CLI_CHILD.format(tf_modules=TF_MODULES),
                     *serve_argv(work, path, out=f"never_{model}.tif"),
                     blocked=("tensorflow", "keras"))
    assert done.returncode == 2, done.stderr
    line = one_line_error(done.stderr)
    assert "model.dir" in line and str(path) in line
    assert "pip install 'terrapatch[tensorflow]'" in line
    assert not (work / f"never_{model}.tif").exists()


def test_export_without_the_extra_is_one_line_exit_2(work):
    done = run_child(CLI_CHILD.format(tf_modules=TF_MODULES),
                     "export", work / "seed.keras", "--onnx", work / "never.onnx",
                     blocked=("tensorflow", "keras", "tf2onnx", "onnx"))
    assert done.returncode == 2, done.stderr
    line = one_line_error(done.stderr)
    assert "export" in line and "pip install 'terrapatch[tensorflow]'" in line
    assert not (work / "never.onnx").exists()


def test_export_without_tf2onnx_names_the_extra(work):
    done = run_child(CLI_CHILD.format(tf_modules=()),
                     "export", work / "seed.keras", "--onnx", work / "never.onnx",
                     blocked=("tf2onnx",))
    assert done.returncode == 2, done.stderr
    line = one_line_error(done.stderr)
    assert "onnx:" in line and "tf2onnx" in line and "terrapatch[tensorflow]" in line


@pytest.mark.parametrize(("blocked", "extra"), [
    (("matplotlib",), "report"),
    (("tensorflow", "keras"), "tensorflow"),
    (("tensorflow", "matplotlib"), "all"),
])
def test_demo_without_an_extra_stops_before_any_work(tmp_path, blocked, extra):
    done = run_child(CLI_CHILD.format(tf_modules=()), "demo", tmp_path / "demo", "--quiet",
                     blocked=blocked)
    assert done.returncode == 2, done.stderr
    line = one_line_error(done.stderr)
    assert f"pip install 'terrapatch[{extra}]'" in line
    assert not (tmp_path / "demo").exists()


def test_quicklook_without_matplotlib_names_the_report_extra(work):
    done = run_child(f"""
        from terrapatch.errors import MissingExtraError
        from terrapatch.report import class_scores, quicklook
        import numpy as np
        assert class_scores(np.array([0, 1]), np.array([0, 1]), ["a", "b"]).overall_accuracy == 1
        try:
            quicklook({str(work / "s10.tif")!r}, {str(work / "never.png")!r}, ["a", "b"])
        except MissingExtraError as exc:
            print(exc)
    """, blocked=("matplotlib",))
    assert done.returncode == 0, done.stderr
    assert "pip install 'terrapatch[report]'" in done.stdout
    assert not (work / "never.png").exists()


# ---------------------------------------------------------------- TensorFlow starts quietly


@pytest.mark.slow
def test_keras_serving_prints_no_tensorflow_start_up_lines(work):
    done = run_child(CLI_CHILD.format(tf_modules=TF_MODULES),
                     *serve_argv(work, work / "seed.keras", out="keras_map.tif"))
    assert done.returncode == 0, done.stderr
    assert "LOADED ['keras', 'tensorflow']" in done.stdout
    assert not TF_LOG.search(done.stderr), done.stderr


def test_filter_drops_native_log_lines_below_the_level():
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796166960.862298    4401 port.cc:153] oneDNN custom operations are on.\n"
        "W0000 00:00:1796166960.862298    4401 x.cc:1] a warning\n"
        "E0000 00:00:1796166963.904846    4401 cuda_platform.cc:52] failed call to cuInit\n"
        "2024-05-01 10:00:00.123456: I tensorflow/core/platform/cpu_feature_guard.cc:182] "
        "This TensorFlow binary is optimized\n"
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild.\n"
        "F0000 00:00:1796166963.904846    4401 x.cc:9] fatal\n"
        "a Python warning\n"
    )
    fatal = "F0000 00:00:1796166963.904846    4401 x.cc:9] fatal\n"
    assert _filter(text, 2) == fatal + "a Python warning\n"
    kept = _filter(text, 1)
    assert "a warning" in kept and "cuInit" in kept and "oneDNN" not in kept
    assert "To enable" not in kept  # continuation of a dropped line
    assert _filter(text, 0) == text


# ---------------------------------------------------------------- the error classes


def test_missing_extra_errors_are_terrapatch_and_import_errors():
    message, extra = missing_extra_message(("tensorflow", "keras"), "model.dir: x", "gone")
    assert extra == "tensorflow" and "\n" not in message
    assert message.endswith("install them with pip install 'terrapatch[tensorflow]'")
    error = MissingEngineError(message, extra=extra, package="keras")
    for cls in (MissingExtraError, ModelError, InputError, TerrapatchError, ImportError):
        assert isinstance(error, cls)
    again = pickle.loads(pickle.dumps(error))  # errors travel back from Dask workers
    assert type(again) is MissingEngineError and str(again) == message
    assert again.extra == "tensorflow" and again.name == "keras"
    assert missing_extra_message(("keras", "matplotlib"), "demo", "gone")[1] == "all"
