"""Train a small CNN with DP-SGD on scikit-learn's digits inside PyTorch Lightning.

    pip install lightning scikit-learn
    python examples/lightning_digits.py                   # epsilon = 3, delta = 1e-5
    python examples/lightning_digits.py --epochs 5 --target-epsilon 1

The LightningModule is ordinary Lightning code; ``fxdp.lightning.DPCallback`` makes its
model, optimizer and train loader private at fit start, logs epsilon every epoch and
stops training if the budget would be exceeded. The noise multiplier is calibrated so
that ``epochs * len(loader)`` Poisson-sampled steps stay within ``(target_epsilon, delta)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import digits_cnn, load  # noqa: E402

from fxdp.accountants import get_noise_multiplier  # noqa: E402
from fxdp.lightning import DPCallback  # noqa: E402


class LitDigits(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.model = digits_cnn()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # 8x8 images: threads only add overhead
    train_set, test_set = load()
    L.seed_everything(args.seed, verbose=False)
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    sigma = get_noise_multiplier(target_epsilon=args.target_epsilon, target_delta=args.delta,
                                 sample_rate=1 / len(train), steps=args.epochs * len(train),
                                 accountant=args.accountant)
    print(f"DP-SGD in Lightning: {len(train_set)} examples, {len(train)} steps/epoch, noise multiplier {sigma:.3f}")
    dp = DPCallback(noise_multiplier=sigma, max_grad_norm=args.max_grad_norm, delta=args.delta,
                    target_epsilon=args.target_epsilon, accountant=args.accountant)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[dp], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    lit = LitDigits(args.lr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning-internal deprecation notice
        trainer.fit(lit, train)
        for epoch, steps, eps in dp.history:
            print(f"epoch {epoch + 1:3d}/{args.epochs}  steps {steps:4d}  epsilon {eps:.3f}")
        acc = trainer.test(lit, DataLoader(test_set, batch_size=512), verbose=False)[0]["test_acc"]
    epsilon = dp.engine.get_epsilon(args.delta)
    print(f"Test accuracy: {100 * acc:.2f}%  at (epsilon, delta) = ({epsilon:.3f}, {args.delta:g})")
    return {"accuracy": acc, "epsilon": epsilon}


if __name__ == "__main__":
    main()
