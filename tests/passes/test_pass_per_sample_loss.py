"""A loss computed inside ``forward`` (``labels=``), rewritten as a mean of per-sample losses
(``fxdp/passes/per_sample_loss.py``); here a scalar of parameters alone added to it (AdaLoRA's
orthogonality penalty, ``outputs.loss += w * R``): each sample's loss carries the term, as it
does alone. A term that reads the batch stays refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdp

pytestmark = pytest.mark.usefixtures("f64", "quiet")


class PenalizedLM(nn.Module):
    """Token loss over the batch, plus ``penalty``: ``"params"`` (a norm of parameters, added
    in place), ``"data"`` (the batch's mean activation) or ``None``."""

    def __init__(self, penalty="params"):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.a = nn.Parameter(torch.randn(3, 6) / 3)
        self.head = nn.Linear(6, 12)
        self.penalty = penalty

    def forward(self, ids, labels=None, **kwargs):  # **kwargs: captured with torch.export
        h = torch.tanh(self.emb(ids) @ self.a.t() @ self.a)
        logits = self.head(h)
        loss = F.cross_entropy(logits.view(-1, 12), labels.view(-1), ignore_index=-100)
        if self.penalty == "params":
            loss += 0.3 * torch.linalg.norm(self.a @ self.a.t() - torch.eye(3))
        elif self.penalty == "data":
            loss = loss + h.mean()
        return loss


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (4, 5), generator=g)
    labels = ids.roll(-1, 1)
    labels[1, 3:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_a_parameter_penalty_added_to_the_loss_is_in_each_samples_loss(loss_reduction):
    torch.manual_seed(0)
    model = PenalizedLM()
    ids, labels = _batch()
    dp = fxdp.privatize(model, loss_reduction=loss_reduction)
    dp(ids, labels).backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        model(ids[i:i + 1], labels[i:i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-6, atol=1e-9, msg=n)


def test_a_term_that_reads_the_batch_stays_refused():
    ids, labels = _batch()
    with pytest.raises(fxdp.UnsupportedModelError, match="samples can influence each other"):
        fxdp.privatize(PenalizedLM("data"))(ids, labels).backward()
