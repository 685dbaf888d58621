"""Epsilon bounds of a DP-SGD history: mesh and window choice (coarse then fine
pass, tilted when delta is tiny), both adjacency directions, the exact ``q = 1``
case and the RDP fallback; :func:`prv_epsilon_bounds` is the entry point."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import HistoryEntry, check_delta, check_positive, normalize_history
from ..gdp import gdp_depsilon_dmu, gdp_epsilon, gdp_mu_for_epsilon
from ..rdp import DEFAULT_ALPHAS, _rdp_curve, rdp_to_epsilon
from .compose import (
    _MAX_SIZE,
    Components,
    EpsilonBounds,
    _PassResult,
    _run_pass,
    _saddle_point,
    _std,
    _total_log_mgf,
    _window,
)
from .pld import _log1m, discretize_sgm_pld, sgm_loss_range

# Grid sizes.  The coarse pass locates epsilon; the fine pass is sized from the
# requested accuracy, capped by compose._MAX_SIZE.
_COARSE_SIZE = 1 << 13
_RANGE_BINS = 1 << 11
_MAX_STEP_BINS = 1 << 22
# Default accuracy: bias of the estimate <= max(_ABS_EPS_ERROR, _REL_EPS_ERROR * eps).
_ABS_EPS_ERROR = 5e-4
_REL_EPS_ERROR = 2e-5


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
