"""Shared pieces of the layer-substitution benchmarks (``bench_lstm.py``,
``bench_attention.py``): one timed training step, and round-robin timing with
medians of per-round ratios (machine load hits every variant alike)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """Forward + cross-entropy + backward, timed; gradients (and ``grad_sample``)
    are consumed outside the timed region."""
    params = list(model.parameters())

    def step() -> float:
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        elapsed = time.perf_counter() - t0
        for p in params:
            p.grad = None
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
        return elapsed

    return step


def interleaved(steps: Dict[str, Callable[[], float]], rounds: int, base: str) -> Dict[str, float]:
    """Run the steps round-robin (the order rotating each round); return each one's
    median time and, as ``<name>_ratio``, its median of per-round ratios to ``base``."""
    names = list(steps)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(steps[k]())
    out = {base: statistics.median(times[base])}
    for k in names:
        if k != base:
            out[k] = statistics.median(times[k])
            out[k + "_ratio"] = statistics.median(t / b for t, b in zip(times[k], times[base]))
    return out
