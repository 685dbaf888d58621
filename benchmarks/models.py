"""The four models of the Fast-DPSGD suite (Subramani et al. 2021, "Enabling Fast
Differentially Private SGD via Just-in-Time Compilation and Vectorization"), as
benchmarked in the Opacus paper (Yousefpour et al. 2021, Table 2 / Figure 2).

Each entry of ``MODELS`` gives the model constructor, a synthetic batch maker and
the published parameter count (checked by ``tests/test_benchmark_models.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MnistCNN", "CifarCNN", "EmbeddingNet", "LSTMNet", "MODELS", "ModelSpec", "VOCAB", "SEQ_LEN"]

#: IMDb: 10,000 most frequent words + 4 special tokens (pad, start, unknown, unused), reviews cut to 256 tokens
VOCAB = 10_000 + 4
SEQ_LEN = 256


class MnistCNN(nn.Module):
    """MNIST CNN (26,010 parameters), input ``[B, 1, 28, 28]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)  # 14x14 -> 13x13
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)  # 5x5 -> 4x4
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CifarCNN(nn.Module):
    """CIFAR-10 CNN (605,226 parameters), input ``[B, 3, 32, 32]``: 3x3 convolutions
    32, 32, pool, 64, 64, pool, 128, 128, pool, 256, 10 (ReLU after all but the last),
    then the mean over the spatial dimensions."""

    def __init__(self) -> None:
        super().__init__()
        layers = []
        c = 3
        for v in (32, 32, "P", 64, 64, "P", 128, 128, "P", 256):
            if v == "P":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        layers.append(nn.Conv2d(c, 10, 3, padding=1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))


class EmbeddingNet(nn.Module):
    """IMDb embedding bag-of-words net (160,098 parameters), tokens ``[B, 256]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.emb(x).mean(1))


class LSTMNet(nn.Module):
    """IMDb LSTM net (1,081,402 parameters with PyTorch's two LSTM bias vectors),
    tokens ``[B, 256]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 100)
        self.lstm = nn.LSTM(100, 100, batch_first=True)
        self.fc = nn.Linear(100, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.fc(h.mean(1))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], Tuple[Tensor, Tensor]]  # (inputs, labels)
    num_params: int
    title: str


def _images(shape: Tuple[int, ...], classes: int) -> Callable[[int, torch.Generator], Tuple[Tensor, Tensor]]:
    def make(B: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
        return torch.randn((B,) + shape, generator=g), torch.randint(0, classes, (B,), generator=g)

    return make


def _tokens(B: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    return torch.randint(0, VOCAB, (B, SEQ_LEN), generator=g), torch.randint(0, 2, (B,), generator=g)


MODELS: Dict[str, ModelSpec] = {
    "mnist": ModelSpec(MnistCNN, _images((1, 28, 28), 10), 26_010, "MNIST CNN"),
    "cifar10": ModelSpec(CifarCNN, _images((3, 32, 32), 10), 605_226, "CIFAR-10 CNN"),
    "embedding": ModelSpec(EmbeddingNet, _tokens, 160_098, "IMDb embedding"),
    "lstm": ModelSpec(LSTMNet, _tokens, 1_081_402, "IMDb LSTM"),
}
