"""Tied parameters' norms from their uses' factored gradients (``fxdp.rules.tied``): each
rule's factors give its per-sample gradient, cross terms equal the inner products of
materialized gradients, and book-keeping on models whose weights are shared by several
ops (an embedding, its language-model head, a decoder's embedding) equals each sample's
gradient computed alone, without per-sample gradients (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdp
from fxdp import bookkeeping
from fxdp.rules import rule_for_op, tied
from fxdp.rules.tied import GradFactors, cross_inner, factored_cheaper, use_factors

from oracle import batch_of_one_grads, bk_clipped_sums

DT = torch.float64
aten = torch.ops.aten


def _dense(f: GradFactors) -> torch.Tensor:
    """``[B, m, n]``: the per-sample gradients the factors stand for."""
    left = f.left if f.left is not None else F.one_hot(f.index, f.m).to(f.right.dtype)
    return torch.einsum("btm,btn->bmn", left, f.right)


def _factors(kind: str, B: int, T: int, m: int, n: int, g: torch.Generator) -> GradFactors:
    right = torch.randn(B, T, n, generator=g, dtype=DT)
    if kind == "dense":
        return GradFactors(right=right, left=torch.randn(B, T, m, generator=g, dtype=DT))
    index = torch.randint(0, m, (B, T), generator=g)
    index[:, :T // 2] = index[:, -(T // 2):]  # repeated tokens within each sample
    return GradFactors(right=right, index=index, m=m)


@pytest.mark.parametrize("kinds", [("dense", "dense"), ("index", "dense"), ("dense", "index"), ("index", "index")])
@pytest.mark.parametrize("sliced", [False, True])
def test_cross_inner_equals_the_inner_product_of_materialized_gradients(kinds, sliced, monkeypatch):
    if sliced:  # a sample per slice
        monkeypatch.setattr(tied, "_SLICE_BYTES", 1)
    g = torch.Generator().manual_seed(0)
    f, h = _factors(kinds[0], 5, 7, 9, 4, g), _factors(kinds[1], 5, 3, 9, 4, g)
    want = (_dense(f) * _dense(h)).sum((1, 2))
    torch.testing.assert_close(cross_inner(f, h), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross_inner(h, f), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kinds", [("dense", "dense"), ("index", "dense"), ("dense", "index"), ("index", "index")])
def test_cross_inner_of_bfloat16_uses_is_float32(kinds):
    """Half-precision uses (a bfloat16 model's tied embedding and head): the cross term is
    formed in float32, equal to that of the same bfloat16 factors in float64 (its rows'
    products rounded to bfloat16 first read up to 1% off)."""
    g = torch.Generator().manual_seed(1)
    f, h = _factors(kinds[0], 6, 24, 9, 64, g), _factors(kinds[1], 6, 16, 9, 64, g)
    low = [GradFactors(right=x.right.bfloat16(), left=None if x.left is None else x.left.bfloat16(), index=x.index,
                       m=x.m) for x in (f, h)]
    exact = [GradFactors(right=x.right.double(), left=None if x.left is None else x.left.double(), index=x.index,
                         m=x.m) for x in low]
    got = cross_inner(*low)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), cross_inner(*exact), rtol=1e-5, atol=1e-5)


def _bound(op, *args, **kw):
    rule = rule_for_op(op)
    return rule, rule.bind(args, kw)


_OPS = {"linear_seq": F.linear, "linear_rank1": F.linear, "aten_linear": aten.linear.default,
        "addmm": aten.addmm.default, "embedding_pad": F.embedding, "torch_embedding_pad": torch.embedding,
        "embedding_3d": F.embedding}


@pytest.mark.parametrize("case", sorted(_OPS))
def test_each_rules_factors_give_its_per_sample_gradient(case):
    """``G_i = L_iᵀ R_i`` equals the rule's materialized per-sample gradient, laid out as the
    parameter ([m, n] row-major), padding rows adding nothing."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 4, generator=g, dtype=DT)
    ids = torch.randint(0, 6, (3, 5), generator=g)
    ids[0, :2] = 2  # padding positions
    name = "weight"
    if case == "linear_seq":
        rule, args = _bound(F.linear, torch.randn(3, 5, 4, generator=g, dtype=DT), W)
    elif case == "linear_rank1":
        rule, args = _bound(F.linear, torch.randn(3, 4, generator=g, dtype=DT), W)
    elif case == "aten_linear":
        rule, args = _bound(aten.linear.default, torch.randn(3, 2, 5, 4, generator=g, dtype=DT), W)
    elif case == "addmm":  # GPT-2's Conv1D: weight [d, p], alpha scaling the product
        rule, args = _bound(aten.addmm.default, torch.zeros(6, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT),
                            W.t().contiguous(), alpha=0.5)
        name = "mat2"
    elif case == "embedding_pad":
        rule, args = _bound(F.embedding, ids, W, padding_idx=2)
    elif case == "torch_embedding_pad":
        rule, args = _bound(torch.embedding, W, ids, 2)
    else:
        rule, args = _bound(F.embedding, ids.view(3, 5, 1).expand(3, 5, 2), W)
    out = rule.forward(_OPS[case], args)
    gout = torch.randn(out.shape, generator=g, dtype=DT)
    f = rule.grad_factors(args, gout, name)
    assert name in rule.factored and f is not None
    want = rule.grad_sample(args, gout, frozenset({name}))[name]
    torch.testing.assert_close(_dense(f).reshape(want.shape), want, rtol=1e-12, atol=1e-12)
    assert rule.grad_factors(args, gout, "bias") is None


class SharedEmbeddingLM(nn.Module):
    """T5's and BART's layout: one embedding for the encoder's and the decoder's tokens, and
    the language-model head (three uses of one weight; two sequence lengths; padding)."""

    def __init__(self, V: int = 13, D: int = 32):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.enc = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, src, tgt):
        h = torch.tanh(self.enc(self.emb(src))).mean(1, keepdim=True)
        return self.head(torch.tanh(self.emb(tgt) + h))


def _inputs(B: int = 5):
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(0, 13, (B, 4), generator=g), torch.randint(0, 13, (B, 7), generator=g)
    src[:, 0], tgt[1, :3] = 0, 0  # padding
    tgt[2, 3:6] = tgt[2, 0]  # a token repeated within a sample
    return src, tgt


@pytest.mark.parametrize("factored,D", [(True, 32), (True, 6), (False, 32)])
def test_tied_norms_and_clipped_sums_equal_each_sample_alone(factored, D, monkeypatch):
    """Book-keeping norms of the shared weight (three uses) and the clipped sums of every
    parameter equal those of each sample's gradient computed alone; factored, no per-sample
    gradient is formed, from the first pass on (``D = 32``: the head's own norm is a ghost
    norm; ``D = 6``: its rule materializes and keeps its gradients, which would release
    its record as it arrived were the tie not known; ``factored=False``: the materialized
    path, where factors cost more)."""
    formed = []
    real = bookkeeping._per_sample_grads
    monkeypatch.setattr(bookkeeping, "_per_sample_grads", lambda r: formed.append(r) or real(r))
    if not factored:
        monkeypatch.setattr(bookkeeping, "use_factors", lambda fs: False)
    torch.manual_seed(0)
    model = SharedEmbeddingLM(D=D).to(DT)
    src, tgt = _inputs()
    w = torch.randn(5, 7, 13, generator=torch.Generator().manual_seed(3), dtype=DT)
    ref = batch_of_one_grads(model, (src, tgt), lambda o, i: (o[0] * w[i]).sum())
    dp = fxdp.privatize(copy.deepcopy(model), grad_sample_mode="bk", loss_reduction="sum")
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref.values()], 1).norm(dim=1)
    C = float(norms.sort().values[1:3].mean())  # some samples clipped, some not
    assert (norms > C).any() and (norms < C).any()
    factors = (C / (norms + 1e-6)).clamp(max=1)  # Opacus' clip factor, as fxdp.optim.clip
    for _ in range(2):  # the second pass knows the tie as its records arrive
        sums = bk_clipped_sums(dp, lambda: (dp(src, tgt) * w).sum().backward(), C)
        for (n, g), p in zip(ref.items(), [p for p in dp.parameters() if p.requires_grad]):
            torch.testing.assert_close(sums[id(p)], torch.einsum("b,b...->...", factors, g), rtol=1e-9, atol=1e-12,
                                       msg=n)
    assert bool(formed) != factored


def test_factors_are_used_where_every_use_has_them_alike_and_they_cost_less():
    """Three uses of a ``[4, 4]`` weight at T = 64: cross terms (``T² (m + n)`` a pair) cost
    more than materializing (``T m n`` a use); at T = 1 (rank one) they cost less."""
    g = torch.Generator().manual_seed(4)
    long = [_factors("dense", 2, 64, 4, 4, g) for _ in range(3)]
    short = [_factors("dense", 2, 1, 4, 4, g) for _ in range(3)]
    assert not factored_cheaper(long) and factored_cheaper(short)
    emb = _factors("index", 2, 64, 50, 4, g)
    assert factored_cheaper([emb, _factors("dense", 2, 64, 50, 4, g)])  # gathers: T² n against T m n
    assert use_factors(short) and not use_factors(long)
    assert not use_factors([short[0], None])  # a use without factors (a fallback layer): materialized
    assert not use_factors([short[0], _factors("dense", 2, 1, 2, 8, g)])  # laid out differently


def test_check_reports_the_factored_plan():
    report = fxdp.check(SharedEmbeddingLM(), _inputs())
    plan = {lay.name: lay.bookkeeping for lay in report.layers}["emb.weight"]
    assert plan.startswith("tied (used by 3 ops): each use's norm (") and "cross terms" in plan, plan


_TRANSPOSED = {
    "t": lambda h, w: h @ w.t(),
    "T": lambda h, w: h @ w.T,
    "mT": lambda h, w: h @ w.mT,
    "transpose": lambda h, w: torch.matmul(h, w.transpose(0, 1)),
    "transpose_neg": lambda h, w: h.matmul(w.transpose(-1, -2)),
    "permute": lambda h, w: h @ w.permute(1, 0),
    "torch_t": lambda h, w: torch.matmul(h, torch.t(w)),
}


class TransposedHead(nn.Module):
    """A head computed on the embedding's weight, ``h @ W.t()`` (tied), and a raw ``[5, d]``
    parameter used as ``pooled @ P.t()`` on a 2-D input (untied)."""

    def __init__(self, how: str):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.fc = nn.Linear(6, 6)
        self.proj = nn.Parameter(torch.randn(5, 6))
        self.how = _TRANSPOSED[how]

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids)))
        return torch.cat([self.how(h, self.emb.weight).flatten(1), self.how(h.mean(1), self.proj)], 1)


@pytest.mark.parametrize("capture", ["auto", "export"])
@pytest.mark.parametrize("how", sorted(_TRANSPOSED))
def test_matmul_with_a_transposed_weight_is_served_by_the_linear_rule(how, capture, f64):
    """``x @ W.t()`` and its spellings on a 2-D parameter are ``F.linear(x, W)``: served by the
    linear rule (per-sample gradients equal each sample alone), not the ``torch.func``
    fallback, so a head tied to its embedding takes factored norms in book-keeping."""
    from oracle import check_privatized

    torch.manual_seed(0)
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(8))
    ids[0, :2] = 0
    dp = check_privatized(TransposedHead(how), ids, capture=capture)
    rules = {p: r["rule"] for r in dp.capture_table() for p in r["params"] if r["rule"] in ("linear",)}
    assert not [r for r in dp.capture_table() if "torch.func" in r["rule"]], dp.capture_table()
    assert rules.get("emb.weight") == "linear" and rules.get("proj") == "linear", dp.capture_table()
    plan = {lay.name: lay.bookkeeping for lay in fxdp.check(TransposedHead(how), (ids,)).layers}["emb.weight"]
    assert "cross terms" in plan, plan
