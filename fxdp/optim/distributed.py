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
from torch import Tensor

from .noise import noisy_sum
from .optimizer import DPOptimizer
from .per_layer import DPPerLayerOptimizer

__all__ = [
    "DistributedDPOptimizer", "DistributedPerLayerDPOptimizer", "distributed_optimizer_class", "require_process_group",
]


def require_process_group(what: str = "a distributed DP optimizer") -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialized torch.distributed process group. Fix: call "
            "torch.distributed.init_process_group(backend='gloo' (CPU) or 'nccl') first (torchrun sets the "
            "environment), or train without distributed=True"
        )


class _DistributedNoise:
    """Mixin replacing the Gaussian mechanism (:meth:`DPOptimizer.noisy_sums`) by all-reduce,
    noise on rank 0, broadcast."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_process_group()
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def noisy_sums(self, sums: list[Tensor], std: float) -> list[Tensor]:
        """``all_reduce(sums) + N(0, std^2)``, the noise drawn on rank 0 and broadcast."""
        dtype = sums[0].dtype
        flat = torch.cat([s.reshape(-1).to(dtype) for s in sums])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # the global clipped sum
        if self.rank == 0:
            flat = noisy_sum(flat, std, generator=self.generator)  # type: ignore[attr-defined]
        dist.broadcast(flat, src=0)  # identical update on every rank
        out, offset = [], 0
        for s in sums:
            out.append(flat[offset:offset + s.numel()].view_as(s).to(s.dtype).clone())
            offset += s.numel()
        return out


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
