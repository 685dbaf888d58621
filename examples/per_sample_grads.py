"""Per-sample gradients of a real model in one backward pass, checked against
batch-of-one gradients.

A small CNN on scikit-learn's handwritten digits (real data shipped inside
scikit-learn; no download). ``fxdp.privatize`` rewrites the model's graph; one
``loss.backward()`` gives ``p.grad_sample`` for every parameter. The script
prints each sample's gradient norm and the largest difference from computing
that sample's gradient alone.

    python examples/per_sample_grads.py [--batch-size 16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect")
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)
        self.temperature = nn.Parameter(torch.ones(1))  # a raw parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x) / self.temperature


def load_digits_tensors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - message for users
        raise SystemExit("this example needs scikit-learn: pip install 'fxdp[examples]'") from e
    digits = load_digits()
    x = torch.tensor(digits.images[:n] / 16.0, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(digits.target[:n])
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = DigitsCNN().double()
    x, y = load_digits_tensors(args.batch_size)
    dp_model = fxdp.privatize(model)

    t0 = time.perf_counter()
    loss = F.cross_entropy(dp_model(x), y)  # mean over the batch
    loss.backward()
    elapsed = time.perf_counter() - t0

    params = [(n, p) for n, p in dp_model.named_parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for _, p in params], 1).norm(dim=1)

    worst = 0.0
    for i in range(len(x)):  # reference: each sample alone, plain PyTorch
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [p for _, p in params])
        for (_, p), g in zip(params, grads):
            worst = max(worst, (p.grad_sample[i] - g).abs().max().item() / max(g.abs().max().item(), 1e-300))

    print("layer rules:")
    for row in dp_model.capture_table():
        print(f"  {row['module'] or row['name']:<12} {row['rule']:<28} {', '.join(row['params'])}")
    print(f"\nper-sample gradient norms ({len(x)} digits, one backward pass, {elapsed * 1e3:.1f} ms):")
    for i, (label, nrm) in enumerate(zip(y.tolist(), norms.tolist())):
        print(f"  sample {i:2d} (digit {label}): {nrm:.6f}")
    print(f"\nlargest relative difference from batch-of-one gradients: {worst:.2e}")
    if worst > 1e-9:
        raise SystemExit("per-sample gradients do not match batch-of-one gradients")
    print("per-sample gradients match batch-of-one gradients (float64)")


if __name__ == "__main__":
    main()
