"""Run every benchmark in this folder and write one table of their RESULT lines.

Each ``bench_*.py`` script prints lines ``RESULT <name> key=value ...``; this
runner collects them into ``benchmarks/RESULTS.md`` with the machine they ran on.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """One line describing this machine."""
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:  # pragma: no cover
        mem = "? GiB"
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem} RAM, Python {platform.python_version()}"


def main() -> int:
    """Run the benchmarks, print their output and write RESULTS.md."""
    rows: list[tuple[str, str]] = []
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
        print(proc.stdout, end="")
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            failed.append(script.name)
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                _, name, *figures = line.split()
                rows.append((name, ", ".join(f.replace("=", " = ") for f in figures)))
        print(f"   ({time.perf_counter() - start:.0f} s)")
    table = ["| benchmark | figures |", "|---|---|", *[f"| {n} | {f} |" for n, f in rows]]
    text = (f"# Benchmark results\n\nMachine: {machine()}  \n"
            f"Date: {time.strftime('%Y-%m-%d')}\n\n" + "\n".join(table) + "\n")
    (HERE / "RESULTS.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
