"""Tests of fxdp.data.BatchMemoryManager: virtual batches equal unsplit DP-SGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from fxdp.data import BatchMemoryManager, BatchSplittingSampler, DPDataLoader, PoissonSampler, split_indices
from fxdp.optim import DPOptimizer

DT = torch.float64


def set_grad_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Per-sample gradients of each sample's own loss (Opacus' convention), via vmap."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    if len(x):
        gs = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    else:
        gs = {n: torch.zeros(0, *p.shape, dtype=p.dtype) for n, p in params.items()}
    for n, p in model.named_parameters():
        p.grad_sample = gs[n]


def setup(sample_rate: float = 0.25, steps: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(64, 6, generator=g, dtype=DT), torch.randint(0, 3, (64,), generator=g))
    loader = DPDataLoader(
        ds, sample_rate=sample_rate, steps=steps, generator=torch.Generator().manual_seed(2)
    )
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        noise_multiplier=0.8,
        max_grad_norm=0.5,
        expected_batch_size=max(1, round(64 * sample_rate)),
        generator=torch.Generator().manual_seed(3),
    )
    return model, loader, opt


def train(max_physical: int | None, epochs: int = 2, sample_rate: float = 0.25, steps: int | None = None):
    model, loader, opt = setup(sample_rate, steps)
    logical_steps, physical_sizes = [], []
    opt.attach_step_hook(lambda o: logical_steps.append(o.clip_stats.num_samples))

    def run(dl):
        for x, y in dl:
            physical_sizes.append(len(x))
            set_grad_samples(model, x, y)
            opt.step()
            opt.zero_grad()

    for _ in range(epochs):
        if max_physical is None:
            run(loader)
        else:
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=max_physical, optimizer=opt
            ) as dl:
                run(dl)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return params, logical_steps, physical_sizes


def test_virtual_batches_equal_unsplit_run():
    ref, ref_steps, ref_sizes = train(None)
    got, steps, sizes = train(5)
    assert steps == ref_steps == ref_sizes  # one noisy step per logical batch, same batches
    assert max(sizes) <= 5 and len(sizes) > len(ref_sizes)
    assert sum(sizes) == sum(ref_sizes)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_empty_logical_batches_still_step():
    before = torch.cat([p.detach().reshape(-1) for p in setup()[0].parameters()])
    params, steps, sizes = train(4, epochs=1, sample_rate=1e-9, steps=3)
    assert steps == [0] * 3 and sizes == [0] * 3  # one empty physical batch per logical batch
    assert not torch.equal(params, before)  # noise was applied


class Recorder:
    """Stands in for the optimizer: records skip signals."""

    def __init__(self):
        self.signals = []

    def signal_skip_step(self, do_skip=True):
        self.signals.append(do_skip)


def test_skip_signals_and_split():
    rec = Recorder()
    batches = [[0, 1, 2, 3, 4, 5, 6], [], [7, 8]]
    out = list(BatchSplittingSampler(sampler=batches, max_batch_size=3, optimizer=rec))
    assert out == [[0, 1, 2], [3, 4], [5, 6], [], [7, 8]]
    assert rec.signals == [True, True, False, False, False]
    assert split_indices(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_indices([], 4) == [[]]


def test_length():
    bs = BatchSampler(SequentialSampler(range(25)), batch_size=10, drop_last=False)
    split = BatchSplittingSampler(sampler=bs, max_batch_size=4, optimizer=Recorder())
    assert len(split) == len(list(split)) == 2 * 3 + 2
    ps = PoissonSampler(100, 0.1)
    assert (
        len(BatchSplittingSampler(sampler=ps, max_batch_size=4, optimizer=Recorder())) == 25
    )  # ceil(10 * 10 / 4)
    assert (
        len(BatchSplittingSampler(sampler=ps, max_batch_size=50, optimizer=Recorder())) == 10
    )  # >= 1 per batch


def test_validation():
    model, loader, opt = setup()
    with pytest.raises(
        ValueError, match="max_physical_batch_size must be a positive integer, got max_physical_batch_size=0"
    ):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=0, optimizer=opt)
    with pytest.raises(TypeError, match="signal_skip_step"):
        BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=2, optimizer=torch.optim.SGD(model.parameters(), lr=1)
        )


def test_plain_batched_loader_with_bmm():
    model, _, opt = setup()
    ds = TensorDataset(torch.randn(10, 6, dtype=DT), torch.randint(0, 3, (10,)))
    with BatchMemoryManager(
        data_loader=DataLoader(ds, batch_size=5), max_physical_batch_size=2, optimizer=opt
    ) as dl:
        assert [len(x) for x, _ in dl] == [2, 2, 1, 2, 2, 1]
