"""Batch rules: where an ATen op puts each input's batch dimension (``torch.export`` graphs).

An op keeps samples apart when each batched input's batch dimension is one of the
op's *row* dimensions (output slice ``i`` along it is computed from input slice ``i``
alone) and every batched input lands on the output's batch dimension. A rule maps
one batched argument's batch dimension to the output dimension it lands on, or to
``None`` where the op combines entries along it: a contraction (``mm`` over the
batch), a reduction, a scan, a sort, a gather or scatter along it. Rows that land on
another dimension than the output's batch mix samples too: ``h @ h.T`` puts its
left operand's batch on rows and its right operand's on columns, an outer product
over samples.

:func:`~fxdp.passes.batch_findings.op_finding` reads these rules and fails closed: an op
that reads batched data and has no rule here is a finding (fxdp cannot show that it keeps samples apart). Reshapes are
not here: :mod:`fxdp.passes.symbolic_batch` follows the batch through them (the
layouts of folded batches), and reads these rules to follow a folded batch's order
through every other op (a rule maps a dimension only where the order is kept); nor
are ops that read only shapes. Needs ``symbolic_batch.annotate_batch`` first. The
first call's probe (:mod:`fxdp.passes.probe_batch`) runs after this, as a second check.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx as fx

__all__ = ["RULES", "NO_DATA", "SHAPE_ONLY", "BatchedArg", "register_batch_rule", "rule_of"]

aten = torch.ops.aten


@dataclass(frozen=True)
class BatchedArg:
    """One batched tensor argument of an op."""
    node: fx.Node          # the op
    args: Dict[str, Any]   # the op's arguments by schema name (defaults filled in)
    name: str              # the argument that holds the batched tensor
    item: Optional[int]    # its index in a list argument (``cat``'s tensors, ``index``'s indices)
    dim: int               # its batch (or folded batch) dimension
    rank: int
    out_rank: int          # rank of the op's first tensor output
    out_dim: Any           # the output's batch dimension (``None``: none)


Rule = Callable[[BatchedArg], Optional[int]]


def _rank(v: Any) -> int:
    val = v.meta.get("val") if isinstance(v, fx.Node) else v
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _dims(v: Any, rank: int) -> Optional[List[int]]:
    """A dim argument as non-negative ints (``None``: every dimension)."""
    if v is None:
        return None
    v = [v] if isinstance(v, int) else list(v)
    return [d % rank for d in v] if v else None


# --------------------------------------------------------------------------- families
def elementwise(u: BatchedArg) -> Optional[int]:
    """Pointwise with broadcasting: dimensions align from the right."""
    return u.dim + u.out_rank - u.rank


def values_of_self(u: BatchedArg) -> Optional[int]:
    """``type_as(self, other)``, ``to(self, other)``, ``expand_as(self, other)``: the values are
    ``self``'s (elementwise); ``other`` gives only its dtype, device or shape, no values, so its
    batch meets no sample (Funnel's ``attention_mask.type_as(inputs_embeds)``)."""
    return elementwise(u) if u.name == "self" else u.out_dim


def reduction(dim: str = "dim", keepdim: Optional[str] = "keepdim") -> Rule:
    """Reduces over ``dim`` (``None`` or ``[]``: every dimension), dropping it unless
    the ``keepdim`` argument says otherwise."""
    def rule(u: BatchedArg) -> Optional[int]:
        dims = _dims(u.args.get(dim), u.rank)
        if dims is None or u.dim in dims:
            return None
        if keepdim is not None and u.args.get(keepdim):
            return u.dim
        return u.dim - sum(d < u.dim for d in set(dims))
    return rule


def along(dim: str = "dim") -> Rule:
    """Works along ``dim`` (a scan, softmax, sort, flip), keeping the rank."""
    def rule(u: BatchedArg) -> Optional[int]:
        dims = _dims(u.args.get(dim), u.rank)
        return None if dims is None or u.dim in dims else u.dim
    return rule


def _repeat_rows(u: BatchedArg) -> Optional[int]:
    """``repeat_interleave(x, k, dim)``: along another dimension the batch stays; along the
    batch's, each sample's rows are repeated within its own block (a fold ``k`` times longer,
    laid out by ``symbolic_batch``); without ``dim`` it flattens (refused)."""
    return None if u.args.get("dim") is None else u.dim


def leading(trailing: int, arg: str = "input") -> Rule:
    """Works on the last ``trailing`` dimensions of ``arg`` (pools, paddings,
    upsampling, normalizations): the batch must be before them; other arguments
    (weights) must hold no batch."""
    def rule(u: BatchedArg) -> Optional[int]:
        return u.dim if u.name == arg and u.dim < u.rank - trailing else None
    return rule


def samples_first(arg: str = "input") -> Rule:
    """Batched over dimension 0 of ``arg`` only (convolutions, group norms)."""
    def rule(u: BatchedArg) -> Optional[int]:
        return 0 if u.name == arg and u.dim == 0 else None
    return rule


def _normalized(u: BatchedArg) -> Optional[int]:
    k = len(u.args.get("normalized_shape") or ())
    return u.dim if u.name == "input" and u.dim < u.rank - k else None


def _conv(u: BatchedArg) -> Optional[int]:
    w = u.args.get("weight")
    batched_form = isinstance(w, fx.Node) and u.rank == _rank(w)
    return 0 if u.name == "input" and u.dim == 0 and batched_form else None


def _matrix(left: str, right: str, bias: Optional[str] = None) -> Rule:
    """``mm``/``bmm`` and their ``add`` forms: rows of ``left`` and columns of
    ``right`` (and leading dimensions) pass, the contracted dimension mixes."""
    def rule(u: BatchedArg) -> Optional[int]:
        if u.name == bias:
            return elementwise(u)
        if u.name == left:
            return None if u.dim == u.rank - 1 else u.dim
        if u.name == right:
            return None if u.dim == u.rank - 2 else u.dim
        return None
    return rule


def _matmul(u: BatchedArg) -> Optional[int]:
    a, b = _rank(u.args["input"]), _rank(u.args["other"])
    if u.name == "input":
        if a == 1 or u.dim == a - 1:
            return None  # contracted
        if b == 1:
            return u.dim
        return u.out_rank - 2 if u.dim == a - 2 else u.dim + u.out_rank - a
    if b == 1 or u.dim == b - 2:
        return None
    if a == 1:
        return u.dim if u.dim < b - 2 else u.out_rank - 1
    return u.dim + u.out_rank - b


def _first_only(u: BatchedArg) -> Optional[int]:
    """Row by row over the first argument, whose dimensions stay in place (a dimension
    appended or dropped at the end: ``one_hot``, ``view_as_real``); the others (a
    PReLU's per-channel weight, ``bucketize``'s boundaries) hold no batch."""
    return u.dim if u.name == "input" and u.dim < min(u.rank, u.out_rank) else None


def _mv(u: BatchedArg) -> Optional[int]:
    return u.dim if u.name == "input" and u.dim == 0 else None  # the vector is contracted


def _linear(u: BatchedArg) -> Optional[int]:
    return u.dim if u.name == "input" and u.dim != u.rank - 1 else None


def _einsum(u: BatchedArg) -> Optional[int]:
    """The batch's letter must appear in the output (an ellipsis stands for the
    operand's leading dimensions, broadcast from the right)."""
    eq = u.args["equation"].replace(" ", "")
    if "->" not in eq:
        return None  # implicit output: not read
    ins, out = eq.split("->")
    terms = ins.split(",")
    if u.item is None or u.item >= len(terms):
        return None
    head, _, tail = terms[u.item].partition("...")
    n_ell = u.rank - len(head) - len(tail) if "..." in terms[u.item] else 0
    if n_ell < 0 or ("..." not in terms[u.item] and len(head) != u.rank):
        return None
    if u.dim < len(head):
        return _letter_dim(out, head[u.dim], u.out_rank)
    if u.dim >= len(head) + n_ell:
        return _letter_dim(out, tail[u.dim - len(head) - n_ell], u.out_rank)
    if "..." not in out:
        return None  # an ellipsis dimension summed over
    o_head, _, o_tail = out.partition("...")
    out_ell = u.out_rank - len(o_head) - len(o_tail)
    return len(o_head) + out_ell - n_ell + (u.dim - len(head))  # aligned from the right


def _letter_dim(out: str, letter: str, out_rank: int) -> Optional[int]:
    """A letter's dimension in the output (``None``: summed over)."""
    o_head, ell, o_tail = out.partition("...")
    if letter in o_head:
        return o_head.index(letter)
    if ell and letter in o_tail:
        return out_rank - len(o_tail) + o_tail.index(letter)
    return None


def _attention(u: BatchedArg) -> Optional[int]:
    """``softmax(q kᵀ + mask) v``: query rows pass; the keys' dimension mixes."""
    if u.name == "query":
        return None if u.dim == u.rank - 1 else u.dim + u.out_rank - u.rank
    if u.name in ("key", "value"):
        return None if u.dim >= u.rank - 2 else u.dim + u.out_rank - u.rank
    if u.name == "attn_mask":
        return None if u.dim == u.rank - 1 else u.dim + u.out_rank - u.rank
    return None


def _embedding(u: BatchedArg) -> Optional[int]:
    return u.dim if u.name in ("indices", "offsets", "per_sample_weights") else None


def _gather(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % max(u.rank, 1)
    if u.name == "index":
        return u.dim
    return None if u.dim == d else u.dim


def _scatter(src: str) -> Rule:
    """``scatter``/``index_add`` family: rows along ``dim`` are moved by index."""
    def rule(u: BatchedArg) -> Optional[int]:
        d = u.args["dim"] % max(u.rank, 1)
        if u.name in ("input", src) or (u.name == "index" and u.rank > 1):
            return None if u.dim == d else u.dim
        return None  # a batched 1-d index: rows sent to other samples' rows
    return rule


def _index_select(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % max(_rank(u.args["input"]), 1)
    if u.name == "index":
        return d  # rows of a batch-free table looked up per sample
    return None if u.dim == d else u.dim


def _batch_arange(n: Any) -> bool:
    """Whether ``n`` is ``arange(B)`` (through unsqueezes, casts, broadcasts): indexing
    the batch with it keeps each sample's row in place."""
    while isinstance(n, fx.Node) and n.op == "call_function" and (n.target in _ARANGE_VIEWS or _whole_slice(n)):
        n = n.args[0]
    if not (isinstance(n, fx.Node) and n.target in (aten.arange.default, aten.arange.start,
                                                     aten.arange.start_step)):
        return False
    start = n.args[0] if n.target is not aten.arange.default and len(n.args) > 1 else 0
    step = n.args[2] if n.target is aten.arange.start_step and len(n.args) > 2 else 1
    return start == 0 and step == 1 and (n.meta.get("fxdp_batch") or [None])[0] == 0


def _whole_slice(n: fx.Node) -> bool:
    """``x[:]`` along some dimension (``slice(x, d, 0, 2**63 - 1)``)."""
    if n.target is not aten.slice.Tensor:
        return False
    start, end, step = (list(n.args[2:5]) + [None, None, None])[:3]
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2 ** 62)) and step in (None, 1)


_ARANGE_VIEWS = {aten.unsqueeze.default, aten.expand.default, aten._to_copy.default, aten.to.dtype,
                 aten.to.device, aten.to.dtype_layout, aten.clone.default}


class _Indexing:
    """The shape algebra of advanced indexing ``x[i0, i1, ...]``: the index tensors
    broadcast to one shape of rank ``m``; its dimensions replace the indexed ones in
    place when those are adjacent, and come first otherwise."""

    def __init__(self, u: BatchedArg) -> None:
        self.x_rank = _rank(u.args["input"])
        self.indices = list(u.args["indices"]) + [None] * (self.x_rank - len(u.args["indices"]))
        self.where = [k for k, t in enumerate(self.indices) if t is not None]
        self.m = max(_rank(self.indices[k]) for k in self.where)
        self.adjacent = self.where == list(range(self.where[0], self.where[-1] + 1))
        self.first = self.where[0] if self.adjacent else 0
        self.masks = any(_is_mask(self.indices[k]) for k in self.where)

    def result_dim(self, x_dim: int) -> int:
        """Where an unindexed dimension of ``x`` lands in ``x[indices]``."""
        if self.adjacent:
            return x_dim if x_dim < self.first else x_dim - len(self.where) + self.m
        return self.m + sum(1 for k in range(x_dim) if self.indices[k] is None)

    def x_dim(self, result_dim: int) -> Optional[int]:
        """The unindexed dimension of ``x`` at a dimension of ``x[indices]`` (``None``:
        an index dimension)."""
        free = [k for k in range(self.x_rank) if self.indices[k] is None]
        return next((k for k in free if self.result_dim(k) == result_dim), None)

    def arange_dim(self, x_dim: int) -> Optional[int]:
        """The index dimension (of ``m``) holding the samples when ``x``'s batch
        dimension is indexed by ``arange(B)``; ``None`` otherwise."""
        t = self.indices[x_dim]
        h = (t.meta.get("fxdp_batch") or [None])[0] if isinstance(t, fx.Node) else None
        return h + self.m - _rank(t) if isinstance(h, int) and _batch_arange(t) else None


def _is_mask(t: Any) -> bool:
    v = t.meta.get("val") if isinstance(t, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype in (torch.bool, torch.uint8)


def _index(u: BatchedArg) -> Optional[int]:
    """``x[indices]``: the batch passes on a dimension no tensor indexes, through an
    index that is ``arange(B)`` on it, or from a batched index (per-sample positions)."""
    ix = _Indexing(u)
    if ix.masks:
        return None  # a mask selects a data-dependent number of rows
    if u.name == "input":
        if ix.indices[u.dim] is None:
            return ix.result_dim(u.dim)
        q = ix.arange_dim(u.dim)
        return None if q is None else ix.first + q
    if u.name == "indices":
        return ix.first + u.dim + ix.m - u.rank
    return None


def _index_put(u: BatchedArg) -> Optional[int]:
    """``x[indices] = values`` (a result shaped as ``x``): ``x``'s batch stays where an
    index leaves it (unindexed, or ``arange(B)``); a written value's batch must land on
    an unindexed dimension of ``x`` or on the index dimension of ``arange(B)``. Batched
    indices (writes at per-sample positions) are refused, except one boolean mask written with
    a value that has no row per selected position: ``x[mask] = v`` is ``where(mask, v, x)``
    (wav2vec2's SpecAugment, ``hidden[mask_time_indices] = masked_spec_embed``)."""
    ix = _Indexing(u)
    if ix.masks:
        return _masked_write(u, ix)
    if u.name == "indices":
        return None
    if u.name == "input":
        return u.dim if ix.indices[u.dim] is None or ix.arange_dim(u.dim) is not None else None
    r = u.dim + (ix.x_rank - len(ix.where) + ix.m) - u.rank  # its dimension in x[indices]
    d = ix.x_dim(r)
    if d is not None:
        return d
    q = r - ix.first
    return next((k for k in ix.where if ix.arange_dim(k) == q), None)


def _masked_write(u: BatchedArg, ix: _Indexing) -> Optional[int]:
    """``x[mask] = v`` with one mask over dimensions ``k .. k+m-1`` of ``x`` (its shape, as
    ATen requires): elementwise where ``v`` broadcasts over the selected positions (no
    dimension of their count, which the batch's masks share: row ``j`` of a ``[N, ...]`` value
    goes to the batch's ``j``-th selected position, wherever that sample falls)."""
    v = u.args.get("values")
    trailing = ix.x_rank - ix.where[0] - ix.m
    shape = v.meta["val"].shape if isinstance(v, fx.Node) and isinstance(v.meta.get("val"), torch.Tensor) else ()
    if len(ix.where) != 1 or u.name == "values" or len(shape) > trailing + 1 \
            or (len(shape) == trailing + 1 and not (type(shape[0]) is int and shape[0] == 1)):
        return None
    return u.dim if u.name == "input" else ix.where[0] + u.dim


def _cat(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % max(u.rank, 1)
    return None if u.dim == d else u.dim


def _stack(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % (u.rank + 1)
    return u.dim + (d <= u.dim)


def _slice(u: BatchedArg) -> Optional[int]:
    """Along the batch (or a folded batch) only the whole of it: its size unchanged."""
    d = u.args["dim"] % max(u.rank, 1)
    if u.dim != d:
        return u.dim
    size_in = u.args["input"].meta["val"].shape[d]
    size_out = u.node.meta["val"].shape[d]
    return u.dim if _size_expr(size_in) == _size_expr(size_out) else None


def _size_expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _select(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % max(u.rank, 1)
    return None if u.dim == d else u.dim - (d < u.dim)


def _split(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % max(u.rank, 1)
    return None if u.dim == d else u.dim


def _transpose(u: BatchedArg) -> Optional[int]:
    a, b = u.args["dim0"] % u.rank, u.args["dim1"] % u.rank
    return b if u.dim == a else a if u.dim == b else u.dim


def _permute(u: BatchedArg) -> Optional[int]:
    return [d % u.rank for d in u.args["dims"]].index(u.dim)


def _t(u: BatchedArg) -> Optional[int]:
    return u.rank - 1 - u.dim


def _unsqueeze(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % (u.rank + 1)
    return u.dim + (d <= u.dim)


def _squeeze(u: BatchedArg) -> Optional[int]:
    shape = u.args["input"].meta["val"].shape
    dims = _dims(u.args.get("dim"), u.rank)
    dims = [d for d in (range(u.rank) if dims is None else dims) if isinstance(shape[d], int) and shape[d] == 1]
    return None if u.dim in dims else u.dim - sum(d < u.dim for d in dims)


def _repeat(u: BatchedArg) -> Optional[int]:
    reps = list(u.args["repeats"])
    d = u.dim + len(reps) - u.rank
    return d if isinstance(reps[d], int) and reps[d] == 1 else None


def _unfold(u: BatchedArg) -> Optional[int]:
    return None if u.dim == u.args["dimension"] % max(u.rank, 1) else u.dim


def _diagonal(u: BatchedArg) -> Optional[int]:
    pair = {u.args["dim1"] % u.rank, u.args["dim2"] % u.rank}
    return None if u.dim in pair else u.dim - sum(d < u.dim for d in pair)


def _unflatten(u: BatchedArg) -> Optional[int]:
    d = u.args["dim"] % u.rank
    return None if u.dim == d else u.dim + (len(u.args["sizes"]) - 1 if d < u.dim else 0)


def _renorm(u: BatchedArg) -> Optional[int]:
    """Each slice along ``dim`` renormalized over the other dimensions."""
    return u.dim if u.dim == u.args["dim"] % u.rank else None


def _loss(classes: bool) -> Rule:
    """An unreduced loss is per row (its class dimension, 1, mixes nothing but is not
    the batch); a reduced one sums over samples."""
    def rule(u: BatchedArg) -> Optional[int]:
        if u.args.get("reduction", 1) != 0 or u.name not in ("input", "target"):
            return None
        if classes and u.name == "input":
            return 0 if u.dim == 0 else None
        return elementwise(u)
    return rule


def _cosine_similarity(u: BatchedArg) -> Optional[int]:
    d = u.dim + u.out_rank + 1 - u.rank  # in the broadcast shape, one longer than the output
    red = u.args["dim"] % (u.out_rank + 1)
    return None if d == red else d - (red < d)


# --------------------------------------------------------------------------- the table
#: elementwise ops without ATen's ``pointwise`` tag
_ELEMENTWISE = [
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor, aten.dropout.default,
    aten.native_dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default, aten.dropout_.default, aten.feature_dropout_.default, aten.alpha_dropout_.default,
    aten.feature_alpha_dropout_.default, aten.bernoulli.p, aten.bernoulli.default, aten.bernoulli_.float,
    aten.normal.Tensor_Tensor, aten.normal.Tensor_float, aten.normal.float_Tensor,
    aten.uniform_.default, aten.normal_.default, aten.exponential_.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten._to_copy.default, aten.to.dtype,
    aten.to.device, aten.to.dtype_layout, aten.lift_fresh_copy.default,
    aten.copy_.default, aten.copy.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default,
    aten.expand.default, aten.broadcast_to.default, aten.log_sigmoid_forward.default,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor, aten.__and__.Scalar, aten.__or__.Scalar,
    aten.__xor__.Scalar, aten.__lshift__.Scalar, aten.__rshift__.Scalar, aten.rand_like.default,
    aten.randn_like.default, aten.randint_like.default, aten.dequantize.self, aten.relu6.default,
    aten.hardtanh_.default, aten.hardswish_.default, aten.hardsigmoid_.default, aten.silu_.default,
    aten.relu_.default, aten.gelu_.default, aten.leaky_relu_.default, aten.elu_.default, aten.mish_.default,
    aten.sigmoid_.default, aten.tanh_.default, aten.clamp_.default, aten.clamp_min_.default,
    aten.clamp_max_.default, aten.hardtanh.default, aten.nan_to_num.default, aten.polar.default,
    aten.complex.default, aten.hardswish.default, aten.rsub.Tensor, aten.rsub.Scalar,
    aten.floor_divide.default, aten.floor_divide.Scalar, aten.true_divide.Tensor, aten.true_divide.Scalar,
    aten.rrelu_with_noise.default, aten.rrelu.default, aten.real.default,
    aten.imag.default, aten.conj.default, aten.resolve_conj.default, aten.resolve_neg.default,
]

RULES: Dict[Any, Rule] = {op: elementwise for op in _ELEMENTWISE}
RULES.update({aten.type_as.default: values_of_self, aten.to.other: values_of_self,
              aten.expand_as.default: values_of_self})
RULES.update({
    # reductions
    aten.sum.dim_IntList: reduction(), aten.mean.dim: reduction(), aten.amax.default: reduction(),
    aten.amin.default: reduction(), aten.logsumexp.default: reduction(), aten.nansum.default: reduction(),
    aten.nanmean.default: reduction(), aten.linalg_vector_norm.default: reduction(),
    aten.norm.ScalarOpt_dim: reduction(), aten.var.correction: reduction(), aten.std.correction: reduction(),
    aten.var_mean.correction: reduction(), aten.std_mean.correction: reduction(), aten.var.dim: reduction(),
    aten.std.dim: reduction(), aten.max.dim: reduction(), aten.min.dim: reduction(), aten.argmax.default: reduction(),
    aten.argmin.default: reduction(), aten.any.dim: reduction(), aten.all.dim: reduction(), aten.any.dims: reduction(),
    aten.prod.dim_int: reduction(), aten.median.dim: reduction(), aten.nanmedian.dim: reduction(),
    aten.mode.default: reduction(), aten.kthvalue.default: reduction(), aten.count_nonzero.dim_IntList: reduction(keepdim=None),
    aten.aminmax.default: reduction(),
    # along one dimension, rank kept
    aten.softmax.int: along(), aten._softmax.default: along(), aten.log_softmax.int: along(),
    aten._log_softmax.default: along(), aten.cumsum.default: along(), aten.cumprod.default: along(),
    aten.cummax.default: along(), aten.cummin.default: along(), aten.logcumsumexp.default: along(),
    aten.sort.default: along(), aten.sort.stable: along(), aten.argsort.default: along(),
    aten.argsort.stable: along(), aten.topk.default: along(), aten.glu.default: along(),
    aten.flip.default: along("dims"), aten.roll.default: along("dims"), aten.rot90.default: along("dims"),
    aten.repeat_interleave.self_int: _repeat_rows, aten.repeat_interleave.self_Tensor: along(),
    aten.cosine_similarity.default: _cosine_similarity,
    # contractions
    aten.mm.default: _matrix("input", "mat2"), aten.bmm.default: _matrix("input", "mat2"),
    aten.addmm.default: _matrix("mat1", "mat2", bias="input"),
    aten.baddbmm.default: _matrix("batch1", "batch2", bias="input"),
    aten.mv.default: _mv, aten.matmul.default: _matmul, aten.linear.default: _linear,
    aten.einsum.default: _einsum,
    aten.scaled_dot_product_attention.default: _attention,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _attention,
    aten._scaled_dot_product_efficient_attention.default: _attention,
    aten._scaled_dot_product_flash_attention.default: _attention,
    # layers over samples
    aten.convolution.default: _conv, aten._convolution.default: _conv, aten.conv1d.default: _conv,
    aten.conv2d.default: _conv, aten.conv3d.default: _conv, aten.conv1d.padding: _conv,
    aten.conv2d.padding: _conv, aten.conv3d.padding: _conv, aten.conv_transpose1d.default: _conv,
    aten.conv_transpose2d.input: _conv, aten.conv_transpose3d.input: _conv,
    aten.layer_norm.default: _normalized, aten.native_layer_norm.default: _normalized,
    aten.rms_norm.default: _normalized, aten._fused_rms_norm.default: _normalized,
    aten.group_norm.default: samples_first(), aten.native_group_norm.default: samples_first(),
    aten.instance_norm.default: samples_first(),
    aten.embedding.default: _embedding, aten.embedding_bag.default: _embedding,
    aten.embedding_bag.padding_idx: _embedding, aten._embedding_bag.default: _embedding,
    aten.im2col.default: samples_first(), aten.col2im.default: samples_first(),
    aten.pixel_shuffle.default: leading(3), aten.pixel_unshuffle.default: leading(3),
    aten.channel_shuffle.default: samples_first(), aten.native_channel_shuffle.default: samples_first(),
    aten.tril.default: leading(2), aten.triu.default: leading(2),
    # losses (reduction=none: one loss per row)
    aten.cross_entropy_loss.default: _loss(True), aten.nll_loss.default: _loss(True),
    aten.nll_loss_nd.default: _loss(True), aten.nll_loss_forward.default: _loss(True),
    aten.nll_loss2d_forward.default: _loss(True), aten.mse_loss.default: _loss(False),
    aten.l1_loss.default: _loss(False), aten.smooth_l1_loss.default: _loss(False), aten.huber_loss.default: _loss(False),
    aten.binary_cross_entropy.default: _loss(False), aten.binary_cross_entropy_with_logits.default: _loss(False),
    aten.kl_div.default: _loss(False), aten.soft_margin_loss.default: _loss(False),
    # indexing, joining, moving dimensions
    aten.index.Tensor: _index, aten._unsafe_index.Tensor: _index, aten.index_put.default: _index_put,
    aten.index_put_.default: _index_put, aten._unsafe_index_put.default: _index_put,
    aten.index_select.default: _index_select, aten.gather.default: _gather,
    aten.scatter.src: _scatter("src"), aten.scatter.value: _scatter("src"), aten.scatter_add.default: _scatter("src"),
    aten.scatter_reduce.two: _scatter("src"), aten.scatter_.src: _scatter("src"), aten.scatter_.value: _scatter("src"),
    aten.scatter_add_.default: _scatter("src"), aten.index_add.default: _scatter("source"),
    aten.index_add_.default: _scatter("source"), aten.index_copy.default: _scatter("source"),
    aten.index_copy_.default: _scatter("source"), aten.index_fill.int_Scalar: _scatter("source"),
    aten.index_fill.int_Tensor: _scatter("source"),
    aten.cat.default: _cat, aten.stack.default: _stack, aten.slice.Tensor: _slice, aten.narrow.default: _split,
    aten.select.int: _select, aten.unbind.int: _select, aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split, aten.chunk.default: _split, aten.unsafe_split.Tensor: _split,
    aten.tensor_split.sections: _split, aten.tensor_split.indices: _split,
    aten.transpose.int: _transpose, aten.permute.default: _permute, aten.t.default: _t,
    aten.numpy_T.default: _t, aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze, aten.squeeze.default: _squeeze, aten.repeat.default: _repeat,
    aten.unfold.default: _unfold, aten.renorm.default: _renorm, aten.one_hot.default: _first_only,
    aten.bucketize.Tensor: _first_only, aten.prelu.default: _first_only, aten._prelu_kernel.default: _first_only,
    aten.view_as_real.default: _first_only, aten.view_as_complex.default: _first_only, aten.diagonal.default: _diagonal, aten.unflatten.int: _unflatten,
})
for _k, _ops in {1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
                     "upsample_nearest1d", "upsample_linear1d", "_upsample_nearest_exact1d", "reflection_pad1d",
                     "replication_pad1d"),
                 2: ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                     "_adaptive_avg_pool2d", "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
                     "upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
                     "_upsample_nearest_exact2d", "reflection_pad2d", "replication_pad2d"),
                 3: ("max_pool3d", "max_pool3d_with_indices", "avg_pool3d", "adaptive_avg_pool3d",
                     "adaptive_max_pool3d", "upsample_nearest3d", "upsample_trilinear3d", "_upsample_nearest_exact3d",
                     "reflection_pad3d", "replication_pad3d")}.items():
    for _name in _ops:
        _packet = getattr(aten, _name, None)
        for _ov in (_packet.overloads() if _packet is not None else ()):
            RULES[getattr(_packet, _ov)] = leading(_k)


def _pad(u: BatchedArg) -> Optional[int]:
    """Pads ``(before, after)`` pairs from the last dimension back; a pair of literal
    zeros leaves its dimension alone (MobileBERT pads ``[0, 0, 0, 1, 0, 0]``)."""
    pad = list(u.args["pad"])
    k = u.rank - 1 - u.dim  # the batch dimension's pair
    if 2 * k + 1 >= len(pad) or all(isinstance(p, int) and p == 0 for p in pad[2 * k:2 * k + 2]):
        return u.dim if u.name == "input" else None
    return None


# Fourier transforms along ``dim`` (1-d) or ``dim`` (a list; ``None``: every dimension, n-d)
for _name in ("fft_fft", "fft_ifft", "fft_rfft", "fft_irfft", "fft_hfft", "fft_ihfft", "fft_fft2", "fft_ifft2",
              "fft_rfft2", "fft_irfft2", "fft_fftn", "fft_ifftn", "fft_rfftn", "fft_irfftn", "_fft_r2c", "_fft_c2c",
              "_fft_c2r"):
    _packet = getattr(aten, _name, None)
    if _packet is not None and "default" in _packet.overloads():
        RULES[_packet.default] = along()

RULES.update({aten.pad.default: _pad, aten.constant_pad_nd.default: _pad, aten._pad_circular.default: _pad})


def _overloads(name: str) -> List[Any]:
    packet = getattr(aten, name, None)
    return [getattr(packet, ov) for ov in packet.overloads()] if packet is not None else []


def trailing(k: int) -> Rule:
    """Works on the last ``k`` dimensions of every argument (a matrix function over
    ``[*, n, n]``, ``linalg_vander`` over ``[*, n]``): the batch must be among the
    leading dimensions, which the result keeps in place."""
    def rule(u: BatchedArg) -> Optional[int]:
        return u.dim if u.dim < u.rank - k else None
    return rule


def _grid_sampler(u: BatchedArg) -> Optional[int]:
    """``input [N, C, *]`` sampled at ``grid [N, *, d]``: sample ``n`` reads its own image."""
    return 0 if u.name in ("input", "grid") and u.dim == 0 else None


def _cross(u: BatchedArg) -> Optional[int]:
    """``linalg_cross``: broadcast like a pointwise op, combined along ``dim``."""
    d = elementwise(u)
    return None if d == u.args.get("dim", -1) % u.out_rank else d


def _solve(u: BatchedArg) -> Optional[int]:
    """``linalg_solve(A [*, n, n], B [*, n, k] or [*, n])``: one system per leading index,
    and ``B``'s ``k`` right-hand sides solved apart; the result has ``B``'s shape, its
    leading dimensions broadcast from both."""
    a_rank = _rank(u.args.get("A"))
    vector = u.out_rank == a_rank - 1
    if u.name == "B" and not vector:  # its right-hand sides, columns (left) or rows, are solved apart
        sides = u.rank - 1 if u.args.get("left", True) else u.rank - 2
        if u.dim == sides:
            return u.dim + u.out_rank - u.rank
    own = 2 if u.name == "A" or not vector else 1  # the trailing dimensions one system reads
    if u.dim >= u.rank - own:
        return None
    return u.dim + (u.out_rank - (1 if vector else 2)) - (u.rank - own)


def _searchsorted(u: BatchedArg) -> Optional[int]:
    """Each value of ``self`` searched in its row of ``sorted_sequence`` (or in the one
    sequence, 1-d): the batch must be before the searched (last) dimension."""
    seq = u.args.get("sorted_sequence")
    if u.name == "sorted_sequence":
        return u.dim if u.dim < u.rank - 1 else None
    return u.dim if _rank(seq) == 1 or u.dim < u.rank - 1 else None


def _stft(u: BatchedArg) -> Optional[int]:
    """A batch of signals ``[B, L]`` (``istft``: of spectra ``[B, F, N]``): one transform each;
    the window holds no sample."""
    return 0 if u.name in ("self", "input") and u.dim == 0 and u.rank >= 2 else None


# by name, every overload: aliases ATen does not tag ``pointwise`` (CompositeImplicitAutograd: export
# keeps them by name: ``torch.multiply``, ``torch.special.erf``), matrix functions over ``[*, n, n]``
for _rule, _names in (
        (elementwise, ("absolute", "arccos", "arccosh", "arcsin", "arcsinh", "arctan", "arctan2", "arctanh", "fix",
                       "negative", "multiply", "divide", "subtract", "greater", "greater_equal", "less", "less_equal",
                       "not_equal", "isclose", "chalf", "special_digamma", "special_erf", "special_erfc",
                       "special_erfinv", "special_exp2", "special_expit", "special_expm1", "special_gammainc",
                       "special_gammaincc", "special_gammaln", "special_i0", "special_log1p", "special_logit",
                       "special_ndtr", "special_psi", "special_round", "special_sinc", "special_xlogy",
                       "special_polygamma", "special_multigammaln")),
        (along(), ("special_softmax", "special_log_softmax", "diff", "cumulative_trapezoid")),
        (reduction(), ("special_logsumexp",)), (reduction(keepdim=None), ("trapezoid",)),
        (trailing(2), ("linalg_det", "_linalg_det", "det", "linalg_slogdet", "_linalg_slogdet", "slogdet", "logdet",
                       "linalg_inv", "linalg_inv_ex", "inverse", "linalg_matrix_exp", "matrix_exp", "linalg_cholesky",
                       "linalg_cholesky_ex", "cholesky", "linalg_eigh", "_linalg_eigh", "linalg_eigvalsh",
                       "linalg_svdvals", "linalg_svd", "_linalg_svd", "linalg_qr", "linalg_pinv",
                       "linalg_matrix_power", "matrix_power")),
        (trailing(1), ("linalg_vander",)), (_cross, ("linalg_cross",)),
        (_solve, ("linalg_solve", "linalg_solve_ex", "_linalg_solve_ex")), (_searchsorted, ("searchsorted",)),
        (_grid_sampler, ("grid_sampler", "grid_sampler_2d", "grid_sampler_3d", "cudnn_grid_sampler")),
        (_stft, ("stft", "istft"))):
    for _name in _names:
        for _op in _overloads(_name):
            RULES.setdefault(_op, _rule)


def _batch_norm(u: BatchedArg) -> Optional[int]:
    """Running statistics (eval) are a per-channel affine map; batch statistics of the
    data are ``symbolic_batch``'s ``batch-norm`` finding."""
    return u.dim if u.name == "input" and not u.args.get("training", False) else None


RULES.update({aten.batch_norm.default: _batch_norm, aten._native_batch_norm_legit_no_training.default: _batch_norm,
              aten._native_batch_norm_legit_functional.default: _batch_norm,
              aten.native_batch_norm.default: _batch_norm})

#: factories that read only their input's dtype, device or shape (Funnel's
#: ``inputs_embeds.new_ones([T - 1, T - 1])`` holds no sample's data)
NO_DATA = {aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
           aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default}

#: ops that read only shapes or metadata, or whose batch ``symbolic_batch`` follows
#: through its layouts (reshapes, one output of a multi-output op)
SHAPE_ONLY = NO_DATA | {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
    aten._assert_tensor_metadata.default, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.flatten.using_ints, aten.view_as.default, aten.reshape_as.default,
    aten.dim.default, aten.size.int, aten.numel.default, operator.getitem,
}


def _pointwise(t: Any) -> bool:
    """ATen's ``pointwise`` tag, or that of the out-of-place form (``gelu_`` of ``gelu``)."""
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if torch.Tag.pointwise in t.tags:
        return True
    name = t._schema.name.split("::")[-1]
    if name.endswith("_"):
        packet = getattr(aten, name[:-1], None)
        base = getattr(packet, t._overloadname, None) if packet is not None else None
        return base is not None and torch.Tag.pointwise in base.tags
    return False


def register_batch_rule(op: Any, rule: Rule) -> None:
    """The batch rule of an op defined outside ATen (fxdp's own graph ops)."""
    RULES[op] = rule


def rule_of(t: Any) -> Optional[Rule]:
    if t in RULES:
        return RULES[t]
    return elementwise if _pointwise(t) else None
