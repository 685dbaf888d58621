"""Train a small CNN with DP-SGD on scikit-learn's handwritten digits (no download).

    python examples/digits.py                      # epsilon = 3, delta = 1e-5
    python examples/digits.py --target-epsilon 1 --accountant rdp

The data are the 1797 8x8 grey-scale digits shipped with scikit-learn
(``sklearn.datasets.load_digits``), split 80/20 into training and test sets with a
fixed seed. Pixels are mapped from [0, 16] to [-1, 1] (a fixed, data-independent
scaling, so it costs no privacy). The noise multiplier is calibrated by the
accountant so that the whole run, ``epochs * len(loader)`` Poisson-sampled steps,
stays within ``(target_epsilon, delta)``; the epsilon printed is the accountant's
for the steps actually taken.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import base_parser, train_and_evaluate  # noqa: E402


def digits_cnn(width: int = 8) -> nn.Module:
    """One 3x3 convolution, per-channel GroupNorm (no batch statistics, which DP-SGD
    cannot use), ReLU, 2x2 average pooling, linear classifier: 1.4k parameters. Few
    parameters keep the noise (added to every coordinate) small relative to the signal."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.GroupNorm(width, width),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 4 * 4, 10),
    )


def load(seed: int = 0, test_size: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)

    def tensors(x, y):
        images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
        return TensorDataset(images, torch.tensor(y, dtype=torch.long))

    return tensors(x_train, y_train), tensors(x_test, y_test)


def main(argv: list[str] | None = None) -> dict:
    # 30 epochs of batch 256 (q = 0.18, 180 steps); tiny convolutions run fastest
    # single-threaded (threads only add overhead at 8x8 pixels)
    parser = base_parser(__doc__.splitlines()[0], epochs=30, batch_size=256, lr=3.0, max_grad_norm=1.0,
                         ema=0.95, threads=1)
    parser.add_argument("--width", type=int, default=8, help="convolution channels")
    args = parser.parse_args(argv)
    train_set, test_set = load()  # fixed split (seed 0), independent of --seed
    torch.manual_seed(args.seed)
    return train_and_evaluate(digits_cnn(args.width), train_set, test_set, args)


if __name__ == "__main__":
    main()
