"""Opacus' ``opacus.validators``: ``ModuleValidator`` with fxdp's lossless rewrites."""
from .module_validator import ModuleValidator, register_module_fixer, register_module_validator

__all__ = ["ModuleValidator", "register_module_validator", "register_module_fixer"]
