"""Opacus' path ``opacus.utils.module_utils``: small helpers over a module tree."""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import nn

__all__ = [
    "has_trainable_params",
    "parametrized_modules",
    "trainable_modules",
    "trainable_parameters",
    "requires_grad",
    "clone_module",
    "get_submodule",
    "are_state_dict_equal",
]


def has_trainable_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def parametrized_modules(module: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """``(name, submodule)`` of every submodule with parameters of its own."""
    return ((n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False)))


def trainable_modules(module: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """``(name, submodule)`` of every submodule with trainable parameters of its own."""
    return ((n, m) for n, m in parametrized_modules(module) if has_trainable_params(m))


def trainable_parameters(module: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


def requires_grad(module: nn.Module, *, recurse: bool = False) -> bool:
    """Whether any parameter of ``module`` (its own, or all with ``recurse``) requires grad."""
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (new parameters, same values)."""
    return copy.deepcopy(module)


def get_submodule(module: nn.Module, target: str) -> nn.Module:
    return module if target == "" else module.get_submodule(target)


def are_state_dict_equal(sd1: Dict[str, Any], sd2: Dict[str, Any]) -> bool:
    """Same keys and equal tensors."""
    if sd1.keys() != sd2.keys():
        return False
    return all(torch.equal(sd1[k], sd2[k]) if isinstance(sd1[k], torch.Tensor) else sd1[k] == sd2[k] for k in sd1)
