"""DP-SGD optimizers (Abadi et al. 2016) with Opacus' API: flat, per-layer and adaptive clipping."""

from .clip import ClipStats
from .optimizer import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer, get_optimizer_class

__all__ = [
    "DPOptimizer",
    "DPPerLayerOptimizer",
    "AdaClipDPOptimizer",
    "ClipStats",
    "get_optimizer_class",
]
