"""Numerical composition of privacy loss distributions for DP-SGD.

A privacy-random-variable (PRV) / privacy-loss-distribution (PLD) accountant
in the style of Gopi, Lee, Wutschitz 2021 ("Numerical Composition of
Differential Privacy") and Koskela, Jalko, Honkela 2020 ("Computing Tight
Differential Privacy Guarantees Using FFT"), using the "connect the dots"
discretisation of Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022 ("Connect
the Dots: Tighter Discrete Approximations of Privacy Loss Distributions").

Pipeline, for each adjacency direction (remove and add are both computed and
the larger epsilon is reported, as ``dp_accounting`` does):

1. Privacy loss of one Poisson-subsampled Gaussian step (sensitivity 1):
   ``l(x) = log((1 - q) + q exp((2x - 1) / (2 sigma^2)))`` is the log
   likelihood ratio of ``P = (1-q) N(0, s^2) + q N(1, s^2)`` against
   ``Q = N(0, s^2)`` (remove); the add direction swaps P and Q.
2. Discretise the loss on the grid ``h Z`` (:func:`discretize_sgm_pld`): the
   P-mass of every cell ``(a, a + h]`` is split between its end points so that
   ``E_P[exp(-L)]`` (the cell's Q-mass) is preserved.  This is the PLD of a
   pair that dominates the true pair (Doroshenko et al. 2022), so every
   epsilon computed from it is an upper bound, with a bias of second order in
   ``h``.  Tails beyond a Gaussian quantile are truncated pessimistically: the
   upper tail becomes loss ``+inf`` and the lower tail is moved up to the first
   grid point; both only increase delta.
3. Compose with the real FFT: ``T``-fold self composition is a pointwise
   power of the transform and heterogeneous histories are products.  The
   circular convolution wraps around the mass that leaves the window; a
   Chernoff bound computed on the *discrete* distributions bounds it, and it
   is charged to delta.  When delta is below what float64 resolves next to the
   peak of the distribution, the pmfs are first exponentially tilted by
   ``exp(lam L)`` (saddle point at epsilon), which makes the precision relative
   to delta instead of absolute.
4. Convert with the hockey-stick formula
   ``delta(eps) = E_P[(1 - exp(eps - L))_+] + P(L = inf)``, evaluated with two
   first-order reverse recursions, and solve ``delta(eps) = target`` in closed
   form inside the bracketing grid cell.  Nothing here overflows, so epsilons in
   the hundreds of thousands are fine.

Mesh and window are chosen automatically: a coarse pass locates epsilon, and
the fine mesh is set from a GDP model of the rounding error (the rounding adds
variance <= h^2 / 4 per step to the privacy loss, i.e. acts like composing with
``mu_E``-GDP, ``mu_E^2 <= T h^2 / 4``) so that the bias is at most
``eps_error`` (default ``max(5e-4, 2e-5 * eps)``).

Bounds returned by :func:`prv_epsilon_bounds`:

* ``upper``: an upper bound on the true epsilon: the discretisation dominates,
  and truncated, wrapped and infinite mass is added to delta.  The float64
  round-off of the FFT is not bounded rigorously; it is estimated as
  ``4 (T + log2 N) u max(pmf)`` per entry (measured errors against extended
  precision stay below an eighth of that) and also charged to delta.
* ``estimate``: epsilon of the discrete PLD itself, without the slack for
  wrapped mass and round-off.
* ``lower``: a lower bound.  The split of step 2 is a randomised rounding
  ``L' = L + Y`` with ``Y`` in an interval of length ``h`` and
  ``0 <= E[Y | L] <= d(h) ~ h^2 / 8``, so by Hoeffding's inequality
  ``S' <= S + T d(h) + h sqrt(T log(1/p) / 2)`` except with probability ``p``
  (the argument of Gopi et al. 2021 applied to this rounding), giving
  ``eps_true >= eps'(delta + slack) - shift``.

Exact special case: when ``sample_rate == 1`` for every step there is no
subsampling and the composition is exactly a Gaussian mechanism with
``mu = sqrt(sum_i T_i / sigma_i^2)``, whose epsilon is computed in closed form
(Balle & Wang 2018) for any size of epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .base import (
    HistoryEntry,
    IAccountant,
    LazyModule,
    check_delta,
    check_positive,
    normalize_history,
)
from .gdp import gdp_depsilon_dmu, gdp_epsilon, gdp_mu_for_epsilon
from .rdp import DEFAULT_ALPHAS, _rdp_curve, rdp_to_epsilon

sfft, optimize, signal, special = (LazyModule(f"scipy.{m}") for m in ("fft", "optimize", "signal", "special"))

__all__ = [
    "EpsilonBounds",
    "PRVAccountant",
    "discretize_sgm_pld",
    "prv_epsilon_bounds",
    "sgm_inverse_privacy_loss",
    "sgm_privacy_loss",
]

# Grid sizes.  The coarse pass locates epsilon; the fine pass is sized from the
# requested accuracy, capped by _MAX_SIZE (one FFT of that size takes ~0.1 s).
_COARSE_SIZE = 1 << 13
_RANGE_BINS = 1 << 11
_MAX_SIZE = 1 << 21
_MAX_STEP_BINS = 1 << 22
# Default accuracy: bias of the estimate <= max(_ABS_EPS_ERROR, _REL_EPS_ERROR * eps).
_ABS_EPS_ERROR = 5e-4
_REL_EPS_ERROR = 2e-5


# ---------------------------------------------------------------------------
# Privacy loss of the Poisson-subsampled Gaussian mechanism.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Composition and conversion.
# ---------------------------------------------------------------------------


Components = Sequence[tuple[DiscretePLD, int]]
# (u_lo, u_hi, theta_lo, theta_hi, log_tail): a window for the composed loss.
Window = tuple[float, float, float, float, float]


def _total_log_mgf(components: Components, lam: float) -> float:
    """K(lam) = log E[exp(lam S); S finite] for the composed loss S."""
    return sum(n * pld.log_mgf(lam) for pld, n in components)


def _std(components: Components) -> float:
    """Standard deviation of the composed finite loss."""
    var = 0.0
    for pld, n in components:
        mass = pld.pmf.sum()
        if mass > 0:
            v = pld.h * (pld.offset + np.arange(pld.pmf.size))
            m1 = float(np.dot(pld.pmf, v) / mass)
            var += n * float(np.dot(pld.pmf, (v - m1) ** 2) / mass)
    return math.sqrt(max(var, 1e-300))


def _minimize_log_scale(
    fun: Callable[[float], float], center: float
) -> tuple[float, float]:
    """Minimises ``fun(t)`` over t > 0 on a log scale around ``center``."""
    res = optimize.minimize_scalar(
        lambda u: fun(math.exp(u)),
        bounds=(math.log(center) - 14.0, math.log(center) + 6.0),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return math.exp(float(res.x)), float(res.fun)


def _window(components: Components, lam: float, log_tail: float) -> Window:
    """Chernoff window of the lam-tilted composed loss.

    Under the tilt dP~ = exp(lam S - K(lam)) dP, for theta > 0
    P~(S >= u) <= exp(K(lam + theta) - K(lam) - theta u) and
    P~(S <= u) <= exp(K(lam - theta) - K(lam) + theta u).  Returns the
    interval where both bounds equal ``exp(log_tail)`` and the thetas used.
    """
    k0 = _total_log_mgf(components, lam)
    center = math.sqrt(-2.0 * min(log_tail, -1.0)) / _std(components)
    th_hi, u_hi = _minimize_log_scale(
        lambda t: (_total_log_mgf(components, lam + t) - k0 - log_tail) / t, center
    )
    th_lo, neg_u_lo = _minimize_log_scale(
        lambda t: (_total_log_mgf(components, lam - t) - k0 - log_tail) / t, center
    )
    return -neg_u_lo, u_hi, th_lo, th_hi, log_tail


def _saddle_point(components: Components, eps: float) -> float:
    """argmin_{lam >= 0} K(lam) - lam eps: the tilt that centres S at eps."""
    k0 = _total_log_mgf(components, 0.0)
    center = 1.0 / _std(components)
    lam, val = _minimize_log_scale(
        lambda t: _total_log_mgf(components, t) - t * eps, center
    )
    return lam if val < k0 else 0.0


def _compose(components: Components, start: int, size: int) -> np.ndarray:
    """pmf of the composed loss on the window ``h * (start + arange(size))``.

    Circular convolution via the real FFT: mass outside the window wraps around
    (the caller bounds and charges it).
    """
    spectrum: np.ndarray | None = None
    for pld, n in components:
        idx = np.mod(pld.offset + np.arange(pld.pmf.size), size)
        f = sfft.rfft(np.bincount(idx, weights=pld.pmf, minlength=size))
        with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
            # f**n in polar form: underflows cleanly to 0 and keeps the phase exact.
            f = np.exp(n * (np.log(np.abs(f)) + 1j * np.angle(f)))
        f = np.nan_to_num(f, nan=0.0)
        spectrum = f if spectrum is None else spectrum * f
    out = sfft.irfft(spectrum, n=size)
    return np.roll(out, -(start % size))


class _HockeyStick:
    """delta(eps) = sum_i p_i (1 - exp(eps - s_i))_+ for p_i = c_i exp(K - lam s_i).

    ``c`` is the lam-tilted pmf on s_i = h (start + i).  With
    A_k = sum_{i>=k} c_i e^{-lam (s_i - s_k)} and
    B_k = sum_{i>=k} c_i e^{-(lam + 1)(s_i - s_k)} (two first-order recursions),
    delta(eps) = e^{K - lam s_k} (A_k - e^{eps - s_k} B_k) on [s_{k-1}, s_k], which
    is solved for eps in closed form.  Working with the tilted pmf keeps the
    relative precision near eps even when delta is tiny.
    """

    def __init__(
        self, c: np.ndarray, start: int, h: float, lam: float, log_k: float
    ) -> None:
        rev = c[::-1]
        self.a = signal.lfilter([1.0], [1.0, -math.exp(-lam * h)], rev)[::-1]
        self.b = signal.lfilter([1.0], [1.0, -math.exp(-(lam + 1.0) * h)], rev)[::-1]
        self.s = h * (start + np.arange(c.size))
        self.h, self.lam, self.log_k = h, lam, log_k
        with np.errstate(divide="ignore", invalid="ignore"):
            log_diff = np.log(self.a - self.b)
        self.log_delta = np.where(
            np.isnan(log_diff), -np.inf, log_k - lam * self.s + log_diff
        )

    def epsilon(self, target: float) -> tuple[float, bool]:
        """Smallest eps >= 0 with delta(eps) <= target, and whether it fell
        below the window (where the pmf is unknown)."""
        if not target > 0:
            return math.inf, False
        log_t = math.log(target)
        above = np.nonzero(self.log_delta > log_t)[0]
        k = int(above[-1]) + 1 if above.size else 0
        if k >= self.s.size:  # impossible in exact arithmetic
            return math.inf, False
        # Only a tilted pmf leaves mass below the window unaccounted for.
        below = k == 0 and self.s[0] > 0 and self.lam > 0
        s_k = float(self.s[k])
        scaled = math.exp(min(log_t - (self.log_k - self.lam * s_k), 700.0))
        if self.a[k] <= scaled or self.b[k] <= 0:
            return (max(s_k - self.h, 0.0) if k > 0 else 0.0), below
        eps = s_k + math.log((self.a[k] - scaled) / self.b[k])
        return max(eps, 0.0), below


@dataclass(frozen=True)
class EpsilonBounds:
    """``lower <= true epsilon <= upper``; ``estimate`` is the point estimate."""

    lower: float
    estimate: float
    upper: float

    def __iter__(self):
        return iter((self.lower, self.estimate, self.upper))


@dataclass(frozen=True)
class _PassResult:
    bounds: EpsilonBounds
    h: float
    size: int
    lam: float
    components: Components
    below_window: bool
    delta_slack: float  # delta charged for truncation, wrap-around and rounding

    def usable(self, delta_error: float) -> bool:
        """Whether the window and precision were adequate for this delta."""
        return (
            not self.below_window
            and math.isfinite(self.bounds.upper)
            and self.delta_slack <= 2.0 * delta_error
        )


def _hoeffding_shift(h: float, steps: int, log_fail: float) -> float:
    """Upper bound on S' - S except with probability exp(log_fail).

    Per step the rounding Y has range h and drift E[Y | L] <= d(h) with
    d(h) = max_u h (1 - e^-u) / (1 - e^-h) - u, attained at u = log(h / (1 - e^-h)).
    """
    u = math.log(h / -math.expm1(-h))
    drift = h * -math.expm1(-u) / -math.expm1(-h) - u
    return steps * max(drift, 0.0) + h * math.sqrt(steps * -log_fail / 2.0)


def _run_pass(
    entries: Sequence[HistoryEntry],
    delta: float,
    h: float,
    remove: bool,
    delta_error: float,
    lam: float,
    window: Window,
) -> _PassResult:
    """One discretise-tilt-compose-convert pass on grid ``h`` for one direction."""
    steps = sum(n for _, _, n in entries)
    step_tail = 0.25 * delta_error / steps
    components = [
        (discretize_sgm_pld(s, q, h, remove, step_tail), n) for s, q, n in entries
    ]
    u_lo, u_hi, th_lo, th_hi, log_tail = window
    log_k = _total_log_mgf(components, lam)
    k_hi = _total_log_mgf(components, lam + th_hi)
    k_lo = _total_log_mgf(components, lam - th_lo)
    for _ in range(8):
        start = math.floor(u_lo / h) - 1
        size = sfft.next_fast_len(math.ceil(u_hi / h) + 2 - start, real=True)
        stop = start + size - 1
        # Tilted mass outside the window (it wraps around in the FFT).
        log_w_hi = k_hi - log_k - th_hi * (stop + 1) * h
        log_w_lo = k_lo - log_k + th_lo * (start - 1) * h
        if max(log_w_hi, log_w_lo) <= log_tail + 2.0 or size >= 4 * _MAX_SIZE:
            break
        width = u_hi - u_lo
        u_lo, u_hi = u_lo - 0.25 * width, u_hi + 0.25 * width
    tilted = []
    for pld, n in components:
        with np.errstate(divide="ignore"):
            log_p = np.log(pld.pmf) + lam * h * (pld.offset + np.arange(pld.pmf.size))
        tilted.append(
            (DiscretePLD(h, pld.offset, np.exp(log_p - pld.log_mgf(lam)), 0.0, 0.0), n)
        )
    if steps == 1:
        # A single step needs no FFT: place the pmf directly (exact).
        pld = tilted[0][0]
        idx = np.mod(pld.offset + np.arange(pld.pmf.size) - start, size)
        c = np.bincount(idx, weights=pld.pmf, minlength=size)
        noise = 0.0
    else:
        c = _compose(tilted, start, size)
        # Float64 error per entry of the FFT power is about (T + log2 N) u max(c)
        # (measured against extended precision it stays below half of that);
        # take 4x that, or the most negative entry if larger.
        noise = max(
            4.0 * (steps + math.log2(size)) * np.finfo(np.float64).eps * float(c.max()),
            -float(c.min()),
        )
        c = np.maximum(c, 0.0)
    curve = _HockeyStick(c, start, h, lam, log_k)
    log_wrapped = float(np.logaddexp(log_w_hi, log_w_lo))
    log_fin = sum(n * math.log1p(-min(pld.infinity_mass, 1.0)) for pld, n in components)
    inf_mass = -math.expm1(log_fin)
    # Untilted mass above the window (a probability bound, so capped at 1).
    above = math.exp(min(k_hi - (lam + th_hi) * (stop + 1) * h, 0.0))

    def slack(eps: float) -> float:
        """Error of delta(eps) from wrapped mass and round-off in the tilted pmf.

        An error e at s > eps in the tilted pmf is an error <= e exp(K - lam eps)
        in delta(eps); only the entries above eps contribute round-off.
        """
        count = int(np.count_nonzero(curve.s > eps))
        rel = math.exp(log_wrapped) + noise * count
        if rel <= 0:
            return 0.0
        return math.exp(min(log_k - lam * eps + math.log(rel), 0.0))

    # The estimate is epsilon of the discrete (dominating) PLD, whose +inf
    # atom is part of it; the upper bound adds what the window cannot see.
    estimate, below = curve.epsilon(delta - inf_mass)
    delta_slack = inf_mass + above + slack(estimate)
    upper, _ = curve.epsilon(delta - delta_slack)
    # Lower bound: outside an event of probability trunc + p_fail the
    # discretised sum exceeds the true one by at most `shift`.
    trunc = sum(n * (pld.moved_mass + pld.infinity_mass) for pld, n in components)
    log_fail = math.log(0.1 * delta)
    shift = _hoeffding_shift(h, steps, log_fail)
    lower_point, x = 0.0, estimate
    for _ in range(8):
        xp = x - 1e-9 * max(1.0, abs(x))
        target = delta + trunc + math.exp(log_fail) + slack(xp)
        if not (target < 1.0 and xp > 0):
            break
        e, _ = curve.epsilon(target)
        if e > xp:  # delta'(xp) > delta + slack(xp): certified
            lower_point = xp
            break
        x = e
    lower = max(0.0, lower_point - shift)
    estimate = min(estimate, upper)
    lower = min(lower, estimate)
    result = _PassResult(
        EpsilonBounds(lower, estimate, upper),
        h,
        size,
        lam,
        components,
        below,
        delta_slack,
    )
    return result


def _fine_step(eps: float, delta: float, steps: int, eps_error: float | None) -> float:
    """Grid step for which the discretisation bias is about ``eps_error``.

    The rounding adds to the composed loss an independent term that behaves
    like the PLD of mu_E-GDP with mu_E^2 <= T h^2 / 4 (each step's split has
    variance <= h^2 / 4).  Composing mu-GDP with mu_E-GDP gives
    sqrt(mu^2 + mu_E^2)-GDP, hence bias ~ (d eps / d mu^2) T h^2 / 4 with mu
    the GDP parameter matching the current epsilon.
    """
    target = (
        eps_error
        if eps_error is not None
        else max(_ABS_EPS_ERROR, _REL_EPS_ERROR * eps)
    )
    mu = gdp_mu_for_epsilon(eps, delta)
    slope = gdp_depsilon_dmu(mu, delta) / (2.0 * mu)  # d eps / d (mu^2)
    return math.sqrt(4.0 * target / (steps * slope))


def _tilted_pass(
    entries: Sequence[HistoryEntry],
    delta: float,
    h: float,
    remove: bool,
    delta_error: float,
    reference: Components,
    eps: float,
) -> _PassResult | None:
    """A pass tilted to centre the composed loss at ``eps`` (for tiny delta).

    The tilted window must make exp(K - lam eps) * (wrapped mass) <= delta_error,
    where K - lam eps is the Chernoff exponent at eps.  Returns None when no
    positive tilt centres the loss at ``eps``.
    """
    lam = _saddle_point(reference, eps)
    if lam <= 0:
        return None
    log_tail = math.log(0.125 * delta_error) - (
        _total_log_mgf(reference, lam) - lam * eps
    )
    window = _window(reference, lam, min(log_tail, math.log(1e-3)))
    return _run_pass(entries, delta, h, remove, delta_error, lam, window)


def _robust_pass(
    entries: Sequence[HistoryEntry],
    delta: float,
    h: float,
    remove: bool,
    delta_error: float,
    reference: Components,
    eps_hint: float | None,
    tilt: bool,
) -> _PassResult:
    """Untilted pass (absolute error control), or tilted pass (relative error
    control, needed when delta is below the FFT noise floor); falls back to the
    other kind when the first one's window or precision is inadequate."""
    untilted: _PassResult | None = None
    if not tilt or not eps_hint or eps_hint <= 0:
        untilted = _run_pass(
            entries,
            delta,
            h,
            remove,
            delta_error,
            0.0,
            _window(reference, 0.0, math.log(0.125 * delta_error)),
        )
        if untilted.usable(delta_error) or untilted.bounds.estimate <= 0:
            return untilted
        eps_hint = untilted.bounds.estimate
    best = untilted
    for _ in range(3):
        tilted = _tilted_pass(
            entries, delta, h, remove, delta_error, reference, eps_hint
        )
        if tilted is None:
            break
        if tilted.usable(delta_error):
            return tilted
        if best is None or tilted.bounds.upper < best.bounds.upper:
            best = tilted
        new_hint = tilted.bounds.estimate
        if (
            tilted.below_window
            or new_hint <= 0
            or abs(new_hint - eps_hint) <= 1e-6 * eps_hint
        ):
            break
        eps_hint = new_hint
    if best is None or (untilted is None and not math.isfinite(best.bounds.upper)):
        fallback = _robust_pass(
            entries, delta, h, remove, delta_error, reference, None, False
        )
        best = (
            fallback
            if best is None or fallback.bounds.upper <= best.bounds.upper
            else best
        )
    return best


def _step_loss_width(
    entries: Sequence[HistoryEntry], remove: bool, step_tail: float
) -> float:
    return max(
        np.subtract(*sgm_loss_range(s, q, remove, step_tail)[::-1])
        for s, q, _ in entries
    )


def _coarse_bounds(
    entries: Sequence[HistoryEntry], delta: float, delta_error: float, remove: bool
) -> _PassResult:
    """A cheap pass that locates epsilon (its result is already a valid bound)."""
    steps = sum(n for _, _, n in entries)
    step_tail = 0.25 * delta_error / steps
    width = _step_loss_width(entries, remove, step_tail)
    rough = [
        (discretize_sgm_pld(s, q, width / _RANGE_BINS, remove, step_tail), n)
        for s, q, n in entries
    ]
    u_lo, u_hi = _window(rough, 0.0, math.log(0.125 * delta_error))[:2]
    # The rounding bias grows like T h^2 against a privacy-loss variance T v,
    # so for long histories the mesh must also be small against sqrt(v); the
    # mean shift, about T h^2 / 8, must stay inside the window the fine pass
    # reuses.
    total_std = _std(rough)
    h0 = max(
        min(
            (u_hi - u_lo) / _COARSE_SIZE,
            0.3 * total_std / math.sqrt(steps),
            math.sqrt(2.0 * total_std / steps),
        ),
        (u_hi - u_lo) / _MAX_SIZE,
        width / _MAX_STEP_BINS,
    )
    return _robust_pass(
        entries, delta, h0, remove, delta_error, rough, None, tilt=False
    )


def _refined_bounds(
    entries: Sequence[HistoryEntry],
    delta: float,
    eps_error: float | None,
    delta_error: float,
    remove: bool,
    coarse: _PassResult,
) -> _PassResult:
    """A fine pass whose mesh is sized for ``eps_error`` from the coarse epsilon."""
    steps = sum(n for _, _, n in entries)
    eps0 = coarse.bounds.estimate
    h1 = _fine_step(eps0, delta, steps, eps_error)
    if h1 >= 0.8 * coarse.h:
        return coarse
    u_lo, u_hi = _window(coarse.components, 0.0, math.log(0.125 * delta_error))[:2]
    width = _step_loss_width(entries, remove, 0.25 * delta_error / steps)
    h1 = max(h1, (u_hi - u_lo) / _MAX_SIZE, width / _MAX_STEP_BINS)
    fine = _robust_pass(
        entries,
        delta,
        h1,
        remove,
        delta_error,
        coarse.components,
        eps0,
        tilt=coarse.lam > 0,
    )
    return fine if fine.bounds.upper <= coarse.bounds.upper else coarse


def _direction_bounds(
    entries: Sequence[HistoryEntry],
    delta: float,
    eps_error: float | None,
    delta_error: float,
    remove: bool,
) -> _PassResult:
    """Coarse then fine pass for one adjacency direction."""
    coarse = _coarse_bounds(entries, delta, delta_error, remove)
    return _refined_bounds(entries, delta, eps_error, delta_error, remove, coarse)


def _exact_gaussian(entries: Sequence[HistoryEntry], delta: float) -> float:
    mu = math.sqrt(sum(n / s**2 for s, _, n in entries))
    return gdp_epsilon(mu, delta)


def _fallback_upper(
    entries: Sequence[HistoryEntry], delta: float, remove: bool
) -> float:
    """A coarser but always finite bound, used if float64 cannot resolve delta.

    The sampled-Gaussian RDP bound (Mironov et al. 2019), which Opacus, TF
    Privacy and dp_accounting use for add-or-remove adjacency; in the add
    direction the loss of a step is also at most log(1 / (1 - q)), so there
    eps <= sum_i T_i log(1 / (1 - q_i)) as well.
    """
    orders = tuple(map(float, DEFAULT_ALPHAS))
    rdp = sum(_rdp_curve(q, s, orders) * n for s, q, n in entries)
    bound = rdp_to_epsilon(orders, rdp, delta)[0]
    if not remove:
        bound = min(bound, sum(-n * _log1m(q) for _, q, n in entries))
    return bound


@functools.lru_cache(maxsize=128)
def _cached_bounds(
    entries: tuple[HistoryEntry, ...],
    delta: float,
    eps_error: float | None,
    delta_error: float,
) -> EpsilonBounds:
    if not entries:
        return EpsilonBounds(0.0, 0.0, 0.0)
    if any(s == 0 for s, _, _ in entries):
        return EpsilonBounds(math.inf, math.inf, math.inf)
    if all(q == 1.0 for _, q, _ in entries):
        eps = _exact_gaussian(entries, delta)
        return EpsilonBounds(eps, eps, eps)

    def upper_of(res: _PassResult, remove: bool) -> float:
        if math.isfinite(res.bounds.upper):
            return res.bounds.upper
        return _fallback_upper(entries, delta, remove)

    coarse = {r: _coarse_bounds(entries, delta, delta_error, r) for r in (True, False)}
    # Refine the direction with the larger epsilon; the other one keeps its
    # coarse (still valid) bound unless that bound is the larger one.
    first, second = sorted(
        coarse, key=lambda r: coarse[r].bounds.estimate, reverse=True
    )
    results = {
        first: _refined_bounds(
            entries, delta, eps_error, delta_error, first, coarse[first]
        )
    }
    uppers = {first: upper_of(results[first], first)}
    results[second] = coarse[second]
    uppers[second] = upper_of(coarse[second], second)
    if uppers[second] > uppers[first]:
        results[second] = _refined_bounds(
            entries, delta, eps_error, delta_error, second, coarse[second]
        )
        uppers[second] = upper_of(results[second], second)
    lower = max(r.bounds.lower for r in results.values())
    upper = max(uppers.values())
    dominant = max(uppers, key=uppers.__getitem__)
    estimate = min(max(results[dominant].bounds.estimate, lower), upper)
    return EpsilonBounds(lower, estimate, upper)


def prv_epsilon_bounds(
    history: Sequence[Sequence[Any]],
    delta: float,
    eps_error: float | None = None,
    delta_error: float | None = None,
) -> EpsilonBounds:
    """(lower, estimate, upper) epsilon of a DP-SGD history at ``delta``.

    Args:
        history: ``(noise_multiplier, sample_rate, num_steps)`` triples.
        delta: target delta in (0, 1).
        eps_error: target bias of the estimate.  Default: the larger of 5e-4
            and 2e-5 * epsilon.  Smaller values use finer grids (slower).
        delta_error: delta slack spent on truncation and wrap-around.  Default
            ``delta / 1000``.
    """
    delta = check_delta(delta)
    entries = tuple(e for e in normalize_history(history) if e[2] > 0)
    if eps_error is not None:
        eps_error = check_positive("eps_error", eps_error)
    if delta_error is None:
        delta_error = delta / 1000.0
    delta_error = check_positive("delta_error", delta_error)
    if delta_error >= delta:
        raise ValueError(
            f"delta_error must be smaller than delta, got delta_error={delta_error!r} "
            f"and delta={delta!r} (the default delta / 1000 is a good choice)"
        )
    # Merge equal mechanisms: composition is commutative.
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in entries:
        merged[(s, q)] = merged.get((s, q), 0) + n
    key = tuple(sorted((s, q, n) for (s, q), n in merged.items()))
    return _cached_bounds(key, delta, eps_error, delta_error)


class PRVAccountant(IAccountant):
    """Numerical (FFT) accountant for DP-SGD with upper and lower bounds.

    Drop-in replacement for ``opacus.accountants.PRVAccountant``;
    :meth:`get_epsilon` returns the *upper* bound, so it is safe to report.
    The bounds are rigorous except for the float64 round-off of the FFT, which
    is estimated conservatively and charged to delta.  See the module
    docstring for the method.
    """

    @classmethod
    def mechanism(cls) -> str:
        return "prv"

    def get_epsilon_bounds(
        self,
        delta: float,
        *,
        eps_error: float | None = None,
        delta_error: float | None = None,
    ) -> tuple[float, float, float]:
        """Returns ``(lower, estimate, upper)`` with lower <= true eps <= upper."""
        return tuple(prv_epsilon_bounds(self.history, delta, eps_error, delta_error))  # type: ignore[return-value]

    def get_epsilon(
        self,
        delta: float,
        *,
        eps_error: float | None = None,
        delta_error: float | None = None,
        **kwargs: Any,
    ) -> float:
        """An upper bound on the epsilon spent so far at ``delta``.

        Args:
            delta: target delta in (0, 1).
            eps_error: target discretisation bias (default: max(5e-4, 2e-5 eps)).
            delta_error: delta slack for truncation (default ``delta / 1000``).
        """
        return prv_epsilon_bounds(self.history, delta, eps_error, delta_error).upper
