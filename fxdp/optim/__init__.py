"""DP-SGD optimizers (Abadi et al. 2016) with Opacus' API: flat, per-layer and adaptive clipping.

One optimizer per module: :mod:`.optimizer` (flat, and the step every mode shares),
:mod:`.per_layer`, :mod:`.adaptive`, :mod:`.distributed`; the clipping math in
:mod:`.clip`, the sources of clipped sums in :mod:`.grad_source`, noise in :mod:`.noise`.
"""

from __future__ import annotations

from .adaptive import AdaClipDPOptimizer
from .clip import Clipping, ClipStats
from .distributed import distributed_optimizer_class
from .optimizer import DPOptimizer, optimizer_class
from .per_layer import DPPerLayerOptimizer

__all__ = [
    "DPOptimizer",
    "DPPerLayerOptimizer",
    "AdaClipDPOptimizer",
    "Clipping",
    "ClipStats",
    "get_optimizer_class",
]


def get_optimizer_class(
    clipping: str, distributed: bool = False, grad_sample_mode: str | None = None
) -> type[DPOptimizer]:
    """The DP optimizer class for a clipping mode (Opacus-compatible signature)."""
    cls = optimizer_class(clipping)
    if distributed:  # all-reduce of clipped sums, noise once (fxdp/optim/distributed.py)
        return distributed_optimizer_class(clipping)
    if grad_sample_mode == "ghost_fsdp":
        raise NotImplementedError("grad_sample_mode='ghost_fsdp' (FSDP) is not implemented")
    # "ghost": the same class; clipped sums come from book-keeping (attach_bookkeeping)
    return cls
