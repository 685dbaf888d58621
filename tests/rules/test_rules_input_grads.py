"""Closed-form input gradients of the Linear and Conv rules (the capture op then
records no inner autograd graph): the gradients flowing to earlier layers and to
the model input equal plain PyTorch's, in float64, and the per-sample gradients
of the earlier layers stay exact."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdp.capture as capture
from fxdp.rules import rule_for_op

from oracle import assert_grad_samples_match, batch_of_one_grads, bk_clipped_sums, quiet_privatize

DT = torch.float64


class Head(nn.Module):
    """An input-gradient-needing layer after a trainable one, then a loss head."""

    def __init__(self, first: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.first, self.layer = first, layer

    def forward(self, x):
        return self.layer(torch.tanh(self.first(x))).flatten(1).sum(1, keepdim=True)


class Conv1DLike(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: ``addmm(b, x.view(-1, d), W)`` on the folded batch."""

    def __init__(self, d: int, p: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, p) * 0.3)
        self.bias = nn.Parameter(torch.randn(p) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class ChannelsLast(nn.Module):
    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


CASES = {
    # the norms keep their forward's statistics (forward_saving) for the input and per-sample gradients
    "layer-norm": (lambda: Head(nn.Linear(5, 6), nn.LayerNorm(6)), (3, 7, 5)),
    "layer-norm-2d-shape": (lambda: Head(nn.Linear(5, 6), nn.LayerNorm((4, 6), bias=False)), (3, 4, 5)),
    "group-norm": (lambda: Head(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4)), (3, 2, 6, 5)),
    "group-norm-channels-last": (lambda: Head(nn.Sequential(nn.Conv2d(2, 6, 3), ChannelsLast()), nn.GroupNorm(3, 6)),
                                 (3, 2, 7, 6)),
    "group-norm-rank3": (lambda: Head(nn.Conv1d(2, 4, 3), nn.GroupNorm(4, 4, affine=True)), (3, 2, 9)),
    "addmm-conv1d": (lambda: Head(Conv1DLike(5, 6), Conv1DLike(6, 4)), (3, 7, 5)),
    "linear-rank3": (lambda: Head(nn.Linear(5, 6), nn.Linear(6, 4)), (3, 7, 5)),
    "linear-rank2": (lambda: Head(nn.Linear(5, 6), nn.Linear(6, 4, bias=False)), (3, 5)),
    "conv1d-stride-dilation": (lambda: Head(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 3, 3, stride=2, dilation=2, padding=1)), (3, 2, 17)),
    "conv2d-groups": (lambda: Head(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=(1, 2))), (3, 2, 9, 8)),
    "conv3d": (lambda: Head(nn.Conv3d(1, 2, 2), nn.Conv3d(2, 3, 2, padding=1)), (2, 1, 5, 5, 4)),
}


@pytest.mark.parametrize("mode", ["materialize", "bk"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_input_grads_match_autograd(case, mode, monkeypatch):
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build().to(DT)
    ref = copy.deepcopy(model)
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    calls = []
    orig = capture.RuleCapture.input_grads
    monkeypatch.setattr(capture.RuleCapture, "input_grads", lambda self, *a: calls.append(1) or orig(self, *a))
    dp = quiet_privatize(model, grad_sample_mode=mode, loss_reduction="sum")
    if mode == "bk":  # no clipping (bound 1e9): the sums are plain gradients
        sums = bk_clipped_sums(dp, lambda: dp(x).sum().backward(), 1e9)
    else:
        dp(x).sum().backward()
    ref(x_ref).sum().backward()
    assert calls, "the closed-form input gradient was not used"
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    if mode == "materialize":
        expected = batch_of_one_grads(ref, [x.detach()], lambda o, i: o.sum())
        assert_grad_samples_match(model, expected, rtol=1e-9, atol=1e-12)
    else:
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(sums[id(p)], q.grad, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("per_slice", [1, 2])
@pytest.mark.parametrize("case", ["conv1d-stride-dilation", "conv2d-groups", "conv3d"])
def test_conv_input_grad_in_batch_slices_is_autograds(case, per_slice, monkeypatch):
    """On CPU a large convolution's input gradient runs a slice of the batch at a time
    (``INPUT_GRAD_SLICE_BYTES``): forced here to 1 and 2 samples a slice (the last slice
    short), the input gradient is still autograd's for every sample."""
    import fxdp.rules.conv as conv_rules

    slices = []
    monkeypatch.setattr(conv_rules, "samples_per_slice", lambda *a, **k: slices.append(1) or per_slice)
    build, shape = CASES[case]
    torch.manual_seed(4)
    model = build().to(DT)
    ref = copy.deepcopy(model)
    x = torch.randn(5, *shape[1:], dtype=DT, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    quiet_privatize(model)(x).pow(2).sum().backward()
    ref(x_ref).pow(2).sum().backward()
    assert slices, "the sliced input gradient was not used"
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta, alpha", [(1, 1), (0.5, 2.0)])
def test_addmm_input_grad_is_autograds(beta, alpha):
    """addmm's closed-form gradient w.r.t. ``mat1`` (``alpha * g @ W^T``) against autograd."""
    rule = rule_for_op(torch.ops.aten.addmm.default)
    torch.manual_seed(2)
    b, x, w = torch.randn(4, dtype=DT), torch.randn(6, 5, dtype=DT, requires_grad=True), torch.randn(5, 4, dtype=DT)
    args = rule.bind((b, x, w), {"beta": beta, "alpha": alpha})
    assert rule.has_input_grad(args)
    g = torch.randn(6, 4, dtype=DT)
    (want,) = torch.autograd.grad(torch.addmm(b, x, w, beta=beta, alpha=alpha), x, g)
    torch.testing.assert_close(rule.input_grad(args, g), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_norms_reuse_their_forward_statistics(norm):
    """Layer and group norm run their native kernel in the capture's forward and keep its
    mean and 1/std: the output is the op's, bit for bit; the input gradient from them is
    autograd's; the per-sample gradients' ``x_hat`` from them is the normalization's."""
    from fxdp.rules.base import SAVED

    torch.manual_seed(3)
    if norm == "layer":
        op, x, w, b = F.layer_norm, torch.randn(4, 5, 6, dtype=DT), torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
        call = ((x, (6,), w, b), {"eps": 1e-4})
    else:
        op, x, w, b = F.group_norm, torch.randn(4, 6, 3, 5, dtype=DT), torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
        call = ((x, 3, w, b), {"eps": 1e-4})
    rule = rule_for_op(op)
    args = rule.bind(*call)
    assert rule.has_input_grad(args)
    out, saved = rule.forward_saving(op, args)
    assert torch.equal(out, op(*call[0], **call[1]))
    xr = x.clone().requires_grad_(True)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(op(xr, *call[0][1:], **call[1]), xr, g)
    torch.testing.assert_close(rule.input_grad(dict(args, **{SAVED: saved}), g), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rule.input_grad(args, g), want, rtol=1e-12, atol=1e-12)  # none kept: recomputed
    torch.testing.assert_close(rule._normalized(dict(args, **{SAVED: saved})), rule._normalized(args),
                               rtol=1e-12, atol=1e-12)


def test_no_closed_form_for_non_zero_padding_or_string_padding():
    conv = rule_for_op(F.conv2d)
    x, w = torch.zeros(1, 2, 5, 5), torch.zeros(3, 2, 3, 3)
    assert conv.has_input_grad(conv.bind((x, w), {"padding": 1}))
    assert not conv.has_input_grad(conv.bind((x, w), {"padding": "same"}))
    assert not conv.has_input_grad(conv.bind((x[0], w), {}))  # unbatched: autograd handles it


def test_reflect_padding_input_grad_goes_through_autograd():
    torch.manual_seed(1)
    model = Head(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")).to(DT)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 1, 7, 7, dtype=DT, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    quiet_privatize(model)(x).sum().backward()
    ref(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_autocast_is_refused_with_a_fix():
    """Mixed-precision autocast would run ops in a lower precision than their recorded
    inputs: a clear error (not a dtype RuntimeError deep in a rule); eval mode is fine."""
    from fxdp.errors import UnsupportedOpError

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    dp = quiet_privatize(model)
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(UnsupportedOpError, match=r"torch.autocast.*Fix: train without torch.autocast"):
            dp(x)
        dp.eval()
        assert dp(x).shape == (5, 2)  # inference under autocast: the plain ops
    dp.train()
    dp(x).sum().backward()  # float32 training still works
    assert all(p.grad_sample is not None for p in model.parameters())
