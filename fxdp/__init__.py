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
from . import accountants, utils
from .data import BatchMemoryManager
from .engine import PrivacyEngine
from . import check, verify  # callable modules: fxdp.check(model, x), fxdp.verify(model, x)
from .report import CompatibilityReport
from . import audit
from .export import export, load
from .grad_sample import GradSampleModule
from .progress import PrivacyLog

from ._version import __version__  # noqa: E402

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
    "PrivacyEngine",
    "BatchMemoryManager",
    "accountants",
    "utils",
    "check",
    "verify",
    "CompatibilityReport",
    "audit",
    "export",
    "load",
    "GradSampleModule",
    "PrivacyLog",
]
