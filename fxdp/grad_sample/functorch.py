"""Opacus' path ``opacus.grad_sample.functorch``: ``make_functional``, for users who
compute per-sample gradients themselves with ``torch.func.vmap`` (Opacus' cifar10
example with ``grad_sample_mode="no_op"``)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Tuple

import torch
from torch import Tensor, nn

from ..module import DPModule

__all__ = ["make_functional"]


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False) -> Tuple[Callable[..., Any], Tuple[Tensor, ...]]:
    """``(fmodel, params)`` with ``fmodel(params, *args, **kwargs)`` running ``mod``
    with ``params`` (in ``mod.named_parameters()`` order) in place of its own."""
    params = tuple(p for _, p in mod.named_parameters())
    plain = mod
    if isinstance(mod, DPModule):
        # the model without capture ops: its autograd functions would not run under vmap
        plain = mod._module
    by_id = {id(p): n for n, p in plain.named_parameters()}
    names = [by_id[id(p)] for p in params]
    skeleton = copy.deepcopy(plain).to("meta")  # the structure only; parameters come as arguments

    def fmodel(new_params: Any, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(skeleton, dict(zip(names, new_params)), args, kwargs)

    if disable_autograd_tracking:
        params = tuple(p.detach() for p in params)
    return fmodel, params
