"""The resume journal: which blocks of a map are finished, tied by hashes to what made them.

A block sink records every finished block in ``journal.jsonl`` inside the output's
pending folder: a header line with the output path and one hash per part of the
run (inputs, model, parameters, terrapatch version), then one line per block
(index, file, size). Each line is flushed and synced before the next block is
counted, and a torn last line (``kill -9`` while writing it) is ignored, so the
journal never claims a block whose file is incomplete. A rerun with
``resume=True`` refuses a journal whose header differs, naming what changed, and
recomputes only the blocks it does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terrapatch.errors import InputError
from terrapatch.writer import cannot_write

__all__ = ["JOURNAL_NAME", "BlockStatus", "Journal", "fingerprint", "hash_files"]

JOURNAL_NAME = "journal.jsonl"
#: Version of the journal's format.
JOURNAL_FORMAT = 1


@dataclass(frozen=True)
class BlockStatus:
    """What a finished block reports (all a cluster client receives of it).

    Attributes
    ----------
    index
        Block index in the plan.
    name
        Block file name inside the pending folder's ``blocks/``.
    size
        Bytes of the block file.
    read_seconds, compute_seconds, write_seconds
        Time spent reading inputs, in the model, and writing the block.
    skipped
        Tiles of the block filled with the background (input entirely nodata).
    """

    index: int
    name: str
    size: int
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    skipped: int = 0


def fingerprint(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted), as hex."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_files(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and contents of files, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class Journal:
    """The journal of one output's pending folder.

    Parameters
    ----------
    folder
        The pending folder.
    output
        Absolute path of the final output.
    parts
        Hash of each part of the run: ``inputs``, ``model``, ``parameters``, ``version``.
    resume
        Read an existing journal (refusing a mismatch) instead of starting a new one.

    Raises
    ------
    InputError
        When resuming from a journal written for another output, or whose inputs,
        model, parameters or terrapatch version differ.
    """

    def __init__(self, folder: Path, output: Path, parts: Mapping[str, str],
                 resume: bool) -> None:
        self.path = folder / JOURNAL_NAME
        self.output = output
        self.parts = dict(parts)
        self.done: dict[int, BlockStatus] = {}
        existing = self.path.exists() and resume
        if existing:
            self._load()
        try:
            self._handle = open(self.path, "a" if existing else "w", encoding="utf-8")
            if not existing:
                self._append({"journal": JOURNAL_FORMAT, "output": os.fspath(output),
                              "parts": self.parts})
        except OSError as exc:
            raise cannot_write(exc, output, "out") from exc

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:  # torn line of a killed run: the block is recomputed
                continue
        header = records[0] if records and "journal" in records[0] else None
        if header is None:
            raise InputError(f"resume: {os.fspath(self.path)!r} is not a terrapatch journal; "
                             "rerun without --resume to start over")
        if header.get("output") != os.fspath(self.output):
            raise InputError(
                f"resume: the journal {os.fspath(self.path)!r} belongs to another output "
                f"({header.get('output')!r}, not {os.fspath(self.output)!r}); rerun without "
                "--resume to start over"
            )
        old = header.get("parts", {})
        changed = [k for k in self.parts if old.get(k) != self.parts[k]]
        if changed:
            raise InputError(
                f"resume: the unfinished run of {os.fspath(self.output)!r} used other "
                f"{' and '.join(changed)}; terrapatch never mixes blocks of different runs: "
                "rerun without --resume to start over"
            )
        folder = self.path.parent / "blocks"
        for record in records[1:]:
            if "block" not in record:
                continue
            status = BlockStatus(int(record["block"]), str(record["file"]), int(record["size"]))
            file = folder / status.name
            if file.is_file() and file.stat().st_size == status.size:
                self.done[status.index] = status

    def _append(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def record(self, status: BlockStatus) -> None:
        """Count a finished block (its file is complete under its final name)."""
        try:
            self._append({"block": status.index, "file": status.name, "size": status.size})
        except OSError as exc:
            raise cannot_write(exc, self.output, "out") from exc
        self.done[status.index] = status

    def close(self) -> None:
        """Close the journal file."""
        self._handle.close()
