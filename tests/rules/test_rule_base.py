"""The rule base class and registry (``fxdp/rules/base.py``: ``PerSampleRule``,
``register_rule``, ``register_module``): the custom-rule recipe of
docs/custom_rules.md works as written and is exact (float64)."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxdp
from fxdp.rules import ModuleCall, PerSampleRule, register_module, register_rule
from oracle import assert_grad_samples_match, batch_of_one_grads


def scaled_linear(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x W^T) * scale, a custom op with two parameters."""
    return (input @ weight.t()) * scale


class ScaledLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.scale = nn.Parameter(torch.ones(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.scale)


@register_rule(scaled_linear)
class ScaledLinearRule(PerSampleRule):
    name = "scaled_linear"
    param_args = ("weight", "scale")

    def signature(self, input, weight, scale):
        pass

    def grad_sample(self, args, grad_output, needs):
        x, w, s = args["input"], args["weight"], args["scale"]
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, d_in]
        g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])  # [B, T, d_out]
        out = {}
        if "weight" in needs:
            out["weight"] = torch.einsum("bto,bti->boi", g * s, x)
        if "scale" in needs:
            out["scale"] = (g * (x @ w.t())).sum(1)
        return out


@register_module(ScaledLinear)
def _scaled_linear_call(m: ScaledLinear) -> ModuleCall:
    return ModuleCall(scaled_linear, params={"weight": "weight", "scale": "scale"})


def test_custom_rule_is_used_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 5), nn.Tanh(), ScaledLinear(5, 2)).double()
    dp = fxdp.privatize(model)
    assert [r["rule"] for r in dp.capture_table()] == ["scaled_linear", "scaled_linear"]
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.randn(6, 3, 2, dtype=torch.float64)
    (dp(x) * w).sum().div(6).backward()
    expected = batch_of_one_grads(model, [x], lambda o, i: (o * w[i : i + 1]).sum())
    assert_grad_samples_match(dp, expected)


# -- the ghost norm's Gram inner product (shared by the linear and convolution rules) ------

import pytest  # noqa: E402


@pytest.mark.parametrize("lane", [16, 1, 3])
@pytest.mark.parametrize("T, rows", [(1, 64), (7, 64), (7, 2), (7, 3), (9, 4), (17, 64), (33, 2), (64, 64), (65, 32),
                                     (130, 64), (600, 64)])
def test_gram_inner_in_strips_equals_the_materialized_norm(T, rows, lane, monkeypatch):
    """``<a aᵀ, g gᵀ>`` formed from the upper triangle in strips (off-diagonal blocks twice)
    equals ``||aᵀ g||²`` of each sample's own gradient, float64, for strip heights that
    divide ``T`` and that leave a short last strip, with the rows past the last lane a
    strip of their own (lanes of 16 and 3) or none (lanes of 1)."""
    import fxdp.rules.base as base

    monkeypatch.setattr(base, "GRAM_STRIP_ROWS", rows)
    monkeypatch.setattr(base, "GRAM_LANE", lane)
    monkeypatch.setattr(base, "GRAM_LANE_MIN_WORK", 0)
    torch.manual_seed(T)
    a, g = torch.randn(3, T, 5, dtype=torch.float64), torch.randn(3, T, 4, dtype=torch.float64)
    want = torch.stack([(a[i].t() @ g[i]).pow(2).sum() for i in range(3)])
    torch.testing.assert_close(base.gram_inner(a, g), want, rtol=1e-12, atol=1e-12)
    h = base.gram_strip_rows(T)
    assert 1 <= h <= T and -(-T // h) <= base.GRAM_MAX_STRIPS + 1
    aligned = base._gram_aligned(T)
    assert aligned == T or (T - aligned < lane and aligned % lane == 0 and h % lane == 0)


@pytest.mark.parametrize("T", [5, 17, 65])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_inner_in_half_precision_is_float32(T, dtype, monkeypatch):
    """Half-precision records (a bfloat16 model, autocast): the Gram matrices and their sum
    run in float32, so the ghost norm is that of the half-precision inputs to float32
    rounding (in bfloat16 it read up to 0.5% low: a clipped gradient up to 0.25% over the
    clip bound), in one piece and in lanes."""
    import fxdp.rules.base as base

    monkeypatch.setattr(base, "GRAM_LANE_MIN_WORK", 0)
    torch.manual_seed(T)
    a, g = torch.randn(8, T, 96).to(dtype), torch.randn(8, T, 80).to(dtype)
    want = torch.stack([(a[i].double().t() @ g[i].double()).pow(2).sum() for i in range(8)])
    got = base.gram_inner(a, g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert base.gram_bytes(T, 96, 80, dtype) == base.gram_bytes(T, 96, 80, torch.float32) + T * 176 * 4


def test_gram_strip_rows():
    from fxdp.rules.base import _gram_aligned, gram_strip_rows

    assert gram_strip_rows(16) == 16 and gram_strip_rows(15) == 15  # up to one lane: one piece
    assert gram_strip_rows(50) == 48 and _gram_aligned(50) == 48  # 48 rows in one piece, then the last 2
    assert gram_strip_rows(17) == 16 and _gram_aligned(17) == 16  # timm ViT-tiny's 17 tokens at 64x64
    assert gram_strip_rows(65) == 32 and _gram_aligned(65) == 64  # HF ViT's 65 tokens: two strips and a row
    assert gram_strip_rows(128) == 32 and gram_strip_rows(197) == 32 and _gram_aligned(197) == 192
    assert gram_strip_rows(256) == 64 and gram_strip_rows(512) == 64 and gram_strip_rows(1024) == 128
    assert gram_strip_rows(600) == 80  # 592 aligned rows in 8 strips of whole lanes


def test_rules_on_aten_overloads_bind_the_schema_defaults():
    """An exported graph leaves out arguments at their ATen default, and the rule's
    signature fills them in: a rule default that differs from the overload's would run
    the op with another argument (the string-padding convolutions' ``"valid"`` had been
    filled as ``0``, a call that raised). Every rule keyed on an ATen overload binds its
    arguments in the schema's order with the schema's defaults, but where its
    ``forward`` maps them (``ConvRule``: ``.padding`` overloads)."""
    import inspect

    from fxdp.rules.base import _RULES
    from fxdp.rules.conv import ConvRule

    def same(rule_default, schema_default):
        if isinstance(schema_default, (list, tuple)) and isinstance(rule_default, int):
            return all(v == rule_default for v in schema_default)  # an int for every spatial dimension
        return list(rule_default) == list(schema_default) if isinstance(rule_default, (list, tuple)) \
            else rule_default == schema_default

    checked, bad = 0, []
    for op, rule in _RULES.items():
        if not isinstance(op, torch._ops.OpOverload):
            continue
        checked += 1
        params = list(inspect.signature(rule.signature).parameters.values())
        schema = op._schema.arguments
        if len(params) < sum(not a.kwarg_only for a in schema):
            bad.append(f"{op}: fewer parameters than the schema's positional ones")
        for p, a in zip(params, schema):
            if a.has_default_value() and p.default is not inspect.Parameter.empty \
                    and not same(p.default, a.default_value):
                if isinstance(rule, ConvRule) and op._overloadname == "padding" and a.name == "padding":
                    continue  # ConvRule.forward gives the string overload its "valid"
                bad.append(f"{op} {a.name}: rule {p.default!r}, schema {a.default_value!r}")
    assert checked > 10 and not bad, bad


def test_weighted_sum_of_half_precision_rows_is_float32():
    """``weighted_sum`` (kept per-sample gradients, bias sums) sums half-precision rows in
    float32, fresh or into a float32 target, equal to float64 to float32 accuracy."""
    from fxdp.rules.base import weighted_sum

    g = torch.Generator().manual_seed(21)
    rows = (torch.randn(64, 3, 9, generator=g) + 2).bfloat16()
    f = torch.rand(64, generator=g)
    want = torch.einsum("b,bij->ij", f.double(), rows.double())
    got = weighted_sum(f.bfloat16(), rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.einsum("b,bij->ij", f.bfloat16().double(), rows.double()),
                               rtol=1e-6, atol=0)
    into = torch.zeros(3, 9)
    assert weighted_sum(f, rows, into) is None
    torch.testing.assert_close(into.double(), want, rtol=1e-6, atol=0)
