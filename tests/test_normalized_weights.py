"""Book-keeping of per-channel normalized weights (``fxdp/capture/normalized.py``): weight
standardization and weight normalization take the rule's norms less a closed form whose
coefficients one VJP reads and a second, Gaussian one checks, every step; any other computed
weight is refused by the check and materialized. Clipped sums equal the materialized per-sample
gradients' (float64, every sample clipped by its own layer's bound, so each norm counts)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxdp.capture.normalized import NormalizedWeight, probe_normalized
from fxdp.capture.params import ComputedArgsRuleCapture
from oracle import bk_clipped_sums, clipped_sums_materialized, quiet_privatize

pytestmark = pytest.mark.usefixtures("f64")


class ScaledStdConv(nn.Module):
    """timm's ``ScaledStdConv2d`` (NF-ResNet): ``batch_norm`` over the weight's rows with the
    gain times a constant as its weight, and a direct bias."""

    def __init__(self, C=3, O=4, k=3, groups=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(O, C // groups, k, k))
        self.gain = nn.Parameter(torch.rand(O, 1, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(O))
        self.groups = groups

    def forward(self, x):
        O = self.weight.shape[0]
        w = F.batch_norm(self.weight.reshape(1, O, -1), None, None, weight=(self.gain * 0.7).view(-1),
                         training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=1, groups=self.groups)


class StdConv(nn.Module):
    """BiT's ``StdConv2d`` (timm, Hugging Face ``BitWeightStandardizedConv2d``): no gain, no bias,
    grouped, stride 2."""

    def __init__(self, C=4, O=6, groups=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(O, C // groups, 3, 3) + 0.3)
        self.groups = groups

    def forward(self, x):
        O = self.weight.shape[0]
        w = F.batch_norm(self.weight.reshape(1, O, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, None, stride=2, padding=1, groups=self.groups)


class StdEpsConv1d(nn.Module):
    """``gain * (W - mean) / (std + eps)`` with the unbiased std (DP WideResNets' standardization,
    De et al. 2022, as PyTorch ports write it), a Conv1d."""

    def __init__(self, C=3, O=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(O, C, 3))
        self.gain = nn.Parameter(torch.randn(O, 1, 1))

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2), keepdim=True)
        std = w.std(dim=(1, 2), keepdim=True)
        return F.conv1d(x, self.gain * (w - mean) / (std + 1e-3), padding=1)


class StdLinear(nn.Module):
    """A weight-standardized linear layer on a sequence ``[B, T, d]`` (no gain)."""

    def __init__(self, d=5, O=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(O, d))
        self.bias = nn.Parameter(torch.randn(O))

    def forward(self, x):
        w = self.weight
        return F.linear(x, (w - w.mean(1, keepdim=True)) / w.var(1, keepdim=True, unbiased=False).add(1e-5).sqrt(),
                        self.bias)


class NormLinear(nn.Module):
    """Weight normalization written out: ``g * V / ||V||`` per output row (uncentered)."""

    def __init__(self, d=5, O=4):
        super().__init__()
        self.v = nn.Parameter(torch.randn(O, d))
        self.g = nn.Parameter(torch.rand(O, 1) + 0.5)

    def forward(self, x):
        return F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True))


class WeightNormConv(nn.Module):
    """``torch.nn.utils.parametrizations.weight_norm`` (the export graph)."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.conv = weight_norm(nn.Conv2d(3, 4, 3, padding=1))

    def forward(self, x):
        return self.conv(x)


class Squashed(nn.Module):
    """A computed weight of another form: ``tanh(V)`` (elementwise)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight.tanh(), padding=1)


class GlobalNorm(nn.Module):
    """``V / ||V||`` over the whole tensor: each row's weight depends on every row (channels
    mix), which no per-channel form has."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight / self.weight.norm(), padding=1)


class ColumnStd(nn.Module):
    """Standardized along the input channels (per column), not per output row."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        w = self.weight
        return F.conv2d(x, (w - w.mean(0, keepdim=True)) / w.std(0, keepdim=True), padding=1)


class MixedRows(nn.Module):
    """Rows standardized where their spread is large and left raw elsewhere: neither form holds
    for every channel."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([torch.randn(2, 3, 3, 3), 0.1 * torch.randn(2, 3, 3, 3)]))

    def forward(self, x):
        w = self.weight
        std = w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, torch.where(std > 0.5, (w - w.mean(dim=(1, 2, 3), keepdim=True)) / std, w), padding=1)


def _captures(dp):
    return [m for m in dp.modules() if isinstance(m, ComputedArgsRuleCapture)]


def _bk_matches_materialized(model, x, capture, B=None):
    """Per-layer bounds well below every norm: each parameter's clipped sum is ``sum_i (C /
    ||g_i||) g_i``, so its norms are checked as well as its sums. Returns the bk model."""
    torch.manual_seed(21)
    y = model(x)
    w = torch.randn_like(y)
    dpm = quiet_privatize(copy.deepcopy(model), capture=capture)
    n = sum(1 for p in dpm.parameters() if p.requires_grad)
    bounds = [1e-3 * (j + 1) for j in range(n)]
    want = clipped_sums_materialized(dpm, x, w, bounds, True)
    dpb = quiet_privatize(copy.deepcopy(model), capture=capture, grad_sample_mode="bk")
    got = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), bounds, True)
    for p, ref in zip([p for p in dpb.parameters() if p.requires_grad], want):
        torch.testing.assert_close(got[id(p)], ref, rtol=1e-9, atol=1e-12)
    return dpb


SERVED = [
    (ScaledStdConv, (3, 3, 6, 6), True),
    (lambda: ScaledStdConv(C=4, O=6, groups=2), (3, 4, 5, 5), True),
    (StdConv, (3, 4, 7, 7), True),
    (StdEpsConv1d, (3, 3, 8), True),
    (StdLinear, (3, 6, 5), True),
    (NormLinear, (3, 6, 5), False),
]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("make, shape, centered", SERVED)
def test_normalized_weights_take_the_closed_form_and_match_materialized(make, shape, centered, capture):
    torch.manual_seed(20)
    model = make().double()
    dpb = _bk_matches_materialized(model, torch.randn(*shape, dtype=torch.float64).abs(), capture)
    (cap,) = _captures(dpb)
    assert cap.checks_passed == 1 and cap.checks_failed == 0 and cap.centered_form is centered


def test_torch_weight_norm_takes_the_uncentered_form():
    torch.manual_seed(22)
    dpb = _bk_matches_materialized(WeightNormConv().double(), torch.randn(3, 3, 5, 5, dtype=torch.float64), "export")
    (cap,) = _captures(dpb)
    assert cap.checks_passed == 1 and cap.centered_form is False


@pytest.mark.parametrize("make", [Squashed, GlobalNorm, ColumnStd, MixedRows])
def test_other_computed_weights_fail_the_check_and_are_materialized(make):
    """The check refuses every computed weight that is not a per-channel normalization (an
    elementwise map, channels mixed, the other axis, rows of both forms): still exact."""
    torch.manual_seed(23)
    dpb = _bk_matches_materialized(make().double(), torch.randn(3, 3, 5, 5, dtype=torch.float64), "export")
    (cap,) = _captures(dpb)
    assert cap.checks_failed == 1 and cap.checks_passed == 0


def test_empty_and_single_sample_batches():
    torch.manual_seed(24)
    for B in (0, 1):
        _bk_matches_materialized(ScaledStdConv().double(), torch.randn(B, 3, 5, 5, dtype=torch.float64), "export")


def test_frozen_gain_leaves_the_direction_served():
    torch.manual_seed(25)
    model = ScaledStdConv().double()
    model.gain.requires_grad_(False)
    dpb = _bk_matches_materialized(model, torch.randn(3, 3, 5, 5, dtype=torch.float64), "export")
    (cap,) = _captures(dpb)
    assert cap.checks_passed == 1


def test_float32_norms_stay_close_on_positive_inputs():
    """float32: the closed form subtracts the mean and direction terms from the rule's norm; on
    post-ReLU inputs (a large patch mean) the result stays within 1e-4 of the materialized norms'
    clipped sums."""
    torch.manual_seed(26)
    model = ScaledStdConv(C=16, O=32).float()
    x = torch.randn(8, 16, 8, 8, dtype=torch.float32).relu() + 0.5
    y = model(x)
    w = torch.randn_like(y)
    dpm = quiet_privatize(copy.deepcopy(model), capture="export")
    bounds = [1e-3, 2e-3, 3e-3]
    want = clipped_sums_materialized(dpm, x, w, bounds, True)
    dpb = quiet_privatize(copy.deepcopy(model), capture="export", grad_sample_mode="bk")
    got = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), bounds, True)
    assert _captures(dpb)[0].checks_passed == 1
    for p, ref in zip(dpb.parameters(), want):
        torch.testing.assert_close(got[id(p)], ref, rtol=1e-4, atol=1e-7)


# -- the probe itself --------------------------------------------------------------------------


def _form_vjp(O, n, perturb=None):
    """A weight standardization's VJP (``c``, ``β`` per channel, a gain) plus ``perturb(g)``."""
    torch.manual_seed(27)
    V = torch.randn(O, n)
    Vc = V - V.mean(1, keepdim=True)
    u = Vc / Vc.norm(dim=1, keepdim=True)
    c, beta, kappa = torch.rand(O) + 0.5, torch.rand(O), torch.randn(O)
    form = NormalizedWeight(c=c, beta=beta, u=u, centered=True, kappa=kappa)

    def vjp(g):
        jv, jg = form.apply(g)
        return (jv if perturb is None else jv + perturb(g)), jg

    return V, vjp, form


def test_probe_reads_the_form():
    V, vjp, form = _form_vjp(6, 10)
    got = probe_normalized(vjp, V, True, torch.Generator().manual_seed(0))
    assert got is not None and got.centered
    for a, b in ((got.c, form.c), (got.beta, form.beta), (got.kappa, form.kappa), (got.u, form.u)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("what", ["u w^T", "channel mix", "one entry", "elementwise"])
def test_probe_check_refuses_any_other_linear_map(what):
    """A rank-one term along the direction (which a fit of the probe's own vector would absorb),
    a term mixing channels, one entry, a diagonal: each differs from the form on the check's
    Gaussian cotangent, so the probe refuses."""
    O, n = 6, 10
    w = torch.randn(O, n)
    d = torch.rand(O, n)
    perturb = {
        "u w^T": lambda g: 1e-2 * _form_vjp(O, n)[2].u * (w * g).sum(1, keepdim=True),
        "channel mix": lambda g: 1e-2 * g.roll(1, 0),
        "one entry": lambda g: torch.zeros_like(g).index_put_((torch.tensor([3]), torch.tensor([7])), g[3, 2] * 0.05),
        "elementwise": lambda g: 1e-2 * d * g,
    }[what]
    V, vjp, _ = _form_vjp(O, n, perturb)
    assert probe_normalized(vjp, V, True, torch.Generator().manual_seed(0)) is None


def test_float32_checks_pass_on_wide_layers():
    """float32, a 1x1 convolution's 2048 rows (NF-ResNet's widest), twenty probes: the check's
    tolerance sits above the VJP's rounding in every channel (the gain's against its own scale:
    some channel's ``u · t`` is near zero by chance in most draws)."""
    torch.manual_seed(28)
    O, n = 2048, 512
    V = torch.randn(O, n, dtype=torch.float32) * 0.03
    gain = torch.rand(O, dtype=torch.float32) + 0.5

    def f(V, gain):
        return F.batch_norm(V.reshape(1, O, n), None, None, weight=gain * 1.7, training=True, momentum=0.0,
                            eps=1e-5).reshape(O, n)

    _, vjp_fn = torch.func.vjp(f, V, gain)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert probe_normalized(lambda g: vjp_fn(g), V, True, gen) is not None
