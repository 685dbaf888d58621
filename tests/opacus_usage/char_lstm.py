"""Opacus examples/char-lstm-classification.py: DPLSTM (also DPGRU/DPRNN imports),
forward(x, hidden=None), padded batches, make_private, accountant.get_epsilon."""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from opacus import PrivacyEngine
from opacus.layers import DPGRU, DPLSTM, DPRNN  # noqa: F401


class CharNNClassifier(nn.Module):
    def __init__(self, rnn_type, embedding_size, hidden_size, output_size, num_layers=1, bidirectional=False,
                 vocab_size=256):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = rnn_type(embedding_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                            batch_first=True)
        self.out_layer = nn.Linear(hidden_size, output_size)

    def forward(self, x, hidden=None):
        x = self.embedding(x)
        x, _ = self.rnn(x, hidden)
        x = x[:, -1, :]
        return self.out_layer(x)


def padded_collate(batch, padding_idx=0):
    x = pad_sequence([elem[0] for elem in batch], batch_first=True, padding_value=padding_idx)
    y = torch.stack([elem[1] for elem in batch]).long()
    return x, y


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    names = [(torch.randint(1, 256, (int(torch.randint(3, 12, (), generator=g)),), generator=g),
              torch.randint(0, 18, (), generator=g)) for _ in range(128)]
    train_loader = DataLoader(names, batch_size=32, collate_fn=padded_collate, shuffle=True)
    test_loader = DataLoader(names[:32], batch_size=32, collate_fn=padded_collate)
    model = CharNNClassifier(DPLSTM, 16, 32, 18, num_layers=1)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.0, max_grad_norm=1.5,
    )
    for _ in range(2):
        model.train()
        for x, y in train_loader:
            logits = model(x)
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        epsilon = privacy_engine.accountant.get_epsilon(delta=8e-5)
    model.eval()
    with torch.no_grad():
        acc = sum(float((model(x).argmax(-1) == y).float().mean()) for x, y in test_loader)
    return {"epsilon": epsilon, "accuracy": acc}
