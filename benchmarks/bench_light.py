"""Benchmark: the cost of an ONNX serve with and without TensorFlow installed (light workers).

Serves the seed model fully-convolutionally over a ``--size``² map at 20 m (10 m and
20 m uint16 inputs) in a fresh Python process, and reports for each case the time to
import terrapatch's serving API, the time of the ``serve`` call (model loading
included), the process's total wall time (interpreter start-up included) and its
peak RSS (``VmHWM``, this process only):

- ``onnx_full``: the ``.onnx`` model in the full virtualenv (this interpreter's);
- ``onnx_core``: the same in a core-only virtualenv (``pip install <repo>``, no extras),
  created once under ``bench_out/core_venv`` and reused (reinstalled when the
  sources change); needs the package index, and is reported as missing otherwise;
- ``keras_full`` and ``savedmodel_full``: the same model as ``.keras`` and as a
  SavedModel in the full virtualenv: what TensorFlow costs.

Each case runs ``--repeats`` times; the best of each figure is kept. Prints a
markdown table and ``RESULT light_<case> ...`` lines (``benchmarks/run_all.py``);
:func:`run` returns the figures as a dict.

    python benchmarks/bench_light.py [--size 384] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

# Only the standard library at module level: this file is also the child process,
# run by the core-only interpreter.
import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORE_VENV = ROOT / "bench_out" / "core_venv"
X0, Y0 = 600000.0, 5000000.0
CRS = "EPSG:32631"
CASES = {  # case -> (interpreter, model file)
    "onnx_full": ("full", "seed.onnx"),
    "onnx_core": ("core", "seed.onnx"),
    "keras_full": ("full", "seed.keras"),
    "savedmodel_full": ("full", "seed_savedmodel"),
}


# ---------------------------------------------------------------- child: one serve


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` where unavailable).

    ``ru_maxrss`` is not used on Linux: it may include the parent's peak, inherited
    through fork and exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    scale = 1024 if sys.platform != "darwin" else 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def child(work: Path, model: str) -> None:
    """Serve ``model`` over the rasters of ``work``; print the figures as JSON."""
    start = time.perf_counter()
    from terrapatch.raster import Source
    from terrapatch.serve import serve

    imported = time.perf_counter()
    summary = serve([Source(work / "s20.tif", 8, placeholder="input_20m"),
                     Source(work / "s10.tif", 16, placeholder="input_10m")],
                    work / model, work / f"map_{Path(model).stem}.tif",
                    output_names=["estimated_labels"], fullyconv=True, pixel_type="uint8",
                    quiet=True)
    done = time.perf_counter()
    print(json.dumps({
        "import_s": imported - start, "serve_s": done - imported,
        "peak_rss_mib": peak_rss_mib(), "pixels": summary.width * summary.height,
        "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
        "modules": len(sys.modules),
    }))


# ---------------------------------------------------------------- set-up


def make_inputs(work: Path, size: int) -> None:
    """20 m (6 bands) and 10 m (4 bands) uint16 rasters for a ``size``² output at 20 m."""
    import numpy as np
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    for name, bands, spacing, side in (("s20.tif", 6, 20, size + 7), ("s10.tif", 4, 10,
                                                                        2 * size + 14)):
        path = work / name
        if path.is_file():
            with rasterio.open(path) as ds:
                if ds.width == side:
                    continue
        data = rng.integers(500, 6000, (bands, side, side), dtype=np.uint16)
        with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=bands,
                           dtype="uint16", crs=CRS, tiled=True, compress="deflate",
                           transform=Affine(spacing, 0, X0, 0, -spacing, Y0)) as dst:
            dst.write(data)


MAKE_MODELS = """
import sys
from pathlib import Path
from terrapatch.export import export_model
from terrapatch.testing.models import seed_model
work = Path(sys.argv[1])
seed_model().save(work / "seed.keras")
export_model(work / "seed.keras", savedmodel=work / "seed_savedmodel", onnx=work / "seed.onnx")
"""


def make_models(work: Path) -> None:
    """The seed model as ``.keras``, SavedModel and ``.onnx`` (in a subprocess: TF stays out)."""
    if all((work / m).exists() for _, m in CASES.values()):
        return
    subprocess.run([sys.executable, "-c", MAKE_MODELS, os.fspath(work)], check=True,
                   capture_output=True, text=True)


def _source_stamp() -> str:
    digest = hashlib.sha256()
    for path in [ROOT / "pyproject.toml", *sorted((ROOT / "src").rglob("*"))]:
        if path.is_file() and "egg-info" not in path.as_posix() and "__pycache__" not in \
                path.as_posix():
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def core_python(venv: Path = CORE_VENV) -> Path:
    """Python of a virtualenv with terrapatch's core install only (created or updated).

    Raises
    ------
    RuntimeError
        If the virtualenv cannot be created or the package installed (no index), or if
        TensorFlow ended up in it.
    """
    python = venv / "bin" / "python"
    stamp_file = venv / ".terrapatch-stamp"
    stamp = _source_stamp()
    try:
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", os.fspath(venv)], check=True,
                           capture_output=True, text=True)
        if not stamp_file.is_file() or stamp_file.read_text() != stamp:
            pip = [os.fspath(python), "-m", "pip", "install", "--quiet",
                   "--disable-pip-version-check"]
            # Same version number: force the package itself, then add any new dependency.
            subprocess.run([*pip, "--force-reinstall", "--no-deps", os.fspath(ROOT)],
                           check=True, capture_output=True, text=True)
            subprocess.run([*pip, os.fspath(ROOT)], check=True, capture_output=True,
                           text=True)
            stamp_file.write_text(stamp)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"cannot build the core virtualenv {venv}: {' | '.join(tail)}") from None
    check = subprocess.run([os.fspath(python), "-c",
                            "import importlib.util as u; print(u.find_spec('tensorflow') is None"
                            " and u.find_spec('keras') is None)"],
                           capture_output=True, text=True, check=False)
    if check.stdout.strip() != "True":
        raise RuntimeError(f"the core virtualenv {venv} has TensorFlow or Keras installed")
    return python


def _size_mib(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            file = Path(dirpath, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total / 2**20


def measure(python: Path, work: Path, model: str, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` figures of :func:`child` in fresh processes of ``python``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([os.fspath(python), __file__, "--child", os.fspath(work), model],
                              capture_output=True, text=True, env=env, check=False, cwd=work)
        total = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{python} serving {model} failed: {proc.stderr.strip()[-2000:]}")
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        figures["total_s"] = total
        figures["stderr_lines"] = len([ln for ln in proc.stderr.splitlines() if ln.strip()])
        runs.append(figures)
    best = dict(runs[0])
    for key in ("import_s", "serve_s", "total_s", "peak_rss_mib"):
        best[key] = min(r[key] for r in runs)
    return best


# ---------------------------------------------------------------- driver


def run(work_dir: str | os.PathLike[str], size: int = 384, repeats: int = 3,
        core_venv: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run every case; return ``{"size", "cases": {case: figures}, "venv_mib", "errors"}``.

    Parameters
    ----------
    work_dir
        Directory for the rasters, models and maps (reused when present).
    size
        Output map size in 20 m pixels (inputs: ``size + 7`` at 20 m, twice at 10 m).
    repeats
        Runs per case; the best of each figure is kept.
    core_venv
        Core-only virtualenv (default ``bench_out/core_venv`` in the repository).

    Returns
    -------
    dict
        ``cases`` maps each case of :data:`CASES` that ran to its figures
        (``import_s``, ``serve_s``, ``total_s``, ``peak_rss_mib``, ``tensorflow``,
        ``keras``, ``modules``, ``pixels``); ``errors`` maps the cases that could not
        run to why; ``venv_mib`` gives the size on disk of each virtualenv.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    make_inputs(work, size)
    make_models(work)
    venv = Path(core_venv) if core_venv is not None else CORE_VENV
    pythons: dict[str, Path] = {"full": Path(sys.executable)}
    errors: dict[str, str] = {}
    try:
        pythons["core"] = core_python(venv)
    except RuntimeError as exc:
        errors["onnx_core"] = str(exc)
    cases: dict[str, dict[str, Any]] = {}
    for case, (which, model) in CASES.items():
        if which in pythons:
            cases[case] = measure(pythons[which], work, model, repeats)
    venv_mib = {"full": _size_mib(Path(sys.prefix))}
    if "core" in pythons:
        venv_mib["core"] = _size_mib(venv)
    return {"size": size, "cases": cases, "errors": errors, "venv_mib": venv_mib,
            "cores": os.cpu_count()}


def table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`run`'s result."""
    lines = ["| case | import s | serve s | total s | peak RSS MiB | TensorFlow loaded |",
             "|---|---|---|---|---|---|"]
    for case, f in result["cases"].items():
        lines.append(f"| {case} | {f['import_s']:.2f} | {f['serve_s']:.2f} | "
                     f"{f['total_s']:.2f} | {f['peak_rss_mib']:.0f} | "
                     f"{'yes' if f['tensorflow'] else 'no'} |")
    for case, why in result["errors"].items():
        lines.append(f"| {case} | not run: {why} | | | | |")
    sizes = ", ".join(f"{k} {v:.0f} MiB" for k, v in result["venv_mib"].items())
    lines.append("")
    lines.append(f"Map {result['size']}² px at 20 m, {result['cores']} cores; "
                 f"virtualenvs on disk: {sizes}.")
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark, print the table and RESULT lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=384, help="output size (20 m px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work directory (default: a temporary one)")
    parser.add_argument("--core-venv", type=Path, default=None,
                        help=f"core-only virtualenv (default {CORE_VENV})")
    parser.add_argument("--child", nargs=2, metavar=("WORK", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_light_") as tmp:
        result = run(args.workdir or tmp, size=args.size, repeats=args.repeats,
                     core_venv=args.core_venv)
    print(table(result))
    for case, f in result["cases"].items():
        print(f"RESULT light_{case} size={result['size']}x{result['size']} "
              f"import_s={f['import_s']:.2f} serve_s={f['serve_s']:.2f} "
              f"total_s={f['total_s']:.2f} peak_rss_mib={f['peak_rss_mib']:.0f} "
              f"tensorflow={'yes' if f['tensorflow'] else 'no'}")
    for case, why in result["errors"].items():
        print(f"WARNING: {case} not run: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
