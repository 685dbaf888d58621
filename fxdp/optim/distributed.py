"""DP-SGD across ``torch.distributed`` ranks: one Gaussian mechanism on the global sum.

Each rank clips its own samples (book-keeping or materialized per-sample gradients)
into a local clipped sum ``S_r = sum_{i in B_r} c_i g_i``. A step then

1. all-reduces ``S = sum_r S_r`` (one flat ``SUM`` all-reduce of every parameter),
2. adds ``N(0, (sigma C)^2)`` on rank 0 only, to the global sum (Abadi et al. 2016's
   Gaussian mechanism, sensitivity ``C`` whatever the rank of the changed sample),
3. broadcasts the noisy sum from rank 0, so every rank holds the same bits,
4. divides by the global expected batch size ``q N`` and runs the wrapped optimizer,
   so parameters stay identical on all ranks without DDP's gradient hooks.

Noise is added once (on the all-reduced sum, not per rank), so the released update is
that of one process training on the union of the ranks' batches; with a secure
generator the snapping of :func:`fxdp.optim.noise.noisy_sum` applies to that global sum.
Every rank must call ``step()`` every iteration, also with an empty local batch.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .noise import noisy_sum
from .optimizer import (
    DPOptimizer,
    DPPerLayerOptimizer,
    _is_processed,
    _mark_as_processed,
)

__all__ = ["DistributedDPOptimizer", "DistributedPerLayerDPOptimizer", "distributed_optimizer_class"]


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "a distributed DP optimizer needs an initialized torch.distributed process group. Fix: call "
            "torch.distributed.init_process_group(backend='gloo' or 'nccl') first (torchrun sets the "
            "environment), or use the non-distributed DPOptimizer"
        )


class _DistributedNoise:
    """Mixin replacing ``add_noise`` by all-reduce, noise on rank 0, broadcast."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _require_process_group()
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def add_noise(self) -> None:
        """``p.grad = all_reduce(p.summed_grad) + N(0, (sigma C)^2)`` (noise drawn on rank 0)."""
        if self._pending_norms:  # type: ignore[attr-defined]
            self._finish_clip_stats()  # type: ignore[attr-defined]  (local samples only)
        params = self.params  # type: ignore[attr-defined]
        for k, p in enumerate(params):
            if p.summed_grad is None:
                raise ValueError(f"parameter #{k} has no p.summed_grad; call clip_and_accumulate() first")
            if _is_processed(p.summed_grad):
                raise ValueError("clipped gradients were already noised; call optimizer.zero_grad() after every step")
        if not params:
            return
        dtype = params[0].summed_grad.dtype
        flat = torch.cat([p.summed_grad.reshape(-1).to(dtype) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # the global clipped sum
        if self.rank == 0:
            flat = noisy_sum(flat, self._noise_std(), generator=self.generator)  # type: ignore[attr-defined]
        dist.broadcast(flat, src=0)  # identical update on every rank
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
            _mark_as_processed(p.summed_grad)


class DistributedDPOptimizer(_DistributedNoise, DPOptimizer):
    """:class:`~fxdp.optim.DPOptimizer` (flat clipping) over ``torch.distributed`` ranks.

    ``expected_batch_size`` is that of the global batch (``q N``), not of one rank.
    """


class DistributedPerLayerDPOptimizer(_DistributedNoise, DPPerLayerOptimizer):
    """:class:`~fxdp.optim.DPPerLayerOptimizer` over ``torch.distributed`` ranks."""


def distributed_optimizer_class(clipping: str) -> type[DPOptimizer]:
    """The distributed DP optimizer class for ``clipping``."""
    if clipping == "flat":
        return DistributedDPOptimizer
    if clipping == "per_layer":
        return DistributedPerLayerDPOptimizer
    raise NotImplementedError(
        f"clipping={clipping!r} is not supported with distributed training (its private unclipped "
        "count would need its own all-reduce); use clipping='flat' or 'per_layer'"
    )
