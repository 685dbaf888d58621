"""Per-sample rules for F.embedding / torch.embedding / nn.Embedding and
F.embedding_bag / nn.EmbeddingBag against batch-of-one gradients (float64)."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from fxdp.errors import UnsupportedOpError
from fxdp.rules import module_call_for, rule_for_op

from oracle import FnModel, batch_of_one_grads, grad_output, sample_loss, seed_of

DT = torch.float64
RTOL, ATOL = 1e-6, 1e-9


_seed = seed_of


def _close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


_sample_loss, _grad_output = sample_loss, grad_output


def _oracle(model, inputs, r, scale, batch_dims=None):
    return batch_of_one_grads(model, inputs, lambda o, i: _sample_loss(o[0], r[i]) * scale, batch_dims)


def _run_rule(op, args, kwargs, param_names):
    """Bind and run the rule for ``op``; returns (rule, bound, output)."""
    rule = rule_for_op(op)
    assert rule is not None, f"no rule for {op}"
    bound = rule.bind(args, kwargs)
    for n in param_names:
        bound[n] = bound[n].detach().requires_grad_(True)
    out = rule.forward(op, bound)
    return rule, bound, out


def _detached(bound):
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in bound.items()}


def _check_bookkeeping(rule, bound, g, needs, gs):
    """Book-keeping norms and clipped sums equal the materialized ones (1e-9)."""
    B = g.shape[0]
    norms = rule.norm_sample_sq(bound, g, needs)
    factors = torch.linspace(0.1, 1.7, B, dtype=DT)
    sums = rule.clipped_sum(bound, g, factors, needs)
    for n in needs:
        _close(norms[n], gs[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        _close(sums[n], torch.einsum("b,b...->...", factors, gs[n]), rtol=1e-9, atol=1e-12)
    if rule.clipped_sum_into:  # into the optimizer's noise buffer: added in place, nothing returned
        start = {n: torch.randn_like(gs[n][0]) for n in needs}
        into = {n: t.clone() for n, t in start.items()}
        assert rule.clipped_sum(bound, g, factors, needs, into=into) == {}
        for n in needs:
            _close(into[n] - start[n], sums[n], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- F.embedding

EMB_CASES = [
    # (idx shape, V, D, padding_idx, reduction)
    ((5,), 7, 3, None, "sum"),
    ((4, 6), 5, 4, None, "mean"),
    ((4, 6), 5, 4, 0, "sum"),
    ((3, 4, 5), 6, 2, -1, "mean"),
    ((6, 9), 3, 5, 2, "sum"),
    ((2, 1), 11, 3, None, "mean"),
]


@pytest.mark.parametrize("alias", ["F", "torch"])
@pytest.mark.parametrize("case", EMB_CASES)
def test_embedding_grad_sample(case, alias):
    shape, V, D, pad, red = case
    torch.manual_seed(_seed(case, alias))
    idx = torch.randint(0, V, shape)
    if pad is not None:
        idx.view(-1)[::3] = pad % V  # make sure padding positions occur
    w = torch.randn(V, D, dtype=DT)
    B = shape[0]
    r = torch.randn(*shape, D, dtype=DT)
    scale = 1.0 if red == "sum" else 1.0 / B

    if alias == "F":
        op, args, kwargs = F.embedding, (idx, w), {"padding_idx": pad}
        model = FnModel(lambda m, x: F.embedding(x, m.weight, padding_idx=pad), weight=w)
    else:
        aten_pad = -1 if pad is None else pad % V
        op, args, kwargs = torch.embedding, (w, idx, aten_pad), {}
        model = FnModel(lambda m, x: torch.embedding(m.weight, x, aten_pad), weight=w)
    rule, bound, out = _run_rule(op, args, kwargs, ["weight"])
    _close(out, F.embedding(idx, w, padding_idx=pad))
    g = _grad_output(out, r, scale)
    bound = _detached(bound)
    needs = frozenset({"weight"})
    gs = rule.grad_sample(bound, g, needs)
    exp = _oracle(model, [idx], r, scale)
    assert gs["weight"].shape == (B, V, D)
    _close(gs["weight"], exp["weight"])
    if pad is not None:
        assert gs["weight"][:, pad % V].abs().max() == 0
    _check_bookkeeping(rule, bound, g, needs, gs)
    assert rule.grad_sample(bound, g, frozenset()) == {}


@settings(max_examples=15, derandomize=True, deadline=None)
@given(
    B=st.integers(1, 4),
    rest=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    V=st.integers(1, 6),
    D=st.integers(1, 4),
    pad=st.one_of(st.none(), st.integers(-3, 5)),
    mean=st.booleans(),
)
def test_embedding_random_shapes(B, rest, V, D, pad, mean):
    if pad is not None and not -V <= pad < V:
        pad = None
    torch.manual_seed(_seed(B, rest, V, D, pad, mean))
    shape = (B, *rest)
    idx = torch.randint(0, V, shape)
    w = torch.randn(V, D, dtype=DT)
    r = torch.randn(*shape, D, dtype=DT)
    scale = 1.0 / B if mean else 1.0
    rule, bound, out = _run_rule(F.embedding, (idx, w), {"padding_idx": pad}, ["weight"])
    g = _grad_output(out, r, scale)
    bound = _detached(bound)
    gs = rule.grad_sample(bound, g, frozenset({"weight"}))
    model = FnModel(lambda m, x: F.embedding(x, m.weight, padding_idx=pad), weight=w)
    _close(gs["weight"], _oracle(model, [idx], r, scale)["weight"])
    _check_bookkeeping(rule, bound, g, frozenset({"weight"}), gs)


def test_embedding_negative_aten_padding_means_none():
    """torch.embedding's padding_idx < 0 means 'no padding' (unlike F.embedding's -1)."""
    torch.manual_seed(0)
    V, D = 5, 3
    idx = torch.randint(0, V, (4, 7))
    idx[:, 0] = V - 1
    w = torch.randn(V, D, dtype=DT)
    r = torch.randn(4, 7, D, dtype=DT)
    rule, bound, out = _run_rule(torch.embedding, (w, idx), {"padding_idx": -2}, ["weight"])
    g = _grad_output(out, r, 1.0)
    gs = rule.grad_sample(_detached(bound), g, frozenset({"weight"}))
    model = FnModel(lambda m, x: torch.embedding(m.weight, x, -2), weight=w)
    _close(gs["weight"], _oracle(model, [idx], r, 1.0)["weight"])
    assert gs["weight"][:, V - 1].abs().sum() > 0


def test_embedding_module_call():
    torch.manual_seed(1)
    m = nn.Embedding(9, 4, padding_idx=3).to(DT)
    idx = torch.randint(0, 9, (5, 6))
    idx[:, ::2] = 3
    call = module_call_for(m)(m)
    assert call.op is F.embedding and call.params == {"weight": "weight"}
    rule = rule_for_op(call.op)
    bound = {"input": idx, **{k: getattr(m, v) for k, v in call.params.items()}, **call.kwargs}
    out = rule.forward(call.op, bound)
    _close(out, m(idx))
    r = torch.randn(5, 6, 4, dtype=DT)
    g = _grad_output(out, r, 1 / 5)
    bound = _detached(bound)
    gs = rule.grad_sample(bound, g, frozenset({"weight"}))
    _close(gs["weight"], _oracle(m, [idx], r, 1 / 5)["weight"])
    _check_bookkeeping(rule, bound, g, frozenset({"weight"}), gs)


@pytest.mark.parametrize("count_table", [True, False], ids=["count-table", "row-sort"])
def test_embedding_bookkeeping_is_memory_light(count_table, monkeypatch):
    """V=10,004, T=256, B=512, D=100: norms and clipped sums without [B, V, D]
    (which would take 4 GB in float64); checked against the dense per-sample
    gradients of a few samples. Both ways of finding repeated tokens (a [B, V]
    count table, or sorting each sample when that table would be too large)."""
    import fxdp.rules.embedding as emb

    monkeypatch.setattr(emb, "_COUNT_TABLE_MAX", 1 << 25 if count_table else 0)
    torch.manual_seed(2)
    B, T, V, D = 512, 256, 10_004, 100
    idx = torch.randint(0, V, (B, T))
    idx[:, :40] = torch.randint(0, 30, (B, 40))  # frequent tokens: repeated ids within a sample
    idx[:, -10:] = 0  # padding
    g = torch.randn(B, T, D, dtype=DT)
    w = torch.zeros(V, D, dtype=DT)
    rule = rule_for_op(F.embedding)
    bound = rule.bind((idx, w), {"padding_idx": 0})
    needs = frozenset({"weight"})
    k = [0, 1, 255, 511]
    factors = torch.zeros(B, dtype=DT)
    factors[k] = torch.rand(len(k), dtype=DT) + 0.1  # the clipped sum then involves only these samples
    norms = rule.norm_sample_sq(bound, g, needs)["weight"]
    csum = rule.clipped_sum(bound, g, factors, needs)["weight"]
    assert norms.shape == (B,) and csum.shape == (V, D)
    dense = rule.grad_sample(dict(bound, input=idx[k]), g[k], needs)["weight"]
    _close(norms[k], dense.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    _close(csum, torch.einsum("b,bvd->vd", factors[k], dense), rtol=1e-9, atol=1e-12)
    # every norm: against a per-sample dense computation without the batch
    for i in range(0, B, 97):
        one = rule.grad_sample(dict(bound, input=idx[i : i + 1]), g[i : i + 1], needs)["weight"]
        _close(norms[i], one.pow(2).sum(), rtol=1e-9, atol=1e-12)
    # the reused count table is left zeroed: a second call on other tokens is exact too
    assert all(int(t.abs().max()) == 0 for t in emb._count_scratch.values())
    idx2 = idx.roll(7, dims=1)
    norms2 = rule.norm_sample_sq(dict(bound, input=idx2), g, needs)["weight"]
    one = rule.grad_sample(dict(bound, input=idx2[5:6]), g[5:6], needs)["weight"]
    _close(norms2[5], one.pow(2).sum(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 200, 1 << 20], ids=["per-sample", "uneven", "whole-batch"])
@pytest.mark.parametrize("into", [False, True], ids=["returned", "into-buffer"])
def test_embedding_clipped_sum_in_slices(chunk_bytes, into, monkeypatch):
    """The clipped sum is scattered a cache-sized slice of the batch at a time (one
    sample per slice, uneven slices, one slice): each equals the batch-of-one
    gradients weighted by the clip factors (float64), padding rows excluded."""
    import fxdp.rules.embedding as emb

    monkeypatch.setattr(emb, "_CLIPPED_SUM_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(3)
    B, T, V, D = 7, 5, 6, 3  # 120 bytes of output gradient per sample: 200 B slices hold one
    idx = torch.randint(0, V, (B, T))
    idx[:, 0] = 2  # padding in every sample
    idx[1] = 4  # one sample repeats a token
    g = torch.randn(B, T, D, dtype=DT)
    w = torch.zeros(V, D, dtype=DT)
    rule = rule_for_op(F.embedding)
    bound = rule.bind((idx, w), {"padding_idx": 2})
    needs = frozenset({"weight"})
    factors = torch.linspace(0.2, 1.4, B, dtype=DT)
    ones = [rule.grad_sample(dict(bound, input=idx[i : i + 1]), g[i : i + 1], needs)["weight"][0] for i in range(B)]
    expected = sum(f * o for f, o in zip(factors, ones))
    assert expected[2].abs().max() == 0  # the padding row gets no gradient
    if into:
        start = torch.randn(V, D, dtype=DT)
        buf = {"weight": start.clone()}
        assert rule.clipped_sum(bound, g, factors, needs, into=buf) == {}
        _close(buf["weight"] - start, expected, rtol=1e-12, atol=1e-12)
    else:
        _close(rule.clipped_sum(bound, g, factors, needs)["weight"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "option, value",
    [("max_norm", 1.0), ("scale_grad_by_freq", True), ("sparse", True)],
)
def test_embedding_refusals(option, value):
    w = torch.randn(6, 3, dtype=DT)
    idx = torch.randint(0, 6, (2, 3))
    rule = rule_for_op(F.embedding)
    with pytest.raises(UnsupportedOpError, match=option):
        rule.bind((idx, w), {option: value})
    with pytest.raises(UnsupportedOpError, match=option):
        rule.forward(F.embedding, {"input": idx, "weight": w, option: value})
    m = nn.Embedding(6, 3, **{option: value})
    with pytest.raises(UnsupportedOpError, match=option):
        module_call_for(m)(m)
    if option != "max_norm":  # torch.embedding has no max_norm
        with pytest.raises(UnsupportedOpError, match=option):
            rule_for_op(torch.embedding).bind((w, idx), {option: value})
    if option == "sparse":
        with pytest.raises(UnsupportedOpError, match="sparse=False"):
            rule.bind((idx, w), {"sparse": True})


# --------------------------------------------------------------------------- F.embedding_bag

BAG2D_CASES = [
    # (B, L, V, D, mode, padding_idx, per_sample_weights, reduction)
    (4, 5, 6, 3, "sum", None, False, "sum"),
    (4, 5, 6, 3, "mean", None, False, "mean"),
    (5, 3, 4, 2, "max", None, False, "sum"),
    (5, 6, 5, 4, "sum", 1, True, "mean"),
    (5, 6, 5, 4, "mean", -1, False, "sum"),
    (6, 4, 4, 3, "max", 0, False, "mean"),
    (3, 7, 8, 5, "sum", None, True, "sum"),
    (3, 1, 8, 5, "mean", None, False, "mean"),
]


@pytest.mark.parametrize("case", BAG2D_CASES)
def test_embedding_bag_2d(case):
    B, L, V, D, mode, pad, use_psw, red = case
    torch.manual_seed(_seed(case))
    idx = torch.randint(0, V, (B, L))
    if pad is not None:
        idx[:, 0] = pad % V
        idx[0, :] = pad % V  # a bag made only of padding
    w = torch.randn(V, D, dtype=DT)
    psw = torch.randn(B, L, dtype=DT) if use_psw else None
    r = torch.randn(B, D, dtype=DT)
    scale = 1.0 if red == "sum" else 1.0 / B
    kw = dict(mode=mode, padding_idx=pad)
    rule, bound, out = _run_rule(F.embedding_bag, (idx, w), dict(kw, per_sample_weights=psw), ["weight"])
    assert rule.input_arg is None
    g = _grad_output(out, r, scale)
    bound = _detached(bound)
    needs = frozenset({"weight"})
    gs = rule.grad_sample(bound, g, needs)
    if use_psw:
        model = FnModel(lambda m, x, p: F.embedding_bag(x, m.weight, per_sample_weights=p, **kw), weight=w)
        exp = _oracle(model, [idx, psw], r, scale)
    else:
        model = FnModel(lambda m, x: F.embedding_bag(x, m.weight, **kw), weight=w)
        exp = _oracle(model, [idx], r, scale)
    assert gs["weight"].shape == (B, V, D)
    _close(gs["weight"], exp["weight"])
    if pad is not None:
        assert gs["weight"][0].abs().max() == 0
        assert gs["weight"][:, pad % V].abs().max() == 0
    _check_bookkeeping(rule, bound, g, needs, gs)


BAG1D_CASES = [
    # (bag lengths, V, D, mode, padding_idx, per_sample_weights, include_last_offset)
    ([3, 0, 2, 5, 1], 6, 3, "sum", None, False, False),
    ([3, 0, 2, 5, 1], 6, 3, "mean", None, False, True),
    ([2, 4, 0, 3], 5, 4, "max", None, False, False),
    ([2, 4, 0, 3], 5, 4, "max", 2, False, True),
    ([4, 1, 3, 3, 2, 6], 7, 2, "sum", 3, True, False),
    ([4, 1, 3, 3, 2, 6], 7, 2, "mean", 0, False, True),
    ([1, 1, 1], 4, 5, "sum", None, True, True),
]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", BAG1D_CASES)
def test_embedding_bag_offsets(case, reduction):
    lengths, V, D, mode, pad, use_psw, last = case
    torch.manual_seed(_seed(case, reduction))
    B, N = len(lengths), sum(lengths)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    offsets = torch.cat([starts, torch.tensor([N])]) if last else starts
    idx = torch.randint(0, V, (N,))
    if pad is not None:
        idx[::3] = pad
    w = torch.randn(V, D, dtype=DT)
    psw = torch.randn(N, dtype=DT) if use_psw else None
    r = torch.randn(B, D, dtype=DT)
    scale = 1.0 if reduction == "sum" else 1.0 / B
    kw = dict(mode=mode, padding_idx=pad)
    rule, bound, out = _run_rule(
        F.embedding_bag, (idx, w, offsets), dict(kw, per_sample_weights=psw, include_last_offset=last), ["weight"]
    )
    assert out.shape == (B, D)
    g = _grad_output(out, r, scale)
    bound = _detached(bound)
    needs = frozenset({"weight"})
    gs = rule.grad_sample(bound, g, needs)
    # batch of one: each bag alone
    exp = torch.zeros(B, V, D, dtype=DT)
    for i in range(B):
        s, e = int(starts[i]), int(starts[i]) + lengths[i]
        if e == s:
            continue  # an empty bag outputs zeros: no gradient
        wi = w.clone().requires_grad_(True)
        oi = F.embedding_bag(idx[s:e], wi, torch.tensor([0]), per_sample_weights=None if psw is None else psw[s:e], **kw)
        (exp[i],) = torch.autograd.grad(_sample_loss(oi[0], r[i]) * scale, wi)
    _close(gs["weight"], exp)
    _check_bookkeeping(rule, bound, g, needs, gs)


@pytest.mark.parametrize("mode", ["embedding", "sum", "mean", "max"])
def test_bfloat16_norms_are_float32(mode):
    """A bfloat16 embedding's per-sample norms are its per-sample gradients' to float32
    rounding, repeated tokens and bag coefficients included (in bfloat16 they read up to 1%
    off: a clipped gradient up to 0.5% over the clip bound)."""
    torch.manual_seed(seed_of(f"bf16-{mode}"))
    V, D = 20, 96
    w = torch.randn(V, D).bfloat16()
    if mode == "embedding":
        idx = torch.randint(0, V, (6, 48))  # many repeats per sample
        rule = rule_for_op(F.embedding)
        args = rule.bind((idx, w), {})
        g = torch.randn(6, 48, D).bfloat16()
    else:
        idx, offsets = torch.randint(0, V, (40,)), torch.tensor([0, 7, 15, 22, 30, 36])
        rule = rule_for_op(F.embedding_bag)
        args = rule.bind((idx, w, offsets), dict(mode=mode))
        g = torch.randn(6, D).bfloat16()
    needs = frozenset({"weight"})
    norms = rule.norm_sample_sq(args, g, needs)["weight"]
    # the bag coefficients as the rule forms them for a bfloat16 weight (1/7 rounded), all else exact
    want = rule.grad_sample(args, g.double(), needs)["weight"].flatten(1).pow(2).sum(1)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), want, rtol=1e-5, atol=0)


def test_embedding_bag_module_call():
    torch.manual_seed(3)
    m = nn.EmbeddingBag(7, 3, mode="sum", padding_idx=2).to(DT)
    call = module_call_for(m)(m)
    assert call.op is F.embedding_bag and call.inputs[:2] == ("input", "offsets")
    idx = torch.randint(0, 7, (10,))
    offsets = torch.tensor([0, 4, 4, 7])
    psw = torch.randn(10, dtype=DT)
    rule = rule_for_op(call.op)
    bound = {"input": idx, "offsets": offsets, "per_sample_weights": psw, "weight": m.weight, **call.kwargs}
    out = rule.forward(call.op, bound)
    _close(out, m(idx, offsets, psw))
    r = torch.randn(4, 3, dtype=DT)
    g = _grad_output(out, r, 1.0)
    gs = rule.grad_sample(_detached(bound), g, frozenset({"weight"}))
    lengths = [4, 0, 3, 3]
    for i, (s, n) in enumerate(zip([0, 4, 4, 7], lengths)):
        if n == 0:
            assert gs["weight"][i].abs().max() == 0
            continue
        m.zero_grad()
        _sample_loss(m(idx[s:s + n].view(1, -1), per_sample_weights=psw[s:s + n].view(1, -1))[0], r[i]).backward()
        _close(gs["weight"][i], m.weight.grad)


@pytest.mark.parametrize(
    "option, value",
    [("max_norm", 1.0), ("scale_grad_by_freq", True), ("sparse", True)],
)
def test_embedding_bag_refusals(option, value):
    w = torch.randn(6, 3, dtype=DT)
    idx = torch.randint(0, 6, (2, 3))
    rule = rule_for_op(F.embedding_bag)
    with pytest.raises(UnsupportedOpError, match=option):
        rule.bind((idx, w), {option: value})
    with pytest.raises(UnsupportedOpError, match=option):
        rule.forward(F.embedding_bag, {"input": idx, "weight": w, option: value})
    m = nn.EmbeddingBag(6, 3, **{option: value})
    with pytest.raises(UnsupportedOpError, match=option):
        module_call_for(m)(m)


def test_aliases_registered():
    from fxdp.rules.embedding import EmbeddingRule, TorchEmbeddingRule

    assert isinstance(rule_for_op(F.embedding), EmbeddingRule)
    assert isinstance(rule_for_op(torch.embedding), TorchEmbeddingRule)
    assert rule_for_op(torch.embedding).input_arg == "indices"
    assert module_call_for(nn.Embedding(3, 2)) is not None
    assert module_call_for(nn.EmbeddingBag(3, 2)) is not None


# --------------------------------------------------------------------------- end to end (fxdp.privatize)

import fxdp  # noqa: E402

from oracle import assert_grad_samples_match  # noqa: E402

needs_privatize = pytest.mark.skipif(not hasattr(fxdp, "privatize"), reason="fxdp.privatize not available")


def _randomize(m):
    torch.manual_seed(11)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


class _EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.emb(x)).mean(1)


class _FunctionalEmb(nn.Module):
    """F.embedding and torch.embedding on raw parameters, plus a tied output layer."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(9, 4))
        self.other = nn.Parameter(torch.randn(7, 4))

    def forward(self, x):
        h = F.embedding(x, self.table, padding_idx=2) + torch.embedding(self.other, x % 7, 1)
        return F.linear(torch.tanh(h), self.table).sum(1)


class _BagModel(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 6, mode=mode, padding_idx=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.bag(x))


@needs_privatize
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "make", [_EmbModel, _FunctionalEmb, lambda: _BagModel("sum"), lambda: _BagModel("mean"), lambda: _BagModel("max")]
)
def test_privatize_end_to_end(make, reduction):
    torch.manual_seed(12)
    m = _randomize(make().to(DT))
    x = torch.randint(0, 9, (5, 7))
    x[0, :] = 2  # an all-padding bag / a padded sample
    x[1, :3] = 0
    dp = fxdp.privatize(m, loss_reduction=reduction)
    rules = {row["rule"] for row in dp.capture_table()}
    assert rules & {"embedding", "torch.embedding", "embedding_bag"}, dp.capture_table()
    out = dp(x)
    y = torch.randn(out.shape, dtype=DT)
    loss = (out - y).pow(2).sum(1)
    (loss.mean() if reduction == "mean" else loss.sum()).backward()
    exp = batch_of_one_grads(m, [x], lambda o, i: (o - y[i : i + 1]).pow(2).sum())
    assert_grad_samples_match(dp, exp)


@needs_privatize
@pytest.mark.parametrize("option, value", [("max_norm", 1.0), ("scale_grad_by_freq", True), ("sparse", True)])
def test_privatize_refuses_embedding_options(option, value):
    m = nn.Sequential(nn.Embedding(5, 3, **{option: value}), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(UnsupportedOpError, match=option):
        fxdp.privatize(m)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_last_row_without_padding_and_on_the_export_path(capture, mode, f64):
    """Row V-1 is an ordinary row when padding_idx is None (ATen's -1 would mean row V-1:
    max mode got sample gradients wrong there); the ATen rule of the torch.export graph
    (a 2-D input arrives flattened with offsets) is exact too."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.eb = nn.EmbeddingBag(20, 4, mode=mode)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.eb(x))

    torch.manual_seed(0)
    model = Bag()
    x = torch.randint(0, 20, (3, 5))
    x[0, 1] = 19  # the last row, in a bag where it is the max of some coordinates
    dp = fxdp.privatize(model, capture=capture, loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    assert [c.kind for c in dp.captures if c.kind == "functorch"] == []
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        model(x[i:i + 1]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-10, atol=1e-12, msg=f"{n}, sample {i}")
