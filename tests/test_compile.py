"""``DPModule.compile()``: torch.compile of the code between capture ops (each capture op
stays eager: its backward hands records to the recorder). Same results as eager."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdp
from fxdp.optim import DPOptimizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        h = F.gelu(self.a(x))
        return self.b(self.ln(h * torch.sigmoid(h)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_compiled_dp_model_trains_as_the_eager_one(capture):
    torch.manual_seed(0)
    base = Net()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, 8, generator=g), torch.randint(0, 3, (B,), generator=g)) for B in (6, 6, 5)]
    weights, grads_seen = [], []
    for compiled in (False, True):
        dp = fxdp.privatize(copy.deepcopy(base), capture=capture, grad_sample_mode="bk")
        opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.3,
                          expected_batch_size=6)
        opt.attach_bookkeeping(dp.bookkeeping)
        if compiled:
            before = sum(torch._dynamo.utils.counters["stats"].values())
            assert dp.compile() is dp
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(dp(x), y).backward()
            opt.step()
        if compiled:  # dynamo compiled frames (the code between the capture ops)
            assert sum(torch._dynamo.utils.counters["stats"].values()) > before
        weights.append([p.detach().clone() for p in dp.parameters()])
        grads_seen.append(opt.clip_stats.num_samples)
    assert grads_seen[0] == grads_seen[1] == 5
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32: compiled kernels may round differently
