"""Atomic outputs and locks: every file terrapatch writes appears complete, or not at all.

Each output has a pending folder ``.NAME.pending/`` beside it (:class:`PendingOutput`): the
output is written inside it and renamed to its name when complete. The folder's ``lock``
(an ``flock`` held by the writing process, holding its PID) refuses a second run on the
same output, and the leftovers of a dead run (kill -9, a crash, a power cut) are known by
the folder's name and its free lock, and removed by the next run. :func:`atomic_output`,
:func:`atomic_directory` and :func:`output_group` (several outputs committed together)
are built on it. A run that claims its outputs before any work (:func:`claimed`, through
:func:`terrapatch.writer.claim_outputs`) holds their folders until it ends, and these
helpers, called by that run's thread, write into the claimed folders.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from terrapatch.errors import OutputError, TerrapatchError
from terrapatch.progress import logger

#: Suffix of an output's pending folder (``a.tif`` → ``.a.tif.pending/``).
PENDING_SUFFIX = ".pending"
#: Bytes a file name needs around it for its pending folder's name.
NAME_OVERHEAD = 1 + len(PENDING_SUFFIX)

#: Pending folders held by this process → their holder.
_ACTIVE: dict[Path, PendingOutput] = {}
#: Outputs claimed by a run of this process → (the run's thread, its pending folder).
_CLAIMED: dict[Path, tuple[int, PendingOutput]] = {}
_REGISTRY_LOCK = threading.Lock()


def pending_folder(path: str | os.PathLike[str]) -> Path:
    """The pending folder of output ``path``: ``dir/a.tif`` → ``dir/.a.tif.pending``."""
    target = Path(os.path.abspath(path))
    return target.with_name(f".{target.name}{PENDING_SUFFIX}")


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_writable(path: str | os.PathLike[str], parameter: str,
                   directory: bool = False) -> Path:
    """Fail early, naming ``parameter``, when ``path`` cannot be written.

    With ``directory``, ``path`` may be an existing folder (one that will be replaced).
    A name too long for the file system, with the room the pending folder needs, is an
    error too.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        is_dir, parent_is_dir = target.is_dir(), parent.is_dir()
    except OSError as exc:  # ENAMETOOLONG, ELOOP
        raise cannot_write(exc, path, parameter) from None
    if is_dir and not directory:
        raise OutputError(f"{parameter}: {os.fspath(path)!r} is a directory, not a file name")
    if directory and not is_dir and os.path.lexists(target):
        raise OutputError(f"{parameter}: {os.fspath(path)!r} exists and is not a folder")
    if not parent_is_dir:
        raise OutputError(f"{parameter}: directory {os.fspath(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parameter}: directory {os.fspath(parent)!r} is not writable")
    size, limit = len(os.fsencode(target.name)), _name_max(parent)
    if size + NAME_OVERHEAD > limit:
        raise OutputError(
            f"{parameter}: file name {target.name[:24] + '…'!r} is too long ({size} bytes; "
            f"at most {limit - NAME_OVERHEAD} here, where terrapatch needs room for its "
            "pending folder)"
        )
    return target


def current_umask() -> int:
    """The process umask, read without changing it (os.umask is racy with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def failure_reason(exc: BaseException) -> str:
    """The first line of why an I/O operation failed.

    GDAL's generic "Read/Write failed. See previous exception" is replaced by the cause
    it chains (e.g. "File too large", "No space left on device", libtiff's message on a
    truncated file); an OS error gives its reason without the file name (a temporary's).
    """
    seen = exc
    reason = seen.strerror if isinstance(seen, OSError) and seen.strerror else str(seen)
    while "previous exception" in reason and (seen.__cause__ or seen.__context__):
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        reason = seen.strerror if isinstance(seen, OSError) and seen.strerror else str(seen)
    return reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__


def cannot_write(exc: BaseException, path: str | os.PathLike[str], parameter: str) -> OutputError:
    """The one-line error for an I/O failure ``exc`` while writing the output ``path``."""
    return OutputError(f"{parameter}: cannot write {os.fspath(path)!r} ({failure_reason(exc)})")


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an I/O failure of GDAL or the OS (not one of terrapatch's errors)."""
    from rasterio.errors import RasterioError

    return isinstance(exc, OSError | RasterioError) and not isinstance(exc, TerrapatchError)


class PendingOutput:
    """The locked pending folder of one output; commits the finished output to its name.

    Parameters
    ----------
    path
        Final output path.
    resume
        Keep what the folder holds (the state of an interrupted run) instead of
        clearing it, and keep it when this run fails.
    parameter
        Name of the output parameter in messages.
    directory
        The output is a folder (an existing one is replaced when committed).

    Raises
    ------
    OutputError
        If another live run holds the folder, or it cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], resume: bool = False,
                 parameter: str = "out", directory: bool = False) -> None:
        self.target = Path(os.path.abspath(check_writable(path, parameter, directory)))
        self.resume = resume
        self.parameter = parameter
        self.dir = pending_folder(self.target)
        self._lock: int | None = None

    def __enter__(self) -> PendingOutput:
        try:
            self.dir.mkdir(exist_ok=True)
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise cannot_write(exc, self.target, self.parameter) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"{self.parameter}: another terrapatch run (pid {owner}) is writing "
                    f"{os.fspath(self.target)!r} (lock {os.fspath(self.dir / 'lock')!r}); "
                    "wait for it or stop it"
                ) from None
            raise cannot_write(exc, self.target, self.parameter) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._lock = fd
        stale = [p for p in self.dir.iterdir() if p.name != "lock"]
        if stale and not self.resume:
            logger.info("removing the leftovers of an earlier run on %s", self.target)
            for item in stale:
                _remove(item)
        _remove_legacy_leftovers(self.target)
        with _REGISTRY_LOCK:
            _ACTIVE[self.dir] = self
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with _REGISTRY_LOCK:
            _ACTIVE.pop(self.dir, None)
        keep = exc is not None and self.resume and any(
            p.name not in ("lock",) for p in self.dir.iterdir())
        try:
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                for item in self.dir.glob("*.part*"):
                    _remove(item)
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
        if exc is not None and keep:
            logger.warning("%s: interrupted; the finished blocks are kept in %s: rerun with "
                           "--resume (resume=True) to compute only the missing ones",
                           self.target.name, self.dir)

    def file(self, name: str) -> Path:
        """A path inside the pending folder."""
        return self.dir / name

    def commit(self, finished: Path, sidecars: tuple[str, ...] = ()) -> None:
        """Move a finished file of the pending folder to the output's name.

        ``sidecars`` are suffixes of files that go with it (``(".aux.xml",)``: a map's
        legend, see :mod:`terrapatch.writer.legend`): each ``finished + suffix`` is moved
        to ``target + suffix`` first, and a stale ``target + suffix`` of an earlier run
        is removed when this run has none.
        """
        try:
            for suffix in sidecars:
                extra, old = Path(f"{finished}{suffix}"), Path(f"{self.target}{suffix}")
                if extra.exists():
                    os.chmod(extra, 0o666 & ~current_umask())
                    os.replace(extra, old)
                elif old.exists():
                    old.unlink()
            os.chmod(finished, 0o666 & ~current_umask())
            os.replace(finished, self.target)
        except OSError as exc:
            raise cannot_write(exc, self.target, self.parameter) from exc

    def commit_folder(self, finished: Path, name: str) -> Path:
        """Move a finished folder beside the output as ``name``, replacing an old one.

        The old folder is removed only once the new one is in place.
        """
        final = self.target.with_name(name)
        old = None
        try:
            os.chmod(finished, 0o777 & ~current_umask())
            if final.exists():
                old = self.dir / "previous"
                os.replace(final, old)
            try:
                os.replace(finished, final)
            except BaseException:
                if old is not None:
                    os.replace(old, final)
                raise
        except OSError as exc:
            raise cannot_write(exc, final, self.parameter) from exc
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


#: Temporaries that terrapatch versions before pending folders left beside an output
#: ``NAME`` (stem ``STEM``) when killed: ``atomic_output``, ``atomic_directory``,
#: ``output_group`` and ``write_points`` names.
_LEGACY = (".{name}.*.part*", ".{name}.*.old", ".{stem}.????????.pending*", ".{name}.????????")


def _remove_legacy_leftovers(target: Path) -> None:
    """Remove what an older, killed terrapatch left beside ``target`` (its lock is ours now)."""
    name, stem = glob.escape(target.name), glob.escape(target.stem)
    for pattern in _LEGACY:
        for item in glob.glob(os.path.join(glob.escape(os.fspath(target.parent)),
                                           pattern.format(name=name, stem=stem))):
            if not item.endswith(PENDING_SUFFIX):  # never another output's pending folder
                _remove(Path(item))


@contextlib.contextmanager
def claimed(path: str | os.PathLike[str], parameter: str = "out",
            directory: bool = False) -> Iterator[PendingOutput]:
    """Hold the pending folder of ``path`` for a whole run (see :func:`claim_outputs`).

    :func:`atomic_output`, :func:`atomic_directory` and :func:`output_group`, called by
    this thread for ``path``, write into this folder instead of locking their own.
    """
    with PendingOutput(path, parameter=parameter, directory=directory) as pending:
        with _REGISTRY_LOCK:
            _CLAIMED[pending.target] = (threading.get_ident(), pending)
        try:
            yield pending
        finally:
            with _REGISTRY_LOCK:
                _CLAIMED.pop(pending.target, None)


@contextlib.contextmanager
def _pending_for(path: str | os.PathLike[str], parameter: str,
                 directory: bool = False) -> Iterator[PendingOutput]:
    """The pending folder this thread's run claimed for ``path``, or a new locked one."""
    target = Path(os.path.abspath(check_writable(path, parameter, directory)))
    with _REGISTRY_LOCK:
        claim = _CLAIMED.get(target)
    if claim is not None and claim[0] == threading.get_ident():
        yield claim[1]
        return
    with PendingOutput(path, parameter=parameter, directory=directory) as pending:
        yield pending


def is_staged(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in a pending folder this process holds (it is already staged)."""
    folder = Path(os.path.abspath(path)).parent
    with _REGISTRY_LOCK:
        return folder in _ACTIVE


def final_path(path: str | os.PathLike[str]) -> Path:
    """The output a staged path will become (``dir/.a.tif.pending/a.tif`` → ``dir/a.tif``)."""
    staged = Path(path)
    return staged.parent.parent / staged.name if is_staged(staged) else staged


def _family(staged: Path) -> list[Path]:
    """A staged file and its sidecars (``a.shp`` → ``a.dbf``, ``a.tif`` → ``a.tif.aux.xml``)."""
    if not staged.parent.is_dir():
        return []
    prefix = staged.stem + "."
    return [p for p in staged.parent.iterdir()
            if p.name == staged.name or (p.name.startswith(prefix) and p.is_file())]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], parameter: str = "out") -> Iterator[Path]:
    """Yield a pending path for ``path``; rename it to ``path`` only on success.

    On any exception (including KeyboardInterrupt) the pending file is removed and
    the final path is left untouched; I/O failures (disk full, permission) become an
    :class:`OutputError` naming ``parameter``. The file gets the usual permissions
    (``0o666`` minus the umask), not the private mode of temporary files. A path that is
    already staged (in a pending folder of this process) is written where it is.
    """
    if is_staged(path):
        staged = Path(path)
        try:
            yield staged
        except BaseException as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            if is_write_failure(exc):  # named as the user's output, not the staged file
                raise cannot_write(exc, final_path(staged), parameter) from exc
            raise
        return
    with _pending_for(path, parameter) as pending:
        tmp = pending.file(pending.target.name)
        try:
            yield tmp
            for sidecar in (".aux.xml",):
                leftover = Path(str(tmp) + sidecar)
                if leftover.exists():
                    leftover.unlink()
            pending.commit(tmp)
        except BaseException as exc:
            for item in _family(tmp):
                _remove(item)
            if is_write_failure(exc):
                raise cannot_write(exc, path, parameter) from exc
            raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], parameter: str = "out") -> Iterator[Path]:
    """Yield a pending directory for ``path``; move it to ``path`` on success.

    An existing directory at ``path`` is replaced only once the new one is complete.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{parameter}: {os.fspath(path)!r} exists and is not a directory")
    with _pending_for(path, parameter, directory=True) as pending:
        tmp = pending.file(pending.target.name)
        try:
            tmp.mkdir()
            yield tmp
            pending.commit_folder(tmp, pending.target.name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_write_failure(exc):
                raise cannot_write(exc, path, parameter) from exc
            raise


@contextlib.contextmanager
def output_group() -> Iterator[Callable[..., Path]]:
    """Commit several outputs together: all appear under their final names, or none does.

    Yields ``stage(path, parameter="out") -> pending_path``: write each output to its
    pending path (in the output's pending folder, same name). When the block ends
    without error every pending file (and its sidecars, e.g. a shapefile's ``.dbf``) is
    renamed to its final name; on error they are all removed, and I/O failures become an
    :class:`OutputError` naming the output's parameter. A path that is already staged is
    returned as it is (whoever staged it commits it).
    """
    staged: list[tuple[PendingOutput, Path, str]] = []
    named: list[tuple[Path, str]] = []  # every output staged here, for the error's name
    with contextlib.ExitStack() as stack:

        def stage(path: str | os.PathLike[str], parameter: str = "out") -> Path:
            if is_staged(path):
                named.append((final_path(path), parameter))
                return Path(path)
            pending = stack.enter_context(_pending_for(path, parameter))
            tmp = pending.file(pending.target.name)
            staged.append((pending, tmp, parameter))
            named.append((pending.target, parameter))
            return tmp

        current: tuple[Path, str] | None = None
        try:
            yield stage
            for pending, tmp, parameter in staged:
                current = (pending.target, parameter)
                family = _family(tmp)
                for item in family:
                    os.chmod(item, 0o666 & ~current_umask())
                for item in family:
                    os.replace(item, pending.target.with_name(
                        pending.target.stem + item.name[len(tmp.stem):]))
        except BaseException as exc:
            for _, tmp, _ in staged:
                for item in _family(tmp):
                    _remove(item)
            if is_write_failure(exc):  # while writing: the output staged last
                where = current or (named[-1] if named else (Path("output"), "out"))
                raise cannot_write(exc, *where) from exc
            raise
