"""``torch.no_grad()`` blocks of an exported graph (``fxdp/passes/inline_grad_mode.py``): read
op by op, in their grad mode. A block that computes from batched data (positions from the token
ids: M2M100 / NLLB, Speech2Text) was refused for want of a batch rule; a parameter used inside
one still gets no gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdp
from fxdp.passes.inline_grad_mode import inline_grad_mode_blocks
from oracle import assert_grad_samples_match, batch_of_one_grads

pytestmark = pytest.mark.usefixtures("f64", "quiet")


class NoGradBlocks(nn.Module):
    """Positions from the ids' padding (a cumsum per sample) under no_grad, a frozen-by-block
    projection (trainable, used under no_grad: no gradient), and a block nested in it that
    turns gradients back on."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.pos = nn.Embedding(12, 6)
        self.teacher = nn.Linear(6, 6)
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids, **kwargs):  # **kwargs: captured with torch.export
        with torch.no_grad():
            positions = (ids != 0).long().cumsum(1) * (ids != 0).long()
            target = self.teacher(self.emb(ids))
            with torch.enable_grad():
                lifted = self.inner(target)
        h = self.emb(ids) + self.pos(positions)
        return self.head(torch.tanh(h) * target + lifted)


def _ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (4, 7), generator=g)
    ids[1, 5:] = 0  # padding: the positions depend on each sample's own ids
    return ids


def test_blocks_are_inlined_between_grad_mode_switches():
    ids = _ids()
    model = NoGradBlocks()
    ep = torch.export.export(model, (ids,), strict=False)
    gm = ep.module()
    assert inline_grad_mode_blocks(gm) == 2  # the no_grad block and the enable_grad one inside it
    modes = [n.args[0] for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled]
    assert modes == [False, True, False, True]
    assert not [n for n in gm.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    torch.testing.assert_close(gm(ids), model(ids))


def test_per_sample_gradients_exact_and_none_inside_no_grad():
    torch.manual_seed(0)
    model = NoGradBlocks()
    ids = _ids()
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(ids).pow(2).sum().backward()
    assert model.teacher.weight.grad is None and getattr(model.teacher.weight, "grad_sample", None) is None
    want = batch_of_one_grads(model, [ids], lambda out, i: out.pow(2).sum())
    assert not want["teacher.weight"].any() and want["inner.weight"].any()
    assert_grad_samples_match(model, want)


def test_m2m100():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.M2M100Config(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                    decoder_ffn_dim=24, dropout=0.0, attention_dropout=0.0, use_cache=False, pad_token_id=1,
                                    max_position_embeddings=32, encoder_layerdrop=0.0, decoder_layerdrop=0.0)
    model = transformers.M2M100ForConditionalGeneration(cfg).train()
    ids = _ids() + 2
    ids[1, 5:] = 1  # padding: positions skip it
    dec = ids[:, :4].flip(1)
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(input_ids=ids, decoder_input_ids=dec).logits.pow(2).sum().backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[i:i + 1], decoder_input_ids=dec[i:i + 1]).logits.pow(2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-6, atol=1e-9, msg=n)
