"""Transfer functions of data movement (views, permutes, cat, flips, padding): the
op itself applied to the tags, so a transposed fold ``[T*B] -> [B, T]`` shows up."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..tags import NO, _holds_tensor
from .pointwise import dim0_rows

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def movement(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Any:
    """Runs the op (function or method ``name``) on the tags of its tensor arguments."""
    method = n.op == "call_method"
    args = list(n.args)
    kwargs = dict(n.kwargs)
    index_role = set()
    if name == "repeat_interleave":
        index_role = {1, "repeats"}

    def sub(a: Any, role: Any) -> Any:
        if role in index_role:
            return an.I(a)
        # a node holding tensors (one, or a tuple such as chunk's result) stands for its tags
        return fx.node.map_aggregate(
            a, lambda x: an.tags[x] if isinstance(x, fx.Node) and _holds_tensor(an.env.get(x))
            else (an.env[x] if isinstance(x, fx.Node) else x)
        )

    targs = [sub(a, i) for i, a in enumerate(args)]
    tkw = {k: sub(v, k) for k, v in kwargs.items()}
    if method:
        # view == reshape wherever the real view ran (same logical order); tags may not be laid out
        # as the data is (a contiguous() of a permuted tag keeps the tag's strides)
        name = {"view": "reshape", "view_as": "reshape_as"}.get(name, name)
        tag = getattr(targs[0], name)(*targs[1:], **tkw) if name not in ("T", "mT", "H", "mH") \
            else getattr(targs[0], name)
    else:
        tag = n.target(*targs, **tkw)
    return tag


def pad(an: "BatchMixingAnalysis", n: fx.Node, out: Tensor, name: str) -> Tensor:
    """``F.pad``: constant padding adds no sample; the other modes read the row's own values."""
    mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
    if mode == "constant":
        x = an.tag(n.args[0])
        pads = an.V(n.args[1] if len(n.args) > 1 else n.kwargs["pad"])
        return F.pad(x, tuple(pads), value=NO)
    return dim0_rows(an, n, out, [n.args[0]])
