"""Shared parts of the DP-SGD examples: flags, progress line, training loop, evaluation.

The training loop is an ordinary PyTorch loop; the only DP parts are
``PrivacyEngine.make_private_with_epsilon`` (noise calibrated so that the whole run
stays within ``(target_epsilon, delta)``) and, for large batches,
``BatchMemoryManager``. Two free improvements are used, both post-processing of the
DP iterates (no privacy cost): a cosine learning-rate decay and an exponential
moving average of the weights, which is what gets evaluated (De et al. 2022,
"Unlocking High-Accuracy Differentially Private Image Classification through Scale").
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Any, Dict, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    import fxdp
except ImportError:  # running from a source checkout without installing fxdp
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fxdp

try:  # optional: a nicer progress bar
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None


def base_parser(description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every example shares; ``defaults`` overrides their defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--target-epsilon", type=float, default=3.0, help="privacy budget epsilon for the whole run")
    p.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    p.add_argument("--max-physical-batch-size", type=int, default=0,
                   help="split batches into chunks of at most this size (BatchMemoryManager); 0: no split")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clip bound C")
    p.add_argument("--lr", type=float, default=3.0, help="peak learning rate (cosine decay)")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.95, help="weight averaging decay (0: off)")
    p.add_argument("--accountant", choices=["prv", "rdp", "gdp"], default="prv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--plot", default="", help="save a plot of ε and the clipped fraction per epoch (matplotlib)")
    p.set_defaults(**defaults)
    return p


class Progress:
    """A progress bar: tqdm when installed, else one self-rewriting text line."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.start = total, desc, 0, time.time()
        self.bar = tqdm(total=total, desc=desc, leave=True, file=sys.stdout) if tqdm else None
        self.postfix = ""

    def update(self, **postfix: Any) -> None:
        self.n += 1
        self.postfix = "  ".join(f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self.postfix)
        elif sys.stdout.isatty():
            self._draw("\r")

    def close(self, **postfix: Any) -> None:
        self.postfix = "  ".join(f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix)
            self.bar.close()
        else:
            self._draw("\r" if sys.stdout.isatty() else "")
            print(flush=True)

    def _draw(self, prefix: str) -> None:
        done = int(20 * self.n / max(self.total, 1))
        print(f"{prefix}{self.desc} [{'#' * done}{'.' * (20 - done)}] {time.time() - self.start:5.1f}s  {self.postfix}",
              end="", flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1024) -> Dict[str, float]:
    """Test loss and accuracy (the test set is not private training data)."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return {"loss": loss / n, "accuracy": correct / n}


def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, e in ema.named_parameters():
            e.mul_(decay).add_(params[name], alpha=1 - decay)


def train_and_evaluate(model: nn.Module, train_set: Dataset, test_set: Dataset, args: argparse.Namespace) -> Dict[str, Any]:
    """Train ``model`` with DP-SGD within ``(args.target_epsilon, args.delta)`` and
    report per epoch; returns the final test accuracy, epsilon and run facts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    # the loader's generator drives Poisson sampling; the noise generator is seeded
    # for reproducibility (use PrivacyEngine(secure_mode=True) for deployment)
    loader = DataLoader(train_set, batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    average = copy.deepcopy(model) if args.ema else model
    engine = fxdp.PrivacyEngine(accountant=args.accountant)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,
        target_epsilon=args.target_epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, noise_generator=torch.Generator().manual_seed(args.seed + 1),
    )
    total_steps = args.epochs * len(loader)
    lr_decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / total_steps)))
    print(f"DP-SGD: {len(train_set)} training examples, expected batch size {optimizer.expected_batch_size:.1f} "
          f"(q = {1 / len(loader):.4f}), {total_steps} steps, noise multiplier {optimizer.noise_multiplier:.3f}, "
          f"clip bound {args.max_grad_norm}, {args.accountant} accountant", flush=True)
    criterion = nn.CrossEntropyLoss()
    test = {"accuracy": float("nan")}
    done = 0
    log = fxdp.PrivacyLog(engine, optimizer, delta=args.delta, progress_bar=False, print_fn=None)
    for epoch in range(1, args.epochs + 1):
        model.train()
        bar = Progress(len(loader), f"epoch {epoch:>3}/{args.epochs}")
        for loss in _steps(model, optimizer, loader, criterion, args.max_physical_batch_size):
            if engine.steps > done:  # a real step, not an accumulate-only physical batch
                done = engine.steps
                log.record_step()
                lr_decay.step()
                if args.ema:
                    _update_ema(average, model, args.ema)
                bar.update(loss=f"{loss:.3f}")
        test = evaluate(average, test_set)
        row = log.end_epoch()
        bar.close(**{"test loss": f"{test['loss']:.3f}", "test acc": f"{100 * test['accuracy']:.1f}%",
                     "epsilon": f"{row['epsilon']:.2f}", "clipped": f"{row['clip_fraction']:.0%}"})
    eps = engine.get_epsilon(args.delta)
    wall = time.time() - start
    print(f"Test accuracy: {100 * test['accuracy']:.2f}%  at (epsilon, delta) = ({eps:.3f}, {args.delta:g})  "
          f"[{args.accountant} accountant, {engine.steps} steps, {wall:.1f} s]", flush=True)
    for caveat in engine.caveats:
        print(f"caveat: {caveat}")
    if args.plot:
        log.plot(args.plot)
        print(f"plot of ε and the clipped fraction per epoch: {args.plot}")
    return {"accuracy": test["accuracy"], "epsilon": eps, "steps": engine.steps, "seconds": wall,
            "noise_multiplier": optimizer.noise_multiplier}


def _steps(model: nn.Module, optimizer: Any, loader: DataLoader, criterion: nn.Module,
           max_physical: int) -> Iterable[float]:
    """One optimizer step per (physical) batch; yields the batch loss."""
    if max_physical:
        with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical,
                                     optimizer=optimizer) as physical:
            yield from _plain_steps(model, optimizer, physical, criterion)
    else:
        yield from _plain_steps(model, optimizer, loader, criterion)


def _plain_steps(model: nn.Module, optimizer: Any, loader: Iterable, criterion: nn.Module) -> Iterable[float]:
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y) if len(y) else None
        if loss is not None:
            loss.backward()
        else:  # an empty Poisson batch: zero per-sample gradients, the noisy step still happens
            model(x).sum().backward()
        optimizer.step()
        yield float(loss.detach()) if loss is not None else float("nan")


def missing_data(name: str, data_dir: str, expected: str, url: str) -> None:
    """Explain which files are missing and exit with status 2."""
    print(
        f"error: {name} not found in --data-dir {data_dir!r}.\n"
        f"Expected {expected}.\n"
        f"Download it from {url} (this example does not download anything), unpack it, "
        "and pass its folder with --data-dir.",
        file=sys.stderr,
    )
    sys.exit(2)

