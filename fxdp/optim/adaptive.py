"""DP-SGD with adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from ..accountants.validation import check_nonneg, check_positive, is_real
from .clip import adaptive_gradient_noise_multiplier, geometric_clipbound_update, private_unclipped_fraction
from .noise import gaussian_noise
from .optimizer import DPOptimizer

__all__ = ["AdaClipDPOptimizer"]


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
        nonfinite: str = "raise",
    ) -> None:
        if not (is_real(target_unclipped_quantile) and 0 <= target_unclipped_quantile <= 1):
            raise ValueError(
                "target_unclipped_quantile must be in [0, 1], "
                f"got target_unclipped_quantile={target_unclipped_quantile!r}"
            )
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clipbound_learning_rate = check_nonneg("clipbound_learning_rate", clipbound_learning_rate)
        self.min_clipbound = check_positive("min_clipbound", min_clipbound)
        self.max_clipbound = check_positive("max_clipbound", max_clipbound, allow_inf=True)
        if not self.min_clipbound < self.max_clipbound:
            raise ValueError(
                f"min_clipbound must be < max_clipbound, got min_clipbound={min_clipbound!r}, "
                f"max_clipbound={max_clipbound!r}"
            )
        self.unclipped_num_std = check_nonneg("unclipped_num_std", unclipped_num_std)
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            clipping=clipping,
            nonfinite=nonfinite,
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
            self.max_grad_norm = check_positive("dp_state['max_grad_norm']", state["max_grad_norm"])
