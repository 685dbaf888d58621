"""Custom autograd.Functions: a capture keeps their forward's ops and drops their backward
(``fxdp/utils/custom_backward.py``). A backward that is the forward's derivative (hand-written,
as Bloom's GeLU) is served, exact per sample; one that is not (gradient reversal, a
straight-through estimator, peft's C3A) is refused, naming the Function and its line."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.utils.custom_backward import check_backwards
from oracle import check_privatized, line_of, quiet_privatize

pytestmark = pytest.mark.usefixtures("f64", "quiet")


class Reverse(torch.autograd.Function):
    """Gradient reversal (domain-adversarial training): identity forward, backward -g."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class StraightThrough(torch.autograd.Function):
    """round() forward, identity backward (quantization-aware training)."""

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


class TanhGelu(torch.autograd.Function):
    """GeLU (tanh form) with its derivative written by hand, as Bloom's GeLUFunction: old-style ctx."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.79788456 * (1 + 3 * 0.044715 * x * x)
        return g * d


class ScaledMatmul(torch.autograd.Function):
    """x @ w.T * s with hand-written gradients for both inputs (a parameter enters the Function)."""

    @staticmethod
    def forward(x, w, s):
        return x @ w.t() * s

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, s = inputs
        ctx.save_for_backward(x, w)
        ctx.s = s

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g * ctx.s
        return g @ w, g.flatten(0, -2).t() @ x.flatten(0, -2), None


class Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(5, 6) / 3)
        self.b = nn.Linear(5, 2)
        self.fn = fn

    def forward(self, x):
        h = self.a(x) * 3
        h = ScaledMatmul.apply(h, self.w, 0.5) if self.fn is ScaledMatmul else nn.functional.linear(
            self.fn.apply(h), self.w)
        return self.b(h)


@pytest.mark.parametrize("fn", [Reverse, StraightThrough])
@pytest.mark.parametrize("capture", ["auto", "export"])
def test_a_backward_that_is_not_the_forward_derivative_is_refused(fn, capture):
    torch.manual_seed(0)
    dp = quiet_privatize(Net(fn), capture=capture)
    with pytest.raises(fxdp.UnsupportedModelError, match=f"custom autograd.Function {fn.__name__} .*"
                       r"test_utils_custom_backward.py:\d+.* not its forward's derivative") as e:
        dp(torch.randn(3, 4))
    assert f"py:{line_of(Net.forward, 'self.fn.apply')}:" in str(e.value)  # the model's line


@pytest.mark.parametrize("fn", [TanhGelu, ScaledMatmul])
def test_a_backward_that_is_the_forward_derivative_is_served_exactly(fn):
    torch.manual_seed(1)
    dp = check_privatized(Net(fn), torch.randn(5, 4), reduction="sum")
    assert dp.capture_path == "export"  # symbolic tracing does not check the backward: export does
    if fn is ScaledMatmul:
        assert dp.w.grad_sample.shape == (5, 5, 6)  # a parameter entering the Function


def test_check_reports_the_function_checked_or_refused():
    x = torch.randn(4, 4)
    ok = fxdp.check(Net(TanhGelu), x)
    assert ok.ok and [(f.code, f.severity) for f in ok.findings if f.code == "autograd-function"] == \
        [("autograd-function", "info")]
    bad = fxdp.check(Net(Reverse), x)
    assert [(f.code, f.line) for f in bad.errors] == [("autograd-function", line_of(Net.forward, "self.fn.apply"))]


class Counting(nn.Module):
    """A buffer updated in forward and dropout: the check's extra run leaves neither moved."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return nn.functional.dropout(TanhGelu.apply(self.fc(x)), 0.5)


def test_the_check_leaves_buffers_and_random_streams_as_they_were():
    m = Counting()
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    checked = []
    import fxdp.passes.export_graph as eg
    real = eg.check_backwards
    eg.check_backwards = lambda *a: checked.append(1) or real(*a)
    try:
        quiet_privatize(m, example_inputs=x, capture="export")
    finally:
        eg.check_backwards = real
    assert checked and int(m.calls) == 0 and torch.equal(rng, torch.get_rng_state())


def test_check_backwards_reports_each_application():
    class Two(nn.Module):
        def forward(self, x):
            return Reverse.apply(TanhGelu.apply(x)) + TanhGelu.apply(x)

    x = torch.randn(3, 2, requires_grad=True)
    found = check_backwards(Two(), (x,), {})
    assert [(a.name, a.same_gradient) for a in found] == [("TanhGelu", True), ("Reverse", False)]
    assert math.isclose(found[1].difference, 2.0)
    # no gradient flows into a Function applied to data: nothing to check
    assert check_backwards(Two(), (torch.randn(3, 2),), {}) == []


class ScaledReverse(torch.autograd.Function):
    """A keyword argument to apply (bound to forward's signature)."""

    @staticmethod
    def forward(x, scale=1.0):
        return x * scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return -g * ctx.scale, None


class MaskedDropout(torch.autograd.Function):
    """Dropout that draws its mask in forward and reuses it in backward (SEW-D's XDropout)."""

    @staticmethod
    def forward(ctx, x, p):
        mask = torch.rand_like(x) < p
        ctx.save_for_backward(mask)
        ctx.scale = 1 / (1 - p)
        return x.masked_fill(mask, 0) * ctx.scale

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g.masked_fill(mask, 0) * ctx.scale, None


def test_a_forward_that_draws_is_compared_on_the_same_draws():
    class Drop(nn.Module):
        def forward(self, x):
            return MaskedDropout.apply(x, 0.5)

    found = check_backwards(Drop(), (torch.randn(8, 16, requires_grad=True),), {})
    assert [(a.name, a.same_gradient) for a in found] == [("MaskedDropout", True)]


class InPlaceSoftmax(torch.autograd.Function):
    """A softmax whose forward zeroes masked entries in place (SEW-D's XSoftmax): fine inside
    apply, but its ops cannot be differentiated as a captured graph would."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        y.masked_fill_(x < -1, 0.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


def test_a_forward_whose_ops_cannot_be_differentiated_is_refused():
    class Soft(nn.Module):
        def forward(self, x):
            return InPlaceSoftmax.apply(x)

    (found,) = check_backwards(Soft(), (torch.randn(3, 5, requires_grad=True),), {})
    assert not found.same_gradient and found.difference == math.inf
    assert "cannot be differentiated" in found.reason


def test_a_function_applied_with_keyword_arguments_is_checked_too():
    class Kw(nn.Module):
        def forward(self, x):
            return ScaledReverse.apply(x, scale=3.0)

    found = check_backwards(Kw(), (torch.randn(3, 2, requires_grad=True),), {})
    assert [(a.name, a.same_gradient) for a in found] == [("ScaledReverse", False)]
    assert math.isclose(found[0].difference, 2.0)


def test_reentrant_checkpointing_is_not_checked():
    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.fc, x, use_reentrant=True)

    assert check_backwards(Ckpt(), (torch.randn(2, 4),), {}) == []


def test_real_models():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # Bloom's GeLUFunction (training mode): its hand-written backward is the derivative
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    ids = torch.randint(0, 50, (3, 5))
    dp = quiet_privatize(bloom, loss_reduction="sum")
    dp(input_ids=ids).logits.pow(2).sum().backward()
    g = bloom.transformer.h[0].mlp.dense_h_to_4h.weight.grad_sample[1].clone()
    bloom.zero_grad()
    bloom(input_ids=ids[1:2]).logits.pow(2).sum().backward()
    torch.testing.assert_close(g, bloom.transformer.h[0].mlp.dense_h_to_4h.weight.grad, rtol=1e-10, atol=1e-12)
    # peft's C3A: its BlockCircularConvolution's backward is not its forward's derivative for the input
    # (it is for the kernel): refused where a trainable layer comes before it (q_proj's adapter before o_proj's)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24))
    model = peft.get_peft_model(llama, peft.C3AConfig(block_size=8, target_modules=["q_proj", "o_proj"]))
    with pytest.raises(fxdp.UnsupportedModelError, match="BlockCircularConvolution .*c3a/layer.py"):
        quiet_privatize(model, loss_reduction="sum")(input_ids=ids)
