"""The batch-mixing analysis (``fxdp/passes/batch_mixing/``) through fxdp.check on
catalogs of models: every batch-mixing model is refused with an
error at the offending line (marked ``# MIX`` below), every clean model passes.

The mixing catalog covers each op family the analysis knows, including the three
that Opacus' module-type validator accepts: ``x - x.mean(0)``,
``F.batch_norm(..., training=True)`` and a frozen BatchNorm in train mode. Where
the mixing changes outputs, ``fxdp.verify`` (dynamic) must agree.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from oracle import assert_grad_samples_match, batch_of_one_grads

pytestmark = pytest.mark.usefixtures("quiet")

D = 6  # feature size; batch sizes used by the analysis (5, 7) and the tests (4) differ from it


def run_check(model, inputs, **kw):
    torch.manual_seed(0)
    return fxdp.check(model, inputs, **kw)


def marked_line(cls) -> int:
    """Line number of the ``# MIX`` marker in ``cls``'s source."""
    lines, start = inspect.getsourcelines(cls)
    hits = [start + i for i, line in enumerate(lines) if "# MIX" in line]
    assert len(hits) == 1, f"{cls.__name__} needs exactly one # MIX marker"
    return hits[0]


# ---------------------------------------------------------------------------------------------
# mixing models
# ---------------------------------------------------------------------------------------------

class MeanCentering(nn.Module):  # accepted by Opacus' validator
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        x = x - x.mean(0, keepdim=True)  # MIX
        return self.fc(x)


class FunctionalBatchNorm(nn.Module):  # accepted by Opacus' validator
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(D))
        self.b = nn.Parameter(torch.zeros(D))
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = F.batch_norm(x, None, None, self.g, self.b, training=True)  # MIX
        return self.fc(h)


class FrozenBatchNormTrain(nn.Module):  # accepted by Opacus' validator (no trainable parameters)
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.requires_grad_(False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))  # MIX
        return self.fc(h.mean((2, 3)))


class BatchNormNotRewritten(nn.Module):  # with rewrite_options={"batchnorm": "off"}
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))  # MIX


class SumNormalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x).exp()
        return h / h.sum(0)  # MIX


class BatchVariance(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(x) * torch.var(x, dim=0).sum()  # MIX


class BatchNormOfFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        x = x / x.norm(dim=0, keepdim=True)  # MIX
        return self.fc(x)


class BatchMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h.max(dim=0).values  # MIX


class BatchLogSumExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - torch.logsumexp(h, dim=0)  # MIX


class SoftmaxOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=0)  # MIX


class LegacySoftmaxDim(nn.Module):
    """nn.Softmax() without dim on a 3-D input normalizes over dim 0 (the batch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)
        self.sm = nn.Softmax()

    def forward(self, x):
        return self.sm(self.fc(x))  # MIX


class AnyOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        return h * (h > 1).any(0)  # MIX


class MedianOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h.median(dim=0).values  # MIX


class SortOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return torch.sort(self.fc(x), dim=0).values  # MIX


class ArgsortGather(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        order = h.argsort(0)  # MIX
        return h * order


class CumsumOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(x).cumsum(0)  # MIX


class CummaxOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(x).cummax(0).values  # MIX


class RollBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(torch.roll(x, 1, 0))  # MIX


class FlipBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(x) + self.fc(x.flip(0))  # MIX


class IndexSelectBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        rev = torch.arange(x.shape[0] - 1, -1, -1)
        return self.fc(x.index_select(0, rev))  # MIX


class GatherAcrossBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        idx = torch.zeros_like(x, dtype=torch.long)
        return self.fc(x.gather(0, idx))  # MIX


class ScatterAcrossBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        idx = torch.zeros_like(x, dtype=torch.long)
        pooled = torch.zeros_like(x).scatter_add(0, idx, x)  # MIX
        return self.fc(pooled)


class GramMatrix(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        gram = x.t() @ x  # MIX
        return self.fc(x @ gram)


class EinsumOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        c = torch.einsum("bi,bj->ij", x, x)  # MIX
        return self.fc(x @ c)


class SimilarityMatrix(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        z = self.fc(x)
        return z @ z.T  # MIX


class CdistAcrossBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        z = self.fc(x)
        return torch.cdist(z, z)  # MIX


class AttentionOverBatch(nn.Module):
    """scaled_dot_product_attention on [B, E]: the batch plays the sequence."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)

    def forward(self, x):
        q = self.q(x)
        return F.scaled_dot_product_attention(q, x, x)  # MIX


class CatMemoryBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)
        self.register_buffer("memory", torch.randn(3, D))

    def forward(self, x):
        h = torch.cat([x, self.memory], 0)  # MIX
        return self.fc(h)


class PairwiseBroadcast(nn.Module):
    """Batch dims that disagree in a broadcast: [B, 1, D] - [1, B, D]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        diff = x.unsqueeze(1) - x.unsqueeze(0)  # MIX
        return self.fc(diff).sum(1)


class FirstSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(x + x[0])  # MIX


class ShiftedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        d = x[1:] - x[:-1]  # MIX
        return self.fc(d)


class PermutedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        perm = torch.randperm(x.shape[0])
        return self.fc(x) + self.fc(x[perm])  # MIX


class DataDependentIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        idx = (x[:, 0] > 0).long()
        return self.fc(x[idx])  # MIX


class FoldIntoLinear(nn.Module):
    """[B, T, D] -> [B*T, D] into a layer with weights: symbolic tracing cannot attribute
    these rows to samples; the export path follows the batch-major fold (auto capture takes
    it given example inputs, as fxdp.check and make_private have)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        B, T, d = x.shape
        return self.fc(x.reshape(B * T, d))


class ScrambledUnfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        B, T, d = x.shape
        flat = torch.tanh(x.transpose(0, 1).reshape(T * B, d))
        return self.fc(flat.reshape(B, T, d))  # MIX


class FoldedReduction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        return self.fc(x - flat.mean(0))  # MIX


class RunningStatistic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.detach().abs().mean())  # MIX
        return self.fc(x)


class StoredStatistic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        self.last = self.fc(x).detach()  # MIX
        return self.fc(x)


class EmbeddingMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, D, max_norm=1.0)
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))  # MIX


class LSTMWrongLayout(nn.Module):
    """batch_first=False fed [B, T, D]: the recurrence runs over the batch."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(D, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h, _ = self.lstm(x)  # MIX
        return self.fc(h)


MIXING = [
    # (model factory, inputs, check kwargs, output changes under verify)
    (MeanCentering, lambda: torch.randn(4, D), {}, True),
    (FunctionalBatchNorm, lambda: torch.randn(4, D), {}, True),
    (FrozenBatchNormTrain, lambda: torch.randn(4, 3, 5, 5), {}, True),
    (BatchNormNotRewritten, lambda: torch.randn(4, D), {"rewrite_options": {"batchnorm": "off"}}, True),
    (SumNormalize, lambda: torch.randn(4, D), {}, True),
    (BatchVariance, lambda: torch.randn(4, D), {}, True),
    (BatchNormOfFeatures, lambda: torch.randn(4, D), {}, True),
    (BatchMax, lambda: torch.randn(4, D), {}, True),
    (BatchLogSumExp, lambda: torch.randn(4, D), {}, True),
    (SoftmaxOverBatch, lambda: torch.randn(4, D), {}, True),
    (LegacySoftmaxDim, lambda: torch.randn(4, 5, D), {}, True),
    (AnyOverBatch, lambda: torch.randn(4, D) * 3, {}, True),
    (MedianOverBatch, lambda: torch.randn(4, D), {}, True),
    (SortOverBatch, lambda: torch.randn(4, D), {}, True),
    (ArgsortGather, lambda: torch.randn(4, D), {}, True),
    (CumsumOverBatch, lambda: torch.randn(4, D), {}, True),
    (CummaxOverBatch, lambda: torch.randn(4, D), {}, True),
    (RollBatch, lambda: torch.randn(4, D), {}, True),
    (FlipBatch, lambda: torch.randn(4, D), {}, True),
    (IndexSelectBatch, lambda: torch.randn(4, D), {}, True),
    (GatherAcrossBatch, lambda: torch.randn(4, D), {}, True),
    (ScatterAcrossBatch, lambda: torch.randn(4, D), {}, True),
    (GramMatrix, lambda: torch.randn(4, D), {}, True),
    (EinsumOverBatch, lambda: torch.randn(4, D), {}, True),
    (SimilarityMatrix, lambda: torch.randn(4, D), {}, True),
    (CdistAcrossBatch, lambda: torch.randn(4, D), {}, True),
    (AttentionOverBatch, lambda: torch.randn(4, D), {}, True),
    (CatMemoryBank, lambda: torch.randn(4, D), {}, False),
    (PairwiseBroadcast, lambda: torch.randn(4, D), {}, True),
    (FirstSample, lambda: torch.randn(4, D), {}, True),
    (ShiftedBatch, lambda: torch.randn(4, D), {}, False),
    (PermutedBatch, lambda: torch.randn(4, D), {}, True),
    (DataDependentIndex, lambda: torch.randn(4, D), {}, True),
    (ScrambledUnfold, lambda: torch.randn(4, 5, D), {}, True),
    (FoldedReduction, lambda: torch.randn(4, 5, D), {}, True),
    (RunningStatistic, lambda: torch.randn(4, 5, D), {}, False),
    (StoredStatistic, lambda: torch.randn(4, D), {}, False),
    (EmbeddingMaxNorm, lambda: torch.randint(0, 20, (4, 5)), {}, False),
    (LSTMWrongLayout, lambda: torch.randn(4, 5, D), {}, True),
]


@pytest.mark.parametrize("factory,make_x,kw,dynamic", MIXING, ids=[m[0].__name__ for m in MIXING])
def test_mixing_model_is_refused_at_the_right_line(factory, make_x, kw, dynamic):
    torch.manual_seed(1)
    model = factory()
    x = make_x()
    report = run_check(model, (x,), **kw)
    assert not report.ok, str(report)
    line = marked_line(factory)
    here = [f for f in report.errors if f.file == __file__ and f.line == line]
    assert here, f"no error at line {line}:\n{report}"
    f = here[0]
    assert f.problem and f.fix and f.source and "# MIX" in f.source
    assert f.node and f.op
    with pytest.raises(fxdp.UnsupportedModelError, match="break differential privacy"):
        report.raise_if_errors()
    if dynamic:  # the dynamic verifier agrees (on outputs or per-sample gradients)
        torch.manual_seed(2)
        assert not fxdp.verify(factory(), (x,), **({} if not kw else {})).ok


def test_catalog_sizes():
    assert len(MIXING) >= 25 and len(CLEAN) >= 15


def test_mixing_families_are_named():
    """Each family gets its own finding code and a fix naming the remedy."""
    codes = {}
    for factory, make_x, kw, _ in MIXING:
        torch.manual_seed(1)
        r = run_check(factory(), (make_x(),), **kw)
        codes[factory.__name__] = {f.code for f in r.errors}
    assert "batch-reduction" in codes["MeanCentering"]
    assert "batch-norm" in codes["FunctionalBatchNorm"] and "batch-norm" in codes["FrozenBatchNormTrain"]
    assert "batch-sort" in codes["SortOverBatch"] and "batch-scan" in codes["CumsumOverBatch"]
    assert "batch-matmul" in codes["GramMatrix"] and "batch-matmul" in codes["EinsumOverBatch"]
    assert "batch-cat" in codes["CatMemoryBank"]
    assert "batch-index" in codes["FirstSample"] and "batch-index" in codes["PermutedBatch"]
    assert "batch-fold" in codes["ScrambledUnfold"]
    assert "state-update" in codes["RunningStatistic"] and "state-update" in codes["StoredStatistic"]
    assert "batch-layout" in codes["LSTMWrongLayout"]


# ---------------------------------------------------------------------------------------------
# clean models
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.pool(F.relu(self.c1(x)))
        h = F.adaptive_avg_pool2d(F.relu(self.c2(h)), 1)
        return self.fc(torch.flatten(h, 1))


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ResNetBN(nn.Module):
    """BatchNorm everywhere: privatize replaces it (a rewrite, not an error)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.layer1(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class GroupNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.pad(F.gelu(self.gn(self.conv(x))), (1, 1, 1, 1))
        h = F.interpolate(self.up(h), scale_factor=0.5)
        return self.fc(h.mean((2, 3)))


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, D)
        self.lstm = nn.LSTM(D, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h, (hn, cn) = self.lstm(self.emb(x))
        return self.fc(h[:, -1] + hn[-1])


class GRUSeqFirst(nn.Module):
    """[T, B, D] inputs with batch_first=False throughout."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(D, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.fc(h[-1])


class TransformerWithMasks(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.emb = nn.Embedding(20, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.fc = nn.Linear(8, 2)

    def forward(self, tokens, pad):
        T = tokens.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf")), 1)
        h = self.enc(self.emb(tokens) + self.pos, mask=causal, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class EmbeddingBagModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, D, mode="mean")
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        return self.fc(self.bag(x))


class FoldUnfold(nn.Module):
    """[B, T, D] -> [B*T, D] (parameter-free ops) -> [B, T, D] -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        B, T, d = x.shape
        flat = F.gelu(x.reshape(B * T, d))
        flat = flat - flat.mean(-1, keepdim=True)
        return self.fc(flat.view(B, T, d))


class HeadsAttention(nn.Module):
    """Multi-head attention by hand: scores over [B*heads, T, T]."""

    def __init__(self, heads=2):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = [t.view(B, T, self.h, d // self.h).transpose(1, 2).reshape(B * self.h, T, d // self.h)
                   for t in (q, k, v)]
        att = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / (d // self.h) ** 0.5, dim=-1)
        y = torch.bmm(att, v).view(B, self.h, T, d // self.h).transpose(1, 2).reshape(B, T, d)
        return self.out(y)


class RawParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(torch.randn(1, 6, D))
        self.W = nn.Parameter(torch.randn(D, 3))
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, x):
        B = x.shape[0]
        h = torch.cat([self.cls.expand(B, -1, -1), x], dim=1) + self.pos
        return torch.tanh(h * self.scale) @ self.W


class PerSampleNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
        z = F.normalize(self.ln(x), dim=-1)
        return F.log_softmax(self.fc(z), dim=-1)


class PerSampleIndexing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 4)

    def forward(self, x, y):
        logits = self.fc(x)
        picked = logits[torch.arange(x.shape[0]), y]  # per-sample gather
        top = logits.topk(2, dim=-1).values
        ranks = logits.argsort(-1).gather(1, y.unsqueeze(1))
        return picked.unsqueeze(1) + top + ranks + logits.cumsum(-1)[:, :2]


class EinsumAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x, pad):
        q = self.proj(x)
        s = torch.einsum("btd,bsd->bts", q, x).masked_fill(pad.unsqueeze(1), -1e4)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1)).squeeze(1)
        return torch.einsum("bts,bsd->btd", s.softmax(-1), x) + a


class InPlaceZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 8)
        self.act = nn.ReLU(inplace=True)
        self.prelu = nn.PReLU(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        h.mul_(0.5)
        h = self.prelu(self.act(h))
        h.clamp_(max=5.0)
        return F.silu(self.fc2(F.dropout(h, 0.2, self.training)))


class FrozenBackboneEval(nn.Module):
    """Frozen backbone with its BatchNorm in eval mode (the correct fine-tuning setup)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv.requires_grad_(False)
        self.bn.requires_grad_(False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _pad_mask(B, T):
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -2:] = True
    return pad


def _frozen_eval():
    m = FrozenBackboneEval()
    m.bn.eval()
    return m


CLEAN = [
    (MLP, lambda: (torch.randn(4, D),), {}),
    (CNN, lambda: (torch.randn(4, 1, 12, 12),), {}),
    (ResNetBN, lambda: (torch.randn(4, 3, 8, 8),), {}),
    (GroupNormCNN, lambda: (torch.randn(4, 3, 6, 6),), {}),
    (LSTMClassifier, lambda: (torch.randint(0, 20, (4, 5)),), {}),
    (GRUSeqFirst, lambda: (torch.randn(5, 4, D),), {"batch_first": False}),
    (TransformerWithMasks, lambda: (torch.randint(0, 20, (4, 5)), _pad_mask(4, 5)), {}),
    (EmbeddingBagModel, lambda: (torch.randint(0, 30, (4, 3)),), {}),
    (FoldUnfold, lambda: (torch.randn(4, 5, D),), {}),
    (HeadsAttention, lambda: (torch.randn(4, 5, D),), {}),
    (RawParameters, lambda: (torch.randn(4, 5, D),), {}),
    (PerSampleNorm, lambda: (torch.randn(4, 5, D),), {}),
    (PerSampleIndexing, lambda: (torch.randn(4, D), torch.tensor([0, 3, 1, 2])), {}),
    (EinsumAttention, lambda: (torch.randn(4, 5, D), _pad_mask(4, 5)), {}),
    (InPlaceZoo, lambda: (torch.randn(4, D),), {}),
    (_frozen_eval, lambda: (torch.randn(4, 3, 6, 6),), {}),
]


def test_a_fold_into_a_linear_layer_is_served_on_the_export_path(f64):
    """Checked on the graph privatize runs given the same inputs (the export path), and
    exact there; privatize without inputs starts on symbolic tracing and moves to the
    export path at the first training call (with capture="fx", that backward refuses the
    fold with the fix)."""
    from fxdp.exported_module import ExportedDPModule

    torch.manual_seed(1)
    model, x = FoldIntoLinear(), torch.randn(4, 5, D)
    assert run_check(model, (x,)).ok
    dp = fxdp.privatize(model, example_inputs=(x,), loss_reduction="sum")
    assert isinstance(dp, ExportedDPModule)
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))
    for p in model.parameters():
        p.grad = p.grad_sample = None
    with pytest.raises(fxdp.BatchDimensionError, match="capture='export'"):
        fxdp.privatize(model, capture="fx")(x).sum().backward()
    for p in model.parameters():
        p.grad = p.grad_sample = None
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    assert dp.capture_path == "export"
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))


@pytest.mark.parametrize("factory,make_x,kw", CLEAN, ids=[c[0].__name__.strip("_") for c in CLEAN])
def test_clean_model_passes(factory, make_x, kw):
    torch.manual_seed(3)
    model = factory()
    xs = make_x()
    report = run_check(model, xs, **kw)
    assert report.ok, str(report)
    assert not report.errors
    assert not [w for w in report.warnings if w.code in ("unknown-op", "untraceable")], str(report)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [lay.name for lay in report.layers if lay.trainable] == trainable
    assert all(lay.rule and "unused" not in lay.rule for lay in report.layers if lay.trainable), str(report)
    # and the dynamic verifier agrees on what privatize trains (after its rewrites)
    torch.manual_seed(4)
    dp = fxdp.privatize(factory(), batch_first=kw.get("batch_first", True))
    res = fxdp.verify(dp, xs, **kw)
    assert res.ok, str(res)


def test_resnet_batchnorm_is_a_rewrite_not_an_error():
    report = run_check(ResNetBN(), (torch.randn(4, 3, 8, 8),))
    assert report.ok
    paths = {r["path"] for r in report.rewrites}
    assert {"stem.1", "layer1.0.bn1", "layer1.1.bn2"} <= paths
    bn = [lay for lay in report.layers if lay.name == "layer1.0.bn1.weight"][0]
    assert bn.rewrite and "BatchNorm2d" in bn.rewrite and "group_norm" in bn.rule


def test_frozen_batchnorm_in_eval_mode_warns_about_the_rewrite():
    report = run_check(_frozen_eval(), (torch.randn(4, 3, 6, 6),))
    assert report.ok
    assert any(w.code == "frozen-batchnorm" and "freeze" in w.fix for w in report.warnings)
    ok = run_check(_frozen_eval(), (torch.randn(4, 3, 6, 6),), rewrite_options={"batchnorm": "freeze"})
    assert ok.ok and not ok.warnings


def test_frozen_batchnorm_in_train_mode_is_fine_with_the_freeze_rewrite():
    m = FrozenBatchNormTrain()
    report = run_check(m, (torch.randn(4, 3, 5, 5),), rewrite_options={"batchnorm": "freeze"})
    assert report.ok, str(report)
