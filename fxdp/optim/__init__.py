"""DP-SGD optimizers (Abadi et al. 2016) with Opacus' API: flat, per-layer and adaptive clipping."""

from __future__ import annotations

from .clip import ClipStats
from .distributed import distributed_optimizer_class
from .optimizer import _CLASSES, AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer

__all__ = [
    "DPOptimizer",
    "DPPerLayerOptimizer",
    "AdaClipDPOptimizer",
    "ClipStats",
    "get_optimizer_class",
]


def get_optimizer_class(
    clipping: str, distributed: bool = False, grad_sample_mode: str | None = None
) -> type[DPOptimizer]:
    """The DP optimizer class for a clipping mode (Opacus-compatible signature)."""
    if clipping not in _CLASSES:
        raise ValueError(f"unknown clipping mode clipping={clipping!r}; expected one of {sorted(_CLASSES)}")
    if distributed:  # all-reduce of clipped sums, noise once (fxdp/optim/distributed.py)
        return distributed_optimizer_class(clipping)
    if grad_sample_mode == "ghost_fsdp":
        raise NotImplementedError("grad_sample_mode='ghost_fsdp' (FSDP) is not implemented")
    # "ghost": the same class; clipped sums come from book-keeping (attach_bookkeeping)
    return _CLASSES[clipping]
