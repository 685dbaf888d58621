"""fxdp.privatize end to end: per-sample gradients equal batch-of-one gradients (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from models import ExpandParams, FlatBags, Nested, RawParams, TiedLM
from oracle import assert_grad_samples_match, check_privatized as check, quiet_privatize

pytestmark = pytest.mark.usefixtures("f64")
privatize = quiet_privatize


# -- tied, frozen, nested, in-place ------------------------------------------------

def test_tied_weights_sum_their_uses():
    torch.manual_seed(3)
    dp = check(TiedLM(), torch.randn(5, 4, 11))
    assert sum(1 for c in dp.capture_table() if "enc.weight" in c["params"]) == 2


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.a.requires_grad_(False)
        self.b.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_frozen_parameters_are_not_captured():
    torch.manual_seed(4)
    dp = check(Frozen(), torch.randn(5, 3))
    table = dp.capture_table()
    assert [c["module"] for c in table] == ["b"] and table[0]["params"] == ["b.weight"]
    assert dp.a.weight.grad is None and getattr(dp.a.weight, "grad_sample", None) is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nested_model_with_inplace_activations(reduction):
    torch.manual_seed(5)
    check(Nested(), torch.randn(6, 5), reduction=reduction)


# -- raw parameters -----------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_raw_parameters(reduction):
    torch.manual_seed(6)
    check(RawParams(), torch.randn(4, 5, 4), reduction=reduction)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_expanded_parameters_take_the_broadcast_rule(capture):
    """``p.expand(B, ...)`` (class tokens, registers, queries): the output gradient summed
    back to the parameter's shape per sample. In the ATen graph the batch size is a value of
    the input, so the capture sits on the expand and takes this rule, not torch.func; the
    module-level graph reads it as a shape and captures the ``cat``, whose rule takes each
    parameter's slice of the output gradient."""
    torch.manual_seed(11)
    x = torch.randn(3, 5, 4)
    dp = check(ExpandParams(), x, capture=capture)
    rules = {p: c["rule"] for c in dp.capture_table() for p in c["params"]}
    rule = "raw parameter (expand)" if capture == "export" else "raw parameter (expand+cat)"
    assert rules["cls_token"] == rules["registers"] == rules["queries"] == rule


class CatParams(nn.Module):
    """Parameters expanded and concatenated in other layouts: along the last dim, with the
    batch second, one parameter twice, the sizes as a tuple, and a cat the rule leaves to
    torch.func (a parameter scaled before its expand)."""

    def __init__(self, D=4):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 1, 2))
        self.seq_tok = nn.Parameter(torch.randn(1, 1, D))
        self.scaled = nn.Parameter(torch.randn(1, 1, D))
        self.fc = nn.Linear(D + 2, 3)

    def forward(self, x):  # x: [B, T, D]
        B, T = x.shape[0], x.shape[1]
        h = torch.cat([x, self.tok.expand(B, T, -1)], dim=-1)  # features, from a shape pair
        s = h.transpose(0, 1)  # [T, B, D + 2]: the batch second
        e = self.seq_tok.expand((1, B, -1))
        s = torch.cat((e, s[:, :, :4], e), 0)  # the same parameter twice
        s = torch.cat([self.scaled.mul(2).expand(1, B, -1), s], 0)  # not a plain expand: torch.func
        return self.fc(torch.cat([torch.tanh(s), s[:, :, :2]], -1)).sum(0)


def test_concatenated_parameters_take_their_slice_of_the_gradient():
    torch.manual_seed(12)
    dp = check(CatParams(), torch.randn(3, 5, 4), capture="fx")
    rules = {p: c["rule"] for c in dp.capture_table() for p in c["params"]}
    assert rules["tok"] == rules["seq_tok"] == "raw parameter (expand+cat)"
    assert rules["scaled"] == "raw parameter (torch.func)"


def _assert_bk_sums_match_materialized(model, x, w, capture):
    """Book-keeping's clipped sums (flat bound 0.5, loss ``mean(w * model(x))``) equal those of
    the materialized per-sample gradients (float64)."""
    from oracle import bk_clipped_sums, clipped_sums_materialized

    want = clipped_sums_materialized(quiet_privatize(copy.deepcopy(model), capture=capture), x, w, 0.5, False)
    dpb = quiet_privatize(copy.deepcopy(model), capture=capture, grad_sample_mode="bk")
    got = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), 0.5)
    for p, ref in zip([p for p in dpb.parameters() if p.requires_grad], want):
        torch.testing.assert_close(got[id(p)], ref, rtol=1e-10, atol=1e-12)


class ViewedParams(nn.Module):
    """Parameters read through views that keep their elements' order, then combined
    elementwise with activations: timm ConvNeXt's ``x.mul(self.gamma.reshape(1, -1, 1, 1))``,
    indexing by ``None``, ``unsqueeze``, ``view`` + ``flatten`` into a divisor, a subtrahend;
    and one through a transpose (not order-keeping: torch.func)."""

    def __init__(self, C=3):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(C))
        self.beta = nn.Parameter(torch.randn(C))
        self.shift = nn.Parameter(torch.randn(C))
        self.scale = nn.Parameter(torch.rand(1, C, 1) + 0.5)
        self.sub = nn.Parameter(torch.randn(C))
        self.w = nn.Parameter(torch.randn(4, C))
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):  # x: [B, C, 4, 4]
        h = self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1))
        h = h + self.beta[:, None, None]
        h = h * self.shift.unsqueeze(-1).unsqueeze(-1)
        h = h / self.scale.view(1, -1, 1).flatten(1)[..., None, None]
        h = self.sub[None, :, None, None] - h
        return h.mean((2, 3)) @ self.w.t().t().t()  # [B, C] @ [C, 4]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_parameters_through_order_keeping_views_take_the_elementwise_rule(capture):
    """Per-sample gradients of parameters read through order-keeping views equal each
    sample's alone (float64), by the elementwise rules, not torch.func; the transposed use
    stays on torch.func (exact)."""
    torch.manual_seed(13)
    dp = check(ViewedParams().double(), torch.randn(3, 3, 4, 4, dtype=torch.float64), capture=capture)
    rules = {p: c["rule"] for c in dp.capture_table() for p in c["params"]}
    assert rules["gamma"] == rules["shift"] == "raw parameter (mul)"
    assert rules["beta"] == "raw parameter (add)" and rules["sub"] == "raw parameter (sub)"
    assert rules["scale"] == "raw parameter (div)"
    assert rules["w"] == "raw parameter (torch.func)"
    torch.manual_seed(14)  # book-keeping: the same clipped sums as the materialized per-sample gradients
    _assert_bk_sums_match_materialized(ViewedParams().double(), torch.randn(3, 3, 4, 4, dtype=torch.float64),
                                       torch.randn(3, 4, dtype=torch.float64), capture)


class ComputedWeights(nn.Module):
    """Layers whose weights are computed from parameters alone: a weight-standardized
    convolution with a gain (NF-ResNet's ScaledStdConv2d, its ``F.batch_norm`` over the
    weight) and a weight-normalized linear (``g * V / ||V||``), each with a direct bias."""

    def __init__(self, C=3, O=4, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(O, C, k, k))
        self.gain = nn.Parameter(torch.rand(O, 1, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(O))
        self.v = nn.Parameter(torch.randn(5, O))
        self.g = nn.Parameter(torch.rand(5, 1) + 0.5)
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):  # x: [B, C, H, W]
        O = self.weight.shape[0]
        w = F.batch_norm(self.weight.reshape(1, O, -1), None, None, weight=(self.gain * 0.7).view(-1),
                         training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        h = F.conv2d(x, w, self.bias, padding=1).relu().mean((2, 3))
        return F.linear(h, self.g * self.v / self.v.norm(dim=1, keepdim=True), self.b)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rules_serve_layers_with_weights_computed_from_parameters(capture):
    """A rule-served op whose weight is computed from parameters alone: per-sample gradients
    of the parameters behind it (and of its direct bias) equal each sample's alone in float64,
    by the op's rule and the computation's batched vector-Jacobian product; book-keeping's
    clipped sums equal the materialized ones."""
    torch.manual_seed(15)
    model, x = ComputedWeights().double(), torch.randn(3, 3, 5, 5, dtype=torch.float64)
    dp = check(copy.deepcopy(model), x, capture=capture)
    rules = {p: c["rule"] for c in dp.capture_table() for p in c["params"]}
    assert rules["weight"] == rules["gain"] == rules["bias"] == "conv (computed weights)"
    assert rules["v"] == rules["g"] == rules["b"] == "linear (computed weights)"
    for B in (0, 1):  # Poisson batches of no sample and of one
        for p in dp.parameters():
            p.grad = p.grad_sample = None
        xb = torch.randn(B, 3, 5, 5, dtype=torch.float64)
        dp(xb).sum().backward()
        for p in dp.parameters():
            assert p.grad_sample.shape == (B,) + p.shape
            if B:
                torch.testing.assert_close(p.grad_sample[0], p.grad, rtol=1e-12, atol=1e-12)
    _assert_bk_sums_match_materialized(model, x, torch.randn(3, 5, dtype=torch.float64), capture)


class ParametrizedWeights(nn.Module):
    """Weight-normalized layers (``torch.nn.utils.parametrizations.weight_norm``: the weight a
    property computed from ``original0``/``original1``) and a weight passed through a
    parameter-free module before a linear layer."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.conv = weight_norm(nn.Conv1d(3, 4, 3))
        self.fc = weight_norm(nn.Linear(4 * 6, 5))
        self.w = nn.Parameter(torch.randn(2, 5))
        self.squash = nn.Tanh()

    def forward(self, x):  # x: [B, 3, 8]
        h = self.fc(self.conv(x).relu().flatten(1))
        return F.linear(h, self.squash(self.w))


def test_parametrized_layers_take_the_export_graph_and_are_exact():
    """On the module-level graph a parametrized layer's rule would read its computed weight as
    the parameter and leave ``original0``/``original1`` without per-sample gradients: refused
    there, naming ``capture='export'``; the default capture takes the export graph, where the
    rule serves the computed weight and its batched VJP the parameters (float64, each sample
    alone), as it serves a weight passed through a parameter-free module."""
    torch.manual_seed(18)
    from fxdp.errors import SymbolicGraphError

    with pytest.raises(SymbolicGraphError, match="parametrizations.*capture='export'"):
        quiet_privatize(ParametrizedWeights(), capture="fx")(torch.randn(2, 3, 8))
    dp = check(ParametrizedWeights().double(), torch.randn(3, 3, 8, dtype=torch.float64))
    rules = {p: c["rule"] for c in dp.capture_table() for p in c["params"]}
    assert rules["conv.parametrizations.weight.original0"] == "conv (computed weights)"
    assert rules["fc.parametrizations.weight.original1"] == rules["w"] == "linear (computed weights)"


class SquashedWeight(nn.Module):
    """A weight passed through a parameter-free module (a ``call_module`` in the module-level
    graph) before a linear layer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 5))
        self.squash = nn.Tanh()

    def forward(self, x):  # x: [B, 5]
        return F.linear(x, self.squash(self.w))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_weight_through_a_parameter_free_module_is_a_computed_weight(capture):
    torch.manual_seed(19)
    dp = check(SquashedWeight().double(), torch.randn(3, 5, dtype=torch.float64), capture=capture)
    assert [c["rule"] for c in dp.capture_table()] == ["linear (computed weights)"]


class ComputedValues(nn.Module):
    """Activations combined elementwise with values computed from parameters and buffers
    alone: a relative-position bias gathered from its table by an index buffer, viewed,
    permuted and broadcast over the batch (Swin, BEiT), an exponentiated scale, a divisor
    and a subtrahend of a reduced parameter."""

    def __init__(self, T=4, H=2):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * T - 1, H))
        idx = torch.arange(T)
        self.register_buffer("index", (idx[:, None] - idx[None, :] + T - 1).reshape(-1))
        self.a = nn.Parameter(torch.randn(H, 1, 1) * 0.3)
        self.s = nn.Parameter(torch.randn(T))
        self.c = nn.Parameter(torch.randn(3, T))
        self.T, self.H = T, H

    def forward(self, x):  # x: [B, H, T, T]
        bias = self.table[self.index].view(self.T, self.T, self.H).permute(2, 0, 1).unsqueeze(0)
        h = (x + bias).softmax(-1)
        h = h * self.a.exp()
        h = h / (self.s.abs() + 1)
        return (self.c.sum(0) - h).mean((1, 2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_values_computed_from_parameters_are_served_exactly(capture):
    """Per-sample gradients of parameters behind a computed value combined elementwise with
    activations equal each sample's alone (float64; torch.func over the op); book-keeping's
    clipped sums equal the materialized ones."""
    torch.manual_seed(16)
    model, x = ComputedValues().double(), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    dp = check(copy.deepcopy(model), x, capture=capture)
    rules = {p: c["rule"] for c in dp.capture_table() for p in c["params"]}
    assert rules["table"] == rules["a"] == rules["s"] == rules["c"] == "raw parameter (torch.func)"
    _assert_bk_sums_match_materialized(model, x, torch.randn(3, 4, dtype=torch.float64), capture)


class DroppedComputedValues(nn.Module):
    """A value computed from parameters alone that draws random numbers (dropout on a
    bias), added to activations, or a weight computed the same way: computing it again for
    the per-sample gradients would draw other numbers."""

    def __init__(self, where):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 4))
        self.w = nn.Parameter(torch.randn(3, 4))
        self.where = where

    def forward(self, x):  # x: [B, 4, 4]
        if self.where == "value":
            x = x + F.dropout(self.bias * 2, 0.5, training=True)
        w = F.dropout(self.w, 0.5, training=True) if self.where == "weight" else self.w
        return F.linear(x.mean(1), w)


@pytest.mark.parametrize("where", ["value", "weight"])
def test_computed_values_that_draw_are_refused_not_drawn_again(where):
    """The computed value's or weight's draw is met in the op that reads the batch: refused
    with the fix named, as on the torch.func path, never computed again with other numbers."""
    dp = quiet_privatize(DroppedComputedValues(where))
    with pytest.raises(fxdp.UnsupportedOpError, match="draws random numbers"):
        dp(torch.randn(3, 4, 4)).sum().backward()


# -- batch_first=False --------------------------------------------------------------

class SeqModel(nn.Module):
    """[T, B, d] sequence layers, then a [B, d] head: the batch moves from dim 1 to dim 0."""

    def __init__(self, d=4):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.rnn = nn.GRU(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h, _ = self.rnn(torch.tanh(self.proj(x)))
        return self.head(h[-1])


@pytest.mark.parametrize("T,B", [(5, 3), (4, 4)])  # T == B must not confuse the batch dimension
def test_batch_first_false(T, B):
    torch.manual_seed(7)
    check(SeqModel(), torch.randn(T, B, 4), batch_first=False, in_dim=1, out_dim=0)


def test_batch_first_true_sequence():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    check(model, torch.randn(3, 7, 4))


# -- fallback: leaf modules without a rule, untraceable submodules ---------------------

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        for _ in range(int(x.shape[-1]) - 2):  # not symbolically traceable
            x = torch.tanh(self.fc(x))
        return x


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_untraceable_submodule_is_kept_whole_and_named():
    torch.manual_seed(9)
    with pytest.warns(UserWarning, match="inner"):
        dp = fxdp.privatize(WithUntraceable(), capture="fx")
    assert "inner" in dp.untraceable
    assert "fallback" in [c["rule"] for c in dp.capture_table() if c["module"] == "inner"][0]
    check(WithUntraceable(), torch.randn(4, 3))


def test_untraceable_model_is_kept_whole():
    torch.manual_seed(10)
    model = DataDependent()
    dp = check(model, torch.randn(3, 5, 3), capture="fx")  # the symbolic-tracing fallback on purpose
    assert "" in dp.untraceable
    assert dp.strip() is model


class RandomUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[-1] == 8:  # not traceable: kept whole, served by the fallback
            x = F.dropout(self.fc(x), 0.5, training=True)
        return x


def test_fallback_refuses_random_ops():
    dp = privatize(nn.Sequential(RandomUntraceable(), nn.Linear(8, 2)), capture="fx")
    with pytest.raises(fxdp.UnsupportedOpError, match="random"):
        dp(torch.randn(3, 5, 8)).sum().backward()


class BranchOnBatchMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.mean() > 0:  # mixes samples: not traceable symbolically
            return self.fc(x)
        return -self.fc(x)


class BranchOnBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) * (3.0 if x.shape[0] > 1 else 1.0)


@pytest.mark.parametrize("inner", [BranchOnBatchMean, BranchOnBatchSize])
def test_opt_in_fallback_proves_independence_on_every_batch(inner):
    """capture="fx" keeps untraceable parts on the torch.func fallback; each step it
    compares every sample's output alone with its output in the batch and refuses a
    layer that mixes samples or depends on the batch size."""
    torch.manual_seed(12)
    model = nn.Sequential(inner(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="fallback"):
        dp = fxdp.privatize(model, capture="fx")
    x = torch.randn(4, 3)
    x[0] += 10 * (1 if inner is BranchOnBatchSize else -1)  # sample 0 alone takes the other branch
    x[1:] = x[1:].abs() + 1  # the batch mean is positive
    with pytest.raises(fxdp.PerSampleGradientError, match="differs from that sample's output in the batch"):
        dp(x).sum().backward()


# -- no_grad, eval, empty batches, repeated backward -----------------------------------

class NoGradPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(h)


def test_no_grad_region_is_kept():
    torch.manual_seed(11)
    dp = check(NoGradPart(), torch.randn(4, 3))
    assert "_set_grad_enabled" in dp.code
    assert dp.a.weight.grad is None and getattr(dp.a.weight, "grad_sample", None) is None


def test_empty_batch_gives_empty_grad_samples():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model.add_module("scale", nn.Identity())
    dp = privatize(RawParams())
    dp(torch.randn(0, 5, 4)).sum().backward()
    for p in dp.parameters():
        assert p.grad_sample.shape == (0,) + p.shape
    dp = privatize(model)
    dp(torch.randn(0, 3)).sum().backward()
    for p in dp.parameters():
        assert p.grad_sample.shape == (0,) + p.shape


def test_eval_mode_is_plain_inference():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    dp = privatize(model).eval()
    x = torch.randn(5, 3)
    dp(x).sum().backward()  # ordinary gradients, no per-sample capture
    assert all(getattr(p, "grad_sample", None) is None for p in dp.parameters())
    assert all(p.grad is not None for p in dp.parameters())


def test_second_backward_through_same_forward_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    dp = privatize(model)
    out = dp(torch.randn(4, 3))
    out.sum().backward(retain_graph=True)
    with pytest.raises(fxdp.PerSampleGradientError, match="twice"):
        out.sum().backward()


def test_unconsumed_grad_samples_accumulate_as_a_list():
    """A second batch before the per-sample gradients are consumed makes
    p.grad_sample a list with one entry per backward pass (Opacus' gradient
    accumulation semantics); zero_grad consumes them."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 2))
    dp = privatize(model)
    x1, x2 = torch.randn(4, 3), torch.randn(2, 3)
    w = dp.get_submodule("0").weight
    dp(x1).sum().backward()
    first = w.grad_sample.clone()
    dp(x2).sum().backward()
    assert isinstance(w.grad_sample, list) and [g.shape[0] for g in w.grad_sample] == [4, 2]
    torch.testing.assert_close(w.grad_sample[0], first)
    dp.zero_grad()
    assert w.grad_sample is None and w.grad is None


# -- outputs, state_dict, strip ------------------------------------------------------

def test_outputs_state_dict_and_strip():
    torch.manual_seed(15)
    model = Nested()
    ref = copy.deepcopy(model)
    dp = privatize(model)
    x = torch.randn(7, 5)
    torch.testing.assert_close(dp(x), ref(x), rtol=0, atol=1e-10)
    assert list(dp.state_dict().keys()) == list(ref.state_dict().keys())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(dp.state_dict()[k], v, rtol=0, atol=0)
    plain = dp.strip()
    assert "_fxdp_captures" not in plain.code
    assert not any(isinstance(m, fxdp.capture.CaptureOp) for m in plain.modules())
    torch.testing.assert_close(plain(x), ref(x), rtol=0, atol=1e-10)
    assert list(plain.state_dict().keys()) == list(ref.state_dict().keys())
    # the privatized model can load the original's state_dict and vice versa
    dp.load_state_dict(ref.state_dict())
    ref.load_state_dict(dp.state_dict())


def test_deepcopy_keeps_capture():
    torch.manual_seed(16)
    dp = privatize(WithUntraceable(), capture="fx")
    dp2 = copy.deepcopy(dp)
    x = torch.randn(3, 3)
    dp2(x).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in dp.parameters())
    assert all(p.grad_sample is not None for p in dp2.parameters())


def test_forward_signature_and_kwargs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x, y=None):
            return self.a(x) + (self.b(y) if y is not None else 0)

    torch.manual_seed(17)
    model = TwoInputs()
    dp = privatize(model)
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    torch.testing.assert_close(dp(x, y=y), model(x, y=y), rtol=0, atol=1e-10)
    dp(x, y=y).sum().backward()
    assert dp.b.weight.grad_sample.shape == (5, 2, 4)


# -- clear errors --------------------------------------------------------------------

def test_batchnorm_is_refused_with_a_fix_when_not_replaced():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(fxdp.UnsupportedOpError, match="GroupNorm"):
        privatize(model, rewrite_options={"batchnorm": "off"})
    dp = privatize(model)  # by default the BatchNorm pass replaces it
    assert [(r.path, r.original) for r in dp.rewrites] == [("1", "BatchNorm1d")]


def test_functional_batch_norm_without_parameters_is_refused():
    class FBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.batch_norm(x, None, None, training=True))

    with pytest.raises(fxdp.UnsupportedOpError, match="batch statistics"):
        privatize(FBN())


def test_parameter_reaching_output_without_data_is_refused():
    class Penalty(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), self.fc.weight.pow(2).sum()

    with pytest.raises(fxdp.UnsupportedModelError, match="fc.weight"):
        privatize(Penalty())


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_reduction"):
        fxdp.privatize(nn.Linear(2, 2), loss_reduction="avg")
    with pytest.raises(TypeError, match="nn.Module"):
        fxdp.privatize(lambda x: x)
    with pytest.raises(fxdp.UnsupportedModelError, match="already privatized"):
        fxdp.privatize(privatize(nn.Linear(2, 2)))


def test_folded_batch_is_refused_with_a_fix():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            B, T, D = x.shape
            return self.fc(x.reshape(B * T, D)).reshape(B, T, 2)

    dp = privatize(Folded(), capture="fx")
    with pytest.raises(fxdp.BatchDimensionError, match="folds the batch.*capture='export'"):
        dp(torch.randn(3, 5, 4)).sum().backward()
    # capture="auto" (the default) moves to the export path at that call, which serves the fold
    torch.manual_seed(3)
    model = Folded().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    dp = privatize(model, loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    assert dp.capture_path == "export"
    from oracle import batch_of_one_grads
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))


def test_embedding_bag_with_flat_indices_and_offsets():
    """Flat indices have no batch dimension; the batch is the number of bags."""

    torch.manual_seed(18)
    model = FlatBags(20, 4)
    dp = privatize(model, input_batch_dims=(None, 0))
    idx = torch.randint(0, 20, (9,))
    offsets = torch.tensor([0, 2, 3, 7])
    w = torch.randn(4, 2)
    (dp(idx, offsets) * w).sum().div(4).backward()
    ends = offsets.tolist()[1:] + [len(idx)]
    expected = {n: torch.zeros((4,) + p.shape) for n, p in model.named_parameters()}
    for i, (s, e) in enumerate(zip(offsets.tolist(), ends)):
        loss = (model(idx[s:e], torch.tensor([0])) * w[i : i + 1]).sum()
        for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            expected[n][i] = g
    assert_grad_samples_match(dp, expected)


def test_opacus_module_attribute_is_the_trained_model():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    dp = privatize(model)
    assert dp._module is model and dp._module[0].weight is dp.get_parameter("0.weight")
    assert dp._module.state_dict().keys() == dp.state_dict().keys()
    bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    dpb = privatize(bn)
    assert type(dpb._module[1]).__name__ == "DPGroupNorm"  # the rewritten model that is trained
    assert dpb._module.state_dict().keys() == dpb.state_dict().keys()


def test_two_forwards_then_one_backward_give_one_tensor_as_in_opacus():
    """Two views of the same batch, one loss: row i sums sample i's contributions from
    both forwards (Opacus accumulates them in one tensor); a second backward pass
    before the step appends a list entry."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    dp = privatize(model, loss_reduction="sum")
    x1, x2 = torch.randn(5, 3), torch.randn(5, 3)
    (dp(x1).pow(2).sum() + dp(x2).pow(2).sum()).backward()
    w = model[0].weight
    assert isinstance(w.grad_sample, torch.Tensor) and w.grad_sample.shape == (5, 4, 3)
    for i in range(5):
        g = torch.autograd.grad(model(x1[i:i + 1]).pow(2).sum() + model(x2[i:i + 1]).pow(2).sum(), w)[0]
        torch.testing.assert_close(w.grad_sample[i], g)
    dp(x1).sum().backward()
    assert isinstance(w.grad_sample, list) and len(w.grad_sample) == 2


def test_optional_argument_omitted_or_given_gets_its_own_exact_graph(f64):
    """forward(x, h=None) with `if h is None` (Opacus' char-lstm example): traced with h=None,
    not a proxy taking the other branch; a call passing h runs a graph traced with it.
    Both are exact (batch of one), share parameters and the recorder, and keep the hooks."""
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.state = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x, h=None):
            z = self.inp(x)
            if h is None:
                h = torch.zeros_like(z)
            return self.out(torch.tanh(z + self.state(h)))

    torch.manual_seed(3)
    model = WithState().double()
    dp = privatize(model, loss_reduction="sum")
    seen = []
    dp.register_forward_pre_hook(lambda m, a: seen.append(len(a)))
    x, h = torch.randn(4, 3), torch.randn(4, 4)
    for call in ((x,), (x, h)):
        dp.zero_grad()
        torch.testing.assert_close(dp(*call), model(*call))
        dp(*call).pow(2).sum().backward()
        for i in range(4):
            model.zero_grad()
            model(*(t[i:i + 1] for t in call)).pow(2).sum().backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad_sample[i], p.grad, rtol=1e-10, atol=1e-12, msg=f"{n} {len(call)}")
    assert seen == [1, 1, 2, 2]
    torch.testing.assert_close(dp(x, h=h), model(x, h=h))


@pytest.mark.parametrize("mode", ["bk", "materialize"])
def test_capture_ops_hold_their_outputs_only_for_an_inner_backward(mode):
    """A layer with a closed-form input gradient (Linear, Conv, ...) does not keep its output
    alive until its backward (it would double the activations a forward holds); a fallback
    layer differentiated through an inner graph does, and needs to."""

    class Fallback(nn.Module):  # no per-sample rule: served by torch.func on its capture
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.sin(x * self.w.exp())

    dp = quiet_privatize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Fallback(), nn.Linear(4, 2)), grad_sample_mode=mode)
    nodes, seen, todo = [], set(), [dp(torch.randn(5, 3)).grad_fn]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if type(n).__name__ == "_CaptureFunctionBackward":
            nodes.append(n)
        todo += [f for f, _ in n.next_functions]
    held = sorted(n.inner[1] is not None for n in nodes)
    assert held == [False, False, True], held  # the two Linears drop it, the fallback keeps it


class _WindowNorm(nn.Module):
    """LeViT's norm of ``x.flatten(0, 1)`` (a GroupNorm once privatize replaces its
    BatchNorm): symbolic tracing does not follow the fold's order, the export path does."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x):  # [B, 3, 4]
        h = self.l(x)
        return self.head(self.norm(h.flatten(0, 1)).reshape_as(h).flatten(1))


class _ScaledWindowNorm(_WindowNorm):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return super().forward(x * self.scale)


def test_a_model_moved_to_the_export_path_follows_dtype_changes():
    """The exported graph is not a submodule of the symbolic DP module it was moved from
    (no second state_dict keys); ``dp.double()`` reaches it (its captured graphs are
    dropped and captured again, as an exported DP model's are) and stays exact."""
    from oracle import batch_of_one_grads

    torch.manual_seed(6)
    model = _ScaledWindowNorm()
    x = torch.randn(5, 3, 4)
    dp = privatize(model, loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    assert dp.capture_path == "export" and sorted(dp.state_dict()) == sorted(model.state_dict())
    for p in model.parameters():
        p.grad = p.grad_sample = None
    dp.double()
    x = x.double()
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))
    # compiled before the move: the exported graph is compiled too
    for p in model.parameters():
        p.grad = p.grad_sample = None
    dp2 = privatize(model, loss_reduction="sum").compile(backend="eager")
    dp2(x).pow(2).sum().backward()
    assert dp2.capture_path == "export" and "forward" in dp2._export_path.graphs[0].__dict__
    assert_grad_samples_match(dp2, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))
    # a deep copy starts symbolic again, on its own parameters, and moves at its first call
    twin = copy.deepcopy(dp)
    assert twin.capture_path == "fx"
    twin(x).pow(2).sum().backward()
    mine = twin._source_root
    assert twin.capture_path == "export" and all(p.grad_sample is not None for p in mine.parameters())
    assert not any(p is q for p, q in zip(mine.parameters(), model.parameters()))
    torch.testing.assert_close([p.grad_sample for p in mine.parameters()],
                               [p.grad_sample for p in model.parameters()])


def test_auto_capture_takes_the_export_path_for_a_fold_symbolic_tracing_cannot_serve(f64):
    """Given example inputs (as make_private has its loader's batch), capture="auto" reads
    the folds the symbolic graph's layers would get and takes the export path when it
    serves them; fxdp.check reads that graph too. Without examples the decision cannot
    be made up front: the first training call takes it (it refused at the first backward,
    naming capture='export'); with capture="fx" that refusal stands."""
    from fxdp.exported_module import ExportedDPModule
    from oracle import batch_of_one_grads
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(6)
    model = _WindowNorm()
    x = torch.randn(5, 3, 4)
    dp = privatize(model, example_inputs=(x,), loss_reduction="sum")
    assert isinstance(dp, ExportedDPModule)
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))
    assert fxdp.check(model, x).ok
    for p in model.parameters():
        p.grad = p.grad_sample = None
    with pytest.raises(fxdp.BatchDimensionError, match="capture='export'"):
        privatize(model, capture="fx")(x).sum().backward()
    for p in model.parameters():
        p.grad = p.grad_sample = None
    seen = []
    dp = privatize(model, loss_reduction="sum")
    dp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert dp.capture_path == "fx"
    dp(x).pow(2).sum().backward()
    assert dp.capture_path == "export" and seen == [(5, 3)] and len(dp.capture_table()) == 3
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))
    dp.eval()
    torch.testing.assert_close(dp(x), model(x))
    dp.train()
    # book-keeping through the optimizer: the moved graph reports to the recorder it attached
    for p in model.parameters():
        p.grad = p.grad_sample = None
    dp = privatize(model, grad_sample_mode="bk")
    opt = fxdp.optim.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=1e6, expected_batch_size=5)
    opt.attach_bookkeeping(dp.bookkeeping)
    before = [p.detach().clone() for p in model.parameters()]
    plain = torch.autograd.grad(model(x).pow(2).sum(1).mean(), list(model.parameters()))
    opt.zero_grad()
    dp(x).pow(2).sum(1).mean().backward()
    opt.step()
    assert dp.capture_path == "export"
    for b, p, g in zip(before, model.parameters(), plain):  # unclipped, noiseless: the plain gradient step
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    # make_private checks a batch of its loader, and privatizes on the graph it checked
    for p in model.parameters():
        p.grad = p.grad_sample = None
    loader = DataLoader(TensorDataset(torch.randn(32, 3, 4), torch.randint(0, 3, (32,))), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_opt, dp_loader = fxdp.PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    assert isinstance(dp_model, ExportedDPModule)
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = next(iter(dp_loader))
    dp_opt.zero_grad()
    F.cross_entropy(dp_model(xb), yb).backward()
    dp_opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
