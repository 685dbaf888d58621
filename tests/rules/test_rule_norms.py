"""Per-sample rules for layer/group/instance/RMS norm (functional forms, torch.
aliases, nn modules) against batch-of-one gradients (float64)."""
from __future__ import annotations


import pytest
import torch
from hypothesis import assume, given, settings
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


def _oracle(model, x, r, scale):
    return batch_of_one_grads(model, [x], lambda o, i: _sample_loss(o[0], r[i]) * scale)


def _detached(bound):
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in bound.items()}


def _check(op, args, kwargs, params, model, x, reduction):
    """Bind + forward through the rule, then compare grad_sample with the oracle and
    the book-keeping hooks with the materialized gradients."""
    rule = rule_for_op(op)
    assert rule is not None, f"no rule for {op}"
    bound = rule.bind(args, kwargs)
    for n in params:
        bound[n] = bound[n].detach().requires_grad_(True)
    out = rule.forward(op, bound)
    _close(out, model(x))
    B = x.shape[0]
    r = torch.randn(out.shape, dtype=DT)
    scale = 1.0 if reduction == "sum" else 1.0 / B
    g = _grad_output(out, r, scale)
    bound = _detached(bound)
    needs = frozenset(params)
    gs = rule.grad_sample(bound, g, needs)
    assert set(gs) == set(needs)
    exp = _oracle(model, x, r, scale)
    for n in needs:
        assert gs[n].shape == (B,) + tuple(getattr(model, n).shape)
        _close(gs[n], exp[n])
    # a subset of needs
    for n in needs:
        only = rule.grad_sample(bound, g, frozenset({n}))
        assert set(only) == {n}
        _close(only[n], gs[n], rtol=0, atol=0)
    # book-keeping
    norms = rule.norm_sample_sq(bound, g, needs)
    factors = torch.linspace(0.2, 1.5, B, dtype=DT)
    sums = rule.clipped_sum(bound, g, factors, needs)
    for n in needs:
        _close(norms[n], gs[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        _close(sums[n], torch.einsum("b,b...->...", factors, gs[n]), rtol=1e-9, atol=1e-12)
    return gs


def _module_check(m, x, reduction="mean"):
    """The module adapter's call reproduces the module, and its rule's per-sample
    gradients match the module's batch-of-one gradients."""
    call = module_call_for(m)(m)
    rule = rule_for_op(call.op)
    bound = {"input": x, **{k: getattr(m, v) for k, v in call.params.items()}, **call.kwargs}
    out = rule.forward(call.op, bound)
    _close(out, m(x))
    if not list(m.parameters()):  # nothing trainable: no per-sample gradients
        return call
    B = x.shape[0]
    r = torch.randn(out.shape, dtype=DT)
    scale = 1.0 if reduction == "sum" else 1.0 / B
    g = _grad_output(out, r, scale)
    needs = frozenset(k for k, v in call.params.items() if isinstance(getattr(m, v), nn.Parameter))
    gs = rule.grad_sample(_detached(bound), g, needs)
    exp = _oracle(m, x, r, scale)
    assert set(gs) == {n for n, p in m.named_parameters()}
    for n in needs:
        _close(gs[n], exp[call.params[n]])
    return call


# --------------------------------------------------------------------------- layer norm

LN_CASES = [
    # (input shape, normalized ndim, weight, bias)
    ((4, 6), 1, True, True),
    ((3, 5, 6), 1, True, True),
    ((3, 5, 6), 2, True, False),
    ((2, 3, 4, 5), 2, False, True),
    ((5, 2, 3, 4), 3, True, True),
]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("alias", ["F", "torch"])
@pytest.mark.parametrize("case", LN_CASES)
def test_layer_norm(case, alias, reduction):
    shape, k, use_w, use_b = case
    torch.manual_seed(_seed(case, alias, reduction))
    ns = shape[-k:]
    x = torch.randn(shape, dtype=DT) * 2 + 0.5
    w = torch.randn(ns, dtype=DT) if use_w else None
    b = torch.randn(ns, dtype=DT) if use_b else None
    eps = 1e-3
    params = {n: t for n, t in (("weight", w), ("bias", b)) if t is not None}
    op = F.layer_norm if alias == "F" else torch.layer_norm
    model = FnModel(lambda m, x: F.layer_norm(x, ns, getattr(m, "weight", None), getattr(m, "bias", None), eps),
                    **params)
    _check(op, (x, ns, w, b), {"eps": eps}, list(params), model, x, reduction)


@settings(max_examples=15, derandomize=True, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    k=st.integers(1, 3),
    which=st.sampled_from(["layer", "rms", "group"]),
    mean=st.booleans(),
)
def test_norms_random_shapes(shape, k, which, mean):
    torch.manual_seed(_seed(shape, k, which, mean))
    shape = tuple(shape)
    k = min(k, len(shape) - 1)
    x = torch.randn(shape, dtype=DT) * 1.5 + 0.2
    red = "mean" if mean else "sum"
    if which == "group":
        C = shape[1]
        G = max(d for d in range(1, C + 1) if C % d == 0 and d <= 2)
        per_group = x[0].numel() // G
        if per_group < 2:  # PyTorch refuses one value per group; use one group
            G, per_group = 1, x[0].numel()
        assume(per_group >= 2)
        w, b = torch.randn(C, dtype=DT), torch.randn(C, dtype=DT)
        model = FnModel(lambda m, x: F.group_norm(x, G, m.weight, m.bias), weight=w, bias=b)
        _check(F.group_norm, (x, G, w, b), {}, ["weight", "bias"], model, x, red)
        return
    ns = shape[-k:]
    w, b = torch.randn(ns, dtype=DT), torch.randn(ns, dtype=DT)
    if which == "layer":
        model = FnModel(lambda m, x: F.layer_norm(x, ns, m.weight, m.bias), weight=w, bias=b)
        _check(F.layer_norm, (x, ns, w, b), {}, ["weight", "bias"], model, x, red)
    else:
        model = FnModel(lambda m, x: F.rms_norm(x, ns, m.weight), weight=w)
        _check(F.rms_norm, (x, ns, w), {}, ["weight"], model, x, red)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_module(affine, bias):
    torch.manual_seed(_seed("lnm", affine, bias))
    m = nn.LayerNorm([4, 3], elementwise_affine=affine, bias=bias).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    call = _module_check(m, torch.randn(5, 2, 4, 3, dtype=DT))
    assert call.op is F.layer_norm


# --------------------------------------------------------------------------- RMS norm

RMS_CASES = [
    ((4, 6), 1, None),
    ((3, 5, 6), 1, 1e-6),
    ((3, 5, 6), 2, None),
    ((2, 3, 4, 5), 3, 0.1),
]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("alias", ["F", "torch"])
@pytest.mark.parametrize("case", RMS_CASES)
def test_rms_norm(case, alias, reduction):
    shape, k, eps = case
    torch.manual_seed(_seed(case, alias, reduction))
    ns = shape[-k:]
    x = torch.randn(shape, dtype=DT) + 0.3
    w = torch.randn(ns, dtype=DT)
    op = F.rms_norm if alias == "F" else torch.rms_norm
    model = FnModel(lambda m, x: F.rms_norm(x, ns, m.weight, eps), weight=w)
    _check(op, (x, list(ns)), {"weight": w, "eps": eps}, ["weight"], model, x, reduction)


def test_rms_norm_module():
    torch.manual_seed(5)
    m = nn.RMSNorm(6).to(DT)
    with torch.no_grad():
        m.weight.normal_()
    call = _module_check(m, torch.randn(4, 3, 6, dtype=DT), "sum")
    assert call.op is F.rms_norm and call.kwargs["eps"] is None


# --------------------------------------------------------------------------- group norm

GN_CASES = [
    # (input shape, groups, affine)
    ((4, 6), 3, True),
    ((3, 6, 5), 2, True),
    ((3, 6, 5), 6, True),
    ((2, 4, 3, 5), 1, True),
    ((2, 4, 3, 2, 2), 2, True),
]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("alias", ["F", "torch"])
@pytest.mark.parametrize("case", GN_CASES)
def test_group_norm(case, alias, reduction):
    shape, G, _ = case
    torch.manual_seed(_seed(case, alias, reduction))
    C = shape[1]
    x = torch.randn(shape, dtype=DT) * 1.5 - 0.2
    w, b = torch.randn(C, dtype=DT), torch.randn(C, dtype=DT)
    op = F.group_norm if alias == "F" else torch.group_norm
    model = FnModel(lambda m, x: F.group_norm(x, G, m.weight, m.bias, 1e-4), weight=w, bias=b)
    _check(op, (x, G, w, b, 1e-4), {}, ["weight", "bias"], model, x, reduction)


@pytest.mark.parametrize("samples_per_slice", [1, 2])
@pytest.mark.parametrize("which", ["group", "instance", "instance-fixed-stats"])
def test_channel_norms_in_batch_slices(which, samples_per_slice, monkeypatch):
    """Group and instance norm form x_hat a slice of the batch at a time (bounding the
    temporaries): one sample per slice, and 2 + 2 + 1 of a batch of 5, each equal to
    the batch-of-one gradients (float64)."""
    import fxdp.rules.norms as norms

    torch.manual_seed(samples_per_slice + len(which))
    x = torch.randn(5, 6, 4, 3, dtype=DT) * 1.5 + 0.3
    monkeypatch.setattr(norms, "_CHANNEL_NORM_SLICE_BYTES", samples_per_slice * x[:1].numel() * DT.itemsize)
    calls = []
    inner = norms._AffineNormRule._weight_grads
    monkeypatch.setattr(norms._AffineNormRule, "_weight_grads",
                        lambda self, a, g: calls.append(a["input"].shape[0]) or inner(self, a, g))
    w, b = torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
    if which == "group":
        model = FnModel(lambda m, x: F.group_norm(x, 3, m.weight, m.bias, 1e-4), weight=w, bias=b)
        _check(F.group_norm, (x, 3, w, b, 1e-4), {}, ["weight", "bias"], model, x, "sum")
    elif which == "instance":
        model = FnModel(lambda m, x: F.instance_norm(x, weight=m.weight, bias=m.bias, eps=1e-4), weight=w, bias=b)
        _check(F.instance_norm, (x,), {"weight": w, "bias": b, "eps": 1e-4}, ["weight", "bias"], model, x, "mean")
    else:
        rm, rv = torch.randn(6, dtype=DT), torch.rand(6, dtype=DT) + 0.5
        model = FnModel(lambda m, x: F.instance_norm(x, rm, rv, m.weight, m.bias, False, 0.1, 1e-5), weight=w, bias=b)
        kw = {"running_mean": rm, "running_var": rv, "weight": w, "bias": b, "use_input_stats": False}
        _check(F.instance_norm, (x,), kw, ["weight", "bias"], model, x, "sum")
    assert calls and all(c <= samples_per_slice for c in calls)


def test_group_norm_module():
    torch.manual_seed(6)
    m = nn.GroupNorm(2, 6).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    call = _module_check(m, torch.randn(4, 6, 3, 3, dtype=DT))
    assert call.op is F.group_norm and call.kwargs["num_groups"] == 2


# --------------------------------------------------------------------------- instance norm

IN_SHAPES = [(4, 3, 5), (3, 2, 4, 3), (2, 3, 2, 3, 2)]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("alias", ["F", "torch"])
@pytest.mark.parametrize("shape", IN_SHAPES)
def test_instance_norm(shape, alias, reduction):
    torch.manual_seed(_seed(shape, alias, reduction))
    C = shape[1]
    x = torch.randn(shape, dtype=DT) * 2 + 1
    w, b = torch.randn(C, dtype=DT), torch.randn(C, dtype=DT)
    model = FnModel(lambda m, x: F.instance_norm(x, weight=m.weight, bias=m.bias, eps=1e-4), weight=w, bias=b)
    if alias == "F":
        _check(F.instance_norm, (x,), {"weight": w, "bias": b, "eps": 1e-4}, ["weight", "bias"], model, x, reduction)
    else:
        args = (x, w, b, None, None, True, 0.1, 1e-4, False)
        _check(torch.instance_norm, args, {}, ["weight", "bias"], model, x, reduction)


def test_instance_norm_fixed_running_stats():
    """use_input_stats=False (eval mode with tracked statistics): fixed buffers, exact."""
    torch.manual_seed(7)
    C = 3
    x = torch.randn(4, C, 5, dtype=DT)
    rm, rv = torch.randn(C, dtype=DT), torch.rand(C, dtype=DT) + 0.5
    w, b = torch.randn(C, dtype=DT), torch.randn(C, dtype=DT)
    model = FnModel(lambda m, x: F.instance_norm(x, rm, rv, m.weight, m.bias, False, 0.1, 1e-5), weight=w, bias=b)
    kw = {"running_mean": rm, "running_var": rv, "weight": w, "bias": b, "use_input_stats": False}
    _check(F.instance_norm, (x,), kw, ["weight", "bias"], model, x, "sum")
    rm0, rv0 = rm.clone(), rv.clone()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("cls, shape", [(nn.InstanceNorm1d, (4, 3, 6)), (nn.InstanceNorm2d, (3, 3, 4, 2)),
                                        (nn.InstanceNorm3d, (2, 3, 2, 2, 3))])
def test_instance_norm_modules(cls, shape):
    torch.manual_seed(_seed(cls.__name__))
    m = cls(3, affine=True).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    call = _module_check(m, torch.randn(shape, dtype=DT))
    assert call.op is F.instance_norm and call.kwargs["use_input_stats"] is True
    assert "running_mean" not in call.kwargs


def test_instance_norm_module_eval_with_running_stats():
    torch.manual_seed(8)
    m = nn.InstanceNorm1d(3, affine=True, track_running_stats=True).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    m.eval()
    call = _module_check(m, torch.randn(4, 3, 5, dtype=DT))
    assert call.kwargs["use_input_stats"] is False
    assert call.params["running_mean"] == "running_mean" and "running_mean" not in call.kwargs


def test_instance_norm_running_stats_refused():
    x = torch.randn(2, 3, 4, dtype=DT)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    m = nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
    assert m.training
    with pytest.raises(UnsupportedOpError, match="track_running_stats=False"):
        module_call_for(m)(m)
    rule = rule_for_op(F.instance_norm)
    with pytest.raises(UnsupportedOpError, match="track_running_stats"):
        rule.bind((x, rm, rv), {"use_input_stats": True})
    with pytest.raises(UnsupportedOpError, match="track_running_stats"):
        rule.forward(F.instance_norm, {"input": x, "running_mean": rm, "running_var": rv})
    assert torch.equal(rm, torch.zeros(3, dtype=DT))  # refused before any update
    with pytest.raises(UnsupportedOpError, match="track_running_stats"):
        rule_for_op(torch.instance_norm).bind((x, None, None, rm, rv, True, 0.1, 1e-5, False), {})


def test_norm_aliases_registered():
    for op in (F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.instance_norm,
               torch.instance_norm, F.rms_norm, torch.rms_norm):
        assert rule_for_op(op) is not None, op
    for m in (nn.LayerNorm(3), nn.GroupNorm(1, 2), nn.InstanceNorm1d(2), nn.InstanceNorm2d(2),
              nn.InstanceNorm3d(2), nn.RMSNorm(3)):
        assert module_call_for(m) is not None, m


# --------------------------------------------------------------------------- end to end (fxdp.privatize)

import fxdp  # noqa: E402

from oracle import assert_grad_samples_match  # noqa: E402

needs_privatize = pytest.mark.skipif(not hasattr(fxdp, "privatize"), reason="fxdp.privatize not available")


def _randomize(m):
    torch.manual_seed(21)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


class _ConvNorms(nn.Module):
    """[B, C, L] through group norm, instance norm, layer norm without bias, RMS norm."""

    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.ln = nn.LayerNorm(5, bias=False)
        self.rms = nn.RMSNorm([4, 5])
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        h = self.rms(self.ln(self.inorm(torch.tanh(self.gn(x)))))
        return self.fc(h.flatten(1))


class _FunctionalNorms(nn.Module):
    """Functional forms and torch. aliases on raw parameters."""

    def __init__(self):
        super().__init__()
        self.lw = nn.Parameter(torch.randn(5))
        self.lb = nn.Parameter(torch.randn(5))
        self.gw = nn.Parameter(torch.randn(4))
        self.gb = nn.Parameter(torch.randn(4))
        self.iw = nn.Parameter(torch.randn(4))
        self.rw = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = F.group_norm(x, 2, self.gw, self.gb, 1e-5)
        h = torch.layer_norm(torch.sin(h), [5], self.lw, self.lb, 1e-5, True)
        h = F.instance_norm(h, weight=self.iw)
        h = torch.rms_norm(h, [5], self.rw)
        return h.pow(2).sum(2)


@needs_privatize
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [_ConvNorms, _FunctionalNorms])
def test_privatize_end_to_end(make, reduction):
    torch.manual_seed(22)
    m = _randomize(make().to(DT))
    x = torch.randn(6, 4, 5, dtype=DT) * 2 + 0.5
    dp = fxdp.privatize(m, loss_reduction=reduction)
    assert all(row["rule"] != "functorch" for row in dp.capture_table()), dp.capture_table()
    out = dp(x)
    y = torch.randn(out.shape, dtype=DT)
    loss = (out - y).pow(2).sum(1)
    (loss.mean() if reduction == "mean" else loss.sum()).backward()
    exp = batch_of_one_grads(m, [x], lambda o, i: (o - y[i : i + 1]).pow(2).sum())
    assert_grad_samples_match(dp, exp)


@needs_privatize
def test_privatize_sequence_first_layer_norm():
    """[T, B, D] inputs (batch_first=False): the capture op moves the batch to dim 0."""
    torch.manual_seed(23)
    m = _randomize(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)).to(DT))
    x = torch.randn(6, 3, 4, dtype=DT)
    dp = fxdp.privatize(m, batch_first=False, loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    exp = batch_of_one_grads(m, [x], lambda o, i: o.pow(2).sum(), batch_dims=[1])
    assert_grad_samples_match(dp, exp)


@needs_privatize
def test_privatize_refuses_instance_norm_running_stats():
    m = nn.Sequential(nn.InstanceNorm1d(3, affine=True, track_running_stats=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(UnsupportedOpError, match="track_running_stats=False"):
        fxdp.privatize(m, rewrite_options={"batchnorm": "off"})  # without the pass that turns them off


class _FoldedNorms(nn.Module):
    """LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)`` (a GroupNorm once privatize replaces
    BatchNorm): group norms over a batch-major fold, 2-d rows and ``[B*k, C, L]`` rows."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.gn = nn.GroupNorm(2, 4)
        self.gn3 = nn.GroupNorm(1, 4)

    def forward(self, x):  # [B, T, 4]
        h = self.l(x)
        h = self.gn(h.flatten(0, 1)).reshape_as(h)
        return self.gn3(torch.tanh(h).unsqueeze(-1).expand(-1, -1, -1, 3).flatten(0, 1)).reshape(x.shape[0], -1)


@needs_privatize
def test_group_norm_over_a_folded_batch_is_exact():
    """Served on the export path, which follows the fold's order; symbolic tracing does
    not, and its error names capture='export' (taken by itself given example inputs)."""
    from oracle import bk_clipped_sums, clipped_sums_materialized

    torch.manual_seed(24)
    m = _randomize(_FoldedNorms().to(DT))
    x = torch.randn(5, 3, 4, dtype=DT)
    with pytest.raises(fxdp.BatchDimensionError, match="capture='export'"):
        fxdp.privatize(m, capture="fx")(x).sum().backward()
    assert fxdp.check(m, x).ok  # given inputs, auto capture takes the export path: the check reads it
    for p in m.parameters():
        p.grad = None
    dp = fxdp.privatize(m, loss_reduction="sum", capture="export")
    dp(x).pow(2).sum().backward()
    assert all(row["rule"] != "functorch" for row in dp.capture_table()), dp.capture_table()
    assert_grad_samples_match(dp, batch_of_one_grads(m, [x], lambda o, i: o.pow(2).sum()))
    # book-keeping: clipped sums equal those of the materialized gradients
    for p in m.parameters():
        p.grad = p.grad_sample = None
    w = torch.randn(dp(x).shape, dtype=DT)
    expected = clipped_sums_materialized(fxdp.privatize(m, capture="export"), x, w, 0.3, False)
    dpb = fxdp.privatize(m, capture="export", grad_sample_mode="bk")
    for p in m.parameters():
        p.grad = None
    sums = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), 0.3)
    for p, e in zip(m.parameters(), expected):
        torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)
