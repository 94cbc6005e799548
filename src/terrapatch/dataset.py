"""Training datasets from patches images: read, check, describe and feed them to ``tf.data``.

:class:`PatchesImagesReader` reads the patches images of several sources (one list
of files per source key, sample ``n`` at index ``n`` in every source) either fully
into memory or lazily (streaming, bounded memory). :class:`DatasetFromPatchesImages`
turns a reader into a ``tf.data.Dataset`` (:meth:`~DatasetFromPatchesImages.get_tf_dataset`)
or a backend-neutral :class:`keras.utils.PyDataset` of numpy batches
(:meth:`~DatasetFromPatchesImages.get_keras_dataset`, :class:`PatchesPyDataset`), in
which every epoch yields every sample exactly once, in a new random order, optionally
preprocessed and split into the ``(inputs, targets)`` dicts Keras expects. Both feed
``keras.Model.fit`` under any Keras backend; the second needs no TensorFlow. The
patches-image layout itself is owned by :mod:`terrapatch.patches`.

This module imports neither TensorFlow nor Keras until a dataset is asked for (the
PyTorch loaders of :mod:`terrapatch.pytorch` use the reader without them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import rasterio
from rasterio.windows import Window

from terrapatch.errors import InputError
from terrapatch.patches import PatchesInfo, read_patches, read_patches_info
from terrapatch.tfrecords import TFRecords

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    PatchesPyDataset: TypeAlias = keras.utils.PyDataset

__all__ = ["DatasetFromPatchesImages", "PatchesImagesReader", "PatchesPyDataset"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Block:
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

    def read(self, key: str, block: _Block) -> np.ndarray:
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
            return {key: files.read(key, _Block(file_index, offset, 1))[0].copy()
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
        blocks = [_Block(int(files[a]), int(wanted[a] - self._file_starts[files[a]]),
                         int(b - a)) for a, b in zip(starts, ends, strict=True)]
        parts = list(self.iter_blocks(blocks))
        out = {}
        for key in self.keys:
            sorted_samples = np.concatenate([part[key] for part in parts])
            samples = np.empty_like(sorted_samples)
            samples[order] = sorted_samples
            out[key] = samples
        return out

    def blocks(self, block_size: int) -> list[_Block]:
        """Split the samples into runs of at most ``block_size`` consecutive samples.

        Runs never span two files; each is read with one window read per source.
        """
        block_size = max(1, int(block_size))
        return [
            _Block(file_index, start, min(block_size, n - start))
            for file_index, n in enumerate(self.file_sizes)
            for start in range(0, n, block_size)
        ]

    def iter_blocks(self, blocks: Sequence[_Block]) -> Iterator[dict[str, np.ndarray]]:
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


def _check_batch_size(batch_size: int, drop_remainder: bool, size: int) -> int:
    """``batch_size`` as an int, or a one-line error (not positive, or no full batch)."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
        raise InputError(f"batch_size: {batch_size!r} must be a positive integer")
    if drop_remainder and int(batch_size) > size:
        raise InputError(
            f"batch_size: {int(batch_size)} is larger than the {size} samples and "
            "drop_remainder=True: the dataset would be empty"
        )
    return int(batch_size)


class DatasetFromPatchesImages:
    """A training dataset over patches images, fed to Keras through ``tf.data`` or numpy.

    :meth:`get_tf_dataset` builds a ``tf.data.Dataset`` (OTBTF's API);
    :meth:`get_keras_dataset` the same batches as a :class:`keras.utils.PyDataset` of
    numpy arrays, which trains under any Keras backend without TensorFlow.

    Parameters
    ----------
    filenames_dict
        ``{source_key: [patches image, ...]}`` (see :class:`PatchesImagesReader`).
    use_streaming
        Read patches lazily from disk (bounded memory) instead of loading every file.
    buffer_length
        Streaming only: number of samples held and shuffled together in memory.
        Samples are read in runs of ``max(1, min(64, buffer_length // 8))``
        consecutive patches, in a random order of runs, then shuffled within each
        buffer; a larger buffer mixes better.

    Attributes
    ----------
    reader : PatchesImagesReader
        The underlying reader.
    size : int
        Number of samples.
    output_shapes, output_types : dict
        Per-key patch shape ``(rows, cols, bands)`` and ``tf.DType``.

    Examples
    --------
    >>> ds = DatasetFromPatchesImages({"img": ["a_img.tif"], "labels": ["a_lab.tif"]})
    >>> train = ds.get_tf_dataset(batch_size=8, targets_keys=["labels"])
    >>> train = ds.get_keras_dataset(batch_size=8, targets_keys=["labels"])  # any backend
    """

    def __init__(
        self,
        filenames_dict: Mapping[str, Any],
        use_streaming: bool = False,
        buffer_length: int = 128,
    ) -> None:
        if isinstance(buffer_length, bool) or int(buffer_length) != buffer_length \
                or buffer_length <= 0:
            raise InputError(f"buffer_length: {buffer_length!r} must be a positive integer")
        self.reader = PatchesImagesReader(filenames_dict, use_streaming=use_streaming)
        self.buffer_length = int(buffer_length)
        self.size = self.reader.get_size()
        self._tensors: dict[str, Any] | None = None

    @property
    def output_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Per-key shape of one sample, ``(rows, cols, bands)``."""
        return dict(self.reader.patch_shapes)

    @property
    def sample_dtypes(self) -> dict[str, np.dtype]:
        """Per-key numpy dtype of the samples (the files' pixel types)."""
        return {key: np.dtype(dtype) for key, dtype in self.reader.dtypes.items()}

    @property
    def output_types(self) -> dict[str, Any]:
        """Per-key ``tf.DType`` of the samples (the files' pixel types)."""
        import tensorflow as tf

        return {key: tf.dtypes.as_dtype(dtype) for key, dtype in self.reader.dtypes.items()}

    def get_size(self) -> int:
        """Return the number of samples."""
        return self.size

    def get_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Return per-band min, max, mean and std of every source (see the reader)."""
        return self.reader.get_stats()

    # -- sample streams ---------------------------------------------------------------

    def _block_size(self) -> int:
        return max(1, min(64, self.buffer_length // 8))

    def iter_chunks(
        self, shuffle: bool = True, rng: np.random.Generator | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield every sample once, in chunks ``{key: (k, rows, cols, bands)}``.

        Parameters
        ----------
        shuffle
            Random order (a uniform permutation in memory; runs of consecutive
            samples shuffled by buffers when streaming) instead of file order.
        rng
            Random generator to draw the order from (default: a fresh unseeded one).
        """
        rng = rng if rng is not None else np.random.default_rng()
        arrays = self.reader._arrays
        if arrays is not None:
            order = rng.permutation(self.size) if shuffle else np.arange(self.size)
            step = max(self.buffer_length, 1024)
            for first in range(0, self.size, step):
                index = order[first:first + step]
                yield {key: array[index] for key, array in arrays.items()}
            return
        for pending, perm in self._stream_plan(shuffle, rng):
            parts = list(self.reader.iter_blocks(pending))
            chunk = {key: np.concatenate([p[key] for p in parts]) for key in self.reader.keys}
            if perm is not None:
                chunk = {key: array[perm] for key, array in chunk.items()}
            yield chunk

    def _stream_plan(
        self, shuffle: bool, rng: np.random.Generator
    ) -> list[tuple[list[_Block], np.ndarray | None]]:
        """Return the buffers of one streamed epoch: their runs and in-buffer permutation."""
        blocks = self.reader.blocks(self._block_size())
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        plan: list[tuple[list[_Block], np.ndarray | None]] = []
        pending: list[_Block] = []
        held = 0
        for position, block in enumerate(blocks):
            pending.append(block)
            held += block.count
            if held < self.buffer_length and position < len(blocks) - 1:
                continue
            plan.append((pending, rng.permutation(held) if shuffle else None))
            pending, held = [], 0
        return plan

    def epoch_order(
        self, shuffle: bool = True, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """Return the sample indices of one epoch, in the order :meth:`iter_chunks` yields them.

        In memory, a uniform permutation; when streaming, runs of consecutive samples
        in a random order, shuffled by buffers of ``buffer_length`` samples (so that
        the reads of a batch stay few and contiguous).
        """
        rng = rng if rng is not None else np.random.default_rng()
        if self.reader._arrays is not None:
            return rng.permutation(self.size) if shuffle else np.arange(self.size)
        starts = self.reader._file_starts
        parts = []
        for pending, perm in self._stream_plan(shuffle, rng):
            index = np.concatenate([
                np.arange(block.count) + starts[block.file_index] + block.start
                for block in pending
            ])
            parts.append(index if perm is None else index[perm])
        return np.concatenate(parts).astype(np.int64)

    def _samples_tf_dataset(
        self,
        shuffle: bool,
        seed: int | None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> tf.data.Dataset:
        """Return the unbatched samples, each passed through ``transform`` (one map)."""
        import tensorflow as tf

        arrays = self.reader._arrays
        if arrays is not None:
            if self._tensors is None:  # one copy for every dataset built from this one
                self._tensors = {key: tf.constant(array) for key, array in arrays.items()}
            tensors = self._tensors
            ds = tf.data.Dataset.range(self.size)
            if shuffle:
                ds = ds.shuffle(self.size, seed=seed, reshuffle_each_iteration=True)

            def gather(i: Any) -> Any:
                sample = {key: tf.gather(t, i) for key, t in tensors.items()}
                return sample if transform is None else transform(sample)

            return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        rng = np.random.default_rng(seed)
        signature = {
            key: tf.TensorSpec((None, *shape), tf.dtypes.as_dtype(self.reader.dtypes[key]))
            for key, shape in self.reader.patch_shapes.items()
        }
        ds = tf.data.Dataset.from_generator(
            lambda: self.iter_chunks(shuffle=shuffle, rng=rng), output_signature=signature
        )
        # The generator yields every sample once; telling tf.data lets Keras know the
        # number of steps per epoch.
        ds = ds.prefetch(2).unbatch().apply(tf.data.experimental.assert_cardinality(self.size))
        if transform is not None:
            ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds

    def get_tf_dataset(
        self,
        batch_size: int,
        preprocessing_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        targets_keys: Sequence[str] | None = None,
        drop_remainder: bool = True,
        shuffle: bool = True,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        """Return a batched ``tf.data.Dataset``; every epoch sees every sample once.

        Parameters
        ----------
        batch_size
            Samples per batch.
        preprocessing_fn
            Function mapping one sample dict ``{key: tensor (rows, cols, bands)}`` to a
            new dict (e.g. one-hot targets; any structure when ``targets_keys`` is None).
            It runs in ``tf.data`` (TensorFlow ops). Normalisation belongs in the model
            (:meth:`ModelBase.normalize_inputs`), so that serving applies it too.
        targets_keys
            Keys that are targets: elements become ``(inputs, targets)`` tuples of
            dicts, as ``keras.Model.fit`` expects. None (or empty): plain dicts.
        drop_remainder
            Drop the last, incomplete batch.
        shuffle
            New random order at every epoch (iteration); False: file order.
        seed
            Seed of the random orders (the sequence of epochs is then reproducible).

        Raises
        ------
        InputError
            On a bad ``batch_size``, or ``targets_keys`` absent from the (preprocessed)
            samples, covering them all, or given with a ``preprocessing_fn`` that does
            not return a dict.
        """
        import tensorflow as tf

        batch_size = _check_batch_size(batch_size, drop_remainder, self.size)
        spec: Any = {
            key: tf.TensorSpec(shape, tf.dtypes.as_dtype(self.reader.dtypes[key]))
            for key, shape in self.reader.patch_shapes.items()
        }
        if preprocessing_fn is not None:
            # Trace the function once on the sample spec to check what it returns.
            spec = tf.data.Dataset.from_tensors(
                {key: tf.zeros(s.shape, s.dtype) for key, s in spec.items()}
            ).map(preprocessing_fn).element_spec
            if targets_keys and not isinstance(spec, Mapping):
                raise InputError(
                    f"preprocessing_fn: {_callable_name(preprocessing_fn)} must return a "
                    f"dict of tensors when targets_keys is given, returned {spec!r}"
                )
        split = _splitter(spec, list(targets_keys), preprocessing_fn) if targets_keys else None
        transform = _compose(preprocessing_fn, split)
        ds = self._samples_tf_dataset(shuffle=shuffle, seed=seed, transform=transform)
        return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)

    def get_keras_dataset(
        self,
        batch_size: int,
        preprocessing_fn: Callable[[dict[str, Any]], Any] | None = None,
        targets_keys: Sequence[str] | None = None,
        drop_remainder: bool = True,
        shuffle: bool = True,
        seed: int | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> PatchesPyDataset:
        """Return a :class:`keras.utils.PyDataset` of numpy batches, for any Keras backend.

        The batches are those of :meth:`get_tf_dataset` (same arguments, same
        ``(inputs, targets)`` structure, every sample once per epoch in a new random
        order), built with numpy instead of ``tf.data``: ``keras.Model.fit`` takes the
        result under the tensorflow, torch and jax backends without TensorFlow.

        Parameters
        ----------
        batch_size, targets_keys, drop_remainder, shuffle, seed
            As in :meth:`get_tf_dataset`.
        preprocessing_fn
            Function mapping one sample dict ``{key: numpy array (rows, cols, bands)}``
            to a new dict (or any structure when ``targets_keys`` is None). It runs
            eagerly, sample by sample, on numpy arrays: write it with numpy or
            ``keras.ops`` (e.g. :func:`terrapatch.ops.one_hot`); tensors it returns
            are converted to numpy.
        workers, use_multiprocessing, max_queue_size
            :class:`keras.utils.PyDataset` prefetching (default: batches built in the
            training loop's thread). With several workers the batches of an epoch
            are still every sample once, in an order that depends on thread timing.

        Returns
        -------
        PatchesPyDataset
            Its ``element_spec`` (``(inputs, targets)`` dicts of
            :class:`keras.KerasTensor` with the batch axis first) builds a
            :class:`terrapatch.model.ModelBase` as a ``tf.data`` element spec does.

        Raises
        ------
        InputError
            As :meth:`get_tf_dataset`.
        MissingExtraError
            If Keras is not installed.

        Notes
        -----
        ``fit(shuffle=True)`` (Keras's default) also shuffles the order of the batches
        of a ``PyDataset``; the sample order within the epoch is already random here.
        """
        from terrapatch._optional import import_keras

        keras = import_keras("get_keras_dataset: a Keras dataset of patches")
        batch_size = _check_batch_size(batch_size, drop_remainder, self.size)
        zeros = {key: np.zeros(shape, self.reader.dtypes[key])
                 for key, shape in self.reader.patch_shapes.items()}
        sample: Any = zeros
        if preprocessing_fn is not None:
            # Run the function once on a zero sample to check what it returns.
            sample = _to_numpy_tree(keras, preprocessing_fn(zeros))
            if targets_keys and not isinstance(sample, Mapping):
                raise InputError(
                    f"preprocessing_fn: {_callable_name(preprocessing_fn)} must return a "
                    f"dict of tensors when targets_keys is given, returned "
                    f"{type(sample).__name__}"
                )
        split = _splitter(sample, list(targets_keys), preprocessing_fn) if targets_keys else None
        structure = split(sample) if split is not None else sample
        batch_dim = batch_size if drop_remainder else None
        element_spec = keras.tree.map_structure(
            lambda a: keras.KerasTensor((batch_dim, *np.shape(a)), dtype=str(np.asarray(a).dtype)),
            structure,
        )
        return _py_dataset_class()(
            self, batch_size, preprocessing_fn, split, element_spec,
            drop_remainder=drop_remainder, shuffle=shuffle, seed=seed, workers=workers,
            use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size,
        )

    def to_tfrecords(
        self, output_dir: PathLike, n_samples_per_shard: int = 100, drop_remainder: bool = True
    ) -> Path:
        """Write the samples, in a random order, as TFRecords shards in ``output_dir``.

        See :meth:`terrapatch.tfrecords.TFRecords.ds2tfrecord`.
        """
        records = TFRecords(output_dir)
        records.ds2tfrecord(self, n_samples_per_shard=n_samples_per_shard,
                            drop_remainder=drop_remainder)
        return records.path


def _to_numpy_tree(keras: Any, structure: Any) -> Any:
    """Return ``structure`` with every tensor leaf (any backend, or TensorFlow) as numpy."""
    def leaf(value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        if keras.ops.is_tensor(value):
            return np.asarray(keras.ops.convert_to_numpy(value))
        return np.asarray(value)  # numpy scalars, TensorFlow tensors under another backend

    return keras.tree.map_structure(leaf, structure)


_PY_DATASET_CLASS: type[Any] | None = None


def _py_dataset_class() -> type[Any]:
    """Return :class:`PatchesPyDataset`, defined on first use (it subclasses a Keras class)."""
    global _PY_DATASET_CLASS
    if _PY_DATASET_CLASS is not None:
        return _PY_DATASET_CLASS
    from terrapatch._optional import import_keras

    keras = import_keras("PatchesPyDataset: a Keras dataset of patches")

    class PatchesPyDataset(keras.utils.PyDataset):  # type: ignore[name-defined,misc]
        """Batches of a :class:`DatasetFromPatchesImages` as numpy arrays, for any backend.

        Built by :meth:`DatasetFromPatchesImages.get_keras_dataset`; batch ``i`` of an
        epoch holds samples ``order[i·B:(i+1)·B]`` of the epoch's order
        (:meth:`DatasetFromPatchesImages.epoch_order`), drawn anew after every epoch
        (:meth:`on_epoch_end`). Indexing is random access: ``fit`` may ask for the
        batches in any order.

        Attributes
        ----------
        dataset : DatasetFromPatchesImages
            The samples.
        batch_size : int
            Samples per batch.
        element_spec
            Structure of the batches (``(inputs, targets)`` dicts of
            :class:`keras.KerasTensor`; batch axis None without ``drop_remainder``).
        """

        def __init__(self, dataset: DatasetFromPatchesImages, batch_size: int,
                     preprocessing_fn: Callable[[dict[str, Any]], Any] | None,
                     split: Callable[[dict[str, Any]], Any] | None, element_spec: Any,
                     drop_remainder: bool = True, shuffle: bool = True,
                     seed: int | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.dataset = dataset
            self.batch_size = batch_size
            self.element_spec = element_spec
            self._preprocessing_fn = preprocessing_fn
            self._split = split
            self._drop_remainder = drop_remainder
            self._shuffle = shuffle
            self._rng = np.random.default_rng(seed)
            self._order = dataset.epoch_order(shuffle=shuffle, rng=self._rng)

        def __len__(self) -> int:
            """Return the number of batches per epoch."""
            size, b = self.dataset.size, self.batch_size
            return size // b if self._drop_remainder else -(-size // b)

        def __getitem__(self, index: int) -> Any:
            """Return batch ``index`` of the current epoch (numpy arrays)."""
            if isinstance(index, bool) or not 0 <= int(index) < len(self):
                raise IndexError(f"batch {index!r} outside [0, {len(self)})")
            first = int(index) * self.batch_size
            samples = self.dataset.reader.read_samples(
                self._order[first:first + self.batch_size])
            if self._preprocessing_fn is None:
                return samples if self._split is None else self._split(samples)
            count = len(next(iter(samples.values())))
            fn, split = self._preprocessing_fn, self._split
            outputs = []
            for row in range(count):
                out = _to_numpy_tree(keras, fn({key: a[row] for key, a in samples.items()}))
                outputs.append(out if split is None else split(out))
            return keras.tree.map_structure(lambda *leaves: np.stack(leaves), *outputs)

        def on_epoch_end(self) -> None:
            """Draw the sample order of the next epoch."""
            self._order = self.dataset.epoch_order(shuffle=self._shuffle, rng=self._rng)

    PatchesPyDataset.__module__ = __name__
    _PY_DATASET_CLASS = PatchesPyDataset
    return PatchesPyDataset


def __getattr__(name: str) -> Any:
    """Define :class:`PatchesPyDataset` on first access (it needs Keras)."""
    if name == "PatchesPyDataset":
        return _py_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _compose(
    first: Callable[[Any], Any] | None, second: Callable[[Any], Any] | None
) -> Callable[[Any], Any] | None:
    """Return ``second ∘ first`` skipping missing steps (one ``tf.data`` map instead of two)."""
    if first is None or second is None:
        return first or second

    def both(sample: Any) -> Any:
        return second(first(sample))

    return both


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _splitter(
    element_spec: Mapping[str, Any],
    targets_keys: list[str],
    preprocessing_fn: Callable[..., Any] | None,
) -> Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]:
    """Return a function splitting a sample dict into ``(inputs, targets)``; check keys."""
    keys = list(element_spec)
    missing = [key for key in targets_keys if key not in element_spec]
    origin = (f"the output of preprocessing_fn {_callable_name(preprocessing_fn)}"
              if preprocessing_fn is not None else "the dataset")
    if missing:
        raise InputError(
            f"targets_keys: {missing} not among the keys of {origin}: {keys}"
        )
    inputs_keys = [key for key in keys if key not in targets_keys]
    if not inputs_keys:
        raise InputError(
            f"targets_keys: {targets_keys} covers every key of {origin}; no input is left"
        )

    def split(sample: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({key: sample[key] for key in inputs_keys},
                {key: sample[key] for key in targets_keys})

    return split
