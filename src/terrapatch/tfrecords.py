"""TFRecords shards of training samples: write them from a dataset, read them into ``tf.data``.

The on-disk layout is OTBTF's, so shards written by either tool read in the other:
``<dir>/<i>.records`` shards of ``tf.train.Example`` records (one bytes feature per
key holding ``tf.io.serialize_tensor`` of the sample's tensor), plus
``output_shapes.json`` (``{key: [rows, cols, bands]}``) and ``output_types.json``
(``{key: "float32"}``). Shards are written under temporary names and renamed when
complete; the two JSON files are written last, so a directory without them is an
incomplete write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from terrapatch._optional import import_tensorflow
from terrapatch.errors import InputError, MissingInputError, OutputError
from terrapatch.writer import atomic_output

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["PatchSamples", "TFRecords"]

SHAPES_FILE = "output_shapes.json"
TYPES_FILE = "output_types.json"
_SHARD = re.compile(r"^(\d+)\.records$")


@runtime_checkable
class PatchSamples(Protocol):
    """What :class:`TFRecords` needs of a set of patch samples to write it as shards.

    :class:`terrapatch.dataset.DatasetFromPatchesImages` is one; any object with these
    members can be written without building a ``tf.data`` pipeline.
    """

    size: int

    @property
    def output_shapes(self) -> Mapping[str, tuple[int, int, int]]:
        """Per-key shape of one sample, ``(rows, cols, bands)``."""

    @property
    def sample_dtypes(self) -> Mapping[str, np.dtype]:
        """Per-key numpy dtype of the samples."""

    def iter_chunks(self, shuffle: bool = True, rng: np.random.Generator | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield every sample once, in chunks ``{key: (k, rows, cols, bands)}``."""


class TFRecords:
    """A directory of TFRecords shards of training samples.

    Parameters
    ----------
    path
        Directory; created if missing. When it already holds ``output_shapes.json``
        and ``output_types.json`` they are loaded.

    Attributes
    ----------
    path : pathlib.Path
        The directory.
    output_shapes : dict
        ``{key: [rows, cols, bands]}`` (empty until written or loaded).
    output_types : dict
        ``{key: dtype name}`` (empty until written or loaded).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"path: {os.fspath(path)!r} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"path: cannot create directory {os.fspath(path)!r}: {exc}") \
                from None
        self.output_shapes: dict[str, list[int]] = {}
        self.output_types: dict[str, str] = {}
        if (self.path / SHAPES_FILE).exists() and (self.path / TYPES_FILE).exists():
            self.output_shapes = self._load_json(SHAPES_FILE)
            self.output_types = self._load_json(TYPES_FILE)

    def _load_json(self, name: str) -> dict[str, Any]:
        try:
            content = json.loads((self.path / name).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"path: cannot read {os.fspath(self.path / name)!r}: {exc}") \
                from None
        if not isinstance(content, dict):
            raise InputError(f"path: {os.fspath(self.path / name)!r} is not a JSON object")
        return content

    def shards(self) -> list[Path]:
        """Return the shard files ``<i>.records``, sorted by ``i``."""
        found = [(int(m.group(1)), p) for p in self.path.iterdir()
                 if (m := _SHARD.match(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]

    # -- writing ----------------------------------------------------------------------

    def ds2tfrecord(
        self,
        dataset: PatchSamples | tf.data.Dataset,
        n_samples_per_shard: int = 100,
        drop_remainder: bool = True,
        shuffle: bool = True,
        seed: int | None = None,
    ) -> list[Path]:
        """Write the samples of ``dataset`` as shards of ``n_samples_per_shard`` samples.

        Parameters
        ----------
        dataset
            A :class:`terrapatch.dataset.DatasetFromPatchesImages` (its samples are
            written once each, in a random order unless ``shuffle`` is False), or an
            unbatched ``tf.data.Dataset`` of dicts of tensors (written in its order).
        n_samples_per_shard
            Samples per shard.
        drop_remainder
            Drop the last ``size % n_samples_per_shard`` samples (OTBTF's behaviour);
            False writes them in a last, smaller shard.
        shuffle, seed
            Order of the samples taken from a ``DatasetFromPatchesImages``.

        Returns
        -------
        list of pathlib.Path
            The shards written. Shards and JSON files of a previous write in the same
            directory are replaced.
        """
        if isinstance(n_samples_per_shard, bool) or int(n_samples_per_shard) \
                != n_samples_per_shard or n_samples_per_shard <= 0:
            raise InputError(
                f"n_samples_per_shard: {n_samples_per_shard!r} must be a positive integer"
            )
        n = int(n_samples_per_shard)
        samples, shapes, types, size = _sample_source(dataset, shuffle, seed)
        n_shards = size // n + (1 if not drop_remainder and size % n else 0)
        to_write = min(size, n_shards * n)
        if n_shards == 0:
            raise InputError(
                f"n_samples_per_shard: {n} is larger than the {size} samples and "
                "drop_remainder=True: no shard would be written"
            )
        tf = import_tensorflow("TFRecords")

        temporary: list[tuple[Path, Path]] = []
        writer: Any = None
        try:
            written = 0
            for sample in samples:
                if written == to_write:
                    break
                if written % n == 0:
                    if writer is not None:
                        writer.close()
                    index = written // n
                    final = self.path / f"{index}.records"
                    tmp = self.path / f".{index}.records.{os.getpid()}.tmp"
                    temporary.append((tmp, final))
                    writer = tf.io.TFRecordWriter(os.fspath(tmp))
                writer.write(_serialize(sample))
                written += 1
            if writer is not None:
                writer.close()
                writer = None
            if written != to_write:
                raise InputError(f"dataset: yielded {written} samples, expected {to_write}")
            for name in (SHAPES_FILE, TYPES_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
            for old in self.shards():
                old.unlink()
            for tmp, final in temporary:
                os.replace(tmp, final)
        except BaseException:
            if writer is not None:
                writer.close()
            for tmp, _ in temporary:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        self.output_shapes = {key: [int(d) for d in shape] for key, shape in shapes.items()}
        self.output_types = dict(types)
        for name, content in ((SHAPES_FILE, self.output_shapes), (TYPES_FILE, self.output_types)):
            with atomic_output(self.path / name, "path") as tmp_json:
                tmp_json.write_text(json.dumps(content, indent=1))
        return [final for _, final in temporary]

    # -- reading ----------------------------------------------------------------------

    def read(
        self,
        batch_size: int,
        target_keys: Sequence[str],
        n_workers: int = 1,
        drop_remainder: bool = True,
        shuffle_buffer_size: int | None = None,
        preprocessing_fn: Callable[..., dict[str, Any]] | None = None,
        shard_policy: Any = None,
        prefetch_buffer_size: int | None = None,
        num_parallel_calls: int | None = None,
        **kwargs: Any,
    ) -> tf.data.Dataset:
        """Return a batched ``tf.data.Dataset`` of ``(inputs, targets)`` from the shards.

        Parameters
        ----------
        batch_size
            Samples per batch.
        target_keys
            Keys that go to the targets dict; the others go to the inputs.
        n_workers
            Number of distributed workers: only a multiple of ``n_workers`` shards is
            used, so every worker gets the same number (``tf.distribute``).
        drop_remainder
            Drop the last, incomplete batch.
        shuffle_buffer_size
            Shuffle samples through a buffer of this size (and read shards in a
            random, interleaved order); None: shards in order, no shuffling.
        preprocessing_fn
            Called as ``preprocessing_fn(sample, **kwargs)`` on each sample dict.
        shard_policy
            ``tf.data.experimental.AutoShardPolicy`` (default AUTO).
        prefetch_buffer_size, num_parallel_calls
            tf.data tuning (default AUTOTUNE).
        **kwargs
            Extra keyword arguments of ``preprocessing_fn``.

        Raises
        ------
        MissingInputError
            If the JSON files or the shards are missing.
        InputError
            If ``target_keys`` names keys that the samples do not have.
        """
        tf = import_tensorflow("TFRecords")

        for name in (SHAPES_FILE, TYPES_FILE):
            if not (self.path / name).exists():
                raise MissingInputError(
                    f"path: {os.fspath(self.path / name)!r} is missing; write the records "
                    "with ds2tfrecord first (an interrupted write leaves it missing)"
                )
        self.output_shapes = self._load_json(SHAPES_FILE)
        self.output_types = self._load_json(TYPES_FILE)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
            raise InputError(f"batch_size: {batch_size!r} must be a positive integer")
        if isinstance(n_workers, bool) or int(n_workers) != n_workers or n_workers <= 0:
            raise InputError(f"n_workers: {n_workers!r} must be a positive integer")
        files = self.shards()
        kept = len(files) - len(files) % int(n_workers)
        if kept == 0:
            raise MissingInputError(
                f"path: {len(files)} shard(s) in {os.fspath(self.path)!r}, fewer than "
                f"n_workers={n_workers}"
            )
        files = files[:kept]
        target_keys = list(target_keys)
        autotune = tf.data.AUTOTUNE
        parallel = autotune if num_parallel_calls is None else num_parallel_calls
        parse = self._parser(target_keys, preprocessing_fn, kwargs)

        names = tf.data.Dataset.from_tensor_slices([os.fspath(f) for f in files])
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.AUTO if shard_policy is None else shard_policy
        )
        if shuffle_buffer_size:
            options.deterministic = False
            names = names.shuffle(len(files), reshuffle_each_iteration=True)
            ds = names.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(files)),
                                  num_parallel_calls=parallel)
        else:
            ds = tf.data.TFRecordDataset(names)
        ds = ds.with_options(options).map(parse, num_parallel_calls=parallel)
        if shuffle_buffer_size:
            ds = ds.shuffle(int(shuffle_buffer_size), reshuffle_each_iteration=True)
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
        return ds.prefetch(autotune if prefetch_buffer_size is None else prefetch_buffer_size)

    def _parser(
        self,
        target_keys: list[str],
        preprocessing_fn: Callable[..., dict[str, Any]] | None,
        kwargs: Mapping[str, Any],
    ) -> Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]:
        tf = import_tensorflow("TFRecords")

        shapes = self.output_shapes
        types = {key: tf.dtypes.as_dtype(name) for key, name in self.output_types.items()}
        features = {key: tf.io.FixedLenFeature([], tf.string) for key in types}
        keys: Any = list(types)
        origin = "the records"
        if preprocessing_fn is not None:
            # Trace the function once on the sample spec to check what it returns.
            probe = {key: tf.zeros(shapes[key], types[key]) for key in types}
            spec = tf.data.Dataset.from_tensors(probe).map(
                lambda sample: preprocessing_fn(sample, **kwargs)).element_spec
            if not isinstance(spec, Mapping):
                raise InputError(
                    f"preprocessing_fn: must return a dict of tensors, returned {spec!r}"
                )
            keys, origin = list(spec), "the output of preprocessing_fn"
        missing = [key for key in target_keys if key not in keys]
        if missing:
            raise InputError(f"target_keys: {missing} not among the keys of {origin}: {keys}")

        def parse(serialized: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            example = tf.io.parse_single_example(serialized, features)
            sample = {
                key: tf.ensure_shape(tf.io.parse_tensor(example[key], out_type=types[key]),
                                     shapes[key])
                for key in types
            }
            if preprocessing_fn is not None:
                sample = preprocessing_fn(sample, **kwargs)
            inputs = {key: value for key, value in sample.items() if key not in target_keys}
            targets = {key: sample[key] for key in target_keys}
            return inputs, targets

        return parse


def _serialize(sample: Mapping[str, Any]) -> bytes:
    tf = import_tensorflow("TFRecords")

    # A serialized TensorProto is what tf.io.serialize_tensor produces (and
    # tf.io.parse_tensor reads); building it from numpy avoids one eager op per value.
    feature = {
        key: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[tf.make_tensor_proto(np.asarray(value)).SerializeToString()]))
        for key, value in sample.items()
    }
    return bytes(tf.train.Example(features=tf.train.Features(feature=feature))
                 .SerializeToString())


def _sample_source(
    dataset: Any, shuffle: bool, seed: int | None
) -> tuple[Iterator[dict[str, Any]], dict[str, list[int]], dict[str, str], int]:
    """Return (samples iterator, shapes, dtype names, number of samples) of a dataset."""
    if isinstance(dataset, PatchSamples):
        rng = np.random.default_rng(seed)

        def samples() -> Iterator[dict[str, Any]]:
            for chunk in dataset.iter_chunks(shuffle=shuffle, rng=rng):
                count = len(next(iter(chunk.values())))
                for i in range(count):
                    yield {key: array[i] for key, array in chunk.items()}

        shapes = {key: list(shape) for key, shape in dataset.output_shapes.items()}
        types = {key: np.dtype(dtype).name for key, dtype in dataset.sample_dtypes.items()}
        return samples(), shapes, types, dataset.size
    tf = import_tensorflow("TFRecords")

    if isinstance(dataset, tf.data.Dataset):
        spec = dataset.element_spec
        if not isinstance(spec, Mapping):
            raise InputError(
                f"dataset: elements must be dicts of tensors, got {spec!r}"
            )
        if any(not s.shape.is_fully_defined() for s in spec.values()):
            raise InputError(
                f"dataset: sample shapes must be fully defined (unbatched), got {spec!r}"
            )
        size = int(dataset.cardinality())
        if size < 0:
            size = sum(1 for _ in dataset)
        shapes = {key: s.shape.as_list() for key, s in spec.items()}
        types = {key: s.dtype.name for key, s in spec.items()}
        return (({k: v.numpy() for k, v in e.items()} for e in dataset), shapes, types,
                size)
    raise InputError(
        "dataset: expected a DatasetFromPatchesImages or a tf.data.Dataset of dicts, got "
        f"{type(dataset).__name__}"
    )
