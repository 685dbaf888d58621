"""The attention rewrite pass (``fxdp/passes/attention.py``): nn.MultiheadAttention and
the transformer layers -> traceable DP layers sharing the user's Parameters;
state_dict round trips, strip() back to torch modules with the trained weights,
shared modules, subclasses, the option (float64). The layers and their rules:
tests/rules/test_rule_attention.py."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.layers import DPMultiheadAttention, DPTransformer, DPTransformerEncoderLayer
from fxdp.layers.transformer import to_torch
from models import B, E, H, L, S, randomize
from oracle import check_attention as check, quiet_privatize

# PyTorch's own warnings about mixed bool/float masks and nested tensors
pytestmark = [pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning"),
              pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
              pytest.mark.usefixtures("f64")]
privatize = quiet_privatize


# -- state_dict, parameters, strip, records ------------------------------------------------

def test_state_dict_round_trips_and_shared_parameters():
    torch.manual_seed(8)
    for kw in ({}, {"kdim": 6, "vdim": 7, "add_bias_kv": True}):
        m = randomize(nn.MultiheadAttention(E, H, batch_first=True, **kw))
        d = DPMultiheadAttention(E, H, batch_first=True, **kw)
        assert d.state_dict().keys() == m.state_dict().keys()
        d.load_state_dict(m.state_dict())  # torch -> DP
        back = nn.MultiheadAttention(E, H, batch_first=True, **kw)
        back.load_state_dict(randomize(d).state_dict())  # DP -> torch
        q, k = torch.randn(B, L, E), torch.randn(B, S, kw.get("kdim", E))
        v = torch.randn(B, S, kw.get("vdim", E))
        torch.testing.assert_close(back(q, k, v)[0], d(q, k, v)[0], rtol=0, atol=1e-10)
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True))
    dp = privatize(model)
    assert dp.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(dp.parameters(), model.parameters()))
    dp.load_state_dict(randomize(copy.deepcopy(model)).state_dict())  # loads into the shared parameters
    assert torch.equal(model.state_dict()["0.self_attn.in_proj_weight"], dp.state_dict()["0.self_attn.in_proj_weight"])


def test_strip_gives_back_torch_modules_with_trained_weights():
    torch.manual_seed(9)
    model = randomize(nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, H, 16, dropout=0.0,
                                                                                batch_first=True)))
    dp = privatize(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the original model
    before = model[1].self_attn.in_proj_weight.detach().clone()
    x = torch.randn(B, L, E)
    dp(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model[1].self_attn.in_proj_weight)
    plain = dp.strip()
    layer = plain.get_submodule("1")
    assert type(layer) is nn.TransformerEncoderLayer and type(layer.self_attn) is nn.MultiheadAttention
    assert layer.self_attn.in_proj_weight is model[1].self_attn.in_proj_weight
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(plain(x), dp(x), rtol=0, atol=1e-10)
    assert type(model[1]) is nn.TransformerEncoderLayer  # the user's model was never modified
    (r1, r2) = dp.rewrites
    assert (r1.path, r1.original, r1.replacement, r1.reversible) == (
        "1", "TransformerEncoderLayer", "DPTransformerEncoderLayer", True)
    assert (r2.path, r2.original, r2.replacement) == ("1.self_attn", "MultiheadAttention", "DPMultiheadAttention")
    assert "fast path" in r2.reason and r2.details["num_heads"] == H
    mha = to_torch(dp.get_submodule("1.self_attn"))
    assert type(mha) is nn.MultiheadAttention and "attn_dropout" not in dict(mha.named_children())


def test_shared_attention_stays_shared_and_subclasses_with_own_forward_are_kept():
    class MyAttention(nn.MultiheadAttention):
        def forward(self, q, k, v, **kw):
            return super().forward(q, k, v, need_weights=False)[0]

    attn = nn.MultiheadAttention(E, H, batch_first=True)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = attn, attn, MyAttention(E, H, batch_first=True)

        def forward(self, x):
            return self.a(x, x, x)[0] + self.b(x, x, x)[0] + self.c(x, x, x)

    model = Twice()
    dp = privatize(model, capture="fx")  # the symbolic-tracing fallback on purpose
    assert dp.a is dp.b and type(dp.a) is DPMultiheadAttention
    assert type(dp.c) is MyAttention and "c" in dp.untraceable
    x = torch.randn(B, L, E)
    torch.testing.assert_close(dp(x), model(x), rtol=0, atol=1e-10)


def test_root_module_and_traced_flags():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxdp.privatize(nn.MultiheadAttention(E, H, batch_first=True), capture="fx")
        dp = fxdp.privatize(DPMultiheadAttention(E, H, batch_first=True), capture="fx")
    messages = [str(w.message) for w in caught]
    assert any("cannot be rewritten in place" in m and "nn.Sequential(model)" in m for m in messages)
    assert "must be a Python bool" in dp.untraceable[""]  # the whole-model fallback, with the reason


def test_directly_constructed_dp_layers_are_traceable():
    torch.manual_seed(10)
    model = nn.Sequential(DPTransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True), nn.Linear(E, 2))
    assert type(model[0].self_attn) is DPMultiheadAttention
    dp = check(randomize(model), [torch.randn(B, L, E)], True)
    assert dp.rewrites == [] and not dp.untraceable
    t = DPTransformer(E, H, 1, 1, 16, dropout=0.0, batch_first=True)
    kinds = {type(m).__name__ for m in t.modules()}
    assert {"DPTransformerEncoder", "DPTransformerDecoder", "DPTransformerEncoderLayer",
            "DPTransformerDecoderLayer", "DPMultiheadAttention"} <= kinds
    assert not kinds & {"MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder"}
    assert type(to_torch(t)) is nn.Transformer and to_torch(t).encoder.layers[0].linear1 is t.encoder.layers[0].linear1


def test_option_keeps_torch_modules():
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True))
    dp = privatize(model, rewrite_options={"attention": False}, capture="fx")
    assert dp.rewrites == [] and "0" in dp.untraceable  # served by the slow fallback
    with pytest.raises(TypeError, match="True or False"):
        privatize(model, rewrite_options={"attention": "yes"})


def test_subclass_keeping_forward_is_replaced_and_restored_as_itself():
    class Plain(nn.MultiheadAttention):
        pass

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Plain(E, H, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(11)
    model = randomize(Model())
    dp = check(model, [torch.randn(B, L, E)], True)
    assert type(dp.attn) is DPMultiheadAttention and dp.rewrites[0].original == "Plain"
    dp.attn.register_forward_hook(lambda *a: None)  # hook tables are not shared with the user's module
    assert not model.attn._forward_hooks
    plain = dp.strip()
    assert type(plain.attn) is Plain and plain.attn.in_proj_weight is model.attn.in_proj_weight
