"""Opacus' path ``opacus.optimizers.optimizer``: ``DPOptimizer`` and the processed-flag
helpers that custom optimizers (e.g. Opacus' Laplace-noise tutorial) call."""
from ..optim.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

__all__ = ["DPOptimizer", "_check_processed_flag", "_mark_as_processed"]
