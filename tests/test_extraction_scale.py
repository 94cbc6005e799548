"""Extraction at scale: vectorised gathers, streaming spools, bounded buffers, sharded outputs.

The rasters are coordinate rasters (band 1 = column, band 2 = row) with various block
layouts, so a patch shows where it was cut. Windows come from the geometry module
(tested elsewhere); here the reads, the buffering and the outputs are under test.
Performance is measured in ``benchmarks/bench_extraction.py``, not here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terrapatch.extraction as ex
from terrapatch import raster
from terrapatch.dataset import DatasetFromPatchesImages, PatchesImagesReader
from terrapatch.errors import InputError, NoSamplesError
from terrapatch.extraction import job, reading, shards, spool, writing
from terrapatch.geometry import Layout, extraction_factor
from terrapatch.patches import read_patches
from terrapatch.raster import Source
from terrapatch.testing import coordinate_raster, write_raster
from terrapatch.testing.markers import requires_tensorflow
from terrapatch.vector import PointSet

L, T = 500000.0, 4000000.0
CRS = "EPSG:32631"
#: Block layouts of the test rasters: GDAL creation options.
LAYOUTS = {
    "tiles16": {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"},
    "tiles32": {"tiled": True, "blockxsize": 32, "blockysize": 48},
    "strips1": {"blockysize": 1},
    "strips7": {"blockysize": 7, "compress": "deflate"},
}


@contextlib.contextmanager
def patched(**values: Any) -> Iterator[None]:
    """Set extraction constants for the block (usable inside hypothesis tests).

    Each constant is set in the module of :mod:`terrapatch.extraction` that defines it.
    """
    homes = {k: next(m for m in (reading, spool, shards, job) if k in vars(m)) for k in values}
    old = {k: getattr(homes[k], k) for k in values}
    for k, v in values.items():
        setattr(homes[k], k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(homes[k], k, v)


#: Small units, groups and bands, so that small rasters have many of each.
SMALL = {"UNIT_MIN": 16, "CHUNK": 32, "BAND_WIDTH": 64}


@pytest.fixture(scope="module")
def rasters(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per layout: a 10 m 190 × 170 and a 20 m 95 × 85 uint16 coordinate raster."""
    d = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, options in LAYOUTS.items():
        fine = coordinate_raster(d / f"{name}_10.tif", 190, 170, Affine(10, 0, L, 0, -10, T),
                                 crs=CRS, dtype="uint16", **options)
        coarse = coordinate_raster(d / f"{name}_20.tif", 95, 85, Affine(20, 0, L, 0, -20, T),
                                   crs=CRS, dtype="uint16", **options)
        out[name] = (fine, coarse)
    return out


def pair(paths: tuple[Path, Path], rf: int = 4, nodata: float | None = None) -> list[Source]:
    return [Source(paths[0], 2 * rf, name="source1"),
            Source(paths[1], rf, nodata=nodata, name="source2")]


def uniform_points(n: int, seed: int, width: float = 1900.0, height: float = 1700.0,
                   margin: float = -60.0) -> PointSet:
    """``n`` points over the 10 m raster (and a margin outside); label = feature index."""
    rng = np.random.default_rng(seed)
    x = L + rng.uniform(margin, width - margin, n)
    y = T - rng.uniform(margin, height - margin, n)
    return PointSet(x, y, np.arange(n), None)


def expected_patches(sources: list[Source], points: PointSet) -> tuple[np.ndarray, list]:
    """Kept features and, per source, its patches cut by numpy from the whole raster."""
    grids = [s.grid for s in sources]
    layout = Layout(tuple(grids), tuple(s.patch_size for s in sources),
                    factor=extraction_factor(grids))
    starts = layout.sample_windows(points.x, points.y)
    inside = np.logical_and.reduce([layout.inside(i, c, r) for i, (c, r) in enumerate(starts)])
    kept = np.flatnonzero(inside)
    out: list[np.ndarray] = []
    if len(kept) == 0:
        return kept, out
    for source, (cols, rows) in zip(sources, starts, strict=True):
        with rasterio.open(source.paths[0]) as ds:
            data = ds.read()
        rx, ry = source.patch_size
        out.append(np.stack([data[:, r:r + ry, c:c + rx].transpose(1, 2, 0)
                             for c, r in zip(cols[kept], rows[kept], strict=True)]))
    return kept, out


def run(sources: list[Source], points: PointSet, d: Path, tag: str, **kwargs: Any):
    outs = [d / f"{tag}_a.tif", d / f"{tag}_b.tif"]
    summary = ex.extract_patches(sources, points, "class", outs, labels_out=d / f"{tag}_l.tif",
                                 labels_pixel_type="int32", pixel_types="uint16", quiet=True,
                                 **kwargs)
    return summary, [read_patches(o) for o in outs], read_patches(d / f"{tag}_l.tif")


# ---------------------------------------------------------------- vectorised gathers


@settings(max_examples=30, deadline=None)
@given(bands=st.integers(1, 4), rows=st.integers(20, 60), cols=st.integers(20, 60),
       rx=st.integers(1, 9), ry=st.integers(1, 9), n=st.integers(1, 40), seed=st.integers(0, 99))
def test_planar_gather_equals_raster_patches_from_region(bands, rows, cols, rx, ry, n, seed):
    rng = np.random.default_rng(seed)
    region = rng.integers(0, 60000, (bands, rows, cols)).astype(np.uint16)
    c = rng.integers(0, cols - rx + 1, n)
    r = rng.integers(0, rows - ry + 1, n)
    previous = raster.patches_from_region(region, c, r, (rx, ry))      # (n, ry, rx, bands)
    planar = ex.patches_from_region(region, c, r, (rx, ry))            # (n, bands, ry, rx)
    assert planar.flags.c_contiguous
    np.testing.assert_array_equal(planar, previous.transpose(0, 3, 1, 2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(sorted(LAYOUTS)), rf=st.integers(1, 6), n=st.integers(1, 120),
       seed=st.integers(0, 10_000), small=st.booleans())
def test_unit_reads_equal_per_sample_reads_and_numpy(rasters, tmp_path_factory, layout, rf, n,
                                                     seed, small):
    d = tmp_path_factory.mktemp("gather")
    sources = pair(rasters[layout], rf)
    points = uniform_points(n, seed)
    kept, truth = expected_patches(sources, points)
    if len(kept) == 0:
        with pytest.raises(NoSamplesError):
            run(sources, points, d, "u")
        return
    with patched(**(SMALL if small else {})):
        _, units, labels = run(sources, points, d, "u")
    with patched(REGION_OVERREAD=0, MIN_REGION=0):   # every group: one read per sample
        _, each, labels_each = run(sources, points, d, "e")
    assert labels.ravel().tolist() == labels_each.ravel().tolist() == kept.tolist()
    for got, other, want in zip(units, each, truth, strict=True):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(other, want)


def test_each_unit_is_decoded_once_and_few_are_held(rasters, tmp_path, monkeypatch):
    caches: list[reading._UnitCache] = []
    reads: list[Any] = []

    class Spy(reading._UnitCache):
        def __init__(self, refs):
            super().__init__(refs)
            caches.append(self)

    real_read = raster.SourceReader.read

    def counting(self, window):
        reads.append(window)
        return real_read(self, window)

    monkeypatch.setattr(reading, "_UnitCache", Spy)
    monkeypatch.setattr(raster.SourceReader, "read", counting)
    sources = pair(rasters["tiles16"], 4)
    units = [12 * 11, 6 * 6]   # 16² units of the 190 × 170 and 95 × 85 rasters
    for n in (3000, 12000):   # dense: every unit is touched
        for band, extra in ((16384, [0, 0]), (64, [2 * 11, 1 * 6])):
            caches.clear()
            reads.clear()
            with patched(UNIT_MIN=16, CHUNK=32, BAND_WIDTH=band):
                summary, _, _ = run(sources, uniform_points(n, 1, margin=100.0), tmp_path,
                                    f"c{n}")
            assert summary.n_collected == n
            # Decoded once each; with 64-px bands, the first unit column of the next band
            # is decoded once more per band boundary (2 for 190 px, 1 for 95 px).
            decoded = [u + e for u, e in zip(units, extra, strict=True)]
            assert [c.decoded for c in caches] == decoded
            assert len(reads) == sum(decoded)
            assert all(c.held == 0 for c in caches)   # all dropped at the end
            # Held: one row of groups of a band (its units + 1 across, 2 + 1 down, two
            # such rows at most) and the groups in flight (4 × 9), whatever the count.
            across = min(band, 190) // 16 + 1
            assert all(c.peak <= across * 3 * 2 + 4 * 9 for c in caches)
            if band == 64:
                assert caches[0].peak < units[0] / 2


# ---------------------------------------------------------------- streaming and bounded buffers


def spool_resident_bytes() -> int:
    """Resident bytes of the extraction spool files mapped in this process (Linux smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                current = len(head) >= 6 and "terrapatch-extract-" in head[5]
            elif current and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux smaps")
def test_spooled_streaming_output_equals_in_memory_and_stays_bounded(rasters, tmp_path,
                                                                     monkeypatch):
    sources = pair(rasters["strips7"], 4, nodata=37)   # some nodata rejections too
    points = uniform_points(20000, 5, margin=50.0)
    ref, ref_patches, ref_labels = run(sources, points, tmp_path, "mem")
    assert 0 < ref.rejected_nodata["source2"] and ref.n_collected > 15000

    spools: list[np.ndarray] = []
    resident: list[int] = []
    chunk_sizes: list[int] = []
    real_scatter, real_write = spool.scatter, writing.write_patches_image

    def scatter(buffer, index, patches):
        assert isinstance(buffer, np.memmap)   # spooled, not held in memory
        spools.append(buffer)
        real_scatter(buffer, index, patches)
        resident.append(spool_resident_bytes())

    def write(path, chunks, **kwargs):
        def watched():
            for chunk in chunks:
                chunk_sizes.append(chunk.shape[1])
                resident.append(spool_resident_bytes())
                yield chunk
        return real_write(path, watched(), **kwargs)

    monkeypatch.setattr(spool, "scatter", scatter)
    monkeypatch.setattr(writing, "write_patches_image", write)
    page = os.sysconf("SC_PAGE_SIZE")
    settings = {"MEMMAP_BYTES": 1, "RELEASE_BYTES": 64 * page, "WRITE_CHUNK": 1000,
                "READ_THREADS": 2}
    with patched(**settings):
        got, patches, labels = run(sources, points, tmp_path, "spool")
    assert (got.n_collected, got.rejected_nodata) == (ref.n_collected, ref.rejected_nodata)
    np.testing.assert_array_equal(labels, ref_labels)
    for a, b in zip(patches, ref_patches, strict=True):
        np.testing.assert_array_equal(a, b)
    total = sum({id(s): s.nbytes for s in spools}.values())
    assert len({id(s) for s in spools}) == 2 and max(chunk_sizes) == 1000
    # One unreleased slice (64 pages; one thread writes to a spool at a time, and the
    # spools are read back with plain reads), with some slack: not the spools.
    bound = 2 * 64 * page + 1000 * 256 + 32 * page
    assert max(resident) <= bound < total / 4
    # The measure is meaningful: without the releases the spools stay resident.
    resident.clear()
    monkeypatch.setattr(spool, "release", lambda buffer: None)
    with patched(**settings):
        run(sources, points, tmp_path, "kept")
    assert max(resident) > total / 2


def test_write_chunks_are_bounded_by_construction(rasters, tmp_path, monkeypatch):
    shapes: list[tuple[int, ...]] = []
    real = writing.write_patches_image

    def write(path, chunks, **kwargs):
        def watched():
            for chunk in chunks:
                shapes.append(chunk.shape)
                yield chunk
        return real(path, watched(), **kwargs)

    monkeypatch.setattr(writing, "write_patches_image", write)
    with patched(WRITE_CHUNK=100):
        summary, _, _ = run(pair(rasters["tiles32"]), uniform_points(1234, 2, margin=100.0),
                            tmp_path, "w")
    assert summary.n_collected == 1234
    assert max(s[1] for s in shapes) == 100
    assert sum(s[1] for s in shapes) == 3 * 1234   # two sources and the labels


# ---------------------------------------------------------------- shards


def shard_samples(summary: ex.ExtractionSummary) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Feature index (the label) → its two patches, over every shard."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    files = zip(summary.shards["source1.output"], summary.shards["source2.output"],
                summary.shards["labels_out"], strict=True)
    for a, b, lab in files:
        pa, pb, pl = read_patches(a), read_patches(b), read_patches(lab)
        assert len(pa) == len(pb) == len(pl) > 0
        ids = pl.ravel().tolist()
        assert ids == sorted(ids)   # feature order inside a shard
        for k, f in enumerate(ids):
            assert f not in out
            out[f] = (pa[k], pb[k])
    return out


def check_same_samples(single, patches, labels, sharded) -> None:
    got = shard_samples(sharded)
    assert sharded.n_collected == single.n_collected == len(got)
    assert sharded.rejected_nodata == single.rejected_nodata
    for n, f in enumerate(labels.ravel().tolist()):
        np.testing.assert_array_equal(got[f][0], patches[0][n])
        np.testing.assert_array_equal(got[f][1], patches[1][n])


def test_sharded_in_process_holds_the_same_samples(rasters, tmp_path, monkeypatch):
    sources = pair(rasters["tiles16"], 4, nodata=37)
    points = uniform_points(3000, 3)
    single, patches, labels = run(sources, points, tmp_path, "one")
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    sharded, _, _ = run_sharded(sources, points, tmp_path / "sh", points_out=True)
    assert len(sharded.shards["source1.output"]) > 4
    check_same_samples(single, patches, labels, sharded)
    folder = tmp_path / "sh" / "sh_a_shards"
    assert sharded.outputs["source1.output"] == folder
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in
                                                       sharded.shards["source1.output"]]
    assert all(p.name.startswith("sh_a-") and p.suffix == ".tif"
               for p in sharded.shards["source1.output"])
    # outpoints: shard and patch index of every kept feature
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "sh" / "kept.gpkg")
    names = list(meta["fields"])
    assert names == ["class", "shard", "patch", "feature"]
    for shard, patch, feature in zip(*(fields[names.index(k)] for k in
                                       ("shard", "patch", "feature")), strict=True):
        lab = read_patches(sharded.shards["labels_out"][shard])
        assert lab[patch].item() == feature
    assert not [p for p in (tmp_path / "sh").iterdir() if p.name.startswith(".")]


def run_sharded(sources, points, d: Path, points_out: bool = False, **kwargs):
    d.mkdir(exist_ok=True)
    outs = [d / "sh_a.tif", d / "sh_b.tif"]
    summary = ex.extract_patches(
        sources, points, "class", outs, labels_out=d / "sh_l.tif",
        points_out=d / "kept.gpkg" if points_out else None, labels_pixel_type="int32",
        pixel_types="uint16", quiet=True, shards=True, **kwargs)
    return summary, outs, d / "sh_l.tif"


def test_failed_shard_leaves_no_folder_and_no_temporary(rasters, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shards.write_shard

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", failing)
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    with pytest.raises(OSError, match="disk full"):
        run_sharded(pair(rasters["tiles16"]), uniform_points(500, 4), tmp_path)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_sharded_rerun_replaces_folders_and_names_conflicts(rasters, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    sources = pair(rasters["tiles16"])
    first, _, _ = run_sharded(sources, uniform_points(800, 6), tmp_path)
    stale = tmp_path / "sh_a_shards" / "stale.tif"
    stale.write_text("x")
    second, _, _ = run_sharded(sources, uniform_points(300, 7), tmp_path)
    assert not stale.exists() and second.n_collected < first.n_collected
    assert sorted((tmp_path / "sh_a_shards").iterdir()) == second.shards["source1.output"]
    with pytest.raises(InputError, match=r"source2.output: .*sh_a.* is also source1.output="):
        ex.extract_patches(sources, uniform_points(10, 1), "class",
                           [tmp_path / "sh_a.tif", tmp_path / "." / "sh_a.tif"],
                           quiet=True, shards=True)


def test_dataset_reads_shard_lists_and_folders(rasters, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    sources = pair(rasters["tiles16"], 4, nodata=37)
    points = uniform_points(600, 8)
    single, patches, labels = run(sources, points, tmp_path, "one")
    sharded, _, _ = run_sharded(sources, points, tmp_path / "sh")
    as_lists = {"input_10m": sharded.shards["source1.output"],
                "input_20m": sharded.shards["source2.output"],
                "labels": sharded.shards["labels_out"]}
    as_folders = {k: sharded.outputs[o] for k, o in
                  (("input_10m", "source1.output"), ("input_20m", "source2.output"),
                   ("labels", "labels_out"))}
    for files in (as_lists, as_folders):
        for streaming in (False, True):
            reader = PatchesImagesReader(files, use_streaming=streaming)
            assert reader.get_size() == single.n_collected
            seen = {}
            for block in reader.iter_blocks(reader.blocks(50)):
                for k, f in enumerate(block["labels"][:, 0, 0, 0].tolist()):
                    seen[f] = (block["input_10m"][k], block["input_20m"][k])
            assert len(seen) == single.n_collected
            for n, f in enumerate(labels.ravel().tolist()):
                np.testing.assert_array_equal(seen[f][0], patches[0][n])
                np.testing.assert_array_equal(seen[f][1], patches[1][n])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"filenames_dict\['x'\]: folder .*empty.* no patches"):
        PatchesImagesReader({"x": empty})


@requires_tensorflow
def test_model_trains_on_shards(rasters, tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    sharded, _, _ = run_sharded(pair(rasters["tiles16"]), uniform_points(400, 9), tmp_path)
    dataset = DatasetFromPatchesImages(filenames_dict={
        "input_10m": sharded.shards["source1.output"],
        "input_20m": sharded.shards["source2.output"],
        "labels": sharded.shards["labels_out"]})

    def prep(sample):
        return {"input_10m": tf.cast(sample["input_10m"], tf.float32) / 200.0,
                "input_20m": tf.cast(sample["input_20m"], tf.float32) / 100.0,
                "labels": tf.reshape(sample["labels"] % 3, [])}

    train = dataset.get_tf_dataset(batch_size=16, preprocessing_fn=prep,
                                   targets_keys=["labels"])
    a = keras.Input((8, 8, 2), name="input_10m")
    b = keras.Input((4, 4, 2), name="input_20m")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    model = keras.Model({"input_10m": a, "input_20m": b}, {"labels": keras.layers.Dense(3)(x)})
    model.compile("adam", {"labels": keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)})
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert sum(1 for _ in train) == sharded.n_collected // 16


@pytest.fixture(scope="module")
def client():
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as lc, distributed.Client(lc) as c:
        yield c


def test_sharded_on_local_cluster_equals_single_file(client, rasters, tmp_path, monkeypatch):
    sources = pair(rasters["strips7"], 4, nodata=37)
    points = uniform_points(4000, 10)
    single, patches, labels = run(sources, points, tmp_path, "one")
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)   # shipped with the task's arguments
    sharded, _, _ = run_sharded(sources, points, tmp_path / "sh", scheduler=client)
    assert len(sharded.shards["source1.output"]) >= 6
    check_same_samples(single, patches, labels, sharded)
    # Not sharded on the cluster: identical single files, in feature order.
    again, again_patches, again_labels = run(sources, points, tmp_path, "dask",
                                             scheduler=client)
    assert (again.n_collected, again.rejected_nodata) == (single.n_collected,
                                                          single.rejected_nodata)
    np.testing.assert_array_equal(again_labels, labels)
    for a, b in zip(again_patches, patches, strict=True):
        np.testing.assert_array_equal(a, b)


def test_nodata_everywhere_in_shards_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    data = np.zeros((1, 85, 95), np.uint16)
    zero = write_raster(tmp_path / "zero.tif", data, Affine(20, 0, L, 0, -20, T), crs=CRS)
    fine = coordinate_raster(tmp_path / "f.tif", 190, 170, Affine(10, 0, L, 0, -10, T),
                             crs=CRS, dtype="uint16")
    sources = [Source(fine, 8, name="source1"), Source(zero, 4, nodata=0, name="source2")]
    with pytest.raises(NoSamplesError, match="source2 rejects"):
        run_sharded(sources, uniform_points(200, 1, margin=100.0), tmp_path / "o")
    assert list((tmp_path / "o").iterdir()) == []


def test_cli_shards_key(rasters, tmp_path, monkeypatch):
    from terrapatch.cli import main
    from terrapatch.vector import write_points

    monkeypatch.setattr(reading, "CLUSTER_BLOCK", 64)
    pts = uniform_points(300, 11)
    vec = write_points(tmp_path / "p.gpkg", pts.x, pts.y, {"class": pts.labels}, crs=CRS)
    fine, coarse = rasters["tiles16"]
    code = main(["PatchesExtraction", "-source1.il", str(fine), "-source1.patchsizex", "8",
                 "-source1.patchsizey", "8", "-source1.out", str(tmp_path / "a.tif"), "uint16",
                 "-source2.il", str(coarse), "-source2.patchsizex", "4", "-source2.patchsizey",
                 "4", "-source2.out", str(tmp_path / "b.tif"), "-vec", str(vec), "-field",
                 "class", "-outlabels", str(tmp_path / "l.tif"), "int32", "-shards", "true",
                 "--quiet"])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a_shards", "b_shards", "l_shards", "p.gpkg"]
    reader = PatchesImagesReader({"a": tmp_path / "a_shards", "b": tmp_path / "b_shards",
                                  "l": tmp_path / "l_shards"})
    assert reader.dtypes["a"] == np.uint16 and reader.get_size() > 200
