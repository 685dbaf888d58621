"""Data-parallel DP-SGD with ``torch.distributed`` (see ``docs/distributed.md``).

DP needs the *clipped* per-sample sums of all ranks added up and noised once, which
DDP's reducer (it all-reduces ``p.grad`` during backward) cannot give: fxdp does not
use DDP's gradient hooks. Instead

* :func:`wrap` (or ``DistributedDataParallel``, whose constructor does the same)
  broadcasts rank 0's parameters and buffers so all ranks start equal;
* ``PrivacyEngine.make_private`` unwraps a DDP module (``module.module``) and, in a
  process group, builds a :class:`fxdp.data.sampler.DistributedPoissonSampler` (each
  rank draws its shard; the union is Poisson at rate ``q`` over the dataset) and a
  :class:`fxdp.optim.distributed.DistributedDPOptimizer` (all-reduce of clipped sums,
  noise ``N(0, (sigma C)^2)`` once on rank 0, broadcast, divide by ``q N``);
* every rank's accountant records the same ``(sigma, q)`` per step.

::

    dist.init_process_group("gloo")          # torchrun sets rank / world size
    model = fxdp.distributed.wrap(model)     # or DistributedDataParallel(model)
    model, optimizer, loader = engine.make_private(module=model, ...)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .data.sampler import DistributedPoissonSampler
from .optim.distributed import DistributedDPOptimizer, DistributedPerLayerDPOptimizer, require_process_group

__all__ = [
    "DifferentiallyPrivateDistributedDataParallel",
    "wrap",
    "unwrap",
    "is_distributed_model",
    "DistributedPoissonSampler",
    "DistributedDPOptimizer",
    "DistributedPerLayerDPOptimizer",
]

_MARK = "_fxdp_distributed"


@torch.no_grad()
def wrap(model: nn.Module, src: int = 0) -> nn.Module:
    """Prepare ``model`` for distributed DP training: broadcast rank ``src``'s parameters
    and buffers to all ranks and mark it for ``make_private`` (which then picks the
    distributed sampler and optimizer). Returns ``model`` itself (no DDP hooks: the DP
    optimizer all-reduces clipped sums, not gradients)."""
    require_process_group("fxdp.distributed")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=src)
    setattr(model, _MARK, True)
    return model


class DifferentiallyPrivateDistributedDataParallel(nn.Module):
    """Opacus' ``DPDDP(model)``: broadcasts rank 0's parameters and buffers (as
    :func:`wrap`) and holds the model as ``.module``; no DDP gradient hooks (the DP
    optimizer all-reduces clipped sums). ``make_private`` unwraps it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = wrap(model)

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.module(*args, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or Opacus' ``DPDDP``) wrapper (else ``module``)."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, DifferentiallyPrivateDistributedDataParallel)):
        return module.module
    return module


def is_distributed_model(module: nn.Module) -> bool:
    """Whether ``module`` is DDP-wrapped or was prepared by :func:`wrap`."""
    return isinstance(module, (nn.parallel.DistributedDataParallel, DifferentiallyPrivateDistributedDataParallel)) \
        or bool(getattr(module, _MARK, False))
