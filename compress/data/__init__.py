"""Data sets: in memory as tensors (the built-in sets) or decoded batch by batch (image folders).

``load_data(name, ...)`` returns a :class:`Data` with ``train``/``val``/``test`` :class:`Split` s. A split keeps
the whole set as one tensor (uint8 images, or float32 for the synthetic task); :meth:`Split.batches`
normalises (and, for CIFAR training batches, augments) one batch at a time, drawing all randomness from the
``torch.Generator`` it is given, never from the global RNG.

Data sets (``DATASETS`` registry):

* ``fashion-mnist``, ``mnist``: raw IDX files (gzipped or not) read by a small parser (:func:`read_idx`),
  searched in ``root``, ``root/<name>``, ``root/<FashionMNIST|MNIST>/raw`` (torchvision's layout) and
  ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``); torchvision's download is the last
  resort (online only).
* ``cifar10``, ``cifar100``: torchvision's readers, ``download=False`` first, then a download.
* ``imagefolder:PATH``: class-per-folder images, decoded lazily per batch through a DataLoader (``workers``),
  resized to ``shape`` (default: 1 or 3 channels as the images are, 32x32); see :mod:`compress.data.folder`.
* ``synthetic``: a generated, learnable task (see :func:`make_synthetic`), float32, no normalisation needed.

Downloads go to a temporary folder inside ``root`` that is moved into place only on success, so a failed
(offline) attempt leaves nothing behind; torchvision's printing is swallowed.

Modules: ``split`` (Split, Data), ``registry`` (DATASETS, normalisation, where sets are looked for), ``idx``
(Fashion-MNIST, MNIST), ``cifar``, ``folder`` (image folders), ``synthetic``, ``download`` (torchvision), and
``loading`` (``load_data``).
"""
from __future__ import annotations

from compress.data import cifar, folder, idx, synthetic  # noqa: F401  (each registers its data sets)
from compress.data.idx import find_idx_files, read_idx
from compress.data.loading import load_data
from compress.data.registry import DATASETS, SYSTEM_DATA_DIRS, default_data_root
from compress.data.split import Data, Split
from compress.data.synthetic import MAX_SYNTHETIC_ELEMENTS, make_synthetic, synthetic_sizes

__all__ = ["Split", "Data", "DATASETS", "load_data", "default_data_root", "read_idx", "find_idx_files",
           "make_synthetic", "synthetic_sizes", "MAX_SYNTHETIC_ELEMENTS", "SYSTEM_DATA_DIRS"]
