"""Opacus' path ``opacus.data_loader``: the Poisson-sampled DP data loader."""
from .data.loader import DPDataLoader, switch_generator

__all__ = ["DPDataLoader", "switch_generator"]
