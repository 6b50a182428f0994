"""Fashion-MNIST: idx parsing, class-balanced subsets, batched tensor augmentation.

The files are the four idx files of Zalando's Fashion-MNIST, gzip-compressed (``*.gz``) or
not. The default location is the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``); any directory holding the files can be passed instead.

idx format: a big-endian header ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian
uint32 sizes, then the data. Type code 0x08 is uint8 (the only one Fashion-MNIST uses).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "CBN_DATA_DIR"

# Per-pixel statistics of the Fashion-MNIST training images scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST idx files cannot be found."""


def parse_idx(raw: bytes, expected_ndim: int | None = None) -> np.ndarray:
    """Parse the bytes of an idx file into a numpy array (native byte order).

    Args:
        raw: the whole (decompressed) file content.
        expected_ndim: if given, the number of dimensions the header must declare
            (3 for image files, 1 for label files).

    Raises:
        ValueError: on a bad magic number, an unknown type code, a dimension mismatch
            or a size that does not match the header.
    """
    if len(raw) < 4:
        raise ValueError("idx: file shorter than its 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"idx: bad magic number {raw[:4].hex()} (first two bytes must be 0)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"idx: unknown type code 0x{type_code:02x}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"idx: expected {expected_ndim} dimensions, header says {ndim}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError("idx: truncated header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header_end != count * dtype.itemsize:
        raise ValueError(
            f"idx: header declares shape {shape} ({count * dtype.itemsize} bytes of data) "
            f"but the file holds {len(raw) - header_end}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an idx file, gzip-compressed (by content, whatever its name) or not."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return parse_idx(raw, expected_ndim)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to read from: the argument, else ``$CBN_DATA_DIR``, else the Debian path."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)
    return Path(data_dir)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / (stem + ".gz"), directory / stem):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. "
        "Install the data with `sudo apt-get install dataset-fashion-mnist` "
        "or pass --data-dir DIR pointing at the idx files."
    )


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load one split as ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = resolve_data_dir(data_dir)
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(directory, image_stem), expected_ndim=3)
    labels = read_idx(_find(directory, label_stem), expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return (
        torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )


def balanced_subset(labels: Tensor, size: int, seed: int) -> Tensor:
    """Indices of a fixed, seeded, class-balanced subset (sorted).

    Every class gets ``size // num_classes`` examples; the remainder goes to the first classes.
    """
    classes = torch.unique(labels)
    per_class, remainder = divmod(size, len(classes))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for index, cls in enumerate(classes.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        take = per_class + (1 if index < remainder else 0)
        if take > len(members):
            raise ValueError(f"class {cls} has only {len(members)} examples, {take} requested")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.sort(torch.cat(chosen)).values


def normalize(images: Tensor, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD) -> Tensor:
    """uint8 or [0, 1] float images -> float32 standardized images."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - mean) / std


def augment(images: Tensor, generator: torch.Generator, padding: int = 2, flip: bool = True) -> Tensor:
    """Random crop (zero padding ``padding``, crop back to the input size) and horizontal flip.

    Works on a whole batch with tensor ops; deterministic given the generator state.
    Pads with zeros, so apply it to raw (unnormalized) images, where 0 is the background.

    Shape:
        - images: :math:`(N, C, H, W)`; output: same shape and dtype.
    """
    n, c, h, w = images.shape
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (n,1,h,1)
        cols = (left[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (n,1,1,w)
        batch = torch.arange(n)[:, None, None, None]
        chan = torch.arange(c)[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    return images


@dataclass
class FashionMNIST:
    """Both splits in memory (uint8), optionally restricted to fixed class-balanced subsets."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
        subset_seed: int = 0,
    ) -> "FashionMNIST":
        train_images, train_labels = load_split("train", data_dir)
        test_images, test_labels = load_split("test", data_dir)
        if train_subset:
            idx = balanced_subset(train_labels, train_subset, subset_seed)
            train_images, train_labels = train_images[idx], train_labels[idx]
        if test_subset:
            idx = balanced_subset(test_labels, test_subset, subset_seed + 1)
            test_images, test_labels = test_images[idx], test_labels[idx]
        return cls(train_images, train_labels, test_images, test_labels)


def train_batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    augmentation: bool = True,
    padding: int = 2,
    drop_last: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled, augmented, normalized training batches for one epoch.

    The order and the augmentation depend only on ``(seed, epoch)``.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(labels), generator=generator)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if augmentation:
            x = augment(x, generator, padding=padding)
        yield normalize(x), labels[idx]


def eval_batches(images: Tensor, labels: Tensor, batch_size: int = 500) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalized, unaugmented batches in order."""
    for start in range(0, len(labels), batch_size):
        yield normalize(images[start : start + batch_size]), labels[start : start + batch_size]
