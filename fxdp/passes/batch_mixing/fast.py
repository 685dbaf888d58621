"""The fast path of the batch-mixing analysis: a node's tags without tag arithmetic
when the batch dims alone show that it keeps samples apart."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import activation, conv, dropout, pooling
from torch.utils._pytree import tree_flatten, tree_unflatten

from .ops import (_CONVERT, _DIM0, _FUNCS, _OPERATOR_POINTWISE, _POINTWISE, _REDUCTIONS, _SHAPE_METHODS,
                  _TWO_INPUT_REDUCTIONS, _hashable, semantics_for)
from .tags import NO, _is_int, ideal, ideal_dim, uniform
from .transfer.reduction import reduce_dims

if TYPE_CHECKING:
    from .analysis import BatchMixingAnalysis


def _input_dims(an: "BatchMixingAnalysis", n: fx.Node) -> Optional[List[Tuple[int, int]]]:
    """(batch dim, rank) of each per-sample tensor input; None when an input is neither
    exactly per-sample along its batch dim nor free of samples."""
    dims: List[Tuple[int, int]] = []
    for a in tree_flatten((n.args, n.kwargs))[0]:
        if not isinstance(a, fx.Node) or not isinstance(an.env.get(a), Tensor):
            continue
        t = an.tags.get(a)
        if not isinstance(t, Tensor):
            return None
        d = ideal_dim(t)
        if d is not None and d == an.hint(a):
            dims.append((d, t.dim()))
        elif uniform(t) != NO:
            return None
    return dims


def fast_tag(an: "BatchMixingAnalysis", n: fx.Node, out: Any) -> Any:
    """Skip the tag arithmetic when the answer is known from the batch dims: every
    tensor input is exactly per-sample along its batch dim (or holds no sample),
    and the op keeps positions along that dim apart (pointwise with aligned batch
    dims, per-row ops on dim 0, linear maps over the last dim, reductions that
    leave the batch dim alone). None when it does not apply."""
    if n.op not in ("call_function", "call_method", "call_module"):
        return None
    flat_v, spec = tree_flatten(out)
    hs = an.hints.get(n.name, [])
    if not flat_v or len(hs) != len(flat_v):
        return None
    for v, h in zip(flat_v, hs):
        if not isinstance(v, Tensor) or not _is_int(h) or v.dim() <= h or v.shape[h] != an.b1:
            return None
    fam = fast_family(an, n)
    if fam is None:
        return None
    dims = _input_dims(an, n)
    if not dims:
        return None
    kind, arg = fam
    R = flat_v[0].dim()
    if kind == "pointwise":
        ok = len(flat_v) == 1 and all(d + R - r == hs[0] for d, r in dims)
    elif kind == "dim0":
        ok = all(d == 0 for d, _ in dims) and all(h == 0 for h in hs)
    elif kind == "lastdims":  # linear maps / norms over the last ``arg`` dims
        ok = len(flat_v) == 1 and all(d < r - arg and d == hs[0] and r == R for d, r in dims)
    elif kind == "reduce":
        ok = len(dims) == 1 and arg is not None and dims[0][0] not in arg
    else:
        ok = False
    if not ok:
        return None
    return tree_unflatten([ideal(v.shape, h, an.b1) for v, h in zip(flat_v, hs)], spec)


def _module_family(m: nn.Module) -> Optional[Tuple[str, Any]]:
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return ("lastdims", 1)
    if isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward:
        return ("lastdims", len(m.normalized_shape))
    if isinstance(m, (conv._ConvNd, nn.GroupNorm, pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd,
                      pooling._AdaptiveMaxPoolNd, pooling._MaxPoolNd)) and m.__module__.startswith("torch.nn"):
        return ("dim0", None)
    if isinstance(m, (nn.Identity, dropout._DropoutNd)) or (
            m.__module__ == activation.__name__ and not isinstance(
                m, (nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU,
                    nn.PReLU))):
        return ("pointwise", None)
    return None


def fast_family(an: "BatchMixingAnalysis", n: fx.Node) -> Optional[Tuple[str, Any]]:
    """(kind, argument) of the ops the fast path knows: "pointwise", "dim0",
    "lastdims" (with the number of dims) or "reduce" (with the reduced dims)."""
    if n.op == "call_module":
        return _module_family(an.submodule(n))
    t = n.target
    if n.op == "call_method":
        name = str(t)
        if name.endswith("_") or name in _SHAPE_METHODS:
            return None
    else:
        if t in _OPERATOR_POINTWISE:
            return ("pointwise", None)
        if not _hashable(t) or t not in _FUNCS or semantics_for(t) is not None:
            return None
        name = _FUNCS[t]
    if name in ("where", "max", "min", "nonzero", "argwhere"):
        return None
    if name in _POINTWISE or name in _CONVERT:
        return ("pointwise", None)
    if name in _DIM0:
        return ("dim0", None)
    if name == "linear":
        return ("lastdims", 1)
    if name in _REDUCTIONS and name not in _TWO_INPUT_REDUCTIONS:
        x = n.args[0] if n.args else None
        xv = an.env.get(x) if isinstance(x, fx.Node) else None
        if not isinstance(xv, Tensor):
            return None
        try:
            dims = reduce_dims(an, n, name, xv)
        except Exception:
            return None
        return ("reduce", dims if dims else None)
    return None

