"""Example model for docs/check.md: an audio tagger with two batch-mixing bugs.

    python -m fxdp check docs/examples/check_model.py:AudioTagger --input-shape 16,50
    python -m fxdp check docs/examples/check_model.py:AudioTaggerFixed --input-shape 16,50
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class AudioTagger(nn.Module):
    """Conv front-end over mel spectrograms [B, n_mels, T], a GRU, attention pooling."""

    def __init__(self, n_mels: int = 16, hidden: int = 32, n_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv1d(n_mels, hidden, 5, padding=2)
        self.bn = nn.BatchNorm1d(hidden)  # fxdp.privatize replaces it (GroupNorm)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.att = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h - h.mean(0, keepdim=True)  # "remove the mean spectrum": a statistic of the whole batch
        h, _ = self.gru(h.transpose(1, 2))
        w = torch.softmax(self.att(h), dim=0)  # attention weights normalized over the batch, not over time
        return self.head((w * h).sum(1))


class AudioTaggerFixed(AudioTagger):
    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h - h.mean(-1, keepdim=True)  # per-sample mean over time
        h, _ = self.gru(h.transpose(1, 2))
        w = torch.softmax(self.att(h), dim=1)  # over time steps
        return self.head((w * h).sum(1))
