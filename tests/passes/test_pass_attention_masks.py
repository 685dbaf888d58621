"""Attention masks proved to attend everywhere are dropped (``fxdp/passes/attention_masks.py``):
only those, for every length, and the per-sample gradients stay each sample's alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdp
from fxdp.passes.attention_masks import drop_all_true_masks
from oracle import assert_grad_samples_match, batch_of_one_grads

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_true(q):
    T = q.shape[2]
    return (torch.arange(T) >= 0)[None, None, None, :].expand(q.shape[0], 1, T, T)


MASKS = {  # name -> (mask from q: [B, H, T, D], dropped?)
    "all-true (HF without a mask)": (_all_true, True),
    "shifted arange, still all-true": (lambda q: (torch.arange(q.shape[2]) + 1 > 0)[None, None, None, :], True),
    "all-true and all-true": (lambda q: _all_true(q) & (torch.arange(q.shape[2]) > -1), True),
    "all-true or anything": (lambda q: _all_true(q) | (torch.arange(q.shape[2]) > 2), True),
    "below the length + 7 (true, not proved)": (
        lambda q: _all_true(q) & (torch.arange(q.shape[2]) < q.shape[2] + 7), False),
    "zeros where true (additive)": (lambda q: torch.where(_all_true(q), 0.0, float("-inf")).to(q.dtype), True),
    "ones cast to float: adds 1": (lambda q: _all_true(q).to(q.dtype), False),
    "causal (true at T = 1 only)": (
        lambda q: torch.arange(q.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None], False),
    "arange - 1 >= 0 (the first position masked)": (
        lambda q: (torch.arange(q.shape[2]) - 1 >= 0)[None, None, None, :], False),
    "negated all-true": (lambda q: ~_all_true(q), False),
    "scaled by -1 then >= 0": (lambda q: (torch.arange(q.shape[2]) * -1 >= 0)[None, None, None, :], False),
}


class MaskedAttention(nn.Module):
    def __init__(self, mask, extra=None):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)
        self.mask, self.extra = mask, extra

    def forward(self, x, pad=None):  # x: [B, T, 8]
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        mask = self.mask(q)
        if pad is not None:  # a padding mask: an input's values
            mask = mask & pad[:, None, None, :].bool()
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(h.transpose(1, 2).reshape(B, T, 8)).sum(1)


def _sdpa_masks(dp):
    return [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            for g in dp.graphs for n in g.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("name", list(MASKS))
def test_only_masks_attending_everywhere_at_every_length_are_dropped(name, f64):
    """Each mask on a symbolic length (captured at T = 5, run at T = 3 and 9): dropped exactly
    where it attends everywhere whatever the length, and the per-sample gradients equal each
    sample's alone either way (so a dropped mask changed nothing)."""
    make, dropped = MASKS[name]
    torch.manual_seed(0)
    model = MaskedAttention(make)
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    for T in (5, 3, 9):
        for p in model.parameters():
            p.grad = p.grad_sample = None
        x = torch.randn(4, T, 8)
        out = dp(x)
        torch.testing.assert_close(out, model(x))
        out.pow(2).sum().backward()
        assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))
    (mask,) = _sdpa_masks(dp)
    assert (mask is None) == dropped, name
    if dropped:  # the nodes that only built it are gone too
        assert not [n for g in dp.graphs for n in g.graph.nodes if n.target is torch.ops.aten.arange.start]
        assert not [n for g in dp.graphs for n in g.graph.nodes if n.target is torch.ops.aten.arange.default]


def test_a_mask_from_an_input_stays(f64):
    """All-true positions combined with a padding mask (an input's values) stay a mask."""
    torch.manual_seed(1)
    model = MaskedAttention(_all_true)
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    x, pad = torch.randn(4, 6, 8), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 6])
    dp(x, pad=pad).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x, pad], lambda out, i: out.pow(2).sum()))
    (mask,) = _sdpa_masks(dp)
    assert mask is not None


def test_a_mask_of_a_static_size_is_judged_at_that_size():
    """A static length (here 1, baked into the graph, guarded by it) makes a causal mask all-true:
    dropped there, and the graph refuses another length instead of serving it."""

    class Fixed(nn.Module):
        def forward(self, q):
            mask = torch.arange(1)[None, :] <= torch.arange(1)[:, None]
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    gm = torch.export.export(Fixed(), (torch.randn(2, 2, 1, 4),)).module()
    changed = drop_all_true_masks(gm)
    assert len(changed) == 1 and changed[0].meta["fxdp_mask_dropped"]
    q = torch.randn(2, 2, 1, 4)
    torch.testing.assert_close(gm(q), Fixed()(q))


def test_hugging_face_masks_without_attention_mask():
    """BERT called without ``attention_mask`` and ViT (no mask at all) lose the all-true mask that
    export builds; BERT given one and GPT-2's causal mask keep theirs (no dropout: outputs compared)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, resid_pdrop=0.0,
                                                          embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"))
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
        patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))
    ids = torch.randint(0, 50, (3, 7))
    cases = [(bert, {"input_ids": ids}, True), (bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
             False), (gpt2, {"input_ids": ids}, False), (vit, {"pixel_values": torch.randn(3, 3, 8, 8)}, True)]
    for model, kwargs, dropped in cases:
        dp = fxdp.privatize(model, capture="export")
        out = dp(**kwargs).last_hidden_state
        torch.testing.assert_close(out, model(**kwargs).last_hidden_state)
        masks = _sdpa_masks(dp)
        assert masks and all((m is None) == dropped for m in masks), (type(model).__name__, kwargs.keys())


def test_value_ranges_of_the_ops_modelled():
    """``mask_range`` on hand-built ATen nodes: the bounds each op's arithmetic gives."""
    from torch import fx

    from fxdp.passes.attention_masks import Range, mask_range

    aten = torch.ops.aten
    g = fx.Graph()
    x = g.placeholder("x")
    call = g.call_function
    a4 = call(aten.arange.default, (4,))  # 0..3
    cases = {
        a4: Range(0, 3),
        call(aten.arange.start_step, (2, 9, 3)): Range(2, 8),
        call(aten.arange.start_step, (2, 9, -1)): Range(float("-inf"), float("inf")),
        call(aten.mul.Tensor, (a4, -2)): Range(-6, 0),
        call(aten.rsub.Scalar, (a4, 1)): Range(-2, 1),
        call(aten.sub.Tensor, (a4, a4)): Range(-3, 3),
        call(aten.ge.Scalar, (call(aten.mul.Tensor, (a4, -1)), 0)): Range(0, 1),
        call(aten.lt.Scalar, (a4, 0)): Range(0, 0),
        call(aten.le.Tensor, (a4, call(aten.add.Tensor, (a4, 3)))): Range(1, 1),  # 0..3 <= 3..6
        call(aten.where.self, (call(aten.ge.Scalar, (a4, 0)), call(aten.full.default, ([2], 5.0)), x)): Range(5, 5),
        call(aten.where.self, (call(aten.gt.Scalar, (a4, 0)), 1.0, a4)): Range(0, 3),
        call(aten.masked_fill.Scalar, (call(aten.zeros.default, ([2],)), call(aten.lt.Scalar, (a4, 0)), -9.0)):
            Range(0, 0),  # filled nowhere
        call(aten.masked_fill.Scalar, (call(aten.zeros.default, ([2],)), call(aten.gt.Scalar, (a4, 0)), -9.0)):
            Range(-9, 0),
        call(aten.arange.start_step, (0, 5.5, 1)): Range(0, 5.5),  # 0..5: below 5.5, not 4.5
        call(aten.arange.start_step, (0.5, 3, 0.5)): Range(0.5, 3),
        call(aten.le.Scalar, (call(aten.arange.default, (5.5,)), 4.6)): Range(0, 1),
        call(aten.bitwise_and.Tensor, (a4, a4)): Range(float("-inf"), float("inf")),  # integers (no bool dtype)
        call(aten.add.Tensor, (a4, x)): Range(float("-inf"), float("inf")),
        call(aten.add.Tensor, (a4, 2**60)): Range(float("-inf"), float("inf")),
        call(aten.full.default, ([2], float("nan"))): Range(float("-inf"), float("inf")),
        call(aten.softmax.int, (a4, 0)): Range(float("-inf"), float("inf")),
    }
    for node, want in cases.items():
        assert mask_range(node) == want, node.format_node()
