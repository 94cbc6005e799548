"""Dask execution: identical outputs, worker death, failures and unreachable schedulers."""

from __future__ import annotations

import contextlib
import re
import socket
import threading

import distributed
import numpy as np
import pytest

from terrapatch import cluster
from terrapatch import extraction as ex
from terrapatch.errors import InputError, TerrapatchError
from terrapatch.extraction import reading
from terrapatch.patches import read_patches
from terrapatch.raster import Source
from terrapatch.testing import faults, make_scene


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as lc, distributed.Client(lc) as c:
        yield c


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("scene"), size=256, n_points=800, seed=3)


def test_extraction_on_cluster_is_identical(client, scene, tmp_path, monkeypatch):
    sources = [Source(scene.img_10m, 16, 0, name="source1"),
               Source(scene.img_20m, 8, 0, name="source2")]
    local = ex.extract_patches(sources, scene.points_train, "class",
                               [tmp_path / "a10.tif", tmp_path / "a20.tif"],
                               tmp_path / "al.tif", quiet=True)
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)  # many tasks, several per worker
    remote = ex.extract_patches(sources, scene.points_train, "class",
                                [tmp_path / "b10.tif", tmp_path / "b20.tif"],
                                tmp_path / "bl.tif", quiet=True, scheduler=client)
    assert remote.n_collected == local.n_collected > 100
    assert remote.rejected_nodata == local.rejected_nodata
    for a, b in (("a10", "b10"), ("a20", "b20"), ("al", "bl")):
        assert np.array_equal(read_patches(tmp_path / f"{a}.tif"),
                              read_patches(tmp_path / f"{b}.tif"))


def test_worker_killed_mid_run_task_is_rescheduled(client, tmp_path):
    results = {}
    cluster.run_ordered(client, faults.die_once, [(str(tmp_path / "marker"), v) for v in range(6)],
                      results.__setitem__, "test", quiet=True)
    assert (tmp_path / "marker").exists()  # one worker really died
    assert results == {i: i * 10 for i in range(6)}
    client.wait_for_workers(2, timeout=30)


def test_failing_task_gives_clear_error(client):
    with pytest.raises(TerrapatchError, match=r"task 0 failed on the cluster after 2 retries"):
        cluster.run_ordered(client, faults.always_fail, [(1,)], lambda i, r: None, "test",
                          quiet=True)


def test_worker_missing_file_is_named(client, tmp_path):
    missing = tmp_path / "not-there.tif"
    with pytest.raises(InputError, match=r"worker tcp://.*not-there\.tif.*does not exist"):
        cluster.check_worker_paths(client, [str(missing)])


def test_unreachable_scheduler(monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1)
    with pytest.raises(InputError, match=r"dask-scheduler: cannot reach the scheduler at "
                                          r"'tcp://127.0.0.1:9'"):
        with cluster.client_for("tcp://127.0.0.1:9"):
            pass


def test_unreachable_scheduler_says_why_without_building_a_client(monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1)
    class NoClient:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a Client was built")

    monkeypatch.setattr(distributed, "Client", NoClient)  # the TCP probe alone must answer
    with pytest.raises(InputError, match=r"cannot reach the scheduler at 'tcp://127.0.0.1:9' "
                                          r"\(Connection refused\)"):
        with cluster.client_for("tcp://127.0.0.1:9"):
            pass


def test_a_port_that_hangs_up_is_not_a_scheduler_and_later_clients_still_connect(client,
                                                                                 monkeypatch):
    """A service that accepts and closes fails the Client; the next Client must not hang.

    distributed's half-built Client, collected inside a later Client's event-loop
    start, deadlocked a CI run: client_for collects it at once.
    """
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hang_up():
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                listener.accept()[0].close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        for _ in range(3):
            with pytest.raises(InputError, match=r"cannot reach the scheduler at "
                                                  + re.escape(repr(address))):
                with cluster.client_for(address):
                    pass
    finally:
        stop.set()
        thread.join()
        listener.close()
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 30)
    with cluster.client_for(client.scheduler.address) as other:
        assert other.submit(abs, -3, pure=False).result(timeout=60) == 3


def corrupt_copy(src, dst):
    """Copy a tiled GeoTIFF and overwrite the middle of its tile data with garbage."""
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = b"\x17" * 4096
    dst.write_bytes(bytes(data))
    return dst


def test_unrecoverable_read_failure_on_cluster_leaves_no_output(client, scene, tmp_path):
    bad = corrupt_copy(scene.img_10m, tmp_path / "corrupt.tif")
    out = tmp_path / "never.tif"
    with pytest.raises(TerrapatchError, match=r"source1: cannot read"):
        ex.extract_patches([Source(bad, 16, name="source1")], scene.points_train, "class",
                           [out], quiet=True, scheduler=client)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.tif"]
