"""Opacus' validator errors, at Opacus' path (``opacus.validators.errors``)."""
from __future__ import annotations

__all__ = [
    "UnsupportedError",
    "UnsupportedModuleError",
    "UnsupportableModuleError",
    "NotYetSupportedModuleError",
    "ShouldReplaceModuleError",
    "IllegalModuleConfigurationError",
]


class UnsupportedError(ValueError):
    """A component fxdp does not support as it is."""


class UnsupportedModuleError(UnsupportedError):
    """A module fxdp does not support as it is (``strict=True`` raises it with the list)."""


class UnsupportableModuleError(UnsupportedModuleError):
    """A module that can never be made private (it mixes samples by design)."""


class NotYetSupportedModuleError(UnsupportedModuleError):
    """A module fxdp does not support yet."""


class ShouldReplaceModuleError(UnsupportedModuleError):
    """A module ``ModuleValidator.fix`` (and ``fxdp.privatize``) replaces."""


class IllegalModuleConfigurationError(UnsupportedModuleError):
    """A setup that cannot train privately as configured (e.g. eval mode)."""
