"""Transfer functions of reductions, scans, sorts and normalizing ops (softmax,
norms, decompositions): the tags combined over the dims the op reduces."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_map

from ..ops import _REDUCTIONS, _TWO_INPUT_REDUCTIONS, _Unknown
from ..tags import NT, combine, fit, reduce

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def reduce_dims(an: "BatchMixingAnalysis", n: fx.Node, name: str, x: Tensor) -> Optional[List[int]]:
    """The dims reduction ``name`` at ``n`` combines over, for an input like ``x`` (None: all)."""
    pos, default = _REDUCTIONS[name]
    dim: Any = None
    for kw in ("dim", "axis"):
        if kw in n.kwargs:
            dim = an.V(n.kwargs[kw])
    if dim is None and len(n.args) > pos:
        dim = an.V(n.args[pos])
    nd = x.dim()
    if dim is None:
        if default == "all":
            return None
        if default == "legacy_softmax":
            return [0 if nd in (0, 1, 3) else 1]
        if default == "complement":
            raise _Unknown("renorm without dim")
        dim = default
    if isinstance(dim, int):
        dims = [dim]
    else:
        dims = list(dim)
    if not nd:
        return []
    dims = [d % nd for d in dims]
    if default == "complement":
        dims = [i for i in range(nd) if i not in dims]
    return dims


def reduction(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Any:
    x_node = n.args[0] if n.args else next(iter(n.kwargs.values()))
    x = an.tag(x_node)
    if name in _TWO_INPUT_REDUCTIONS and len(n.args) > 1:
        x = combine(x, an.tag(n.args[1]))
    r = reduce(x, reduce_dims(an, n, name, x), keepdim=True)
    # every output element (values, indices, a glu half, a sorted row) depends on the whole reduced slice
    return tree_map(lambda v: fit(r, v.shape) if isinstance(v, Tensor) else NT, out)
