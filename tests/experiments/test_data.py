"""idx parsing on files the test writes itself; subsets; augmentation."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cbn.experiments import data


def write_idx(path, array, type_code=0x08, compress=False):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "x", images, compress=compress)
    got = data.read_idx(tmp_path / "x", expected_ndim=3)
    assert got.shape == (5, 3, 4) and np.array_equal(got, images)


def test_read_idx_other_dtype(tmp_path):
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    write_idx(tmp_path / "v", values, type_code=0x0C)
    assert np.array_equal(data.read_idx(tmp_path / "v"), values)


def test_bad_files_raise(tmp_path):
    good = np.zeros((2, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "ok", good)
    raw = (tmp_path / "ok").read_bytes()
    with pytest.raises(ValueError, match="magic"):
        data.parse_idx(b"\x01" + raw[1:])
    with pytest.raises(ValueError, match="type code"):
        data.parse_idx(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(ValueError, match="dimensions"):
        data.parse_idx(raw, expected_ndim=1)
    with pytest.raises(ValueError):
        data.parse_idx(raw[:-1])


def test_load_split_from_dir_and_missing_hint(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)  # uncompressed
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, compress=True)
    x, y = data.load_split("test", tmp_path)
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    with pytest.raises(data.DataNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        data.load_split("train", tmp_path)


def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.arange(1000) % 10
    a = data.balanced_subset(labels, 200, seed=3)
    b = data.balanced_subset(labels, 200, seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 200
    assert torch.bincount(labels[a], minlength=10).tolist() == [20] * 10
    assert not torch.equal(a, data.balanced_subset(labels, 200, seed=4))


def test_augment_is_a_shifted_flipped_crop_and_deterministic():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out1 = data.augment(x, torch.Generator().manual_seed(0), padding=2)
    out2 = data.augment(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out1, out2) and out1.shape == x.shape
    # independent oracle: every output equals one of the 25 crops of the padded image, maybe flipped
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        candidates = [padded[n, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out1[n], c) for c in candidates)


def test_train_batches_cover_epoch_once():
    images = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(64)
    seen = torch.cat([y for _, y in data.train_batches(images, labels, 8, seed=0, epoch=0)])
    assert sorted(seen.tolist()) == list(range(64))
    again = torch.cat([y for _, y in data.train_batches(images, labels, 8, seed=0, epoch=0)])
    assert torch.equal(seen, again)
    other = torch.cat([y for _, y in data.train_batches(images, labels, 8, seed=0, epoch=1)])
    assert not torch.equal(seen, other)


def test_normalize():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    got = data.normalize(x, mean=0.5, std=0.25)
    torch.testing.assert_close(got, torch.tensor([[[[-2.0, 2.0]]]]))
