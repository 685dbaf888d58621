"""Probe an op the analysis has no transfer function for: perturb one sample's
elements of its inputs at a time, run the op again, and see whose outputs move.

The tags say which input elements are sample ``s``'s; an output element another
sample owns (by the op's assumed per-sample tags) that changes when only sample
``s``'s inputs change is a dependence between samples: ``torch.fft.fft(x, dim=0)``
mixes the batch, ``torch.fft.fft(x, dim=1)`` does not. A probe that moves nothing
else is evidence on these inputs, not a proof (an op can depend on another sample
only in some regions of its input), so it stays a warning; one that moves another
sample's output is an error. Nothing is probed that cannot be perturbed (integer
inputs) or run again to the same result (random ops): those are errors too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .tags import MIX, NO, uniform

if TYPE_CHECKING:
    from .analysis import BatchMixingAnalysis

__all__ = ["probe_samples"]


def _rerun(an: "BatchMixingAnalysis", n: fx.Node, args: Any, kwargs: Any) -> List[Any]:
    if n.op == "call_function":
        out = n.target(*args, **kwargs)
    elif n.op == "call_method":
        out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
    else:
        out = an.submodule(n)(*args, **kwargs)
    return tree_flatten(out)[0]


def _same(a: Any, b: Any) -> Tensor:
    """Elementwise: unchanged (NaN equal to NaN)."""
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return (a == b) | (torch.isnan(a) & torch.isnan(b))
    return a == b


def probe_samples(an: "BatchMixingAnalysis", n: fx.Node, out: Any, out_tags: Any) -> Optional[str]:
    """None when perturbing each sample's input elements in turn changes only that
    sample's outputs (``out_tags``: the op's assumed tags); otherwise what was found."""
    vals, spec = tree_flatten((an.V(n.args), an.V(n.kwargs)))
    tags = tree_flatten((an.tag(n.args), an.tag(n.kwargs)))[0]
    if len(tags) != len(vals):
        return "its arguments could not be matched to their tags"
    outs = tree_flatten(out)[0]
    otags = tree_flatten(out_tags)[0]
    live = [i for i, (v, t) in enumerate(zip(vals, tags)) if isinstance(v, Tensor) and isinstance(t, Tensor)
            and tuple(t.shape) == tuple(v.shape) and uniform(t) != NO]
    if any(not (vals[i].dtype.is_floating_point or vals[i].dtype.is_complex) for i in live):
        return "its integer or boolean inputs carry samples and cannot be perturbed"
    buffers = [(b, b.detach().clone()) for b in an.submodule(n).buffers()] if n.op == "call_module" else []
    gen = torch.Generator().manual_seed(0)

    def run(values: List[Any]) -> List[Any]:
        args, kwargs = tree_unflatten(values, spec)
        try:
            with torch.no_grad():
                return _rerun(an, n, args, kwargs)
        finally:
            for b, v in buffers:
                b.copy_(v)

    try:
        if not all(not isinstance(a, Tensor) or (isinstance(b, Tensor) and a.shape == b.shape and bool(
                _same(a, b).all())) for a, b in zip(outs, run(list(vals)))):
            return "it does not give the same result when run again (random?)"
        for s in sorted({int(v) for i in live for v in tags[i].unique().tolist() if v > NO}):
            values = list(vals)
            for i in live:
                mask = tags[i] == s
                if bool(mask.any()):
                    x = vals[i]
                    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
                    values[i] = torch.where(mask, x + noise * (1 + x.abs()), x)
            for j, (o, o2, t) in enumerate(zip(outs, run(values), otags)):
                if not isinstance(o, Tensor) or not isinstance(t, Tensor):
                    continue
                if not isinstance(o2, Tensor) or o2.shape != o.shape:
                    return f"perturbing sample {s - 1} changed the shape of output {j}"
                moved = ~_same(o, o2) & (t.expand(o.shape) != s) & (t.expand(o.shape) != MIX)
                if bool(moved.any()):
                    others = sorted({int(v) - 1 for v in t.expand(o.shape)[moved].unique().tolist() if v > NO})
                    whose = f"sample {others[0]}'s" if others else "a shared"
                    return f"perturbing sample {s - 1}'s inputs changed {whose} output"
    except Exception as e:  # the op does not run on perturbed values: nothing tested
        return f"it could not be run on perturbed inputs ({type(e).__name__}: {e})"
    return None
