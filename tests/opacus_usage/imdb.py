"""Opacus examples/imdb.py: embedding + pooling over the transposed sequence,
make_private(poisson_sampling=False), accountant.get_epsilon."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine


class SampleNet(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        x = self.emb(x)
        x = x.transpose(1, 2)
        x = self.pool(x).squeeze()
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def main():
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 1000, (256, 64)), torch.randint(0, 2, (256,)))
    train_loader = DataLoader(data, batch_size=64, shuffle=True)
    model = SampleNet(vocab_size=1000)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=0.6, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    criterion = nn.CrossEntropyLoss()
    for _ in range(2):
        model.train()
        for data, label in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(data), label)
            loss.backward()
            optimizer.step()
        epsilon = privacy_engine.accountant.get_epsilon(delta=1e-5)
    return {"epsilon": epsilon}
