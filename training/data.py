"""Datasets as in-memory tensors: ``images`` (N, C, H, W) as stored, ``labels`` int64 (N,).

Images stay in their stored dtype (``uint8`` pixels for MNIST-like data and torchvision sets, so a
60,000-image MNIST split holds 47 MB, not 188 MB as float32) until a batch is drawn:
:meth:`Dataset.batch` returns float32 in [0, 1]. ``synthetic`` is generated as float32.

- ``mnist`` / ``fashion-mnist``: the standard IDX ``.gz`` files in ``data_dir``.
- ``synthetic``: generated class prototypes plus noise; small, for tests and smoke runs.
- ``cifar10`` / ``svhn``: through torchvision (``pip install fpn-serve[vision]``), from ``data_dir``
  or downloaded with ``download=True``.

These datasets fit in memory, so a batch is an index into two tensors: no worker processes, and
the same batches on one process or many (``training.distributed`` shards each global batch).

Model selection uses a validation split held out of ``train`` (:meth:`Dataset.split`, fixed by the
seed); ``test`` is read once, for the final evaluation.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models import InputSpec

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, in memory."""

    name: str
    images: Tensor  # (N, C, H, W) uint8 pixels, or float32 in [0, 1]
    labels: Tensor  # (N,) int64
    classes: tuple[str, ...]
    input: InputSpec

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, rows: Tensor | slice) -> Tensor:
        """Images ``rows`` as float32 in [0, 1] (the only place pixels become floats)."""
        return as_float(self.images[rows])

    def subset(self, limit: int | None) -> Dataset:
        if limit is None or limit >= len(self):
            return self
        return self.take(torch.arange(limit))

    def take(self, rows: Tensor) -> Dataset:
        """The examples at ``rows`` (int64 indices), in that order."""
        return Dataset(self.name, self.images[rows], self.labels[rows], self.classes, self.input)

    def split(self, held_out: int, seed: int) -> tuple[Dataset, Dataset]:
        """``(rest, validation)``: ``held_out`` examples drawn at random, fixed by ``seed``.

        The same ``(held_out, seed)`` always holds out the same examples, so ``fpn-eval --split
        val`` re-creates a training run's validation split from its config.json.
        """
        if not 0 <= held_out < len(self):
            raise ValueError(
                f"validation split of {held_out} examples needs 0 <= N < {len(self)} "
                f"(the {self.name} training split's size)"
            )
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        validation = order[:held_out].sort().values
        rest = order[held_out:].sort().values
        return self.take(rest), self.take(validation)


def as_float(images: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1]; floating images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def load_idx(path: str | Path) -> np.ndarray:
    """Read a gzip-compressed unsigned-byte IDX file into an array of its stated shape."""
    path = Path(path)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _load_idx_dataset(
    name: str, data_dir: Path, split: str, classes, mean: float, std: float
) -> Dataset:
    image_file, label_file = IDX_FILES[split]
    for f in (image_file, label_file):
        if not (data_dir / f).is_file():
            raise FileNotFoundError(
                f"{data_dir / f}: missing; --data-dir must hold the {name} IDX files"
            )
    images = torch.from_numpy(load_idx(data_dir / image_file).copy())  # uint8, 1 byte a pixel
    labels = torch.from_numpy(load_idx(data_dir / label_file).astype(np.int64))
    spec = InputSpec(shape=(1, 28, 28), mean=mean, std=std)
    return Dataset(name, images.unsqueeze(1), labels, classes, spec)


def synthetic(
    split: str, *, num_classes: int = 10, size: int = 12, n: int | None = None, seed: int = 0
) -> Dataset:
    """Noisy class prototypes on a ``size``×``size`` grid. Train and test share prototypes."""
    n = n or (2000 if split == "train" else 500)
    prototypes = torch.rand(
        num_classes, 1, size, size, generator=torch.Generator().manual_seed(seed)
    )
    g = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    labels = torch.randint(num_classes, (n,), generator=g)
    noise = 0.35 * torch.randn(n, 1, size, size, generator=g)
    images = (prototypes[labels] + noise).clamp_(0.0, 1.0)
    spec = InputSpec(shape=(1, size, size), mean=0.5, std=0.3)
    return Dataset("synthetic", images, labels, tuple(str(i) for i in range(num_classes)), spec)


def _torchvision_dataset(name: str, data_dir: Path, split: str, download: bool) -> Dataset:
    try:
        import torchvision
    except ImportError:
        raise RuntimeError(f"{name} needs torchvision: pip install 'fpn-serve[vision]'") from None
    train = split == "train"
    if name == "cifar10":
        ds = torchvision.datasets.CIFAR10(str(data_dir), train=train, download=download)
        images, labels, classes = ds.data, np.asarray(ds.targets), tuple(ds.classes)
        mean, std = 0.4734, 0.2516
    else:
        ds = torchvision.datasets.SVHN(str(data_dir), split=split, download=download)
        images, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, DIGITS
        mean, std = 0.4452, 0.1981
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # uint8
    spec = InputSpec(shape=(3, 32, 32), mean=mean, std=std)
    return Dataset(name, x, torch.from_numpy(np.asarray(labels, dtype=np.int64)), classes, spec)


DATASETS = ("mnist", "fashion-mnist", "synthetic", "cifar10", "svhn")


def load_dataset(
    name: str, split: str, data_dir: str | Path | None = None, *, download: bool = False
) -> Dataset:
    """Load ``split`` (``train`` or ``test``) of dataset ``name``; see :meth:`Dataset.split` for
    the validation split."""
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r}; available: {sorted(IDX_FILES)}")
    if name == "synthetic":
        return synthetic(split)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir")
    data_dir = Path(data_dir)
    if name == "mnist":
        return _load_idx_dataset(name, data_dir, split, DIGITS, 0.1307, 0.3081)
    if name == "fashion-mnist":
        return _load_idx_dataset(name, data_dir, split, FASHION_CLASSES, 0.2860, 0.3530)
    return _torchvision_dataset(name, data_dir, split, download)


def random_shift(
    images: Tensor, max_shift: int, generator: torch.Generator | None = None
) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): the augmentation used for
    MNIST-like data. (N, C, H, W) -> (N, C, H, W)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(images.device)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(images.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]
