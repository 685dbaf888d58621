"""Failure handling: a killed run resumes exactly, non-finite per-sample gradients never
reach the update silently, and every public entry point rejects bad input with a clear
error and no state change."""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxdp import PrivacyEngine
from fxdp.accountants import create_accountant, get_noise_multiplier
from fxdp.data import PoissonSampler
from fxdp.errors import BatchDimensionError
from fxdp.optim import DPOptimizer

DT = torch.float64
TOTAL_STEPS, KILL_AFTER = 12, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def make_loader(n: int = 20, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, generator=torch.Generator().manual_seed(7))


def make_private(model=None, **kwargs):
    model = model if model is not None else make_model()
    engine = PrivacyEngine(accountant="rdp")
    kw = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=make_loader(),
              noise_multiplier=1.0, max_grad_norm=1.0, verify_first_step=False)
    kw.update(kwargs)
    return (engine, *engine.make_private(**kw))


# --- (a) killed mid-epoch, restarted from the last checkpoint -----------------------------


def train(ckpt: str | None, resume: bool, step_delay: float = 0.0):
    """TOTAL_STEPS DP-SGD steps (5 per epoch), checkpointing after every step."""
    torch.manual_seed(42)
    engine, dp, opt, loader = make_private(noise_generator=torch.Generator().manual_seed(3))
    if resume:
        engine.load_checkpoint(path=ckpt, module=dp, optimizer=opt)
    while engine.steps < TOTAL_STEPS:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(dp(x), y).backward()
            opt.step()
            if ckpt is not None:  # write-then-rename: a kill never leaves a torn checkpoint
                engine.save_checkpoint(path=ckpt + ".tmp", module=dp, optimizer=opt)
                os.replace(ckpt + ".tmp", ckpt)
            time.sleep(step_delay)
            if engine.steps == TOTAL_STEPS:
                break
    return list(engine.accountant.history), [p.detach().clone() for p in dp.parameters()]


def _child(ckpt: str, resume: bool, out: str) -> None:
    torch.set_num_threads(1)  # the parent's intra-op thread pool does not survive fork
    history, weights = train(ckpt, resume, step_delay=0.0 if resume else 0.3)
    torch.save({"history": history, "weights": weights}, out)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref_history, ref_weights = train(None, resume=False)
    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "final.pt")
    ctx = multiprocessing.get_context("fork")  # a real child process, inheriting the imports
    child = ctx.Process(target=_child, args=(ckpt, False, out))
    child.start()
    deadline = time.time() + 20
    while time.time() < deadline:
        if os.path.exists(ckpt) and torch.load(ckpt, weights_only=True)["fxdp"]["steps"] >= KILL_AFTER:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    saved = torch.load(ckpt, weights_only=True)["fxdp"]["steps"]
    assert KILL_AFTER <= saved < TOTAL_STEPS and saved % 5 != 0  # killed mid-run (mid-epoch here)
    assert not os.path.exists(out)

    child = ctx.Process(target=_child, args=(ckpt, True, out))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    final = torch.load(out, weights_only=True)
    assert final["history"] == ref_history
    for w, w_ref in zip(final["weights"], ref_weights):  # exact: sampler, noise and RNG restored
        assert torch.equal(w, w_ref)


# --- (b) NaN / inf in a per-sample gradient --------------------------------------------


def batch(bad: float | None):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(5, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    if bad is not None:
        x[2, 1] = bad
    return x, y


@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raise_names_the_sample_and_changes_nothing(mode, bad):
    engine, dp, opt, _ = make_private(grad_sample_mode=mode)
    before = [p.detach().clone() for p in dp.parameters()]
    x, y = batch(bad)
    nn.functional.cross_entropy(dp(x), y).backward()
    with pytest.raises(FloatingPointError, match="sample index 2 of the current batch"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))
    assert engine.steps == 0


@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_nonfinite_drop_removes_the_sample_and_counts_it(mode, clipping, monkeypatch):
    """The step equals one on the other samples alone; book-keeping (``auto``) leaves the
    dropped sample's rows out without per-sample gradients (``[B, V, d]`` for a language
    model's embedding)."""
    from fxdp import bookkeeping

    formed = []
    real = bookkeeping._per_sample_grads
    monkeypatch.setattr(bookkeeping, "_per_sample_grads", lambda r: formed.append(r) or real(r))
    C = 0.3 if clipping == "flat" else [0.3] * 4
    x, y = batch(float("nan"))
    keep = torch.tensor([0, 1, 3, 4])
    ref_engine, ref_dp, ref_opt, _ = make_private(grad_sample_mode=mode, noise_multiplier=0.0, max_grad_norm=C,
                                                   clipping=clipping)
    nn.functional.cross_entropy(ref_dp(x[keep]), y[keep]).backward()
    ref_opt.step()  # the same denominator q N: the dropped sample still counts as drawn

    engine, dp, opt, _ = make_private(grad_sample_mode=mode, noise_multiplier=0.0, max_grad_norm=C,
                                      clipping=clipping, nonfinite="drop")
    nn.functional.cross_entropy(dp(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"sample indices \[2\]"):
        opt.step()
    assert engine.steps == 1 and engine.accountant.history == ref_engine.accountant.history
    for p, p_ref in zip(dp.parameters(), ref_dp.parameters()):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)
    assert not formed


# --- (c) bad input: clear error, no state change ---------------------------------------


def _empty_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(0, 4, dtype=DT), torch.zeros(0, dtype=torch.long)), batch_size=4)


def _foreign_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.zeros(2, dtype=DT))], lr=0.1)


MAKE_PRIVATE_CASES = [
    ("eval mode", dict(module="eval"), ValueError, "eval mode"),
    ("foreign optimizer params", dict(optimizer="foreign"), ValueError, "not parameters of the module"),
    ("empty dataset", dict(data_loader="empty"), ValueError, "no batches"),
    ("negative sigma", dict(noise_multiplier=-1.0), ValueError, "noise_multiplier must be a finite number >= 0"),
    ("absurd sigma", dict(noise_multiplier=1e7), ValueError, "absurdly large"),
    ("C = inf", dict(max_grad_norm=math.inf), ValueError, "max_grad_norm must be a finite number > 0"),
    ("C = 0", dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be a finite number > 0"),
    ("delta = 1", dict(target_epsilon=1.0, target_delta=1.0), ValueError, "target_delta must be in the open interval"),
    ("epsilon < 0", dict(target_epsilon=-1.0, target_delta=1e-5), ValueError, "target_epsilon must be"),
    ("bad nonfinite", dict(nonfinite="ignore"), ValueError, "nonfinite must be 'raise' or 'drop'"),
    ("bad clipping", dict(clipping="none"), ValueError, "unknown clipping"),
    ("bad reduction", dict(loss_reduction="max"), ValueError, "loss_reduction must be"),
    ("not a module", dict(module="str"), TypeError, "module must be an nn.Module"),
]


@pytest.mark.parametrize("name, override, err, msg", MAKE_PRIVATE_CASES, ids=[c[0] for c in MAKE_PRIVATE_CASES])
def test_make_private_rejects_bad_input(name, override, err, msg):
    model = make_model()
    if override.get("module") == "eval":
        model.eval()
    opt = _foreign_optimizer(model) if override.get("optimizer") == "foreign" else torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(module=model, optimizer=opt, data_loader=make_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    kw.update({k: v for k, v in override.items() if k not in ("module", "optimizer", "data_loader")})
    if override.get("data_loader") == "empty":
        kw["data_loader"] = _empty_loader()
    if override.get("module") == "str":
        kw["module"] = "model"
    engine = PrivacyEngine(accountant="rdp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=msg):
        engine.make_private(**kw)
    assert engine.steps == 0 and engine._bindings == [] and engine.privacy_budget is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def _opt(**kw):
    m = make_model()
    base = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    base.update(kw)
    return lambda: DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), **base)


def _engine_with_epsilon(**kw):
    m = make_model()
    base = dict(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), data_loader=make_loader(),
                target_epsilon=1.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0)
    base.update(kw)
    return lambda: PrivacyEngine(accountant="rdp").make_private_with_epsilon(**base)


ENTRY_CASES = [
    ("with_epsilon epochs=0", _engine_with_epsilon(epochs=0), ValueError, "epochs must be"),
    ("with_epsilon delta=1", _engine_with_epsilon(target_delta=1.0), ValueError, "target_delta"),
    ("with_epsilon empty", _engine_with_epsilon(data_loader=_empty_loader()), ValueError, "at least one batch"),
    ("get_epsilon delta=1", lambda: PrivacyEngine().get_epsilon(1.0), ValueError, "delta must be in the open interval"),
    ("get_noise_multiplier q>1", lambda: get_noise_multiplier(target_epsilon=1, target_delta=1e-5, sample_rate=1.5,
                                                              steps=10), ValueError, "sample_rate must be in"),
    ("get_noise_multiplier delta=1", lambda: get_noise_multiplier(target_epsilon=1, target_delta=1.0, sample_rate=0.1,
                                                                  steps=10), ValueError, "delta must be in"),
    ("get_noise_multiplier eps<0", lambda: get_noise_multiplier(target_epsilon=-1, target_delta=1e-5, sample_rate=0.1,
                                                                steps=10), ValueError, "target_epsilon must be"),
    ("DPOptimizer C=inf", _opt(max_grad_norm=math.inf), ValueError, "max_grad_norm must be a finite number > 0"),
    ("DPOptimizer sigma<0", _opt(noise_multiplier=-1), ValueError, "noise_multiplier must be"),
    ("DPOptimizer absurd sigma", _opt(noise_multiplier=1e7), ValueError, "absurdly large"),
    ("DPOptimizer batch size 0", _opt(expected_batch_size=0), ValueError, "expected_batch_size must be"),
    ("PoissonSampler q>1", lambda: PoissonSampler(10, 1.5), ValueError, "sample_rate must be in"),
    ("PoissonSampler empty", lambda: PoissonSampler(0, 0.1), ValueError, "num_samples must be a positive"),
]


@pytest.mark.parametrize("name, fn, err, msg", ENTRY_CASES, ids=[c[0] for c in ENTRY_CASES])
def test_entry_points_reject_bad_input(name, fn, err, msg):
    with pytest.raises(err, match=msg):
        fn()


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
@pytest.mark.parametrize("kwargs, msg", [
    (dict(noise_multiplier=-1.0, sample_rate=0.1), "noise_multiplier must be"),
    (dict(noise_multiplier=1.0, sample_rate=1.5), "sample_rate must be in"),
    (dict(noise_multiplier=math.nan, sample_rate=0.1), "noise_multiplier must be"),
])
def test_accountants_reject_bad_steps_without_recording(accountant, kwargs, msg):
    acc = create_accountant(accountant)
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    before = list(acc.history)
    with pytest.raises(ValueError, match=msg):
        acc.step(**kwargs)
    with pytest.raises(ValueError, match="delta must be in the open interval"):
        acc.get_epsilon(1.0)
    assert acc.history == before


@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("x, err, msg", [
    (torch.randn(3, 4), RuntimeError, "dtype"),  # float32 input, float64 model
    (torch.randn(3, 5, dtype=DT), RuntimeError, "shapes cannot be multiplied"),  # wrong feature size
    (torch.randn(4, dtype=DT), BatchDimensionError, "no batch dimension"),  # batch dimension missing
])
def test_training_step_rejects_bad_batches_without_state_change(mode, x, err, msg):
    engine, dp, opt, _ = make_private(grad_sample_mode=mode)
    before = [p.detach().clone() for p in dp.parameters()]
    with pytest.raises(err, match=msg):
        dp(x).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in dp.parameters())
    assert engine.steps == 0
    # the run continues normally with a good batch
    xb, yb = batch(None)
    opt.zero_grad()
    nn.functional.cross_entropy(dp(xb), yb).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    assert engine.steps == 1
