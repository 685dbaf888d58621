"""Train a CNN with DP-SGD on CIFAR-10 from local files (no download, no torchvision).

    python examples/cifar10.py --data-dir ~/data

``--data-dir`` must hold the CIFAR-10 "python version" batches, either directly or
in its ``cifar-10-batches-py/`` folder: ``data_batch_1`` ... ``data_batch_5`` and
``test_batch``. Those files are Python pickles: only point ``--data-dir`` at files
you trust (unpickling can run code). Pixels are mapped from [0, 255] to [-1, 1]
(fixed scaling, no privacy cost). The defaults are a starting point, not tuned here;
DP on CIFAR-10 needs many epochs and large batches (De et al. 2022).
"""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import base_parser, missing_data, train_and_evaluate  # noqa: E402

BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)"


def cifar_cnn(width: int = 32) -> nn.Module:
    """Three conv blocks (GroupNorm: no batch statistics under DP) and a linear classifier."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(), nn.AvgPool2d(2)]

    return nn.Sequential(
        *block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),  # 32 -> 4 pixels
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


def find_folder(data_dir: str) -> str | None:
    for folder in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in BATCHES + ["test_batch"]):
            return folder
    return None


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official format (trusted local files)
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def load(data_dir: str) -> tuple[TensorDataset, TensorDataset]:
    folder = find_folder(data_dir)
    if folder is None:
        missing_data("CIFAR-10", data_dir, "cifar-10-batches-py/ with " + ", ".join(BATCHES) + ", test_batch", URL)

    def tensors(names):
        parts = [read_batch(os.path.join(folder, n)) for n in names]
        x = torch.tensor(np.concatenate([p[0] for p in parts]), dtype=torch.float32) / 127.5 - 1.0
        return TensorDataset(x, torch.tensor(np.concatenate([p[1] for p in parts])))

    return tensors(BATCHES), tensors(["test_batch"])


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0], epochs=30, batch_size=1024, max_physical_batch_size=256,
                         lr=4.0, max_grad_norm=1.0, ema=0.99)
    parser.add_argument("--data-dir", default="data", help="folder with cifar-10-batches-py")
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)
    train_set, test_set = load(os.path.expanduser(args.data_dir))
    torch.manual_seed(args.seed)
    return train_and_evaluate(cifar_cnn(args.width), train_set, test_set, args)


if __name__ == "__main__":
    main()
