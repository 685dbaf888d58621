"""Transfer functions of contractions (matmul and its variants, einsum, linear,
tensordot, attention): each operand reduced over the letters it contributes that
are summed away, then broadcast into the output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence

import torch.fx as fx
from torch import Tensor

from ..ops import _Unknown
from ..tags import broadcast_shapes, combine, fit, reduce
from .generic import arg

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _expand_ellipsis(eq: str, ops: List[Tensor]) -> tuple:
    """(operand subscripts, output subscripts) of ``eq`` with ``...`` spelled out."""
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    subs = lhs.split(",")
    if len(subs) != len(ops):
        raise _Unknown("einsum operands")
    used = set(c for c in eq if c.isalpha())
    spare = [c for c in _LETTERS if c not in used]
    ell_n = max((o.dim() - (len(s) - 3) if "..." in s else 0) for s, o in zip(subs, ops))
    ell = spare[:ell_n]
    full = []
    for s, o in zip(subs, ops):
        if "..." in s:
            k = o.dim() - (len(s) - 3)
            s = s.replace("...", "".join(ell[ell_n - k:]))
        full.append(s)
    if rhs is None:
        letters = "".join(full)
        rhs_full = "".join(ell) + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    else:
        rhs_full = rhs.replace("...", "".join(ell))
    return full, rhs_full


def einsum_tags(eq: str, ops: List[Tensor], out_shape: Sequence[int]) -> Tensor:
    """Provenance of ``torch.einsum(eq, *ops)``: each operand combined over the
    letters it contributes that are summed away, then broadcast into the output."""
    full, rhs_full = _expand_ellipsis(eq.replace(" ", ""), ops)
    parts = []
    for s, o in zip(full, ops):
        if len(set(s)) != len(s):
            raise _Unknown("einsum with repeated letters")
        red = [i for i, c in enumerate(s) if c not in rhs_full]
        r = reduce(o, red, keepdim=False)
        keep = [c for c in s if c in rhs_full]
        perm = sorted(range(len(keep)), key=lambda i: rhs_full.index(keep[i]))
        r = r.permute(perm) if perm else r
        view = [1] * len(rhs_full)
        for i, c in enumerate(sorted(keep, key=rhs_full.index)):
            view[rhs_full.index(c)] = r.shape[i]
        parts.append(r.reshape(view))
    return fit(combine(*parts), out_shape)


def _mm(a: Tensor, b: Tensor, shape: Sequence[int]) -> Tensor:
    if a.dim() == 1 and b.dim() == 1:
        return einsum_tags("i,i->", [a, b], shape)
    if a.dim() == 1:
        return einsum_tags("k,...km->...m", [a, b], shape)
    if b.dim() == 1:
        return einsum_tags("...nk,k->...n", [a, b], shape)
    return einsum_tags("...nk,...km->...nm", [a, b], shape)


def _T(an: "BatchMixingAnalysis", a: Any) -> Any:
    """Tags of argument ``a`` (None when absent)."""
    return an.tag(a) if a is not None else None


def _plain(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:  # matmul, @, mm, bmm, mv, dot, vdot
    return _mm(_T(an, arg(n, 0, "input")), _T(an, arg(n, 1, "other") or arg(n, 1, "mat2") or arg(n, 1, "vec")), shape)


def _rmatmul(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    return _mm(_T(an, n.args[1]), _T(an, n.args[0]), shape)


def _add_mm(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:  # addmm, addmv, baddbmm
    return combine(fit(_T(an, arg(n, 0, "input")), shape), _mm(_T(an, n.args[1]), _T(an, n.args[2]), shape))


def _addbmm(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    summed = einsum_tags("bnk,bkm->nm", [_T(an, n.args[1]), _T(an, n.args[2])], shape)
    return combine(fit(_T(an, arg(n, 0, "input")), shape), summed)


def _addr(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    return combine(fit(_T(an, n.args[0]), shape),
                   einsum_tags("n,m->nm", [_T(an, n.args[1]), _T(an, n.args[2])], shape))


def _outer(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    return einsum_tags("n,m->nm", [_T(an, n.args[0]), _T(an, n.args[1])], shape)


def _inner(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    a, b = _T(an, n.args[0]), _T(an, n.args[1])
    if a.dim() == 0 or b.dim() == 0:
        return combine(fit(a, shape), fit(b, shape))
    return fit(combine(reduce(a, [-1], False).reshape(list(a.shape[:-1]) + [1] * (b.dim() - 1)),
                       reduce(b, [-1], False)), shape)


def _einsum(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    eq = n.args[0]
    ops = list(n.args[1]) if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
    return einsum_tags(an.V(eq), [_T(an, o) for o in ops], shape)


def _linear(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    x, w, b = _T(an, arg(n, 0, "input")), _T(an, arg(n, 1, "weight")), arg(n, 2, "bias")
    r = einsum_tags("...i,oi->...o", [x, w], shape)
    return combine(r, fit(_T(an, b), shape)) if b is not None else r


def _bilinear(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    x1, x2, w = _T(an, n.args[0]), _T(an, n.args[1]), _T(an, n.args[2])
    b = n.args[3] if len(n.args) > 3 else None
    r = einsum_tags("...i,...j,oij->...o", [x1, x2, w], shape)
    return combine(r, fit(_T(an, b), shape)) if b is not None else r


def _chain(an: "BatchMixingAnalysis", mats: List[Any], shape: Any) -> Tensor:
    vals = [an.V(m) for m in mats]
    r = _T(an, mats[0])
    cur = vals[0]
    for m, v in zip(mats[1:], vals[1:]):
        cur = cur @ v
        r = _mm(r, _T(an, m), cur.shape)
    return fit(r, shape)


def _chain_matmul(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    return _chain(an, list(n.args), shape)


def _multi_dot(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    return _chain(an, list(n.args[0]), shape)


def _cdist(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    return einsum_tags("...pm,...rm->...pr", [_T(an, n.args[0]), _T(an, n.args[1])], shape)


def _tensordot(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:
    a, b = _T(an, n.args[0]), _T(an, n.args[1])
    dims = an.V(n.args[2] if len(n.args) > 2 else n.kwargs.get("dims", 2))
    if isinstance(dims, int):
        da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
    else:
        da, db = [list(d) if isinstance(d, (list, tuple)) else [d] for d in dims]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    sa = [next(letters) for _ in range(a.dim())]
    sb = [next(letters) for _ in range(b.dim())]
    for i, j in zip(da, db):
        sb[j % b.dim()] = sa[i % a.dim()]
    outl = [c for i, c in enumerate(sa) if i % a.dim() not in [d % a.dim() for d in da]] + \
           [c for j, c in enumerate(sb) if j % b.dim() not in [d % b.dim() for d in db]]
    return einsum_tags(f"{''.join(sa)},{''.join(sb)}->{''.join(outl)}", [a, b], shape)


def _attention(an: "BatchMixingAnalysis", n: fx.Node, shape: Any) -> Tensor:  # scaled_dot_product_attention
    q, k, v = _T(an, arg(n, 0, "query")), _T(an, arg(n, 1, "key")), _T(an, arg(n, 2, "value"))
    mask = arg(n, 3, "attn_mask")
    qv = an.V(arg(n, 0, "query"))
    kv = an.V(arg(n, 1, "key"))
    scores_shape = broadcast_shapes(qv.shape[:-2], kv.shape[:-2]) + (qv.shape[-2], kv.shape[-2])
    s = einsum_tags("...le,...se->...ls", [q, k], scores_shape)
    if mask is not None and isinstance(an.V(mask), Tensor):  # a mask node may hold None (timm)
        s = combine(s, an.tag(mask))
    return einsum_tags("...ls,...sv->...lv", [s, v], shape)


_Variant = Callable[["BatchMixingAnalysis", fx.Node, Any], Tensor]
_VARIANTS: Dict[str, _Variant] = {
    **{k: _plain for k in ("matmul", "__matmul__", "mm", "bmm", "mv", "dot", "vdot")},
    "__rmatmul__": _rmatmul,
    **{k: _add_mm for k in ("addmm", "addmv", "baddbmm")},
    "addbmm": _addbmm, "addr": _addr, "outer": _outer, "ger": _outer, "inner": _inner, "einsum": _einsum,
    "linear": _linear, "bilinear": _bilinear, "chain_matmul": _chain_matmul, "multi_dot": _multi_dot, "cdist": _cdist,
    "tensordot": _tensordot, "scaled_dot_product_attention": _attention,
}
def matmul(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Any:
    """The contraction ``name`` (a key of ``_VARIANTS``)."""
    shape = out.shape if isinstance(out, Tensor) else None
    variant = _VARIANTS.get(name)
    if variant is None:
        raise _Unknown("matmul variant")
    return variant(an, n, shape)
