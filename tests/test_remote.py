"""Remote inputs: COGs over HTTP (loopback server with Range support) and STAC Items.

Every request goes to a server bound to 127.0.0.1 in this process; nothing else is
contacted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import datetime
import json
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from RangeHTTPServer import RangeRequestHandler

from terrapatch import raster
from terrapatch.cli import main
from terrapatch.engines import KerasEngine
from terrapatch.errors import GeometryError, InputError, MissingInputError
from terrapatch.extraction import extract_patches
from terrapatch.patches import read_patches
from terrapatch.raster import Source, configure_remote_reads, gdal_path
from terrapatch.serve import serve
from terrapatch.stac import item_asset_paths
from terrapatch.testing import assert_same_map, coordinate_raster, read_raster
from terrapatch.testing.models import seed_model
from terrapatch.vector import write_points

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
BANDS_10 = ("B02", "B03", "B04", "B08")


class CountingHandler(RangeRequestHandler):
    """Range-capable static file handler that counts requests and stays quiet."""

    def send_head(self):
        self.server.requests.append((self.command, self.path))  # type: ignore[attr-defined]
        return super().send_head()

    def log_message(self, format, *args):
        pass


def _cog(path: Path, data: np.ndarray, spacing: float) -> Path:
    profile = {"driver": "COG", "width": data.shape[2], "height": data.shape[1],
               "count": data.shape[0], "dtype": data.dtype.name, "crs": CRS,
               "transform": Affine(spacing, 0, L, 0, -spacing, T), "compress": "DEFLATE",
               "blocksize": 128}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Served directory: a 10 m (4 bands) / 20 m (6 bands) COG pair, one COG per 10 m
    band, a second 20 m band set, and 20 m / 10 m coordinate COGs for extraction."""
    d = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(3)
    s10 = rng.integers(0, 10000, (4, 160, 160), dtype=np.uint16)
    s20 = rng.integers(0, 10000, (6, 80, 80), dtype=np.uint16)
    _cog(d / "s10.tif", s10, 10.0)
    _cog(d / "s20.tif", s20, 20.0)
    (d / "bands").mkdir()
    for name, band in zip(BANDS_10, s10, strict=True):
        _cog(d / "bands" / f"{name}.tif", band[None], 10.0)
    for path, spacing, width in ((d / "c20.tif", 20.0, 40), (d / "c10.tif", 10.0, 80)):
        tmp = coordinate_raster(d / "tmp.tif", width, width,
                                Affine(spacing, 0, L, 0, -spacing, T), crs=CRS)
        with rasterio.open(tmp) as src:
            _cog(path, src.read(), spacing)
        tmp.unlink()
    return d


@pytest.fixture(scope="module")
def server(root) -> Iterator[ThreadingHTTPServer]:
    """A threaded HTTP server with Range support on 127.0.0.1 (free port), serving root."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(CountingHandler, directory=root))
    httpd.requests = []  # type: ignore[attr-defined]
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def seed():
    return KerasEngine.from_model(seed_model(seed=1))


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pair_sources(s20: str | Path, s10: str | Path) -> list[Source]:
    """Seed Q1: 20 m as source 1 (rf 8), 10 m as source 2 (rf 16)."""
    return [Source(s20, 8, placeholder="input_20m", name="source1"),
            Source(s10, 16, placeholder="input_10m", name="source2")]


def write_item(path: Path, hrefs: dict[str, str]) -> Path:
    """A STAC Item JSON (written with pystac) with one asset per ``hrefs`` entry."""
    item = pystac.Item("scene", {"type": "Point", "coordinates": [3.0, 36.0]},
                       [3.0, 36.0, 3.0, 36.0], datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
                       {})
    for key, href in hrefs.items():
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG,
                                         roles=["data"]))
    payload = item.to_dict(include_self_link=False, transform_hrefs=False)
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture(scope="module")
def items(root, base) -> dict[str, Path]:
    """Item JSONs in the served directory: relative hrefs for B02/B03 and the 20 m
    image, absolute URLs for B04/B08; and one local Item with relative hrefs only."""
    served = write_item(root / "item.json", {
        "B02": "bands/B02.tif", "B03": "./bands/B03.tif",
        "B04": f"{base}/bands/B04.tif", "B08": f"{base}/bands/B08.tif",
        "S20": "s20.tif"})
    local = write_item(root / "bands" / "local_item.json", {
        **{b: f"{b}.tif" for b in BANDS_10}, "S20": "../s20.tif"})
    return {"served": served, "local": local}


# ------------------------------------------------------------------ paths and options


def test_gdal_paths_of_urls():
    assert gdal_path("https://h/a.tif") == "/vsicurl/https://h/a.tif"
    assert gdal_path("http://h/a.tif?sig=1") == "/vsicurl/http://h/a.tif?sig=1"
    assert gdal_path("s3://bucket/k/a.tif") == "/vsis3/bucket/k/a.tif"
    assert gdal_path("gs://bucket/a.tif") == "/vsigs/bucket/a.tif"
    assert gdal_path("/vsicurl/https://h/a.tif") == "/vsicurl/https://h/a.tif"
    assert gdal_path("/vsis3/b/a.tif") == "/vsis3/b/a.tif"
    assert gdal_path("file:///data/a.tif") == "/data/a.tif"
    assert gdal_path("rel/a.tif") == "rel/a.tif"
    s = Source(["https://h/a.tif", "s3://b/a.tif", "rel/a.tif"])
    assert s.paths == ("/vsicurl/https://h/a.tif", "/vsis3/b/a.tif", os.path.abspath("rel/a.tif"))


def test_remote_options_are_set_without_overriding_the_user(monkeypatch):
    for key in raster.REMOTE_READ_OPTIONS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", raising=False)
    monkeypatch.setenv("VSI_CACHE_SIZE", "12345")
    Source("http://127.0.0.1:9/a.tif")  # a remote source configures (nothing is opened)
    assert os.environ["VSI_CACHE_SIZE"] == "12345"
    assert os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert os.environ["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    assert "CPL_VSIL_CURL_ALLOWED_EXTENSIONS" not in os.environ
    assert configure_remote_reads()["VSI_CACHE_SIZE"] == "12345"


# ------------------------------------------------------------------ same results


def test_serve_from_urls_is_identical_to_local(root, base, server, seed, tmp_path):
    local = serve(pair_sources(root / "s20.tif", root / "s10.tif"), seed, tmp_path / "l.tif",
                  "estimated", fullyconv=True, tile_size=16, quiet=True)
    expected = read_raster(local.path)
    assert expected.values.shape == (6, 73, 73)
    before = len(server.requests)
    for s20, s10 in ((f"{base}/s20.tif", f"{base}/s10.tif"),
                     (f"/vsicurl/{base}/s20.tif", f"/vsicurl/{base}/s10.tif")):
        remote = serve(pair_sources(s20, s10), seed, tmp_path / "r.tif", "estimated",
                       fullyconv=True, tile_size=16, quiet=True)
        assert len(server.requests) > before  # really read over HTTP (then GDAL's cache)
        assert_same_map(remote.path, expected)


def test_patch_based_serve_from_urls_is_identical(root, base, seed, tmp_path):
    box = (10, 20, 12, 9)
    local = serve(pair_sources(root / "s20.tif", root / "s10.tif"), seed, tmp_path / "l.tif",
                  "estimated_labels", box=box, quiet=True)
    remote = serve(pair_sources(f"{base}/s20.tif", f"{base}/s10.tif"), seed,
                   tmp_path / "r.tif", "estimated_labels", box=box, quiet=True)
    assert_same_map(remote.path, local.path)


def test_extraction_from_urls_is_identical_to_local(root, base, tmp_path):
    rng = np.random.default_rng(0)
    x = L + rng.uniform(100, 700, 40)
    y = T - rng.uniform(100, 700, 40)
    vec = write_points(tmp_path / "p.geojson", x, y, {"class": np.arange(40) % 3}, crs=CRS)
    runs = {}
    for kind, prefix in (("local", os.fspath(root)), ("remote", base)):
        out = tmp_path / kind
        out.mkdir()
        summary = extract_patches(
            [Source(f"{prefix}/c20.tif", 8, name="source1"),
             Source(f"{prefix}/c10.tif", 16, name="source2")],
            vec, "class", [out / "p20.tif", out / "p10.tif"], labels_out=out / "lab.tif",
            quiet=True)
        assert summary.n_collected > 20
        runs[kind] = [read_patches(out / n) for n in ("p20.tif", "p10.tif", "lab.tif")]
    for a, b in zip(runs["local"], runs["remote"], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ STAC


def test_item_asset_paths_resolve_against_the_item(items, base, root):
    url = f"{base}/item.json"
    assert item_asset_paths(url, ["B02", "B04", "S20"]) == [
        f"/vsicurl/{base}/bands/B02.tif", f"/vsicurl/{base}/bands/B04.tif",
        f"/vsicurl/{base}/s20.tif"]
    assert item_asset_paths(items["local"], ["B03", "S20"]) == [
        os.fspath(root / "bands" / "B03.tif"), os.fspath(root / "s20.tif")]


def test_stac_item_serves_the_same_map_as_the_files(items, root, base, seed, tmp_path):
    expected = serve(pair_sources(root / "s20.tif", root / "s10.tif"), seed,
                     tmp_path / "files.tif", "estimated", fullyconv=True, quiet=True).path
    keys = ",".join(BANDS_10)
    url = f"{base}/item.json"
    variants = {
        "url": pair_sources(f"{url}#S20", f"{url}#{keys}"),
        "stac-prefix": pair_sources(f"stac:{url}#S20", f"stac:{url}#{keys}"),
        "local item": pair_sources(f"{items['local']}#S20", f"{items['local']}#{keys}"),
        "from_stac": [
            Source.from_stac(pystac.Item.from_file(os.fspath(items["served"])), ["S20"], 8,
                             placeholder="input_20m", name="source1"),
            Source.from_stac(url, keys, 16, placeholder="input_10m", name="source2")],
    }
    for name, sources in variants.items():
        assert sources[1].bands == 4, name
        out = tmp_path / f"stac_{name.replace(' ', '_')}.tif"  # the message names the variant
        assert_same_map(serve(sources, seed, out, "estimated", fullyconv=True,
                              quiet=True).path, expected)


def test_stac_cli_spelling(items, base, tmp_path):
    vec = write_points(tmp_path / "p.geojson", np.array([L + 405.0]), np.array([T - 405.0]),
                       {"class": np.array([1])}, crs=CRS)
    out = tmp_path / "p10.tif"
    code = main(["PatchesExtraction", "-source1.il", f"{base}/item.json#B04,B03",
                 "-source1.patchsizex", "4", "-source1.patchsizey", "4",
                 "-source1.out", os.fspath(out), "-vec", os.fspath(vec), "-field", "class",
                 "--quiet"])
    assert code == 0
    patch = read_patches(out)
    with rasterio.open(items["served"].parent / "s10.tif") as ds:
        window = ds.read([3, 2], window=((38, 42), (38, 42)))
    assert patch.shape == (1, 4, 4, 2)
    np.testing.assert_array_equal(patch[0].transpose(2, 0, 1), window)


# ------------------------------------------------------------------ bad inputs


def test_unreachable_url_is_one_line_naming_parameter_and_url():
    url = f"http://127.0.0.1:{free_port()}/missing.tif"
    with pytest.raises(InputError) as info:
        _ = Source(url, 8, name="source2").grid
    message = str(info.value)
    assert message.startswith("source2: ") and url in message
    assert "\n" not in message and "/vsicurl/" not in message


def test_missing_file_on_the_server(base):
    with pytest.raises(InputError, match=r"source1: cannot read 'http://.*/nope.tif'.*404"):
        _ = Source(f"{base}/nope.tif").grid


def test_missing_asset_key_lists_available_keys(items, base):
    with pytest.raises(InputError) as info:
        Source(f"{base}/item.json#B04,B99", name="source3")
    message = str(info.value)
    assert message.startswith("source3: ") and "'B99'" in message
    assert "available assets: B02, B03, B04, B08, S20" in message
    with pytest.raises(InputError, match="no STAC asset key"):
        Source(f"{base}/item.json#")
    with pytest.raises(InputError, match="has no asset 'X'"):
        Source.from_stac(items["local"], ["X"])


def test_missing_or_unreachable_item(tmp_path, base):
    with pytest.raises(MissingInputError, match=r"source1: STAC item .*none.json"):
        Source(f"{tmp_path}/none.json#B04")
    port = free_port()
    with pytest.raises(InputError, match=rf"source1: cannot read STAC item "
                                         rf"'http://127.0.0.1:{port}/item.json'"):
        Source(f"http://127.0.0.1:{port}/item.json#B04")
    with pytest.raises(InputError, match=r"HTTP 404"):
        Source(f"{base}/nothing.json#B04")
    with pytest.raises(InputError, match="is not a STAC Item"):
        (tmp_path / "fc.json").write_text('{"type": "FeatureCollection", "features": []}')
        Source(f"{tmp_path}/fc.json#B04")


def test_assets_on_different_grids_cannot_be_stacked(items, base):
    url = f"{base}/item.json"
    source = Source(f"{url}#B04,B02,S20")
    with pytest.raises(GeometryError) as info:
        _ = source.grid
    message = str(info.value)
    assert message.startswith("source1: asset 'S20' (20 m, 80×80 px) is not on the grid "
                              "of asset 'B04' (10 m, 160×160 px)"), message
    assert f"source1.paths '{url}#B04,B02' and source2.paths '{url}#S20'" in message


def test_cli_bad_url_exits_2_with_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/a.tif"
    vec = write_points(tmp_path / "p.geojson", np.array([L + 50.0]), np.array([T - 50.0]),
                       {"class": np.array([1])}, crs=CRS)
    code = main(["PatchesExtraction", "-source1.il", url, "-source1.patchsizex", "4",
                 "-source1.patchsizey", "4", "-source1.out", os.fspath(tmp_path / "o.tif"),
                 "-vec", os.fspath(vec), "-field", "class"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "source1.il" in err[0] and url in err[0], err
    assert not (tmp_path / "o.tif").exists()


def test_cli_missing_asset_exits_2_with_one_line(items, base, tmp_path, capsys):
    vec = write_points(tmp_path / "p.geojson", np.array([L + 50.0]), np.array([T - 50.0]),
                       {"class": np.array([1])}, crs=CRS)
    code = main(["PatchesExtraction", "-source1.il", f"{base}/item.json#B05",
                 "-source1.patchsizex", "4", "-source1.patchsizey", "4",
                 "-source1.out", os.fspath(tmp_path / "o.tif"),
                 "-vec", os.fspath(vec), "-field", "class"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "'B05'" in err[0] and "B02, B03, B04, B08, S20" in err[0], err



def _worker_option(key: str) -> str | None:
    return os.environ.get(key)


def test_dask_workers_read_urls_and_set_the_options_themselves(root, base, tmp_path,
                                                               monkeypatch):
    import distributed

    model = tmp_path / "seed.keras"
    seed_model(seed=1).save(model)
    local = serve(pair_sources(root / "s20.tif", root / "s10.tif"), model, tmp_path / "l.tif",
                  "estimated", fullyconv=True, tile_size=32, quiet=True)
    # Workers start without the options in their environment: they must set them when
    # they open the (unpickled) sources.
    for key in raster.REMOTE_READ_OPTIONS:
        monkeypatch.delenv(key, raising=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        assert client.run(_worker_option, "GDAL_DISABLE_READDIR_ON_OPEN") == {
            w: None for w in client.scheduler_info()["workers"]}
        remote = serve(pair_sources(f"{base}/s20.tif?dask", f"{base}/s10.tif?dask"), model,
                       tmp_path / "r.tif", "estimated", fullyconv=True, tile_size=32,
                       quiet=True, scheduler=client)
        options = client.run(_worker_option, "GDAL_DISABLE_READDIR_ON_OPEN")
    assert set(options.values()) == {"EMPTY_DIR"}
    assert_same_map(remote.path, local.path)
