"""Transfer function of sequence modules (RNNs, RNN cells, multi-head attention,
transformer layers): per-sample along the batch dimension *they* use
(``batch_first``); data in the other positions mixes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import rnn
from torch.utils._pytree import tree_map

from ..tags import NT, along, combine, const, per_index, reduce, reduce_all
from .pointwise import rows

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def _layout(an: "BatchMixingAnalysis", m: nn.Module, bound: Dict[str, Any]) -> Tuple[bool, int, bool, Any, Any]:
    """(batch_first, heads, is a cell, the batch dimension of the sequence or None, batch size or None)."""
    bf = getattr(m, "batch_first", None)
    if bf is None:
        for sub in m.modules():
            if isinstance(sub, nn.MultiheadAttention):
                bf = sub.batch_first
                break
    bf = bool(bf)
    heads = next((s.num_heads for s in m.modules() if isinstance(s, nn.MultiheadAttention)), 1)
    cell = isinstance(m, rnn.RNNCellBase)
    seq_rank = 2 if cell else 3
    first_val = next((an.V(v) for v in bound.values() if isinstance(an.V(v), Tensor)), None)
    batched = first_val is not None and first_val.dim() == seq_rank
    d_seq = (0 if (bf or cell) else 1) if batched else None
    size = first_val.shape[d_seq] if (batched and d_seq is not None) else None
    return bf, heads, cell, d_seq, size


def _row_parts(an: "BatchMixingAnalysis", bound: Dict[str, Any], cell: bool, heads: int, d_seq: Any,
               size: Optional[int]) -> List[Tensor]:
    """Per-row provenance of every argument (one value each when unbatched)."""
    parts: List[Tensor] = []
    for name, a in bound.items():
        for t in an.flat_tags(a):
            if size is None:
                parts.append(reduce_all(t))
                continue
            if name.endswith("key_padding_mask"):
                d = 0
            elif name in ("hx",) and not cell:
                d = 1
            elif name.endswith("mask") and t.dim() == 3 and t.shape[0] == size * heads:
                parts.append(reduce(per_index(t, 0).reshape(size, heads), [1], keepdim=False))
                continue
            elif name.endswith("mask"):
                parts.append(reduce_all(t).expand(size))
                continue
            elif name == "hx" and cell:
                d = 0
            else:
                d = d_seq
            parts.append(rows(t, d, size))
    return parts


def sequence_module(an: "BatchMixingAnalysis", n: fx.Node, m: nn.Module, bound: Dict[str, Any], out: Any) -> Any:
    """RNNs, attention and transformer layers: per-sample along the batch
    dimension *they* use (``batch_first``); data in the other positions mixes."""
    bf, heads, cell, d_seq, size = _layout(an, m, bound)
    parts = _row_parts(an, bound, cell, heads, d_seq, size)
    if size is None:
        g = combine(*parts) if parts else const(())
        return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)
    v = combine(*parts) if parts else const((size,))

    def place(o: Any, d: int) -> Any:
        if not isinstance(o, Tensor):
            return NT
        if o.dim() > d and o.shape[d] == size:
            return along(v, d, o.shape)
        return reduce_all(v).expand(o.shape)

    if isinstance(m, rnn.RNNBase):
        o, h = out
        hs = tree_map(lambda t: place(t, 1), h)
        return (place(o, d_seq), hs)
    if isinstance(m, nn.MultiheadAttention):
        o, w = out
        return (place(o, d_seq), place(w, 0) if isinstance(w, Tensor) else w)
    if cell:
        return tree_map(lambda t: place(t, 0), out)
    return tree_map(lambda t: place(t, d_seq), out)
