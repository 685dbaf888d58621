"""Custom ``torch.autograd.Function``s: a capture keeps their forward and drops their backward.

``torch.fx`` and ``torch.export`` both trace *through* ``Function.apply``: the graph holds the
ops of the Function's ``forward``, and the DP model differentiates those ops; the Function's
own ``backward`` never runs. That is the same gradient when the backward is the forward's
derivative written by hand (Bloom's GeLU, a memory-saving recomputation) and another one
when it is not: a gradient reversal layer (backward ``-g``), a straight-through estimator
(``round`` forward, identity backward), a backward that averages over the batch. The DP
guarantee does not depend on it (the DP model clips and noises the gradients it computes);
training does: it would follow other gradients than the model's code defines.

:func:`watch_functions` records the Functions a capture applies. :func:`check_backwards`
runs the model once on a real batch and compares, at each application, the vector-Jacobian
product of the Function's ``backward`` with that of its ``forward``'s ops (one random
cotangent, fixed seed): equal up to rounding, the captured graph trains as the model does.
It is a check at the given inputs, not a proof: a backward that agrees with the forward's
derivative on this batch and not on another (a clipped straight-through estimator whose
inputs all fall inside its window) is not caught.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .host_rng import fork_rng
from .source import user_frame

__all__ = ["Application", "watch_functions", "check_backwards", "SAME_GRADIENT"]

#: Functions whose backward is the forward's derivative by construction: reentrant activation
#: checkpointing recomputes the forward in its backward
SAME_GRADIENT = frozenset({"torch.utils.checkpoint.CheckpointFunction"})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _trusted(cls: type) -> bool:
    # fxdp's own Functions (capture ops, the recurrent scan) are tested against the definition
    return _qualname(cls) in SAME_GRADIENT or cls.__module__.split(".")[0] == "fxdp"


@dataclass
class Application:
    """One ``Function.apply`` seen: its class, where the model calls it, and (after
    :func:`check_backwards`) the relative difference of the two vector-Jacobian products
    (``None``: not checked; ``math.inf``: the forward could not be differentiated)."""

    name: str
    source: Optional[str]
    difference: Optional[float] = None
    reason: str = ""
    tolerance: float = 0.0

    @property
    def same_gradient(self) -> bool:
        return self.difference is not None and self.difference <= self.tolerance


@contextlib.contextmanager
def _patched_apply(hook: Callable[[type, Tuple[Any, ...], dict, Callable[..., Any]], Any]) -> Iterator[None]:
    """``Function.apply`` calls ``hook(cls, args, kwargs, apply)`` for Functions that are not
    trusted (``apply(*args)`` applies the Function with ``kwargs``)."""
    raw = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if _trusted(cls):
            return raw.__func__(cls, *args, **kwargs)
        return hook(cls, args, kwargs, lambda *a: raw.__func__(cls, *a, **kwargs))

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = raw  # type: ignore[assignment]


@contextlib.contextmanager
def watch_functions() -> Iterator[List[Application]]:
    """Record the custom Functions applied to tensors (or tracing proxies) in the block."""
    seen: List[Application] = []

    def hook(cls: type, args: Tuple[Any, ...], kwargs: dict, apply: Callable[..., Any]) -> Any:
        if any(isinstance(a, (Tensor, torch.fx.Proxy)) for a in tree_flatten((args, kwargs))[0]):
            source = user_frame()
            if not any(a.name == cls.__name__ and a.source == source for a in seen):
                seen.append(Application(cls.__name__, source))
        return apply(*args)

    with _patched_apply(hook):
        yield seen


class _Ctx:
    """A stand-in ``ctx`` to run an old-style ``forward(ctx, ...)`` outside ``apply``."""

    def __init__(self, args: Tuple[Any, ...]) -> None:
        self.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        self.saved_tensors: Tuple[Tensor, ...] = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *tensors: Any) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value


def _forward_ops(cls: type, args: Tuple[Any, ...], kwargs: dict) -> Any:
    """The Function's forward run as plain ops (what a capture records), with autograd on."""
    old_style = cls.setup_context is torch.autograd.function._SingleLevelFunction.setup_context
    with torch.enable_grad():
        return cls.forward(_Ctx(args), *args, **kwargs) if old_style else cls.forward(*args, **kwargs)


def _tolerance(dtype: torch.dtype) -> float:
    # hand-written derivatives round differently from autograd's: sqrt(eps) is far above rounding
    # and far below any real difference (a sign, a dropped term)
    return 10 * math.sqrt(torch.finfo(dtype).eps)


def _vjp_difference(cls: type, args: Tuple[Any, ...], kwargs: dict,
                    apply: Callable[..., Any]) -> Tuple[Optional[float], str]:
    """Relative difference of backward's and forward's vector-Jacobian products at ``args``
    (``None``: no gradient flows through this application)."""
    leaves = {i: a.detach().requires_grad_() for i, a in enumerate(args)
              if isinstance(a, Tensor) and a.requires_grad and (a.is_floating_point() or a.is_complex())}
    if not leaves:
        return None, ""
    call = tuple(leaves.get(i, a) for i, a in enumerate(args))
    inputs = list(leaves.values())

    def outputs(out: Any) -> List[Tensor]:
        return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]

    # both runs from the same random state: a forward that draws (SEW-D's XDropout) draws the same
    with fork_rng(call):
        custom = outputs(apply(*call))
    try:
        with fork_rng(call):
            plain = outputs(_forward_ops(cls, call, kwargs))
    except Exception as e:  # a forward that only runs inside apply
        return math.inf, f"its forward does not run outside apply ({type(e).__name__}: {e})"
    if len(custom) != len(plain) or any(a.shape != b.shape for a, b in zip(custom, plain)):
        return math.inf, "its forward gives other outputs outside apply"
    gen = torch.Generator(device=custom[0].device if custom else "cpu").manual_seed(0)
    pairs = [(c, p, torch.randn(c.shape, generator=gen, dtype=c.dtype, device=c.device))
             for c, p in zip(custom, plain) if c.requires_grad or p.requires_grad]
    if not pairs:
        return None, ""

    def vjp(outs: List[Tensor]) -> List[Tensor]:
        live = [(o, v) for o, v in outs if o.requires_grad]
        if not live:
            return [torch.zeros_like(x) for x in inputs]
        grads = torch.autograd.grad([o for o, _ in live], inputs, [v for _, v in live], allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]

    a = vjp([(c, v) for c, _, v in pairs])
    try:
        b = vjp([(p, v) for _, p, v in pairs])
    except RuntimeError as e:  # the forward writes in place into a value autograd saved (SEW-D's XSoftmax)
        return math.inf, f"its forward's ops cannot be differentiated ({str(e).splitlines()[0][:160]})"
    diff = 0.0
    for x, y in zip(a, b):
        scale = max(x.norm().item(), y.norm().item())
        if scale > 0:
            diff = max(diff, (x - y).norm().item() / scale)
    return diff, ""


def check_backwards(model: nn.Module, args: Tuple[Any, ...], kwargs: dict) -> List[Application]:
    """Run ``model(*args, **kwargs)`` once and check every custom Function it applies (see the
    module docstring): each mismatch, and one passing application of each other Function. The
    caller restores the model's state."""
    checked: List[Application] = []

    def hook(cls: type, call_args: Tuple[Any, ...], kwargs: dict, apply: Callable[..., Any]) -> Any:
        out = apply(*call_args)
        with fork_rng(call_args, kwargs):  # the model's own draws go on as without the check
            diff, reason = _vjp_difference(cls, call_args, kwargs, apply)
        if diff is not None:
            found = Application(cls.__name__, user_frame(), diff, reason, _tolerance(_dtype_of(call_args)))
            if not found.same_gradient or not any(c.name == found.name for c in checked):
                checked.append(found)
        return out

    with fork_rng(args, kwargs), _patched_apply(hook), torch.enable_grad():
        model(*args, **kwargs)
    return checked


def _dtype_of(args: Tuple[Any, ...]) -> torch.dtype:
    floats = [a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()]
    return min(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32
