"""Batch findings: whether an ATen op keeps samples apart, read from its batch rule.

:func:`op_finding` binds a node's arguments to its schema, finds the batched ones
(``meta["fxdp_batch"]``, from :mod:`fxdp.passes.symbolic_batch`) and asks the op's rule
(:mod:`fxdp.passes.batch_rules`) where each one's batch lands: a batch combined along, or
landing on another dimension than the output's, is a ``batch-op`` finding; an op without a
rule, or whose arguments cannot be read, a ``batch-rule`` finding (fail closed).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_flatten

from .batch_rules import SHAPE_ONLY, BatchedArg, rule_of
from .per_sample_loss import PER_SAMPLE_LOSS

__all__ = ["batched_inputs", "lands_on", "op_finding"]


def _batch_dim(h: Any) -> Any:
    if isinstance(h, int) and not isinstance(h, bool):
        return h
    if isinstance(h, tuple) and h and h[0] == "fold":
        return h[1]
    return h  # None, "B", "ambiguous"


def _holds_batch(a: Any, dep: Optional[Dict[fx.Node, bool]] = None) -> bool:
    """A tensor with a batch (or folded batch) dimension (and data-dependent, given ``dep``)."""
    return isinstance(a, fx.Node) and (dep is None or bool(dep.get(a))) \
        and isinstance(a.meta.get("val"), torch.Tensor) \
        and _batch_dim((a.meta.get("fxdp_batch") or [None])[0]) not in (None, "B")


def _arguments(n: fx.Node) -> Optional[Dict[str, Any]]:
    """The op's arguments by schema name, defaults filled in (``None``: not an ATen-style
    op, or its arguments do not bind to its schema)."""
    if not isinstance(n.target, torch._ops.OpOverload):
        return None
    norm = normalize_function(n.target, tuple(n.args), dict(n.kwargs), normalize_to_only_use_kwargs=True)
    return None if norm is None else norm.kwargs


def batched_inputs(n: fx.Node, dep: Optional[Dict[fx.Node, bool]] = None) -> List[tuple]:
    """``[(name, item, node, args)]``: the batched arguments of ``n`` (``item``: the index
    in a list argument; ``args``: all arguments by name)."""
    args = _arguments(n)
    if args is None:
        return []
    found = []
    for name, v in args.items():
        items = list(enumerate(v)) if isinstance(v, (list, tuple)) else [(None, v)]
        found += [(name, i, a, args) for i, a in items if _holds_batch(a, dep)]
    return found


def lands_on(n: fx.Node, args: Dict[str, Any], name: str, item: Optional[int], a: fx.Node, out_dim: Any,
             out: Optional[torch.Tensor]) -> Optional[int]:
    """The output dimension that argument ``name`` (node ``a``)'s batch lands on by the
    rule of ``n`` (``None``: no rule, or the op combines along it)."""
    rule = rule_of(n.target)
    b = _batch_dim((a.meta.get("fxdp_batch") or [None])[0])
    if rule is None or not isinstance(b, int):
        return None
    u = BatchedArg(n, args, name, item, b, a.meta["val"].dim(), out.dim() if out is not None else 0, out_dim)
    try:
        return rule(u)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError):
        return None  # arguments the rule cannot read: fail closed


def op_finding(n: fx.Node, dep: Dict[fx.Node, bool]) -> Optional[Tuple[str, str]]:
    """``(code, problem)`` when ``n`` may combine samples' rows (``None``: its rule
    shows it keeps them apart): ``batch-op`` where its rule finds samples combined,
    ``batch-rule`` where no rule can tell."""
    if n.op != "call_function" or n.target in SHAPE_ONLY or PER_SAMPLE_LOSS in n.meta:
        return None
    if not any(_holds_batch(a, dep) for a in n.all_input_nodes):
        return None
    name = getattr(n.target, "__name__", str(n.target))
    if not isinstance(n.target, torch._ops.OpOverload):  # torch.cond, a torch.no_grad() block's subgraph
        return ("batch-rule", f"fxdp cannot read inside {name}, which takes batched data, so it cannot show "
                              f"that it keeps samples apart (move the batched computation out of the "
                              f"torch.no_grad()/autocast block or torch.cond)")
    if _arguments(n) is None:
        return ("batch-rule", f"fxdp cannot read the arguments of {n.target} by its schema")
    if rule_of(n.target) is None:
        return ("batch-rule", f"fxdp has no batch rule for {n.target}, so it cannot show that this op keeps "
                              f"samples apart (fxdp/passes/batch_rules.py lists the ops it reads)")
    out = next((v for v in tree_flatten(n.meta.get("val"))[0] if isinstance(v, torch.Tensor)), None)
    out_dim = _batch_dim((n.meta.get("fxdp_batch") or [None])[0])
    for arg, item, a, args in batched_inputs(n, dep):
        b = _batch_dim(a.meta["fxdp_batch"][0])
        if b == "ambiguous":
            return ("batch-rule", f"its argument '{arg}' has several dimensions of the batch's size: which one "
                                  f"holds the samples is unknown")
        d = lands_on(n, args, arg, item, a, out_dim, out)
        if d is None and out_dim is None:
            continue  # reduced over the batch: symbolic_batch's batch-reduction finding, where the value is used
        if d is None:
            return ("batch-op", f"{n.target} combines entries along the batch (dimension {b} of its argument "
                                f"'{arg}'), so one sample's result depends on the others")
        if d != out_dim:
            where = f"on {out_dim}" if isinstance(out_dim, int) else \
                "on no dimension" if out_dim is None else "on several dimensions of the batch's size"
            return ("batch-op", f"{n.target}: its argument '{arg}' puts the batch on dimension {d} of the result, "
                                f"whose batch is {where}: samples meet (an outer product over the batch, as h @ h.T, "
                                f"or a contrastive loss's in-batch similarities)")
    return None
