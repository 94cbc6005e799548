"""Serving at scale: block sink, resume after real kills, COG and VRT outputs, locks, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrapatch.cli import main
from terrapatch.errors import InputError, OutputError
from terrapatch.raster import Source
from terrapatch.serve import prepare_serve, serve
from terrapatch.testing import assert_same_map, faults, read_raster
from terrapatch.testing.onnx_models import conv_onnx
from terrapatch.testing.rasters import write_raster
from terrapatch.writer import PendingOutput, read_category_names

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
TILE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 10 m (4 bands) / 20 m (6 bands) pair and a two-source ONNX model (rf 8 / 4)."""
    d = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(11)
    s20 = rng.integers(1, 10000, (6, 180, 200), dtype=np.uint16)
    s20[:, :40, :40] = 0  # a nodata corner: skipped tiles
    return {
        "s10": write_raster(d / "s10.tif", rng.integers(0, 10000, (4, 360, 400), np.uint16),
                            Affine(10.0, 0.0, L, 0.0, -10.0, T), CRS),
        "s20": write_raster(d / "s20.tif", s20, Affine(20.0, 0.0, L, 0.0, -20.0, T), CRS),
        "model": conv_onnx(d / "model.onnx"),
        "dir": d,
    }


def sources(data):
    return [Source(data["s20"], 4, nodata=0, placeholder="input_20m", name="source1"),
            Source(data["s10"], 8, placeholder="input_10m", name="source2")]


def run(data, out, **kw):
    kw.setdefault("tile_size", TILE)
    kw.setdefault("pixel_type", "float32")
    return serve(sources(data), str(data["model"]), out, fullyconv=True, quiet=True, **kw)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The map of the default sink (ordered writer, in process)."""
    out = tmp_path_factory.mktemp("ref") / "ref.tif"
    summary = run(data, out)
    assert summary.sink == "ordered" and summary.skipped_tiles > 0
    return out


def uninterrupted(data, tmp_path, **kw):
    """The same resumable run, never interrupted."""
    out = tmp_path / "whole" / "map.tif"
    out.parent.mkdir(exist_ok=True)
    run(data, out, resume=True, **kw)
    return out


def hidden(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- sinks: same map, same file


@pytest.mark.parametrize("block_tiles", [1, 3, None])
def test_block_sink_gives_the_ordered_writers_map(data, reference, tmp_path, block_tiles):
    s = run(data, tmp_path / "m.tif", resume=True, block_tiles=block_tiles)
    assert s.sink == "blocks" and s.blocks > 1 and s.resumed_blocks == 0
    assert_same_map(tmp_path / "m.tif", reference, check_layout=True)
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("tile", [TILE, 48])
def test_blocks_are_copied_as_compressed_tiles_or_re_encoded(data, tmp_path, tile,
                                                             monkeypatch):
    """On the map's tile grid, the assembled file holds the blocks' own tile bytes."""
    from terrapatch.serve import execution as job_module

    calls = []
    original = job_module.copy_tiles
    monkeypatch.setattr(job_module, "copy_tiles",
                        lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
    options = {"TILED": "YES", "BLOCKXSIZE": str(TILE), "BLOCKYSIZE": str(TILE)}
    ordered = run(data, tmp_path / "ordered.tif", tile_size=tile, creation_options=options)
    blocks = run(data, tmp_path / "blocks.tif", tile_size=tile, creation_options=options,
                 resume=True, block_tiles=2)
    assert calls == [tile == TILE]
    assert_same_map(blocks.path, ordered.path, check_layout=True)
    if tile == TILE:
        with rasterio.open(blocks.path) as ds:
            first = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
            size = int(ds.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
        with rasterio.open(ordered.path) as ds:
            o_first = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
            o_size = int(ds.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
        raw = blocks.path.read_bytes()[first:first + size]
        assert raw == ordered.path.read_bytes()[o_first:o_first + o_size]


def test_vrt_output_keeps_the_blocks_as_a_mosaic(data, reference, tmp_path):
    s = run(data, tmp_path / "map.vrt", block_tiles=2)
    assert s.driver == "VRT" and s.sink == "blocks"
    blocks = sorted((tmp_path / "map.blocks").iterdir())
    assert len(blocks) == s.blocks
    assert_same_map(tmp_path / "map.vrt", reference)
    # a second run replaces the mosaic and its blocks
    run(data, tmp_path / "map.vrt", block_tiles=4)
    assert len(list((tmp_path / "map.blocks").iterdir())) < len(blocks)
    assert_same_map(tmp_path / "map.vrt", reference)
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------- COG


def test_cog_output_is_valid_with_overviews(data, reference, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    big = tmp_path / "big.tif"
    s = serve(sources(data), str(data["model"]), big, fullyconv=True, quiet=True,
              tile_size=TILE, output_format="COG", creation_options={"BLOCKSIZE": "64"})
    valid, errors, _ = cog_validate(str(big))
    assert valid, errors
    with rasterio.open(big) as ds:
        assert ds.overviews(1), "a COG larger than its blocks has overviews"
        assert ds.block_shapes[0] == (64, 64)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert_same_map(big, reference)
    assert s.driver == "COG" and s.assemble_seconds > 0
    assert hidden(tmp_path) == []


def test_cog_class_map_nearest_overviews_colormap_and_names(data, tmp_path):
    out = tmp_path / "classes.tif"
    one_band = conv_onnx(tmp_path / "one.onnx", classes=1)
    with pytest.raises(InputError, match=r"colormap: class colours and names need a one-band "
                                         r"map; this one has 3 bands"):
        serve(sources(data), str(data["model"]), out, fullyconv=True, quiet=True,
              colormap={1: (1, 2, 3)})
    serve(sources(data), str(one_band), f"{out}", fullyconv=True, quiet=True,
          pixel_type="uint8", output_format="cog", creation_options={"BLOCKSIZE": "64"},
          colormap={0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0)},
          class_names=["background", "crop", "forest"])
    with rasterio.open(out) as ds:
        assert ds.colormap(1)[1] == (255, 0, 0, 255)
        assert ds.colormap(1)[2] == (0, 255, 0, 255)
        assert "CLASS_NAMES" not in ds.tags(1)  # one legend: GDAL's category names
        full = ds.read(1)
        factor = ds.overviews(1)[0]
        overview = ds.read(1, out_shape=(full.shape[0] // factor, full.shape[1] // factor))
    # nearest: every overview value is a class of the full map (no averaged classes)
    assert set(np.unique(overview)) <= set(np.unique(full))
    assert read_category_names(out) == ["background", "crop", "forest"]
    with pytest.raises(InputError, match=r"^colormap: class colours and names need a uint8 or "
                                         r"uint16 map; this one is float32"):
        serve(sources(data), str(one_band), tmp_path / "scores.tif", fullyconv=True,
              quiet=True, class_names=["background", "crop", "forest"])
    assert not (tmp_path / "scores.tif").exists()


def test_cog_by_the_extended_file_name_on_the_cli(data, reference, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    out = tmp_path / "cli.tif"
    code = main(["TensorflowModelServe", "-source1.il", str(data["s20"]), "-source1.rfieldx",
                 "4", "-source1.placeholder", "input_20m", "-source1.nodata", "0",
                 "-source2.il", str(data["s10"]), "-source2.rfieldx", "8",
                 "-source2.placeholder", "input_10m", "-model.dir", str(data["model"]),
                 "-model.fullyconv", "true", "-optim.tilesizex", str(TILE),
                 "-out", f"{out}?&gdal:of:COG&gdal:co:OVERVIEW_RESAMPLING=AVERAGE", "float",
                 "--quiet"])
    assert code == 0
    assert cog_validate(str(out))[0]
    assert_same_map(out, reference)


# ---------------------------------------------------------------- resume

SCRIPT = textwrap.dedent("""
    import sys, time
    from terrapatch.engines import OnnxEngine
    from terrapatch.cli import main

    slow = OnnxEngine.run

    def run(self, feed, outputs):
        time.sleep(float(sys.argv[1]))
        return slow(self, feed, outputs)

    OnnxEngine.run = run
    sys.exit(main(sys.argv[2:]))
""")


def cli_args(data, out, *extra):
    return ["TensorflowModelServe", "-source1.il", str(data["s20"]), "-source1.rfieldx", "4",
            "-source1.placeholder", "input_20m", "-source1.nodata", "0",
            "-source2.il", str(data["s10"]), "-source2.rfieldx", "8",
            "-source2.placeholder", "input_10m", "-model.dir", str(data["model"]),
            "-model.fullyconv", "true", "-optim.tilesizex", str(TILE), "-out", str(out),
            "float", "--quiet", *extra]


def start_slow(data, out, tmp_path, delay=0.05, *extra):
    script = tmp_path / "slow_serve.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, str(script), str(delay),
                             *cli_args(data, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def journal_blocks(out):
    path = Path(out).with_name(f".{Path(out).name}.pending") / "journal.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"block"' in line)


def wait_for_blocks(out, proc, count, timeout=60.0):
    end = time.monotonic() + timeout
    while journal_blocks(out) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run did not journal blocks in time"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["kill9", "sigint", "sigterm"])
def test_resume_after_a_real_kill_gives_the_same_file(data, reference, tmp_path, how):
    out = tmp_path / "map.tif"
    proc = start_slow(data, out, tmp_path, 0.05, "--resume")
    wait_for_blocks(out, proc, 3)
    sig = {"kill9": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[how]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    expected = {"kill9": -9, "sigint": 130, "sigterm": 143}[how]
    assert proc.returncode == expected, err.decode()
    if how != "kill9":
        lines = [line for line in err.decode().splitlines() if "terrapatch" in line]
        assert lines[-1].startswith("terrapatch TensorflowModelServe: ")
        assert "Traceback" not in err.decode()
    assert not out.exists()
    done = journal_blocks(out)
    assert done >= 3
    total = len(prepare_serve(sources(data), str(data["model"]), fullyconv=True,
                              tile_size=TILE).tiles)
    # the rerun computes only the missing blocks
    s = run(data, out, resume=True)
    assert s.resumed_blocks >= done - 1  # a block may be written but not yet journaled
    assert s.resumed_blocks < s.blocks <= total
    assert out.read_bytes() == uninterrupted(data, tmp_path).read_bytes()
    assert_same_map(out, reference, check_layout=True)
    assert hidden(tmp_path) == []


PRELOAD = textwrap.dedent("""
    import time
    from terrapatch.engines import OnnxEngine

    def run(self, feed, outputs):
        time.sleep(0.1)
        return OnnxEngine.unslowed_run(self, feed, outputs)

    # Dask may run a preload more than once (in the same namespace): patch only once.
    if not hasattr(OnnxEngine, "unslowed_run"):
        OnnxEngine.unslowed_run = OnnxEngine.run
        OnnxEngine.run = run
""")


def test_resume_after_the_whole_cluster_is_killed(data, reference, tmp_path):
    """kill -9 of the client and its Dask workers (workers writing blocks), then resume."""
    out = tmp_path / "map.tif"
    preload = tmp_path / "slow_workers.py"
    preload.write_text(PRELOAD)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([str(preload)]))
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "terrapatch.cli",
                             *cli_args(data, out, "--resume", "--workers", "2")],
                            stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        wait_for_blocks(out, proc, 3, timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler and every worker
        proc.wait(timeout=60)
        log.close()
    done = journal_blocks(out)
    assert done >= 3 and not out.exists()
    s = run(data, out, resume=True)
    assert s.resumed_blocks >= done - 1 and s.resumed_blocks < s.blocks
    assert out.read_bytes() == uninterrupted(data, tmp_path).read_bytes()
    assert_same_map(out, reference, check_layout=True)


def test_without_resume_a_dead_runs_leftovers_are_removed(data, reference, tmp_path):
    out = tmp_path / "map.tif"
    proc = start_slow(data, out, tmp_path, 0.05, "--resume")
    wait_for_blocks(out, proc, 2)
    proc.kill()
    proc.communicate(timeout=60)
    assert hidden(tmp_path) == [".map.tif.pending"]
    s = run(data, out)
    assert s.resumed_blocks == 0 and hidden(tmp_path) == []
    assert out.read_bytes() == reference.read_bytes()  # the ordered sink, as any plain run


def test_resume_refuses_changed_parameters_model_or_inputs(data, tmp_path):
    out = tmp_path / "map.tif"
    job = prepare_serve(sources(data), str(data["model"]), fullyconv=True, tile_size=TILE)
    job.runner = faults.FailingRunner(job.runner, at=len(job.tiles) // 2)
    with pytest.raises(RuntimeError, match="injected failure"):
        job.run(out, quiet=True, resume=True)
    assert hidden(tmp_path) == [".map.tif.pending"] and journal_blocks(out) > 0
    with pytest.raises(InputError, match=r"resume: the unfinished run of '.*map\.tif' used "
                                         r"other parameters; .*rerun without --resume"):
        run(data, out, resume=True, pixel_type="uint16")
    other = conv_onnx(tmp_path / "other.onnx", seed=5)
    with pytest.raises(InputError, match=r"used other model;"):
        serve(sources(data), str(other), out, fullyconv=True, quiet=True, tile_size=TILE,
              resume=True)
    moved = write_raster(tmp_path / "s20b.tif", read_raster(data["s20"]).values + 1,
                         Affine(20.0, 0.0, L, 0.0, -20.0, T), CRS)
    srcs = sources(data)
    srcs[0] = Source(moved, 4, nodata=0, placeholder="input_20m", name="source1")
    with pytest.raises(InputError, match=r"used other inputs;"):
        serve(srcs, str(data["model"]), out, fullyconv=True, quiet=True, tile_size=TILE,
              resume=True)
    # the state survives refused attempts, and the CLI says it in one line
    code = main([*cli_args(data, out, "--resume")[:-3], "uint16", "--quiet", "--resume"])
    assert code == 2
    assert journal_blocks(out) > 0
    s = run(data, out, resume=True)
    assert s.resumed_blocks > 0


def test_a_journal_of_another_output_is_refused(data, tmp_path):
    first = tmp_path / "a.tif"
    job = prepare_serve(sources(data), str(data["model"]), fullyconv=True, tile_size=TILE)
    job.runner = faults.FailingRunner(job.runner, at=len(job.tiles) // 2)
    with pytest.raises(RuntimeError):
        job.run(first, quiet=True, resume=True)
    os.replace(tmp_path / ".a.tif.pending", tmp_path / ".b.tif.pending")
    with pytest.raises(InputError, match=r"resume: the journal .* belongs to another output "
                                         r"\('.*a\.tif', not '.*b\.tif'\)"):
        run(data, tmp_path / "b.tif", resume=True)


def test_resume_after_a_lost_cluster_task(data, reference, tmp_path):
    import distributed

    out = tmp_path / "map.tif"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        job = prepare_serve(sources(data), str(data["model"]), fullyconv=True, tile_size=TILE)
        job.runner = faults.FailingRunner(job.runner, at=len(job.tiles) - 3)
        with pytest.raises(Exception, match="injected failure"):
            job.run(out, quiet=True, resume=True, scheduler=c, block_tiles=1)
    assert journal_blocks(out) > 0
    s = run(data, out, resume=True, block_tiles=1)
    assert 0 < s.resumed_blocks < s.blocks
    assert out.read_bytes() == uninterrupted(data, tmp_path, block_tiles=1).read_bytes()
    assert_same_map(out, reference, check_layout=True)


# ---------------------------------------------------------------- outputs: locks and bad input


def test_a_second_run_on_the_same_output_is_refused(data, tmp_path):
    out = tmp_path / "map.tif"
    with PendingOutput(out), pytest.raises(OutputError, match=r"out: another terrapatch run "
                                                             rf"\(pid {os.getpid()}\) is "
                                                             r"writing '.*map\.tif'"):
        run(data, out)
    assert not out.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize(("out", "kw", "message"), [
    ("map.png", {}, r"out: '.*map\.png' has extension '\.png', which does not match the GTiff "
                    r"format \(use \.tif or \.tiff\)"),
    ("map.tif", {"output_format": "JPEG"}, r"out: output format 'JPEG' is not supported"),
    ("map.vrt", {"output_format": "COG"}, r"does not match the COG format"),
    ("map.tif", {"sink": "fast"}, r"sink: 'fast' is not one of ordered, blocks"),
    ("map.tif", {"sink": "ordered", "resume": True}, r"sink: 'ordered' cannot be used with "
                                                     r"resume"),
    ("map.tif", {"overview_resampling": "median"}, r"overview_resampling: 'MEDIAN' is not"),
    ("map.tif", {"colormap": {1: (300, 0, 0)}}, r"colormap: entry 1"),
])
def test_bad_output_settings_are_one_line_errors(data, tmp_path, out, kw, message):
    with pytest.raises(InputError, match=message):
        run(data, tmp_path / out, **kw)
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_an_input_is_refused(data, tmp_path):
    before = data["s10"].read_bytes()
    with pytest.raises(InputError, match=r"out: '.*s10\.tif' is also source2\.paths="
                                         r"'.*s10\.tif'; the map would replace its input"):
        run(data, data["s10"])
    assert data["s10"].read_bytes() == before


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_unwritable_output_folder_is_a_clean_cli_error(data, folder, capsys):
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder}")
    code = main(cli_args(data, f"{folder}/terrapatch_map.tif"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("terrapatch TensorflowModelServe: error: out: ")
    assert "terrapatch_map.tif" in err[0]


def test_full_disk_is_a_one_line_error_naming_the_output(data, tmp_path):
    """A file-size limit makes every write past 64 kB fail as on a full disk."""
    out = tmp_path / "full.tif"
    script = tmp_path / "limited.py"
    script.write_text(textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        from terrapatch.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    args = cli_args(data, out)
    args[args.index("-optim.tilesizex") + 1] = "256"
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    # libtiff prints its own "_tiffWriteProc: File too large." lines from C first
    ours = [x for x in lines if x.startswith("terrapatch")]
    assert "Traceback" not in proc.stderr and ours == lines[-1:], lines
    assert f"out: cannot write '{out}' (" in ours[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["limited.py"]


def test_journal_format_is_inspectable(data, tmp_path):
    out = tmp_path / "map.tif"
    job = prepare_serve(sources(data), str(data["model"]), fullyconv=True, tile_size=TILE)
    job.runner = faults.FailingRunner(job.runner, at=5)
    with pytest.raises(RuntimeError):
        job.run(out, quiet=True, resume=True, block_tiles=1)
    lines = (tmp_path / ".map.tif.pending" / "journal.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["output"] == str(out) and set(header["parts"]) == {
        "inputs", "model", "parameters", "version"}
    done = [json.loads(x)["block"] for x in lines[1:]]
    assert done == list(range(len(done))) and 3 <= len(done) <= 5  # the writer may lag


def test_pixel_interleaved_reads_equal_band_reads_for_stacked_files(data, tmp_path):
    """What FCN tiles are fed: (rows, cols, bands) straight from GDAL, same values."""
    from rasterio.windows import Window

    extra = write_raster(tmp_path / "extra.tif", read_raster(data["s10"]).values[:2] + 7,
                         Affine(10.0, 0.0, L, 0.0, -10.0, T), CRS)
    source = Source([data["s10"], extra], 8, name="source2")
    window = Window(13, 5, 97, 61)
    with source.open() as reader:
        bands = reader.read(window)
        pixels = reader.read(window, interleave="pixel")
    assert pixels.shape == (61, 97, 6) and pixels.flags.c_contiguous
    np.testing.assert_array_equal(pixels, bands.transpose(1, 2, 0))
