"""The ReLU-gradient pass (``fxdp/passes/relu_grads.py``): which capture ops it marks, on both
capture paths. What book-keeping does with a mark is tested in ``test_bookkeeping.py``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracle import quiet_privatize


class Chain(nn.Module):
    """Three linear layers; ``act`` between the first two, a ReLU between the last two."""

    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = act

    def forward(self, x):
        return self.c(torch.relu(self.b(self.act(self.a(x)))))


class Branches(nn.Module):
    """Every way the pattern breaks: a ReLU read twice, a layer output read twice, a pool
    between, a second argument, a ReLU after a frozen layer (no capture op before it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.d, self.e = nn.Conv1d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
        self.f, self.g = nn.Linear(4, 4), nn.Linear(4, 4)
        self.f.requires_grad_(False)

    def forward(self, x):  # x [B, 4, 8]
        h = F.relu(self.a(x.transpose(1, 2)))
        y = self.b(h) + h  # the ReLU read twice
        z = self.c(y)
        z = self.d(z.transpose(1, 2) + z.transpose(1, 2).relu())  # c's output read twice
        z = self.e(F.max_pool1d(F.relu(z), 1))  # a pool between
        return self.g(F.relu(self.f(z.transpose(1, 2))))  # f is frozen: no capture op


def _marks(dp, x):
    dp(x)  # the export path captures on the first call
    return {op.module_path: op.grad_from[0].module_path for op in dp.modules()
            if getattr(op, "grad_from", None) is not None}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("act", ["module", "inplace", "leaky"])
def test_marks_a_layer_whose_output_reaches_the_next_layer_through_a_relu(capture, act):
    acts = {"module": nn.ReLU(), "inplace": nn.ReLU(inplace=True), "leaky": nn.LeakyReLU(0.1)}
    dp = quiet_privatize(Chain(acts[act]).double(), grad_sample_mode="bk", capture=capture)
    marks = _marks(dp, torch.randn(3, 5, 4, dtype=torch.float64))
    expected = {"b": "c"} if act == "leaky" else {"a": "b", "b": "c"}  # LeakyReLU's derivative is not a mask
    assert marks == expected


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_marks_nothing_where_the_gradient_has_other_terms(capture):
    dp = quiet_privatize(Branches().double(), grad_sample_mode="bk", capture=capture)
    assert _marks(dp, torch.randn(3, 4, 8, dtype=torch.float64)) == {}
