"""In-place writes and module state: the new tags of a tensor written in place
(``x.add_(y)``, ``x.zero_()``, ``x[i] = v``) and the ``state-update`` findings for
buffers, parameters and module attributes the forward changes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor
from torch.nn.modules import batchnorm, instancenorm
from torch.utils._pytree import tree_flatten

from ..ops import _is_view
from ..tags import combine, const, fit, reduce_all

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def inplace(an: "BatchMixingAnalysis", n: fx.Node, out: Any, tag: Any) -> Any:
    """An in-place op: the mutated tensor (first argument) now has ``tag``."""
    tgt = n.args[0] if n.args else None
    if isinstance(tgt, fx.Node) and isinstance(out, Tensor):
        state_update(an, n, tgt, tag)
        an.check(n, out, tag, target=tgt)
    return tag


def overwrite(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: str) -> Tensor:
    """``zero_``, ``fill_``, ``copy_`` and the random fills: what is written."""
    out = an.V(n.args[0])
    if name == "copy":
        return fit(combine(*an.flat_tags(n.args[1:], n.kwargs)) if len(n.args) > 1 else const(out.shape),
                   out.shape)
    if name == "fill" and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
        return fit(reduce_all(an.tag(n.args[1])), out.shape)
    return const(out.shape)


def state_update(an: "BatchMixingAnalysis", n: fx.Node, tgt: fx.Node, tag: Any) -> None:
    """In-place updates of buffers/parameters (``get_attr``, possibly through views)."""
    base = tgt
    while base.args and isinstance(base.args[0], fx.Node) and _is_view(base):
        base = base.args[0]
    if base.op != "get_attr":
        return
    rest = [a for a in tree_flatten((n.args[1:], n.kwargs))[0] if isinstance(a, fx.Node)]
    if any(an.data_dep(a) for a in rest):
        an.add(
            n, "state-update", "error",
            f"updates `{base.target}` in place from batch data during the forward: state that outlives the "
            "step (running statistics, caches) carries information about this batch into later steps, "
            "outside the privacy accounting, and couples samples across steps",
            "compute the statistic outside the DP model (or from public data), or keep it per forward "
            "without storing it on the module",
            attr=str(base.target),
        )
    else:
        an.add(
            n, "state-update", "warning",
            f"updates `{base.target}` in place during the forward (not from batch data)",
            "make sure the update never depends on the training data",
            attr=str(base.target),
        )


def max_norm(an: "BatchMixingAnalysis", n: fx.Node) -> None:
    an.add(
        n, "state-update", "error",
        "embedding with max_norm renormalizes the looked-up rows of the weight in place during the forward, "
        "so the parameters change according to this batch's indices, outside DP-SGD",
        "drop max_norm (clip the embedding outside the forward, e.g. after the optimizer step)",
    )


def module_snapshot(an: "BatchMixingAnalysis", n: fx.Node) -> Any:
    """Buffers and tensor attributes of a leaf module before its forward."""
    if n.op != "call_module":
        return None
    m = an.submodule(n)
    bufs = {k: b.detach().clone() for k, b in m.named_buffers()}
    attrs = {k: v for k, v in vars(m).items() if isinstance(v, Tensor)}
    return bufs, attrs


def module_state(an: "BatchMixingAnalysis", n: fx.Node, state: Any) -> None:
    """Buffers and tensor attributes a leaf module changed during its forward."""
    bufs, attrs = state
    m = an.submodule(n)
    if isinstance(m, (batchnorm._BatchNorm, instancenorm._InstanceNorm)):
        return  # reported with the module's semantics
    changed = [k for k, b in m.named_buffers()
               if k in bufs and (b.shape != bufs[k].shape or not torch.equal(b, bufs[k]))]
    new_attrs = [k for k, v in vars(m).items() if isinstance(v, Tensor) and attrs.get(k) is not v]
    data = any(an.data_dep(a) for a in n.all_input_nodes)
    for k in changed:
        an.add(
            n, "state-update", "error" if data else "warning",
            f"{type(m).__name__} updates its buffer `{k}` during the forward"
            + (" from batch data (e.g. running statistics)" if data else ""),
            "compute such statistics outside the DP model, or switch the module to a mode that does not "
            "update them",
            attr=f"{n.target}.{k}",
        )
    for k in new_attrs:
        an.add(
            n, "state-update", "error" if data else "warning",
            f"{type(m).__name__} assigns a tensor to `self.{k}` during the forward: module state that "
            "outlives the batch",
            "return the value instead of storing it on the module",
            attr=f"{n.target}.{k}",
        )
