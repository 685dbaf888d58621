"""fxdp.PrivacyLog: the one-line progress and privacy log of a training loop."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxdp


def _setup(n=64, batch=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)))
    engine = fxdp.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=batch), noise_multiplier=1.0, max_grad_norm=0.5)
    return engine, model, opt, loader


def test_log_wraps_the_loader_and_records_epsilon_clipping_and_noise_per_epoch():
    engine, model, opt, loader = _setup()
    lines = []
    log = fxdp.PrivacyLog(engine, opt, delta=1e-5, progress_bar=False, print_fn=lines.append)
    for _ in range(2):
        for x, y in log(loader):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert [r["epoch"] for r in log.history] == [1, 2]
    assert [r["step"] for r in log.history] == [4, 8]
    assert log.history[-1]["epsilon"] == pytest.approx(engine.get_epsilon(1e-5))
    assert log.history[0]["epsilon"] < log.history[1]["epsilon"]
    assert all(0.0 <= r["clip_fraction"] <= 1.0 for r in log.history)
    assert log.history[0]["noise_std_mean_grad"] == pytest.approx(1.0 * 0.5 / opt.expected_batch_size)
    assert len(lines) == 2 and lines[1].startswith("epoch 2 | step 8 | ε = ") and "clipped" in lines[1]


def test_log_by_hand_in_a_loop_of_ones_own_and_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    engine, model, opt, loader = _setup()
    log = fxdp.PrivacyLog(engine, opt, delta=1e-5, print_fn=None)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        log.record_step()
    row = log.end_epoch()
    assert row["step"] == 4 and not math.isnan(row["clip_fraction"])
    log.plot(str(tmp_path / "privacy.png"))
    assert (tmp_path / "privacy.png").stat().st_size > 1000


def test_log_refuses_bad_arguments():
    engine, model, opt, loader = _setup()
    with pytest.raises(ValueError, match="delta"):
        fxdp.PrivacyLog(engine, opt, delta=1.5)
    with pytest.raises(TypeError, match="DPOptimizer"):
        fxdp.PrivacyLog(engine, torch.optim.SGD(model.parameters(), lr=0.1), delta=1e-5)
