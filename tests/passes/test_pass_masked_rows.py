"""``h[mask].view(B, -1, d)`` (``fxdp/passes/masked_rows.py``): the rows a mask selects,
regrouped per sample, as BART's and T5's classification heads pool their end-of-sequence
states. Served exact when every sample selects as many rows; refused at the step where they
do not (the regrouping would hand one sample another's rows)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdp
from oracle import assert_grad_samples_match, batch_of_one_grads

pytestmark = pytest.mark.usefixtures("f64", "quiet")


class MarkedPool(nn.Module):
    """Pools the states of the tokens equal to ``mark`` (no check of the counts in the model)."""

    def __init__(self, mark=2):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.mark = mark

    def forward(self, ids, **kwargs):  # **kwargs: captured with torch.export
        h = torch.tanh(self.lin(self.emb(ids)))
        marked = ids.eq(self.mark)
        pooled = h[marked, :].view(h.size(0), -1, h.size(-1))[:, -1, :]
        return self.head(pooled)


def _ids(counts):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 10, (len(counts), 7), generator=g)
    for b, c in enumerate(counts):
        ids[b, 7 - c:] = 2  # c marked tokens at the end of sample b
    return ids


def test_equal_counts_are_exact_per_sample():
    torch.manual_seed(0)
    model = MarkedPool()
    ids = _ids([2, 2, 2, 2])
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(ids).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [ids], lambda out, i: out.pow(2).sum()))
    assert any(n.target is torch.ops.fxdp.rows_per_sample.default for n in dp.graphs[0].graph.nodes)


def test_unequal_counts_are_refused_where_the_cut_would_mix_samples():
    model = MarkedPool()
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(_ids([1, 1, 1])).sum().backward()  # captured and served
    # 2 + 1 + 3 rows cut into 3 samples of 2: sample 1 would get one of sample 2's rows
    assert model(_ids([2, 1, 3])).shape == (3, 3)  # the model itself runs (and mixes)
    with pytest.raises(ValueError, match=r"samples select \[1, 2, 3\] rows"):
        dp(_ids([2, 1, 3]))


def test_bart_for_sequence_classification():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                  decoder_ffn_dim=24, dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
                                  num_labels=3, use_cache=False, eos_token_id=2, pad_token_id=1)
    model = transformers.BartForSequenceClassification(cfg).double().train()
    ids = _ids([1, 1, 1, 1]) + 3
    ids[:, -1] = 2  # one end-of-sequence token each
    ids[1, 4:6] = 1  # padding before it
    mask = (ids != 1).long()
    labels = torch.tensor([0, 2, 1, 2])
    dp = fxdp.privatize(model)  # its labels= loss: a mean over the batch
    dp(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).loss.backward()
        for n, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n][i], want, rtol=1e-6, atol=1e-9, msg=n)
    assert fxdp.check(model, {"input_ids": ids, "attention_mask": mask}).ok
