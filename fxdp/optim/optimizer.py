"""DP-SGD optimizer wrappers (Abadi et al. 2016, "Deep Learning with Differential Privacy").

API-compatible with ``opacus.optimizers``: wrap any ``torch.optim.Optimizer``; after
``loss.backward()`` every trainable parameter carries ``p.grad_sample`` (``[B, *p.shape]``,
or a list of such tensors when several backward passes are accumulated), and ``step()``

1. clips each sample's gradient to norm ``C`` and sums (``p.summed_grad``, accumulated
   over skipped steps, see :meth:`DPOptimizer.signal_skip_step`): the step reads the
   clipped sums from its :attr:`~DPOptimizer.grad_source` (per-sample gradients or
   book-keeping, :mod:`fxdp.optim.grad_source`) with the :class:`~fxdp.optim.clip.Clipping`
   of this step,
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
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..accountants.validation import check_nonneg, check_positive, is_real
from ..utils.allocator import adapt_malloc_thresholds
from .clip import NONFINITE_POLICIES, ClipResult, Clipping, ClipStats, clip_statistics
from .grad_source import ClippedSumSource, MaterializedGradients, is_processed, mark_as_processed
from .noise import FlatNoise, secure_generator
from .secure import is_secure

__all__ = ["DPOptimizer", "clipping_modes", "optimizer_class"]

StepHook = Callable[["DPOptimizer"], None]

_DP_STATE_KEY = "dp_state"


# Opacus' names of the processed-flag helpers (fxdp.optimizers.optimizer re-exports them)
_mark_as_processed, _is_processed = mark_as_processed, is_processed


def _check_processed_flag(obj: Tensor | list[Tensor]) -> None:
    """Raise if ``obj`` (a ``grad_sample`` or ``summed_grad``) was already used by a step
    (Opacus' helper): consuming it twice would clip or noise one batch twice."""
    if is_processed(obj):
        raise ValueError(
            "this tensor was already processed by a DP step (clipped or noised). "
            "Fix: call optimizer.zero_grad() after every optimizer.step()"
        )


#: clipping mode -> optimizer class (filled by DPOptimizer.__init_subclass__)
_CLASSES: dict[str, type] = {}


def optimizer_class(clipping: str) -> type:
    """The DP optimizer class for a clipping mode (``"flat"``, ``"per_layer"``, ``"adaptive"``)."""
    if clipping not in _CLASSES:
        raise ValueError(f"unknown clipping mode clipping={clipping!r}; expected one of {sorted(_CLASSES)}")
    return _CLASSES[clipping]


def clipping_modes() -> list[str]:
    """The clipping modes an optimizer class is registered for."""
    return sorted(_CLASSES)


def _init_signature(cls: type) -> inspect.Signature:
    sig = inspect.signature(cls.__init__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _params(optimizer: Optimizer) -> list[nn.Parameter]:
    """Trainable parameters of all ``param_groups``, in order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


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
    4. add noise, scale by the expected batch size (a book-keeping step of one logical
       batch draws the noise first and adds each layer's scaled clipped sum into it as
       the sum is formed, :meth:`_clip_into_noise`; ``p.summed_grad`` is then not set);
    5. ``attach_step_hook`` callback (privacy accounting: ``noise_multiplier`` and
       ``accumulated_iterations`` are valid here);
    6. the wrapped optimizer's ``step()``.
    """

    _clipping = "flat"
    #: ``torch.amp.GradScaler.step`` then hands this optimizer its scale (``grad_scale``,
    #: ``found_inf``) instead of unscaling ``p.grad``, which holds no per-sample gradient:
    #: :meth:`pre_step` refuses it (:meth:`_refuse_loss_scaling`)
    _step_supports_amp_scaling = True

    def __new__(cls, *args: Any, clipping: str = "flat", **kwargs: Any) -> DPOptimizer:
        # DPOptimizer(..., clipping="per_layer") builds the per-layer subclass, so code
        # written against one constructor gets the right class (and isinstance checks).
        if cls is DPOptimizer:
            cls = optimizer_class(clipping)
        return object.__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = _init_signature(cls)  # help()/IDEs show __init__, not __new__
        _CLASSES.setdefault(cls._clipping, cls)  # the first class of a mode (not its distributed variant)

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
        clipping: str | None = None,
        nonfinite: str = "raise",
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
            clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"`` (default: this class's).
            nonfinite: a NaN/inf per-sample gradient ``"raise"``s ``FloatingPointError``
                (the step is not applied) or is ``"drop"``ped (factor 0, still counted).
        """
        clipping = self._clipping if clipping is None else clipping
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
                is_real(expected_batch_size)
                and math.isfinite(expected_batch_size)
                and expected_batch_size > 0
            ):
                raise ValueError(
                    "expected_batch_size must be a number > 0 (the expected Poisson batch size "
                    f"q*N, the denominator of a mean loss), got expected_batch_size={expected_batch_size!r}"
                    + (" with loss_reduction='mean'" if loss_reduction == "mean" else "")
                )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got nonfinite={nonfinite!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

        self.original_optimizer = optimizer
        self.clipping = clipping
        self.noise_multiplier = check_nonneg("noise_multiplier", noise_multiplier)
        if self.noise_multiplier > 1e6:  # failure handling: an argument-order or unit mistake
            raise ValueError(
                f"noise_multiplier={noise_multiplier!r} is absurdly large (> 1e6): the update would be pure "
                "noise. Fix: noise_multiplier is the noise std divided by max_grad_norm, typically 0.5-10"
            )
        self.loss_reduction = loss_reduction
        self.nonfinite = nonfinite
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
        self._flat_noise = FlatNoise()
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
        #: where the step reads clipped sums: ``p.grad_sample``, or book-keeping (attach_bookkeeping)
        self.grad_source: ClippedSumSource = MaterializedGradients()

        for p in self.params:
            p.summed_grad = None

    # -- clipping strategy (overridden by subclasses) ----------------------------------

    def _init_clipping(self, max_grad_norm: Any) -> None:
        if not is_real(max_grad_norm):
            raise ValueError(
                "flat clipping takes one bound, got max_grad_norm="
                f"{max_grad_norm!r}; for one bound per parameter use clipping='per_layer'"
            )
        self.max_grad_norm = check_positive("max_grad_norm", max_grad_norm)

    def current_clipping(self) -> Clipping:
        """The clipping of the step about to run: the bound as it is now (adaptive
        clipping and clip schedulers move it between steps) and the non-finite policy."""
        return Clipping(bound=self.max_grad_norm, nonfinite=self.nonfinite)

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
        return MaterializedGradients.grad_sample(p, index)

    @property
    def grad_samples(self) -> list[Tensor]:
        """Per-sample gradients, one ``[B, *p.shape]`` tensor per parameter."""
        return [self._get_flat_grad_sample(p, k) for k, p in enumerate(self.params)]

    @property
    def accumulated_iterations(self) -> int:
        """Number of backward passes accumulated since the last step (Opacus semantics:
        privacy accountants multiply the sample rate by it)."""
        return self.grad_source.accumulated_passes(self.params)

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
        self.grad_source.check(self.params)
        self._clip_and_accumulate()

    def attach_bookkeeping(self, bookkeeping: ClippedSumSource) -> None:
        """Take clipped sums from a privatized model in ``grad_sample_mode="bk"``
        (``dp_model.bookkeeping``, a :class:`fxdp.bookkeeping.BookKeeping`): each step
        clips its records with this optimizer's bound(s) of that step, without
        per-sample gradients."""
        if not isinstance(bookkeeping, ClippedSumSource):
            raise TypeError(
                f"attach_bookkeeping takes the model's book-keeping, got {type(bookkeeping).__name__}. Fix: "
                "optimizer.attach_bookkeeping(dp_model.bookkeeping) for a model privatized with "
                "grad_sample_mode='bk'"
            )
        bookkeeping.attached = True
        self.grad_source = bookkeeping
        if any(p.device.type == "cpu" for p in self.params):
            # each step frees its records at once: glibc's dynamic thresholds, where still at
            # their start, would give that memory back and the next backward pass fault it in again
            adapt_malloc_thresholds()

    def _clip_and_accumulate(self) -> None:
        """``p.summed_grad += sum_i c_i g_i`` from the grad source, with this step's clipping."""
        params = self.params
        result: ClipResult = self.grad_source.clip_and_sum(params, self.current_clipping())
        self._pending_norms.append(torch.linalg.vector_norm(result.norms, dim=1))
        clipped = result.factors < 1
        self._pending_clipped.append(clipped.any(dim=1) if clipped.dim() == 2 else clipped)
        for p, s in zip(params, result.sums):
            if p.summed_grad is None:
                p.summed_grad = s
            else:
                p.summed_grad.add_(s)

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
        params = self.params
        for k, p in enumerate(params):
            if p.summed_grad is None:
                raise ValueError(f"parameter #{k} has no p.summed_grad; call clip_and_accumulate() first")
            if is_processed(p.summed_grad):
                raise ValueError(
                    "clipped gradients were already noised; call optimizer.zero_grad() after every step"
                )
        if not params:
            return
        noisy = self.noisy_sums([p.summed_grad for p in params], self._noise_std())
        for p, g in zip(params, noisy):
            # a half-precision parameter's sum and noise are float32 (``sum_dtype``): rounded
            # once, after the noise (post-processing of the Gaussian mechanism)
            p.grad = (g if g.dtype == p.dtype else g.to(p.dtype)).view_as(p)
            mark_as_processed(p.summed_grad)

    def _noise_first(self) -> bool:
        """Whether steps 2-4 can run as :meth:`_clip_into_noise`: a grad source that adds
        its sums into given tensors (book-keeping), one logical batch with nothing
        accumulated and no skip queued, the plain Gaussian mechanism of this class
        (subclasses that change clipping's sums, the noise or the scaling keep steps
        2-4), and one flat noise draw for the parameters."""
        cls = type(self)
        if not self.grad_source.sums_into or self._check_skip_next_step(pop_next=False):
            return False
        if any(getattr(cls, m) is not getattr(DPOptimizer, m)
               for m in ("_clip_and_accumulate", "add_noise", "noisy_sums", "scale_grad", "_noise_std")):
            return False
        params = self.params
        nothing_accumulated = all(getattr(p, "summed_grad", None) is None for p in params)
        return nothing_accumulated and self._flat_noise.fits(params, self.generator)

    def _clip_into_noise(self) -> None:
        """Steps 2-4 with the noise drawn first: ``p.grad = (N(0, std^2) + sum_i c_i g_i) / n``
        as ``N(0, (std/n)^2) + sum_i (c_i/n) g_i``, each layer's clipped sum added into its
        slice of the flat noise buffer as it is formed. The same distribution as add_noise
        + scale_grad, without a buffer for every clipped sum, their additions and the
        division (ResNet18: 11.2M parameters). ``p.summed_grad`` stays ``None``."""
        params = self.params
        n = self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else 1
        drawn: list[Sequence[Tensor]] = []

        def draw() -> Sequence[Tensor]:  # after every factor is known: a non-finite gradient raises first
            # lazy: a released CPU buffer is drawn layer by layer as the records are freed
            drawn.append(self._flat_noise.draw(params, self._noise_std() / n, generator=self.generator, lazy=True,
                                               held_bytes=getattr(self.grad_source, "held_bytes", None)))
            return drawn[0]

        result: ClipResult = self.grad_source.clip_and_sum(params, self.current_clipping(), into=draw,
                                                           into_scale=1.0 / n)
        views = list(drawn[0]) if drawn else []  # draws what no layer's sum reached
        self._pending_norms.append(torch.linalg.vector_norm(result.norms, dim=1))
        clipped = result.factors < 1
        self._pending_clipped.append(clipped.any(dim=1) if clipped.dim() == 2 else clipped)
        self._finish_clip_stats()
        for p, g in zip(params, views):
            p.grad = g

    @property
    def flat_noise(self) -> FlatNoise:
        """The one-draw Gaussian mechanism of the step (:class:`~fxdp.optim.noise.FlatNoise`).
        ``flat_noise.keep``: hold its parameter-sized buffer between steps (``True``) or free
        it with the gradients at ``zero_grad()`` (``False``); default: freed on CUDA, and on
        CPU decided by measuring the first steps (``flat_noise.decision``)."""
        return self._flat_noise

    def noisy_sums(self, sums: list[Tensor], std: float) -> list[Tensor]:
        """The Gaussian mechanism on the clipped sums: ``S_k + N(0, std^2)`` per parameter,
        drawn at once into a flat buffer (:class:`~fxdp.optim.noise.FlatNoise`; secure
        generators: CSPRNG noise and a snapped float64 sum per parameter, Mironov 2012).
        The distributed optimizers override it to all-reduce the sums first."""
        return self._flat_noise(sums, std, generator=self.generator)

    def scale_grad(self) -> None:
        """Divide ``p.grad`` by ``expected_batch_size * accumulated_iterations`` for a mean loss."""
        if self.loss_reduction == "mean":
            denom = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= denom

    def pre_step(self, closure: Callable[[], Any] | None = None) -> bool:
        """Everything of a DP step except the wrapped update; ``False`` if it was skipped."""
        self._refuse_loss_scaling()
        if not self.params:
            return True  # nothing trainable: behave as the wrapped optimizer
        self.grad_source.check(self.params)  # raises before anything changes
        if not self._check_skip_next_step(pop_next=False):
            for guard in list(self._step_guards.values()):
                guard(self)
        if self._noise_first():
            self._clip_into_noise()
            self._check_skip_next_step()  # this step's entry (not a skip)
        else:
            self._clip_and_accumulate()
            if self._check_skip_next_step():
                self._is_last_step_skipped = True
                return False
            self.add_noise()
            self.scale_grad()
        if self.step_hook is not None:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _refuse_loss_scaling(self) -> None:
        """Raise, before anything changes, when a ``torch.amp.GradScaler`` drives the step
        (``scaler.step(optimizer)`` sets ``grad_scale`` and ``found_inf`` on an optimizer
        with ``_step_supports_amp_scaling``). The scaler multiplies every per-sample gradient
        by its scale before clipping, so each would be clipped at ``C / scale`` and the
        unscaling of ``p.grad`` misses them; and skipping the steps where some sample's
        scaled gradient overflowed would be a data-dependent decision no accountant counts."""
        if "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:
            # the scaler removes them only after a step that returns: without them this
            # optimizer steps as usual once the scaler is dropped
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise ValueError(
                "a torch.amp.GradScaler drives this DP optimizer (scaler.step(optimizer)): loss scaling "
                "multiplies each per-sample gradient by the scale before it is clipped, so DP-SGD would clip "
                "at max_grad_norm / scale, and skipping steps whose scaled gradients overflowed would depend on "
                "the data outside the privacy accounting. The step was not applied. Fix: drop the GradScaler "
                "and call loss.backward() and optimizer.step() directly; train in float32, or in bfloat16 "
                "(model.to(torch.bfloat16): float32's range, no loss scaling needed)"
            )

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
        """Clear ``p.grad`` (as torch), what the grad source holds (``p.grad_sample``, or the
        book-keeping records) and, unless the last step was skipped, ``p.summed_grad``.
        """
        params = self.params
        if not self._is_last_step_skipped:
            for p in params:
                p.summed_grad = None
            self._pending_norms, self._pending_clipped = [], []
        self.grad_source.clear(params)
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


DPOptimizer.__signature__ = _init_signature(DPOptimizer)
_CLASSES["flat"] = DPOptimizer
