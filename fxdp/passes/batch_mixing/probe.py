"""Probe an op the analysis has no transfer function for: perturb one sample's
elements of its inputs at a time, run the op again, and see whose outputs move.

The tags say which input elements are sample ``s``'s; an output element another
sample owns (by the op's assumed per-sample tags) that changes when only sample
``s``'s inputs change is a dependence between samples: ``torch.fft.fft(x, dim=0)``
mixes the batch, ``torch.fft.fft(x, dim=1)`` does not. A probe that moves nothing
else is evidence on these inputs, not a proof (an op can depend on another sample
only in some regions of its input), so it stays a warning; one that moves another
sample's output is an error, and so is an op that gives another result when run
again under one seed (nothing can be shown).
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

__all__ = ["probe_samples", "perturbed", "same", "moved"]


def _rerun(an: "BatchMixingAnalysis", n: fx.Node, args: Any, kwargs: Any) -> List[Any]:
    if n.op == "call_function":
        out = n.target(*args, **kwargs)
    elif n.op == "call_method":
        out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
    else:
        out = an.submodule(n)(*args, **kwargs)
    return tree_flatten(out)[0]


def same(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise: unchanged (NaN equal to NaN)."""
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return (a == b) | (torch.isnan(a) & torch.isnan(b))
    return a == b


def moved(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise: changed by more than rounding. A kernel may round another sample's
    rows differently when one sample's values change (CPU attention blocks its keys:
    1e-7 in float32); a dependence moves them by about the perturbation, which is of
    the order of the values themselves."""
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        return a != b
    tol = 1e-10 if a.dtype in (torch.float64, torch.complex128) else 1e-4 if a.element_size() >= 4 else 1e-2
    scale = float(torch.nan_to_num(a.abs(), posinf=0.0).max()) if a.numel() else 0.0
    close = torch.isclose(a, b, rtol=tol, atol=tol * scale)
    return ~(close | (torch.isnan(a) & torch.isnan(b)))


def perturbed(x: Tensor, mask: Tensor, gen: torch.Generator) -> Tensor:
    """``x`` with the elements under ``mask`` changed: noise for floating values; integer
    ones (token ids, positions) moved to the next value of ``[0, x.max()]``, so indices
    stay valid; boolean ones (masks) flipped."""
    if x.dtype.is_floating_point or x.dtype.is_complex:
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
        return torch.where(mask, x + noise * (1 + x.abs()), x)
    if x.dtype == torch.bool:
        return torch.where(mask, ~x, x)
    if x.numel() == 0 or int(x.min()) < 0:
        y = x.clone()
        y[mask] = x[mask].roll(1)
        return y
    return torch.where(mask, (x + 1) % (int(x.max()) + 1), x)


def probe_samples(an: "BatchMixingAnalysis", n: fx.Node, out_tags: Any) -> Optional[str]:
    """None when perturbing each sample's input elements in turn changes only that
    sample's outputs (``out_tags``: the op's assumed tags); otherwise what was found."""
    vals, spec = tree_flatten((an.V(n.args), an.V(n.kwargs)))
    tags = tree_flatten((an.tag(n.args), an.tag(n.kwargs)))[0]
    if len(tags) != len(vals):
        return "its arguments could not be matched to their tags"
    otags = tree_flatten(out_tags)[0]
    live = [i for i, (v, t) in enumerate(zip(vals, tags)) if isinstance(v, Tensor) and isinstance(t, Tensor)
            and tuple(t.shape) == tuple(v.shape) and uniform(t) != NO]
    buffers = [(b, b.detach().clone()) for b in an.submodule(n).buffers()] if n.op == "call_module" else []
    gen = torch.Generator().manual_seed(0)

    def run(values: List[Any]) -> List[Any]:  # on copies: an in-place op writes its input
        args, kwargs = tree_unflatten([v.clone() if isinstance(v, Tensor) else v for v in values], spec)
        try:
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)  # a random op draws the same numbers each run
                return _rerun(an, n, args, kwargs)
        finally:
            for b, v in buffers:
                b.copy_(v)

    try:
        outs = run(list(vals))
        again = run(list(vals))
        if len(again) != len(outs) or not all(not isinstance(a, Tensor) or (isinstance(b, Tensor) and a.shape == b.shape
                                              and bool(same(a, b).all())) for a, b in zip(outs, again)):
            return "it does not give the same result when run again (random?)"
        for s in sorted({int(v) for i in live for v in tags[i].unique().tolist() if v > NO}):
            values = list(vals)
            for i in live:
                mask = tags[i] == s
                if bool(mask.any()):
                    values[i] = perturbed(vals[i], mask, gen)
            for j, (o, o2, t) in enumerate(zip(outs, run(values), otags)):
                if not isinstance(o, Tensor) or not isinstance(t, Tensor):
                    continue
                if not isinstance(o2, Tensor) or o2.shape != o.shape:
                    return f"perturbing sample {s - 1} changed the shape of output {j}"
                elsewhere = moved(o, o2) & (t.expand(o.shape) != s) & (t.expand(o.shape) != MIX)
                if bool(elsewhere.any()):
                    others = sorted({int(v) - 1 for v in t.expand(o.shape)[elsewhere].unique().tolist() if v > NO})
                    whose = f"sample {others[0]}'s" if others else "a shared"
                    return f"perturbing sample {s - 1}'s inputs changed {whose} output"
    except Exception as e:  # the op does not run on perturbed values: nothing tested
        return f"it could not be run on perturbed inputs ({type(e).__name__}: {e})"
    return None
