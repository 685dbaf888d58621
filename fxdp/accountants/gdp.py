"""Gaussian differential privacy (GDP) and its CLT approximation for DP-SGD.

Pure functions:

* :func:`gdp_log_delta` / :func:`gdp_epsilon` - the exact (epsilon, delta)
  profile of mu-GDP, i.e. of a Gaussian mechanism with sensitivity / noise
  ratio ``mu`` (Dong, Roth, Su 2019, Corollary 2.13; equivalently the analytic
  Gaussian mechanism of Balle & Wang 2018, Theorem 8).  These are *exact* and
  are also used by the PRV accountant for the ``sample_rate == 1`` case.
* :func:`clt_mu_poisson` / :func:`clt_mu_uniform` - the central limit theorem
  approximation of ``T`` subsampled Gaussian steps by a single mu-GDP
  mechanism (Bu, Dong, Long, Su 2020, "Deep Learning with Gaussian Differential
  Privacy", Poisson and uniform subsampling variants).

:class:`GDPAccountant` wraps the CLT approximation.  It is an *approximation*,
not a bound: it underestimates epsilon in most practical regimes (as shown
numerically by Gopi, Lee, Wutschitz 2021), so it warns once per instance.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from .validation import check_delta
from .base import HistoryEntry, IAccountant, LazyModule

optimize, special = LazyModule("scipy.optimize"), LazyModule("scipy.special")

__all__ = [
    "GDPAccountant",
    "clt_mu_poisson",
    "clt_mu_uniform",
    "gdp_depsilon_dmu",
    "gdp_epsilon",
    "gdp_log_delta",
    "gdp_mu_for_epsilon",
]

_LOG_2PI_HALF = 0.5 * math.log(2.0 * math.pi)


def gdp_log_delta(epsilon: float, mu: float) -> float:
    """log delta(epsilon) of mu-GDP.

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)
    (Dong, Roth, Su 2019, Cor. 2.13), evaluated in log space so that it stays
    finite for eps in the hundreds of thousands.
    """
    if mu <= 0:
        return -math.inf
    if math.isinf(mu):
        return 0.0
    a = -epsilon / mu + mu / 2.0
    b = -epsilon / mu - mu / 2.0
    log_pa = float(special.log_ndtr(a))
    log_pb = float(special.log_ndtr(b))
    diff = epsilon + log_pb - log_pa  # log of the ratio of the two terms, < 0
    if diff >= 0:  # only reachable through rounding when delta underflows
        return -math.inf
    return log_pa + math.log(-math.expm1(diff))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon >= 0 such that mu-GDP implies (epsilon, delta)-DP.

    For ``mu = sqrt(T) / sigma`` this is the exact epsilon of ``T`` composed
    Gaussian mechanisms without subsampling (Balle & Wang 2018).
    """
    if mu <= 0:
        return 0.0
    if math.isinf(mu) or math.isnan(mu):
        return math.inf
    log_target = math.log(delta)

    def f(eps: float) -> float:
        return gdp_log_delta(eps, mu) - log_target

    if f(0.0) <= 0:
        return 0.0
    # For a Gaussian privacy loss N(mu^2/2, mu^2) the answer is close to
    # mu^2/2 + mu * z with z the (1 - delta) quantile; start just above it.
    z = math.sqrt(2.0 * math.log(1.0 / delta))
    hi = max(1.0, mu * mu / 2.0 + mu * (z + 1.0))
    while f(hi) > 0:
        hi *= 2.0
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-13, rtol=1e-14, maxiter=500))


def gdp_mu_for_epsilon(epsilon: float, delta: float) -> float:
    """The mu for which mu-GDP has exactly the (epsilon, delta) profile point."""
    log_target = math.log(delta)

    def f(log_mu: float) -> float:
        return gdp_log_delta(epsilon, math.exp(log_mu)) - log_target

    # Bisection on log(mu): robust to log delta = -inf for tiny mu.
    lo, hi = -30.0, 1.0
    while f(hi) < 0:
        hi += 2.0
    while f(lo) > 0 and lo > -700.0:
        lo -= 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return math.exp(0.5 * (lo + hi))


def gdp_depsilon_dmu(mu: float, delta: float) -> float:
    """d epsilon / d mu along the mu-GDP curve at fixed delta.

    Differentiating delta(eps, mu) gives d eps / d mu = phi(b) / Phi(b) with
    b = -eps/mu - mu/2 (the e^eps terms cancel because e^eps phi(b) = phi(a)).
    """
    eps = gdp_epsilon(mu, delta)
    b = -eps / mu - mu / 2.0
    return math.exp(-0.5 * b * b - _LOG_2PI_HALF - float(special.log_ndtr(b)))


def clt_mu_poisson(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """CLT mu of ``steps`` Poisson-subsampled Gaussian steps.

    mu = q * sqrt(T * (exp(1 / sigma^2) - 1))   (Bu et al. 2020).
    """
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with np.errstate(over="ignore"):
        growth = float(np.expm1(1.0 / noise_multiplier**2))
    return sample_rate * math.sqrt(steps * growth)


def clt_mu_uniform(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """CLT mu of ``steps`` uniformly subsampled (fixed batch size) Gaussian steps.

    mu = sqrt(2) q sqrt(T (e^{1/s^2} Phi(1.5/s) + 3 Phi(-0.5/s) - 2))
    (Bu et al. 2020; Dong, Roth, Su 2019).
    """
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    s = noise_multiplier
    with np.errstate(over="ignore"):
        inner = float(
            np.exp(s**-2) * special.ndtr(1.5 / s) + 3.0 * special.ndtr(-0.5 / s) - 2.0
        )
    return math.sqrt(2.0) * sample_rate * math.sqrt(steps * max(inner, 0.0))


def history_mu(history: Sequence[HistoryEntry], poisson: bool = True) -> float:
    """CLT mu of a heterogeneous history; GDP composes as mu^2 = sum mu_i^2."""
    mu_fn = clt_mu_poisson if poisson else clt_mu_uniform
    total = 0.0
    for sigma, q, steps in history:
        total += mu_fn(sigma, q, steps) ** 2
    return math.sqrt(total)


class GDPAccountant(IAccountant):
    """CLT / Gaussian-DP *approximation* of DP-SGD (Bu et al. 2020).

    Warning:
        The returned epsilon is an approximation, **not an upper bound**.  For
        the small sample rates used in practice it usually *underestimates* the
        true epsilon, sometimes substantially.  Use :class:`PRVAccountant` (or
        :class:`RDPAccountant`) when a guarantee is needed.

    Unlike Opacus' ``GaussianAccountant`` a history with changing noise or
    sample rate is accepted; phases are combined by GDP composition.
    """

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    @classmethod
    def mechanism(cls) -> str:
        return "gdp"

    def get_mu(self, poisson: bool = True) -> float:
        """The CLT mu of the history so far."""
        return history_mu(self._validated_history(), poisson=poisson)

    def get_epsilon(self, delta: float, poisson: bool = True, **kwargs: Any) -> float:
        """Approximate epsilon (NOT an upper bound) via the GDP central limit theorem.

        Args:
            delta: target delta, in (0, 1).
            poisson: ``True`` for Poisson subsampling (default), ``False`` for
                uniform sampling of a fixed batch size.
        """
        delta = check_delta(delta)
        if not self._warned:
            self._warned = True
            warnings.warn(
                "GDPAccountant returns a central-limit-theorem APPROXIMATION of "
                "epsilon, not an upper bound; it typically underestimates the true "
                "epsilon. Use PRVAccountant or RDPAccountant for a guarantee.",
                UserWarning,
                stacklevel=2,
            )
        return gdp_epsilon(self.get_mu(poisson=poisson), delta)

    def get_privacy_spent(
        self, *, delta: float, poisson: bool = True
    ) -> tuple[float, float]:
        """Returns ``(epsilon, mu)``; epsilon is an approximation (see class docs)."""
        return self.get_epsilon(delta, poisson=poisson), self.get_mu(poisson=poisson)
