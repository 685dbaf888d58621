"""Noise-multiplier and clip-bound schedulers (the API of ``opacus.schedulers``).

They work like ``torch.optim.lr_scheduler``: build one on a DP optimizer, call
``.step()`` once per epoch (or per step; your choice), and it sets
``optimizer.noise_multiplier`` or ``optimizer.max_grad_norm``. The accountant hook of
:class:`fxdp.PrivacyEngine` reads ``optimizer.noise_multiplier`` at every step, so the
history records the sigma actually used and the composition is accounted exactly
(e.g. Yu et al. 2019, "Differentially Private Model Publishing for Deep Learning",
on decaying noise). The clip bound does not enter the accounting (the noise std is
``sigma * C``, the sensitivity is ``C``).

Unlike Opacus, ``state_dict()`` holds numbers only (no callables), so checkpoints load
with ``torch.load(weights_only=True)``; a ``LambdaNoise``'s function is rebuilt by
constructing the scheduler again before ``load_state_dict``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict

from .accountants.validation import check_positive, is_real

__all__ = [
    "_NoiseScheduler",
    "ExponentialNoise",
    "StepNoise",
    "LambdaNoise",
    "_GradClipScheduler",
    "ExponentialGradClip",
    "StepGradClip",
    "LambdaGradClip",
]


def _check_gamma(gamma: Any) -> float:
    return check_positive("gamma", gamma)


def _check_step_size(step_size: Any) -> int:
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size <= 0:
        raise ValueError(f"step_size must be a positive integer, got step_size={step_size!r}")
    return step_size


class _Scheduler:
    """Shared machinery: ``last_epoch`` counter, ``step()``, number-only state dicts."""

    _attr = ""  # the optimizer attribute driven by the scheduler

    def __init__(self, optimizer: Any, *, last_epoch: int = -1) -> None:
        if not hasattr(optimizer, self._attr):
            raise ValueError(
                f"{type(self).__name__} needs an optimizer with a .{self._attr} attribute (a DP "
                "optimizer, e.g. the one PrivacyEngine.make_private returns), got "
                f"{type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.last_epoch = last_epoch
        self.step()

    def _value(self) -> float:
        raise NotImplementedError

    def _apply(self, value: float) -> None:
        setattr(self.optimizer, self._attr, value)

    def step(self) -> None:
        """Advance one epoch (or step) and set the optimizer's value."""
        self.last_epoch += 1
        self._apply(self._value())

    def state_dict(self) -> Dict[str, Any]:
        """Every attribute but the optimizer and callables (numbers only)."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer" and not callable(v)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the optimizer's value is restored by the
        optimizer's own checkpoint, e.g. :meth:`fxdp.PrivacyEngine.load_checkpoint`)."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "optimizer"})


# --- noise multiplier ------------------------------------------------------------------


class _NoiseScheduler(_Scheduler):
    """Base class: schedules ``optimizer.noise_multiplier``."""

    _attr = "noise_multiplier"

    def get_noise_multiplier(self) -> float:
        """The noise multiplier for the current ``last_epoch``."""
        raise NotImplementedError

    def _value(self) -> float:
        return self.get_noise_multiplier()

    def _apply(self, value: float) -> None:
        if not is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{type(self).__name__} produced noise_multiplier={value!r}; it must be finite and >= 0")
        self.optimizer.noise_multiplier = float(value)


class ExponentialNoise(_NoiseScheduler):
    """Multiply the noise multiplier by ``gamma`` at every ``step()``."""

    def __init__(self, optimizer: Any, *, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _check_gamma(gamma)
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        sigma = self.optimizer.noise_multiplier
        return sigma if self.last_epoch == 0 else sigma * self.gamma


class StepNoise(_NoiseScheduler):
    """Multiply the noise multiplier by ``gamma`` every ``step_size`` steps."""

    def __init__(self, optimizer: Any, *, step_size: int, gamma: float, last_epoch: int = -1) -> None:
        self.step_size = _check_step_size(step_size)
        self.gamma = _check_gamma(gamma)
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        sigma = self.optimizer.noise_multiplier
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return sigma
        return sigma * self.gamma


class LambdaNoise(_NoiseScheduler):
    """Noise multiplier ``base * noise_lambda(epoch)`` (``base``: the value at construction)."""

    def __init__(self, optimizer: Any, *, noise_lambda: Callable[[int], float], last_epoch: int = -1) -> None:
        if not callable(noise_lambda):
            raise TypeError(f"noise_lambda must be callable, got {type(noise_lambda).__name__}")
        self.noise_lambda = noise_lambda
        self.base_noise_multiplier = float(optimizer.noise_multiplier)
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        return self.base_noise_multiplier * self.noise_lambda(self.last_epoch)


# --- clip bound --------------------------------------------------------------------------


class _GradClipScheduler(_Scheduler):
    """Base class: schedules ``optimizer.max_grad_norm``.

    With per-layer clipping every bound is scaled by the same factor, so the total
    bound (which sets the noise std) stays the sensitivity of the clipped sum.
    """

    _attr = "max_grad_norm"

    def __init__(self, optimizer: Any, *, last_epoch: int = -1) -> None:
        if getattr(optimizer, "clipping", None) == "adaptive":
            raise ValueError(
                "adaptive clipping moves max_grad_norm itself after every step; a clip-bound scheduler "
                "would fight it. Fix: use clipping='flat' or 'per_layer' with a clip scheduler"
            )
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        """The clip bound for the current ``last_epoch``."""
        raise NotImplementedError

    def _value(self) -> float:
        return self.get_max_grad_norm()

    def _apply(self, value: float) -> None:
        if not is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{type(self).__name__} produced max_grad_norm={value!r}; it must be finite and > 0")
        opt = self.optimizer
        bounds = getattr(opt, "max_grad_norms", None)
        if bounds is not None:  # per-layer: scale all bounds, keep C = sqrt(sum C_k^2)
            factor = float(value) / opt.max_grad_norm
            opt.max_grad_norms = [c * factor for c in bounds]
            opt.max_grad_norm = math.sqrt(sum(c * c for c in opt.max_grad_norms))
        else:
            opt.max_grad_norm = float(value)


class ExponentialGradClip(_GradClipScheduler):
    """Multiply the clip bound by ``gamma`` at every ``step()``."""

    def __init__(self, optimizer: Any, *, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _check_gamma(gamma)
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        c = self.optimizer.max_grad_norm
        return c if self.last_epoch == 0 else c * self.gamma


class StepGradClip(_GradClipScheduler):
    """Multiply the clip bound by ``gamma`` every ``step_size`` steps."""

    def __init__(self, optimizer: Any, *, step_size: int, gamma: float, last_epoch: int = -1) -> None:
        self.step_size = _check_step_size(step_size)
        self.gamma = _check_gamma(gamma)
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        c = self.optimizer.max_grad_norm
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return c
        return c * self.gamma


class LambdaGradClip(_GradClipScheduler):
    """Clip bound ``base * scheduler_function(epoch)`` (``base``: the value at construction)."""

    def __init__(
        self, optimizer: Any, *, scheduler_function: Callable[[int], float], last_epoch: int = -1
    ) -> None:
        if not callable(scheduler_function):
            raise TypeError(f"scheduler_function must be callable, got {type(scheduler_function).__name__}")
        self.scheduler_function = scheduler_function
        self.base_max_grad_norm = float(optimizer.max_grad_norm)
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        return self.base_max_grad_norm * self.scheduler_function(self.last_epoch)
