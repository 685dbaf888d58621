"""Opacus' path ``opacus.optimizers``: the DP optimizers and ``get_optimizer_class``."""
from ..optim import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer, get_optimizer_class
from ..optim.distributed import DistributedDPOptimizer, DistributedPerLayerDPOptimizer

#: Opacus' name of the distributed per-layer optimizer
SimpleDistributedPerLayerOptimizer = DistributedPerLayerDPOptimizer

__all__ = [
    "DPOptimizer",
    "DPPerLayerOptimizer",
    "AdaClipDPOptimizer",
    "DistributedDPOptimizer",
    "SimpleDistributedPerLayerOptimizer",
    "get_optimizer_class",
]
