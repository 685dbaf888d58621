"""Black-box sensitivity property: for random models built from a grammar of ops,
some of which let samples influence each other (inside submodules, in code symbolic
tracing cannot read, through the batch size), one noiseless DP-SGD step on a
dataset and on the same dataset less one sample differ by at most the clip bound C
(sum reduction, SGD lr 1, sigma 0), or fxdp refuses the model.

This is the guarantee DP-SGD's accounting assumes (add/remove-one sensitivity C);
a silent privacy bug breaks it, whatever its cause.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxdp

D, N, C = 4, 6, 0.5


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)

    def forward(self, x):
        return self.l(x)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = nn.LayerNorm(D)

    def forward(self, x):
        return torch.tanh(self.n(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)

    def forward(self, x):
        return x + torch.tanh(self.l(x))


class Position(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.pos


class Center(nn.Module):  # mixes: a batch statistic
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class Roll(nn.Module):  # mixes: rows move to other samples
    def forward(self, x):
        return torch.roll(x, 1, 0)


class SoftmaxBatch(nn.Module):  # mixes: normalizes over the batch
    def forward(self, x):
        return torch.softmax(x, 0) * x.shape[0]


class BranchOnData(nn.Module):  # mixes, and symbolic tracing cannot read it
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)

    def forward(self, x):
        if x.mean() > 0:
            return self.l(x)
        return -self.l(x)


class BranchOnBatchSize(nn.Module):  # depends on how many samples the batch has
    def forward(self, x):
        if x.shape[0] > N - 1:
            return 3 * x
        return x


class ScaleByBatchSize(nn.Module):  # depends on how many samples the batch has
    def forward(self, x):
        return x * x.shape[0]


BLOCKS = [Linear, Norm, Residual, Position, Center, Roll, SoftmaxBatch, BranchOnData, BranchOnBatchSize,
          ScaleByBatchSize]


class Model(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.blocks = nn.Sequential(*[b() for b in names])
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


def _update(blocks, seed, x, y):
    """The noiseless DP-SGD step's parameter change, or None when fxdp refuses."""
    torch.manual_seed(seed)
    model = Model(blocks).double()
    before = [p.detach().clone() for p in model.parameters()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp, opt, dl = fxdp.PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
                loss_reduction="sum", poisson_sampling=False)
            for xb, yb in dl:
                opt.zero_grad()
                nn.functional.cross_entropy(dp(xb), yb, reduction="sum").backward()
                opt.step()
    except fxdp.FxdpError:
        return None
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       drop=st.integers(0, N - 1))
def test_removing_one_sample_moves_the_update_by_at_most_C_or_fxdp_refuses(blocks, seed, drop):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (N,), generator=g)
    full = _update(blocks, seed, x, y)
    keep = [i for i in range(N) if i != drop]
    less = _update(blocks, seed, x[keep], y[keep])
    if full is None or less is None:
        return  # refused (on either dataset): nothing was trained
    assert float((full - less).norm()) <= C * (1 + 1e-9), [b.__name__ for b in blocks]


@pytest.mark.parametrize("block", [Center, Roll, SoftmaxBatch, BranchOnData, BranchOnBatchSize, ScaleByBatchSize])
def test_every_mixing_block_is_refused(block):
    x = torch.randn(N, D, dtype=torch.float64)
    y = torch.randint(0, 2, (N,))
    assert _update([Linear, block], 0, x, y) is None
