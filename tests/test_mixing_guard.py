"""fxdp.privatize fails closed on the symbolic-tracing path: the batch-mixing analysis
(``fxdp/passes/batch_mixing/guard.py``) runs once per input signature, at the first
training call, and refuses a model in which samples influence each other. Before it,
``privatize(model)`` served these with wrong ``grad_sample`` (only ``fxdp.check`` and
``make_private``'s check refused them)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxdp
from models import Centered


class CenteredAccepted(Centered):
    def forward(self, x):
        return self.fc(x - x.mean(0))  # fxdp: ignore


class SeqFirstView(nn.Module):
    """A [T, B, d] tensor read as [B, T, d]."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.l(x.transpose(0, 1))
        return self.head(h.reshape(x.shape))


class UnfoldWrongOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        B, k, d = x.shape
        return self.l(x.transpose(0, 1).reshape(k * B, d).reshape(B, k, d))


class Counter(nn.Module):
    """A clean model with a buffer its forward updates."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return self.fc(x)


@pytest.mark.parametrize("model, shape, match", [
    (Centered, (6, 4), r"x - x\.mean\(0\)"),
    (SeqFirstView, (6, 5, 4), r"h\.reshape\(x\.shape\)"),
    (UnfoldWrongOrder, (6, 5, 4), r"reshape"),
])
def test_privatize_refuses_mixing_at_the_first_training_call(model, shape, match):
    dp = fxdp.privatize(model(), capture="fx")
    with pytest.raises(fxdp.UnsupportedOpError, match=match):
        dp(torch.randn(*shape)).sum().backward()
    with pytest.raises(fxdp.UnsupportedOpError, match="influence each other"):  # and on every later call
        dp(torch.randn(*shape))


def test_example_inputs_refuse_at_privatize():
    with pytest.raises(fxdp.UnsupportedOpError, match="batch-reduction"):
        fxdp.privatize(Centered(), capture="fx", example_inputs=(torch.randn(6, 4),))


def test_an_empty_batch_does_not_prove_the_signature():
    dp = fxdp.privatize(Centered(), capture="fx")
    dp(torch.randn(0, 4)).sum().backward()  # nothing to analyse
    with pytest.raises(fxdp.UnsupportedOpError, match="mean"):
        dp(torch.randn(6, 4))


def test_eval_mode_and_no_grad_run_the_model():
    dp = fxdp.privatize(Centered(), capture="fx").eval()
    dp(torch.randn(6, 4))
    dp.train()
    with torch.no_grad():
        dp(torch.randn(6, 4))


def test_accepted_lines_and_the_explicit_override_are_served():
    dp = fxdp.privatize(CenteredAccepted(), capture="fx")
    dp(torch.randn(6, 4)).sum().backward()  # "# fxdp: ignore" on the line, as in fxdp.check
    assert dp.fc.weight.grad_sample.shape == (6, 2, 4)
    for capture in ("fx", "export"):  # the same override on both capture paths
        dp = fxdp.privatize(Centered(), capture=capture, allow_unsafe_model=True)
        with pytest.warns(UserWarning, match=r"(?s)allow_unsafe_model=True.*x - x\.mean\(0\)"):
            dp(torch.randn(6, 4)).sum().backward()


def test_the_analysis_leaves_buffers_and_clean_models_alone(f64):
    """The analysis runs the model (at two batch sizes) without a trace: the buffer the
    forward updates counts the training call only, and the per-sample gradients are exact."""
    torch.manual_seed(0)
    model = Counter().double()
    dp = fxdp.privatize(model, capture="fx", loss_reduction="sum")
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp(x).sum().backward()
    assert model.seen.item() == 1
    got = dp.fc.weight.grad_sample.clone()
    for i in range(5):
        model.zero_grad()
        model(x[i:i + 1]).sum().backward()
        torch.testing.assert_close(got[i], model.fc.weight.grad, rtol=1e-10, atol=1e-12)


def test_check_reads_multihead_attention_masks_as_per_sample():
    """fxdp.check (and the guard) read DPMultiheadAttention's mask op: its queries and keys give it
    shapes only. A 2-D attn_mask with batch_first=False was reported as mixing samples."""
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=7, batch_first=False)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn
            self.register_buffer("mask", torch.rand(5, 3) < 0.3)

        def forward(self, q, k, v):
            return self.attn(q, k, v, attn_mask=self.mask, need_weights=False)[0]

    q, k, v = torch.randn(5, 4, 8), torch.randn(3, 4, 6), torch.randn(3, 4, 7)
    report = fxdp.check(M(), (q, k, v), batch_first=False)
    assert report.ok, report
    dp = fxdp.privatize(M(), batch_first=False, capture="fx")
    dp(q, k, v).sum().backward()


def test_a_view_of_a_permuted_copy_is_analysed(f64):
    """``x.view(...).permute(...).contiguous().view(...)`` (timm's window partition and reverse): the
    analysis' tags are views of the permuted tags, so it read .view() as an op it could not
    process and refused the model (timm's Swin)."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):  # [B, H, W, C]: timm's window partition, then its reverse
            B, H, W, C = x.shape
            w = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, 2, 2, C)
            w = torch.tanh(w)
            x = w.view(B, H // 2, W // 2, 2, 2, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)
            return self.l(x)

    torch.manual_seed(1)
    model = Tokens().double()
    dp = fxdp.privatize(model, capture="fx", loss_reduction="sum")
    x = torch.randn(4, 4, 6, 3)
    dp(x).pow(2).sum().backward()
    got = model.l.weight.grad_sample.clone()
    for i in range(4):
        model.zero_grad()
        model(x[i:i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(got[i], model.l.weight.grad, rtol=1e-10, atol=1e-12)
