"""Transfer functions of functional normalizations and losses: the tags combined over
the dims each normalizes (the batch for ``batch_norm`` with batch statistics), and a
loss per sample (``reduction="none"``) or over the whole batch."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from ..ops import _Unknown
from ..tags import NT, combine, const, fit, reduce, reduce_all
from .pointwise import dim0_rows

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis

_ATEN_BATCH_NORM = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]


def _bind_norm(n: fx.Node, name: str) -> dict:
    """The arguments of norm ``name`` at ``n``, by parameter name."""
    fn = {"batch_norm": F.batch_norm, "instance_norm": F.instance_norm, "layer_norm": F.layer_norm,
          "rms_norm": getattr(F, "rms_norm", None), "local_response_norm": F.local_response_norm,
          "group_norm": F.group_norm}[name]
    if n.target is torch.batch_norm:  # aten order: input, weight, bias, running_mean, running_var, training
        b = dict(zip(_ATEN_BATCH_NORM, n.args))
        b.update(n.kwargs)
        return b
    try:
        return dict(inspect.signature(fn).bind(*n.args, **n.kwargs).arguments)
    except (TypeError, ValueError):
        raise _Unknown(f"{name} call")


def norm(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Any:
    """``F.batch_norm``, ``F.instance_norm``, ``F.layer_norm``, ``F.rms_norm``,
    ``F.local_response_norm``, ``F.group_norm``."""
    b = _bind_norm(n, name)
    x = an.tag(b.get("input"))
    params = [reduce_all(an.tag(b[k])) for k in ("weight", "bias") if b.get(k) is not None]
    if name == "batch_norm":
        training = bool(an.V(b.get("training", False)))
        if training or (b.get("running_mean") is None and b.get("running_var") is None):
            r = reduce(x, [i for i in range(x.dim()) if i != 1], keepdim=True)
        else:
            r = x
        return fit(combine(r, *params), out.shape)
    if name == "instance_norm":
        if b.get("use_input_stats", True) and b.get("running_mean") is not None:
            an.add(
                n, "state-update", "error",
                "instance norm with running statistics in training mode updates them from this batch",
                "use track_running_stats=False (statistics per sample only)",
            )
        r = reduce(x, list(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x
        return fit(combine(r, *params), out.shape)
    if name in ("layer_norm", "rms_norm"):
        shp = an.V(b.get("normalized_shape"))
        k = 1 if isinstance(shp, int) else len(shp)
        r = reduce(x, list(range(x.dim() - k, x.dim())), keepdim=True)
        return fit(combine(r, *params), out.shape)
    if name == "local_response_norm":
        return fit(reduce(x, [1], keepdim=True), out.shape)
    if name == "group_norm":
        r = reduce(x, list(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x
        return fit(combine(r, *params), out.shape)
    raise _Unknown(name)


def whole(ins: list, out: Any) -> Any:
    """Every output element from all of ``ins`` (a loss reduced over the batch)."""
    g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
    return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)


def loss(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Any:
    """A functional loss: per sample with ``reduction="none"``, else over everything."""
    fn = getattr(F, name)
    try:
        b = dict(inspect.signature(fn).bind(*n.args, **n.kwargs).arguments)
    except (TypeError, ValueError):
        raise _Unknown(f"{name} call")
    reduction = b.get("reduction", "mean")
    if b.get("size_average") is not None or b.get("reduce") is not None:
        reduction = F._Reduction.legacy_get_string(b.get("size_average"), b.get("reduce"))
    ins = an.flat_tags(n.args, n.kwargs)
    if reduction == "none":
        return dim0_rows(an, n, out, [n.args[0]])
    return whole(ins, out)
