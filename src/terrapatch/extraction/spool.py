"""Patch buffers of one extraction: in memory, or a memory-mapped spool, and chunked reads.

Candidate patches are held in memory up to :data:`MEMMAP_BYTES`, beyond that in a
memory-mapped spool file whose resident pages are released as it fills and which is
read back with plain reads, :data:`WRITE_CHUNK` patches at a time, so memory is bounded
by these buffers and not by the patches of all samples.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from terrapatch.raster import Source

#: Above this many bytes of candidate patches (written sources together), the patches
#: are spooled to memory-mapped temporary files instead of being held in memory.
MEMMAP_BYTES = 128 * 2**20
#: The resident pages of a spool are released whenever patches written to it may have
#: made this many bytes of it resident.
RELEASE_BYTES = 4 * 2**20
#: Patches written per chunk.
WRITE_CHUNK = 4096


def patch_buffers(sources: Sequence[Source], n: int, keep: Sequence[bool],
             tmpdir: str | None) -> list[np.ndarray | None]:
    """One ``(n, bands, ry, rx)`` buffer per kept source, in memory or spooled to ``tmpdir``."""
    shapes = []
    for source in sources:
        rx, ry = source.patch_size  # type: ignore[misc]
        shapes.append((n, source.bands, ry, rx))
    total = sum(int(np.prod(s)) * src.dtype.itemsize
                for s, src, k in zip(shapes, sources, keep, strict=True) if k)
    spool = tmpdir is not None and n > 0 and total > MEMMAP_BYTES
    out: list[np.ndarray | None] = []
    for i, (shape, source) in enumerate(zip(shapes, sources, strict=True)):
        if not keep[i]:
            out.append(None)
        elif spool:
            path = Path(tmpdir) / f"patches-{i}.npy"  # type: ignore[arg-type]
            out.append(np.lib.format.open_memmap(path, mode="w+", dtype=source.dtype,
                                                 shape=shape))
        else:
            out.append(np.empty(shape, dtype=source.dtype))
    return out


_SPOOL_LOCK = threading.Lock()


def scatter(buffer: np.ndarray, index: np.ndarray, patches: np.ndarray) -> None:
    """``buffer[index] = patches``; into a spool, in slices releasing its pages after each.

    Scattered records touch up to one page each, however small they are: a slice makes
    at most :data:`RELEASE_BYTES` of the spool resident.
    """
    if not isinstance(buffer, np.memmap):
        buffer[index] = patches
        return
    record = buffer.dtype.itemsize * int(np.prod(buffer.shape[1:]))
    step = max(1, RELEASE_BYTES // (record + mmap.PAGESIZE))
    for a in range(0, len(index), step):
        with _SPOOL_LOCK:  # concurrent faults would outrun the releases
            buffer[index[a:a + step]] = patches[a:a + step]
            release(buffer)


def release(buffer: np.ndarray | None) -> None:
    """Drop the resident pages of a spool (its data stays in the file); no-op in memory.

    ``MADV_DONTNEED`` on a shared file mapping keeps written data (the pages are the
    file's page cache): later accesses fault the same contents back in. numpy keeps the
    mapping of an ``np.memmap`` in its ``_mmap`` attribute; without it (or without
    ``madvise``) nothing is released and the pages are left to the OS.
    """
    handle = getattr(buffer, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if isinstance(handle, mmap.mmap) and advice is not None and hasattr(handle, "madvise"):
        handle.madvise(advice)



def buffer_chunks(buffer: np.ndarray, positions: np.ndarray) -> Iterator[np.ndarray]:
    """The patches at ``positions`` (ascending), as planar chunks ``(bands, k, ry, rx)``.

    :data:`WRITE_CHUNK` patches at a time. A spool is read with plain reads of each run
    of consecutive records, not through its mapping: a read fault maps whole page-cache
    folios around it, which would make far more of it resident than the chunk.
    """
    if not isinstance(buffer, np.memmap) or buffer.filename is None:
        for a in range(0, len(positions), WRITE_CHUNK):
            records = buffer[positions[a:a + WRITE_CHUNK]]
            yield np.ascontiguousarray(records.transpose(1, 0, 2, 3))
        return
    with open(buffer.filename, "rb", buffering=0) as f:
        for a in range(0, len(positions), WRITE_CHUNK):
            records = _read_records(f.fileno(), buffer, positions[a:a + WRITE_CHUNK])
            yield np.ascontiguousarray(records.transpose(1, 0, 2, 3))


def _read_records(fd: int, spool: np.memmap, index: np.ndarray) -> np.ndarray:
    """``spool[index]`` (ascending ``index``) read from its file, one read per run."""
    out = np.empty((len(index), *spool.shape[1:]), dtype=spool.dtype)
    record = out.itemsize * int(np.prod(out.shape[1:]))
    cuts = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
    for a, b in itertools.pairwise([0, *cuts, len(index)]):
        view = memoryview(out[a:b]).cast("B")  # type: ignore[arg-type]
        offset, done = int(spool.offset) + int(index[a]) * record, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"spool {spool.filename!r}: short read at {offset + done}")
            done += got
    return out


def array_chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    """``values`` as planar 1 × 1 patches ``(1, k, 1, 1)``, :data:`WRITE_CHUNK` at a time."""
    for a in range(0, len(values), WRITE_CHUNK):
        yield values[a:a + WRITE_CHUNK].reshape(1, -1, 1, 1)
