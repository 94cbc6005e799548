"""ModelServe on a Dask LocalCluster: identical maps (I4), worker death, failures, clear errors."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil

import distributed
import numpy as np
import pytest
import rasterio
from affine import Affine

import terrapatch.serve as serving
from terrapatch import cluster
from terrapatch.cli import main
from terrapatch.errors import InputError, TerrapatchError
from terrapatch.raster import Source
from terrapatch.serve import (
    caches,
    prepare_serve,
    serve,
)
from terrapatch.testing import assert_same_map, faults, read_raster
from terrapatch.testing.models import seed_model
from terrapatch.testing.rasters import write_raster

L, T = 500000.0, 4000000.0
OUTS = ["estimated", "estimated_labels"]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Seed-like 10 m (4 bands) / 20 m (6 bands) pair; the 20 m top-left corner is nodata."""
    d = tmp_path_factory.mktemp("dask_serve")
    rng = np.random.default_rng(7)
    s20 = rng.integers(1, 10000, (6, 48, 48), dtype=np.uint16)
    s20[:, :24, :24] = 0
    files = {
        "s10": write_raster(d / "s10.tif", rng.integers(0, 10000, (4, 96, 96), np.uint16),
                            Affine(10.0, 0.0, L, 0.0, -10.0, T)),
        "s20": write_raster(d / "s20.tif", s20, Affine(20.0, 0.0, L, 0.0, -20.0, T)),
        "keras": d / "seed.keras",
        "savedmodel": d / "seed_savedmodel",
    }
    model = seed_model(seed=3)
    model.save(files["keras"])
    model.export(files["savedmodel"], format="tf_saved_model", verbose=False)
    return files


def sources(files, s10=None, s20=None):
    return [Source(s20 or files["s20"], 8, nodata=0, placeholder="input_20m", name="source1"),
            Source(s10 or files["s10"], 16, placeholder="input_10m", name="source2")]


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """In-process maps (read once) and summaries, the reference for every cluster run."""
    d = tmp_path_factory.mktemp("ref")
    refs = {}
    for mode, fullyconv, tile in (("fcn", True, 16), ("pb", False, 8)):
        s = serve(sources(data), data["keras"], d / f"{mode}.tif", OUTS, fullyconv=fullyconv,
                  tile_size=tile, quiet=True)
        refs[mode] = (read_raster(s.path), s)
    return refs


def no_leftovers(directory, *keep):
    return sorted(p.name for p in directory.iterdir()) == sorted(keep)


# ---------------------------------------------------------------- invariant I4 on a cluster


@pytest.mark.parametrize("block_tiles", [1, 2, 4, None])
def test_fcn_map_is_identical_to_in_process(client, data, references, tmp_path, block_tiles):
    s = serve(sources(data), data["keras"], tmp_path / "m.tif", OUTS, fullyconv=True,
              tile_size=16, quiet=True, scheduler=client, block_tiles=block_tiles)
    assert_same_map(s.path, references["fcn"][0])
    ref = references["fcn"][1]
    assert s.tiles == ref.tiles == 9 and s.skipped_tiles == ref.skipped_tiles == 1
    assert s.compute_seconds > 0 and s.read_seconds > 0
    assert no_leftovers(tmp_path, "m.tif")


@pytest.mark.parametrize("block_tiles", [1, 5, None])
def test_patch_based_map_is_identical_to_in_process(client, data, references, tmp_path,
                                                    block_tiles):
    s = serve(sources(data), data["keras"], tmp_path / "m.tif", OUTS, tile_size=8,
              quiet=True, scheduler=client, block_tiles=block_tiles)
    assert_same_map(s.path, references["pb"][0])
    assert s.tiles == references["pb"][1].tiles == 36


def test_savedmodel_box_pixel_type_and_model_cached_per_worker(client, data, tmp_path):
    kw = dict(fullyconv=True, tile_size=16, box=(3, 5, 30, 27), pixel_type="uint8",
              rounding=True, background=255)
    ref = serve(sources(data), data["savedmodel"], tmp_path / "ref.tif", "estimated_labels",
                quiet=True, **kw)
    s = serve(sources(data), data["savedmodel"], tmp_path / "m.tif", "estimated_labels",
              quiet=True, scheduler=client.scheduler.address, block_tiles=2, **kw)
    assert_same_map(s.path, ref.path)
    assert (s.width, s.height, s.transform) == (30, 27, ref.transform)

    def loaded():
        import sys

        module = sys.modules["terrapatch.serve.caches"]
        return {path: id(engine) for (path, _), (_, engine) in module._ENGINES.items()}

    def open_readers():
        import sys

        return sum(len(v) for v in sys.modules["terrapatch.serve.caches"]._READERS.values())

    assert all(0 < n <= caches.READER_CACHE_SIZE for n in client.run(open_readers).values())
    first = client.run(loaded)
    serve(sources(data), data["savedmodel"], tmp_path / "again.tif", "estimated_labels",
          quiet=True, scheduler=client, block_tiles=1, **kw)
    again = client.run(loaded)
    model = os.path.abspath(data["savedmodel"])
    assert first == again  # same engine objects: loaded once per worker, not per task/run
    assert any(model in engines for engines in again.values())


def test_cli_and_app_on_an_existing_scheduler(client, data, references, tmp_path, capsys):
    argv = ["TensorflowModelServe", "-source1.il", str(data["s20"]), "-source1.rfieldx", "8",
            "-source1.nodata", "0", "-source1.placeholder", "input_20m",
            "-source2.il", str(data["s10"]), "-source2.rfieldx", "16",
            "-source2.placeholder", "input_10m", "-model.dir", str(data["keras"]),
            "-model.fullyconv", "on", "-output.names", *OUTS, "-optim.tilesizex", "16",
            "-out", str(tmp_path / "cli.tif"), "--quiet",
            "--dask-scheduler", client.scheduler.address]
    assert main(argv) == 0
    assert "ignored" not in capsys.readouterr().err
    assert_same_map(tmp_path / "cli.tif", references["fcn"][0])


def test_cli_workers_option_asks_for_a_local_cluster(client, data, references, tmp_path,
                                                     monkeypatch):
    """``--workers N`` reaches ``client_for(None, N)`` (here answered by the test cluster)."""
    asked = []

    @contextlib.contextmanager
    def fake_client_for(scheduler=None, workers=None):
        asked.append((scheduler, workers))
        yield client

    monkeypatch.setattr(cluster, "client_for", fake_client_for)
    argv = ["TensorflowModelServe", "-source1.il", str(data["s20"]), "-source1.rfieldx", "8",
            "-source1.nodata", "0", "-source1.placeholder", "input_20m",
            "-source2.il", str(data["s10"]), "-source2.rfieldx", "16",
            "-source2.placeholder", "input_10m", "-model.dir", str(data["keras"]),
            "-model.fullyconv", "on", "-output.names", *OUTS, "-optim.tilesizex", "16",
            "-out", str(tmp_path / "cli.tif"), "--quiet", "--workers", "3"]
    assert main(argv) == 0
    assert asked[0] == (None, 3)
    assert_same_map(tmp_path / "cli.tif", references["fcn"][0])


# ---------------------------------------------------------------- ordered results, bounded


class CountingClient:
    """A client proxy recording how many tasks were submitted."""

    def __init__(self, client):
        self.client, self.submitted = client, 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return self.client.submit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_run_ordered_hands_results_in_order_with_bounded_tasks_in_flight(client):
    counting = CountingClient(client)
    seen, outstanding = [], []

    def on_result(i, value):
        seen.append((i, value))
        outstanding.append(counting.submitted - len(seen) + 1)

    # Early tasks are the slowest, so later ones finish first and wait their turn.
    tasks = [(i, 0.2 if i % 4 == 0 else 0.0) for i in range(12)]
    cluster.run_ordered(counting, faults.slow_value, tasks, on_result, "test", quiet=True,
                        in_flight=3)
    assert seen == [(i, i) for i in range(12)]
    assert max(outstanding) <= 3 and counting.submitted == 12


# ---------------------------------------------------------------- faults


def test_worker_killed_mid_run_gives_the_same_map(client, data, references, tmp_path):
    job = prepare_serve(sources(data), data["keras"], OUTS, fullyconv=True, tile_size=16)
    marker = tmp_path / "died"
    job.runner = faults.DieOnceRunner(job.runner, marker, at=4)
    out = tmp_path / "out"
    out.mkdir()
    s = job.run(out / "m.tif", quiet=True, scheduler=client, block_tiles=1)
    assert marker.exists()  # a worker really died on tile 4; its task was retried
    assert_same_map(s.path, references["fcn"][0])
    assert no_leftovers(out, "m.tif")
    client.wait_for_workers(2, timeout=60)


def test_unrecoverable_task_failure_leaves_no_output(client, data, tmp_path):
    job = prepare_serve(sources(data), data["keras"], OUTS, fullyconv=True, tile_size=16)
    job.runner = faults.FailingRunner(job.runner, at=7)
    with pytest.raises(TerrapatchError, match=r"serving: task \d+ failed on the "
                                              r"cluster after 2 retries: RuntimeError: "
                                              r"injected failure on tile 7"):
        job.run(tmp_path / "never.tif", quiet=True, scheduler=client, block_tiles=2)
    assert no_leftovers(tmp_path)


def test_task_that_kills_every_worker_is_a_clear_error():
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as lc, \
            distributed.Client(lc) as c:
        with pytest.raises(TerrapatchError, match=r"test: task 0 failed on the cluster: the "
                                                  r"workers running it died 1 time\(s\)"):
            cluster.run_ordered(c, faults.die_always, [(1,)], lambda i, r: None, "test",
                                quiet=True)


def test_unreadable_raster_on_the_workers_is_a_clear_error(client, data, tmp_path):
    bad = tmp_path / "corrupt.tif"
    with rasterio.open(data["s10"]) as ds:
        write_raster(bad, ds.read(), ds.transform, compress="deflate", tiled=True,
                     blockxsize=16, blockysize=16)
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 4096] = b"\x17" * 4096
    bad.write_bytes(bytes(blob))
    with pytest.raises(TerrapatchError, match=r"source2: cannot read"):
        serve(sources(data, s10=bad), data["keras"], tmp_path / "never.tif", OUTS,
              fullyconv=True, tile_size=16, quiet=True, scheduler=client)
    assert no_leftovers(tmp_path, "corrupt.tif")


# ---------------------------------------------------------------- bad input


def test_unreachable_scheduler(data, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1)
    with pytest.raises(InputError, match=r"dask-scheduler: cannot reach the scheduler at "
                                          r"'tcp://127.0.0.1:9'"):
        serve(sources(data), data["keras"], tmp_path / "never.tif", OUTS, fullyconv=True,
              quiet=True, scheduler="tcp://127.0.0.1:9")
    assert no_leftovers(tmp_path)


def test_malformed_scheduler_address(data, tmp_path):
    with pytest.raises(InputError, match=r"dask-scheduler: 'host-without-port' is not a "
                                         r"scheduler address .*expected e.g. tcp://host:8786"):
        serve(sources(data), data["keras"], tmp_path / "never.tif", OUTS, fullyconv=True,
              quiet=True, scheduler="host-without-port")
    assert no_leftovers(tmp_path)


def test_cli_unreachable_scheduler_is_one_line_exit_2(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1)
    argv = ["TensorflowModelServe", "-source1.il", str(data["s20"]), "-source1.rfieldx", "8",
            "-source1.placeholder", "input_20m", "-source2.il", str(data["s10"]),
            "-source2.rfieldx", "16", "-source2.placeholder", "input_10m",
            "-model.dir", str(data["keras"]), "-model.fullyconv", "on",
            "-out", str(tmp_path / "never.tif"), "--quiet",
            "--dask-scheduler", "tcp://127.0.0.1:9"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot reach the scheduler" in err[-1] and "Traceback" not in "\n".join(err)
    assert no_leftovers(tmp_path)


def test_worker_missing_the_model_is_named(client, data, tmp_path):
    model = shutil.copy(data["keras"], tmp_path / "copy.keras")
    job = prepare_serve(sources(data), model, OUTS, fullyconv=True, tile_size=16)
    os.remove(model)  # loaded here, gone for the workers
    with pytest.raises(InputError, match=r"worker tcp://\S+: model='.*copy\.keras' does "
                                         r"not exist there"):
        job.run(tmp_path / "never.tif", quiet=True, scheduler=client)
    assert no_leftovers(tmp_path)


def test_worker_missing_a_savedmodel_is_named(client, data, tmp_path):
    model = shutil.copytree(data["savedmodel"], tmp_path / "sm")
    job = prepare_serve(sources(data), model, OUTS, fullyconv=True, tile_size=16)
    os.remove(model / "saved_model.pb")
    with pytest.raises(InputError, match=r"worker tcp://\S+: model='.*sm/saved_model\.pb' "
                                         r"does not exist there"):
        job.run(tmp_path / "never.tif", quiet=True, scheduler=client)
    shutil.rmtree(model)
    with pytest.raises(InputError, match=r"worker tcp://\S+: model='.*sm' does not exist"):
        job.run(tmp_path / "never.tif", quiet=True, scheduler=client)
    assert no_leftovers(tmp_path)


def test_worker_missing_a_raster_is_named(client, data, tmp_path):
    raster = shutil.copy(data["s10"], tmp_path / "s10_copy.tif")
    job = prepare_serve(sources(data, s10=raster), data["keras"], OUTS, fullyconv=True)
    os.remove(raster)
    with pytest.raises(InputError, match=r"worker tcp://\S+: source2.paths='.*s10_copy\.tif' "
                                         r"does not exist there"):
        job.run(tmp_path / "never.tif", quiet=True, scheduler=client)
    assert no_leftovers(tmp_path)


def test_missing_files_found_by_a_task_name_the_worker(client, data, tmp_path):
    """A worker that joins after the check (or loses a file) still gives a clear error."""
    raster = shutil.copy(data["s10"], tmp_path / "late.tif")
    job = prepare_serve(sources(data, s10=raster), data["keras"], OUTS, fullyconv=True)
    runner, tiles = job.cluster_runner(), job.tiles[:1]
    os.remove(raster)
    future = client.submit(serving.serve_block, runner, tiles, "float32", pure=False)
    with pytest.raises(InputError, match=r"source2: '.*late\.tif' does not exist on worker "
                                         r"tcp://"):
        future.result()
    runner.model = str(tmp_path / "gone.keras")
    future = client.submit(serving.serve_block, runner, tiles, "float32", pure=False)
    with pytest.raises(TerrapatchError, match=r"model: '.*gone\.keras' does not exist on "
                                              r"worker tcp://"):
        future.result()


def test_in_memory_model_cannot_go_to_a_cluster(client, data, tmp_path):
    with pytest.raises(InputError, match=r"model: serving on a Dask cluster needs the "
                                         r"model as a SavedModel directory"):
        serve(sources(data), seed_model(seed=3), tmp_path / "never.tif", OUTS,
              fullyconv=True, quiet=True, scheduler=client)
    assert no_leftovers(tmp_path)


def test_block_tiles_must_be_positive(client, data, tmp_path):
    with pytest.raises(InputError, match=r"block_tiles: 0 must be ≥ 1"):
        serve(sources(data), data["keras"], tmp_path / "never.tif", OUTS, fullyconv=True,
              quiet=True, scheduler=client, block_tiles=0)
