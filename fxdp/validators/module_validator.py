"""``ModuleValidator``: Opacus' static module check and fixer, with fxdp's rewrites.

An Opacus script runs ``validate`` / ``fix`` before ``make_private``. Here ``fix``
applies exactly the rewrite passes ``fxdp.privatize`` applies on its own
(BatchNorm -> GroupNorm keeping its affine weights, DP recurrent and attention
layers loading the same ``state_dict``, InstanceNorm without running statistics),
so a fixed model trains the same as the unfixed one under fxdp; ``validate``
reports what those passes would replace (``ShouldReplaceModuleError``) or refuse
(``NotYetSupportedModuleError``), plus the validators users register. What mixes
samples inside ``forward`` is beyond a module-type check: ``fxdp.check(model, x)``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Sequence, Union

from torch import nn

from ..errors import UnsupportedModelError
from .errors import (
    IllegalModuleConfigurationError,
    NotYetSupportedModuleError,
    ShouldReplaceModuleError,
    UnsupportedModuleError,
)

__all__ = ["ModuleValidator", "register_module_validator", "register_module_fixer"]


def _rewrite_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    from ..passes.rewrite import known_options

    return {k: v for k, v in kwargs.items() if k in known_options()}


class ModuleValidator:
    """Opacus' ``ModuleValidator`` (same classmethods and registries)."""

    VALIDATORS: Dict[type, Callable[..., List[UnsupportedModuleError]]] = {}
    FIXERS: Dict[type, Callable[..., nn.Module]] = {}

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> List[UnsupportedModuleError]:
        """The problems of ``module``: a list, or raised together when ``strict``."""
        from ..passes.rewrite import rewrite_passes

        errors: List[UnsupportedModuleError] = []
        if not module.training:
            errors.append(IllegalModuleConfigurationError("Model needs to be in training mode"))
        for _, sub in module.named_modules():
            validator = cls.VALIDATORS.get(type(sub))
            if validator is not None:
                errors.extend(validator(sub))
        # what privatize's rewrite passes replace or refuse, on a copy (the model is untouched)
        root = copy.deepcopy(module)
        copied: set = set()
        for rewrite_pass in rewrite_passes():
            try:
                for r in rewrite_pass(root, {}, copied):
                    errors.append(ShouldReplaceModuleError(
                        f"{r.original} at '{r.path or '(root)'}': {r.reason}. ModuleValidator.fix (or "
                        f"fxdp.privatize itself) replaces it with {r.replacement}"))
            except UnsupportedModelError as e:
                errors.append(NotYetSupportedModuleError(str(e)))
        if strict and errors:
            raise UnsupportedModuleError(errors)
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        return not cls.validate(module, strict=False)

    @classmethod
    def fix(cls, module: nn.Module, **kwargs: Any) -> nn.Module:
        """A copy of ``module`` with the registered fixers and privatize's rewrites
        applied (``batchnorm=``, ``batchnorm_groups=``, ... select rewrite options)."""
        from ..passes.rewrite import replace_submodule
        from ..privatize import apply_rewrites

        module = copy.deepcopy(module)
        copied: set = set()
        for name, sub in list(module.named_modules()):
            fixer = cls.FIXERS.get(type(sub))
            if fixer is not None:
                new = fixer(sub, **kwargs)
                if not name:
                    module = new
                else:
                    replace_submodule(module, name, new, copied)
        fixed, _ = apply_rewrites(module, _rewrite_options(kwargs))
        return fixed

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs: Any) -> nn.Module:
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed


def _register(registry: Dict[type, Any], targets: Union[type, Sequence[type]]) -> Callable[[Any], Any]:
    def decorator(f: Any) -> Any:
        for t in (targets if isinstance(targets, Sequence) else [targets]):
            registry[t] = f
        return f

    return decorator


def register_module_validator(target_class_or_classes: Union[type, Sequence[type]],
                              validator_class: type = ModuleValidator) -> Callable[[Any], Any]:
    """Register ``f(module) -> [errors]`` as the validator of these module classes."""
    return _register(validator_class.VALIDATORS, target_class_or_classes)


def register_module_fixer(target_class_or_classes: Union[type, Sequence[type]],
                          validator_class: type = ModuleValidator) -> Callable[[Any], Any]:
    """Register ``f(module, **kwargs) -> module`` as the fixer of these module classes."""
    return _register(validator_class.FIXERS, target_class_or_classes)
