"""Data-parallel DP-SGD on scikit-learn's digits, CPU processes with the gloo backend.

    torchrun --nproc_per_node=2 examples/ddp_digits.py
    torchrun --nproc_per_node=2 examples/ddp_digits.py --epochs 5 --target-epsilon 1

Each rank samples its shard of the training set (Poisson, rate q: the union over the
ranks is one Poisson batch over the whole set), clips its samples, and the DP
optimizer all-reduces the clipped sums and adds the noise once on rank 0 (see
``docs/distributed.md``). Every rank's accountant records the same steps, so every
rank prints the same epsilon; rank 0 also reports test accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import digits_cnn, load

import fxdp
import fxdp.distributed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256, help="global (all ranks) expected batch size")
    parser.add_argument("--lr", type=float, default=3.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    train_set, test_set = load()
    torch.manual_seed(args.seed)
    model = nn.parallel.DistributedDataParallel(digits_cnn())  # broadcasts rank 0's weights
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # a loader over the WHOLE training set with the GLOBAL batch size: q = batch_size / N
    loader = DataLoader(train_set, batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    engine = fxdp.PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, epochs=args.epochs,
        target_epsilon=args.target_epsilon, target_delta=args.delta, max_grad_norm=args.max_grad_norm,
        noise_generator=torch.Generator().manual_seed(args.seed + 1),
    )
    if rank == 0:
        print(f"world_size={world} q={loader.sample_rate:.4f} sigma={optimizer.noise_multiplier:.4f} "
              f"{type(optimizer).__name__} steps/epoch={len(loader)}", flush=True)
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        local = 0
        for x, y in loader:
            local += len(x)
            optimizer.zero_grad()
            criterion(model(x), y).backward()  # an empty local batch still takes part in the step
            optimizer.step()
        counts = torch.tensor([local])
        dist.all_reduce(counts)
        eps = engine.get_epsilon(args.delta)
        print(f"rank {rank} epoch {epoch + 1}: local samples {local}, global {int(counts)}, "
              f"epsilon {eps:.3f}", flush=True)
    result = {"epsilon": engine.get_epsilon(args.delta), "steps": engine.steps}
    if rank == 0:
        model.eval()
        with torch.no_grad():
            x, y = test_set.tensors
            result["accuracy"] = float((model(x).argmax(1) == y).float().mean())
        print(f"test accuracy {result['accuracy']:.3f}, epsilon {result['epsilon']:.3f} at delta={args.delta}, "
              f"{result['steps']} steps", flush=True)
    # all ranks hold the same weights (identical updates, no gradient hooks)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = w.clone()
    dist.broadcast(ref, src=0)
    assert torch.equal(w, ref), "ranks diverged"
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
