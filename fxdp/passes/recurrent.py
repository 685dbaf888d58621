"""Rewrite pass: recurrent modules -> DP recurrent layers.

``nn.RNN``/``nn.GRU``/``nn.LSTM`` run their recurrence in one fused ATen call
that ``torch.fx`` cannot trace, so the per-step uses of their weights would only
be reachable by the slow ``torch.func`` fallback. Each one (exact class, or a
subclass that keeps the base ``forward``) is replaced by its ``fxdp.layers``
counterpart -- ``DPRNN``/``DPGRU``/``DPLSTM`` (hoisted input projection + a
scan with a batched per-sample rule) and ``DPRNNCell``/``DPGRUCell``/
``DPLSTMCell`` (two ``F.linear`` ops) -- holding the *same* Parameter objects,
so the ``state_dict`` and any optimizer built on the original model are unchanged.

The rewrite is reversible: ``restore`` gives back a copy of the original module
(same class and configuration) holding the DP layer's current parameters.

Option (``rewrite_options``): ``"recurrent": False`` keeps the torch modules
(they are then served, exactly but slowly, by the fallback).

A recurrent module that *is* the root of the model is not replaced (a rewrite
pass replaces submodules); wrap it in a parent module to get the fast path.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Dict, List

from torch import nn

from .rewrite import Rewrite, register_rewrite, replace_submodule

__all__ = ["rewrite_recurrent"]

_REASON = (
    "{cls} runs its recurrence in one fused kernel that torch.fx cannot trace, hiding the per-step uses of "
    "its weights; {new} computes the same outputs from the hoisted input projection (linear rule) and a "
    "scan whose per-sample rule gives the recurrent weights' gradients in one batched op"
)


def _dp_class(m: nn.Module):
    """The DP class for ``m``: exact torch class, or a subclass keeping its forward."""
    from ..layers.recurrent import DP_RECURRENT

    for base in type(m).__mro__:
        if base in DP_RECURRENT:
            return DP_RECURRENT[base] if type(m).forward is base.forward else None
    return None


def _restorer(original: nn.Module) -> Callable[[nn.Module], nn.Module]:
    def restore(dp_layer: nn.Module) -> nn.Module:
        """A copy of ``original`` (class, configuration, hooks) holding ``dp_layer``'s
        current Parameter objects."""
        m = copy.copy(original)
        m._parameters = OrderedDict((k, dp_layer._parameters.get(k, v)) for k, v in original._parameters.items())
        m._buffers = OrderedDict((k, dp_layer._buffers.get(k, v)) for k, v in original._buffers.items())
        m._modules = OrderedDict(original._modules)
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()
        m.training = dp_layer.training
        return m

    return restore


@register_rewrite(order=20, options=("recurrent",))
def rewrite_recurrent(root: nn.Module, options: Dict[str, Any], copied: set) -> List[Rewrite]:
    """Replace every recurrent module below ``root`` by its DP layer (see the module docstring)."""
    enabled = options.get("recurrent", True)
    if not isinstance(enabled, bool):
        raise TypeError(f"rewrite_options['recurrent'] must be True or False, got {enabled!r}")
    if not enabled:
        return []
    found = [(path, m) for path, m in root.named_modules(remove_duplicate=False) if path and _dp_class(m)]
    made: Dict[int, nn.Module] = {}  # one DP layer per module object (shared modules stay shared)
    rewrites: List[Rewrite] = []
    for path, m in found:
        new = made.get(id(m))
        if new is None:
            new = made[id(m)] = _dp_class(m).from_module(m)
        replace_submodule(root, path, new, copied)
        rewrites.append(
            Rewrite(
                path=path,
                original=type(m).__name__,
                replacement=type(new).__name__,
                reason=_REASON.format(cls=type(m).__name__, new=type(new).__name__),
                reversible=True,
                details={"mode": getattr(m, "mode", type(m).__name__)},
                restore=_restorer(m),
            )
        )
    return rewrites
