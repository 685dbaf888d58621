"""Noise calibration: the noise multiplier that meets a privacy budget."""

from __future__ import annotations

import math
from typing import Any, Callable

from .validation import as_float as _as_float, check_delta, check_sample_rate, check_steps
from .registry import ACCOUNTANTS, create_accountant

__all__ = ["MAX_NOISE_MULTIPLIER", "get_noise_multiplier"]

#: Largest noise multiplier tried before declaring the budget infeasible.
MAX_NOISE_MULTIPLIER = 1e4
_MIN_NOISE_MULTIPLIER = 1e-3
_MAX_ITERATIONS = 200


def _find_root_from_above(
    eps_of: Callable[[float], float], target: float, tolerance: float, sigma0: float
) -> float:
    """Smallest-ish sigma with target - tolerance <= eps(sigma) <= target.

    eps is decreasing in sigma.  The search keeps a bracket
    eps(lo) > target >= eps(hi) and only ever returns a sigma at which eps was
    evaluated and found <= target, so the result never overshoots the budget.
    """
    hi, eps_hi = sigma0, eps_of(sigma0)
    lo, eps_lo = 0.0, math.inf
    if eps_hi > target:  # grow until feasible
        while eps_hi > target:
            lo, eps_lo = hi, eps_hi
            if hi >= MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target!r} cannot be reached with any noise_multiplier "
                    f"<= {MAX_NOISE_MULTIPLIER:g} (epsilon there is {eps_hi:.4g}); increase "
                    "target_epsilon or target_delta, or train for fewer steps / with a "
                    "smaller sample_rate"
                )
            hi = min(2.0 * hi, MAX_NOISE_MULTIPLIER)
            eps_hi = eps_of(hi)
    else:  # shrink until infeasible (or tiny)
        while True:
            cand = hi / 2.0
            if cand < _MIN_NOISE_MULTIPLIER:
                return hi
            eps_c = eps_of(cand)
            if eps_c > target:
                lo, eps_lo = cand, eps_c
                break
            hi, eps_hi = cand, eps_c
    # Bracketed: eps(lo) > target >= eps(hi).  Secant steps in log(sigma) on
    # log(eps), safeguarded by bisection.
    for it in range(_MAX_ITERATIONS):
        if target - eps_hi <= tolerance:
            return hi
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = 0.5 * (x_lo + x_hi)
        if it % 2 == 0 and math.isfinite(eps_lo) and eps_hi > 0:
            f_lo, f_hi = math.log(eps_lo / target), math.log(eps_hi / target)
            if f_lo != f_hi:
                x_sec = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
                width = x_hi - x_lo
                x = min(max(x_sec, x_lo + 0.02 * width), x_hi - 0.02 * width)
        sigma = math.exp(x)
        eps = eps_of(sigma)
        if eps > target:
            lo, eps_lo = sigma, eps
        else:
            hi, eps_hi = sigma, eps
        if (hi - lo) <= 1e-12 * hi:
            return hi
    return hi


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    **kwargs: Any,
) -> float:
    """Noise multiplier reaching ``(target_epsilon, target_delta)`` after training.

    Same signature as ``opacus.accountants.utils.get_noise_multiplier``.  The
    returned sigma satisfies
    ``target_epsilon - epsilon_tolerance <= eps(sigma) <= target_epsilon`` under
    the chosen accountant, i.e. it never overshoots the budget.

    Args:
        target_epsilon: privacy budget epsilon (> 0).
        target_delta: privacy budget delta, in (0, 1).
        sample_rate: Poisson sampling rate, in (0, 1].
        epochs: number of epochs; converted to ``int(epochs / sample_rate)``
            steps as Opacus does.  Give exactly one of ``epochs`` and ``steps``.
        steps: number of steps.
        accountant: ``"rdp"`` (default, as Opacus: the same call gives the same
            sigma), ``"prv"`` (tighter: less noise for the same budget) or ``"gdp"``.
            ``PrivacyEngine.make_private_with_epsilon`` passes its own accountant.
        epsilon_tolerance: how far below the target the achieved epsilon may be.
        **kwargs: forwarded to the accountant's ``get_epsilon``.

    Raises:
        ValueError: on invalid arguments, or if no sigma up to
            :data:`MAX_NOISE_MULTIPLIER` meets the budget.
    """
    target = _as_float("target_epsilon", target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target!r}")
    delta = check_delta(target_delta)
    q = check_sample_rate(sample_rate)
    tol = _as_float("epsilon_tolerance", epsilon_tolerance)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"epsilon_tolerance must be a finite number > 0, got {tol!r}")
    if (steps is None) == (epochs is None):
        raise ValueError(
            "get_noise_multiplier needs exactly one of `epochs` and `steps`, got "
            f"epochs={epochs!r} and steps={steps!r}"
        )
    if steps is None:
        ep = _as_float("epochs", epochs)
        if not (math.isfinite(ep) and ep > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {ep!r}")
        steps = int(ep / q)  # Opacus' convention
    n = check_steps(steps)
    if n == 0:
        raise ValueError(
            "the number of steps must be >= 1 (got 0, e.g. epochs < sample_rate): "
            "no noise is needed when nothing is trained"
        )
    if not isinstance(accountant, str) or accountant.lower() not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {accountant!r}; valid names are {sorted(ACCOUNTANTS)}"
        )
    acc = create_accountant(accountant)

    def eps_of(sigma: float) -> float:
        acc.history = [(sigma, q, n)]
        return acc.get_epsilon(delta=delta, **kwargs)

    # Start near the answer: the Gaussian-mechanism sigma of a full pass,
    # scaled by the sample rate, is a good first guess in most regimes.
    sigma0 = min(
        max(
            q * math.sqrt(n) * 2.0 * math.sqrt(2.0 * math.log(1.25 / delta)) / target,
            0.25,
        ),
        64.0,
    )
    return _find_root_from_above(eps_of, target, tol, sigma0)
