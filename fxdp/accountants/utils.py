"""Opacus' path ``opacus.accountants.utils``."""
from .calibrate import get_noise_multiplier

__all__ = ["get_noise_multiplier"]
