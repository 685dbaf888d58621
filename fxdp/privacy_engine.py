"""Opacus' path ``opacus.privacy_engine``: ``PrivacyEngine`` and ``forbid_accumulation_hook``."""
from __future__ import annotations

from typing import Any

from torch import nn

from .engine import PrivacyEngine

__all__ = ["PrivacyEngine", "forbid_accumulation_hook"]


def forbid_accumulation_hook(module: nn.Module, _inputs: Any) -> None:
    """Forward pre-hook refusing a training forward while per-sample gradients of an
    earlier batch are still held: with Poisson sampling every batch must be its own
    step (``model.register_forward_pre_hook(forbid_accumulation_hook)``)."""
    if not module.training:
        return
    for p in module.parameters():
        if getattr(p, "grad_sample", None) is not None:
            raise ValueError(
                "Poisson sampling is not compatible with gradient accumulation: this forward would add a second "
                "batch's per-sample gradients to the first's. Fix: call optimizer.step() and optimizer.zero_grad() "
                "after every backward pass (fxdp.BatchMemoryManager splits large batches)"
            )
