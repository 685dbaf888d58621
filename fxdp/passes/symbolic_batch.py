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

import operator
from typing import Any, List, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .aliasing import writes_into
from .batch_findings import batched_inputs, lands_on, op_finding
from .batch_rules import NO_DATA, rule_of

__all__ = ["annotate_batch", "batch_symbol", "hint_of", "is_shape_value"]

aten = torch.ops.aten

#: ops that reshape their first argument (output dims are merged/split input dims)
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.view_as.default, aten.reshape_as.default}


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
    agree = 0
    for k, point in enumerate(((2, 3), (5, 7), (11, 2), (64, 128), (17, 19), (96, 33))):
        values = {x: point[j % 2] + j for j, x in enumerate(syms)}
        try:
            if int(e.subs(values)) != int(s.subs(values)):
                return False
        except ZeroDivisionError:  # a size undefined at this point (a padding's // of a difference)
            continue
        except (TypeError, ValueError):
            return False
        agree += 1
    return agree >= 3


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
        return ("fold", d, _per_sample(dims[d], s), "unknown")
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
        return ("fold", None, _per_sample(e, s), "unknown") if s in e.free_symbols else None
    return None


def _per_sample(e: Any, s: Any) -> Any:
    """A folded size's rows per sample, ``e / s``, in one form for equal sizes: sympy cancels
    ``s*(T + 4) / s`` but not ``(s*T + 4*s) / s`` (a flattened ``cat`` of two batched tensors)."""
    q = e / s
    if s in q.free_symbols:
        import sympy

        try:
            q = sympy.cancel(q)
        except Exception:  # an expression cancel cannot read (floor division): kept as it is
            pass
    return q


#: layout of a fold whose rows hold no sample's data (a batch-free value repeated over the
#: batch, as DeBERTa's position keys): it lines up with any layout
FREE = "free"


def _integral(e: Any, at: dict) -> bool:
    """Whether a size ratio is a whole number at the sizes the graph was captured with
    (``at``: each size symbol's example value, the batch's cancels): ``T*d / d`` is,
    ``d / (T*d)`` is not. Symbolic algebra alone cannot tell: sizes carry the capture's
    guards (``(H // 4) * 4 == H`` for a window partition of a padded image)."""
    import sympy

    try:
        v = sympy.simplify(e.subs(at))
        return bool(v.is_integer) and int(v) >= 1
    except (TypeError, ValueError):
        return False


def _reshape_layout(src: Any, layout: Any, x: torch.Tensor, out: torch.Tensor, d_out: int, at: dict) -> Any:
    """Where a reshape puts the batch: ``(outer, inner)`` of output dimension ``d_out``
    (the product of the merged sizes before and after the batch in it; ``(1, 1)``: the
    dimension is the batch), ``"mixed"`` when the batch's rows do not land in one
    dimension as whole blocks (a ``[T, B, d]`` tensor viewed as ``[B, T, d]``), ``None``
    when the input's layout is unknown. Row-major order: the elements before the
    batch's block are ``prod(sizes before its dim) * outer``, those after it
    ``inner * prod(sizes after its dim)``, in the input and in the output."""
    import sympy

    if isinstance(src, tuple) and src[0] == "fold" and layout == FREE:
        return FREE
    if isinstance(src, int):
        d_in, (outer, inner) = src, (sympy.Integer(1), sympy.Integer(1))
    elif isinstance(src, tuple) and src[0] == "fold" and layout is not None:
        d_in, (outer, inner) = src[1], layout
    else:
        return None
    ins = [_expr(e) for e in x.shape]
    outs = [_expr(e) for e in out.shape]
    before = sympy.Mul(*ins[:d_in]) * outer / sympy.Mul(*outs[:d_out])
    after = inner * sympy.Mul(*ins[d_in + 1:]) / sympy.Mul(*outs[d_out + 1:])
    if not (_integral(before, at) and _integral(after, at)):
        return "mixed"
    return sympy.Integer(int(before.subs(at))), sympy.Integer(int(after.subs(at)))


def annotate_batch(gm: fx.GraphModule, s: Any) -> None:
    """Write ``meta["fxdp_batch"]`` on every node (see the module docstring), and
    ``meta["fxdp_layout"]``: per value, where the batch sits in its batch or folded
    dimension (``(outer, inner)``, see :func:`_reshape_layout`; ``None``: unknown or no
    batch). A reshape that scatters samples' rows, or an op that combines values whose
    batches are laid out differently, sets ``meta["fxdp_batch_mixed"]`` (a finding of
    :func:`mixing_findings`)."""
    import sympy

    one = (sympy.Integer(1), sympy.Integer(1))
    at = _example_sizes(gm)
    for n in gm.graph.nodes:
        n.meta.pop("fxdp_batch_mixed", None)
        flat, _ = tree_flatten(n.meta.get("val"))
        hints = [hint_of(v, s) for v in flat]
        layouts: List[Any] = []
        for h, v in zip(hints, flat):
            lay = one if isinstance(h, int) else None
            if isinstance(h, tuple) and h[0] == "fold" and isinstance(v, torch.Tensor):
                lay = _fold_layout(n, v, h, at)
                if lay == "mixed":
                    lay = None
            layouts.append(lay)
        hints = [(h[0], h[1], h[2], "major") if isinstance(h, tuple) and h[0] == "fold" and lay is not None
                 and (lay != FREE and sympy.simplify(lay[0] - 1) == 0 or lay == FREE and _repeats_major(n, h, s))
                 else h for h, lay in zip(hints, layouts)]
        n.meta["fxdp_batch"] = hints
        n.meta["fxdp_layout"] = layouts
        _check_layouts(n, hints, flat, at)
    _free_rows_follow_their_users(gm)


def _free_rows_follow_their_users(gm: fx.GraphModule) -> None:
    """A fold whose rows hold no sample (a constant expanded to ``B*k`` rows: BERT's token
    types for multiple-choice inputs ``[B*k, T]``, and an embedding of them) has the layout of
    the values its rows are combined with: when every user keeps those rows as rows of a
    batch-major fold, row ``r`` is sample ``r // k``'s, so the fold is batch-major too (a capture
    op on it serves it as ``[B, k, ...]``). Users first: a chain of such values (the same fold, on
    the same dimension) follows the last; an op that moves rows (a flip, a gather) keeps no fold, so
    the chain stops there."""
    for n in reversed(list(gm.graph.nodes)):
        hints, lays = n.meta.get("fxdp_batch") or [], n.meta.get("fxdp_layout") or []
        if len(hints) != 1 or lays[:1] != [FREE] or not isinstance(hints[0], tuple) or hints[0][0] != "fold" \
                or hints[0][3] == "major" or not n.users:
            continue
        h = hints[0]
        if all(any(isinstance(x, tuple) and x[0] == "fold" and x[1] == h[1] and x[2] == h[2] and x[3] == "major"
                   for x in u.meta.get("fxdp_batch") or []) for u in n.users):
            n.meta["fxdp_batch"] = [(h[0], h[1], h[2], "major")]


def _repeats_major(n: fx.Node, h: tuple, s: Any) -> bool:
    """Whether ``n`` repeats a batch-free value ``B`` times along dimension 0 and nowhere
    else (``w.repeat(B, 1, 1)``: DeBERTa's position keys): copy ``b`` is the rows ``b*k ..
    (b+1)*k``, so row ``r`` is sample ``r // k``'s, whatever pairs it with batch data."""
    if n.target is not aten.repeat.default or h[1] != 0 or len(n.args) < 2:
        return False
    reps = list(n.args[1])
    first = reps[0].meta.get("val") if isinstance(reps[0], fx.Node) else reps[0]
    return (isinstance(first, torch.SymInt) and _expr(first) == s
            and all(not isinstance(r, fx.Node) and r == 1 for r in reps[1:]))


def _example_sizes(gm: fx.GraphModule) -> dict:
    """Each size symbol's value in the example the graph was captured with."""
    for n in gm.graph.nodes:
        for v in tree_flatten(n.meta.get("val"))[0]:
            if isinstance(v, torch.Tensor):
                for size in v.shape:
                    if isinstance(size, torch.SymInt):
                        env = size.node.shape_env
                        values = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
                        return {k: int(val) for k, val in values.items()}
    return {}


def _first(a: fx.Node) -> Tuple[Any, Any]:
    return (a.meta.get("fxdp_batch") or [None])[0], (a.meta.get("fxdp_layout") or [None])[0]


def _repeated_rows_layout(n: fx.Node, h: tuple) -> Any:
    """``x.repeat_interleave(k, dim)`` along the batch's dimension: row ``r`` becomes rows
    ``r*k .. r*k + k - 1``, so each sample's rows stay one block, ``k`` times longer (a MoE
    layer's tokens repeated once per chosen expert): layout ``(outer, inner * k)``."""
    import sympy

    x, reps = n.args[0], n.args[1]
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    if not isinstance(x, fx.Node) or not isinstance(reps, int) or dim is None:
        return None
    src, layout = _first(x)
    if dim % x.meta["val"].dim() != h[1]:
        return None
    if isinstance(src, int) and src == h[1]:
        return sympy.Integer(1), sympy.Integer(reps)
    if isinstance(src, tuple) and src[0] == "fold" and src[1] == h[1] and layout is not None:
        return FREE if layout == FREE else (layout[0], layout[1] * reps)
    return None


def _fold_layout(n: fx.Node, v: torch.Tensor, h: tuple, at: dict) -> Any:
    """The layout of a folded output value (``None``: unknown; ``"mixed"``)."""
    args = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    if n.op != "call_function":
        return None
    if n.target is operator.getitem:  # one output of a multi-output op (unbind, split): its layout
        src, i = n.args[0], n.args[1]
        hs, lays = src.meta.get("fxdp_batch") or [], src.meta.get("fxdp_layout") or []
        if isinstance(i, int) and -len(lays) <= i < len(lays) and isinstance(hs[i], tuple) and hs[i][:3] == h[:3]:
            return lays[i]
        return None
    held = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), (list, tuple))
            and any(isinstance(x, torch.Tensor) for x in a.meta["val"])]
    if all(_first(a)[0] is None for a in args) \
            and not any(hh is not None for a in held for hh in a.meta.get("fxdp_batch") or []):
        return FREE  # no input holds the batch: made or repeated over it
    if n.target is aten.repeat_interleave.self_int:
        return _repeated_rows_layout(n, h)
    if n.target in _RESHAPES:
        x = n.args[0]
        src, layout = _first(x)
        lay = _reshape_layout(src, layout, x.meta["val"], v, h[1], at)
        if lay == "mixed":
            n.meta["fxdp_batch_mixed"] = "reshape"
        return lay
    if n.target in _TRANSPOSES:
        src, layout = _first(n.args[0])
        # a permutation moves whole dimensions: the batch's dimension keeps its layout
        return layout if isinstance(src, tuple) and src[0] == "fold" and src[2] == h[2] else None
    if not _keeps_fold(n, h[1]):
        return None
    # rows of the output are the rows of inputs folded the same way
    found = [_first(a) for a in args if _first(a)[0] is not None]
    lays = [lay for ah, lay in found if isinstance(ah, tuple) and ah[0] == "fold" and ah[2] == h[2]]
    if not lays or len(lays) != len(found) or any(lay is None for lay in lays):
        return None
    known = [lay for lay in lays if lay != FREE]
    if not known:
        return FREE
    return known[0] if all(_same(lay, known[0]) for lay in known) else None


def _keeps_fold(n: fx.Node, d_out: int) -> bool:
    """Whether ``n`` keeps its inputs' folded dimension whole, in order: every batched
    input lands on output dimension ``d_out`` by its batch rule (a rule maps a
    dimension only when output slice i along it is input slice i's result)."""
    if n.target is operator.getitem:  # one output of a multi-output op: as that op decided
        return True
    got = batched_inputs(n)
    if not got:
        return False
    out = next((v for v in tree_flatten(n.meta.get("val"))[0] if isinstance(v, torch.Tensor)), None)
    return all(lands_on(n, args, name, item, a, d_out, out) == d_out for name, item, a, args in got)


def _same(a: Any, b: Any) -> bool:
    import sympy

    return sympy.simplify(a[0] - b[0]) == 0 and sympy.simplify(a[1] - b[1]) == 0


def _check_layouts(n: fx.Node, hints: List[Any], flat: List[Any], at: dict) -> None:
    """Mark ``n`` when its batch cannot be its inputs' batch laid out consistently: a
    reshape that scatters rows, an exact batch dimension unfolded from a fold of
    unknown layout, or an op whose inputs hold their folded batches in different
    orders (row r of one is another sample than row r of the other)."""
    if n.op != "call_function" or "fxdp_batch_mixed" in n.meta:
        return
    h = hints[0] if hints else None
    if n.target in _RESHAPES and isinstance(h, int) and isinstance(flat[0], torch.Tensor):
        x = n.args[0]
        src, layout = _first(x)
        lay = _reshape_layout(src, layout, x.meta["val"], flat[0], h, at)
        if lay == "mixed" or (lay is not None and lay != FREE and not _same(lay, (1, 1))):
            n.meta["fxdp_batch_mixed"] = "reshape"
        elif lay is None and isinstance(src, tuple):
            n.meta["fxdp_batch_mixed"] = "unfold"
        return
    if n.target in _RESHAPES or n.target in _TRANSPOSES or rule_of(n.target) is None:
        return
    found = [_first(a) for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    folds = [(ah, lay) for ah, lay in found if isinstance(ah, tuple) and ah[0] == "fold" and ah[1] == 0
             and lay != FREE]
    if len(folds) > 1 and all(lay is not None for _, lay in folds) \
            and not all(ah[2] == folds[0][0][2] and _same(lay, folds[0][1]) for ah, lay in folds):
        n.meta["fxdp_batch_mixed"] = "layouts"


#: ops that permute dimensions (each output dimension is one input dimension)
_TRANSPOSES = {aten.transpose.int, aten.permute.default, aten.t.default}

# --------------------------------------------------------------------------- mixing
_MIXED = {
    "reshape": "this reshape moves elements of one sample into rows of others (e.g. a [T, B, d] tensor viewed "
               "as [B, T, d]; use .transpose(0, 1) to move the batch dimension)",
    "unfold": "this reshape unfolds a folded batch whose order is not known (e.g. [T*B, d] viewed as [B, T, d]), "
              "so it cannot be shown that each sample gets its own rows",
    "layouts": "this op combines two tensors that hold their folded batches in different orders (row r of one "
               "is another sample than row r of the other)",
}


def _data_dependent(gm: fx.GraphModule) -> dict:
    """Nodes whose value depends on the inputs' data (shape arithmetic excluded); a value
    data is written into in place (``buf = zeros(...); buf[:] = x``) depends on it."""
    nodes = list(gm.graph.nodes)
    dep: dict = {n: False for n in nodes}
    while True:
        for n in nodes:
            args = [] if n.target in NO_DATA else [a for a in n.all_input_nodes if not is_shape_value(a)]
            dep[n] = dep[n] or (not is_shape_value(n) and (n.op == "placeholder" or any(dep[a] for a in args)))
        written = [n for n in nodes if not dep[n] and n.op == "call_function" and not is_shape_value(n)
                   and any(dep[w] for w in writes_into([n]))]
        if not written:
            return dep
        for n in written:
            dep[n] = True


#: runtime checks: they raise or pass, and give the model no value
_CHECKS = {aten._assert_scalar.default, aten._assert_async.default, aten._assert_async.msg,
           aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}


def _checks_only(gm: fx.GraphModule) -> set:
    """Nodes whose value reaches nothing but runtime checks (BART's ``torch.unique_consecutive``
    of the samples' end-of-sequence counts, asserted to be one value): whatever they combine
    across the batch reaches no output and no gradient."""
    only: set = set()
    for n in reversed(list(gm.graph.nodes)):
        if n.op == "call_function" and n.target not in _CHECKS and n.users \
                and all(u.target in _CHECKS or u in only or u.target is operator.getitem and not u.users
                        for u in n.users):  # (an output of a multi-output op nobody reads)
            only.add(n)
    return only


def mixing_findings(gm: fx.GraphModule) -> list:
    """``[(node, code, problem)]`` for ops through which one sample's value can depend on
    another's: a value computed from batch data that lost the batch dimension (a
    reduction over the batch, a loss averaged inside ``forward``) and is used
    again or returned, batch statistics, a slice of the batch, and every op whose
    batch rule (:mod:`fxdp.passes.batch_rules`) finds samples combined (``cumsum``,
    ``flip``, ``sort``, a contraction over the batch, ``h @ h.T``) or that has
    none. Needs :func:`annotate_batch` first."""
    dep = _data_dependent(gm)
    checks = _checks_only(gm)
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in checks:
            continue
        mixed = n.meta.get("fxdp_batch_mixed")
        if mixed is not None:
            found.append((n, "batch-fold", _MIXED[mixed]))
            continue
        ins = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        lost = [a for a in ins if dep[a] and not any(h is not None for h in a.meta.get("fxdp_batch", [None]))
                and a.op != "placeholder"]
        if lost:
            found.append((lost[0], "batch-reduction", "a value computed from the whole batch is used by the model"))
            continue
        # batch statistics of the data (a weight standardized with F.batch_norm, as NF-ResNet's
        # ScaledStdConv2d does, holds no sample)
        if n.target is aten.batch_norm.default and ins and dep[ins[0]] and (len(n.args) <= 5 or n.args[5] is not False):
            found.append((n, "batch-norm", "batch normalization with batch statistics (training=True): each "
                                           "sample's output depends on the others"))
            continue
        if n.target is aten.slice.Tensor and ins and dep[ins[0]]:  # a constant expanded to the batch holds no sample
            bd = (ins[0].meta.get("fxdp_batch") or [None])[0]
            dim = n.args[1] if len(n.args) > 1 else 0
            out = (n.meta.get("fxdp_batch") or [None])[0]
            if isinstance(bd, int) and dim == bd and out != bd:
                found.append((n, "batch-index", "a slice of the batch shifts or drops samples"))
                continue
        # every other op: its batch rule (fails closed: an op without one is a finding)
        rule = op_finding(n, dep)
        if rule is not None:
            found.append((n, *rule))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for a in tree_flatten(out_node.args)[0]:
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) and dep.get(a) \
                and not any(h is not None for h in a.meta.get("fxdp_batch", [None])) and a.op != "placeholder" \
                and "fxdp_per_sample_loss" not in a.meta:  # a mean of per-sample losses (passes/per_sample_loss.py)
            found.append((a, "batch-reduction", "the model returns a value reduced over the batch that is not a mean "
                              "of per-sample losses (e.g. a loss divided by the batch's token count, as with "
                              "num_items_in_batch=), so each sample's gradient depends on the others"))
    return found
