"""fxdp.loss_check: a loss reduced otherwise than loss_reduction says is warned about."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxdp


def _warnings(loss_reduction, reduction, loss="ce"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    dp = fxdp.privatize(m, loss_reduction=loss_reduction)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dp(x)
        if loss == "ce":
            nn.functional.cross_entropy(out, y, reduction=reduction).backward()
        else:
            nn.functional.mse_loss(out, torch.randn(16, 3), reduction=reduction).backward()
        dp(x).sum().backward()  # later steps are not checked again
    return [str(w.message) for w in caught if "looks reduced" in str(w.message)]


@pytest.mark.parametrize("loss_reduction, reduction", [("mean", "sum"), ("sum", "mean")])
def test_mismatched_reduction_of_cross_entropy_is_warned_with_the_fix(loss_reduction, reduction):
    msgs = _warnings(loss_reduction, reduction)
    assert len(msgs) == 1 and f"loss_reduction={loss_reduction!r}" in msgs[0] and f"reduction={reduction!r}" in msgs[0]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matching_reduction_and_other_losses_are_silent(reduction):
    assert _warnings(reduction, reduction) == []
    assert _warnings("mean" if reduction == "sum" else "sum", reduction, loss="mse") == []  # not judged
