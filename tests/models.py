"""Model classes and small builders shared by several test files (test files never
import each other): the privatize models that the book-keeping tests reuse, the
recurrent classifier of the recurrent rule and pass tests, and the sizes and
initialization of the attention rule and pass tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- privatize (tests/test_privatize.py, tests/test_bookkeeping.py) -------------------------------

class TiedLM(nn.Module):
    def __init__(self, V=11, D=6):
        super().__init__()
        self.enc = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, V)
        self.inp = nn.Linear(V, D, bias=False)
        self.inp.weight = nn.Parameter(self.out.weight.detach().t().contiguous())
        self.dec = nn.Linear(D, D, bias=False)
        self.dec.weight = self.enc.weight  # shared parameter

    def forward(self, x):
        return self.out(torch.tanh(self.dec(torch.tanh(self.enc(self.inp(x))))))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        h = self.fc(x)
        h.mul_(0.5)  # in-place op on a captured layer's output
        h = self.act(h)  # in-place activation
        return (h + x) * self.scale


class Nested(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.blocks = nn.Sequential(Block(d), Block(d), nn.Sequential(Block(d)))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(F.relu_(self.blocks(x)))


class RawParams(nn.Module):
    def __init__(self, T=5, D=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.pos_embedding = nn.Parameter(torch.randn(1, T + 1, D))
        self.layer_scale = nn.Parameter(torch.randn(D))
        self.W = nn.Parameter(torch.randn(D, 3))
        self.V = nn.Parameter(torch.randn(D, 3))
        self.shift = nn.Parameter(torch.randn(T + 1, 1))

    def forward(self, x):
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1)
        x = x + self.pos_embedding
        x = x * self.layer_scale
        x = x - self.shift
        x = x / (1.5 + self.layer_scale.abs())
        return torch.tanh(x @ self.W) @ self.V.t()


class ExpandParams(nn.Module):
    """Parameters broadcast over the batch by ``expand``: a class token (ViT), one expanded
    along a second dimension too, and one given a new leading batch dimension."""

    def __init__(self, T=5, D=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.registers = nn.Parameter(torch.randn(1, 1, D))
        self.queries = nn.Parameter(torch.randn(2, D))
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.registers.expand(B, 3, -1), x], 1)
        x = torch.cat([self.queries.expand(B, -1, -1), torch.tanh(x)], 1)
        return self.fc(x * x.mean(1, keepdim=True))


# -- mixing (tests/test_engine_check.py, tests/test_mixing_guard.py) -------------------------------

class Centered(nn.Module):
    """x - x.mean(0): one sample's output depends on the others (Opacus accepts it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x - x.mean(0))


# -- recurrent (tests/rules/test_rule_recurrent.py, tests/passes/test_pass_recurrent.py) ----------

class SeqClassifier(nn.Module):
    """Uses the whole output sequence and the final states."""

    def __init__(self, rnn, out_features):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(out_features, 2)

    def forward(self, x):
        y, h = self.rnn(x)
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0] + h[1][..., : h[0].shape[-1]]
        t = 1 if self.rnn.batch_first else 0
        return self.head(y).sum(t) + self.head(torch.cat([h[-1]] * (y.shape[-1] // h.shape[-1]), -1))


# -- attention (tests/rules/test_rule_attention.py, tests/passes/test_pass_attention.py) ----------

#: batch size, target and source lengths, embedding size, heads
B, L, S, E, H = 3, 4, 5, 8, 2


def randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def seq(T, d, batch_first, n=B):
    return torch.randn(n, T, d) if batch_first else torch.randn(T, n, d)


class FlatBags(nn.Module):
    """A text classifier on flat token ids and their offsets (``nn.EmbeddingBag``, PyTorch's
    text-classification tutorial): privatized with ``input_batch_dims=[None, 0]``."""

    def __init__(self, vocab: int = 20, dim: int = 4):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, 2)

    def forward(self, idx, offsets):
        return self.fc(self.bag(idx, offsets))
