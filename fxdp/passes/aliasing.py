"""Which nodes write a value in place: the writes a copied subgraph must keep.

A graph in ``torch.export``'s training IR is not functional: a constant built by slice
assignments (BEiT's relative-position index: ``idx = zeros(...); idx[1:, 1:] = ...``)
is ``zeros``, then ``copy_`` into ``slice`` views of it, then reads of ``zeros``. The
writes are users of the value, not ancestors of its reads, so a pass that copies a
read's ancestors (a capture op's parameter subgraph) must add them, or its copy reads
the unwritten value. Views and writes come from the ATen schemas' alias annotations
(``Tensor(a)`` a view, ``Tensor(a!)`` a write); a symbolically traced graph's are
``x[...] = v`` and the in-place methods (``x.fill_()``).
"""
from __future__ import annotations

import operator
from typing import Iterable, List, Optional, Set

import torch
import torch.fx as fx

__all__ = ["aliases", "writes_into"]

#: methods of a symbolically traced graph that may return a view of ``self``
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "unsqueeze", "squeeze",
                 "expand", "expand_as", "narrow", "select", "flatten", "unflatten", "as_strided", "unfold",
                 "diagonal", "movedim", "swapaxes", "split", "chunk", "unbind", "detach", "T", "mT"}


def _view_of(n: fx.Node) -> Optional[fx.Node]:
    """The node whose storage ``n`` views, or None."""
    t = n.target
    if n.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        sets = [r.alias_info.before_set for r in t._schema.returns if r.alias_info is not None]
        if not sets or t._schema.is_mutable:
            return None
        for a, v in zip(t._schema.arguments, n.args):
            if a.alias_info is not None and not a.alias_info.is_write and a.alias_info.before_set & sets[0] \
                    and isinstance(v, fx.Node):
                return v
        return None
    if (n.op == "call_method" and t in _VIEW_METHODS) or (n.op == "call_function" and t is operator.getitem):
        return n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return None


def _written(n: fx.Node) -> List[fx.Node]:
    """The values ``n`` writes in place."""
    t = n.target
    if n.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        if not t._schema.is_mutable:
            return []
        out = []
        for i, a in enumerate(t._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            out.extend(x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, fx.Node))
        return out
    if n.op == "call_function" and t is operator.setitem:
        return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
    if n.op == "call_method" and isinstance(t, str) and t.endswith("_") and not t.endswith("__") and n.args \
            and isinstance(n.args[0], fx.Node):
        return [n.args[0]]
    return []


def aliases(x: fx.Node) -> Set[fx.Node]:
    """``x``, its base and every view of that base (transitively)."""
    base = x
    while (up := _view_of(base)) is not None:
        base = up
    out, todo = {base}, [base]
    while todo:
        for u in todo.pop().users:
            if u not in out and _view_of(u) in out:
                out.add(u)
                todo.append(u)
    return out


def writes_into(nodes: Iterable[fx.Node]) -> Set[fx.Node]:
    """The nodes that write in place into any of ``nodes`` or a view of one."""
    shared: Set[fx.Node] = set()
    for x in nodes:
        if x not in shared:
            shared |= aliases(x)
    return {u for a in shared for u in a.users if any(w in shared for w in _written(u))}
