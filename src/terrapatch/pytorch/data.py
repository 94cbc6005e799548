"""A torch :class:`~torch.utils.data.Dataset` over patches images (what PatchesExtraction writes).

:class:`PatchesDataset` reads samples with :class:`terrapatch.dataset.PatchesImagesReader`
(the same files, checks and streaming as :class:`~terrapatch.dataset.DatasetFromPatchesImages`)
and gives each as a dict of channels-first float tensors ``(bands, rows, cols)``
keyed by source, labels included, as PyTorch models and ``DataLoader`` expect::

    dataset = PatchesDataset({"input_10m": "a_img_10m.tif", "input_20m": "a_img_20m.tif",
                              "labels": "a_labels.tif"}, integer_keys=["labels"])
    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2)
    for batch in loader:   # {"input_10m": (32, 4, 16, 16), ..., "labels": (32, 1, 1, 1)}
        ...

TFRecords shards (:class:`terrapatch.tfrecords.TFRecords`) are read through
``tf.data``; convert them with PyTorch's own readers, or extract patches images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from terrapatch.errors import InputError
from terrapatch.patches_reader import PatchesImagesReader
from terrapatch.pytorch.interface import numpy_dtype

__all__ = ["PatchesDataset"]


class PatchesDataset(Dataset[dict[str, torch.Tensor]]):
    """Samples of patches images as dicts of ``(bands, rows, cols)`` tensors.

    Parameters
    ----------
    filenames_dict
        ``{key: file, list of files or folder}``, as for
        :class:`~terrapatch.dataset.PatchesImagesReader` (sample ``n`` of every key
        belongs together); labels are one more key.
    use_streaming
        False: read every file into memory now (fast epochs). True: read each sample
        from disk when asked (bounded memory; each ``DataLoader`` worker opens the
        files itself).
    dtype
        Dtype of the tensors (default float32).
    integer_keys
        Keys given as ``int64`` tensors instead (class labels for
        :class:`torch.nn.CrossEntropyLoss`).
    transform
        Called on each sample dict (after the conversion to tensors), e.g. to
        normalise; its result is the item.

    Raises
    ------
    InputError
        As :class:`~terrapatch.dataset.PatchesImagesReader`, or if ``integer_keys``
        names no key.
    """

    def __init__(self, filenames_dict: Mapping[str, Any], use_streaming: bool = False,
                 dtype: torch.dtype = torch.float32, integer_keys: Sequence[str] = (),
                 transform: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
        self.reader = PatchesImagesReader(filenames_dict, use_streaming=use_streaming)
        unknown = sorted(set(integer_keys) - set(self.reader.keys))
        if unknown:
            raise InputError(f"integer_keys: {unknown} are not keys of filenames_dict "
                             f"({', '.join(self.reader.keys)})")
        self.dtypes = {key: torch.int64 if key in integer_keys else dtype
                       for key in self.reader.keys}
        self._numpy = {key: numpy_dtype(d) for key, d in self.dtypes.items()}
        self.transform = transform

    @property
    def keys(self) -> list[str]:
        """Source keys, in the order of ``filenames_dict``."""
        return self.reader.keys

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """``(bands, rows, cols)`` of each key's items."""
        return {key: (bands, rows, cols)
                for key, (rows, cols, bands) in self.reader.patch_shapes.items()}

    def __len__(self) -> int:
        """Number of samples."""
        return self.reader.get_size()

    def __getitem__(self, index: int) -> Any:
        """Sample ``index`` as ``{key: tensor (bands, rows, cols)}`` (then ``transform``)."""
        if not isinstance(index, int | np.integer) or not 0 <= int(index) < len(self):
            raise IndexError(f"index {index!r} outside [0, {len(self)})")
        sample = self.reader.get_sample(int(index))
        item = {key: torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1),
                                                           dtype=self._numpy[key]))
                for key, array in sample.items()}
        return self.transform(item) if self.transform is not None else item
