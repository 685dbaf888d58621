"""Per-sample rules for convolutions (``F.conv*``, ``torch.conv*``, ``nn.Conv*`` with
every padding mode, transposed convolutions) against batch-of-one gradients
(float64), both extraction methods, and the book-keeping hooks against the
materialized path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxdp
from fxdp.errors import FxdpError, UnsupportedOpError
from fxdp.rules import module_call_for, rule_for_op
from fxdp.rules import conv as C
from fxdp.rules import conv_grads

from oracle import assert_grad_samples_match, batch_of_one_grads, seed_of

pytestmark = [pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths"),
              pytest.mark.usefixtures("one_thread")]  # tiny tensors: one intra-op thread

DT = torch.float64
RTOL, ATOL = 1e-6, 1e-9
METHODS = ("groups", "unfold", "correlate")
MODES = ("zeros", "reflect", "replicate", "circular")


_seed = seed_of


class FnModel(nn.Module):
    """Holds ``weight``/``bias``; forward calls ``op(x, weight, bias, **kwargs)``."""

    def __init__(self, op, weight, bias, kwargs):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.op, self.kwargs = op, kwargs

    def forward(self, x):
        return self.op(x, self.weight, self.bias, **self.kwargs)


def _force(monkeypatch, rule, method):
    """Make ``rule`` use one extraction method (``None``: its own heuristic)."""
    if method == "groups":
        monkeypatch.setattr(rule, "groups_weight_per_position", float("inf"))
        monkeypatch.setattr(rule, "unfold_max_positions", -1)  # no small-map unfold either
    elif method == "unfold":
        monkeypatch.setattr(rule, "groups_weight_per_position", -1.0)
    # "correlate" serves every layer with one input channel per group (on small maps when
    # that is the only channel), "pointwise" every 1x1 one; the others keep the heuristic
    monkeypatch.setattr(rule, "correlate_min_kernel", 0 if method == "correlate" else float("inf"))
    monkeypatch.setattr(rule, "pointwise", method == "pointwise")


def _loss(out, reduction, r):
    """Loss of the batch and the oracle's per-sample loss term."""
    B = out.shape[0]
    if reduction == "square":
        return 0.5 * (out**2).sum() / B, lambda o, i: 0.5 * (o**2).sum() / B
    scale = 1.0 / B if reduction == "mean" else 1.0
    return (out * r).sum() * scale, lambda o, i: (o * r[i : i + 1]).sum() * scale


def _run(model, rule, op, bound, x, reduction, seed):
    """Forward through the rule, output gradient, per-sample grads and the oracle's."""
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        out = rule.forward(op, bound)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)  # the rule's forward is the model's
    r = torch.randn_like(out)
    o = out.detach().requires_grad_(True)
    loss, per_sample = _loss(o, reduction, r)
    (g,) = torch.autograd.grad(loss, o)
    needs = frozenset(n for n in ("weight", "bias") if getattr(model, n, None) is not None)
    args = {**bound, "input": x}
    got = rule.grad_sample(args, g, needs)
    exp = batch_of_one_grads(model, [x], per_sample)
    assert set(got) == set(needs)
    for n in needs:
        assert got[n].shape == exp[n].shape, n
        torch.testing.assert_close(got[n], exp[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    return args, g, needs


def _check_module(m, x, reduction, seed):
    adapter = module_call_for(m)
    assert adapter is not None
    call = adapter(m)
    rule = rule_for_op(call.op)
    bound = {"input": x, "weight": m.weight, "bias": m.bias, **call.kwargs}
    rule.bind((), bound)  # the names the capture pass binds are the rule's
    return _run(m, rule, call.op, bound, x, reduction, seed)


def _check_fn(op, x, w, b, kwargs, reduction, seed):
    model = FnModel(op, w, b, kwargs)
    rule = rule_for_op(op)
    bound = rule.bind((x, model.weight, model.bias), kwargs)
    return _run(model, rule, op, bound, x, reduction, seed)


# ----------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------
def test_registered_ops_and_aliases():
    for n in (1, 2, 3):
        f, t = getattr(F, f"conv{n}d"), getattr(torch, f"conv{n}d")
        assert rule_for_op(f) is not None and rule_for_op(f) is rule_for_op(t)
        ft, tt = getattr(F, f"conv_transpose{n}d"), getattr(torch, f"conv_transpose{n}d")
        assert rule_for_op(ft) is not None and rule_for_op(ft) is rule_for_op(tt)
    assert isinstance(rule_for_op(C.conv_nd), C.ConvNdRule)
    assert isinstance(rule_for_op(C.conv_transpose_nd), C.ConvTransposeNdRule)


def test_module_adapters_and_subclasses():
    class Plain(nn.Conv2d):
        pass

    class OwnForward(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class OwnConvForward(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, w - w.mean(), b)

    for m in (nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 1), Plain(2, 2, 1), nn.LazyConv2d(2, 1)):
        assert module_call_for(m)(m).op is C.conv_nd
    for m in (nn.ConvTranspose1d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1), nn.ConvTranspose3d(2, 2, 1)):
        assert module_call_for(m)(m).op is C.conv_transpose_nd
    assert module_call_for(OwnForward(2, 2, 1)) is None  # traced through
    m = OwnConvForward(2, 2, 1)
    with pytest.raises(UnsupportedOpError, match="_conv_forward"):
        module_call_for(m)(m)


# ----------------------------------------------------------------------------
# functional convolutions
# ----------------------------------------------------------------------------
# (op, x shape, w shape, bias, kwargs)
FN_CASES = [
    (F.conv2d, (3, 4, 9, 8), (6, 2, 3, 3), True, dict(stride=2, padding=1, groups=2)),
    (torch.conv2d, (3, 3, 7, 8), (4, 3, 2, 4), False, dict(padding="same", dilation=(1, 2))),
    (F.conv2d, (3, 3, 9, 7), (5, 3, 3, 2), True, dict(padding="valid", stride=(2, 1), dilation=2)),
    (F.conv2d, (3, 3, 7, 7), (6, 1, 3, 3), True, dict(padding=1, groups=3)),  # depthwise x2
    (F.conv2d, (3, 4, 8, 8), (4, 1, 3, 3), False, dict(padding=(0, 2), stride=3, groups=4)),  # depthwise
    (F.conv2d, (2, 2, 8, 8), (3, 2, 4, 4), True, dict(padding="same")),  # even kernel, asymmetric
    (F.conv1d, (3, 3, 11), (4, 3, 4), True, dict(padding="same", dilation=3)),
    (torch.conv1d, (3, 4, 10), (6, 2, 3), True, dict(stride=2, padding=1, groups=2)),
    (F.conv1d, (2, 2, 9), (2, 1, 5), False, dict(stride=(3,), padding=(2,), groups=2)),
    (F.conv3d, (2, 4, 5, 6, 5), (4, 2, 2, 3, 2), True, dict(stride=(1, 2, 1), padding=(1, 0, 1), groups=2)),
    (torch.conv3d, (2, 2, 5, 4, 5), (3, 2, 2, 2, 3), False, dict(padding="same", dilation=(1, 2, 1))),
    (F.conv3d, (2, 3, 6, 5, 5), (3, 1, 3, 3, 3), True, dict(stride=2, dilation=(1, 1, 2), groups=3)),
    # one input channel, strided (MNIST's first layer): correlation by the heuristic too
    (F.conv2d, (3, 1, 12, 11), (4, 1, 4, 3), True, dict(stride=2, padding=(3, 1))),
    # depthwise, stride 1 (per-sample gradients by correlation when forced)
    (F.conv2d, (3, 3, 9, 8), (6, 1, 5, 3), True, dict(padding="same", dilation=(2, 1), groups=3)),
    (F.conv1d, (2, 4, 12), (4, 1, 5), True, dict(padding=1, dilation=2, groups=4)),
    (F.conv3d, (2, 2, 5, 6, 4), (2, 1, 3, 2, 3), False, dict(padding=(1, 0, 2), groups=2)),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(FN_CASES)))
def test_functional_conv(case, method, monkeypatch):
    op, xs, ws, bias, kw = FN_CASES[case]
    _force(monkeypatch, rule_for_op(op), method)
    torch.manual_seed(_seed("fn", case))
    x, w = torch.randn(xs, dtype=DT), torch.randn(ws, dtype=DT)
    b = torch.randn(ws[0], dtype=DT) if bias else None
    _check_fn(op, x, w, b, kw, ("sum", "mean", "square")[case % 3], _seed("fn", case))


@pytest.mark.parametrize("samples_per_slice", [1, 2])
@pytest.mark.parametrize("case", range(len(FN_CASES)))
def test_groups_method_in_batch_slices(case, samples_per_slice, monkeypatch):
    """The batch-as-groups method runs a slice of the batch at a time (bounding oneDNN's
    workspace): one sample per slice, and two (2 + 1 of a batch of 3), each equal to
    the batch-of-one gradients in float64."""
    op, xs, ws, bias, kw = FN_CASES[case]
    _force(monkeypatch, rule_for_op(op), "groups")
    torch.manual_seed(_seed("slices", case))
    x, w = torch.randn(xs, dtype=DT), torch.randn(ws, dtype=DT)
    b = torch.randn(ws[0], dtype=DT) if bias else None
    with torch.no_grad():
        g_bytes = op(x[:1], w, b, **kw).numel() * DT.itemsize
    # a slice of exactly this many samples' input and output gradient
    monkeypatch.setattr(conv_grads, "GROUPS_SLICE_BYTES", samples_per_slice * (x[:1].numel() * DT.itemsize + g_bytes))
    calls = []
    inner = conv_grads._ps_groups
    monkeypatch.setattr(conv_grads, "_ps_groups", lambda geo, x, g: calls.append(x.shape[0]) or inner(geo, x, g))
    _check_fn(op, x, w, b, kw, ("sum", "mean", "square")[case % 3], _seed("slices", case))
    if calls:  # depthwise stride-1 layers may take another method
        # (an explicitly padded input makes a sample's bytes larger: slices can be smaller)
        assert sum(calls) == xs[0] and max(calls) <= samples_per_slice


@pytest.mark.parametrize("samples_per_slice", [1, 2])
@pytest.mark.parametrize("case", [c for c, (_, xs, ws, _, kw) in enumerate(FN_CASES) if ws[1] == 1])
def test_correlate_method_in_batch_slices(case, samples_per_slice, monkeypatch):
    """The correlation method (one input channel per group) also runs a slice of the batch
    at a time: each slice's per-sample gradients equal the batch-of-one ones (float64)."""
    op, xs, ws, bias, kw = FN_CASES[case]
    _force(monkeypatch, rule_for_op(op), "correlate")
    torch.manual_seed(_seed("corr-slices", case))
    x, w = torch.randn(xs, dtype=DT), torch.randn(ws, dtype=DT)
    b = torch.randn(ws[0], dtype=DT) if bias else None
    monkeypatch.setattr(conv_grads, "samples_per_slice", lambda budget, *t, **k: samples_per_slice)
    calls = []
    inner = conv_grads._ps_correlate
    monkeypatch.setattr(conv_grads, "_ps_correlate", lambda geo, x, g, pad: calls.append(x.shape[0]) or inner(geo, x, g, pad))
    _check_fn(op, x, w, b, kw, ("sum", "mean", "square")[case % 3], _seed("corr-slices", case))
    assert sum(calls) == xs[0] and max(calls) == samples_per_slice


@pytest.mark.parametrize("samples_per_slice", [1, 2, 100])
def test_correlate_clipped_sum_in_batch_slices(samples_per_slice, monkeypatch):
    """Book-keeping's clipped sum of a depthwise layer (ConvNeXt's 7x7 at a 2x2 map) is the
    per-sample correlations summed a slice of the batch at a time: equal to the factors'
    combination of each sample's own gradient (float64, batch of one), whatever the slices."""
    torch.manual_seed(_seed("corr-sum-slices", samples_per_slice))
    m = nn.Conv2d(6, 6, 7, padding=3, groups=6).to(DT)
    call = module_call_for(m)(m)
    rule = rule_for_op(call.op)
    x = torch.randn(5, 6, 2, 2, dtype=DT)
    bound = {"input": x, "weight": m.weight, "bias": m.bias, **call.kwargs}
    g = torch.randn_like(rule.forward(call.op, bound))
    assert rule.method(*rule._setup(bound, g)) == "correlate" and not rule.bk_keeps(bound, g, frozenset({"weight"}))
    monkeypatch.setattr(conv_grads, "samples_per_slice", lambda budget, *t, **k: samples_per_slice)
    factors = torch.rand(5, dtype=DT)
    sums = rule.clipped_sum(bound, g, factors, frozenset({"weight", "bias"}))
    alone = batch_of_one_grads(m, [x], lambda out, i: (out * g[i:i + 1]).sum())
    for n in ("weight", "bias"):
        torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, alone[n]), rtol=1e-9, atol=1e-12)


# one input channel a group on a one-position output map (the last stage of an ImageNet
# network at 32x32): padding above the input, channel multipliers, dilation, stride, 1-d/3-d
ONE_POSITION_CASES = [
    (F.conv2d, (4, 6, 1, 1), (6, 1, 5, 5), True, dict(padding=2, groups=6)),  # EfficientNet's 5x5
    (F.conv2d, (3, 4, 1, 1), (8, 1, 3, 3), False, dict(padding=1, groups=4)),  # multiplier 2
    (F.conv2d, (3, 3, 1, 1), (3, 1, 3, 3), True, dict(padding=2, dilation=2, groups=3)),
    (F.conv2d, (3, 4, 2, 2), (4, 1, 3, 3), True, dict(stride=2, padding=1, groups=4)),
    (F.conv2d, (3, 5, 3, 3), (5, 1, 3, 3), False, dict(groups=5)),  # valid, the kernel covers the map
    (F.conv2d, (3, 1, 4, 4), (3, 1, 4, 4), True, {}),  # one input channel
    (F.conv1d, (3, 4, 1), (8, 1, 5), True, dict(padding=2, groups=4)),
    (F.conv3d, (2, 3, 1, 1, 1), (3, 1, 3, 3, 3), True, dict(padding=1, groups=3)),
]


class _GroupedConvCalls(TorchDispatchMode):
    """The grouped convolutions issued with a one-position kernel (PyTorch's slow path)."""

    def __init__(self):
        super().__init__()
        self.slow = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[-1] > 1 and math.prod(args[1].shape[2:]) == 1:
            self.slow.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", range(len(ONE_POSITION_CASES)))
def test_correlate_on_one_position_maps(case):
    """Per-sample gradients of a layer whose output map is one position are the output gradient
    times the taps it read (no grouped convolution: PyTorch loops over a one-tap kernel's groups):
    equal to batch-of-one gradients (float64), and book-keeping's clipped sum to the factors'
    combination of them."""
    op, xs, ws, bias, kw = ONE_POSITION_CASES[case]
    rule = rule_for_op(op)
    torch.manual_seed(_seed("one-position", case))
    x, w = torch.randn(xs, dtype=DT), torch.randn(ws, dtype=DT)
    b = torch.randn(ws[0], dtype=DT) if bias else None
    with _GroupedConvCalls() as calls:
        args, g, needs = _check_fn(op, x, w, b, kw, ("sum", "mean", "square")[case % 3], _seed("one-position", case))
    assert math.prod(g.shape[2:]) == 1 and rule.method(*rule._setup(args, g)) == "correlate"
    factors = torch.rand(xs[0], dtype=DT)
    with _GroupedConvCalls() as sum_calls:
        sums = rule.clipped_sum(args, g, factors, needs)
    ps = rule.grad_sample(args, g, needs)
    for n in needs:
        torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, ps[n]), rtol=1e-12, atol=1e-12)
    assert calls.slow == [] and sum_calls.slow == []


# ----------------------------------------------------------------------------
# modules, every padding mode
# ----------------------------------------------------------------------------
# (dim, in, out, kernel, kwargs, spatial size)
MOD_CASES = [
    (1, 4, 8, 3, dict(padding=2, dilation=2, groups=4), (11,)),
    (1, 3, 2, 4, dict(padding="same"), (9,)),
    (2, 4, 6, 3, dict(stride=2, padding=1, groups=2), (9, 8)),
    (2, 4, 6, (2, 3), dict(padding="same", dilation=(2, 1)), (9, 8)),
    (2, 3, 3, 4, dict(padding="same", groups=3), (7, 8)),
    (2, 4, 6, 4, dict(padding=(1, 2), stride=(2, 3)), (9, 8)),
    (3, 4, 8, (2, 3, 2), dict(padding=(1, 0, 2), stride=(1, 2, 2), groups=2), (5, 6, 7)),
    (3, 3, 6, 2, dict(padding="same", groups=3), (4, 5, 4)),
]
_MOD = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(MOD_CASES)))
def test_conv_module(case, mode, method, monkeypatch):
    dim, cin, cout, k, kw, size = MOD_CASES[case]
    _force(monkeypatch, rule_for_op(C.conv_nd), method)
    torch.manual_seed(_seed("mod", case, mode))
    m = _MOD[dim](cin, cout, k, bias=case % 4 != 1, padding_mode=mode, **kw).to(DT)
    x = torch.randn((3, cin) + size, dtype=DT)
    _check_module(m, x, ("mean", "sum", "square")[case % 3], _seed("mod", case, mode))


POINTWISE_CASES = [  # 1x1, stride 1, one group: (module, input shape, memory format)
    (lambda: nn.Conv2d(5, 7, 1), (3, 5, 4, 6), torch.channels_last),
    (lambda: nn.Conv2d(5, 7, 1, bias=False), (3, 5, 4, 6), torch.contiguous_format),
    (lambda: nn.Conv1d(4, 3, 1), (3, 4, 9), torch.contiguous_format),
    (lambda: nn.Conv3d(3, 4, 1), (2, 3, 3, 4, 2), torch.channels_last_3d),
    (lambda: nn.ConvTranspose2d(4, 6, 1), (3, 4, 5, 5), torch.channels_last),
]


@pytest.mark.parametrize("case", range(len(POINTWISE_CASES)))
def test_pointwise_convolutions_in_both_layouts(case):
    """1x1 convolutions: per-sample gradients by one batched matmul on views of the input
    and output gradient, channel-first or channels-last (ConvNeXt's permuted LayerNorm
    hands its 1x1 convolutions channels-last tensors), against batch-of-one gradients;
    book-keeping norms and clipped sums (the latter with ``g`` in the input's layout)."""
    ctor, shape, fmt = POINTWISE_CASES[case]
    torch.manual_seed(_seed("pointwise", case))
    m = ctor().to(DT)
    x = torch.randn(shape, dtype=DT).contiguous(memory_format=fmt)
    args, g, needs = _check_module(m, x, "sum", _seed("pointwise", case))
    rule = rule_for_op(module_call_for(m)(m).op)
    assert rule.method(*rule._setup(args, g)) == "pointwise"
    gs = rule.grad_sample(args, g, needs)
    factors = torch.rand(shape[0], dtype=DT)
    norms, sums = rule.norm_sample_sq(args, g, needs), rule.clipped_sum(args, g, factors, needs)
    for n in needs:
        torch.testing.assert_close(norms[n], gs[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, gs[n]), rtol=1e-9, atol=1e-12)


@st.composite
def conv_configs(draw):
    dim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * dim if kind == "same" else tuple(draw(st.integers(1, 2)) for _ in range(dim))
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    else:
        padding = kind
    # large enough for one output position and for reflect's padding < size
    size = tuple(max(dd * (kk - 1) + 1, 3) + draw(st.integers(0, 2)) for dd, kk in zip(dilation, k))
    return dict(
        dim=dim, cin=cin, cout=cout, k=k, groups=groups, stride=stride, padding=padding, dilation=dilation,
        size=size, mode=draw(st.sampled_from(MODES)), bias=draw(st.booleans()), B=draw(st.integers(1, 3)),
        method=draw(st.sampled_from(["groups", "unfold", None])), reduction=draw(st.sampled_from(["sum", "mean"])),
    )


@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(conv_configs())
def test_conv_module_random(cfg):
    rule = rule_for_op(C.conv_nd)
    with pytest.MonkeyPatch.context() as mp:
        _force(mp, rule, cfg["method"])
        torch.manual_seed(_seed("rand", sorted(cfg.items())))
        m = _MOD[cfg["dim"]](
            cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
            dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"], padding_mode=cfg["mode"],
        ).to(DT)
        x = torch.randn((cfg["B"], cfg["cin"]) + cfg["size"], dtype=DT)
        _check_module(m, x, cfg["reduction"], _seed("rand2", sorted(cfg.items())))


# ----------------------------------------------------------------------------
# transposed convolutions
# ----------------------------------------------------------------------------
# (dim, in, out, kernel, kwargs, spatial size)
T_CASES = [
    (1, 4, 6, 3, dict(stride=3, padding=2, output_padding=1), (5,)),
    (1, 4, 4, 2, dict(stride=2, groups=4, dilation=3, output_padding=2), (4,)),
    (2, 4, 6, 3, dict(stride=2, padding=1, output_padding=1, groups=2, dilation=2), (5, 6)),
    (2, 3, 2, (2, 3), dict(stride=(1, 2), padding=(0, 1)), (4, 4)),
    (3, 4, 6, 3, dict(stride=2, padding=1, output_padding=(1, 0, 1), groups=2), (3, 4, 3)),
    (3, 2, 3, (2, 1, 2), dict(dilation=(2, 1, 1), stride=(1, 1, 2)), (3, 3, 3)),
    (2, 3, 3, 3, dict(padding=1, groups=3, dilation=2), (5, 6)),  # depthwise, stride 1
    (1, 2, 2, 5, dict(padding=2, groups=2), (7,)),
]
_TMOD = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(T_CASES)))
def test_conv_transpose_module(case, method, monkeypatch):
    dim, cin, cout, k, kw, size = T_CASES[case]
    _force(monkeypatch, rule_for_op(C.conv_transpose_nd), method)
    torch.manual_seed(_seed("tmod", case))
    m = _TMOD[dim](cin, cout, k, bias=case != 1, **kw).to(DT)
    x = torch.randn((3, cin) + size, dtype=DT)
    _check_module(m, x, ("sum", "mean", "square")[case % 3], _seed("tmod", case))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(T_CASES)))
def test_functional_conv_transpose(case, method, monkeypatch):
    dim, cin, cout, k, kw, size = T_CASES[case]
    op = getattr(F, f"conv_transpose{dim}d")
    _force(monkeypatch, rule_for_op(op), method)
    torch.manual_seed(_seed("tfn", case))
    groups = kw.get("groups", 1)
    ks = (k,) * dim if isinstance(k, int) else k
    w = torch.randn((cin, cout // groups) + ks, dtype=DT)
    b = torch.randn(cout, dtype=DT) if case % 2 else None
    x = torch.randn((2, cin) + size, dtype=DT)
    _check_fn(op, x, w, b, kw, ("mean", "sum")[case % 2], _seed("tfn", case))


@st.composite
def conv_transpose_configs(draw):
    dim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    k = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    size = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    out = [(n - 1) * s - 2 * p + d * (kk - 1) + op + 1
           for n, s, p, d, kk, op in zip(size, stride, padding, dilation, k, output_padding)]
    assume(min(out) >= 1)
    return dict(
        dim=dim, cin=groups * draw(st.integers(1, 2)), cout=groups * draw(st.integers(1, 2)), k=k, stride=stride,
        padding=padding, output_padding=output_padding, dilation=dilation, groups=groups, size=size,
        bias=draw(st.booleans()), B=draw(st.integers(1, 3)), method=draw(st.sampled_from(["groups", "unfold", None])),
    )


@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(conv_transpose_configs())
def test_conv_transpose_module_random(cfg):
    rule = rule_for_op(C.conv_transpose_nd)
    with pytest.MonkeyPatch.context() as mp:
        _force(mp, rule, cfg["method"])
        torch.manual_seed(_seed("trand", sorted(cfg.items())))
        m = _TMOD[cfg["dim"]](
            cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
            output_padding=cfg["output_padding"], dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
        ).to(DT)
        x = torch.randn((cfg["B"], cfg["cin"]) + cfg["size"], dtype=DT)
        _check_module(m, x, "sum", _seed("trand2", sorted(cfg.items())))


def test_conv_transpose_output_size():
    """``m(x, output_size)`` binds ``output_size`` positionally after the input."""
    torch.manual_seed(0)
    m = nn.ConvTranspose2d(3, 2, 3, stride=3, padding=1).to(DT)
    x = torch.randn(3, 3, 4, 5, dtype=DT)
    call = module_call_for(m)(m)
    assert call.inputs == ("input", "output_size")
    rule = rule_for_op(call.op)
    for size in ([11, 14], [3, 2, 12, 13]):
        bound = {"input": x, "output_size": size, "weight": m.weight, "bias": m.bias, **call.kwargs}
        rule.bind((), bound)
        out = rule.forward(call.op, bound)
        torch.testing.assert_close(out, m(x, size))
        assert out.shape[-2:] == torch.Size(size[-2:])
        r = torch.randn_like(out)
        got = rule.grad_sample(bound, r, frozenset({"weight", "bias"}))
        exp = batch_of_one_grads(m, [x, size], lambda o, i, r=r: (o * r[i : i + 1]).sum(), batch_dims=[0, None])
        for n in ("weight", "bias"):
            torch.testing.assert_close(got[n], exp[n], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------
# book-keeping: norms and clipped sums against the materialized path
# ----------------------------------------------------------------------------
BK_CASES = [
    ("mod", nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2), (4, 4, 6, 5)),
    ("mod", nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=4, padding="same", padding_mode="reflect"),
     (3, 3, 6, 6)),
    ("mod", nn.Conv1d, dict(in_channels=3, out_channels=6, kernel_size=3, groups=3, padding_mode="circular",
                            padding=2), (4, 3, 7)),
    ("mod", nn.Conv3d, dict(in_channels=2, out_channels=4, kernel_size=2, stride=2, padding=1,
                            padding_mode="replicate"), (2, 2, 4, 5, 4)),
    ("mod", nn.ConvTranspose2d, dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, output_padding=1,
                                     groups=2), (3, 4, 3, 4)),
    ("mod", nn.ConvTranspose1d, dict(in_channels=2, out_channels=3, kernel_size=4, dilation=2), (3, 2, 5)),
    ("fn", F.conv2d, dict(stride=2, padding=(1, 0)), ((3, 3, 7, 6), (4, 3, 3, 2))),
    # depthwise, stride 1 (ConvNeXt's 7x7, MobileNet's 5x5): correlation when forced
    ("mod", nn.Conv2d, dict(in_channels=3, out_channels=3, kernel_size=5, padding=2, groups=3), (2, 3, 4, 4)),
    # depthwise stride 2, and one strided input channel (MNIST): correlation by the heuristic
    ("mod", nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, groups=4), (3, 4, 7, 6)),
    ("mod", nn.Conv2d, dict(in_channels=1, out_channels=4, kernel_size=4, stride=2, padding=3), (3, 1, 9, 9)),
    # ... on a map no larger than its padding (the correlation pads the input first)
    ("mod", nn.Conv2d, dict(in_channels=3, out_channels=3, kernel_size=5, padding=2, groups=3), (2, 3, 2, 3)),
    ("mod", nn.ConvTranspose2d, dict(in_channels=2, out_channels=2, kernel_size=3, padding=1, dilation=2, groups=2),
     (3, 2, 4, 5)),
    # a 1x1 output map (ResNet's last stage at 32x32 inputs): the rank-one ghost norm
    ("mod", nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
     (3, 4, 2, 2)),
    # 1x1 kernels: pointwise (ConvNeXt's MLP, EfficientNet's expansions), and strided, grouped (a shortcut)
    ("mod", nn.Conv2d, dict(in_channels=5, out_channels=7, kernel_size=1), (3, 5, 4, 3)),
    ("mod", nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, groups=2), (3, 4, 5, 4)),
]


@pytest.mark.parametrize("sum_by", ["wgrad", "unfold", "unfold_rows"])
@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(BK_CASES)))
def test_book_keeping(case, method, ghost, sum_by, monkeypatch):
    _check_book_keeping(case, method, ghost, sum_by, monkeypatch)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", range(len(BK_CASES)))
def test_book_keeping_patch_layouts(case, layout, monkeypatch):
    """Ghost norms with patch rows copied from a channels-last input (``d`` ordered
    ``(k..., C/G)``) or channel-first, against the per-sample gradients of the
    batch-as-groups method (which forms no patches)."""
    monkeypatch.setattr(conv_grads, "CHANNELS_LAST_MIN_RUN", 0 if layout == "channels_last" else float("inf"))
    _check_book_keeping(case, "groups", True, "unfold", monkeypatch)


@pytest.mark.parametrize("case", range(len(BK_CASES)))
def test_ghost_norms_with_gram_strips(case, monkeypatch):
    """Ghost norms with the Gram matrices formed from their upper triangle in strips of
    two rows: equal to the materialized per-sample norms (float64)."""
    import fxdp.rules.base as base

    monkeypatch.setattr(base, "GRAM_STRIP_ROWS", 2)
    monkeypatch.setattr(base, "GRAM_LANE", 2)  # an odd T's last row a strip of its own
    monkeypatch.setattr(base, "GRAM_LANE_MIN_WORK", 0)
    _check_book_keeping(case, "groups", True, "wgrad", monkeypatch)


@pytest.mark.parametrize("case", range(len(BK_CASES)))
def test_ghost_norms_in_batch_slices(case, monkeypatch):
    """Ghost norms form patches and Gram matrices one sample at a time when the slice
    budget is that small: still equal to the materialized per-sample norms (float64)."""
    monkeypatch.setattr(conv_grads, "GHOST_SLICE_BYTES", 1)
    calls = []
    inner = conv_grads.grouped
    monkeypatch.setattr(conv_grads, "grouped", lambda geo, g, **kw: calls.append(g.shape[0]) or inner(geo, g, **kw))
    _check_book_keeping(case, "groups", True, "wgrad", monkeypatch)
    assert calls and max(calls) == 1


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("case", range(len(BK_CASES)))
def test_ghost_norms_by_pixel_gram(case, sliced, monkeypatch):
    """Ghost norms with the patches' Gram matrix formed from the pixels' (forced on every
    case: strided, dilated, grouped, 1-d to 3-d, transposed), the whole batch or one sample
    at a time: equal to the materialized per-sample norms (float64)."""
    monkeypatch.setattr(conv_grads, "patch_gram_costs", lambda geo, out: (1, 0))
    if sliced:
        monkeypatch.setattr(conv_grads, "GHOST_SLICE_BYTES", 1)
    calls = []
    inner = conv_grads._patch_gram_from_pixels
    monkeypatch.setattr(conv_grads, "_patch_gram_from_pixels",
                        lambda geo, out: calls.append(geo.x.shape[0]) or inner(geo, out))
    _check_book_keeping(case, "groups", True, "wgrad", monkeypatch)
    if math.prod(BK_CASES[case][3][2:]) > 4:  # not the rank-one 2x2 map case
        assert calls and (max(calls) == 1) == sliced


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("cin,cout,H,stride,groups,pixels", [
    (32, 16, 6, 1, 1, True),  # 3x3 stride 1 on a small map (ResNet's): from the pixels
    (64, 16, 6, 1, 2, True),
    (8, 16, 8, 2, 1, False),  # stride 2: the pixels' Gram matrix would be larger
])
def test_ghost_norms_pick_the_cheaper_gram(cin, cout, H, stride, groups, pixels, layout, monkeypatch):
    """Ghost norms take the patches' Gram matrix from the pixels where that costs fewer
    multiply-adds (:func:`conv_grads.patch_gram_costs`), in either input layout, exactly."""
    torch.manual_seed(seed_of("pixel-gram", cin, H, stride))
    m = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups).to(DT)
    x = torch.randn(3, cin, H, H, dtype=DT)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(m(x))
    geo = conv_grads.Geom(x, (3, 3), (stride,) * 2, (1, 1), (1, 1), groups)
    by_patches, by_pixels = conv_grads.patch_gram_costs(geo, g.shape[2:])
    assert (by_pixels < by_patches) == pixels
    calls = []
    inner = conv_grads._patch_gram_from_pixels
    monkeypatch.setattr(conv_grads, "_patch_gram_from_pixels", lambda geo, out: calls.append(1) or inner(geo, out))
    alone = batch_of_one_grads(m, [x], lambda out, i: (out * g[i:i + 1]).sum())
    torch.testing.assert_close(conv_grads.ghost_norms(geo, g), alone["weight"].flatten(1).pow(2).sum(1),
                               rtol=1e-9, atol=1e-12)
    assert bool(calls) == pixels


def test_pixel_gram_in_half_precision_sums_in_float32():
    """bfloat16 records (autocast): the pixels' Gram matrices and the taps' sums run in
    float32, so the norms are those of the bfloat16 inputs to float32 rounding."""
    torch.manual_seed(seed_of("pixel-gram-bf16"))
    x, g = torch.randn(3, 32, 6, 6).bfloat16(), torch.randn(3, 16, 6, 6).bfloat16()
    geo = conv_grads.Geom(x, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert conv_grads.gram_from_pixels(geo, g.shape[2:], g.element_size())
    got = conv_grads.ghost_norms(geo, g)
    ref = conv_grads.ghost_norms(conv_grads.Geom(x.double(), (3, 3), (1, 1), (1, 1), (1, 1), 1), g.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


def test_patch_gram_in_half_precision_sums_in_float32():
    """bfloat16 records, a layer whose Gram matrices come from its patches (stride 2): the
    Grams and their sum run in float32 too (in bfloat16 the norms read up to 0.5% low)."""
    torch.manual_seed(seed_of("patch-gram-bf16"))
    x, g = torch.randn(4, 16, 13, 13).bfloat16(), torch.randn(4, 32, 5, 5).bfloat16()
    geo = conv_grads.Geom(x, (4, 4), (2, 2), (0, 0), (1, 1), 1)
    assert not conv_grads.gram_from_pixels(geo, g.shape[2:], g.element_size())
    got = conv_grads.ghost_norms(geo, g)
    ref = conv_grads.ghost_norms(conv_grads.Geom(x.double(), (4, 4), (2, 2), (0, 0), (1, 1), 1), g.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


def test_report_names_the_gram_from_pixels():
    """The compatibility report says where a ghost norm forms the patches' Gram matrix from
    the pixels' (ResNet18's 64->64 at 8x8) and where from the patches (stride 2)."""
    rule = rule_for_op(F.conv2d)
    needs = frozenset({"weight"})

    def plan(cin, cout, H, s):
        x, w = torch.zeros(2, cin, H, H, device="meta"), torch.zeros(cout, cin, 3, 3, device="meta")
        bound = rule.bind((x, w), dict(stride=s, padding=1))
        return rule.bk_plan(bound, rule.forward(F.conv2d, bound), needs)["weight"]

    assert plan(64, 64, 8, 1).startswith("ghost norm") and "Gram matrix from the pixels" in plan(64, 64, 8, 1)
    assert plan(64, 128, 8, 2).startswith("ghost norm") and "pixels" not in plan(64, 128, 8, 2)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", range(len(BK_CASES)))
def test_ghost_norms_keep_patch_rows_for_the_clipped_sum(case, layout, monkeypatch):
    """Ghost norms that keep their patch rows (``args[SCRATCH]``, forced on every case:
    strided, dilated, grouped, 1-d to 3-d, transposed; both orders of the rows): the
    clipped sum from the rows equals the sum of each sample's gradient (float64), fresh or
    added into the noise buffer, and frees the rows."""
    from fxdp.rules.base import SCRATCH

    monkeypatch.setattr(conv_grads, "CHANNELS_LAST_MIN_RUN", 0 if layout == "channels_last" else float("inf"))
    monkeypatch.setattr(conv_grads, "patch_gram_costs", lambda geo, out: (0, 1))  # the patches, not the pixels
    monkeypatch.setattr(C, "KEPT_PATCH_ROWS_MAX_BYTES", 1 << 40)
    rule, op, x, bound = _bk_case(case, "bk-rows")
    monkeypatch.setattr(rule, "ghost_ratio", float("inf"))
    monkeypatch.setattr(rule, "keep_ratio", float("inf"))
    g = torch.randn_like(rule.forward(op, bound))
    needs = frozenset({"weight", "bias"})
    gs = rule.grad_sample(bound, g, needs)
    factors = torch.rand(x.shape[0], dtype=DT)
    for fresh in (True, False):
        scratch = {}
        args = dict(bound, **{SCRATCH: scratch})
        norms = rule.norm_sample_sq(args, g, needs)
        assert "patch_rows" in scratch
        start = {n: torch.randn_like(gs[n][0]) for n in needs}
        into = None if fresh else {n: t.clone() for n, t in start.items()}
        sums = rule.clipped_sum(args, g, factors, needs, into=into)
        assert "patch_rows" not in scratch
        if not fresh:
            assert not sums  # both added into the buffer in place
            sums = {n: into[n] - start[n] + sums.get(n, 0) for n in needs}
        for n in needs:
            torch.testing.assert_close(norms[n], gs[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, gs[n]), rtol=1e-9, atol=1e-12)


def test_patch_rows_kept_within_bounds(monkeypatch):
    """Patch rows are kept for MNIST's 16->32 4x4 stride-2 layer (1.8x its record) up to
    ``KEPT_PATCH_ROWS_MAX_BYTES`` for the batch and ``keep_ratio`` times the record, not
    where the Gram matrix comes from the pixels; the report says which."""
    rule = rule_for_op(F.conv2d)

    def setup(B, cin, cout, H, k, s, p=0):
        x, w = torch.zeros(B, cin, H, H, device="meta"), torch.zeros(cout, cin, k, k, device="meta")
        bound = rule.bind((x, w), dict(stride=s, padding=p))
        return bound, rule.forward(F.conv2d, bound)

    mnist = setup(32, 16, 32, 13, 4, 2)
    assert rule.keeps_patch_rows(*rule._setup(*mnist))
    assert "patch rows (kept)" in rule.bk_plan(*mnist, frozenset({"weight"}))["weight"]
    assert not rule.keeps_patch_rows(*rule._setup(*setup(1024, 16, 32, 13, 4, 2)))  # 26 MB of rows
    assert not rule.keeps_patch_rows(*rule._setup(*setup(16, 64, 64, 8, 3, 1, 1)))  # from the pixels
    monkeypatch.setattr(rule, "keep_ratio", 1.5)
    assert not rule.keeps_patch_rows(*rule._setup(*mnist))
    assert "weight-gradient convolution" in rule.bk_plan(*mnist, frozenset({"weight"}))["weight"]


def _bk_case(case, seed):
    """``(rule, op, input, bound arguments)`` of ``BK_CASES[case]`` in float64."""
    kind, ctor, kw, shape = BK_CASES[case]
    torch.manual_seed(_seed(seed, case))
    if kind == "mod":
        m = ctor(**kw).to(DT)
        call = module_call_for(m)(m)
        x = torch.randn(shape, dtype=DT)
        return rule_for_op(call.op), call.op, x, {"input": x, "weight": m.weight, "bias": m.bias, **call.kwargs}
    rule = rule_for_op(ctor)
    x = torch.randn(shape[0], dtype=DT)
    return rule, ctor, x, rule.bind((x, torch.randn(shape[1], dtype=DT), torch.randn(shape[1][0], dtype=DT)), kw)


def _check_book_keeping(case, method, ghost, sum_by, monkeypatch):
    rule, op, x, bound = _bk_case(case, "bk")
    _force(monkeypatch, rule, method)
    monkeypatch.setattr(rule, "ghost_ratio", float("inf") if ghost else 0.0)
    # the clipped sum by the weight-gradient convolution, or by patches + matmul
    monkeypatch.setattr(rule, "sum_unfold_max_positions", 10**9 if sum_by.startswith("unfold") else 0)
    # patches + matmul on channel-first patches, or on channels-last rows wherever T > 1
    rows = sum_by == "unfold_rows"
    monkeypatch.setattr(conv_grads, "SUM_ROWS_MAX_OUT_PER_ROW", float("inf") if rows else 0)
    monkeypatch.setattr(conv_grads, "CHANNELS_LAST_MIN_RUN", 0 if rows else conv_grads.CHANNELS_LAST_MIN_RUN)
    out = rule.forward(op, bound)
    g = torch.randn_like(out)
    needs = frozenset({"weight", "bias"})
    gs = rule.grad_sample(bound, g, needs)
    norms = rule.norm_sample_sq(bound, g, needs)
    factors = torch.rand(x.shape[0], dtype=DT)
    sums = rule.clipped_sum(bound, g, factors, needs)
    for n in needs:
        torch.testing.assert_close(norms[n], gs[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, gs[n]), rtol=1e-9, atol=1e-12)
    # into the optimizer's noise buffer: the bias and patches + matmul sums are added in place
    start = {n: torch.randn_like(gs[n][0]) for n in needs}
    into = {n: t.clone() for n, t in start.items()}
    rest = rule.clipped_sum(bound, g, factors, needs, into=into)
    fresh = sum_by == "wgrad" or rule.method(*rule._setup(bound, g)) == "correlate"  # no out= for those
    assert "bias" not in rest and ("weight" in rest) == fresh
    for n in needs:
        torch.testing.assert_close(into[n] - start[n] + rest.get(n, 0), sums[n], rtol=1e-9, atol=1e-12)
    for needs1 in (frozenset({"weight"}), frozenset({"bias"})):
        assert set(rule.norm_sample_sq(bound, g, needs1)) == needs1
        assert set(rule.clipped_sum(bound, g, factors, needs1)) == needs1


@pytest.mark.parametrize("cin,cout,H,k,stride,pad,ghost,kept,method", [
    (64, 64, 8, 3, 1, 1, True, False, "groups"),  # ResNet18's 8x8 layers: not kept, so ghost norms up to 1.3 p d
    (80, 320, 8, 1, 1, 0, False, True, "pointwise"),  # ConvNeXt's kept pointwise layers: the linear rule's bound
    (3, 128, 64, 8, 8, 0, False, True, "unfold"),  # HF ViT's patchify stem: disjoint windows, unfold, kept
    (40, 80, 16, 2, 2, 0, False, True, "unfold"),  # ConvNeXt's 2x2 stride-2 downsampling
    (64, 128, 8, 1, 2, 0, False, True, "unfold"),  # ResNet18's strided 1x1 shortcut
    (1, 32, 28, 4, 4, 0, False, True, "unfold"),  # one input channel, disjoint: unfold, not correlate
    (-16, 8, 6, 2, 2, 0, False, True, "unfold"),  # UNet's 2x2 stride-2 upsampling (ConvTranspose2d, cin 16)
])
def test_book_keeping_at_the_cost_models_own_choice(cin, cout, H, k, stride, pad, ghost, kept, method):
    """The default decisions at the shapes the unkept, pointwise and disjoint-window bounds
    moved: norms and clipped sum equal those of each sample's own gradient (float64, batch
    of one). A negative ``cin`` is a transposed convolution, the adjoint of a plain one
    (its per-sample gradients are a plain convolution's with input and output gradient
    swapped: UNet's upsampling is a layer of disjoint windows too)."""
    torch.manual_seed(seed_of("bk-default", cin, cout))
    if cin < 0:
        cin = -cin
        m = nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=pad).to(DT)
    else:
        m = nn.Conv2d(cin, cout, k, stride=stride, padding=pad).to(DT)
    call = module_call_for(m)(m)
    rule = rule_for_op(call.op)
    x = torch.randn(3, cin, H, H, dtype=DT)
    bound = {"input": x, "weight": m.weight, "bias": m.bias, **call.kwargs}
    g = torch.randn_like(rule.forward(call.op, bound))
    geo = rule._setup(bound, g)
    assert rule.use_ghost(*geo) == ghost and rule.method(*geo) == method
    needs = frozenset({"weight", "bias"})
    norms, kept_now = rule.norm_sample_sq_keep(bound, g, needs)
    assert ("weight" in kept_now) == kept
    factors = torch.rand(3, dtype=DT)
    sums = rule.clipped_sum(bound, g, factors, needs)
    alone = batch_of_one_grads(m, [x], lambda out, i: (out * g[i:i + 1]).sum())
    for n in needs:
        torch.testing.assert_close(norms[n], alone[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, alone[n]), rtol=1e-9, atol=1e-12)
        if n in kept_now:
            torch.testing.assert_close(kept_now[n], alone[n], rtol=1e-9, atol=1e-12)


def _conv2d_case(cin, cout, H, k, stride, pad, groups):
    """A float64 ``Conv2d``, its rule, an input of 3 samples, its bound arguments and an
    output gradient (the seed set by the caller)."""
    m = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups).to(DT)
    call = module_call_for(m)(m)
    x = torch.randn(3, cin, H, H, dtype=DT)
    bound = {"input": x, "weight": m.weight, "bias": m.bias, **call.kwargs}
    rule = rule_for_op(call.op)
    return m, rule, x, bound, torch.randn_like(rule.forward(call.op, bound))


@pytest.mark.parametrize("cin,cout,H,k,stride,pad,groups", [
    (16, 32, 13, 4, 2, 0, 1),  # MNIST's second layer
    (16, 32, 8, 3, 2, 1, 1),  # ResNet's strided 3x3
    (32, 64, 8, 3, 2, 1, 2),  # grouped, strided
])
def test_kept_patch_rows_at_the_cost_models_own_choice(cin, cout, H, k, stride, pad, groups):
    """Layers whose ghost norm keeps its patch rows by the rule's own bounds: norms and
    clipped sum (fresh, and added into the noise buffer) equal those of each sample's own
    gradient (float64, batch of one)."""
    from fxdp.rules.base import SCRATCH

    torch.manual_seed(seed_of("bk-rows-default", cin, H, groups))
    m, rule, x, bound, g = _conv2d_case(cin, cout, H, k, stride, pad, groups)
    assert rule.use_ghost(*rule._setup(bound, g)) and rule.keeps_patch_rows(*rule._setup(bound, g))
    alone = batch_of_one_grads(m, [x], lambda out, i: (out * g[i:i + 1]).sum())
    needs = frozenset({"weight", "bias"})
    factors = torch.rand(3, dtype=DT)
    for into in (None, {n: torch.zeros_like(alone[n][0]) for n in needs}):
        args = dict(bound, **{SCRATCH: {}})
        norms = rule.norm_sample_sq(args, g, needs)
        assert "patch_rows" in args[SCRATCH]
        sums = rule.clipped_sum(args, g, factors, needs, into=into)
        if into is not None:
            assert not sums
            sums = into
        for n in needs:
            torch.testing.assert_close(norms[n], alone[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, alone[n]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cin,cout,H,k,stride,pad,groups", [
    (3, 8, 16, 4, 4, 0, 1),  # patchify: unfold, groups
    (6, 4, 5, 1, 1, 0, 1),  # 1x1: pointwise, unfold, groups
    (4, 4, 7, 3, 2, 1, 4),  # depthwise, stride 2: correlate, groups
    (1, 5, 9, 3, 1, 1, 1),  # one input channel: correlate, groups
    (24, 24, 2, 3, 1, 1, 1),  # wide on a small map: unfold, groups
])
def test_every_measured_candidate_is_exact(cin, cout, H, k, stride, pad, groups):
    """``bk_methods="measure"`` times every exact method of a layer (ghost norms, per-sample
    gradients by each applicable method): each gives the norms (and kept gradients) of each
    sample's own gradient (float64, batch of one)."""
    torch.manual_seed(seed_of("bk-candidates", cin, cout, k))
    m, rule, x, bound, g = _conv2d_case(cin, cout, H, k, stride, pad, groups)
    needs = frozenset({"weight", "bias"})
    candidates = rule.bk_candidates(bound, g, needs)
    assert "ghost" in candidates and candidates[0] in ("ghost", rule.method(*rule._setup(bound, g)))
    assert len(set(candidates)) == len(candidates) >= 3  # ghost and at least two per-sample methods
    alone = batch_of_one_grads(m, [x], lambda out, i: (out * g[i:i + 1]).sum())
    for method in candidates:
        norms, kept = rule.norm_sample_sq_keep(bound, g, needs, method)
        for n in needs:
            torch.testing.assert_close(norms[n], alone[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        for n, t in kept.items():
            torch.testing.assert_close(t, alone[n], rtol=1e-9, atol=1e-12)


def test_method_heuristics():
    """Per-sample conv backward for large maps / small weights, unfold + bmm for
    wide layers on small maps; ghost norms only where cheaper (see the module doc)."""
    rule = rule_for_op(F.conv2d)

    def geo(B, cin, cout, H, k, s, p):
        x = torch.zeros(B, cin, H, H)
        g = F.conv2d(x, torch.zeros(cout, cin, k, k), None, s, p)
        return rule._setup(rule.bind((x, torch.zeros(cout, cin, k, k)), dict(stride=s, padding=p)), g)

    assert rule.method(*geo(2, 1, 16, 28, 8, 2, 3)) == "correlate"  # MNIST: one input channel, 14x14 out
    assert rule.method(*geo(2, 1, 64, 128, 7, 2, 3)) == "groups"  # one input channel, 64x64 out
    assert rule.method(*geo(2, 32, 32, 32, 3, 1, 1)) == "groups"  # CIFAR, large maps
    assert rule.method(*geo(2, 256, 256, 4, 3, 1, 1)) == "unfold"  # wide, 4x4
    dw = rule._setup(rule.bind((torch.zeros(2, 24, 32, 32), torch.zeros(24, 1, 3, 3)),
                               dict(stride=2, padding=1, groups=24)), torch.zeros(2, 24, 16, 16))
    assert rule.method(*dw) == "correlate"  # depthwise, 3x3, stride 2 (MobileNet, EfficientNet)
    assert not rule.use_ghost(*geo(2, 32, 32, 32, 3, 1, 1))
    assert rule.use_ghost(*geo(2, 256, 256, 4, 3, 1, 1))
    # ResNet18's 64->64 at 8x8 (T (d + p) = 1.11 p d): its per-sample gradients would not be
    # kept, so both methods pay the sum's weight gradient and the Gram matrices are faster
    r18 = geo(2, 64, 64, 8, 3, 1, 1)
    assert not rule._would_keep(*r18) and rule.use_ghost(*r18)
    assert not rule.use_ghost(*geo(2, 48, 48, 8, 3, 1, 1))  # 1.48 p d: materialized
    # ConvNeXt's 40->80 2x2 stride 2 at 16x16 (1.2 p d): kept gradients make the sum a contraction
    down = geo(2, 40, 80, 16, 2, 2, 0)
    assert rule._would_keep(*down) and not rule.use_ghost(*down)
    # a kept pointwise layer is a linear layer over positions: the linear rule's bound
    # (ConvNeXt-atto's 80->320 at 8x8: T (d + p) = p d, materialized and kept)
    pw = geo(2, 80, 320, 8, 1, 1, 0)
    assert rule.method(*pw) == "pointwise" and rule._would_keep(*pw) and not rule.use_ghost(*pw)
    assert rule.use_ghost(*geo(2, 8, 8, 2, 1, 1, 0))  # T^2 (d + p) small: ghost still
    # disjoint windows (stride >= kernel, no padding) are a linear layer over patches: unfold,
    # and the linear rule's bound where kept. ResNet18's 1x1 stride-2 64->128 at 8x8 (T = 16),
    # HF ViT's 8x8 patchify 3->128 at 64x64 (T = 64): materialized and kept
    for shortcut in (geo(2, 64, 128, 8, 1, 2, 0), geo(2, 3, 128, 64, 8, 8, 0), geo(2, 1, 32, 28, 4, 4, 0)):
        assert rule.method(*shortcut) == "unfold" and rule._would_keep(*shortcut) and not rule.use_ghost(*shortcut)
    # ... not kept (timm ViT-tiny's 16x16 patchify 3->192 at 64x64, T = 16): ghost norms
    tiny = geo(2, 3, 192, 64, 16, 16, 0)
    assert rule.method(*tiny) == "unfold" and not rule._would_keep(*tiny) and rule.use_ghost(*tiny)
    assert rule.method(*geo(2, 8, 8, 8, 2, 1, 0)) == "groups"  # overlapping 2x2 windows (stride 1): as before
    # on large maps the batch-as-groups weight gradient wins: ConvNeXt's 4x4 patchify at 224x224
    assert rule.method(*geo(1, 3, 96, 224, 4, 4, 0)) == "groups"
    # input channels off oneDNN's block of 8 (RGB stems, DenseNet-like widths) on small maps:
    # unfold (the grouped weight gradient takes its slow path); at 224x224, groups
    assert rule.method(*geo(2, 3, 32, 32, 3, 1, 1)) == "unfold"  # CIFAR's first layer
    assert rule.method(*geo(2, 3, 64, 32, 7, 2, 3)) == "unfold"  # ResNet's stem at 32x32
    assert rule.method(*geo(2, 12, 32, 32, 3, 1, 1)) == "unfold"  # 12 channels
    assert rule.method(*geo(1, 3, 64, 224, 7, 2, 3)) == "groups"  # ResNet's stem at 224x224
    assert rule.method(*geo(2, 8, 32, 32, 3, 1, 1)) == "groups"  # multiples of 8: groups
    assert rule.method(*geo(2, 24, 32, 32, 3, 1, 1)) == "groups"
    c3 = rule._setup(rule.bind((torch.zeros(2, 12, 8, 8, 8), torch.zeros(16, 12, 3, 3, 3)), dict(padding=1)),
                     torch.zeros(2, 16, 8, 8, 8))
    assert rule.method(*c3) == "groups"  # the channel rule is 2-d only (3-d measured mixed)
    # 1x1 output (T = 1): the norm is |g|^2 |a|^2, O(d + p), never a [B, p, d] gradient
    assert rule.use_ghost(*geo(2, 512, 512, 2, 3, 2, 1))


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unbatched_input_raises(dim):
    m = _MOD[dim](2, 3, 2).to(DT)
    x = torch.randn((2,) + (4,) * dim, dtype=DT)  # [C, *spatial]: no batch dimension
    call = module_call_for(m)(m)
    rule = rule_for_op(call.op)
    bound = {"input": x, "weight": m.weight, "bias": m.bias, **call.kwargs}
    out = rule.forward(call.op, bound)  # the plain op still runs (eval, no_grad)
    torch.testing.assert_close(out, m(x))
    g = torch.ones_like(out)
    for hook in (
        lambda: rule.grad_sample(bound, g, frozenset({"weight"})),
        lambda: rule.norm_sample_sq(bound, g, frozenset({"weight"})),
        lambda: rule.clipped_sum(bound, g, torch.ones(2, dtype=DT), frozenset({"weight"})),
    ):
        with pytest.raises(UnsupportedOpError, match="unbatched"):
            hook()
    trule = rule_for_op(F.conv_transpose2d)
    with pytest.raises(UnsupportedOpError, match="batched input of rank 4"):
        trule.grad_sample(trule.bind((torch.randn(3, 4, 4), torch.randn(3, 2, 2, 2)), {}), torch.ones(2, 5, 5),
                          frozenset({"weight"}))


# ----------------------------------------------------------------------------
# end to end through fxdp.privatize
# ----------------------------------------------------------------------------
class MixedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", groups=4, padding_mode="circular")
        self.w3 = nn.Parameter(torch.randn(6, 2, 2, 2) * 0.3)
        self.up = nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, output_padding=1)
        self.c1d = nn.Conv1d(3, 2, 4, padding="same", padding_mode="replicate")
        self.fc = nn.Linear(2 * 64, 5)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.relu(self.c2(h))
        h = F.conv2d(h, self.w3, stride=2, groups=2)  # [B, 6, 4, 4]
        h = torch.tanh(self.up(h))  # [B, 3, 8, 8]
        h = self.c1d(h.flatten(2))  # [B, 2, 64]
        return self.fc(h.flatten(1))


class MnistCNN(nn.Module):
    """Opacus' MNIST example network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("net,shape", [(MixedConvNet, (4, 2, 8, 8)), (MnistCNN, (3, 1, 28, 28))])
def test_privatize_end_to_end(net, shape, reduction):
    if not hasattr(fxdp, "privatize"):
        pytest.skip("fxdp.privatize not available")
    torch.manual_seed(_seed("e2e", net.__name__))
    model = net().to(DT)
    x = torch.randn(shape, dtype=DT)
    y = torch.randint(0, 5, (shape[0],))
    dp = fxdp.privatize(model) if reduction == "mean" else fxdp.privatize(model, loss_reduction="sum")
    assert isinstance(dp, torch.fx.GraphModule)
    out = dp(x)
    torch.testing.assert_close(out, model(x))
    F.cross_entropy(out, y, reduction=reduction).backward()
    # Opacus' convention: sample i's own gradient (mean) / the raw gradient (sum)
    exp = batch_of_one_grads(model, [x], lambda o, i: F.cross_entropy(o, y[i : i + 1]))
    assert_grad_samples_match(dp, exp)
    for n, p in dp.named_parameters():
        torch.testing.assert_close(p.grad, exp[n].sum(0) / (shape[0] if reduction == "mean" else 1))


def test_privatize_unbatched_raises():
    if not hasattr(fxdp, "privatize"):
        pytest.skip("fxdp.privatize not available")
    dp = fxdp.privatize(nn.Sequential(nn.Conv1d(2, 3, 3)).to(DT))
    with pytest.raises(FxdpError):
        dp(torch.randn(2, 7, dtype=DT)).sum().backward()
