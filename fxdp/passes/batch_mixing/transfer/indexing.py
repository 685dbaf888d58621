"""Transfer functions of indexing (``x[i]``, ``x[i] = v``, gather, scatter, take,
nonzero, embeddings): the op applied to the tags with the real index values, plus
the provenance of indices computed from the data."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_map

from ..ops import _Unknown
from ..tags import NO, NT, _scatter_tags, along, broadcast_shapes, combine, const, fit, reduce, reduce_all, uniform
from .generic import arg
from .inplace import max_norm, state_update

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def getitem(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Any = None) -> Any:
    """``operator.getitem``: of a tensor, or of a tuple/list of them."""
    base = n.args[0]
    idx = n.args[1]
    bv = an.V(base)
    if not isinstance(bv, Tensor):
        bt = an.tag(base)
        if isinstance(bt, (list, tuple)) or hasattr(bt, "__getitem__") and not isinstance(bt, Tensor):
            try:
                return bt[an.I(idx)]
            except Exception:
                pass
        return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
    return _index_tensor(an, an.tag(base), bv, an.I(idx), idx, out)


def _index_items(an: "BatchMixingAnalysis", iv: Any, inode: Any) -> Tuple[List[Any], List[Tuple[str, Any]]]:
    """The index items (boolean masks as their nonzero positions) and, per item,
    (kind, tag of the index or None)."""
    items = list(iv) if isinstance(iv, tuple) else [iv]
    nodes = list(inode) if isinstance(inode, tuple) else [inode]
    real: List[Any] = []
    kinds: List[Tuple[str, Any]] = []  # (kind, tag of the index or None)
    for it, nd in zip(items, nodes):
        if isinstance(it, (list,)) and it and not isinstance(it[0], slice):
            it = torch.as_tensor(it)
        if isinstance(it, Tensor) and it.dtype == torch.bool:
            it_tag = an.tag(nd) if isinstance(nd, fx.Node) else const(it.shape)
            nz = it.nonzero(as_tuple=True)
            sel = it_tag[it] if isinstance(it_tag, Tensor) else const((int(it.sum()),))
            for z in nz:
                real.append(z)
                kinds.append(("adv", sel))
            continue
        if isinstance(it, Tensor):
            real.append(it)
            t = an.tag(nd) if isinstance(nd, fx.Node) else const(it.shape)
            kinds.append(("adv", t if isinstance(t, Tensor) else const(it.shape)))
        elif it is None:
            real.append(None)
            kinds.append(("none", None))
        elif it is Ellipsis:
            real.append(Ellipsis)
            kinds.append(("ellipsis", None))
        elif isinstance(it, slice):
            real.append(it)
            kinds.append(("slice", None))
        else:
            real.append(it)
            kinds.append(("int", None))
    return real, kinds


def _index_tensor(an: "BatchMixingAnalysis", bt: Tensor, bv: Tensor, iv: Any, inode: Any, out: Tensor) -> Tensor:
    """``bt[iv]`` plus the provenance of tensor indices (numpy's advanced indexing)."""
    real, kinds = _index_items(an, iv, inode)
    sel = bt[tuple(real)]
    advs = [t for k, t in kinds if k == "adv"]
    if not advs or all(uniform(t) == NO for t in advs):
        return fit(sel, out.shape)
    # place the broadcast index provenance where numpy puts the advanced dims
    consumed = sum(1 for k, _ in kinds if k in ("slice", "int", "adv"))
    expanded: List[str] = []
    for k, _ in kinds:
        if k == "ellipsis":
            expanded += ["slice"] * (bv.dim() - consumed)
        else:
            expanded.append(k)
    if "ellipsis" not in [k for k, _ in kinds]:
        expanded += ["slice"] * (bv.dim() - consumed)
    adv_pos = [i for i, k in enumerate(expanded) if k in ("adv", "int")]
    contiguous = adv_pos == list(range(adv_pos[0], adv_pos[-1] + 1))
    adv_shape = broadcast_shapes(*[t.shape for t in advs])
    it_tag = combine(*[t.expand(adv_shape) for t in advs])
    start = sum(1 for k in expanded[: adv_pos[0]] if k in ("slice", "none")) if contiguous else 0
    view = [1] * start + list(adv_shape) + [1] * (out.dim() - start - len(adv_shape))
    if len(view) != out.dim():
        return combine(fit(sel, out.shape), reduce_all(it_tag).expand(out.shape))
    return combine(fit(sel, out.shape), it_tag.reshape(view).expand(out.shape))


def setitem(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Any = None) -> Any:
    """``operator.setitem``: the written region gets the value's (and the index's) tags."""
    base, idx, val = n.args[0], n.args[1], n.args[2]
    bv = an.V(base)
    if not isinstance(bv, Tensor):
        return NT
    bt = an.tag(base).clone() if isinstance(an.tag(base), Tensor) else const(bv.shape).clone()
    bt = bt.contiguous()
    iv = an.I(idx)
    region = bt[iv]
    vt = an.tag(val) if isinstance(val, fx.Node) and isinstance(an.V(val), Tensor) else const(())
    it_tags = [t for t in an.flat_tags(idx) if uniform(t) != NO]
    new = fit(vt, region.shape)
    if it_tags:
        new = combine(new, *[reduce_all(t) for t in it_tags])
    bt[iv] = new
    state_update(an, n, base, bt)
    an.check(n, bv, bt, target=base)
    return NT


def nonzero(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Any = None) -> Any:
    """``nonzero``, ``argwhere`` and one-argument ``where``: the selected positions' tags."""
    x = an.tag(n.args[0])
    xv = an.I(n.args[0])
    pos = xv.nonzero(as_tuple=True)
    sel = x[pos] if x.dim() else x.reshape(1)[: len(pos[0]) if pos else 0]
    if isinstance(out, Tensor):
        return fit(sel.reshape(-1, 1), out.shape) if out.dim() == 2 else fit(sel, out.shape)
    return type(out)(fit(sel, o.shape) for o in out)


def _index_select(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:
    x, dim, idx = arg(n, 0, "input"), an.V(arg(n, 1, "dim")), arg(n, 2, "index")
    xt, iv = an.tag(x), an.I(idx)
    d = dim % max(xt.dim(), 1)
    sel = xt.index_select(d, iv)
    return combine(sel, along(an.tag(idx), d, sel.shape)) if an.tag(idx).dim() else sel


def _gather(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:  # gather, take_along_dim
    x = arg(n, 0, "input")
    if name == "gather":
        dim, idx = an.V(arg(n, 1, "dim")), arg(n, 2, "index")
    else:
        idx, dim = arg(n, 1, "indices"), an.V(arg(n, 2, "dim"))
    xt, iv = an.tag(x), an.I(idx)
    sel = xt.gather(dim, iv) if name == "gather" else torch.take_along_dim(xt, iv, dim)
    return combine(sel, fit(an.tag(idx), sel.shape))


def _take(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:
    xt, iv = an.tag(n.args[0]), an.I(n.args[1])
    return combine(xt.reshape(-1)[iv], an.tag(n.args[1]))


def _masked_select(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:
    xt, mv = an.tag(n.args[0]), an.I(n.args[1])
    xv = an.V(n.args[0])
    shape = broadcast_shapes(xv.shape, mv.shape)
    c = combine(xt.expand(shape), an.tag(n.args[1]).expand(shape))
    return c[mv.expand(shape)]


def _embedding(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:  # embedding, one_hot
    if name == "embedding" and n.target is torch.embedding:
        idx, w = n.args[1], n.args[0]
    else:
        idx, w = arg(n, 0, "input"), arg(n, 1, "weight")
    it = an.tag(idx)
    r = it.reshape(list(it.shape) + [1])
    if name == "embedding":
        r = combine(r, reduce_all(an.tag(w)))
        positional = n.args[3] if len(n.args) > 3 and n.target is not torch.embedding else None
        mx = n.kwargs.get("max_norm", positional)
        if mx is not None:
            max_norm(an, n)
    return fit(r, out.shape)


def _embedding_bag_fn(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:
    return embedding_bag(an, n, out, arg(n, 0, "input"), arg(n, 2, "offsets"),
                         n.kwargs.get("per_sample_weights", n.args[8] if len(n.args) > 8 else None),
                         bool(n.kwargs.get("include_last_offset", False)), arg(n, 1, "weight"))


def _scatter(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:  # scatter, scatter_add/_reduce
    # out = base with positions written from src (and the index)
    x, dim, idx = arg(n, 0, "input"), an.V(arg(n, 1, "dim")), arg(n, 2, "index")
    src = arg(n, 3, "src") if arg(n, 3, "src") is not None else n.kwargs.get("value")
    xt, iv = an.tag(x), an.I(idx)
    st = an.tag(src) if isinstance(src, fx.Node) else const(iv.shape)
    st = combine(fit(st, iv.shape) if tuple(st.shape) != tuple(iv.shape) else st, an.tag(idx))
    return _scatter_tags(xt, dim, iv, st, include_self=name != "scatter")


def _index_scatter(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:  # index_add/copy/fill/reduce
    x, dim, idx = arg(n, 0, "input"), an.V(arg(n, 1, "dim")), arg(n, 2, "index")
    xt, iv = an.tag(x), an.I(idx)
    d = dim % xt.dim()
    if name == "index_fill":
        src_shape = list(xt.shape)
        src_shape[d] = iv.numel()
        st = const(src_shape)
        val = arg(n, 3, "value")
        if isinstance(val, fx.Node):
            st = fit(reduce_all(an.tag(val)), src_shape)
    else:
        st = an.tag(arg(n, 3, "source"))
    it = along(an.tag(idx), d, st.shape) if an.tag(idx).dim() else fit(an.tag(idx), st.shape)
    st = combine(st, it)
    full = along(iv, d, st.shape).contiguous()
    return _scatter_tags(xt, d, full, st, include_self=name in ("index_add", "index_reduce"))


def _index_put(an: "BatchMixingAnalysis", n: fx.Node, name: str, out: Any) -> Any:
    x, indices, vals = n.args[0], n.args[1], n.args[2]
    xt = an.tag(x).clone().contiguous()
    iv = tuple(an.I(indices))
    region = xt[iv]
    new = fit(an.tag(vals), region.shape)
    idx_tags = [t for t in an.flat_tags(indices) if uniform(t) != NO]
    if idx_tags:
        new = combine(new, *[reduce_all(t) for t in idx_tags])
    xt[iv] = new
    return xt


_VARIANTS: Dict[str, Callable[..., Any]] = {
    "index_select": _index_select, "gather": _gather, "take_along_dim": _gather, "take": _take,
    "masked_select": _masked_select, "embedding": _embedding, "one_hot": _embedding,
    "embedding_bag": _embedding_bag_fn,
    **{k: _scatter for k in ("scatter", "scatter_add", "scatter_reduce")},
    **{k: _index_scatter for k in ("index_add", "index_copy", "index_fill", "index_reduce")},
    "index_put": _index_put,
}


def index(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Any:
    """The indexing function ``name`` (a key of ``_VARIANTS``)."""
    variant = _VARIANTS.get(name)
    if variant is None:
        raise _Unknown(f"{name} variant")
    return variant(an, n, name, out)


def embedding_bag(an: "BatchMixingAnalysis", n: fx.Node, out: Tensor, inp: Any, offsets: Any, psw: Any,
                  include_last: bool, weight: Any) -> Tensor:
    """Each bag combines its indices (and their per-sample weights) and its offset."""
    it = an.tag(inp)
    iv = an.V(inp)
    w = reduce_all(an.tag(weight)) if weight is not None else const(())
    pt = an.tag(psw) if isinstance(psw, fx.Node) else None
    if iv.dim() == 2:
        c = it if pt is None else combine(it, pt)
        return fit(combine(reduce(c, [1], keepdim=True), w), out.shape)
    ov = an.V(offsets)
    ot = an.tag(offsets)
    bags = []
    bounds = list(ov.tolist()) + ([] if include_last else [iv.shape[0]])
    for j in range(out.shape[0]):
        lo, hi = bounds[j], bounds[j + 1]
        seg = it[lo:hi]
        if pt is not None:
            seg = combine(seg, pt[lo:hi])
        # bag j is its rows and its start; offsets[j + 1], its end, is bag j + 1's start: where the
        # bags meet, not a value of another sample
        r = combine(reduce_all(seg) if seg.numel() else const(()), ot[j])
        bags.append(r)
    return fit(combine(torch.stack(bags).reshape(-1, 1), w), out.shape)
