"""The tag algebra of the batch-mixing analysis: sample-provenance tags and their operations.

A tag is a ``long`` tensor of a value's shape: ``s + 1`` for an element computed
from sample ``s`` only, ``NO`` (0) from no sample, ``MIX`` (-1) from several.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

NO, MIX = 0, -1  # tag values: no sample / several samples; sample s is s + 1
_BIG = 2**62


def _holds_tensor(v: Any) -> bool:
    return isinstance(v, Tensor) or (isinstance(v, (tuple, list)) and bool(v) and all(isinstance(t, Tensor) for t in v))


class _NoTag:
    """Tag of a non-tensor value (ints, shapes, dtypes)."""

    def __repr__(self) -> str:
        return "-"


NT = _NoTag()


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes`` for concrete shapes (torch's imports its symbolic
    shape machinery on first use, seconds of start-up); raises RuntimeError."""
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        for i, d in enumerate(s):
            k = nd - len(s) + i
            if d != 1:
                if out[k] not in (1, d):
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} are not broadcastable")
                out[k] = int(d)
    return torch.Size(out)


def const(shape: Sequence[int], v: int = NO) -> Tensor:
    """A uniform tag without memory (a zero-stride view)."""
    return torch.full((), v, dtype=torch.long).expand(tuple(shape))


def uniform(t: Tensor) -> Optional[int]:
    """The value of a tag that is the same everywhere, else None."""
    if t.numel() == 0:
        return NO
    if t.numel() == 1 or all(s == 0 for s in t.stride()):
        return int(t.reshape(-1)[0]) if t.numel() == 1 else int(t.as_strided((1,), (1,))[0])
    return None


def combine(*ts: Tensor) -> Tensor:
    """Elementwise provenance of a value computed from all of ``ts`` (broadcast)."""
    live = [t for t in ts if uniform(t) != NO]
    if not live:
        return const(broadcast_shapes(*[t.shape for t in ts]))
    shape = broadcast_shapes(*[t.shape for t in ts])
    out = live[0]
    for b in live[1:]:
        a, b = torch.broadcast_tensors(out, b)
        res = torch.where(a == NO, b, a)
        out = res.masked_fill((a != NO) & (b != NO) & (a != b), MIX)
    return out.expand(shape) if tuple(out.shape) != tuple(shape) else out


def reduce(t: Tensor, dims: Optional[Sequence[int]] = None, keepdim: bool = True) -> Tensor:
    """Provenance after combining over ``dims`` (all when None)."""
    nd = t.dim()
    dims = list(range(nd)) if dims is None else sorted({d % nd for d in dims}) if nd else []
    if not dims:
        return t
    shape = [1 if i in dims else s for i, s in enumerate(t.shape)]
    u = uniform(t)
    if u is not None or t.numel() == 0:
        out = const(shape, NO if u is None else u)
    else:
        hi = t.amax(dim=dims, keepdim=True)
        lo = torch.where(t > NO, t, _BIG).amin(dim=dims, keepdim=True)
        mn = t.amin(dim=dims, keepdim=True)
        out = torch.where((mn < NO) | ((hi > NO) & (lo != hi)), MIX, hi.clamp(min=NO))
    if not keepdim:
        out = out.reshape([s for i, s in enumerate(t.shape) if i not in dims])
    return out


def reduce_all(t: Tensor) -> Tensor:
    return reduce(t, None, keepdim=False)


def fit(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t`` brought to ``shape``: as is, reshaped (dims dropped), broadcast, or
    combined to one value and broadcast."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    if t.numel() == int(torch.Size(shape).numel()) and t.numel() > 0:
        try:
            return t.reshape(shape)
        except RuntimeError:
            pass
    try:
        if broadcast_shapes(t.shape, shape) == torch.Size(shape):
            return t.expand(shape)
    except RuntimeError:
        pass
    return reduce_all(t).expand(shape)


def along(v: Tensor, d: int, shape: Sequence[int]) -> Tensor:
    """A per-index vector ``v`` laid along dimension ``d`` of ``shape``."""
    view = [1] * len(shape)
    view[d] = -1
    return v.reshape(view).expand(tuple(shape))


def ideal(shape: Sequence[int], d: int, b: int) -> Tensor:
    """Sample i's elements are exactly those at index i along ``d`` (marked, so
    cleanliness checks on it are free)."""
    t = along(torch.arange(1, b + 1), d, shape)
    t._fxdp_ideal = d  # type: ignore[attr-defined]
    return t


def ideal_dim(t: Tensor) -> Optional[int]:
    return getattr(t, "_fxdp_ideal", None)


def per_index(t: Tensor, d: int) -> Tensor:
    """Provenance of each index along ``d`` (combined over the other dims)."""
    return reduce(t, [i for i in range(t.dim()) if i != d], keepdim=False)


def _scatter_tags(xt: Tensor, dim: int, idx: Tensor, st: Tensor, include_self: bool) -> Tensor:
    """Provenance of a scatter: positions written get the combined provenance of
    everything written there (and of the old value when accumulating)."""
    src = st[tuple(slice(0, s) for s in idx.shape)] if tuple(st.shape) != tuple(idx.shape) else st
    base = xt.contiguous().clone()
    hi = base.scatter_reduce(dim, idx, src, "amax", include_self=include_self)
    lo_base = torch.where(base > NO, base, _BIG)
    lo = lo_base.scatter_reduce(dim, idx, torch.where(src > NO, src, _BIG), "amin", include_self=include_self)
    mixed = (base < NO).long().scatter_reduce(dim, idx, (src < NO).long(), "amax", include_self=include_self)
    written = torch.zeros_like(base).scatter(dim, idx, torch.ones_like(idx))
    conflict = (mixed > 0) | ((hi > NO) & (lo != _BIG) & (lo != hi))
    res = torch.where(conflict, MIX, hi.clamp(min=NO))
    return torch.where(written.bool(), res, base)


# --- batch hints (from fxdp.passes.batch_dims) and cleanliness ---------------------------

def _is_int(h: Any) -> bool:
    return isinstance(h, int) and not isinstance(h, bool)


def _is_fold(h: Any) -> bool:
    return isinstance(h, tuple) and bool(h) and h[0] == "fold"


def violations(t: Tensor, hint: Any, b: int) -> Tensor:
    """Elements whose provenance is not clean for a value with batch hint ``hint``."""
    if isinstance(hint, int) and not isinstance(hint, bool) and t.dim() > hint and t.shape[hint] == b:
        exp = ideal(t.shape, hint, b)
        return ~((t == NO) | (t == exp))
    if isinstance(hint, tuple) and hint and hint[0] == "fold":
        return t < NO
    return t != NO


def is_clean(t: Tensor, hint: Any, b: int) -> bool:
    d = ideal_dim(t)
    if d is not None and d == hint and not isinstance(hint, bool):
        return True
    u = uniform(t)
    if u == NO:
        return True
    return not bool(violations(t, hint, b).any())


def fmt_hint(hint: Any) -> str:
    if isinstance(hint, int) and not isinstance(hint, bool):
        return f"batch dim {hint}"
    if isinstance(hint, tuple) and hint and hint[0] == "fold":
        return f"batch folded into dim {hint[1]} (B*{hint[2]})"
    if hint is None:
        return "no batch dim"
    return str(hint)
