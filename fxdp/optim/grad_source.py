"""Where a DP optimizer step gets its clipped sums: one interface, two implementations.

A step asks its source ``clip_and_sum(params, clipping)`` for ``sum_i c_i g_i`` of
every parameter, the per-sample norms and the factors (:class:`~fxdp.optim.clip.ClipResult`).

* :class:`MaterializedGradients` (``grad_sample_mode="materialize"``, Opacus' hooks mode)
  reads the per-sample gradients ``p.grad_sample`` the capture ops wrote.
* :class:`fxdp.bookkeeping.BookKeeping` (``"bk"``, the default of ``make_private``) forms
  norms and clipped sums from the records the capture ops kept, without per-sample
  gradients (Bu et al. 2023).

Both compute their factors with :meth:`fxdp.optim.clip.Clipping.factors`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .clip import ClipResult, Clipping, clipped_sum, per_param_sample_norms

__all__ = ["ClippedSumSource", "MaterializedGradients", "mark_as_processed", "is_processed"]


# Using the same per-sample gradients in two steps would release them twice while the
# accountant counts one step, so consumed tensors are tagged and zero_grad() is required
# (Opacus' convention, whose helper names fxdp.optimizers.optimizer re-exports).
def mark_as_processed(obj: Tensor | list[Tensor]) -> None:
    for t in obj if isinstance(obj, list) else [obj]:
        t._processed = True


def is_processed(obj: Tensor | list[Tensor]) -> bool:
    return any(hasattr(t, "_processed") for t in (obj if isinstance(obj, list) else [obj]))


class ClippedSumSource:
    """The interface a :class:`~fxdp.optim.DPOptimizer` step reads clipped sums through."""

    #: whether :meth:`clip_and_sum` also takes ``into`` and ``into_scale``: add the scaled
    #: sums into the tensors ``into()`` returns (called once every factor is known) and
    #: return no sums, so the optimizer can draw the noise first and add each sum into it
    sums_into = False

    def check(self, params: Sequence[nn.Parameter]) -> int:
        """Raise (changing nothing) unless a backward pass left something to clip; return
        the number of backward passes accumulated since the last step."""
        raise NotImplementedError

    def accumulated_passes(self, params: Sequence[nn.Parameter]) -> int:
        """Backward passes of the current step, also after :meth:`clip_and_sum` consumed them."""
        raise NotImplementedError

    def clip_and_sum(self, params: Sequence[nn.Parameter], clipping: Clipping) -> ClipResult:
        """Clip every sample's gradient with ``clipping`` and sum, per parameter."""
        raise NotImplementedError

    def clear(self, params: Sequence[nn.Parameter]) -> None:
        """Forget everything of the current step (``optimizer.zero_grad()``)."""
        raise NotImplementedError


class MaterializedGradients(ClippedSumSource):
    """Clipped sums from the per-sample gradients ``p.grad_sample`` (``[B, *p.shape]``,
    or a list with one such tensor per accumulated backward pass)."""

    @staticmethod
    def grad_sample(p: nn.Parameter, index: int | None = None) -> Tensor:
        """``p.grad_sample`` as one ``[B, *p.shape]`` tensor (lists are concatenated)."""
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            where = f"parameter #{index} " if index is not None else "a parameter "
            raise ValueError(
                f"per-sample gradients are missing: {where}(shape {tuple(p.shape)}) requires "
                "grad but has no p.grad_sample. Either the model was not made private (so "
                "backward does not compute per-sample gradients), loss.backward() was not "
                "called before optimizer.step(), or the parameter is unused in the forward "
                "pass (freeze it with p.requires_grad_(False))"
                + (", or it was frozen when the model was privatized and unfrozen later (it has an ordinary "
                   "gradient but no capture op serves it: call make_private again after unfreezing)."
                   if p.grad is not None else ".")
            )
        if isinstance(gs, Tensor):
            return gs
        if isinstance(gs, list) and gs:
            return torch.cat(gs, dim=0)
        raise ValueError(f"p.grad_sample must be a tensor or a non-empty list of tensors, got {type(gs).__name__}")

    def check(self, params: Sequence[nn.Parameter]) -> int:
        # shapes and batch sizes from the pieces (no concatenation: clip_and_sum does that once)
        sizes, shapes = set(), []
        for k, p in enumerate(params):
            gs = getattr(p, "grad_sample", None)
            if gs is None or (isinstance(gs, list) and not gs) or not isinstance(gs, (Tensor, list)):
                self.grad_sample(p, k)  # raises the explanatory error
            if is_processed(gs):
                raise ValueError(
                    f"per-sample gradients of parameter #{k} were already used by a previous "
                    "optimizer.step(); call optimizer.zero_grad() after every step (reusing "
                    "them would release the same data twice while privacy is counted once)"
                )
            pieces = gs if isinstance(gs, list) else [gs]
            sizes.add(sum(int(g.shape[0]) for g in pieces))
            shapes.append((k, p, [tuple(g.shape) for g in pieces]))
        if len(sizes) > 1:
            raise ValueError(f"per-sample gradients disagree on the batch size across parameters: {sorted(sizes)}")
        for k, p, got in shapes:
            bad = [s for s in got if s[1:] != tuple(p.shape)]
            if bad:
                raise ValueError(
                    f"p.grad_sample of parameter #{k} has shape {bad[0]}, expected "
                    f"[B, {', '.join(map(str, p.shape))}]"
                )
        return self.accumulated_passes(params)

    def accumulated_passes(self, params: Sequence[nn.Parameter]) -> int:
        counts = set()
        for k, p in enumerate(params):
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                self.grad_sample(p, k)  # raises the explanatory error
            counts.add(len(gs) if isinstance(gs, list) else 1)
        if len(counts) > 1:
            raise ValueError(f"number of accumulated backward passes differs across parameters: {sorted(counts)}")
        return counts.pop() if counts else 1

    def clip_and_sum(self, params: Sequence[nn.Parameter], clipping: Clipping) -> ClipResult:
        grad_samples = [self.grad_sample(p, k) for k, p in enumerate(params)]
        norms = per_param_sample_norms(grad_samples)
        factors, ok = clipping.factors(norms, [p.shape for p in params])
        if ok is not None:  # dropped samples: zero rows (0 * nan is nan) and zero norms
            grad_samples = [torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g, 0) for g in grad_samples]
            norms = torch.where(ok[:, None], norms, 0)
        # in each parameter's dtype, at least float32 (``sum_dtype``: rounded to a half precision
        # only after the noise)
        sums = clipped_sum([g.to(p.dtype) for p, g in zip(params, grad_samples)], factors)
        for p in params:
            mark_as_processed(p.grad_sample)
        return ClipResult(sums, norms.detach(), factors.detach())

    def clear(self, params: Sequence[nn.Parameter]) -> None:
        for p in params:
            p.grad_sample = None
