"""One discretise-tilt-compose-convert pass: Chernoff windows, FFT composition of
discrete PLDs and the hockey-stick conversion to epsilon (steps 3 and 4 of
:mod:`fxdp.accountants.prv`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..base import HistoryEntry, LazyModule
from .pld import DiscretePLD, discretize_sgm_pld

sfft, optimize, signal = (LazyModule(f"scipy.{m}") for m in ("fft", "optimize", "signal"))

# Largest FFT grid of a fine pass (one FFT of that size takes ~0.1 s).
_MAX_SIZE = 1 << 21


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
