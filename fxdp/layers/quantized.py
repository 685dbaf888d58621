"""Frozen quantized linear layers (QLoRA's base model) as one op of the exported graph.

QLoRA (Dettmers et al. 2023) trains LoRA adapters on a base model whose linear layers are
stored in 4 bits (bitsandbytes' ``Linear4bit``; ``Linear8bitLt`` in 8 bits). Their weights are
tensor subclasses ``torch.export`` cannot trace, and they are frozen: DP needs no per-sample
gradient of them, only the gradient of their input. While a model is exported, each such
layer's ``forward`` is replaced by ``fxdp::frozen_linear(x, handle, out_features)``: an op whose
real implementation calls the layer itself (its own dequantizing kernels), whose backward
differentiates that call for ``x``, and whose batch rule is a linear layer's (row ``i`` of the
output is row ``i`` of the input times the dequantized weight: samples stay apart).
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any, Dict, Iterator, List

import torch
from torch import Tensor, nn

from ..passes.batch_rules import BatchedArg, register_batch_rule

__all__ = ["QUANTIZED_LINEARS", "frozen_quantized_linears", "opaque_quantized_linears"]

#: frozen layers served as one row-wise op (qualified class names; subclasses too)
QUANTIZED_LINEARS = frozenset({"bitsandbytes.nn.modules.Linear4bit", "bitsandbytes.nn.modules.Linear8bitLt"})

_LAYERS: Dict[int, "weakref.ref[nn.Module]"] = {}
_HANDLES = itertools.count(1)


def _layer(handle: int) -> nn.Module:
    ref = _LAYERS.get(handle)
    m = ref() if ref is not None else None
    if m is None:
        raise RuntimeError(f"fxdp: the quantized layer {handle} of this graph no longer exists; privatize the "
                           "model again")
    return m


@torch.library.custom_op("fxdp::frozen_linear", mutates_args=())
def frozen_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """The frozen layer ``handle`` applied to ``x`` (its own forward)."""
    with torch.no_grad():
        return _layer(handle)(x)


@frozen_linear.register_fake
def _frozen_linear_fake(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.handle = inputs[1]


def _backward(ctx: Any, g: Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    layer = _layer(ctx.handle)
    with torch.enable_grad():  # the layer's own backward, for its input (its weights are frozen)
        xr = x.detach().requires_grad_()
        y = layer(xr)
        (gx,) = torch.autograd.grad(y, xr, g, allow_unused=True)
    if gx is None:
        raise RuntimeError(
            f"fxdp: the quantized layer {type(layer).__name__} gives no gradient for its input. bitsandbytes packs "
            "4-bit weights for CPU inference when the layer runs in eval mode on an input that needs no gradient, "
            "and its packed kernel has no backward. Fix: keep the model in train mode (model.train()) before its "
            "first forward pass, or load it again")
    return gx, None, None


frozen_linear.register_autograd(_backward, setup_context=_setup)


def _row_wise(u: BatchedArg) -> Any:
    """A linear layer maps each row's last dimension: the batch stays where it is."""
    return u.dim if u.name == "x" and u.dim < u.rank - 1 else None


register_batch_rule(torch.ops.fxdp.frozen_linear.default, _row_wise)


def _quantized(m: nn.Module) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in QUANTIZED_LINEARS for c in type(m).__mro__)


def frozen_quantized_linears(model: nn.Module) -> List[nn.Module]:
    """The quantized linear layers of ``model`` with no trainable parameter."""
    return [m for m in model.modules() if _quantized(m) and not any(p.requires_grad for p in m.parameters())]


@contextlib.contextmanager
def opaque_quantized_linears(model: nn.Module) -> Iterator[int]:
    """While the block runs (a capture), each frozen quantized linear layer of ``model`` calls
    ``fxdp::frozen_linear``; yields how many."""
    layers = frozen_quantized_linears(model)
    for m in layers:
        handle = m.__dict__.get("_fxdp_handle")
        ref = _LAYERS.get(handle) if handle is not None else None
        if ref is None or ref() is not m:  # new, or a copy (copy.deepcopy keeps the original's handle)
            handle = m.__dict__["_fxdp_handle"] = next(_HANDLES)
            _LAYERS[handle] = weakref.ref(m)
        out = int(getattr(m, "out_features"))
        m.__dict__["forward"] = lambda x, *a, _h=handle, _o=out, **k: torch.ops.fxdp.frozen_linear(x, _h, _o)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
