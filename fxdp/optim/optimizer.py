"""DP-SGD optimizer wrappers (Abadi et al. 2016, "Deep Learning with Differential Privacy").

API-compatible with ``opacus.optimizers``: wrap any ``torch.optim.Optimizer``; after
``loss.backward()`` every trainable parameter carries ``p.grad_sample`` (``[B, *p.shape]``,
or a list of such tensors when several backward passes are accumulated), and ``step()``

1. clips each sample's gradient to norm ``C`` and sums (``p.summed_grad``, accumulated
   over skipped steps, see :meth:`DPOptimizer.signal_skip_step`),
2. adds ``N(0, (sigma * C)^2)`` once per step (the Gaussian mechanism on a sum whose
   L2 sensitivity is ``C``),
3. divides by the *expected* batch size for a mean loss (the actual Poisson batch size
   is private, so it must not enter the update),
4. writes ``p.grad`` and runs the wrapped optimizer.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence
from numbers import Real
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .clip import (
    ClipStats,
    adaptive_gradient_noise_multiplier,
    clip_factors,
    clip_statistics,
    clipped_sum,
    first_non_finite,
    geometric_clipbound_update,
    per_param_sample_norms,
    private_unclipped_fraction,
)
from ..errors import PerSampleGradientError
from .noise import gaussian_noise, noisy_sum, secure_generator
from .secure import is_secure

__all__ = [
    "DPOptimizer",
    "DPPerLayerOptimizer",
    "AdaClipDPOptimizer",
]

StepHook = Callable[["DPOptimizer"], None]

_DP_STATE_KEY = "dp_state"


# --- validation helpers ---------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_nonneg(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    return float(value)


def _check_positive(name: str, value: Any, allow_inf: bool = False) -> float:
    ok = _is_real(value) and value > 0 and (allow_inf or math.isfinite(value))
    if not ok:
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
    return float(value)


# --- marks against reusing gradients (as Opacus) --------------------------------------
# Using the same per-sample gradients in two steps would release them twice while the
# accountant counts one step, so consumed tensors are tagged and zero_grad() is required.


def _mark_as_processed(obj: Tensor | list[Tensor]) -> None:
    for t in obj if isinstance(obj, list) else [obj]:
        t._processed = True


def _is_processed(obj: Tensor | list[Tensor]) -> bool:
    return any(hasattr(t, "_processed") for t in (obj if isinstance(obj, list) else [obj]))


def _check_processed_flag(obj: Tensor | list[Tensor]) -> None:
    """Raise if ``obj`` (a ``grad_sample`` or ``summed_grad``) was already used by a step
    (Opacus' helper): consuming it twice would clip or noise one batch twice."""
    if _is_processed(obj):
        raise ValueError(
            "this tensor was already processed by a DP step (clipped or noised). "
            "Fix: call optimizer.zero_grad() after every optimizer.step()"
        )


def _init_signature(cls: type) -> inspect.Signature:
    sig = inspect.signature(cls.__init__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _params(optimizer: Optimizer) -> list[nn.Parameter]:
    """Trainable parameters of all ``param_groups``, in order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _warn_dropped(norms: Tensor) -> None:
    import warnings

    idx = (~torch.isfinite(norms)).any(dim=1).nonzero().reshape(-1).tolist()
    warnings.warn(
        f"nonfinite='drop': sample indices {idx} of the current batch have a non-finite per-sample "
        "gradient; their contribution was dropped (clip factor 0), they stay counted in the accounting",
        RuntimeWarning,
        stacklevel=4,
    )


class DPOptimizer(Optimizer):
    """DP-SGD wrapper of a ``torch.optim.Optimizer`` (Abadi et al. 2016), Opacus API.

    ``clipping`` selects the subclass: ``"flat"`` (this class, one bound ``C`` over all
    parameters together), ``"per_layer"`` (:class:`DPPerLayerOptimizer`) or
    ``"adaptive"`` (:class:`AdaClipDPOptimizer`); ``DPOptimizer(..., clipping=m)`` returns
    an instance of the matching class.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects,
    so LR schedulers built on the ``DPOptimizer`` drive the wrapped one.

    Step order (what an engine can hook into):

    1. ``register_step_guard`` callbacks (only for steps that will update parameters),
       before anything is touched: raising there leaves parameters, gradients, optimizer
       state, noise generator and clip bound unchanged (e.g. a privacy-budget check);
    2. clip + accumulate (raises ``FloatingPointError`` on a non-finite sample gradient,
       before accumulating);
    3. if ``signal_skip_step(True)`` was queued: stop here (virtual batch continues);
    4. add noise, scale by the expected batch size;
    5. ``attach_step_hook`` callback (privacy accounting: ``noise_multiplier`` and
       ``accumulated_iterations`` are valid here);
    6. the wrapped optimizer's ``step()``.
    """

    _clipping = "flat"
    #: NaN/inf per-sample gradient: "raise" FloatingPointError, or "drop" (clip factor 0)
    nonfinite = "raise"

    def __new__(cls, *args: Any, clipping: str = "flat", **kwargs: Any) -> DPOptimizer:
        # DPOptimizer(..., clipping="per_layer") builds the per-layer subclass, so code
        # written against one constructor gets the right class (and isinstance checks).
        if cls is DPOptimizer:
            if clipping not in _CLASSES:
                raise ValueError(f"unknown clipping mode clipping={clipping!r}; expected one of {sorted(_CLASSES)}")
            cls = _CLASSES[clipping]
        return object.__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = _init_signature(cls)  # help()/IDEs show __init__, not __new__

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        expected_batch_size: int | None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        clipping: str = "flat",
    ) -> None:
        """
        Args:
            optimizer: the optimizer to wrap (SGD, Adam, AdamW, RMSprop, ...).
            noise_multiplier: ``sigma``; the noise std is ``sigma * max_grad_norm``.
            max_grad_norm: clip bound ``C`` (a list of per-parameter bounds for
                ``clipping="per_layer"``).
            expected_batch_size: ``q * N``, the denominator for ``loss_reduction="mean"``
                (required then); ignored for ``"sum"``.
            loss_reduction: ``"mean"`` or ``"sum"``, as the training loss.
            generator: source of noise randomness; ``None`` uses the global RNG
                (or, with ``secure_mode``, a generator seeded from ``os.urandom``).
            secure_mode: draw noise from an unpredictable generator (see
                :func:`fxdp.optim.noise.secure_generator`).
            clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
        """
        if clipping != self._clipping:
            raise ValueError(
                f"{type(self).__name__} implements clipping={self._clipping!r}, got "
                f"clipping={clipping!r}; construct DPOptimizer(..., clipping={clipping!r}) "
                "or use get_optimizer_class(clipping)"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer is already a DPOptimizer; wrapping twice would clip and noise twice")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got loss_reduction={loss_reduction!r}")
        if expected_batch_size is not None or loss_reduction == "mean":
            if not (
                _is_real(expected_batch_size)
                and math.isfinite(expected_batch_size)
                and expected_batch_size > 0
            ):
                raise ValueError(
                    "expected_batch_size must be a number > 0 (the expected Poisson batch size "
                    f"q*N, the denominator of a mean loss), got expected_batch_size={expected_batch_size!r}"
                    + (" with loss_reduction='mean'" if loss_reduction == "mean" else "")
                )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

        self.original_optimizer = optimizer
        self.clipping = clipping
        self.noise_multiplier = _check_nonneg("noise_multiplier", noise_multiplier)
        if self.noise_multiplier > 1e6:  # failure handling: an argument-order or unit mistake
            raise ValueError(
                f"noise_multiplier={noise_multiplier!r} is absurdly large (> 1e6): the update would be pure "
                "noise. Fix: noise_multiplier is the noise std divided by max_grad_norm, typically 0.5-10"
            )
        self.loss_reduction = loss_reduction
        self.expected_batch_size = expected_batch_size
        self.secure_mode = bool(secure_mode)
        if self.secure_mode and generator is not None and not is_secure(generator):
            raise ValueError(
                "secure_mode=True needs noise from a cryptographically secure generator, but a seedable "
                "torch.Generator was given. Fix: pass generator=None (fxdp creates a secure one) or "
                "fxdp.optim.noise.secure_generator()."
            )
        if generator is None and self.secure_mode:
            params = self.params
            generator = secure_generator(params[0].device if params else None)
        self.generator = generator
        self.step_hook: StepHook | None = None
        self._step_guards: OrderedDict[int, StepHook] = OrderedDict()
        self._step_skip_queue: list[bool] = []
        self._is_last_step_skipped = False
        # per-sample norms / clipped masks of the logical batch being accumulated, and of
        # the last completed step (turned into ClipStats lazily, to avoid device syncs)
        self._pending_norms: list[Tensor] = []
        self._pending_clipped: list[Tensor] = []
        self._last_clip: tuple[Tensor, Tensor, float] | None = None
        self._clip_stats: ClipStats | None = None
        self._init_clipping(max_grad_norm)
        #: book-keeping source of clipped sums (fxdp.capture.Recorder), if attached
        self._recorder: Any = None
        self._bk_passes = 0

        for p in self.params:
            p.summed_grad = None

    # -- clipping strategy (overridden by subclasses) ----------------------------------

    def _init_clipping(self, max_grad_norm: Any) -> None:
        if not _is_real(max_grad_norm):
            raise ValueError(
                "flat clipping takes one bound, got max_grad_norm="
                f"{max_grad_norm!r}; for one bound per parameter use clipping='per_layer'"
            )
        self.max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)

    def _clip_factors(self, norms: Tensor) -> Tensor:
        """Clip factors from the ``[B, K]`` per-parameter norms: ``[B]`` or ``[B, K]``."""
        return clip_factors(torch.linalg.vector_norm(norms, dim=1), self.max_grad_norm)

    def _noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    # -- Optimizer proxying --------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        """The wrapped optimizer's ``param_groups`` (the same list object)."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups: list[dict]) -> None:
        self.original_optimizer.param_groups = param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's ``state``."""
        return self.original_optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        """The wrapped optimizer's ``defaults``."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict) -> None:
        self.original_optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)
        for p in self.original_optimizer.param_groups[-1]["params"]:
            p.summed_grad = None

    # torch's step / state-dict hooks act on the wrapped optimizer: step hooks thus run
    # around the real parameter update only (not around skipped, accumulate-only steps).
    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        return self.original_optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable) -> RemovableHandle:
        return self.original_optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.original_optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.original_optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.original_optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.original_optimizer.register_load_state_dict_post_hook(hook, prepend)

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep everything.
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(noise_multiplier={self.noise_multiplier}, "
            f"max_grad_norm={self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"loss_reduction={self.loss_reduction!r}, clipping={self.clipping!r}, "
            f"secure_mode={self.secure_mode})\nwrapping {self.original_optimizer!r}"
        )

    # -- per-sample gradients ----------------------------------------------------------

    @property
    def params(self) -> list[nn.Parameter]:
        """Flat list of the trainable parameters of all ``param_groups``."""
        return _params(self)

    def _get_flat_grad_sample(self, p: nn.Parameter, index: int | None = None) -> Tensor:
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
        raise ValueError(
            f"p.grad_sample must be a tensor or a non-empty list of tensors, got {type(gs).__name__}"
        )

    @property
    def grad_samples(self) -> list[Tensor]:
        """Per-sample gradients, one ``[B, *p.shape]`` tensor per parameter."""
        return [self._get_flat_grad_sample(p, k) for k, p in enumerate(self.params)]

    @property
    def accumulated_iterations(self) -> int:
        """Number of backward passes accumulated in ``p.grad_sample`` since the last step.

        Privacy accountants multiply the sample rate by it (Opacus semantics).
        """
        if self._recorder is not None:
            return max(self._bk_passes, 1)
        counts = set()
        for k, p in enumerate(self.params):
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                self._get_flat_grad_sample(p, k)  # raises the explanatory error
            counts.add(len(gs) if isinstance(gs, list) else 1)
        if len(counts) > 1:
            raise ValueError(
                f"number of accumulated backward passes differs across parameters: {sorted(counts)}"
            )
        return counts.pop() if counts else 1

    def _checked_grad_samples(self) -> list[Tensor]:
        """Grad samples after the checks that must pass before anything is mutated."""
        params = self.params
        grad_samples = self.grad_samples
        for k, p in enumerate(params):
            if _is_processed(p.grad_sample):
                raise ValueError(
                    f"per-sample gradients of parameter #{k} were already used by a previous "
                    "optimizer.step(); call optimizer.zero_grad() after every step (reusing "
                    "them would release the same data twice while privacy is counted once)"
                )
        sizes = {int(g.shape[0]) for g in grad_samples}
        if len(sizes) > 1:
            raise ValueError(
                f"per-sample gradients disagree on the batch size across parameters: {sorted(sizes)}"
            )
        for k, (p, g) in enumerate(zip(params, grad_samples)):
            if tuple(g.shape[1:]) != tuple(p.shape):
                raise ValueError(
                    f"p.grad_sample of parameter #{k} has shape {tuple(g.shape)}, expected "
                    f"[B, {', '.join(map(str, p.shape))}]"
                )
        return grad_samples

    # -- the DP step -------------------------------------------------------------------

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Queue whether the next ``step()`` only clips and accumulates (virtual batches).

        A skipped step adds its clipped sum to ``p.summed_grad`` but adds no noise, runs no
        hooks and leaves the parameters alone; the following ``zero_grad()`` keeps
        ``p.summed_grad``. Used by :class:`fxdp.data.BatchMemoryManager`.
        """
        self._step_skip_queue.append(bool(do_skip))

    def _check_skip_next_step(self, pop_next: bool = True) -> bool:
        if not self._step_skip_queue:
            return False
        return self._step_skip_queue.pop(0) if pop_next else self._step_skip_queue[0]

    def attach_step_hook(self, fn: StepHook) -> None:
        """Set the hook called after noise, before the parameter update (Opacus semantics).

        It runs once per non-skipped step with the optimizer as argument, typically a
        privacy accountant's ``step``; a second call replaces the hook.
        """
        self.step_hook = fn

    def register_step_guard(self, fn: StepHook) -> RemovableHandle:
        """Register ``fn(optimizer)`` to run first in every step that will update parameters.

        Guards run before clipping or noise touch any state, so raising from one (say,
        the privacy budget would be exceeded) aborts the step with parameters, ``p.grad``,
        ``p.summed_grad``, optimizer state, noise generator and clip bound unchanged.
        Skipped (accumulate-only) steps do not run guards.
        """
        handle = RemovableHandle(self._step_guards)
        self._step_guards[handle.id] = fn
        return handle

    def clip_and_accumulate(self) -> None:
        """Clip each sample's gradient and add the sum to ``p.summed_grad``."""
        self._clip_and_accumulate(self._checked_grad_samples())

    # -- book-keeping (fxdp.bookkeeping): clipped sums without per-sample gradients -----

    def attach_bookkeeping(self, recorder: Any) -> None:
        """Take clipped sums from a privatized model in ``grad_sample_mode="bk"``.

        The model's capture ops form ``sum_i c_i g_i`` at the end of each backward
        pass with this optimizer's clip bound(s) (read at that moment, so adaptive
        clipping and clip schedulers apply); ``step()`` then noises and applies them.
        """
        from ..capture import ClipConfig

        ids = [id(p) for p in self.params]
        if self.clipping == "per_layer":
            recorder.clipping = ClipConfig(
                bounds=lambda: dict(zip(ids, self.max_grad_norms)), per_layer=True, params=frozenset(ids)
            )
        else:
            recorder.clipping = ClipConfig(bounds=lambda: self.max_grad_norm, params=frozenset(ids))
        self._recorder = recorder

    def _bk_check(self) -> None:
        rec = self._recorder
        if rec.passes == 0:
            raise ValueError(
                "no clipped gradients: call loss.backward() on the privatized model (in training mode) "
                "before optimizer.step(), and optimizer.zero_grad() after it"
            )
        for norms in rec.norms:
            bad = first_non_finite(norms if norms.dim() == 2 else norms[:, None])
            if bad is not None and self.nonfinite == "drop":  # the recorder zeroed their factors
                _warn_dropped(norms if norms.dim() == 2 else norms[:, None])
            elif bad is not None:
                raise FloatingPointError(
                    f"non-finite per-sample gradient: sample index {bad[0]} of the current batch has "
                    "gradient norm " + str(float(norms[bad[0]].flatten()[0 if norms.dim() == 1 else bad[1]]))
                    + "; the step was not applied. Check the loss/inputs of that sample."
                )

    def _bk_accumulate(self) -> None:
        rec = self._recorder
        for p in self.params:
            s = rec.clipped.get(id(p))
            if s is None and p.grad is not None:
                raise PerSampleGradientError(
                    f"a parameter of shape {tuple(p.shape)} got an ordinary (non-private) gradient but no "
                    "per-sample one: it was frozen (requires_grad=False) when the model was privatized and "
                    "unfrozen later, so no capture op serves it. The step was not applied. Fix: unfreeze it "
                    "before make_private, or call make_private again (on the original model) after unfreezing"
                )
            if s is None:
                s = torch.zeros_like(p)  # not reached by the backward pass: zero for every sample
            if p.summed_grad is None:
                p.summed_grad = s
            else:
                p.summed_grad.add_(s)
        for norms, factors in zip(rec.norms, rec.factors):
            clipped = factors < 1
            self._pending_norms.append(torch.linalg.vector_norm(norms, dim=1) if norms.dim() == 2 else norms)
            self._pending_clipped.append(clipped.any(dim=1) if clipped.dim() == 2 else clipped)
        self._bk_passes = rec.passes
        self._bk_reset()

    def _bk_reset(self) -> None:
        rec = self._recorder
        rec.clipped.clear()
        rec.clipped_params.clear()
        rec.norms.clear()
        rec.factors.clear()
        rec.passes = 0

    def _clip_and_accumulate(self, grad_samples: list[Tensor]) -> None:
        params = self.params
        norms = per_param_sample_norms(grad_samples)
        bad = first_non_finite(norms)
        if bad is not None and self.nonfinite == "drop":
            # clip factor 0 and zeroed rows (0 * nan is nan): the sample adds nothing
            _warn_dropped(norms)
            ok = torch.isfinite(norms).all(dim=1)
            grad_samples = [torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g, 0) for g in grad_samples]
            norms = torch.where(ok[:, None], norms, 0)
        elif bad is not None:
            i, k = bad
            raise FloatingPointError(
                f"non-finite per-sample gradient: sample index {i} of the current batch "
                f"(parameter #{k}, shape {tuple(params[k].shape)}) has gradient norm "
                f"{float(norms[i, k])}; the step was not applied. Check the loss/inputs of "
                "that sample (e.g. log of 0, division by 0, overflow in low precision)."
            )
        factors = self._clip_factors(norms)
        self._pending_norms.append(torch.linalg.vector_norm(norms, dim=1).detach())
        clipped = factors < 1
        self._pending_clipped.append(clipped.any(dim=1) if clipped.dim() == 2 else clipped)
        # Mixed precision: accumulate in the parameter dtype (usually fp32).
        sums = clipped_sum([g.to(p.dtype) for p, g in zip(params, grad_samples)], factors)
        for p, s in zip(params, sums):
            if p.summed_grad is None:
                p.summed_grad = s
            else:
                p.summed_grad.add_(s)
            _mark_as_processed(p.grad_sample)

    def _finish_clip_stats(self) -> None:
        device = self._pending_norms[0].device
        norms = torch.cat([n.to(device) for n in self._pending_norms])
        clipped = torch.cat([c.to(device) for c in self._pending_clipped])
        self._last_clip = (norms, clipped, self.max_grad_norm)
        self._clip_stats = None
        self._pending_norms, self._pending_clipped = [], []

    @property
    def clip_stats(self) -> ClipStats | None:
        """Norm statistics of the samples of the last completed step (``None`` before one).

        Fraction of samples clipped (per-layer: clipped in any parameter), mean norm and
        min/25%/50%/75%/max of the per-sample gradient norms over the whole logical batch,
        and the bound used. Not differentially private; for tuning ``max_grad_norm``.
        """
        if self._clip_stats is None and self._last_clip is not None:
            self._clip_stats = clip_statistics(*self._last_clip)
        return self._clip_stats

    def add_noise(self) -> None:
        """Set ``p.grad = p.summed_grad + N(0, std^2)`` with ``std = sigma * C``."""
        if self._pending_norms:  # the logical batch is complete: fix its clip statistics
            self._finish_clip_stats()
        std = self._noise_std()
        for k, p in enumerate(self.params):
            if p.summed_grad is None:
                raise ValueError(f"parameter #{k} has no p.summed_grad; call clip_and_accumulate() first")
            if _is_processed(p.summed_grad):
                raise ValueError(
                    "clipped gradients were already noised; call optimizer.zero_grad() after every step"
                )
            # secure generators: CSPRNG noise and a snapped float64 sum (Mironov 2012)
            p.grad = noisy_sum(p.summed_grad, std, generator=self.generator).view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide ``p.grad`` by ``expected_batch_size * accumulated_iterations`` for a mean loss."""
        if self.loss_reduction == "mean":
            denom = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= denom

    def pre_step(self, closure: Callable[[], Any] | None = None) -> bool:
        """Everything of a DP step except the wrapped update; ``False`` if it was skipped."""
        if not self.params:
            return True  # nothing trainable: behave as the wrapped optimizer
        bk = self._recorder is not None
        if bk:
            self._bk_check()
            self._bk_passes = self._recorder.passes  # guards see accumulated_iterations
        else:
            grad_samples = self._checked_grad_samples()
        if not self._check_skip_next_step(pop_next=False):
            for guard in list(self._step_guards.values()):
                guard(self)
        if bk:
            self._bk_accumulate()
        else:
            self._clip_and_accumulate(grad_samples)
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook is not None:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """DP step; with a ``closure`` it is evaluated first and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            out = self.original_optimizer.step()
            return loss if closure is not None else out
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (as torch), ``p.grad_sample`` and, unless the last step was
        skipped, ``p.summed_grad``. Per-sample tensors are always set to ``None``.
        """
        for p in self.params:
            p.grad_sample = None
            if not self._is_last_step_skipped:
                p.summed_grad = None
        if not self._is_last_step_skipped:
            self._pending_norms, self._pending_clipped = [], []
        if self._recorder is not None:
            self._bk_reset()
        self.original_optimizer.zero_grad(set_to_none)

    # -- checkpoints -------------------------------------------------------------------

    def _dp_state_dict(self) -> dict[str, Any]:
        return {}

    def _load_dp_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, plus ``"dp_state"`` where the DP part has
        mutable state (the adaptive clip bound). Tensors and plain containers only, so
        ``torch.load(weights_only=True)`` reads it; a plain torch optimizer ignores the key.
        """
        state = self.original_optimizer.state_dict()
        dp = self._dp_state_dict()
        if dp:
            state[_DP_STATE_KEY] = dp
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        dp = state_dict.pop(_DP_STATE_KEY, None)
        self.original_optimizer.load_state_dict(state_dict)
        if dp is not None:
            self._load_dp_state_dict(dp)

    def noise_generator_state(self) -> Tensor | None:
        """State of the dedicated noise generator, for checkpoints.

        ``None`` when there is nothing to restore: no generator was given (noise uses the
        global RNG, which the caller checkpoints with ``torch.get_rng_state()``) or
        ``secure_mode`` is on (secure noise must not be replayable).
        """
        if self.generator is None or self.secure_mode:
            return None
        return self.generator.get_state()

    def set_noise_generator_state(self, state: Tensor | None) -> None:
        """Restore :meth:`noise_generator_state`; ``None`` is a no-op."""
        if state is None:
            return
        if self.secure_mode:
            raise ValueError(
                "secure_mode: the noise generator state cannot be restored (noise must not be replayable)"
            )
        if self.generator is None:
            raise ValueError(
                "this optimizer has no dedicated noise generator (noise uses the global RNG); "
                "pass generator=torch.Generator() to restore a noise generator state"
            )
        self.generator.set_state(state)


class DPPerLayerOptimizer(DPOptimizer):
    """DP-SGD with per-layer clipping (McMahan et al. 2018; Opacus ``DPPerLayerOptimizer``).

    ``max_grad_norm`` is a list with one bound ``C_k`` per trainable parameter; each
    sample's gradient of parameter ``k`` is clipped to ``C_k``. The clipped per-sample
    gradient then has total norm at most ``C = sqrt(sum_k C_k^2)``, the sensitivity of
    the sum, so every coordinate gets noise of std ``sigma * C`` and the privacy is that
    of flat clipping with bound ``C``. ``max_grad_norm`` holds ``C``, ``max_grad_norms``
    the list.
    """

    _clipping = "per_layer"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: Sequence[float],
        expected_batch_size: int | None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        clipping: str = "per_layer",
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            clipping=clipping,
        )

    def _init_clipping(self, max_grad_norm: Any) -> None:
        if _is_real(max_grad_norm) or not isinstance(max_grad_norm, Sequence):
            raise ValueError(
                "per_layer clipping needs max_grad_norm as a list with one bound per trainable "
                f"parameter, got max_grad_norm={max_grad_norm!r}"
            )
        n = len(self.params)
        if len(max_grad_norm) != n:
            raise ValueError(
                f"per_layer clipping: got {len(max_grad_norm)} bounds in max_grad_norm for "
                f"{n} trainable parameters; pass exactly one bound per parameter"
            )
        self.max_grad_norms = [_check_positive(f"max_grad_norm[{k}]", c) for k, c in enumerate(max_grad_norm)]
        self.max_grad_norm = math.sqrt(sum(c * c for c in self.max_grad_norms))

    def _clip_factors(self, norms: Tensor) -> Tensor:
        if norms.shape[1] != len(self.max_grad_norms):
            raise ValueError(
                f"per_layer clipping: {len(self.max_grad_norms)} bounds for "
                f"{norms.shape[1]} trainable parameters (parameters were added or unfrozen)"
            )
        bounds = torch.tensor(self.max_grad_norms, dtype=norms.dtype, device=norms.device)
        return clip_factors(norms, bounds)


class AdaClipDPOptimizer(DPOptimizer):
    """DP-SGD with adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021,
    "Differentially Private Learning with Adaptive Clipping"; Opacus ``AdaClipDPOptimizer``).

    After each step the bound moves geometrically toward the ``target_unclipped_quantile``
    of the per-sample norms, ``C <- C * exp(-lr * (b - gamma))`` clamped to
    ``[min_clipbound, max_clipbound]``, where ``b`` is a private estimate of the unclipped
    fraction: ``(sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2`` with ``m`` the expected
    batch size and ``sigma_b = unclipped_num_std``.

    Privacy (Theorem 1): gradient noise is drawn with
    ``sigma_grad = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the pair (gradient, count)
    costs exactly one Gaussian mechanism with the requested ``noise_multiplier = sigma``;
    accountants keep using ``noise_multiplier``. Requires ``sigma < 2 sigma_b``.

    Unlike Opacus, the count is centred and divided by the public expected batch size,
    as in the paper; Opacus divides an uncentred count by the actual (private) batch size.
    """

    _clipping = "adaptive"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int | None,
        target_unclipped_quantile: float,
        clipbound_learning_rate: float,
        max_clipbound: float,
        min_clipbound: float,
        unclipped_num_std: float,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        clipping: str = "adaptive",
    ) -> None:
        if not (_is_real(target_unclipped_quantile) and 0 <= target_unclipped_quantile <= 1):
            raise ValueError(
                "target_unclipped_quantile must be in [0, 1], "
                f"got target_unclipped_quantile={target_unclipped_quantile!r}"
            )
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clipbound_learning_rate = _check_nonneg("clipbound_learning_rate", clipbound_learning_rate)
        self.min_clipbound = _check_positive("min_clipbound", min_clipbound)
        self.max_clipbound = _check_positive("max_clipbound", max_clipbound, allow_inf=True)
        if not self.min_clipbound < self.max_clipbound:
            raise ValueError(
                f"min_clipbound must be < max_clipbound, got min_clipbound={min_clipbound!r}, "
                f"max_clipbound={max_clipbound!r}"
            )
        self.unclipped_num_std = _check_nonneg("unclipped_num_std", unclipped_num_std)
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            clipping=clipping,
        )
        if expected_batch_size is None:
            raise ValueError(
                "adaptive clipping needs expected_batch_size (the public denominator of the "
                "private unclipped fraction), also with loss_reduction='sum'"
            )
        if not self.min_clipbound <= self.max_grad_norm <= self.max_clipbound:
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r} must lie in [min_clipbound, max_clipbound] = "
                f"[{self.min_clipbound}, {self.max_clipbound}]"
            )
        # fail now, not at the first step, if sigma_grad is undefined
        adaptive_gradient_noise_multiplier(self.noise_multiplier, self.unclipped_num_std)
        #: private estimate of the unclipped fraction of the last step
        self.unclipped_fraction: float | None = None

    @property
    def gradient_noise_multiplier(self) -> float:
        """``sigma_grad`` of Theorem 1 for the current ``noise_multiplier``."""
        return adaptive_gradient_noise_multiplier(self.noise_multiplier, self.unclipped_num_std)

    def _noise_std(self) -> float:
        return self.gradient_noise_multiplier * self.max_grad_norm

    def add_noise(self) -> None:
        """Noise the gradient with ``sigma_grad * C`` and release the noisy unclipped count."""
        super().add_noise()
        assert self._last_clip is not None  # set by super().add_noise()
        _, clipped, _ = self._last_clip
        num = int(clipped.numel())
        unclipped = float(num - int(clipped.sum()))
        gen = self.generator
        noise = float(
            gaussian_noise(
                self.unclipped_num_std,
                (),
                dtype=torch.float64,
                device=gen.device if gen is not None else None,
                generator=gen,
            )
        )
        expected = self.expected_batch_size * self.accumulated_iterations
        self.unclipped_fraction = private_unclipped_fraction(unclipped, num, noise, expected)

    def update_max_grad_norm(self) -> None:
        """Geometric update of ``max_grad_norm`` from the last private unclipped fraction."""
        if self.unclipped_fraction is None:
            raise ValueError("no unclipped fraction yet: update_max_grad_norm() runs after add_noise()")
        self.max_grad_norm = geometric_clipbound_update(
            self.max_grad_norm,
            self.unclipped_fraction,
            self.target_unclipped_quantile,
            self.clipbound_learning_rate,
            self.min_clipbound,
            self.max_clipbound,
        )

    def pre_step(self, closure: Callable[[], Any] | None = None) -> bool:
        stepped = super().pre_step(closure)
        if stepped and self.params:
            self.update_max_grad_norm()
        return stepped

    def _dp_state_dict(self) -> dict[str, Any]:
        return {"max_grad_norm": float(self.max_grad_norm)}

    def _load_dp_state_dict(self, state: dict[str, Any]) -> None:
        if "max_grad_norm" in state:
            self.max_grad_norm = _check_positive("dp_state['max_grad_norm']", state["max_grad_norm"])


DPOptimizer.__signature__ = _init_signature(DPOptimizer)

_CLASSES: dict[str, type[DPOptimizer]] = {
    "flat": DPOptimizer,
    "per_layer": DPPerLayerOptimizer,
    "adaptive": AdaClipDPOptimizer,
}
