"""PyTorch models, natively: serve them, export them, train them on patches images.

terrapatch serves PyTorch models as they are, with the ``torch`` extra
(``pip install 'terrapatch[torch]'``); the package has one module per job:

- :mod:`~terrapatch.pytorch.interface`: the model's named inputs and outputs
  (``forward``'s argument names or a dict's keys; ``output``, ``output_0``, ... or a
  dict's keys);
- :mod:`~terrapatch.pytorch.engine`: :class:`TorchEngine`, the engine serving an
  ``nn.Module``, a ``torch.export`` program (``.pt2``) or TorchScript (``.pt``), on
  the CPU or a CUDA GPU (channels first; serving converts channels-last tensors);
- :mod:`~terrapatch.pytorch.export`: :func:`export_onnx` and :func:`save_program`,
  a multi-input model written with free batch and spatial sizes, and checked;
- :mod:`~terrapatch.pytorch.data`: :class:`PatchesDataset`, patches images as a
  :class:`torch.utils.data.Dataset` of channels-first tensors.

:func:`terrapatch.engines.load_engine` (hence :func:`terrapatch.serve.serve`) opens
PyTorch models through this package; docs/pytorch.md walks through a two-branch
10 m / 20 m network trained and served at the sources' native resolutions.
"""

from terrapatch._optional import require

require("torch", "terrapatch.pytorch")

from terrapatch.pytorch.data import PatchesDataset  # noqa: E402
from terrapatch.pytorch.engine import TorchEngine  # noqa: E402
from terrapatch.pytorch.export import export_onnx, save_program  # noqa: E402
from terrapatch.pytorch.interface import SINGLE_OUTPUT, name_outputs  # noqa: E402

__all__ = ["SINGLE_OUTPUT", "PatchesDataset", "TorchEngine", "export_onnx", "name_outputs",
           "save_program"]
