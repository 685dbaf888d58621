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


class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.c2 = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


def test_compiled_model_forms_gradients_through_a_relu_again(monkeypatch):
    """Book-keeping drops c1's output gradient (it follows from c2's record through the ReLU) and
    forms it again at the pass's end: with the ReLU compiled too, the steps equal materialize mode's."""
    from fxdp.bookkeeping import BookKeeping

    monkeypatch.setattr(BookKeeping, "recompute_min_bytes", 0)
    monkeypatch.setattr(BookKeeping, "recompute_min_param_fraction", 0.0)
    formed, restore = [], BookKeeping._restore_grads
    monkeypatch.setattr(BookKeeping, "_restore_grads", staticmethod(
        lambda records: formed.append(sum(r.grad_source is not None for r in records)) or restore(records)))
    torch.manual_seed(3)
    base = ConvReluConv()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    weights = []
    for mode, compiled in (("materialize", False), ("bk", True)):
        dp = fxdp.privatize(copy.deepcopy(base), grad_sample_mode=mode)
        opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.05,
                          expected_batch_size=8)
        if mode == "bk":
            opt.attach_bookkeeping(dp.bookkeeping)
        if compiled:
            dp.compile()
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(dp(x), y).backward()
            opt.step()
        weights.append([p.detach().clone() for p in dp.parameters()])
    assert formed == [1, 1]  # c1's gradient, in each step
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
