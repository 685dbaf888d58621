"""Empirical privacy auditing: statistically valid lower bounds on the epsilon of the
real DP step, to catch implementations that are less private than they claim.

An (epsilon, delta)-DP mechanism limits every test between neighbouring datasets ``D``
(with a canary) and ``D'`` (without): ``TPR <= e^eps FPR + delta`` and
``TNR <= e^eps FNR + delta`` (Kairouz, Oh, Viswanath 2015). Running an attack and
bounding its rates with confidence intervals therefore gives
``eps >= log((TPR_lo - delta) / FPR_hi)`` with the stated confidence (Jagielski,
Ullman, Oprea 2020, "Auditing differentially private machine learning"; Nasr et al.
2021, "Adversary instantiation"). An estimate above the accountant's epsilon proves
a bug (or a broken assumption), up to the confidence level; one below proves nothing.

* :func:`audit_dp_step` / :func:`audit_training_step`: many runs of one real
  ``DPOptimizer`` step with and without a canary (a crafted per-sample gradient, or a
  canary example through a privatized model); threshold test on the update's
  projection; Clopper-Pearson intervals on a held-out half.
* :func:`one_run_audit`: Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1)
  training run": ``m`` gradient canaries, each included with probability 1/2, one
  training run, guesses from the scores, and their Theorem 3.1 turned into a bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .accountants.base import LazyModule

stats = LazyModule("scipy.stats")  # imported when an audit runs, not with fxdp

__all__ = [
    "AuditResult",
    "OneRunAuditResult",
    "clopper_pearson",
    "claimed_epsilon",
    "threshold_audit",
    "audit_dp_step",
    "audit_training_step",
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "one_run_audit_from_scores",
    "one_run_audit",
]

OptimizerFactory = Callable[[list[nn.Parameter]], Any]  # -> DPOptimizer


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a canary audit (:func:`audit_dp_step`, :func:`audit_training_step`).

    ``epsilon_lb`` holds with probability >= ``confidence`` if the mechanism is
    (epsilon, delta)-DP for every epsilon below it; ``violation`` is
    ``epsilon_lb > epsilon_claimed``.
    """

    epsilon_lb: float
    epsilon_claimed: float
    delta: float
    confidence: float
    trials: int  #: runs per world (with / without the canary)
    violation: bool
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        d = self.details
        verdict = "VIOLATION" if self.violation else "ok"
        rates = ""
        if "tpr" in d:
            rates = (
                f"; test '{d['direction']}', t = {d['threshold']:.4g}, bound from {d['inequality']}, on "
                f"{d['holdout']} held-out runs per world: TPR {d['tpr']:.4f} (>= {d['tpr_lo']:.4f}), "
                f"FPR {d['fpr']:.4f} (<= {d['fpr_hi']:.4f})"
            )
        return (
            f"{verdict}: epsilon_lb = {self.epsilon_lb:.3f} vs claimed {self.epsilon_claimed:.3f} "
            f"(delta={self.delta:g}, confidence {self.confidence:.0%}, {self.trials} runs per world){rates}"
        )


@dataclass(frozen=True)
class OneRunAuditResult:
    """Outcome of :func:`one_run_audit` (Steinke, Nasr, Jagielski 2023)."""

    epsilon_lb: float
    epsilon_claimed: float
    delta: float
    confidence: float
    num_canaries: int
    num_guesses: int  #: r, for the (k+, k-) that gave the bound
    num_correct: int  #: v
    violation: bool
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        verdict = "VIOLATION" if self.violation else "ok"
        return (
            f"{verdict}: epsilon_lb = {self.epsilon_lb:.3f} vs claimed {self.epsilon_claimed:.3f} "
            f"(delta={self.delta:g}, confidence {self.confidence:.0%}); {self.num_correct}/"
            f"{self.num_guesses} correct guesses on {self.num_canaries} canaries"
        )


# --- statistics ----------------------------------------------------------------------------


def clopper_pearson(k: int | np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds ``(lo, hi)`` on a binomial proportion from ``k``
    successes in ``n`` trials: ``P[p >= lo] >= 1 - alpha`` and ``P[p <= hi] >= 1 - alpha``.
    """
    k = np.asarray(k, dtype=float)
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, n - k), 1.0)
    return lo, hi


def claimed_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon an accountant reports for ``steps`` Poisson-subsampled Gaussian steps."""
    if noise_multiplier == 0:
        return math.inf
    from .accountants import create_accountant

    acc = create_accountant(accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(acc.get_epsilon(delta))


def _rate_bounds(
    a_in: np.ndarray, a_out: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Epsilon bounds of the tests "guess in iff a >= t" for each threshold t.

    Row 0: ``log((TPR_lo - delta) / FPR_hi)``; row 1: ``log((TNR_lo - delta) / FNR_hi)``.
    Each rate bound is one-sided at ``alpha`` (two per bound: 1 - 2 alpha jointly).
    """
    n1, n0 = len(a_in), len(a_out)
    tp = n1 - np.searchsorted(np.sort(a_in), thresholds, side="left")
    fp = n0 - np.searchsorted(np.sort(a_out), thresholds, side="left")
    tpr_lo, _ = clopper_pearson(tp, n1, alpha)
    _, fpr_hi = clopper_pearson(fp, n0, alpha)
    tnr_lo, _ = clopper_pearson(n0 - fp, n0, alpha)
    _, fnr_hi = clopper_pearson(n1 - tp, n1, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        b1 = np.log(np.clip(tpr_lo - delta, 0, None) / fpr_hi)
        b2 = np.log(np.clip(tnr_lo - delta, 0, None) / fnr_hi)
    bounds = np.nan_to_num(np.stack([b1, b2]), nan=-np.inf)
    rates = {"tp": tp, "fp": fp, "tpr_lo": tpr_lo, "fpr_hi": fpr_hi, "tnr_lo": tnr_lo, "fnr_hi": fnr_hi}
    return bounds, rates


def threshold_audit(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    *,
    epsilon_claimed: float,
    delta: float,
    confidence: float = 0.95,
) -> AuditResult:
    """Epsilon lower bound from attack scores with (``scores_in``) and without
    (``scores_out``) the canary, one score per independent run, runs in random order.

    The first half of each array chooses the test (direction, threshold, which of the
    two inequalities) by the bound it gives there; the second half evaluates only that
    test with one-sided Clopper-Pearson intervals at ``(1 - confidence) / 2`` each, so
    the reported bound holds with probability >= ``confidence`` (choosing on the same
    runs would need a correction for the many thresholds tried).
    """
    a_in, a_out = np.asarray(scores_in, dtype=float), np.asarray(scores_out, dtype=float)
    if a_in.ndim != 1 or a_out.ndim != 1 or min(len(a_in), len(a_out)) < 4:
        raise ValueError("threshold_audit needs 1-d score arrays with at least 4 runs each")
    if not 0 < confidence < 1 or not 0 <= delta < 1:
        raise ValueError(f"need 0 < confidence < 1 and 0 <= delta < 1, got {confidence}, {delta}")
    alpha = (1 - confidence) / 2
    h_in, h_out = len(a_in) // 2, len(a_out) // 2
    sel_in, sel_out, ev_in, ev_out = a_in[:h_in], a_out[:h_out], a_in[h_in:], a_out[h_out:]
    best = (-np.inf, 1, 0, 0.0)  # (bound on selection half, direction, row, threshold)
    for sign in (1, -1):
        cand = np.unique(np.concatenate([sign * sel_in, sign * sel_out]))
        bounds, _ = _rate_bounds(sign * sel_in, sign * sel_out, cand, delta, alpha)
        row, i = np.unravel_index(int(np.argmax(bounds)), bounds.shape)
        if bounds[row, i] > best[0]:
            best = (float(bounds[row, i]), sign, int(row), float(cand[i]))
    _, sign, row, t = best
    bounds, r = _rate_bounds(sign * ev_in, sign * ev_out, np.array([t]), delta, alpha)
    eps_lb = max(0.0, float(bounds[row, 0]))
    n1, n0 = len(ev_in), len(ev_out)
    tp, fp = int(r["tp"][0]), int(r["fp"][0])
    details = {
        "holdout": min(n1, n0),
        "direction": "score >= t" if sign == 1 else "score <= t",
        "threshold": sign * t,
        "inequality": "TPR <= e^eps FPR + delta" if row == 0 else "TNR <= e^eps FNR + delta",
        "tpr": tp / n1,
        "fpr": fp / n0,
        "tpr_lo": float(r["tpr_lo"][0]),
        "fpr_hi": float(r["fpr_hi"][0]),
    }
    return AuditResult(
        epsilon_lb=eps_lb,
        epsilon_claimed=float(epsilon_claimed),
        delta=float(delta),
        confidence=float(confidence),
        trials=min(len(a_in), len(a_out)),
        violation=eps_lb > epsilon_claimed,
        details=details,
    )


# --- canary audit of one DP step ------------------------------------------------------------


def _default_optimizer(
    noise_multiplier: float, max_grad_norm: float, expected_batch_size: float, lr: float, seed: int
) -> OptimizerFactory:
    from .optim import DPOptimizer

    def factory(params: list[nn.Parameter]) -> Any:
        return DPOptimizer(
            torch.optim.SGD(params, lr=lr),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=torch.Generator().manual_seed(seed),
        )

    return factory


def _check_stateless(opt: Any) -> None:
    if len(opt.state) > 0:
        raise ValueError(
            "the audited optimizer keeps state between steps (momentum, Adam moments), so the "
            "audit's runs would not be independent; wrap torch.optim.SGD without momentum"
        )


def _check_trials(trials: int) -> None:
    if not isinstance(trials, int) or trials < 8:
        raise ValueError(f"trials must be an integer >= 8 (runs per world), got {trials!r}")


def _check_common(delta: float, confidence: float, sample_rate: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def audit_dp_step(
    optimizer_factory: OptimizerFactory | None = None,
    *,
    normal_grads: Tensor | None = None,
    canary_grad: Tensor | None = None,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    sample_rate: float = 1.0,
    trials: int = 1000,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "prv",
    seed: int = 0,
) -> AuditResult:
    """Canary audit of one real ``DPOptimizer.step()`` on crafted per-sample gradients.

    Each run resets a parameter ``p`` of shape ``[d]`` to zero, sets ``p.grad_sample`` to
    the rows of ``normal_grads`` (``[B, d]``; each kept with probability
    ``sample_rate``) plus, in the "in" world, ``canary_grad`` (``[d]``, kept with
    probability ``sample_rate``), calls ``step()`` and records the update's projection
    on the canary direction. ``trials`` runs per world, then :func:`threshold_audit`.

    Args:
        optimizer_factory: ``params -> DPOptimizer`` wrapping a stateless optimizer
            (plain SGD); called once. Default: ``DPOptimizer(SGD(lr=1), noise_multiplier,
            max_grad_norm, expected_batch_size=sample_rate * (B + 1))`` with a seeded
            noise generator. The claimed epsilon uses the optimizer's
            ``noise_multiplier`` (what an accountant is told), ``sample_rate`` and 1 step.
        normal_grads: the other samples' gradients; default 8 random rows of norm
            ``max_grad_norm`` in ``d = 16``.
        canary_grad: default ``max_grad_norm * e_0``.
        seed: seeds the sampling and (by ``torch.random.fork_rng``) the global RNG,
            without changing the caller's RNG state.
    """
    _check_trials(trials)
    _check_common(delta, confidence, sample_rate)
    g = torch.Generator().manual_seed(seed)
    if normal_grads is None:
        normal_grads = torch.randn(8, 16, generator=g, dtype=torch.float64)
        normal_grads *= max_grad_norm / normal_grads.norm(dim=1, keepdim=True)
    normal_grads = normal_grads.detach().to(torch.float64)
    if normal_grads.dim() != 2:
        raise ValueError(f"normal_grads must be [B, d], got shape {tuple(normal_grads.shape)}")
    d = normal_grads.shape[1]
    if canary_grad is None:
        canary_grad = torch.zeros(d, dtype=torch.float64)
        canary_grad[0] = max_grad_norm
    canary_grad = canary_grad.detach().to(torch.float64).reshape(-1)
    if canary_grad.numel() != d or not float(canary_grad.norm()) > 0:
        raise ValueError(f"canary_grad must be a non-zero vector of length d={d}")
    direction = canary_grad / canary_grad.norm()
    if optimizer_factory is None:
        ebs = sample_rate * (normal_grads.shape[0] + 1)
        optimizer_factory = _default_optimizer(noise_multiplier, max_grad_norm, ebs, 1.0, seed + 1)

    p = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = optimizer_factory([p])
    eps_claimed = claimed_epsilon(opt.noise_multiplier, sample_rate, 1, delta, accountant)
    scores: dict[bool, list[float]] = {True: [], False: []}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        for _ in range(trials):
            for world in (False, True):
                keep = torch.rand(normal_grads.shape[0], generator=g) < sample_rate
                rows = [normal_grads[keep]]
                if world and bool(torch.rand((), generator=g) < sample_rate):
                    rows.append(canary_grad[None])
                with torch.no_grad():
                    p.zero_()
                p.grad_sample = torch.cat(rows)
                opt.step()
                _check_stateless(opt)
                # p started at 0 and SGD has lr 1 (by contract): the released noisy gradient is -p
                scores[world].append(float(-p.detach() @ direction))
                opt.zero_grad()
    return threshold_audit(
        np.array(scores[True]), np.array(scores[False]), epsilon_claimed=eps_claimed, delta=delta, confidence=confidence
    )


def _flat(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([q.detach().reshape(-1) for q in params])


def _restore(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for q, q0 in zip(params, values):
            q.copy_(q0)


def _backward(dp: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, params: Sequence[nn.Parameter]) -> None:
    """Per-sample gradients of a (possibly empty) batch into ``p.grad_sample``."""
    if x.shape[0] > 0:
        loss_fn(dp(x), y).backward()
    else:  # an empty Poisson batch: zero rows, the optimizer still adds noise
        for q in params:
            q.grad_sample = torch.zeros(0, *q.shape, dtype=q.dtype)


def audit_training_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: tuple[Tensor, Tensor],
    canary: tuple[Tensor, Tensor],
    optimizer_factory: OptimizerFactory | None = None,
    *,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    sample_rate: float = 1.0,
    trials: int = 1000,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "prv",
    seed: int = 0,
) -> AuditResult:
    """Canary audit of one real training step: forward, backward and ``step()`` of a
    privatized ``model`` on ``data`` with or without the ``canary`` example.

    Catches what an optimizer-level audit cannot: a model whose per-sample gradients
    are not per-sample (batch mixing), a wrong rule, a wrong loss reduction. ``model``
    is privatized (``loss_reduction="mean"``) unless it is a ``DPModule``;
    ``loss_fn(output, target)`` must be mean-reduced. Each run restores the initial
    parameters; rows of ``data`` are kept with probability ``sample_rate``, the canary
    too in the "in" world. The score is the update's projection on the direction
    ``mean(update | in) - mean(update | out)`` estimated on the selection half of the
    runs (so the held-out half stays independent), then :func:`threshold_audit`.
    """
    from .module import DPModule
    from .privatize import privatize

    _check_trials(trials)
    _check_common(delta, confidence, sample_rate)
    dp = model if isinstance(model, DPModule) else privatize(model, loss_reduction="mean")
    params = [q for q in dp.parameters() if q.requires_grad]
    x, y = data
    cx, cy = canary
    n = x.shape[0]
    if optimizer_factory is None:
        optimizer_factory = _default_optimizer(noise_multiplier, max_grad_norm, sample_rate * (n + 1), 1.0, seed + 1)
    opt = optimizer_factory(params)
    eps_claimed = claimed_epsilon(opt.noise_multiplier, sample_rate, 1, delta, accountant)
    init = [q.detach().clone() for q in params]
    g = torch.Generator().manual_seed(seed)
    updates: dict[bool, list[Tensor]] = {True: [], False: []}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            for _ in range(trials):
                for world in (False, True):
                    keep = torch.rand(n, generator=g) < sample_rate
                    bx, by = x[keep], y[keep]
                    if world and bool(torch.rand((), generator=g) < sample_rate):
                        bx, by = torch.cat([bx, cx[None]]), torch.cat([by, cy[None]])
                    _restore(params, init)
                    _backward(dp, loss_fn, bx, by, params)
                    opt.step()
                    _check_stateless(opt)
                    updates[world].append(_flat(init) - _flat(params))
                    opt.zero_grad()
    finally:
        _restore(params, init)  # leave the caller's model as it was
    u_in, u_out = torch.stack(updates[True]), torch.stack(updates[False])
    half = trials // 2
    direction = u_in[:half].mean(0) - u_out[:half].mean(0)
    direction = direction / direction.norm().clamp_min(torch.finfo(direction.dtype).tiny)
    return threshold_audit(
        (u_in @ direction).numpy(), (u_out @ direction).numpy(), epsilon_claimed=eps_claimed, delta=delta, confidence=confidence
    )


# --- one-run audit: Steinke, Nasr, Jagielski 2023 ---------------------------------------------


def one_run_p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """Theorem 3.1 of Steinke, Nasr, Jagielski 2023: the probability of ``>= v`` correct
    guesses out of ``r`` (``m`` canaries, each included with probability 1/2) under an
    (epsilon, delta)-DP mechanism is at most

        P[W >= v] + 2 m delta max_{1<=i<=v} P[v - i <= W < v] / i,   W ~ Binomial(r, e^eps/(1+e^eps)).
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[W >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[W = v-1], ..., P[W = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """Largest epsilon (to 1e-6) whose :func:`one_run_p_value` is below ``beta``: the
    mechanism is not (epsilon, delta)-DP for it, with confidence ``1 - beta``; 0 if even
    epsilon = 0 is not rejected (the search of the paper's Algorithm 2)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if one_run_p_value(0.0, delta, m, r, v) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(hi, delta, m, r, v) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # only v = r with delta = 0 and r huge: effectively unbounded
            return math.inf
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if one_run_p_value(mid, delta, m, r, v) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def _default_guesses(m: int) -> list[tuple[int, int]]:
    ks = sorted({max(1, m // 20), max(1, m // 10), max(1, m // 4)})
    return [(k, k) for k in ks]


def one_run_audit_from_scores(
    scores: np.ndarray | Tensor,
    included: np.ndarray | Tensor,
    *,
    epsilon_claimed: float,
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
) -> OneRunAuditResult:
    """Epsilon lower bound from canary scores (higher = more likely included).

    For each ``(k_plus, k_minus)`` in ``guesses`` (fixed before looking at the scores;
    default ``k = m/20, m/10, m/4`` on both sides), guess "in" for the ``k_plus``
    highest and "out" for the ``k_minus`` lowest scores (ties by index), count correct
    guesses ``v`` of ``r = k_plus + k_minus`` and apply
    :func:`one_run_epsilon_lower_bound` at ``beta = (1 - confidence) / len(guesses)``
    (Bonferroni over the choices); the best bound is reported.
    """
    s = np.asarray(scores, dtype=float).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    m = len(s)
    if len(inc) != m or m == 0:
        raise ValueError("scores and included must be non-empty and of the same length")
    guesses = list(guesses) if guesses is not None else _default_guesses(m)
    if not guesses or any(kp < 0 or km < 0 or kp + km > m or kp + km == 0 for kp, km in guesses):
        raise ValueError(f"each guess (k_plus, k_minus) needs 0 < k_plus + k_minus <= m = {m}, got {guesses}")
    order = np.lexsort((np.arange(m), -s))  # descending score, ties by index
    beta = (1 - confidence) / len(guesses)
    best: tuple[float, int, int, tuple[int, int]] = (-1.0, 0, 0, guesses[0])
    for kp, km in guesses:
        v = int(inc[order[:kp]].sum()) + int((~inc[order[m - km :]]).sum() if km else 0)
        r = kp + km
        eps = one_run_epsilon_lower_bound(m, r, v, delta, beta)
        if eps > best[0]:
            best = (eps, r, v, (kp, km))
    eps_lb, r, v, choice = best
    return OneRunAuditResult(
        epsilon_lb=eps_lb,
        epsilon_claimed=float(epsilon_claimed),
        delta=float(delta),
        confidence=float(confidence),
        num_canaries=m,
        num_guesses=r,
        num_correct=v,
        violation=eps_lb > epsilon_claimed,
        details={"k_plus": choice[0], "k_minus": choice[1], "guesses_tried": guesses, "beta_each": beta},
    )


def one_run_audit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: tuple[Tensor, Tensor],
    optimizer_factory: OptimizerFactory | None = None,
    *,
    num_canaries: int = 1000,
    steps: int = 50,
    sample_rate: float = 0.1,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    canary_norm: float | None = None,
    lr: float = 1.0,
    canary_param: int | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "prv",
    guesses: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> OneRunAuditResult:
    """One-run audit of DP-SGD training (Steinke, Nasr, Jagielski 2023, Algorithm 1 with
    gradient canaries, their "white-box" setting).

    ``m = num_canaries`` canaries are gradient rows ``canary_norm * e_j`` (``canary_norm``
    defaults to ``max_grad_norm``) on distinct random coordinates ``j`` of one parameter
    (``canary_param``: index among trainable parameters, default the largest). Each is
    in the dataset with probability 1/2. ``steps`` real training steps of the
    privatized ``model`` on ``data`` follow, with Poisson sampling at ``sample_rate``
    of the data rows and of the included canaries: the canary rows are appended to
    ``p.grad_sample`` after ``loss.backward()`` and go through the optimizer's clipping
    and noise like any sample. Canary ``i``'s score is ``-(theta_T - theta_0)[j_i]``.
    The claimed epsilon is the accountant's for ``steps`` steps of the optimizer's
    ``noise_multiplier`` at ``sample_rate``.
    """
    from .module import DPModule
    from .privatize import privatize

    if not isinstance(num_canaries, int) or num_canaries < 2:
        raise ValueError(f"num_canaries must be an integer >= 2, got {num_canaries!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    _check_common(delta, confidence, sample_rate)
    dp = model if isinstance(model, DPModule) else privatize(model, loss_reduction="mean")
    params = [q for q in dp.parameters() if q.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    k = canary_param if canary_param is not None else max(range(len(params)), key=lambda i: params[i].numel())
    target = params[k]
    m = num_canaries
    if target.numel() < m:
        raise ValueError(
            f"one_run_audit puts each canary on its own coordinate: parameter #{k} has "
            f"{target.numel()} entries for num_canaries={m}; lower num_canaries or pick a larger canary_param"
        )
    x, y = data
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    coords = torch.randperm(target.numel(), generator=g)[:m]
    included = torch.rand(m, generator=g) < 0.5
    norm = float(max_grad_norm if canary_norm is None else canary_norm)
    if optimizer_factory is None:
        optimizer_factory = _default_optimizer(noise_multiplier, max_grad_norm, sample_rate * (n + m / 2), lr, seed + 1)
    opt = optimizer_factory(params)
    eps_claimed = claimed_epsilon(opt.noise_multiplier, sample_rate, steps, delta, accountant)
    init = [q.detach().clone() for q in params]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            for _ in range(steps):
                keep = torch.rand(n, generator=g) < sample_rate
                sampled = included & (torch.rand(m, generator=g) < sample_rate)
                _backward(dp, loss_fn, x[keep], y[keep], params)
                idx = coords[sampled]
                for q in params:
                    rows = torch.zeros(len(idx), q.numel(), dtype=q.dtype)
                    if q is target:
                        rows[torch.arange(len(idx)), idx] = norm
                    q.grad_sample = torch.cat([q.grad_sample, rows.reshape(len(idx), *q.shape)])
                opt.step()
                opt.zero_grad()
        moved = target.detach().reshape(-1) - init[k].reshape(-1)
    finally:
        _restore(params, init)  # leave the caller's model as it was
    scores = -moved[coords].to(torch.float64)
    result = one_run_audit_from_scores(
        scores, included, epsilon_claimed=eps_claimed, delta=delta, confidence=confidence, guesses=guesses
    )
    result.details.update({"steps": steps, "sample_rate": sample_rate, "canary_norm": norm})
    return result
