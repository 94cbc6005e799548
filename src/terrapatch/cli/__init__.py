"""The ``terrapatch`` command line: OTBTF-style applications and terrapatch's own commands.

``terrapatch PatchesExtraction -source1.il a.tif -source1.patchsizex 16 ...`` runs an
application with OTB's ``-key value`` syntax (``-help`` lists its parameters, with
``source1..sourceN`` groups, N from ``OTB_TF_NSOURCES``). ``terrapatch export ...``
and ``terrapatch demo`` have their own argparse options, in this package
(:mod:`terrapatch.cli.export`, :mod:`terrapatch.cli.demo`). Errors on
bad input print one line on stderr and exit with code 2; SIGINT exits with 130 and
SIGTERM with 143, after one line and the run's clean-up; library warnings become one
``WARNING:`` line each (or none, for those terrapatch handles itself); ``--debug`` shows
tracebacks and the libraries' own output.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from terrapatch.apps import REGISTRY, get_app
from terrapatch.apps._base import sources_from_env
from terrapatch.cli.parsing import CommandParser
from terrapatch.errors import InputError, TerrapatchError
from terrapatch.progress import configure_logging, logger
from terrapatch.writer import failure_reason

__all__ = ["COMMANDS", "CommandParser", "main", "run_app"]

#: terrapatch's own commands → "module:function" taking argv and returning an exit code.
COMMANDS: dict[str, str] = {
    "export": "terrapatch.cli.export:main",
    "demo": "terrapatch.cli.demo:main",
}

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM received (``timeout``, Slurm, Kubernetes, Docker): unwinds like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _warning_line(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """Show a library warning as one ``WARNING:`` line (no source file, no code line)."""
    text = str(message).strip().splitlines()
    logger.warning("%s: %s", category.__name__, text[0] if text else "")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Library warnings as one line each; those terrapatch reports itself, none.

    ``NotGeoreferencedWarning``: terrapatch refuses inputs without georeference in its
    own words, and writes labels images (1 × N, no georeference) on purpose.
    """
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        warnings.showwarning = _warning_line
        yield


def _usage() -> str:
    apps = "\n".join(f"  {name}" for name in REGISTRY)
    commands = "\n".join(f"  {name}" for name in COMMANDS)
    return (
        "usage: terrapatch APPLICATION -key value ... | terrapatch COMMAND [options]\n\n"
        f"OTBTF-compatible applications (terrapatch APP -help):\n{apps}\n\n"
        f"Commands (terrapatch COMMAND --help):\n{commands}\n\n"
        "Global options: --quiet (no progress bars), --debug (tracebacks),\n"
        "  --workers N (local Dask cluster), --dask-scheduler ADDRESS (existing cluster),\n"
        "  --resume (continue an interrupted TensorflowModelServe from its journal),\n"
        "  --device cpu|cuda|auto (where TensorflowModelServe runs the model; default auto)"
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
    device = _pop_option(argv, ("--device", "-device"))
    if any(t in ("-help", "--help", "-h") for t in argv):
        values, _ = cls.parse_argv([t for t in argv if t not in ("-help", "--help", "-h")])
        n = max([sources_from_env()] + [int(k[6:].split(".")[0]) for k in values
                                        if k.startswith("source") and k[6:7].isdigit()])
        print(cls.help_text(n))
        return 0
    values, pixel_types = cls.parse_argv(argv)
    app = cls(values, quiet=quiet, pixel_types=pixel_types, scheduler=scheduler,
              workers=workers, resume=resume, device=device)
    if not app.executed:
        app.execute()
    return 0


def _dispatch(name: str, rest: list[str], quiet: bool) -> int:
    """Run the application or command ``name``; returns its exit code."""
    if name in REGISTRY:
        return run_app(name, rest, quiet)
    if name in COMMANDS:
        module_name, _, attr = COMMANDS[name].partition(":")
        func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), attr)
        return int(func(rest + (["--quiet"] if quiet else [])) or 0)
    print(f"terrapatch: error: unknown application or command {name!r}\n\n{_usage()}",
          file=sys.stderr)
    return EXIT_BAD_INPUT


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
        with contextlib.ExitStack() as stack:
            if not debug:
                stack.enter_context(_quiet_libraries())
            return _dispatch(name, rest, quiet)
    except TerrapatchError as exc:
        if debug:
            raise
        print(f"terrapatch {name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # e.g. `terrapatch APP -help | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # an I/O failure no check foresaw: still one line
        if debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"terrapatch {name}: error: {failure_reason(exc)}{where} (--debug shows where)",
              file=sys.stderr)
        return EXIT_FAILED
    except Terminated:
        print(f"terrapatch {name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"terrapatch {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
