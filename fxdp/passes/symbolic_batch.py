"""Batch dimensions from symbolic shapes (graphs captured by ``torch.export``).

``torch.export`` runs the model on fake tensors whose batch size is one symbol
``s``; every node's ``meta["val"]`` carries its symbolic shape. The batch
dimension of a value is where ``s`` is; a dimension of size ``s*k`` folds the
batch with ``k`` other positions (GPT-2's ``x.view(-1, d)`` of ``[B, T, d]``).
A fold is *batch-major* when each sample's rows are contiguous (the batch is
the outermost factor of the merged dimensions): only then is ``[B*k, ...]`` the
same as ``[B, k, ...]``. The order cannot be read off ``s*k`` (a product
commutes), so it is followed through the graph: a reshape that merges a batch
dimension with the dimensions after it makes a batch-major fold, and ops whose
output rows are their input's rows keep it.

Results on ``node.meta["fxdp_batch"]``: one hint per flattened value, an int
(batch dimension), ``None`` (no batch), ``"B"`` (an int equal to the batch
size), ``("fold", dim, k, "major" | "unknown")`` or ``"ambiguous"``.
"""
from __future__ import annotations

from typing import Any, List

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

__all__ = ["annotate_batch", "batch_symbol", "hint_of", "is_shape_value"]

aten = torch.ops.aten

#: ops that reshape their first argument (output dims are merged/split input dims)
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}


def _expr(size: Any) -> Any:
    """The sympy expression of a size (ints as sympy Integers)."""
    import sympy

    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def is_shape_value(node: fx.Node) -> bool:
    """A node whose value is a (symbolic) scalar: shape arithmetic, not sample data."""
    v = node.meta.get("val")
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and node.op != "placeholder"


def batch_symbol(gm: fx.GraphModule, batch_leaves: List[tuple]) -> Any:
    """The batch symbol: the size at ``dim`` of the placeholder values ``(index, dim)``."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, d in batch_leaves:
        v = phs[i].meta.get("val")
        if isinstance(v, torch.Tensor) and d is not None and v.dim() > d:
            e = _expr(v.shape[d])
            if e.free_symbols:
                return e
    return None


def _equals_batch(e: Any, s: Any) -> bool:
    """``e == s`` for every size: also when sympy leaves it unsimplified, such as the
    bag count ``(s0*L + L - 1) // L`` of a flattened ``[s0, L]`` input (checked at
    several integer points of its symbols)."""
    if e == s:
        return True
    if s not in e.free_symbols:
        return False
    syms = sorted(e.free_symbols, key=str)
    for k, point in enumerate(((2, 3), (5, 7), (11, 2), (64, 128))):
        values = {x: point[j % 2] + j for j, x in enumerate(syms)}
        try:
            if int(e.subs(values)) != int(s.subs(values)):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _tensor_hint(v: torch.Tensor, s: Any) -> Any:
    dims = [_expr(x) for x in v.shape]
    exact = [d for d, e in enumerate(dims) if _equals_batch(e, s)]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        return "ambiguous"
    folded = [d for d, e in enumerate(dims) if s in e.free_symbols]
    if len(folded) == 1:
        d = folded[0]
        return ("fold", d, dims[d] / s, "unknown")
    return "ambiguous" if folded else None


def hint_of(v: Any, s: Any) -> Any:
    """The batch hint of one (fake) value for batch symbol ``s``."""
    if s is None:
        return None
    if isinstance(v, torch.Tensor):
        return _tensor_hint(v, s)
    if isinstance(v, torch.SymInt):
        e = _expr(v)
        if e == s:
            return "B"
        return ("fold", None, e / s, "unknown") if s in e.free_symbols else None
    return None


def _reshape_fold_major(src: Any, x: torch.Tensor, out: torch.Tensor, d_out: int) -> bool:
    """Whether reshaping ``x`` (batch hint ``src``) into ``out`` puts the batch
    outermost in ``out``'s dimension ``d_out``."""
    import sympy

    if isinstance(src, tuple) and src[0] == "fold" and src[3] == "major":
        d_in = src[1]
    elif isinstance(src, int):
        d_in = src
    else:
        return False
    ins = [_expr(e) for e in x.shape]
    outs = [_expr(e) for e in out.shape]
    before = sympy.Mul(*outs[:d_out])
    # the merged group may start at any input dim whose prefix product equals `before`
    prefix = sympy.Integer(1)
    for start in range(len(ins)):
        if start == d_in:
            return sympy.simplify(prefix - before) == 0
        prefix = prefix * ins[start]
    return False


def annotate_batch(gm: fx.GraphModule, s: Any) -> None:
    """Write ``meta["fxdp_batch"]`` on every node (see the module docstring)."""
    for n in gm.graph.nodes:
        flat, _ = tree_flatten(n.meta.get("val"))
        hints = [hint_of(v, s) for v in flat]
        for k, (h, v) in enumerate(zip(hints, flat)):
            if not (isinstance(h, tuple) and h[0] == "fold" and isinstance(v, torch.Tensor)):
                continue
            if _fold_major(n, v, h):
                hints[k] = (h[0], h[1], h[2], "major")
        n.meta["fxdp_batch"] = hints


def _fold_major(n: fx.Node, v: torch.Tensor, h: tuple) -> bool:
    args = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    if n.op != "call_function" or not args:
        return False
    if n.target in _RESHAPES:
        x = n.args[0]
        src = (x.meta.get("fxdp_batch") or [None])[0]
        return _reshape_fold_major(src, x.meta["val"], v, h[1])
    if not _row_preserving(n):
        return False
    # rows of the output are rows of the input with the same batch-major fold
    for a in args:
        ah = (a.meta.get("fxdp_batch") or [None])[0]
        if isinstance(ah, tuple) and ah[0] == "fold" and ah[3] == "major" and ah[1] == h[1] and ah[2] == h[2]:
            return True
    return False


#: non-pointwise ops whose output row r is computed from input row r alone
_ROW_OPS = {
    aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.embedding.default,
    aten.layer_norm.default, aten.rms_norm.default, aten.dropout.default, aten.clone.default,
    aten.contiguous.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.softmax.int,
    aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default, aten.gelu.default, aten.silu.default,
    aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.alias.default,
}


def _row_preserving(n: fx.Node) -> bool:
    """Whether output rows (dim 0) are the matching input rows' results: pointwise
    ops and a short list; reductions along the last dims (softmax) only."""
    t = n.target
    if t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return isinstance(dim, int) and dim != 0
    return t in _ROW_OPS or torch.Tag.pointwise in getattr(t, "tags", ())


# --------------------------------------------------------------------------- mixing
#: ops that combine the entries of a dimension: along the batch they mix samples
_ALONG_DIM = {
    aten.cumsum.default: 1, aten.cumprod.default: 1, aten.softmax.int: 1, aten._softmax.default: 1,
    aten.log_softmax.int: 1, aten._log_softmax.default: 1, aten.sort.default: 1, aten.argsort.default: 1,
    aten.index_select.default: 1, aten.gather.default: 1, aten.cat.default: 1, aten.roll.default: 2,
    aten.flip.default: 1,
}


def _data_dependent(gm: fx.GraphModule) -> dict:
    """Nodes whose value depends on the inputs' data (shape arithmetic excluded)."""
    dep: dict = {}
    for n in gm.graph.nodes:
        args = [a for a in n.all_input_nodes if not is_shape_value(a)]
        dep[n] = not is_shape_value(n) and (n.op == "placeholder" or any(dep[a] for a in args))
    return dep


def _dims_arg(n: fx.Node, pos: int) -> list:
    v = n.args[pos] if len(n.args) > pos else n.kwargs.get("dim", n.kwargs.get("dims", 0 if pos == 1 else None))
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def mixing_findings(gm: fx.GraphModule) -> list:
    """``[(node, code, problem)]`` for ops through which one sample's value can depend on
    another's: a value computed from batch data that lost the batch dimension (a
    reduction over the batch, a loss averaged inside ``forward``) and is used
    again or returned, and ops along the batch dimension (``cumsum``, ``flip``,
    ``roll``, ``sort``, ``cat``, ``gather``/``index_select``, a slice of the batch,
    softmax over the batch). Needs :func:`annotate_batch` first."""
    dep = _data_dependent(gm)
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        ins = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        lost = [a for a in ins if dep[a] and not any(h is not None for h in a.meta.get("fxdp_batch", [None]))
                and a.op != "placeholder"]
        if lost:
            found.append((lost[0], "batch-reduction", "a value computed from the whole batch is used by the model"))
            continue
        if n.target is aten.batch_norm.default and ins and (len(n.args) <= 5 or n.args[5] is not False):
            found.append((n, "batch-norm", "batch normalization with batch statistics (training=True): each "
                                           "sample's output depends on the others"))
            continue
        pos = _ALONG_DIM.get(n.target)
        if pos is not None and ins:
            bd = (ins[0].meta.get("fxdp_batch") or [None])[0]
            dims = _dims_arg(n, pos)
            rank = ins[0].meta["val"].dim() if n.target is not aten.cat.default else None
            if isinstance(bd, int) and any((d % rank if rank else d) == bd for d in dims if isinstance(d, int)):
                found.append((n, "batch-op", f"{n.target} runs along the batch dimension"))
        if n.target is aten.slice.Tensor and ins:
            bd = (ins[0].meta.get("fxdp_batch") or [None])[0]
            dim = n.args[1] if len(n.args) > 1 else 0
            out = (n.meta.get("fxdp_batch") or [None])[0]
            if isinstance(bd, int) and dim == bd and out != bd:
                found.append((n, "batch-index", "a slice of the batch shifts or drops samples"))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for a in tree_flatten(out_node.args)[0]:
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) and dep.get(a) \
                and not any(h is not None for h in a.meta.get("fxdp_batch", [None])) and a.op != "placeholder" \
                and "fxdp_per_sample_loss" not in a.meta:  # a mean of per-sample losses (passes/per_sample_loss.py)
            found.append((a, "batch-reduction", "the model returns a value reduced over the batch that is not a mean "
                              "of per-sample losses (e.g. a loss divided by the batch's token count, as with "
                              "num_items_in_batch=), so each sample's gradient depends on the others"))
    return found
