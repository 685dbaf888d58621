"""Output gradients that book-keeping can form again from the next layer's record.

Where a capture op's only consumer is a ReLU whose only consumer is another capture op's
input (``conv -> ReLU -> conv``, ``linear -> ReLU -> linear``), the first op's output
gradient is the ReLU's backward of the second op's input gradient::

    g_k = threshold_backward(dL/dx_{k+1}, x_{k+1}, 0),   x_{k+1} = relu(z_k)

and both ``x_{k+1}`` and the second op's output gradient are in its record, held for its
own clipped sum. So book-keeping need not hold ``g_k`` through the rest of the backward
pass: it drops it as the record arrives and forms it again, with the same kernels, when
the pass ends, before any norm or sum reads it (``BookKeeping``; CIFAR-10's CNN at
B = 128: 6 of the 44 MiB it holds at the step's peak, ``benchmarks/README.md``, Round 34).

This pass only marks the first op (``CaptureOp.grad_from``: the second op and the index
of its input); whether a step uses the mark is decided on the records.
"""
from __future__ import annotations

from typing import List

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import CaptureOp, RuleCapture

__all__ = ["link_relu_grads"]

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``n`` is ``max(x, 0)`` of its first argument and nothing else (autograd's derivative
    ``threshold_backward(g, result, 0)``)."""
    if n.op == "call_function":
        return n.target in _RELU_FUNCTIONS
    if n.op == "call_method":
        return n.target in ("relu", "relu_")
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)) is nn.ReLU
    return False


def _capture_of(gm: fx.GraphModule, n: fx.Node) -> CaptureOp | None:
    name = n.meta.get("fxdp_capture")
    if name is None or n.op != "call_module":
        return None
    op = gm.get_submodule(n.target)
    return op if isinstance(op, CaptureOp) else None


def link_relu_grads(gm: fx.GraphModule) -> List[CaptureOp]:
    """Mark every capture op whose output gradient the next capture op's record gives
    (``op.grad_from = (next op, its input index)``); returns the marked ops."""
    marked = []
    for n in gm.graph.nodes:
        op = _capture_of(gm, n)
        if op is None or not isinstance(op, RuleCapture) or len(n.users) != 1:
            continue
        relu = next(iter(n.users))
        if not _is_relu(gm, relu) or not relu.args or relu.args[0] is not n or len(relu.users) != 1:
            continue
        if any(a is n for a in list(relu.args[1:]) + list(relu.kwargs.values())):
            continue
        nxt = next(iter(relu.users))
        dst = _capture_of(gm, nxt)
        if not isinstance(dst, RuleCapture) or dst.rule.input_arg not in dst.names or relu in nxt.kwargs.values():
            continue
        uses = [i for i, a in enumerate(nxt.args) if a is relu]
        if uses != [dst.names.index(dst.rule.input_arg)] or uses[0] in dst.param_index:
            continue
        op.grad_from = (dst, uses[0])  # a plain tuple: not registered as a submodule
        marked.append(op)
    return marked
