"""Renyi differential privacy (RDP) accounting of the sampled Gaussian mechanism.

Pure functions:

* :func:`compute_rdp` - RDP of the Poisson-sampled Gaussian mechanism at
  integer and fractional orders (Mironov, Talwar, Zhang 2019, "Renyi
  Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3).
* :func:`rdp_to_epsilon` - conversion of an RDP curve to (epsilon, delta)-DP
  (Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis Testing
  Interpretations and Renyi Differential Privacy", Theorem 21).

:class:`RDPAccountant` sums the RDP of the history entries (RDP composes
additively, Mironov 2017, Proposition 1) and converts at the best order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .validation import check_delta, check_noise_multiplier, check_sample_rate, check_steps
from .base import IAccountant, LazyModule

special = LazyModule("scipy.special")

__all__ = ["DEFAULT_ALPHAS", "RDPAccountant", "compute_rdp", "rdp_to_epsilon"]

#: The order grid used by Opacus (and TF Privacy), so results are comparable.
DEFAULT_ALPHAS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(
    range(12, 64)
)

# Terms of the fractional-order series below exp(_SERIES_CUTOFF) are dropped.
# Past the peak the series alternates, so the error is below the first dropped
# term (relative error ~1e-13).
_SERIES_CUTOFF = -30.0
_CHUNK = 256


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha by the binomial expansion.

    A_alpha = sum_k C(alpha, k) q^k (1-q)^(alpha-k) exp((k^2 - k) / (2 sigma^2))
    (Mironov et al. 2019, Section 3.3, integer case).
    """
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = (
        special.gammaln(alpha + 1.0)
        - special.gammaln(k + 1.0)
        - special.gammaln(alpha - k + 1.0)
    )
    terms = (
        log_binom
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2.0 * sigma**2)
    )
    return float(special.logsumexp(terms))


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for fractional alphas (vectorised over alphas) by the two-sided series.

    A_alpha = A_0 + A_1 where, with z0 = sigma^2 log(1/q - 1) + 1/2,
    A_0 = sum_k C(a,k) q^k (1-q)^(a-k) e^{(k^2-k)/(2s^2)} Phi((z0 - k)/s) and
    A_1 = sum_k C(a,k) q^(a-k) (1-q)^k e^{((a-k)^2-(a-k))/(2s^2)} Phi(((a-k) - z0)/s)
    (Mironov et al. 2019, Section 3.3, fractional case).
    """
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    alphas = np.asarray(alphas, dtype=np.float64)
    # Running signed sums of each series, stored as (log scale, scaled sum).
    scale = np.full((2, alphas.size), -np.inf)
    total = np.zeros((2, alphas.size))
    active = np.arange(alphas.size)
    start, chunk = 0, _CHUNK
    while active.size and start < 10_000_000:
        a = alphas[active][:, None]
        k = np.arange(start, start + chunk, dtype=np.float64)[None, :]
        coef = special.binom(a, k)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        j = a - k
        log_s = np.stack(
            [
                log_coef
                + k * log_q
                + j * log_1mq
                + (k * k - k) / (2.0 * sigma**2)
                + special.log_ndtr((z0 - k) / sigma),
                log_coef
                + j * log_q
                + k * log_1mq
                + (j * j - j) / (2.0 * sigma**2)
                + special.log_ndtr((j - z0) / sigma),
            ]
        )
        # Like the reference recursion, each order keeps its terms up to and
        # including the first one below the cutoff.
        small = np.maximum(log_s[0], log_s[1]) < _SERIES_CUTOFF
        done = small.any(axis=1)
        last = np.where(done, np.argmax(small, axis=1), chunk - 1)
        keep = np.arange(chunk)[None, :] <= last[:, None]
        sign = np.where(keep, np.sign(coef), 0.0)
        m = np.max(np.where(keep, log_s, -np.inf), axis=2)
        m = np.where(np.isfinite(m), m, 0.0)  # all kept terms underflowed
        part = np.sum(sign * np.exp(log_s - m[:, :, None]), axis=2)
        new_scale = np.maximum(scale[:, active], m)
        total[:, active] = total[:, active] * np.exp(
            scale[:, active] - new_scale
        ) + part * np.exp(m - new_scale)
        scale[:, active] = new_scale
        active = active[~done]
        start += chunk
        chunk = min(2 * chunk, 1 << 16)
    log_a0 = scale[0] + np.log(total[0])
    log_a1 = scale[1] + np.log(total[1])
    return np.logaddexp(log_a0, log_a1)


@functools.lru_cache(maxsize=256)
def _rdp_curve(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each order."""
    alphas = np.array(orders, dtype=np.float64)
    if sigma == 0:
        curve = np.full(alphas.shape, math.inf)
    elif q == 1.0:
        curve = alphas / (2.0 * sigma**2)  # plain Gaussian mechanism
    else:
        curve = np.empty(alphas.shape)
        finite = np.isfinite(alphas)
        curve[~finite] = math.inf
        integer = finite & (alphas == np.round(alphas))
        for i in np.nonzero(integer)[0]:
            curve[i] = _log_a_integer(q, sigma, int(alphas[i])) / (alphas[i] - 1.0)
        frac = np.nonzero(finite & ~integer)[0]
        if frac.size:
            curve[frac] = _log_a_fractional(q, sigma, alphas[frac]) / (
                alphas[frac] - 1.0
            )
    curve.setflags(write=False)
    return curve


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in np.atleast_1d(np.asarray(orders, dtype=np.float64)))
    if not out:
        raise ValueError("alphas must be a non-empty list of RDP orders > 1, got []")
    bad = [a for a in out if not a > 1]
    if bad:
        raise ValueError(f"alphas must all be RDP orders > 1, got {bad[0]!r}")
    return out


def compute_rdp(
    *, q: float, noise_multiplier: float, steps: int, orders: Sequence[float] | float
) -> np.ndarray | float:
    """RDP of ``steps`` Poisson-sampled Gaussian steps at the given orders.

    Same signature as ``opacus.accountants.analysis.rdp.compute_rdp``.
    """
    q = check_sample_rate(q)
    sigma = check_noise_multiplier(noise_multiplier)
    steps = check_steps(steps)
    scalar = np.ndim(orders) == 0
    curve = (
        _rdp_curve(q, sigma, _check_orders(orders)) * steps
        if steps
        else np.zeros(len(_check_orders(orders)))
    )
    return float(curve[0]) if scalar else curve


def rdp_to_epsilon(
    orders: Sequence[float], rdp: Sequence[float], delta: float
) -> tuple[float, float]:
    """Best (epsilon, order) for an RDP curve at target ``delta``.

    eps = rdp(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1)
    (Balle et al. 2020, Theorem 21), minimised over the given orders and
    clipped at 0.
    """
    orders_v = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    rdp_v = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if orders_v.shape != rdp_v.shape:
        raise ValueError(
            f"orders and rdp must have the same length, got {orders_v.size} and {rdp_v.size}"
        )
    with np.errstate(invalid="ignore"):
        eps = (
            rdp_v
            - (math.log(delta) + np.log(orders_v)) / (orders_v - 1)
            + np.log((orders_v - 1) / orders_v)
        )
    if np.isnan(eps).all():
        return math.inf, math.nan
    i = int(np.nanargmin(eps))
    return max(float(eps[i]), 0.0), float(orders_v[i])


class RDPAccountant(IAccountant):
    """RDP accountant for the Poisson-sampled Gaussian mechanism.

    Drop-in replacement for ``opacus.accountants.RDPAccountant``.

    Args:
        alphas: RDP orders to optimise over; defaults to :data:`DEFAULT_ALPHAS`.
    """

    DEFAULT_ALPHAS = DEFAULT_ALPHAS

    def __init__(self, alphas: Sequence[float] | None = None) -> None:
        super().__init__()
        self.alphas: tuple[float, ...] | None = (
            None if alphas is None else _check_orders(alphas)
        )

    @classmethod
    def mechanism(cls) -> str:
        return "rdp"

    def _orders(self, alphas: Sequence[float] | None) -> tuple[float, ...]:
        if alphas is not None:
            return _check_orders(alphas)
        return (
            self.alphas
            if self.alphas is not None
            else tuple(map(float, DEFAULT_ALPHAS))
        )

    def get_rdp(self, alphas: Sequence[float] | None = None) -> np.ndarray:
        """Total RDP of the history at each order (RDP composes by summation)."""
        orders = self._orders(alphas)
        total = np.zeros(len(orders))
        for sigma, q, steps in self._validated_history():
            if steps:
                total = total + _rdp_curve(q, sigma, orders) * steps
        return total

    def get_privacy_spent(
        self, *, delta: float, alphas: Sequence[float] | None = None
    ) -> tuple[float, float]:
        """Returns ``(epsilon, best_alpha)`` for the history so far."""
        delta = check_delta(delta)
        if not self.history:
            return 0.0, 0.0
        orders = self._orders(alphas)
        return rdp_to_epsilon(orders, self.get_rdp(orders), delta)

    def get_epsilon(
        self, delta: float, alphas: Sequence[float] | None = None, **kwargs: Any
    ) -> float:
        """Epsilon spent so far at ``delta`` (a rigorous upper bound)."""
        eps, _ = self.get_privacy_spent(delta=delta, alphas=alphas)
        return eps
