"""Opacus tutorial building_lstm_name_classifier: a DPLSTM classifier with
forward(x, hidden=None), PrivacyEngine(secure_mode=False), make_private_with_epsilon,
get_epsilon."""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from opacus import PrivacyEngine
from opacus.layers import DPLSTM


class CharNNClassifier(nn.Module):
    def __init__(self, embedding_size, hidden_size, output_size, num_lstm_layers=1, bidirectional=False,
                 vocab_size=259):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.lstm = DPLSTM(embedding_size, hidden_size, num_layers=num_lstm_layers, bidirectional=bidirectional,
                           batch_first=True)
        self.out_layer = nn.Linear(hidden_size, output_size)

    def forward(self, x, hidden=None):
        x = self.embedding(x)
        x, _ = self.lstm(x, hidden)
        x = x[:, -1, :]
        return self.out_layer(x)


def padded_collate(batch, padding_idx=258):
    x = pad_sequence([elem[0] for elem in batch], batch_first=True, padding_value=padding_idx)
    return x, torch.stack([elem[1] for elem in batch]).long()


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randint(0, 258, (int(torch.randint(4, 14, (), generator=g)),), generator=g),
             torch.randint(0, 18, (), generator=g)) for _ in range(200)]
    train_loader = DataLoader(data, batch_size=50, collate_fn=padded_collate)
    model = CharNNClassifier(16, 32, 18, num_lstm_layers=1)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    delta, epochs, epsilon = 8e-5, 2, 12.0
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, max_grad_norm=1.5, target_delta=delta,
        target_epsilon=epsilon, epochs=epochs,
    )
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        spent = privacy_engine.get_epsilon(delta)
    return {"epsilon": spent}
