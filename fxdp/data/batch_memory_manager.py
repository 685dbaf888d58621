"""Virtual batches: split logical (Poisson) batches into physical ones that fit in memory.

The privacy analysis is about logical batches: each must give exactly one noisy step
and one accountant step. The splitting sampler therefore tells the optimizer, before
yielding each physical chunk, whether a step on it must only clip and accumulate
(``signal_skip_step(True)``) or finish the logical batch (``False``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from torch.utils.data import BatchSampler, DataLoader, Sampler

from .loader import _loader_kwargs
from .sampler import PoissonSampler

__all__ = ["BatchMemoryManager", "BatchSplittingSampler", "wrap_data_loader", "split_indices"]


class SkipStepOptimizer(Protocol):
    """What the splitter needs from the optimizer (e.g. :class:`fxdp.optim.DPOptimizer`)."""

    def signal_skip_step(self, do_skip: bool = True) -> None: ...


def split_indices(indices: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Split into ``ceil(n / max)`` chunks whose sizes differ by at most one (as
    ``numpy.array_split``); an empty list gives one empty chunk."""
    indices = list(indices)
    n = len(indices)
    k = max(1, math.ceil(n / max_batch_size))
    base, extra = divmod(n, k)
    chunks, start = [], 0
    for j in range(k):
        size = base + (j < extra)
        chunks.append(indices[start : start + size])
        start += size
    return chunks


class BatchSplittingSampler(Sampler[list[int]]):
    """Batch sampler yielding each batch of ``sampler`` as chunks of at most
    ``max_batch_size`` indices, signalling ``optimizer`` which chunk ends a logical batch.

    An empty logical batch is yielded as one empty chunk, so its (noise-only) step happens.
    """

    def __init__(self, *, sampler: Sampler, max_batch_size: int, optimizer: SkipStepOptimizer) -> None:
        self.sampler = sampler
        self.max_batch_size = max_batch_size
        self.optimizer = optimizer

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            chunks = split_indices([int(i) for i in batch], self.max_batch_size)
            for j, chunk in enumerate(chunks):
                # signalled when the chunk is produced; the optimizer pops one flag per
                # step, so every physical batch must get exactly one optimizer.step().
                self.optimizer.signal_skip_step(do_skip=j < len(chunks) - 1)
                yield chunk

    def __len__(self) -> int:
        """Number of physical batches: exact for ``BatchSampler``, expected for Poisson."""
        m = self.max_batch_size
        if isinstance(self.sampler, PoissonSampler):
            expected = self.sampler.expected_batch_size
            return max(len(self.sampler), math.ceil(len(self.sampler) * expected / m))
        if isinstance(self.sampler, BatchSampler):
            n, b = len(self.sampler.sampler), self.sampler.batch_size
            full, rem = divmod(n, b)
            last = 0 if (rem == 0 or self.sampler.drop_last) else math.ceil(rem / m)
            return full * math.ceil(b / m) + last
        return len(self.sampler)  # type: ignore[arg-type]


def wrap_data_loader(
    *, data_loader: DataLoader, max_batch_size: int, optimizer: SkipStepOptimizer
) -> DataLoader:
    """A ``DataLoader`` like ``data_loader`` whose batches are split by
    :class:`BatchSplittingSampler`. ``data_loader`` is unchanged; its batch sampler is
    shared (so its sampling state is the new loader's)."""
    if data_loader.batch_sampler is None:
        raise ValueError("data_loader must be batched (batch_sampler is None)")
    return DataLoader(
        data_loader.dataset,
        batch_sampler=BatchSplittingSampler(
            sampler=data_loader.batch_sampler, max_batch_size=max_batch_size, optimizer=optimizer
        ),
        collate_fn=data_loader.collate_fn,
        **_loader_kwargs(data_loader),
    )


class BatchMemoryManager:
    """Context manager capping the physical batch size (Opacus-compatible).

    ::

        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=64,
                                optimizer=optimizer) as physical_dl:
            for x, y in physical_dl:
                loss_fn(model(x), y).backward()
                optimizer.step()       # noise + update only at the end of a logical batch
                optimizer.zero_grad()  # keeps the clipped sum inside a logical batch

    The result equals training on the unsplit logical batches (up to float summation
    order): clipping is per sample, noise is drawn once per logical batch, and the
    accountant hook runs once per logical batch. Call ``step()`` exactly once per
    physical batch.
    """

    def __init__(
        self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: SkipStepOptimizer
    ) -> None:
        if (
            isinstance(max_physical_batch_size, bool)
            or not isinstance(max_physical_batch_size, int)
            or max_physical_batch_size <= 0
        ):
            raise ValueError(
                "max_physical_batch_size must be a positive integer, "
                f"got max_physical_batch_size={max_physical_batch_size!r}"
            )
        if not callable(getattr(optimizer, "signal_skip_step", None)):
            raise TypeError(
                "optimizer must be a DP optimizer with signal_skip_step() (e.g. fxdp.optim.DPOptimizer), "
                f"got {type(optimizer).__name__}"
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> DataLoader:
        return wrap_data_loader(
            data_loader=self.data_loader,
            max_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,
        )

    def __exit__(self, *exc: Any) -> None:
        return None
