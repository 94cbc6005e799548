"""The ``terrapatch`` command line: OTBTF-style applications and terrapatch's own commands.

``terrapatch PatchesExtraction -source1.il a.tif -source1.patchsizex 16 ...`` runs an
application with OTB's ``-key value`` syntax (``-help`` lists its parameters, with
``source1..sourceN`` groups, N from ``OTB_TF_NSOURCES``). ``terrapatch export ...``
and other commands have their own argparse options. Errors on bad input print one
line on stderr and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from terrapatch.apps import REGISTRY, get_app
from terrapatch.apps._base import sources_from_env
from terrapatch.errors import InputError, TerrapatchError
from terrapatch.progress import configure_logging

#: terrapatch's own commands → "module:function" taking argv and returning an exit code.
COMMANDS: dict[str, str] = {
    "export": "terrapatch.export:main",
    "demo": "terrapatch.demo:main",
}

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM received (``timeout``, Slurm, Kubernetes, Docker): unwinds like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _usage() -> str:
    apps = "\n".join(f"  {name}" for name in REGISTRY)
    commands = "\n".join(f"  {name}" for name in COMMANDS)
    return (
        "usage: terrapatch APPLICATION -key value ... | terrapatch COMMAND [options]\n\n"
        f"OTBTF-compatible applications (terrapatch APP -help):\n{apps}\n\n"
        f"Commands (terrapatch COMMAND --help):\n{commands}\n\n"
        "Global options: --quiet (no progress bars), --debug (tracebacks),\n"
        "  --workers N (local Dask cluster), --dask-scheduler ADDRESS (existing cluster),\n"
        "  --resume (continue an interrupted TensorflowModelServe from its journal)"
    )


def _pop_option(argv: list[str], names: tuple[str, ...]) -> str | None:
    """Remove ``--name VALUE`` from argv and return VALUE (None when absent)."""
    for name in names:
        if name in argv:
            i = argv.index(name)
            if i + 1 >= len(argv):
                raise InputError(f"{name}: missing value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
    return None


def run_app(name: str, argv: Sequence[str], quiet: bool) -> int:
    """Run the OTBTF-style application ``name`` with OTB command-line tokens.

    ``--workers N`` (local Dask cluster) and ``--dask-scheduler ADDRESS`` are passed to
    applications that can run on a cluster, ``--resume`` to those that can resume.
    """
    cls = get_app(name)
    argv = list(argv)
    resume = any(t in ("--resume", "-resume") for t in argv)
    argv = [t for t in argv if t not in ("--resume", "-resume")]
    scheduler = _pop_option(argv, ("--dask-scheduler", "-dask-scheduler"))
    workers_text = _pop_option(argv, ("--workers", "-workers"))
    try:
        workers = None if workers_text is None else int(workers_text)
    except ValueError:
        raise InputError(f"--workers: {workers_text!r} is not an integer") from None
    if workers is not None and workers < 1:
        raise InputError(f"--workers: {workers} must be ≥ 1")
    if any(t in ("-help", "--help", "-h") for t in argv):
        values, _ = cls.parse_argv([t for t in argv if t not in ("-help", "--help", "-h")])
        n = max([sources_from_env()] + [int(k[6:].split(".")[0]) for k in values
                                        if k.startswith("source") and k[6:7].isdigit()])
        print(cls.help_text(n))
        return 0
    values, pixel_types = cls.parse_argv(argv)
    app = cls(values, quiet=quiet, pixel_types=pixel_types, scheduler=scheduler,
              workers=workers, resume=resume)
    if not app.executed:
        app.execute()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``terrapatch`` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or "-debug" in args
    quiet = "--quiet" in args or "-quiet" in args
    args = [a for a in args if a not in ("--debug", "-debug", "--quiet", "-quiet")]
    if not args or args[0] in ("-h", "--help", "-help", "help"):
        print(_usage())
        return 0 if args else EXIT_BAD_INPUT
    name, rest = args[0], args[1:]
    configure_logging(quiet=quiet, debug=debug)
    if not debug:
        # GDAL's and libtiff's own lines ("_tiffWriteProc: ...") reach stderr through
        # Python's last-resort handler; the error terrapatch raises already says it.
        logging.getLogger("rasterio").addHandler(logging.NullHandler())
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if name in REGISTRY:
            return run_app(name, rest, quiet)
        if name in COMMANDS:
            module_name, _, attr = COMMANDS[name].partition(":")
            func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), attr)
            return int(func(rest + (["--quiet"] if quiet else [])) or 0)
        print(f"terrapatch: error: unknown application or command {name!r}\n\n{_usage()}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except TerrapatchError as exc:
        if debug:
            raise
        print(f"terrapatch {name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated:
        print(f"terrapatch {name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"terrapatch {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `terrapatch APP -help | head`
        sys.stderr.close()
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
