"""The samples of several patches images, one list of files per key, read as one set.

:class:`PatchesImagesReader` reads the patches images of several sources (sample ``n``
at index ``n`` in every source, files of one key concatenated), checks that the
counts agree, and gives random access, blocks of consecutive samples and per-band
statistics, either fully in memory or lazily (streaming, bounded memory). The
training datasets of :mod:`terrapatch.dataset` and :mod:`terrapatch.pytorch` read
through it; the layout of one patches image is owned by :mod:`terrapatch.patches`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from terrapatch.errors import InputError
from terrapatch.patches import PatchesInfo, read_patches, read_patches_info

__all__ = ["PatchesImagesReader", "SampleBlock"]

log = logging.getLogger("terrapatch.dataset")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SampleBlock:
    """Consecutive samples ``start … start+count-1`` of file number ``file_index``."""

    file_index: int
    start: int
    count: int


def _as_file_list(key: str, value: Any) -> list[PathLike]:
    """The patches images of one key: a file, a list of files, or a folder of shards."""
    if isinstance(value, str | os.PathLike):
        if Path(value).is_dir():
            return _folder_files(key, Path(value))
        return [value]
    if not isinstance(value, Sequence) or not value:
        raise InputError(
            f"filenames_dict[{key!r}]: expected a non-empty list of patches images, "
            f"got {value!r}"
        )
    for item in value:
        if not isinstance(item, str | os.PathLike):
            raise InputError(f"filenames_dict[{key!r}]: {item!r} is not a file name")
    return list(value)


def _folder_files(key: str, folder: Path) -> list[PathLike]:
    """The ``.tif`` / ``.tiff`` files of a folder (e.g. extraction shards), in name order."""
    files: list[PathLike] = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".tif", ".tiff")
    ]
    if not files:
        raise InputError(
            f"filenames_dict[{key!r}]: folder {os.fspath(folder)!r} holds no patches image "
            "(.tif)"
        )
    return files


class _OpenFiles:
    """Open datasets of every source file for one pass, closed together."""

    def __init__(self, infos: Mapping[str, list[PatchesInfo]]) -> None:
        self._infos = infos
        self._handles: dict[str, list[Any]] = {}
        try:
            for key, infos_of_key in infos.items():
                self._handles[key] = [rasterio.open(info.path) for info in infos_of_key]
        except BaseException:
            self.close()
            raise

    def read(self, key: str, block: SampleBlock) -> np.ndarray:
        """Read ``block`` of source ``key`` as ``(count, rows, cols, bands)``."""
        info = self._infos[key][block.file_index]
        psx, psy = info.patch_size_x, info.patch_size_y
        data = self._handles[key][block.file_index].read(
            window=Window(0, block.start * psy, psx, block.count * psy)
        )
        return np.asarray(data.reshape(info.bands, block.count, psy, psx).transpose(1, 2, 3, 0))

    def close(self) -> None:
        for handles in self._handles.values():
            for handle in handles:
                handle.close()
        self._handles = {}

    def __enter__(self) -> _OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PatchesImagesReader:
    """Read the patches images of several sources as aligned samples.

    Parameters
    ----------
    filenames_dict
        ``{source_key: [patches image, ...]}``. Every key lists the same number of
        files; file ``i`` of every key holds the same number of patches (samples
        ``n`` of every source belong together). A single file name is accepted in
        place of a one-element list, and a folder (such as the shard folder of a
        sharded extraction, :attr:`terrapatch.ExtractionSummary.shards`) in place of
        the list of its ``.tif`` files in name order.
    use_streaming
        False: read every file into memory now. True: read patches lazily from disk
        when asked (bounded memory).

    Raises
    ------
    InputError
        If the dict is empty, a key lists a different number of files or patches than
        the others (the message lists the counts per key and file), a file is not a
        patches image, or the files of one key differ in patch shape or pixel type.
    MissingInputError
        If a file does not exist.

    Notes
    -----
    The patch size is read from each file's terrapatch metadata; files without it
    (written by OTBTF) are read with OTBTF's square-patch assumption.
    """

    def __init__(self, filenames_dict: Mapping[str, Any], use_streaming: bool = False) -> None:
        if not isinstance(filenames_dict, Mapping) or not filenames_dict:
            raise InputError(
                "filenames_dict: expected a non-empty dict {source_key: [files...]}, "
                f"got {filenames_dict!r}"
            )
        files = {str(key): _as_file_list(str(key), value)
                 for key, value in filenames_dict.items()}
        n_files = {key: len(paths) for key, paths in files.items()}
        if len(set(n_files.values())) > 1:
            listing = ", ".join(f"{key}: {n}" for key, n in n_files.items())
            raise InputError(
                f"filenames_dict: every source must list the same number of patches "
                f"images; got {listing}"
            )
        self.infos: dict[str, list[PatchesInfo]] = {
            key: [read_patches_info(path, parameter=f"filenames_dict[{key!r}]")
                  for path in paths]
            for key, paths in files.items()
        }
        self._check_counts()
        for key, infos in self.infos.items():
            first = infos[0]
            for info in infos[1:]:
                if info.patch_shape != first.patch_shape or info.dtype != first.dtype:
                    raise InputError(
                        f"filenames_dict[{key!r}]: {os.fspath(info.path)!r} holds "
                        f"{info.patch_shape} {info.dtype} patches but "
                        f"{os.fspath(first.path)!r} holds {first.patch_shape} {first.dtype}"
                    )
        self.use_streaming = bool(use_streaming)
        first_key = next(iter(self.infos))
        self.file_sizes: list[int] = [info.n_patches for info in self.infos[first_key]]
        self.size: int = int(sum(self.file_sizes))
        self._file_starts = np.concatenate([[0], np.cumsum(self.file_sizes)]).astype(np.int64)
        self.patch_shapes: dict[str, tuple[int, int, int]] = {
            key: infos[0].patch_shape for key, infos in self.infos.items()
        }
        self.dtypes: dict[str, np.dtype] = {
            key: infos[0].dtype for key, infos in self.infos.items()
        }
        self._arrays: dict[str, np.ndarray] | None = None
        if not self.use_streaming:
            self._arrays = {
                key: np.concatenate([read_patches(info.path, info=info) for info in infos])
                if len(infos) > 1 else read_patches(infos[0].path, info=infos[0])
                for key, infos in self.infos.items()
            }

    def _check_counts(self) -> None:
        counts = {key: [info.n_patches for info in infos] for key, infos in self.infos.items()}
        reference = next(iter(counts.values()))
        if all(c == reference for c in counts.values()):
            if sum(reference) == 0:
                raise InputError("filenames_dict: the patches images hold no patch")
            return
        parts = []
        for key, infos in self.infos.items():
            per_file = ", ".join(f"{os.fspath(i.path)}={i.n_patches}" for i in infos)
            parts.append(f"{key}: {per_file} (total {sum(counts[key])})")
        raise InputError(
            "filenames_dict: every source must hold the same number of patches, file by "
            "file; got " + "; ".join(parts)
        )

    @property
    def keys(self) -> list[str]:
        """Source keys, in the order of ``filenames_dict``."""
        return list(self.infos)

    def get_size(self) -> int:
        """Return the number of samples."""
        return self.size

    def _locate(self, index: int) -> tuple[int, int]:
        if isinstance(index, bool) or not 0 <= int(index) < self.size:
            raise InputError(f"index: {index!r} outside [0, {self.size})")
        file_index = int(np.searchsorted(self._file_starts, index, side="right") - 1)
        return file_index, int(index - self._file_starts[file_index])

    def get_sample(self, index: int) -> dict[str, np.ndarray]:
        """Return sample ``index`` as ``{key: array (rows, cols, bands)}`` in the files' dtype."""
        if self._arrays is not None:
            self._locate(index)
            return {key: array[int(index)] for key, array in self._arrays.items()}
        file_index, offset = self._locate(index)
        with _OpenFiles(self.infos) as files:
            return {key: files.read(key, SampleBlock(file_index, offset, 1))[0].copy()
                    for key in self.keys}

    def read_samples(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Return samples ``indices`` (in that order) as ``{key: (n, rows, cols, bands)}``.

        When streaming, runs of consecutive indices of one file are read with one
        window read per source.
        """
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.size):
            bad = index[(index < 0) | (index >= self.size)][0]
            raise InputError(f"index: {int(bad)} outside [0, {self.size})")
        if self._arrays is not None:
            return {key: array[index] for key, array in self._arrays.items()}
        order = np.argsort(index, kind="stable")
        wanted = index[order]
        files = np.searchsorted(self._file_starts, wanted, side="right") - 1
        # A new run starts where the index is not the previous one + 1 or the file changes.
        starts = np.flatnonzero(np.r_[True, (np.diff(wanted) != 1) | (np.diff(files) != 0)])
        ends = np.r_[starts[1:], wanted.size]
        blocks = [SampleBlock(int(files[a]), int(wanted[a] - self._file_starts[files[a]]),
                         int(b - a)) for a, b in zip(starts, ends, strict=True)]
        parts = list(self.iter_blocks(blocks))
        out = {}
        for key in self.keys:
            sorted_samples = np.concatenate([part[key] for part in parts])
            samples = np.empty_like(sorted_samples)
            samples[order] = sorted_samples
            out[key] = samples
        return out

    def blocks(self, block_size: int) -> list[SampleBlock]:
        """Split the samples into runs of at most ``block_size`` consecutive samples.

        Runs never span two files; each is read with one window read per source.
        """
        block_size = max(1, int(block_size))
        return [
            SampleBlock(file_index, start, min(block_size, n - start))
            for file_index, n in enumerate(self.file_sizes)
            for start in range(0, n, block_size)
        ]

    def iter_blocks(self, blocks: Sequence[SampleBlock]) -> Iterator[dict[str, np.ndarray]]:
        """Yield the samples of each block, as ``{key: (count, rows, cols, bands)}``."""
        if self._arrays is not None:
            for block in blocks:
                first = int(self._file_starts[block.file_index]) + block.start
                yield {key: array[first:first + block.count]
                       for key, array in self._arrays.items()}
            return
        with _OpenFiles(self.infos) as files:
            for block in blocks:
                yield {key: files.read(key, block) for key in self.keys}

    def get_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Return per-band statistics of every source over all samples and pixels.

        Returns
        -------
        dict
            ``{key: {"min": ..., "max": ..., "mean": ..., "std": ...}}``, each an array
            with one value per band; ``std`` is the population standard deviation.
            Accumulated in float64 (Chan's parallel update when streaming).
        """
        if self._arrays is not None:
            return {key: _band_stats(array) for key, array in self._arrays.items()}
        accumulators = {key: _StatsAccumulator(self.patch_shapes[key][2]) for key in self.keys}
        for samples in self.iter_blocks(self.blocks(256)):
            for key, array in samples.items():
                accumulators[key].update(array)
        return {key: acc.result() for key, acc in accumulators.items()}


def _band_stats(array: np.ndarray) -> dict[str, np.ndarray]:
    axes = (0, 1, 2)
    return {
        "min": array.min(axis=axes),
        "max": array.max(axis=axes),
        "mean": array.mean(axis=axes, dtype=np.float64),
        "std": array.std(axis=axes, dtype=np.float64),
    }


class _StatsAccumulator:
    """Per-band count, min, max, mean and sum of squared deviations (Chan et al.)."""

    def __init__(self, bands: int) -> None:
        self.count = 0
        self.minimum: np.ndarray | None = None
        self.maximum: np.ndarray | None = None
        self.mean = np.zeros(bands, dtype=np.float64)
        self.m2 = np.zeros(bands, dtype=np.float64)

    def update(self, array: np.ndarray) -> None:
        values = array.reshape(-1, array.shape[-1])
        n = values.shape[0]
        if n == 0:
            return
        block_min, block_max = values.min(axis=0), values.max(axis=0)
        self.minimum = block_min if self.minimum is None else np.minimum(self.minimum, block_min)
        self.maximum = block_max if self.maximum is None else np.maximum(self.maximum, block_max)
        block_mean = values.mean(axis=0, dtype=np.float64)
        block_m2 = ((values - block_mean) ** 2).sum(axis=0, dtype=np.float64)
        total = self.count + n
        delta = block_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + block_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self) -> dict[str, np.ndarray]:
        assert self.minimum is not None and self.maximum is not None
        return {"min": self.minimum, "max": self.maximum, "mean": self.mean,
                "std": np.sqrt(self.m2 / self.count)}
