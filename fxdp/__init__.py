"""fxdp: differentially private training for PyTorch as a torch.fx compilation pass."""
from .errors import (
    BatchDimensionError,
    FxdpError,
    PerSampleGradientError,
    PrivacyBudgetExceeded,
    UnsupportedModelError,
    UnsupportedOpError,
)
from .module import DPModule
from .privatize import privatize
from .rules import PerSampleRule, register_module, register_rule

__version__ = "0.1.0"

__all__ = [
    "privatize",
    "DPModule",
    "PerSampleRule",
    "register_rule",
    "register_module",
    "FxdpError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "BatchDimensionError",
    "PerSampleGradientError",
    "PrivacyBudgetExceeded",
]
