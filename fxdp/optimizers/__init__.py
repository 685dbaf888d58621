"""Opacus' path ``opacus.optimizers``: the DP optimizers and ``get_optimizer_class``."""
from ..optim import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer, get_optimizer_class
from ..optim.distributed import DistributedDPOptimizer, DistributedPerLayerDPOptimizer

#: Opacus' name of the distributed per-layer optimizer
SimpleDistributedPerLayerOptimizer = DistributedPerLayerDPOptimizer
#: Opacus' ghost-clipping optimizer: fxdp's DPOptimizer reads book-keeping's clipped sums itself
DPOptimizerFastGradientClipping = DPOptimizer
DistributedDPOptimizerFastGradientClipping = DistributedDPOptimizer

__all__ = [
    "DPOptimizer",
    "DPPerLayerOptimizer",
    "AdaClipDPOptimizer",
    "DistributedDPOptimizer",
    "SimpleDistributedPerLayerOptimizer",
    "get_optimizer_class",
    "DPOptimizerFastGradientClipping",
    "DistributedDPOptimizerFastGradientClipping",
]
