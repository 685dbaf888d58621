"""DPMultiheadAttention and the traceable transformer layers, with the per-sample
rules of their packed projections and key/value biases (``fxdp/rules/attention.py``):
outputs equal PyTorch's, per-sample gradients through fxdp.privatize equal
batch-of-one gradients (float64). The rewrite pass (state_dict, strip, options):
tests/passes/test_pass_attention.py."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxdp.layers import DPMultiheadAttention
from fxdp.layers.attention import append_kv_bias, packed_linear
from fxdp.rules import rule_for_op
from models import B, E, H, L, S, randomize, seq
from oracle import check_attention as check, quiet_privatize

# PyTorch's own warnings about mixed bool/float masks (tested on purpose) and nested tensors
pytestmark = [pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning"),
              pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
              pytest.mark.usefixtures("f64")]
privatize = quiet_privatize


# -- eager equivalence: every option, mask and call form ----------------------------------

def mask_cases(Lx, Sx):
    g = torch.Generator().manual_seed(Lx * 10 + Sx)

    def boolean(*shape):
        m = torch.rand(*shape, generator=g) < 0.3
        m[..., 0] = False  # never a fully masked row (NaN in PyTorch too)
        return m

    cases = [
        {},
        {"key_padding_mask": boolean(B, Sx)},
        {"key_padding_mask": torch.randn(B, Sx, generator=g)},
        {"attn_mask": boolean(Lx, Sx)},
        {"attn_mask": torch.randn(Lx, Sx, generator=g)},
        {"attn_mask": torch.randn(B * H, Lx, Sx, generator=g)},
        {"attn_mask": boolean(B * H, Lx, Sx), "key_padding_mask": boolean(B, Sx)},
        {"attn_mask": torch.randn(Lx, Sx, generator=g), "key_padding_mask": torch.randn(B, Sx, generator=g)},
    ]
    if Lx == Sx:
        causal = nn.Transformer.generate_square_subsequent_mask(Lx)
        cases += [{"attn_mask": causal, "is_causal": True},
                  {"attn_mask": causal, "is_causal": True, "key_padding_mask": boolean(B, Sx)}]
    return cases


@pytest.mark.parametrize("bias, add_bias_kv, add_zero_attn, kv, batch_first", [
    (True, False, False, None, True), (True, False, False, None, False), (False, False, False, None, False),
    (True, True, False, None, True), (True, False, True, None, False), (False, True, True, None, True),
    (True, False, False, (6, 7), False), (True, True, True, (6, 7), True), (False, False, False, (6, 7), True),
])
def test_outputs_equal_torch_for_every_option(bias, add_bias_kv, add_zero_attn, kv, batch_first):
    torch.manual_seed(hash((batch_first, bias, add_bias_kv, add_zero_attn, kv)) % 1000)
    kdim, vdim = kv or (None, None)
    m = randomize(nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                        kdim=kdim, vdim=vdim, batch_first=batch_first))
    d = DPMultiheadAttention.from_torch(m)
    q, k, v = seq(L, E, batch_first), seq(S, kdim or E, batch_first), seq(S, vdim or E, batch_first)
    x = seq(S, E, batch_first)
    calls = [(q, k, v)] if kv else [(q, k, v), (x, x, x), (q, x, x)]  # general, self, encoder-decoder
    flags = [(True, True), (True, False), (False, True)]  # (need_weights, average_attn_weights)
    for n, (a, b, c) in enumerate(calls):
        Lx, Sx = a.shape[1 if batch_first else 0], b.shape[1 if batch_first else 0]
        for j, masks in enumerate(mask_cases(Lx, Sx)):
            for need_weights, average in (flags if n == 0 else [flags[(j + n) % 3]]):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PyTorch's deprecation of mixed mask dtypes
                    o1, w1 = m(a, b, c, need_weights=need_weights, average_attn_weights=average, **masks)
                    o2, w2 = d(a, b, c, need_weights=need_weights, average_attn_weights=average, **masks)
                torch.testing.assert_close(o2, o1, rtol=0, atol=1e-10)
                assert (w1 is None) == (w2 is None)
                if w1 is not None:
                    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-10)


def test_unbatched_input_and_constructor():
    torch.manual_seed(1)
    for batch_first in (True, False):
        d = randomize(DPMultiheadAttention(E, H, add_bias_kv=True, batch_first=batch_first))
        m = d.to_torch()
        assert type(m) is nn.MultiheadAttention and m.in_proj_weight is d.in_proj_weight
        x, kpm = torch.randn(L, E), torch.tensor([False, True, False, False])
        for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": torch.randn(H, L, L)}):
            o1, w1 = m(x, x, x, **kw)
            o2, w2 = d(x, x, x, **kw)
            torch.testing.assert_close(o2, o1, rtol=0, atol=1e-10)
            torch.testing.assert_close(w2, w1, rtol=0, atol=1e-10)


def test_errors_match_torch():
    d = DPMultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, L, E)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        d(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="shape of the 2D attn_mask"):
        d(x, x, x, attn_mask=torch.zeros(L, L + 1))
    with pytest.raises(AssertionError, match="only bool and floating"):
        d(x, x, x, key_padding_mask=torch.zeros(B, L, dtype=torch.long))


# -- per-sample gradients through fxdp.privatize ------------------------------------------

class AttnModel(nn.Module):
    """Calls an attention layer in one form; masks come from a buffer (``am2``: no
    batch dimension) or from batched inputs (``kpm``: ``[B, S]`` batch-first, ``[S, B]``
    otherwise; ``am3``: ``[B, H, L, S]`` or ``[H, B, L, S]``, folded into PyTorch's
    ``[B*H, L, S]``): fxdp's inputs carry the batch at the same dimension."""

    def __init__(self, attn, form, need_weights, average, masks, is_causal, Sx):
        super().__init__()
        self.attn, self.form, self.need_weights, self.average = attn, form, need_weights, average
        self.masks, self.is_causal = masks, is_causal
        self.head = nn.Linear(E, 3)
        am2 = None
        if "am2_float" in masks:
            am2 = torch.randn(L, Sx)
        elif "am2_bool" in masks:
            am2 = torch.rand(L, Sx) < 0.3
            am2[:, 0] = False
        elif is_causal:
            am2 = nn.Transformer.generate_square_subsequent_mask(L)
        self.register_buffer("am2", am2)

    def forward(self, q, k, v, kpm, am3):
        bf = self.attn.batch_first
        if self.form == "self":
            k = v = q
        elif self.form == "encdec":
            v = k
        kw = {}
        if "kpm" in self.masks:
            kw["key_padding_mask"] = kpm if bf else kpm.t()
        if "am3" in self.masks:
            kw["attn_mask"] = (am3 if bf else am3.transpose(0, 1)).flatten(0, 1)
        elif self.am2 is not None:
            kw["attn_mask"] = self.am2
        out, w = self.attn(q, k, v, need_weights=self.need_weights, average_attn_weights=self.average,
                           is_causal=self.is_causal, **kw)
        y = self.head(out)
        if w is not None:  # the attention weights feed the loss too
            w = w.mean(1) if w.dim() == 4 else w  # [B, L, S']
            t = w.pow(2).sum(-1, keepdim=True)
            y = y + (t if bf else t.transpose(0, 1))
        return y


CONFIGS = [  # (bias, add_bias_kv, add_zero_attn, kv dims, batch_first, form, need_weights, average, masks, causal)
    (True, False, False, None, True, "self", True, True, (), False),
    (True, False, False, None, False, "self", False, True, ("kpm",), False),
    (False, False, False, None, True, "self", False, True, (), True),
    (True, False, False, None, True, "encdec", True, False, ("am2_bool", "kpm"), False),
    (True, False, False, None, False, "general", False, True, ("am3", "kpm"), False),
    (True, True, False, None, True, "self", True, True, ("am2_float",), False),
    (True, True, True, None, False, "encdec", False, True, ("kpm",), False),
    (False, True, True, None, True, "general", True, False, ("am3",), False),
    (True, False, False, (6, 7), True, "general", True, True, ("kpm",), False),
    (False, True, False, (6, 7), False, "general", False, True, ("am2_bool",), False),
    (True, False, True, (6, 7), True, "general", False, True, (), False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_per_sample_gradients(cfg):
    bias, bkv, zero, kv, bf, form, need_weights, average, masks, causal = cfg
    torch.manual_seed(CONFIGS.index(cfg))
    kdim, vdim = kv or (None, None)
    attn = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=bkv, add_zero_attn=zero, kdim=kdim, vdim=vdim,
                                 batch_first=bf)
    Sx = L if form == "self" else S
    model = randomize(AttnModel(attn, form, need_weights, average, masks, causal, Sx))
    kpm = torch.rand(B, Sx) < 0.3
    kpm[:, 0] = False
    kpm = kpm if bf else kpm.t()
    am3 = torch.randn(B, H, L, Sx) if bf else torch.randn(H, B, L, Sx)
    inputs = [seq(L, E, bf), seq(Sx, kdim or E, bf), seq(Sx, vdim or E, bf), kpm, am3]
    dp = check(model, inputs, bf)
    assert type(dp.attn) is DPMultiheadAttention
    rules = {c["rule"] for c in dp.capture_table() if c["module"].startswith("attn")}
    assert not any("fallback" in r for r in rules), rules  # every parameter served by a rule


def test_packed_rule_bookkeeping_hooks_match_grad_sample():
    torch.manual_seed(2)
    rule = rule_for_op(packed_linear)
    W, b = torch.randn(12, 5), torch.randn(12)
    args = rule.bind((torch.randn(3, 7, 5), W, b, (4, 8), (4, 8)), {})
    g = torch.randn(3, 7, 4)
    needs = frozenset({"weight", "bias"})
    gs = rule.grad_sample(args, g, needs)
    assert gs["weight"].shape == (3, 12, 5) and not gs["weight"][:, :4].any() and not gs["weight"][:, 8:].any()
    norms = rule.norm_sample_sq(args, g, needs)
    factors = torch.rand(3)
    sums = rule.clipped_sum(args, g, factors, needs)
    for n in needs:
        torch.testing.assert_close(norms[n], gs[n].flatten(1).pow(2).sum(1))
        torch.testing.assert_close(sums[n], torch.einsum("b,b...->...", factors, gs[n]))
    kv = rule_for_op(append_kv_bias)
    g5 = torch.randn(3, 7, 5)
    torch.testing.assert_close(kv.grad_sample({"bias": torch.zeros(1, 1, 5)}, g5, frozenset({"bias"}))["bias"],
                               g5[:, -1].reshape(3, 1, 1, 5))


# -- transformer layers --------------------------------------------------------------------

class EncoderModel(nn.Module):
    def __init__(self, layer, causal=False, kpm=False):
        super().__init__()
        self.layer, self.causal, self.kpm = layer, causal, kpm
        self.head = nn.Linear(E, 2)

    def forward(self, x, kpm):
        bf = self.layer.self_attn.batch_first if hasattr(self.layer, "self_attn") else \
            self.layer.layers[0].self_attn.batch_first
        T = x.shape[1] if bf else x.shape[0]
        mask = nn.Transformer.generate_square_subsequent_mask(T) if self.causal else None
        kw = {"src_key_padding_mask": kpm if bf else kpm.t()} if self.kpm else {}
        if isinstance(self.layer, nn.TransformerEncoderLayer):
            h = self.layer(x, src_mask=mask, is_causal=self.causal, **kw)
        else:
            h = self.layer(x, mask=mask, is_causal=self.causal if self.causal else None, **kw)
        return self.head(h)


def padding(T, bf):
    kpm = torch.rand(B, T, generator=torch.Generator().manual_seed(T)) < 0.3
    kpm[:, 0] = False
    return kpm if bf else kpm.t()


@pytest.mark.parametrize("norm_first, activation, bias, batch_first, causal, kpm", [
    (False, "relu", True, True, False, True),
    (True, "gelu", True, False, True, False),
    (False, F.silu, False, True, True, False),
    (True, nn.GELU(), True, True, False, True),
])
def test_encoder_layer(norm_first, activation, bias, batch_first, causal, kpm):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, activation=activation, layer_norm_eps=1e-4,
                                       batch_first=batch_first, norm_first=norm_first, bias=bias)
    model = randomize(EncoderModel(layer, causal, kpm))
    dp = check(model, [seq(L, E, batch_first), padding(L, batch_first)], batch_first)
    assert [(r.path, r.replacement) for r in dp.rewrites] == [
        ("layer", "DPTransformerEncoderLayer"), ("layer.self_attn", "DPMultiheadAttention")]
    assert not dp.untraceable


def test_encoder_stack_with_final_norm_and_padding():
    torch.manual_seed(4)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True), 2,
                                norm=nn.LayerNorm(E), enable_nested_tensor=True)
    model = randomize(EncoderModel(enc, causal=True, kpm=True))
    dp = check(model, [seq(L, E, True), padding(L, True)], True)
    assert [r.replacement for r in dp.rewrites] == ["DPTransformerEncoder"] + [
        "DPTransformerEncoderLayer", "DPMultiheadAttention"] * 2
    dp.eval()  # evaluation mode: PyTorch's fused/nested path, the DP layers' plain math
    model.eval()
    x, kpm = seq(L, E, True), padding(L, True)
    with torch.no_grad():
        torch.testing.assert_close(dp(x, kpm), model(x, kpm), rtol=0, atol=1e-10)


class Seq2Seq(nn.Module):
    def __init__(self, core, batch_first):
        super().__init__()
        self.core, self.bf = core, batch_first
        self.head = nn.Linear(E, 2)

    def forward(self, src, tgt, src_kpm, tgt_kpm):
        T = tgt.shape[1] if self.bf else tgt.shape[0]
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        if not self.bf:
            src_kpm, tgt_kpm = src_kpm.t(), tgt_kpm.t()
        if isinstance(self.core, nn.Transformer):
            out = self.core(src, tgt, tgt_mask=mask, src_key_padding_mask=src_kpm, tgt_key_padding_mask=tgt_kpm,
                            memory_key_padding_mask=src_kpm, tgt_is_causal=True)
        elif isinstance(self.core, nn.TransformerDecoder):
            out = self.core(tgt, src, tgt_mask=mask, memory_key_padding_mask=src_kpm)
        else:  # a decoder layer
            out = self.core(tgt, src, tgt_mask=mask, tgt_key_padding_mask=tgt_kpm, tgt_is_causal=True)
        return self.head(out)


@pytest.mark.parametrize("kind, batch_first, norm_first", [
    ("decoder_layer", True, False), ("decoder_layer", False, True), ("decoder", True, True),
    ("transformer", True, False), ("transformer", False, True),
])
def test_decoder_and_transformer(kind, batch_first, norm_first):
    torch.manual_seed(5)
    kw = dict(dim_feedforward=16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    if kind == "decoder_layer":
        core = nn.TransformerDecoderLayer(E, H, **kw)
    elif kind == "decoder":
        core = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, **kw), 2, norm=nn.LayerNorm(E))
    else:
        core = nn.Transformer(E, H, 1, 2, activation="gelu", **kw)
    model = randomize(Seq2Seq(core, batch_first))
    inputs = [seq(S, E, batch_first), seq(L, E, batch_first), padding(S, batch_first), padding(L, batch_first)]
    dp = check(model, inputs, batch_first)
    assert not dp.untraceable
    assert all(r.reversible for r in dp.rewrites)
    assert any(c["rule"] == "packed_linear" for c in dp.capture_table())  # cross-attention on the packed weight


def test_dropout_per_sample_gradients_are_exact_for_the_drawn_masks():
    """With dropout, sample i's gradient is that of its own loss under the same dropout
    masks: compare with the rewritten (eager) model run on the same random stream."""
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.3, batch_first=True)
    model = randomize(EncoderModel(layer))
    dp = privatize(model)
    x, kpm = seq(L, E, True), padding(L, True)
    torch.manual_seed(7)
    out = dp(x, kpm)
    w = torch.randn(out.shape)
    (out * w).sum().div(B).backward()
    eager = dp._source_root  # the same DP layers, not traced
    torch.manual_seed(7)
    ref = eager(x, kpm)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)  # same dropout masks
    params = [(n, p) for n, p in dp.named_parameters()]
    for i in range(B):  # samples are independent given the masks
        grads = torch.autograd.grad((ref[i] * w[i]).sum(), [p for _, p in params], retain_graph=True)
        for (n, p), g in zip(params, grads):
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-6, atol=1e-9, msg=n)
    dp.eval()  # eval() switches the attention dropout off in the traced graph too
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(dp(x, kpm), model(x, kpm), rtol=0, atol=1e-10)
