import gzip
import struct

import numpy as np
import pytest


def _write(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def tiny_fashion(tmp_path):
    """A synthetic Fashion-MNIST directory: 80 train and 40 test images, class = brightness band."""
    rng = np.random.default_rng(0)
    for prefix, n, compress in (("train", 80, True), ("t10k", 40, False)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8) + (labels * 20)[:, None, None].astype(np.uint8)
        suffix = ".gz" if compress else ""
        _write(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        _write(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return tmp_path
