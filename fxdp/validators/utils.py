"""Opacus' path ``opacus.validators.utils``."""
from .module_validator import register_module_fixer, register_module_validator

__all__ = ["register_module_validator", "register_module_fixer"]
