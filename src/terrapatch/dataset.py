"""Training datasets from patches images: read, check, describe and feed them to ``tf.data``.

:class:`~terrapatch.patches_reader.PatchesImagesReader` (:mod:`terrapatch.patches_reader`) reads the
patches images of several sources; :class:`DatasetFromPatchesImages`
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from terrapatch.errors import InputError
from terrapatch.patches_reader import PatchesImagesReader, SampleBlock
from terrapatch.tfrecords import TFRecords

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    PatchesPyDataset: TypeAlias = keras.utils.PyDataset

__all__ = ["DatasetFromPatchesImages", "PatchesImagesReader", "PatchesPyDataset"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


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
    ) -> list[tuple[list[SampleBlock], np.ndarray | None]]:
        """Return the buffers of one streamed epoch: their runs and in-buffer permutation."""
        blocks = self.reader.blocks(self._block_size())
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        plan: list[tuple[list[SampleBlock], np.ndarray | None]] = []
        pending: list[SampleBlock] = []
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
