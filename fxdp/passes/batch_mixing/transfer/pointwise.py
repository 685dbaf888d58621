"""Transfer functions of pointwise ops (broadcast tags combined element by element)
and of row-wise ops (row i of dim 0 from row i of the inputs: convolutions, pooling,
per-sample losses and ops declared ``"dim0"``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from ..tags import NO, NT, along, broadcast_shapes, combine, const, per_index, reduce_all, uniform

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def pointwise(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str] = None) -> Any:
    """Elementwise over broadcast arguments; an argument that does not broadcast to
    the output (e.g. prelu's per-channel weight) is combined whole."""
    ins = an.flat_tags(n.args, n.kwargs)

    def one(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return NT
        parts = []
        for t in ins:
            try:
                ok = broadcast_shapes(t.shape, v.shape) == v.shape
            except RuntimeError:
                ok = False
            parts.append(t if ok else reduce_all(t))  # e.g. prelu's per-channel weight
        return combine(*parts, const(v.shape)) if parts else const(v.shape)

    return tree_map(one, out)


def rows(t: Tensor, d: int, size: int) -> Tensor:
    """Per-row provenance along ``d`` when the row count matches, else one value."""
    if t.dim() > d and t.shape[d] == size:
        return per_index(t, d)
    return reduce_all(t).expand(size)


def dim0_rows(an: "BatchMixingAnalysis", n: fx.Node, out: Any, primary: List[Any]) -> Any:
    """Ops that compute row i of dim 0 from row i of their inputs (convolutions,
    pooling, group/instance norm, per-sample losses); other tensor arguments
    (weights) are combined whole."""
    flat_out = [v for v in tree_flatten(out)[0] if isinstance(v, Tensor)]
    if not flat_out:
        return tree_map(lambda v: NT, out)
    rows_n = flat_out[0].shape[0] if flat_out[0].dim() else None
    ins = an.flat_tags(n.args, n.kwargs)
    prim = set(id(t) for t in an.flat_tags(*primary))
    if rows_n is None:
        g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
        return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)
    parts = []
    for t in ins:
        if id(t) in prim or (t.dim() and t.shape[0] == rows_n and uniform(t) != NO):
            parts.append(rows(t, 0, rows_n))
        else:
            parts.append(reduce_all(t).expand(rows_n))
    v = combine(*parts) if parts else const((rows_n,))
    return tree_map(lambda o: (along(v, 0, o.shape) if o.dim() and o.shape[0] == rows_n
                               else reduce_all(v).expand(o.shape)) if isinstance(o, Tensor) else NT, out)


def dim0(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str] = None) -> Any:
    """A row-wise function; its first argument is the per-row input."""
    return dim0_rows(an, n, out, [n.args[0]] if n.args else list(n.kwargs.values())[:1])
