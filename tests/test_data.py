"""The IDX reader and dataset loaders, on hand-made IDX files."""

import gzip
import struct

import numpy as np
import pytest
import torch

from prong_ext import data


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, payload: bytes, gz: bool):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)  # non-square: catches H/W swaps


@pytest.fixture
def labels():
    return np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8(tmp_path, images, labels, gz):
    fi = write(tmp_path / ("img.gz" if gz else "img"), idx_bytes(images), gz)
    fl = write(tmp_path / ("lab.gz" if gz else "lab"), idx_bytes(labels), gz)
    got = data.read_idx(fi)
    assert got.dtype == np.uint8 and got.shape == (7, 5, 3)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(data.read_idx(fl), labels)


def test_read_idx_gzip_detected_by_content(tmp_path, images):
    # gzipped data under a name without .gz, and plain data under a .gz name
    f1 = write(tmp_path / "a-idx3-ubyte", idx_bytes(images), gz=True)
    f2 = write(tmp_path / "b-idx3-ubyte.gz", idx_bytes(images), gz=False)
    np.testing.assert_array_equal(data.read_idx(f1), images)
    np.testing.assert_array_equal(data.read_idx(f2), images)


@pytest.mark.parametrize("code,dtype", [(0x0C, np.int32), (0x0D, np.float32), (0x0B, np.int16)])
def test_read_idx_other_types_big_endian(tmp_path, code, dtype):
    arr = (np.arange(12).reshape(3, 4) * 1000 - 5000).astype(dtype)
    f = write(tmp_path / "x", idx_bytes(arr, code), gz=False)
    np.testing.assert_array_equal(data.read_idx(f), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic_names_file(tmp_path, images, gz):
    payload = b"\x12\x34" + idx_bytes(images)[2:]
    f = write(tmp_path / "bad-images-idx3-ubyte", payload, gz)
    with pytest.raises(ValueError, match="bad-images-idx3-ubyte.*magic number 1234"):
        data.read_idx(f)


def test_truncated_and_unknown_type(tmp_path, images):
    f = write(tmp_path / "short", idx_bytes(images)[:-3], gz=False)
    with pytest.raises(ValueError, match="short.*shape \\(7, 5, 3\\)"):
        data.read_idx(f)
    f = write(tmp_path / "code", idx_bytes(images, 0x42), gz=False)
    with pytest.raises(ValueError, match="code.*type code 0x42"):
        data.read_idx(f)
    with pytest.raises(FileNotFoundError, match="missing-file"):
        data.read_idx(tmp_path / "missing-file")


@pytest.mark.parametrize("gz", [False, True])
def test_load_dataset_from_directory_and_file(tmp_path, images, labels, gz):
    sfx = ".gz" if gz else ""
    write(tmp_path / f"train-images-idx3-ubyte{sfx}", idx_bytes(images), gz)
    write(tmp_path / f"train-labels-idx1-ubyte{sfx}", idx_bytes(labels), gz)
    write(tmp_path / f"t10k-images-idx3-ubyte{sfx}", idx_bytes(images[:2]), gz)
    write(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", idx_bytes(labels[:2]), gz)
    for path in (tmp_path, tmp_path / f"train-images-idx3-ubyte{sfx}"):
        ds = data.load_dataset(path)
        assert ds.train_x.shape == (7, 5, 3) and ds.train_x.dtype == torch.float32
        assert ds.test_x.shape == (2, 5, 3)
        # shuffled once, but every image keeps its label
        x = torch.from_numpy(images.astype(np.float32) / 255)
        for xi, yi in zip(ds.train_x, ds.train_y):
            k = int(torch.nonzero((x - xi).abs().flatten(1).sum(1) == 0)[0])
            assert yi.item() == labels[k]
        assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
        assert ds.train_x.max() == images.max() / 255


def test_load_idx_without_labels_or_test(tmp_path, images):
    f = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images), gz=False)
    x, y = data.load_idx(f)
    assert y is None and x.shape == (7, 5, 3)
    ds = data.load_dataset(tmp_path)
    assert ds.test_x is None


def test_label_count_mismatch(tmp_path, images, labels):
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images), gz=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels[:3]), gz=False)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: 3 labels for 7 images"):
        data.load_idx(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.load_dataset(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_dataset(tmp_path)  # an empty directory


def test_digits_and_downsample():
    ds = data.load_digits()
    assert ds.train_x.shape[1:] == (8, 8) and ds.train_x.shape[0] + ds.test_x.shape[0] == 1797
    assert float(ds.train_x.max()) == 1.0 and float(ds.train_x.min()) == 0.0
    assert ds.subset(10, 5).train_x.shape[0] == 10
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    d = data.downsample(x, 2)
    # bitwise: small integers, so every 2 x 2 sum and its division by 4 are exact in float32
    assert torch.equal(d, x.reshape(2, 2, 2, 2, 2).mean((2, 4)))
    assert d[0, 0, 0].item() == x[0, :2, :2].mean().item() == 2.5
    assert data.downsample(x, 4) is x
