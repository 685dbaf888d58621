"""Attention masks that attend everywhere, for every input, removed from the graph.

A model without a mask still gets one under ``torch.export``: Hugging Face's mask
builders cannot skip it while tracing, so a ViT (no mask at all) or a BERT called
without ``attention_mask`` hands ``scaled_dot_product_attention`` a boolean mask built
from the sequence positions, ``arange(T) >= 0`` expanded to ``[B, 1, T, T]``, that the
eager model never builds. It changes nothing in the result, yet it costs its kernels in
every forward (HF ViT at T = 65, B = 16: about 0.5% of a book-keeping step on CPU,
``benchmarks/README.md``, Round 33) and, on CUDA, it keeps SDPA off its flash kernel,
which takes no mask.

This pass proves, by the ranges of values (an interval analysis over a few ops:
``arange``, shifts and scalings by constants, comparisons, boolean algebra, ``where``,
``masked_fill``, constant fills and the ops that only move elements), that a mask is
all-true (boolean) or all-zero (additive) for *every* value of the symbolic sizes, then
drops it from the call. A mask that depends on any input's values (a padding mask), on a
buffer or parameter, or on an op outside that list is left alone: the pass fails closed.
A causal mask on a symbolic length is not all-true (``kv <= q`` has ``hi(kv) > lo(q)``),
so it stays; a size the graph fixed is a fact of that graph (its guards refuse others).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx

__all__ = ["Range", "drop_all_true_masks", "mask_range"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Range:
    """Bounds on every element of a tensor (``-inf`` / ``inf``: unbounded); booleans are 0 / 1."""

    lo: float
    hi: float


_ANY = Range(-math.inf, math.inf)
_EXACT = float(2**53)
_BOOL = Range(0.0, 1.0)

#: ops whose every output element is an element of their first argument
_MOVES = {
    aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.clone.default, aten.alias.default,
    aten.contiguous.default, aten.detach.default, aten.lift_fresh_copy.default, aten.repeat.default,
    aten.expand_copy.default, aten.view_copy.default, aten.unsqueeze_copy.default, aten.slice_copy.Tensor,
}
_FILLS = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1, aten.scalar_tensor.default: 0}
_ONES = {aten.ones.default, aten.new_ones.default, aten.ones_like.default}
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_COMPARE = {
    aten.ge.Scalar: operator.ge, aten.ge.Tensor: operator.ge, aten.gt.Scalar: operator.gt,
    aten.gt.Tensor: operator.gt, aten.le.Scalar: operator.le, aten.le.Tensor: operator.le,
    aten.lt.Scalar: operator.lt, aten.lt.Tensor: operator.lt,
}
_AND = {aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor}
_OR = {aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor}
_NOT = {aten.logical_not.default, aten.bitwise_not.default}


def _dtype(x: Any) -> Optional[torch.dtype]:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _literal(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _compare(op: Any, a: Range, b: Range) -> Range:
    """1 where ``op(a, b)`` holds for every pair of values in the ranges, 0 where for none."""
    if op in (operator.le, operator.lt):  # a <= b is b >= a
        a, b, op = b, a, operator.ge if op is operator.le else operator.gt
    if op(a.lo, b.hi):
        return Range(1.0, 1.0)
    if not op(a.hi, b.lo):
        return Range(0.0, 0.0)
    return _BOOL


def mask_range(node: Any, memo: Optional[Dict[fx.Node, Range]] = None) -> Range:
    """Bounds on the values of ``node`` for every input (``_ANY`` where unknown: an input,
    a buffer, an op the analysis does not model)."""
    memo = {} if memo is None else memo
    lit = _literal(node)
    if lit is not None:
        return Range(lit, lit)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return _ANY
    if node in memo:
        return memo[node]
    r = _range(node, memo)
    if (math.isfinite(r.lo) and abs(r.lo) > _EXACT) or (math.isfinite(r.hi) and abs(r.hi) > _EXACT):
        r = _ANY  # past float64's exact integers, near int64's overflow: unknown
    memo[node] = r
    return r


def _range(n: fx.Node, memo: Dict[fx.Node, Range]) -> Range:
    t, args, kw = n.target, n.args, n.kwargs
    arg = lambda i: mask_range(args[i], memo) if len(args) > i else _ANY  # noqa: E731
    if t in _MOVES:
        return arg(0)
    if t in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout):
        # a cast keeps the bounds only between types that hold them exactly (bool -> any, or none)
        src, dst = _dtype(args[0]), _dtype(n)
        return arg(0) if src is not None and (src == dst or src == torch.bool) else _ANY
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        # start, start + step, ... below end (none for end <= start: no element to bound)
        start, end, step = ((0, args[0], 1) if t is aten.arange.default else
                            (args[0], args[1], args[2] if len(args) > 2 else kw.get("step", 1)))
        lo, hi, by = _literal(start), _literal(end), _literal(step)
        if lo is None or by is None or by <= 0:
            return _ANY
        if hi is None:  # a symbolic end: unbounded above
            return Range(lo, math.inf)
        exact = all(type(v) is int for v in (start, end, step))  # integers below end: at most end - 1
        return Range(lo, hi - 1 if exact else hi)
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        if kw.get("alpha", 1) != 1:
            return _ANY
        a, b = arg(0), arg(1)
        if t in (aten.sub.Tensor, aten.sub.Scalar):
            b = Range(-b.hi, -b.lo)
        return Range(a.lo + b.lo, a.hi + b.hi)
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        c = _literal(args[1]) if len(args) > 1 else None
        a = arg(0)
        if c is None or not math.isfinite(c) or not (math.isfinite(a.lo) and math.isfinite(a.hi)):
            return _ANY
        return Range(min(a.lo * c, a.hi * c), max(a.lo * c, a.hi * c))
    if t is aten.rsub.Scalar:  # other - self
        a, c = arg(0), _literal(args[1]) if len(args) > 1 else None
        if c is None or kw.get("alpha", 1) != 1:
            return _ANY
        return Range(c - a.hi, c - a.lo)
    if t in _COMPARE:
        return _compare(_COMPARE[t], arg(0), arg(1))
    if (t in _AND or t in _OR) and _dtype(n) == torch.bool:  # bitwise ops of integers: unknown
        a, b = arg(0), arg(1)
        if not (_is_bool(a) and _is_bool(b)):
            return _BOOL
        pick = min if t in _AND else max
        return Range(pick(a.lo, b.lo), pick(a.hi, b.hi))
    if t in _NOT and _dtype(n) == torch.bool:
        a = arg(0)
        return Range(1 - a.hi, 1 - a.lo) if _is_bool(a) else _BOOL
    if t in (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar):
        cond, a, b = arg(0), arg(1), arg(2)
        if cond.lo >= 1:
            return a
        if cond.hi <= 0:
            return b
        return Range(min(a.lo, b.lo), max(a.hi, b.hi))
    if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):  # value where the mask is true
        a, m, v = arg(0), arg(1), arg(2)
        if m.hi <= 0:
            return a
        if m.lo >= 1:
            return v
        return Range(min(a.lo, v.lo), max(a.hi, v.hi))
    if t in _FILLS:
        v = _literal(args[_FILLS[t]]) if len(args) > _FILLS[t] else None
        return Range(v, v) if v is not None and not math.isnan(v) else _ANY
    if t in _ONES:
        return Range(1.0, 1.0)
    if t in _ZEROS:
        return Range(0.0, 0.0)
    return _ANY


def _is_bool(r: Range) -> bool:
    return 0.0 <= r.lo <= r.hi <= 1.0


_SDPA_MASK = 3  # scaled_dot_product_attention(query, key, value, attn_mask, ...)


def _no_op_mask(mask: fx.Node) -> bool:
    """A boolean mask true everywhere, or a floating mask of zeros, for every input."""
    dtype, r = _dtype(mask), mask_range(mask)
    if dtype == torch.bool:
        return r.lo >= 1
    return dtype is not None and dtype.is_floating_point and r.lo == 0 and r.hi == 0


def drop_all_true_masks(gm: fx.GraphModule) -> List[fx.Node]:
    """Remove every ``scaled_dot_product_attention`` mask proved to attend everywhere for every
    input, and the nodes that only built it; returns the calls changed (each marked
    ``meta["fxdp_mask_dropped"]``)."""
    changed: List[fx.Node] = []
    dropped: Dict[fx.Node, None] = {}  # one mask may serve every layer
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.scaled_dot_product_attention.default:
            continue
        in_args = len(n.args) > _SDPA_MASK
        mask = n.args[_SDPA_MASK] if in_args else n.kwargs.get("attn_mask")
        if not isinstance(mask, fx.Node) or not _no_op_mask(mask):
            continue
        if in_args:
            n.args = n.args[:_SDPA_MASK] + (None,) + n.args[_SDPA_MASK + 1:]
        else:
            n.kwargs = {**n.kwargs, "attn_mask": None}
        n.meta["fxdp_mask_dropped"] = mask.name
        changed.append(n)
        dropped[mask] = None
    for mask in dropped:
        _erase_unused(gm.graph, mask)
    if changed:
        gm.recompile()
    return changed


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and then its inputs, as long as nothing else uses them and they have no
    effects (placeholders stay), with export's dtype checks of them."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.op != "call_function" or n.is_impure():
            continue
        checks = [u for u in n.users if u.target is aten._assert_tensor_metadata.default]
        if len(checks) < len(n.users):
            continue
        for u in checks:  # export's check of a cast's dtype: nothing left to check
            graph.erase_node(u)
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
