"""Tests of fxdp.audit: the statistics, and audits of correct and deliberately broken
DP-SGD steps (fixed seeds, non-secure mode, so every number below is reproducible).

Margins quoted in comments are the values these seeds give (epsilon_lb vs claimed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import fxdp
from fxdp.audit import (
    audit_dp_step,
    audit_training_step,
    claimed_epsilon,
    clopper_pearson,
    one_run_audit,
    one_run_audit_from_scores,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    threshold_audit,
)
from fxdp.optim import Clipping, DPOptimizer

DT = torch.float64


# --- broken optimizers (each one bug, everything else real) -------------------------------


class NoNoiseOptimizer(DPOptimizer):
    """Forgets the noise while ``noise_multiplier`` (what the accountant sees) says otherwise."""

    def _noise_std(self) -> float:
        return 0.0


class NoClipOptimizer(DPOptimizer):
    """Never clips (as ``C = inf``) but calibrates the noise to the configured ``C``."""

    def current_clipping(self) -> Clipping:
        return Clipping(bound=math.inf, nonfinite=self.nonfinite)


class ActualBatchSizeOptimizer(DPOptimizer):
    """Divides by the actual batch size (private under Poisson sampling), not q*N."""

    def scale_grad(self) -> None:
        n = max(1, int(self._last_clip[0].numel()))  # samples in this step
        for p in self.params:
            p.grad /= n


def factory(cls, sigma: float, ebs: float = 1.0, C: float = 1.0):
    def make(params):
        return cls(
            torch.optim.SGD(params, lr=1.0),
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=ebs,
            generator=torch.Generator().manual_seed(1),
        )

    return make


def e0(d: int, scale: float = 1.0) -> torch.Tensor:
    v = torch.zeros(d, dtype=DT)
    v[0] = scale
    return v


# --- statistics ------------------------------------------------------------------------------


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 50), (3, 50), (25, 50), (50, 50), (7, 1000)]:
        lo, hi = clopper_pearson(k, n, 0.025)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert float(lo) == pytest.approx(ci.low, abs=1e-12) and float(hi) == pytest.approx(ci.high, abs=1e-12)


def test_claimed_epsilon_is_the_accountants():
    assert claimed_epsilon(0.0, 1.0, 1, 1e-5) == math.inf
    # one full-batch Gaussian step: the exact (analytic) Gaussian mechanism epsilon
    # (Balle & Wang 2018) at sigma = 2, delta = 1e-5 is 1.993
    assert claimed_epsilon(2.0, 1.0, 1, 1e-5) == pytest.approx(1.993, abs=2e-3)


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity/std ratio mu."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0, 100)


def test_threshold_audit_is_sound_on_the_exact_gaussian_mechanism():
    # Scores N(mu, 1) vs N(0, 1) are the optimal attack on the Gaussian mechanism: the
    # bound must stay below its true epsilon (it may fail with probability 5% per seed;
    # these seeds give at most 1.9 against 4.38).
    mu, delta = 1.0, 1e-5
    true_eps = analytic_gaussian_epsilon(mu, delta)
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(10):
        r = threshold_audit(rng.normal(mu, 1, 4000), rng.normal(0, 1, 4000), epsilon_claimed=true_eps, delta=delta)
        assert r.epsilon_lb < true_eps and not r.violation
        bounds.append(r.epsilon_lb)
    assert max(bounds) > 1.0  # and it is not trivially 0: a real test of the attack
    # perfectly separated scores reach log(TPR_lo / FPR_hi) of the held-out half
    r = threshold_audit(np.full(1000, 1.0), np.zeros(1000), epsilon_claimed=1.0, delta=0.0)
    alpha = 0.025
    assert r.epsilon_lb == pytest.approx(math.log(alpha ** (1 / 500) / (1 - alpha ** (1 / 500))), rel=1e-9)
    assert r.violation


def test_one_run_p_value_is_theorem_3_1():
    def reference(eps, delta, m, r, v):  # the theorem's formula, term by term
        q = math.exp(eps) / (1 + math.exp(eps))
        tail = sum(math.comb(r, w) * q**w * (1 - q) ** (r - w) for w in range(v, r + 1))
        alpha = max(
            sum(math.comb(r, w) * q**w * (1 - q) ** (r - w) for w in range(v - i, v)) / i for i in range(1, v + 1)
        )
        return min(1.0, tail + 2 * m * delta * alpha)

    for eps, delta, m, r, v in [(0.5, 1e-5, 100, 40, 30), (2.0, 1e-3, 50, 20, 20), (1.0, 0.0, 10, 10, 7), (0.0, 1e-4, 300, 60, 33)]:
        assert one_run_p_value(eps, delta, m, r, v) == pytest.approx(reference(eps, delta, m, r, v), rel=1e-9, abs=1e-300)
    # delta = 0: a plain binomial tail; more correct guesses, larger bound
    assert one_run_p_value(1.0, 0.0, 100, 50, 40) == pytest.approx(stats.binom.sf(39, 50, 1 / (1 + math.exp(-1))))
    b = [one_run_epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in (50, 60, 80, 100)]
    assert b[0] == 0.0 and b == sorted(b) and b[-1] > 3
    # the bound sits where the p-value crosses beta
    eps = b[2]
    assert one_run_p_value(eps, 1e-5, 1000, 100, 80) < 0.05 <= one_run_p_value(eps + 1e-4, 1e-5, 1000, 100, 80)


def test_one_run_from_scores_guesses_top_and_bottom():
    included = np.array([True, False] * 50)
    perfect = one_run_audit_from_scores(included.astype(float), included, epsilon_claimed=1.0, delta=0.0)
    assert perfect.num_correct == perfect.num_guesses and perfect.violation
    random = one_run_audit_from_scores(
        np.random.default_rng(0).normal(size=100), included, epsilon_claimed=1.0, delta=0.0
    )
    assert random.epsilon_lb < 1.0 and not random.violation
    with pytest.raises(ValueError, match="k_plus"):
        one_run_audit_from_scores(np.zeros(4), np.zeros(4, bool), epsilon_claimed=1, delta=0, guesses=[(3, 3)])


# --- canary audit of the real DP step ---------------------------------------------------------


def test_correct_dp_step_stays_below_its_claim():
    # sigma = 2, q = 1: claimed 1.99; audited 0.49
    r = audit_dp_step(noise_multiplier=2.0, trials=600)
    assert not r.violation and r.epsilon_lb < r.epsilon_claimed - 1.0
    assert r.epsilon_claimed == pytest.approx(1.993, abs=2e-3)
    # with Poisson sampling (q = 0.5) the claim uses the amplified epsilon: 0.09 vs 3.53
    r = audit_dp_step(noise_multiplier=1.0, sample_rate=0.5, trials=300)
    assert not r.violation and r.epsilon_lb < r.epsilon_claimed


def test_missing_noise_is_caught():
    # the accountant is told sigma = 2 (claimed 1.99); the step adds no noise, so the
    # held-out runs separate perfectly: 4.39 (log(TPR_lo / FPR_hi) with 300 runs)
    r = audit_dp_step(factory(NoNoiseOptimizer, 2.0), trials=600)
    assert r.violation and r.epsilon_lb > r.epsilon_claimed + 2.0


def test_missing_clipping_is_caught():
    # a canary of norm 100 C shifts the update by 50 noise stds: 4.39 vs 1.99
    r = audit_dp_step(factory(NoClipOptimizer, 2.0), canary_grad=e0(16, 100.0), trials=600)
    assert r.violation and r.epsilon_lb > r.epsilon_claimed + 2.0
    # the same canary on the correct optimizer is clipped to C: 0.49, no violation
    r = audit_dp_step(factory(DPOptimizer, 2.0), canary_grad=e0(16, 100.0), trials=600)
    assert not r.violation


def test_noise_scaled_by_actual_batch_size_is_caught():
    # One other sample with gradient -C e0, canary +C e0. Correct: (sum + N) / q N, a
    # mean shift of C against noise std sigma C. Buggy: without the canary the update is
    # -C + N(0, (sigma C)^2), with it (N(0, (sigma C)^2)) / 2: the canary halves the
    # noise std, a variance change whose likelihood ratio is unbounded. sigma = 4:
    # claimed 0.93, audited 2.50 for the bug and 0 for the correct step (400 runs).
    normal, canary = torch.tensor([[-1.0, 0.0]], dtype=DT), e0(2)
    bug = audit_dp_step(factory(ActualBatchSizeOptimizer, 4.0), normal_grads=normal, canary_grad=canary, trials=1000)
    assert bug.violation and bug.epsilon_lb > bug.epsilon_claimed + 1.0
    ok = audit_dp_step(factory(DPOptimizer, 4.0), normal_grads=normal, canary_grad=canary, trials=400)
    assert not ok.violation


class MeanCentred(nn.Module):
    """``linear(x - x.mean(0))``: every output depends on the whole batch."""

    def __init__(self, mix: bool = True) -> None:
        super().__init__()
        self.mix = mix
        self.fc = nn.Linear(4, 1).to(DT)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(0) if self.mix else x)


def linear_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(out.squeeze(-1) * y).mean()


def test_batch_mixing_model_is_caught():
    # 16 samples at x = 0 and a canary at 100 e0, loss -y * f(x). With the mixing model
    # the canary moves the batch mean, so each of the 16 other samples gets a weight
    # gradient of about +C e0 after clipping: the canary shifts the update by ~15 C
    # against noise 4 C (claimed 0.93 at sigma = 4; audited 3.28). Without mixing the
    # same experiment gives 0.
    # privatize refuses the mixing model (fxdp/passes/batch_mixing/guard.py); the audit measures
    # what serving it anyway (allow_unsafe_model=True) would leak
    data = (torch.zeros(16, 4, dtype=DT), torch.ones(16, dtype=DT))
    canary = (e0(4, 100.0), torch.tensor(1.0, dtype=DT))
    with pytest.raises(fxdp.UnsupportedOpError, match=r"x\.mean\(0\)"):
        audit_training_step(MeanCentred(True), linear_loss, data, canary, noise_multiplier=4.0, trials=8)
    unsafe = fxdp.privatize(MeanCentred(True), loss_reduction="mean", allow_unsafe_model=True)
    with pytest.warns(UserWarning, match="allow_unsafe_model"):
        mixed = audit_training_step(unsafe, linear_loss, data, canary, noise_multiplier=4.0, trials=300)
    assert mixed.violation and mixed.epsilon_lb > mixed.epsilon_claimed + 1.5
    clean = audit_training_step(MeanCentred(False), linear_loss, data, canary, noise_multiplier=4.0, trials=300)
    assert not clean.violation


# --- one-run audit (Steinke, Nasr, Jagielski 2023) ---------------------------------------------


def one_run_setup():
    # Inputs use 16 of 256 features, so most canary coordinates of the 8 x 256 weight get
    # no data gradient and the canaries' scores are noise + their own contributions.
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(100, 256, dtype=DT)
    x[:, :16] = torch.randn(100, 16, generator=g, dtype=DT)
    y = torch.randint(0, 8, (100,), generator=g)
    torch.manual_seed(0)
    return nn.Linear(256, 8).to(DT), nn.functional.cross_entropy, (x, y)


ONE_RUN = dict(num_canaries=1000, steps=40, sample_rate=0.1)
EBS = 0.1 * (100 + 500)


def test_one_run_audit_of_correct_training_stays_below_its_claim():
    # sigma = 2, 40 steps at q = 0.1: claimed 1.48, audited 0.50 (73/100 correct guesses)
    model, loss, data = one_run_setup()
    before = model.weight.detach().clone()
    r = one_run_audit(model, loss, data, noise_multiplier=2.0, **ONE_RUN)
    assert not r.violation and r.epsilon_lb < r.epsilon_claimed - 0.5
    assert torch.equal(model.weight, before)  # the caller's model is left untouched


def test_one_run_audit_catches_missing_noise_and_clipping():
    # claimed 1.48 (sigma = 2 as told to the accountant). No noise: 489/500 correct,
    # 3.16 (the errors are included canaries never sampled and canaries on coordinates
    # that data gradients also move). No clipping, canaries of norm 100 C: 497/500, 3.95.
    model, loss, data = one_run_setup()
    r = one_run_audit(model, loss, data, factory(NoNoiseOptimizer, 2.0, EBS), noise_multiplier=2.0, **ONE_RUN)
    assert r.violation and r.epsilon_lb > r.epsilon_claimed + 1.0
    r = one_run_audit(
        model, loss, data, factory(NoClipOptimizer, 2.0, EBS), canary_norm=100.0, noise_multiplier=2.0, **ONE_RUN
    )
    assert r.violation and r.epsilon_lb > r.epsilon_claimed + 2.0
