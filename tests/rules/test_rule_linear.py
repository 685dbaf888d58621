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


# -- book-keeping: norms and clipped sums of the rule itself -------------------------------

@pytest.mark.parametrize("strip_rows", [64, 2])  # the ghost norm's Grams in one piece, or in strips
@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize(  # [B, ..., d] and p: rank one (T = 1) with d < p and d > p, at ranks 2 and 4
    "shape", [(3, 4, 7), (4, 6, 3), (3, 1, 1, 6, 4), (3, 5, 4, 7), (3, 5, 7, 4), (2, 2, 3, 6, 6)])
def test_book_keeping_norms_and_clipped_sums(shape, method, strip_rows, monkeypatch):
    """Rank one (T = 1), ghost and materialized norms and the clipped sum (which scales the
    smaller of ``a`` and ``g``) against the rule's per-sample gradients, float64."""
    import fxdp.rules.base as base
    from fxdp.rules import rule_for_op

    monkeypatch.setattr(base, "GRAM_STRIP_ROWS", strip_rows)
    monkeypatch.setattr(base, "GRAM_LANE", 2 if strip_rows == 2 else 16)  # strips: an odd T's last row one more
    monkeypatch.setattr(base, "GRAM_LANE_MIN_WORK", 0)

    torch.manual_seed(sum(shape))
    rule = rule_for_op(F.linear)
    *xs, p = shape
    x, w, b = torch.randn(xs), torch.randn(p, xs[-1]), torch.randn(p)
    args = rule.bind((x, w, b), {})
    g = torch.randn_like(rule.forward(F.linear, args))
    factors = torch.rand(xs[0])
    for needs in (frozenset({"weight", "bias"}), frozenset({"weight"}), frozenset({"bias"})):
        gs = rule.grad_sample(args, g, needs)
        norms, _ = rule.norm_sample_sq_keep(args, g, needs, method)
        sums = rule.clipped_sum(args, g, factors, needs)
        assert set(norms) == set(sums) == set(needs)
        for n in needs:
            torch.testing.assert_close(norms[n], gs[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, gs[n]), rtol=1e-9, atol=1e-12)
        # into the optimizer's noise buffer: added in place, nothing returned
        start = {n: torch.randn_like(gs[n][0]) for n in needs}
        into = {n: t.clone() for n, t in start.items()}
        assert rule.clipped_sum(args, g, factors, needs, into=into) == {}
        for n in needs:
            torch.testing.assert_close(into[n] - start[n], sums[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("T", [5, 17, 65])
def test_ghost_norms_of_a_bfloat16_layer_are_float32(T):
    """A bfloat16 layer's ghost norms are its per-sample gradients' to float32 rounding (the
    Gram matrices in float32), as the materialized norms are: not up to 0.5% low."""
    from fxdp.rules import rule_for_op

    torch.manual_seed(T)
    rule = rule_for_op(F.linear)
    x, w, g = torch.randn(8, T, 96).bfloat16(), torch.randn(80, 96).bfloat16(), torch.randn(8, T, 80).bfloat16()
    args = rule.bind((x, w), {})
    want = torch.stack([(g[i].double().t() @ x[i].double()).pow(2).sum() for i in range(8)])
    norms, _ = rule.norm_sample_sq_keep(args, g, frozenset({"weight"}), "ghost")
    assert norms["weight"].dtype == torch.float32
    torch.testing.assert_close(norms["weight"].double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("samples_per_slice", [1, 2, 5])
def test_ghost_norms_in_batch_slices(samples_per_slice, monkeypatch):
    """Ghost norms form their [T, T] Gram matrices a slice of the batch at a time (one
    sample, 2 + 2 + 1, the whole batch of 5): each norm equals that of the sample's
    gradient computed alone (float64)."""
    import fxdp.rules.linear as lin
    from fxdp.rules import rule_for_op

    B, T, d, p = 5, 6, 4, 3
    monkeypatch.setattr(lin, "_GHOST_SLICE_BYTES", samples_per_slice * 3 * T * T * 8)
    calls = []
    inner = torch.bmm
    monkeypatch.setattr(lin.torch, "bmm", lambda x, y: calls.append(x.shape[0]) or inner(x, y))
    torch.manual_seed(samples_per_slice)
    rule = rule_for_op(F.linear)
    x, w = torch.randn(B, T, d), torch.randn(p, d)
    args = rule.bind((x, w), {})
    g = torch.randn(B, T, p)
    norms, kept = rule.norm_sample_sq_keep(args, g, frozenset({"weight"}), "ghost")
    monkeypatch.setattr(lin.torch, "bmm", inner)
    assert not kept and max(calls) == samples_per_slice and sum(calls) == 2 * B
    for i in range(B):
        alone = rule.grad_sample(dict(args, input=x[i : i + 1]), g[i : i + 1], frozenset({"weight"}))["weight"]
        torch.testing.assert_close(norms["weight"][i], alone.pow(2).sum(), rtol=1e-9, atol=1e-12)
