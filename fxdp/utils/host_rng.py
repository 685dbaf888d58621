"""Draws a capture cannot trace: NumPy's and Python's global generators (and torch's, while
symbolic tracing).

A capture records torch ops on its inputs as graph nodes, which draw on every step. A draw
from ``np.random`` or ``random`` (and, under symbolic tracing, a torch op on values that are
not the inputs') runs once, while the model is captured, and its outcome becomes part of
the graph: the same SpecAugment mask, or the same LayerDrop decision, for every step.
:func:`watch_draws` tells whether a capture drew, and leaves the generators as they were.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, List

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["watch_draws", "fork_rng"]


class Draws:
    """Which generators a capture drew from (``names``, empty: none)."""

    def __init__(self) -> None:
        self.names: List[str] = []


@contextlib.contextmanager
def watch_draws(torch_too: bool) -> Iterator[Draws]:
    """Record whether the block draws from NumPy's or Python's global generator (and
    torch's CPU generator with ``torch_too``); a generator that drew is set back to its
    state before the block (a capture should not move the user's random streams)."""
    found = Draws()
    py, npy = random.getstate(), np.random.get_state()
    th = torch.random.get_rng_state() if torch_too else None
    try:
        yield found
    finally:
        if random.getstate() != py:
            found.names.append("Python's random")
            random.setstate(py)
        after = np.random.get_state()
        if after[0] != npy[0] or not np.array_equal(after[1], npy[1]) or after[2:] != npy[2:]:
            found.names.append("NumPy's np.random")
            np.random.set_state(npy)
        if th is not None and not torch.equal(th, torch.random.get_rng_state()):
            found.names.append("torch's generator (outside the ops on the inputs)")
            torch.random.set_rng_state(th)


def fork_rng(*objs: Any) -> Any:
    """``torch.random.fork_rng`` over the CPU and the CUDA devices of the tensors in ``objs``: an
    analysis's extra runs draw what they draw and leave the model's random streams as they were."""
    devices = sorted({t.device.index or 0 for t in tree_flatten(list(objs))[0]
                      if isinstance(t, Tensor) and t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)
