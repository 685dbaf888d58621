"""Train a small CNN with DP-SGD on MNIST from local files (no download, no torchvision).

    python examples/mnist.py --data-dir ~/data/mnist

``--data-dir`` must hold the four standard idx files (optionally gzipped, also
found under ``MNIST/raw/`` as torchvision stores them)::

    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

Pixels are mapped from [0, 255] to [-1, 1] (fixed scaling, no privacy cost). The
defaults (expected batch 512 split into physical batches of 256 by
``BatchMemoryManager``) are a starting point, not tuned on MNIST here.
"""
from __future__ import annotations

import gzip
import os
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import base_parser, missing_data, train_and_evaluate  # noqa: E402

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
URL = "https://yann.lecun.com/exdb/mnist/ (or any mirror of the four idx files)"


def mnist_cnn(width: int = 16) -> nn.Module:
    """Two strided convolutions with GroupNorm and a linear classifier (~25k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 5, stride=2, padding=2),  # 14x14
        nn.GroupNorm(4, width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 7x7
        nn.GroupNorm(4, 2 * width),
        nn.ReLU(),
        nn.AvgPool2d(2),  # 3x3
        nn.Flatten(),
        nn.Linear(2 * width * 9, 10),
    )


def find(data_dir: str, name: str) -> str | None:
    for folder in (data_dir, os.path.join(data_dir, "MNIST", "raw"), os.path.join(data_dir, "raw")):
        for suffix in ("", ".gz"):
            path = os.path.join(folder, name + suffix)
            if os.path.isfile(path):
                return path
    return None


def read_idx(path: str) -> np.ndarray:
    """Read an idx file: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian sizes, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {data.size} (truncated file?)")
    return data.reshape(shape)


def load(data_dir: str) -> tuple[TensorDataset, TensorDataset]:
    paths = {k: find(data_dir, v) for k, v in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        missing_data("MNIST", data_dir, "the idx files " + ", ".join(missing) + " (optionally .gz)", URL)

    def tensors(images, labels):
        x = torch.tensor(read_idx(paths[images]), dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0
        return TensorDataset(x, torch.tensor(read_idx(paths[labels]), dtype=torch.long))

    return tensors("train_images", "train_labels"), tensors("test_images", "test_labels")


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0], epochs=15, batch_size=512, max_physical_batch_size=256,
                         lr=2.0, max_grad_norm=1.0, ema=0.99)
    parser.add_argument("--data-dir", default="data/mnist", help="folder with the MNIST idx files")
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args(argv)
    train_set, test_set = load(os.path.expanduser(args.data_dir))
    torch.manual_seed(args.seed)
    return train_and_evaluate(mnist_cnn(args.width), train_set, test_set, args)


if __name__ == "__main__":
    main()
