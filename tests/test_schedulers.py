"""Tests of fxdp.schedulers and of accounting with changing sigma and sample rate."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxdp import PrivacyEngine
from fxdp.accountants import create_accountant
from fxdp.schedulers import (
    ExponentialGradClip,
    ExponentialNoise,
    LambdaGradClip,
    LambdaNoise,
    StepGradClip,
    StepNoise,
)

DT = torch.float64


def setup(accountant="rdp", clipping="flat", max_grad_norm=1.0, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(64, 6, generator=g, dtype=DT), torch.randint(0, 3, (64,), generator=g))
    loader = DataLoader(ds, batch_size=16, generator=torch.Generator().manual_seed(2))
    engine = PrivacyEngine(accountant=accountant)
    m, o, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=loader, noise_multiplier=2.0, max_grad_norm=max_grad_norm,
                                   clipping=clipping, **kwargs)
    return engine, m, o, dl


def epoch(model, optimizer, loader) -> int:
    n = 0
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        n += 1
    return n


# --- same schedules as Opacus --------------------------------------------------------------

CASES = [
    ("ExponentialNoise", dict(gamma=0.9), "noise_multiplier"),
    ("StepNoise", dict(step_size=3, gamma=0.5), "noise_multiplier"),
    ("LambdaNoise", dict(noise_lambda=lambda e: 1 / (1 + e)), "noise_multiplier"),
    ("ExponentialGradClip", dict(gamma=1.1), "max_grad_norm"),
    ("StepGradClip", dict(step_size=2, gamma=0.7), "max_grad_norm"),
    ("LambdaGradClip", dict(scheduler_function=lambda e: 1 + 0.1 * e), "max_grad_norm"),
]


@pytest.mark.parametrize("name, kwargs, attr", CASES)
def test_same_values_as_opacus(name, kwargs, attr):
    import fxdp.schedulers as ours

    theirs = pytest.importorskip("opacus.schedulers")
    a = SimpleNamespace(noise_multiplier=1.5, max_grad_norm=2.0)
    b = SimpleNamespace(noise_multiplier=1.5, max_grad_norm=2.0)
    s1, s2 = getattr(ours, name)(a, **kwargs), getattr(theirs, name)(b, **kwargs)
    for _ in range(8):
        assert getattr(a, attr) == getattr(b, attr)
        s1.step()
        s2.step()


def test_state_dict_is_plain_and_restores():
    opt = SimpleNamespace(noise_multiplier=1.0, max_grad_norm=1.0)
    s = LambdaNoise(opt, noise_lambda=lambda e: 0.5**e)
    s.step()
    s.step()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # numbers only: no pickled function
    assert state == {"last_epoch": 2, "base_noise_multiplier": 1.0}
    opt2 = SimpleNamespace(noise_multiplier=1.0, max_grad_norm=1.0)
    s2 = LambdaNoise(opt2, noise_lambda=lambda e: 0.5**e)
    s2.load_state_dict(state)
    s.step()
    s2.step()
    assert opt.noise_multiplier == opt2.noise_multiplier == 0.125


def test_bad_scheduler_arguments():
    opt = SimpleNamespace(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ExponentialNoise(opt, gamma=0.0)
    with pytest.raises(ValueError, match="step_size must be a positive integer"):
        StepGradClip(opt, step_size=0, gamma=0.5)
    with pytest.raises(ValueError, match=r"needs an optimizer with a \.noise_multiplier attribute"):
        StepNoise(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), step_size=1, gamma=0.5)
    with pytest.raises(ValueError, match="produced noise_multiplier=-1.0"):
        LambdaNoise(opt, noise_lambda=lambda e: -1.0)


# --- accounting ----------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_heterogeneous_history_is_explicit_composition(accountant):
    """sigma decays each epoch and the batch size doubles half-way: every step is
    recorded with the sigma and q it used, and epsilon is their composition."""
    engine, m, o, dl = setup(accountant=accountant)
    noise = ExponentialNoise(o, gamma=0.8)
    expected = []
    for e in range(4):
        if e == 2:
            dl = engine.set_sample_rate(0.5, optimizer=o)
            assert o.expected_batch_size == 32 and len(dl) == 2
        n = epoch(m, o, dl)
        expected.append((2.0 * 0.8**e, 0.25 if e < 2 else 0.5, n))
        noise.step()
    history = engine.accountant.history
    assert [n for _, _, n in history] == [n for _, _, n in expected]
    # flat lists: pytest >= 9.2 refuses approx of nested tuples
    assert [x for s, q, _ in history for x in (s, q)] == pytest.approx([x for s, q, _ in expected for x in (s, q)], rel=1e-15)
    explicit = create_accountant(accountant)
    for sigma, q, n in expected:
        for _ in range(n):
            explicit.step(noise_multiplier=sigma, sample_rate=q)
    assert engine.get_epsilon(1e-5) == pytest.approx(explicit.get_epsilon(1e-5), rel=1e-12)
    assert engine.steps == 4 + 4 + 2 + 2


def test_clip_scheduler_sets_the_bound_used():
    engine, m, o, dl = setup(max_grad_norm=0.5)
    clip = StepGradClip(o, step_size=1, gamma=0.5)
    epoch(m, o, dl)
    assert o.clip_stats.max_grad_norm == 0.5
    clip.step()
    epoch(m, o, dl)
    assert o.clip_stats.max_grad_norm == 0.25
    # the clip bound does not enter the accounting
    assert engine.accountant.history == [(2.0, 0.25, 8)]


def test_clip_scheduler_per_layer_scales_every_bound():
    _, _, o, _ = setup(clipping="per_layer", max_grad_norm=[1.0, 2.0, 2.0, 4.0])
    assert o.max_grad_norm == 5.0
    ExponentialGradClip(o, gamma=0.5).step()
    assert o.max_grad_norms == [0.5, 1.0, 1.0, 2.0] and o.max_grad_norm == pytest.approx(2.5)
    LambdaGradClip(o, scheduler_function=lambda e: 2.0)
    assert o.max_grad_norms == pytest.approx([1.0, 2.0, 2.0, 4.0]) and math.isclose(o.max_grad_norm, 5.0)


def test_clip_scheduler_refuses_adaptive_clipping():
    _, _, o, _ = setup(clipping="adaptive", target_unclipped_quantile=0.5, clipbound_learning_rate=0.2,
                       max_clipbound=10.0, min_clipbound=0.01, unclipped_num_std=5.0)
    with pytest.raises(ValueError, match="adaptive clipping moves max_grad_norm itself"):
        StepGradClip(o, step_size=1, gamma=0.5)
