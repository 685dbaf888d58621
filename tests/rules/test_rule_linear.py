"""Per-sample rule for ``F.linear`` / ``nn.Linear`` (``fxdp/rules/linear.py``) through
fxdp.privatize: every input rank, both reductions, functional and tied uses, and
subclasses of nn.Linear; grad_sample equals batch-of-one gradients (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracle import check_privatized as check

pytestmark = pytest.mark.usefixtures("f64")


# -- Linear on every rank, both reductions -----------------------------------------------

@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4), (2, 3, 2, 4), (1, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_any_rank(shape, reduction, bias):
    torch.manual_seed(sum(shape))
    model = nn.Sequential(nn.Linear(4, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))
    check(model, torch.randn(*shape), reduction=reduction)


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return F.linear(x, self.w, self.b) + F.linear(x, self.w)  # two uses of one weight


def test_functional_linear_and_tied_uses():
    torch.manual_seed(1)
    dp = check(FunctionalLinear(), torch.randn(4, 3, 4))
    assert [c["rule"] for c in dp.capture_table()] == ["linear", "linear"]


class LinearSub(nn.Linear):
    pass


class LinearOverride(nn.Linear):
    def forward(self, x):
        return F.linear(x * 2.0, self.weight, self.bias)


def test_subclasses_get_the_base_rule_unless_forward_is_overridden():
    torch.manual_seed(2)
    model = nn.Sequential(LinearSub(4, 5), nn.ReLU(), LinearOverride(5, 3))
    dp = check(model, torch.randn(6, 4))
    rules = {c["module"]: c["rule"] for c in dp.capture_table()}
    assert rules == {"0": "linear", "2": "linear"}
