"""Privacy loss of one Poisson-subsampled Gaussian step and its connect-the-dots
discretisation on a grid ``h Z`` (steps 1 and 2 of :mod:`fxdp.accountants.prv`)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..base import LazyModule

special = LazyModule("scipy.special")


def _log1m(q: float) -> float:
    """log(1 - q), with log(0) = -inf."""
    return math.log1p(-q) if q < 1 else -math.inf


def _log_sub_exp(a: np.ndarray, b: float) -> np.ndarray:
    """log(exp(a) - exp(b)) for a > b, accurate when a ~ b and when b = -inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return a + np.log(-np.expm1(b - a))


def sgm_privacy_loss(x: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """l(x) = log((1 - q) + q exp((2x - 1) / (2 sigma^2))).

    Log density ratio of (1-q) N(0, s^2) + q N(1, s^2) over N(0, s^2); it is
    increasing in x (Mironov et al. 2019, Section 3; Gopi et al. 2021, App. B).
    """
    with np.errstate(divide="ignore"):
        return np.logaddexp(
            _log1m(q), math.log(q) + (2.0 * np.asarray(x) - 1.0) / (2.0 * sigma**2)
        )


def sgm_inverse_privacy_loss(loss: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """The x with l(x) = loss; -inf where loss <= log(1 - q) (below the range)."""
    loss = np.asarray(loss, dtype=np.float64)
    log_1mq = _log1m(q)
    inside = loss > log_1mq
    safe = np.where(inside, loss, log_1mq + 1.0 if q < 1 else 0.0)
    x = sigma**2 * (_log_sub_exp(safe, log_1mq) - math.log(q)) + 0.5
    return np.where(inside, x, -np.inf)


def _log_normal_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log P(a < Z <= b) for a standard normal Z, accurate in both tails."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    flip = a > 0  # use the lower tail on whichever side is small
    lo = np.where(flip, -b, a)
    hi = np.where(flip, -a, b)
    la, lb = special.log_ndtr(lo), special.log_ndtr(hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = lb + np.log(-np.expm1(la - lb))
    return np.where(b > a, out, -np.inf)


def _log_mixture_mass(
    a: np.ndarray, b: np.ndarray, sigma: float, q: float
) -> np.ndarray:
    """log of (1-q) N(0, s^2)((a, b]) + q N(1, s^2)((a, b])."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(
            _log1m(q) + _log_normal_mass(a / sigma, b / sigma),
            math.log(q) + _log_normal_mass((a - 1.0) / sigma, (b - 1.0) / sigma),
        )


@dataclass(frozen=True)
class DiscretePLD:
    """A privacy loss distribution on the grid ``h * (offset + arange(len(pmf)))``.

    ``infinity_mass`` is the probability of loss ``+inf``; ``moved_mass`` is the
    lower-tail mass that was moved up to the first grid point (bookkeeping for
    the lower bound).
    """

    h: float
    offset: int
    pmf: np.ndarray
    infinity_mass: float
    moved_mass: float

    @functools.cached_property
    def _support(self) -> tuple[np.ndarray, np.ndarray]:
        k = np.nonzero(self.pmf > 0)[0]
        return self.h * (self.offset + k), np.log(self.pmf[k])

    def log_mgf(self, lam: float) -> float:
        """log E[exp(lam L); L finite]."""
        loss, log_p = self._support
        if loss.size == 0:
            return -math.inf
        x = lam * loss + log_p
        m = float(x.max())
        return m + math.log(float(np.exp(x - m).sum()))


def _tail_quantile(tail_mass: float) -> float:
    """z with P(Z > z) = tail_mass for a standard normal Z."""
    return float(-special.ndtri(tail_mass))


def sgm_loss_range(
    sigma: float, q: float, remove: bool, tail_mass: float
) -> tuple[float, float]:
    """Loss interval outside of which each tail has mass <= tail_mass."""
    z = _tail_quantile(tail_mass)
    if remove:
        # P = (1-q) N(0) + q N(1): both components' tails are covered by
        # x in [-sigma z, 1 + sigma z].
        lo = float(sgm_privacy_loss(-sigma * z, sigma, q))
        hi = float(sgm_privacy_loss(1.0 + sigma * z, sigma, q))
    else:
        # P = N(0, s^2) and L = -l(x) is decreasing in x.
        lo = -float(sgm_privacy_loss(sigma * z, sigma, q))
        hi = -float(sgm_privacy_loss(-sigma * z, sigma, q))
    return lo, hi


def discretize_sgm_pld(
    sigma: float, q: float, h: float, remove: bool, tail_mass: float
) -> DiscretePLD:
    """Connect-the-dots discretisation of one subsampled Gaussian step.

    For each grid cell B = {a < L <= a + h} with masses P(B), Q(B) under the
    pair (P, Q), the mass P(B) is split into ``up = (P(B) - e^a Q(B)) / (1 - e^-h)``
    at ``a + h`` and the rest at ``a``, which preserves both P(B) and
    ``Q(B) = E_P[e^{-L}; B]`` (Doroshenko et al. 2022, Section 3).

    Args:
        remove: ``True`` for P = (1-q) N(0,s^2) + q N(1,s^2), Q = N(0,s^2);
            ``False`` for the swapped ("add") pair.
        tail_mass: each truncated tail has at most this mass.
    """
    lo, hi = sgm_loss_range(sigma, q, remove, tail_mass)
    i_lo = math.floor(lo / h)
    i_hi = max(math.ceil(hi / h), i_lo + 1)
    edges = np.arange(i_lo, i_hi + 1, dtype=np.float64) * h
    if remove:
        x = sgm_inverse_privacy_loss(edges, sigma, q)  # increasing
        log_q_mass = _log_normal_mass(x[:-1] / sigma, x[1:] / sigma)
        log_p_mass = _log_mixture_mass(x[:-1], x[1:], sigma, q)
        log_below = _log_mixture_mass(np.array(-np.inf), x[0], sigma, q)
        log_above = _log_mixture_mass(x[-1], np.array(np.inf), sigma, q)
    else:
        # L = -l(x) lies in (a, a+h] iff x lies in [x(-a-h), x(-a)).
        y = sgm_inverse_privacy_loss(-edges, sigma, q)  # decreasing
        log_p_mass = _log_normal_mass(y[1:] / sigma, y[:-1] / sigma)
        log_q_mass = _log_mixture_mass(y[1:], y[:-1], sigma, q)
        log_below = _log_normal_mass(np.array(y[0] / sigma), np.array(np.inf))
        log_above = _log_normal_mass(np.array(-np.inf), np.array(y[-1] / sigma))
    p_mass = np.exp(log_p_mass)
    with np.errstate(invalid="ignore"):
        # log(e^a Q(B) / P(B)) lies in [-h, 0] because Q = e^{-L} P on B;
        # clipping only absorbs round-off (and empty cells, which give nan).
        log_ratio = edges[:-1] + log_q_mass - log_p_mass
    log_ratio = np.clip(np.nan_to_num(log_ratio, nan=0.0), -h, 0.0)
    up = p_mass * (-np.expm1(log_ratio)) / (-math.expm1(-h))
    pmf = np.zeros(edges.size)
    pmf[:-1] += p_mass - up
    pmf[1:] += up
    moved = float(np.exp(log_below))
    pmf[0] += moved
    return DiscretePLD(
        h=h,
        offset=i_lo,
        pmf=pmf,
        infinity_mass=float(np.exp(log_above)),
        moved_mass=moved,
    )
