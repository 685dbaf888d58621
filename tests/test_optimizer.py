"""Tests of fxdp.optim: DP-SGD clipping, noise, per-layer/adaptive clipping, API surface."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fxdp
from fxdp.optim import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer, get_optimizer_class
from fxdp.optim.clip import (
    adaptive_gradient_noise_multiplier,
    clip_factors,
    clipped_sum,
    geometric_clipbound_update,
    per_param_sample_norms,
    per_sample_norms,
    private_unclipped_fraction,
)
from fxdp.optim.noise import FlatNoise, SliceDraw, gaussian_noise, noisy_sum

DT = torch.float64


# --- helpers: per-sample gradients without the rest of fxdp -----------------------------


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def make_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of each sample's own MSE loss (Opacus' grad_sample convention)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.mse_loss(out, yi.unsqueeze(0))

    if len(x) == 0:
        return {n: torch.zeros(0, *p.shape, dtype=p.dtype) for n, p in params.items()}
    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """What a privatised model's backward leaves behind: p.grad and p.grad_sample."""
    if len(x):
        nn.functional.mse_loss(model(x), y).backward()
    gs = per_sample_grads(model, x, y)
    for n, p in model.named_parameters():
        p.grad_sample = gs[n]


def set_grad_samples(model: nn.Module, gs: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), gs):
        p.grad_sample = g


def dp(model: nn.Module, *, opt=None, **kw) -> DPOptimizer:
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("expected_batch_size", 8)
    return DPOptimizer(opt or torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- step semantics -------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_no_noise_huge_bound_equals_non_private(opt_cls):
    x, y = make_data(8)
    model, ref = make_model(), make_model()
    opt = dp(model, opt=opt_cls(model.parameters(), lr=0.05), max_grad_norm=1e8, expected_batch_size=8)
    ref_opt = opt_cls(ref.parameters(), lr=0.05)
    for _ in range(3):
        backward(model, x, y)
        opt.step()
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    torch.testing.assert_close(flat_params(model), flat_params(ref), rtol=1e-12, atol=1e-12)


def test_small_bound_clips_each_sample_and_divides_by_expected_batch_size():
    x, y = make_data(7)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    C, expected_bs, lr = 0.05, 10, 0.3
    opt = dp(
        model,
        opt=torch.optim.SGD(model.parameters(), lr=lr),
        max_grad_norm=C,
        expected_batch_size=expected_bs,
    )
    backward(model, x, y)
    gs = [p.grad_sample.clone() for p in model.parameters()]
    opt.step()

    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(7):
        g_i = [g[i] for g in gs]
        norm = torch.sqrt(sum((g**2).sum() for g in g_i))
        c = min(1.0, C / (float(norm) + 1e-6))
        contribution = [c * g for g in g_i]
        assert float(torch.sqrt(sum((g**2).sum() for g in contribution))) <= C * (1 + 1e-9)
        total = [t + g for t, g in zip(total, contribution)]
    for p, b, t in zip(model.parameters(), before, total):
        torch.testing.assert_close(p.grad, t / expected_bs, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p.detach(), b - lr * t / expected_bs, rtol=1e-12, atol=1e-15)

    stats = opt.clip_stats
    norms = np.sort(per_sample_norms(gs).numpy())
    assert stats.num_samples == 7 and stats.fraction_clipped == 1.0 and stats.max_grad_norm == C
    np.testing.assert_allclose(
        [stats.min_norm, stats.q25_norm, stats.median_norm, stats.q75_norm, stats.max_norm],
        np.quantile(norms, [0, 0.25, 0.5, 0.75, 1]),
        rtol=1e-12,
    )
    assert stats.mean_norm == pytest.approx(norms.mean(), rel=1e-12)


def _noise_only_grad(opt_factory, shape=(200, 500), batch=16) -> torch.Tensor:
    """p.grad after one step on zero per-sample gradients: noise / expected batch size."""
    p = nn.Parameter(torch.zeros(shape, dtype=DT))
    opt = opt_factory([p])
    p.grad_sample = torch.zeros(batch, *shape, dtype=DT)
    opt.step()
    return p.grad.detach().reshape(-1)


def _assert_std(sample: torch.Tensor, std: float) -> None:
    # n iid N(0, s^2): the sample std has standard error s / sqrt(2(n-1)) and the mean
    # s / sqrt(n) (normal theory); 6 standard errors => false alarm prob. < 1e-8.
    n = sample.numel()
    assert abs(float(sample.mean())) < 6 * std / math.sqrt(n)
    assert abs(float(sample.std()) - std) < 6 * std / math.sqrt(2 * (n - 1))


def test_noise_std_is_sigma_c_over_expected_batch_size():
    sigma, C, B = 1.3, 0.7, 16
    g = torch.Generator().manual_seed(0)
    sample = _noise_only_grad(
        lambda ps: DPOptimizer(
            torch.optim.SGD(ps, lr=0.0),
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=B,
            generator=g,
        ),
        batch=B,
    )
    _assert_std(sample, sigma * C / B)


def test_noise_is_reproducible_from_generator_and_sum_reduction_is_unscaled():
    def run(seed, reduction):
        return _noise_only_grad(
            lambda ps: DPOptimizer(
                torch.optim.SGD(ps, lr=0.0),
                noise_multiplier=1.0,
                max_grad_norm=2.0,
                expected_batch_size=None if reduction == "sum" else 4,
                loss_reduction=reduction,
                generator=torch.Generator().manual_seed(seed),
            ),
            shape=(10,),
            batch=4,
        )

    torch.testing.assert_close(run(3, "mean"), run(3, "sum") / 4)
    assert not torch.equal(run(3, "mean"), run(4, "mean"))


def test_empty_batch_is_a_noisy_step():
    model = make_model()
    before = flat_params(model)
    opt = dp(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    calls = []
    opt.attach_step_hook(lambda o: calls.append(o.accumulated_iterations))
    backward(model, *make_data(0))
    opt.step()
    assert calls == [1]
    assert not torch.equal(flat_params(model), before)
    assert opt.clip_stats.num_samples == 0 and math.isnan(opt.clip_stats.mean_norm)


def test_accumulated_backward_passes_are_clipped_and_averaged_together():
    x, y = make_data(12)
    model = make_model()
    opt = dp(model, max_grad_norm=0.1, expected_batch_size=6)
    g1, g2 = per_sample_grads(model, x[:6], y[:6]), per_sample_grads(model, x[6:], y[6:])
    for n, p in model.named_parameters():
        p.grad_sample = [g1[n], g2[n]]
    assert opt.accumulated_iterations == 2
    gs = opt.grad_samples
    expected = clipped_sum(gs, clip_factors(per_sample_norms(gs), 0.1))
    opt.pre_step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e / 12)


def test_closure_loss_is_returned():
    x, y = make_data(4)
    model = make_model()
    opt = dp(model)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        backward(model, x, y)
        return loss

    assert torch.is_tensor(opt.step(closure))


# --- per-layer clipping ---------------------------------------------------------------


def test_per_layer_clips_each_parameter_to_its_bound():
    x, y = make_data(9)
    model = make_model()
    bounds = [0.05, 0.01, 0.2, 0.03]
    opt = dp(model, clipping="per_layer", max_grad_norm=bounds, expected_batch_size=9)
    assert isinstance(opt, DPPerLayerOptimizer)
    assert opt.max_grad_norm == pytest.approx(math.sqrt(sum(c * c for c in bounds)))
    backward(model, x, y)
    gs = [p.grad_sample.clone() for p in model.parameters()]
    opt.pre_step()
    for p, g, c in zip(model.parameters(), gs, bounds):
        norms = g.reshape(9, -1).norm(dim=1)
        factors = (c / (norms + 1e-6)).clamp(max=1)
        assert (factors * norms <= c * (1 + 1e-9)).all()
        torch.testing.assert_close(p.grad, torch.einsum("i,i...->...", factors, g) / 9)


def test_per_layer_noise_std_uses_total_bound():
    bounds = [0.3, 0.4]  # C_total = 0.5
    g = torch.Generator().manual_seed(1)
    ps = [nn.Parameter(torch.zeros(100, 500, dtype=DT)), nn.Parameter(torch.zeros(3, dtype=DT))]
    opt = DPPerLayerOptimizer(
        torch.optim.SGD(ps, lr=0.0),
        noise_multiplier=2.0,
        max_grad_norm=bounds,
        expected_batch_size=10,
        generator=g,
    )
    for p in ps:
        p.grad_sample = torch.zeros(10, *p.shape, dtype=DT)
    opt.step()
    _assert_std(ps[0].grad.reshape(-1), 2.0 * 0.5 / 10)


# --- adaptive clipping ----------------------------------------------------------------


def ada(params, **kw) -> AdaClipDPOptimizer:
    base = dict(
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=10,
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        max_clipbound=100.0,
        min_clipbound=0.01,
        unclipped_num_std=0.0,
    )
    base.update(kw)
    return DPOptimizer(torch.optim.SGD(params, lr=0.0), clipping="adaptive", **base)


def test_adaptive_noise_multiplier_formula():
    sigma, sigma_b = 1.1, 5.0
    assert adaptive_gradient_noise_multiplier(sigma, sigma_b) == pytest.approx(
        (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5
    )
    assert adaptive_gradient_noise_multiplier(sigma, sigma_b) > sigma  # count noise costs some budget
    assert adaptive_gradient_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="noise_multiplier < 2 \\* unclipped_num_std"):
        adaptive_gradient_noise_multiplier(2.0, 1.0)
    with pytest.raises(ValueError, match="undefined"):
        ada([nn.Parameter(torch.zeros(2))], noise_multiplier=1.0, unclipped_num_std=0.5)


def test_adaptive_gradient_noise_std_uses_sigma_grad():
    sigma, sigma_b, C, B = 1.0, 1.0, 0.5, 10
    g = torch.Generator().manual_seed(2)
    sample = _noise_only_grad(
        lambda ps: ada(
            ps,
            noise_multiplier=sigma,
            unclipped_num_std=sigma_b,
            max_grad_norm=C,
            expected_batch_size=B,
            generator=g,
        ),
        batch=B,
    )
    _assert_std(sample, adaptive_gradient_noise_multiplier(sigma, sigma_b) * C / B)


def _const_norm_grad_samples(norms: torch.Tensor) -> torch.Tensor:
    return norms.to(DT).reshape(-1, 1)  # one scalar-per-sample parameter of shape [1]


def test_adaptive_bound_moves_towards_target_quantile():
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    lr, gamma = 0.2, 0.5
    opt = ada([p], clipbound_learning_rate=lr, target_unclipped_quantile=gamma)
    # every sample clipped (b = 0 < gamma): the bound grows by exp(lr * gamma)
    p.grad_sample = _const_norm_grad_samples(torch.full((10,), 5.0))
    opt.step()
    opt.zero_grad()
    assert opt.max_grad_norm == pytest.approx(math.exp(lr * gamma))
    # no sample clipped (b = 1 > gamma): it shrinks by exp(-lr * (1 - gamma))
    p.grad_sample = _const_norm_grad_samples(torch.full((10,), 1e-3))
    opt.step()
    opt.zero_grad()
    assert opt.max_grad_norm == pytest.approx(1.0)
    # clamped to [min_clipbound, max_clipbound]
    assert geometric_clipbound_update(1.0, 0.0, 1.0, 100.0, 0.1, 3.0) == 3.0
    assert geometric_clipbound_update(1.0, 1.0, 0.0, 100.0, 0.1, 3.0) == 0.1


def test_adaptive_bound_converges_to_quantile():
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    opt = ada([p], target_unclipped_quantile=0.3, max_grad_norm=1.0, expected_batch_size=100)
    norms = torch.arange(1, 101, dtype=DT)  # the 30% quantile is ~30
    for _ in range(300):
        p.grad_sample = _const_norm_grad_samples(norms)
        opt.step()
        opt.zero_grad()
    assert 27 <= opt.max_grad_norm <= 33


def test_private_unclipped_fraction_is_centred_on_expected_batch_size():
    # 6 of 10 unclipped, expected batch 12: (6 - 5 + 0) / 12 + 1/2
    assert private_unclipped_fraction(6, 10, 0.0, 12) == pytest.approx(1 / 12 + 0.5)
    assert private_unclipped_fraction(5, 10, 1.2, 10) == pytest.approx(0.62)


def test_adaptive_state_dict_keeps_bound():
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    opt = ada([p])
    p.grad_sample = _const_norm_grad_samples(torch.full((10,), 5.0))
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = ada([p])
    fresh.load_state_dict(state)
    assert fresh.max_grad_norm == opt.max_grad_norm != 1.0


# --- API surface ----------------------------------------------------------------------


def test_wraps_optimizer_state_and_groups():
    model = make_model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = dp(model, opt=inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert (
        opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    )
    assert opt.original_optimizer is inner
    assert opt.params == list(model.parameters())
    assert "DPOptimizer" in repr(opt) and "Adam" in repr(opt)


def test_lr_scheduler():
    model = make_model()
    opt = dp(model, opt=torch.optim.SGD(model.parameters(), lr=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(2):
            backward(model, *make_data(4))
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt.original_optimizer.param_groups[0]["lr"] == 0.25


def test_state_dict_round_trip_resumes_identically():
    x, y = make_data(8)

    def fresh(model):
        return dp(
            model,
            opt=torch.optim.Adam(model.parameters(), lr=0.01),
            noise_multiplier=1.0,
            generator=torch.Generator().manual_seed(11),
        )

    model = make_model()
    opt = fresh(model)
    for _ in range(2):
        backward(model, x, y)
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optim": opt.state_dict(), "noise": opt.noise_generator_state()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = make_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = fresh(resumed)
    opt2.load_state_dict(ckpt["optim"])
    opt2.set_noise_generator_state(ckpt["noise"])
    for m, o in ((model, opt), (resumed, opt2)):
        backward(m, x, y)
        o.step()
        o.zero_grad()
    torch.testing.assert_close(flat_params(model), flat_params(resumed), rtol=0, atol=0)


def test_zero_grad_clears_per_sample_state():
    model = make_model()
    opt = dp(model)
    backward(model, *make_data(4))
    opt.step()
    opt.zero_grad()
    for p in model.parameters():
        assert p.grad is None and p.grad_sample is None and p.summed_grad is None


def test_class_dispatch():
    assert get_optimizer_class("flat") is DPOptimizer
    assert get_optimizer_class("per_layer") is DPPerLayerOptimizer
    assert get_optimizer_class("adaptive") is AdaClipDPOptimizer
    assert get_optimizer_class("flat", grad_sample_mode="ghost") is DPOptimizer  # book-keeping attaches to it
    with pytest.raises(NotImplementedError, match="ghost_fsdp"):
        get_optimizer_class("flat", grad_sample_mode="ghost_fsdp")
    p = nn.Parameter(torch.zeros(2))
    assert (
        type(
            DPOptimizer(
                torch.optim.SGD([p], lr=1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2
            )
        )
        is DPOptimizer
    )
    with pytest.raises(ValueError, match="clipping='adaptive'"):
        DPPerLayerOptimizer(
            torch.optim.SGD([p], lr=1),
            noise_multiplier=1.0,
            max_grad_norm=[1.0],
            expected_batch_size=2,
            clipping="adaptive",
        )


def test_secure_mode_uses_unpredictable_generator():
    grads = [
        _noise_only_grad(
            lambda ps: DPOptimizer(
                torch.optim.SGD(ps, lr=0.0),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=1,
                secure_mode=True,
            ),
            shape=(5,),
            batch=1,
        )
        for _ in range(2)
    ]
    assert not torch.equal(*grads)
    p = nn.Parameter(torch.zeros(1))
    opt = DPOptimizer(
        torch.optim.SGD([p], lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
        secure_mode=True,
    )
    assert opt.generator is not None and opt.noise_generator_state() is None


# --- hooks and ordering ---------------------------------------------------------------


def test_guard_can_abort_before_any_state_changes():
    x, y = make_data(6)
    model = make_model()
    opt = dp(
        model,
        opt=torch.optim.Adam(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    order = []
    opt.attach_step_hook(lambda o: order.append("hook"))
    opt.register_step_pre_hook(lambda *a: order.append("update"))

    class Budget(RuntimeError):
        pass

    def guard(o):
        order.append("guard")
        raise Budget("over budget")

    handle = opt.register_step_guard(guard)
    backward(model, x, y)
    params, gen = flat_params(model), opt.noise_generator_state()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(Budget):
        opt.step()
    assert order == ["guard"]
    assert torch.equal(flat_params(model), params) and torch.equal(opt.noise_generator_state(), gen)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(p.summed_grad is None for p in model.parameters()) and len(opt.state) == 0

    handle.remove()
    opt.register_step_guard(lambda o: order.append("guard2"))
    opt.step()
    assert order == ["guard", "guard2", "hook", "update"]


def test_skipped_step_accumulates_without_noise_hooks_or_update():
    model = make_model()
    opt = dp(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    calls = []
    opt.attach_step_hook(lambda o: calls.append("hook"))
    opt.register_step_guard(lambda o: calls.append("guard"))
    before, gen = flat_params(model), opt.noise_generator_state()
    opt.signal_skip_step(True)
    backward(model, *make_data(3))
    opt.step()
    opt.zero_grad()
    assert (
        calls == []
        and torch.equal(flat_params(model), before)
        and torch.equal(opt.noise_generator_state(), gen)
    )
    assert all(p.summed_grad is not None and p.grad_sample is None for p in model.parameters())
    backward(model, *make_data(2, seed=3))
    opt.step()
    assert calls == ["guard", "hook"] and opt.clip_stats.num_samples == 5


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(noise_multiplier=-1.0),
            "noise_multiplier must be a finite number >= 0, got noise_multiplier=-1.0",
        ),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0, got max_grad_norm=0.0"),
        (dict(max_grad_norm=[1.0, 1.0]), "flat clipping takes one bound.*clipping='per_layer'"),
        (dict(expected_batch_size=0), "expected_batch_size must be a number > 0.*expected_batch_size=0"),
        (dict(expected_batch_size=None), "expected_batch_size.*loss_reduction='mean'"),
        (dict(loss_reduction="avg"), "loss_reduction must be 'mean' or 'sum', got loss_reduction='avg'"),
        (dict(clipping="sometimes"), "unknown clipping mode clipping='sometimes'"),
        (
            dict(clipping="per_layer", max_grad_norm=[1.0]),
            "got 1 bounds in max_grad_norm for 4 trainable parameters",
        ),
        (dict(clipping="per_layer", max_grad_norm=1.0), "per_layer clipping needs max_grad_norm as a list"),
        (dict(clipping="per_layer", max_grad_norm=[1.0, 1.0, -1.0, 1.0]), r"max_grad_norm\[2\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp(make_model(), **kwargs)


def test_bad_adaptive_arguments():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="target_unclipped_quantile must be in \\[0, 1\\]"):
        ada(p, target_unclipped_quantile=1.5)
    with pytest.raises(ValueError, match="min_clipbound must be < max_clipbound"):
        ada(p, min_clipbound=2.0, max_clipbound=1.0)
    with pytest.raises(ValueError, match="must lie in \\[min_clipbound, max_clipbound\\]"):
        ada(p, max_grad_norm=1000.0)
    with pytest.raises(ValueError, match="adaptive clipping needs expected_batch_size"):
        ada(p, expected_batch_size=None, loss_reduction="sum")


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        DPOptimizer(
            [nn.Parameter(torch.zeros(1))], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1
        )


def test_missing_grad_sample():
    model = make_model()
    opt = dp(model)
    nn.functional.mse_loss(model(make_data(3)[0]), make_data(3)[1]).backward()
    with pytest.raises(ValueError, match="per-sample gradients are missing.*not made private.*backward"):
        opt.step()


def test_non_finite_per_sample_gradient_names_the_sample():
    x, y = make_data(6)
    model = make_model()
    opt = dp(model)
    backward(model, x, y)
    list(model.parameters())[2].grad_sample[3, 1] = float("nan")
    before = flat_params(model)
    with pytest.raises(FloatingPointError, match="sample index 3 .*parameter #2"):
        opt.step()
    assert torch.equal(flat_params(model), before)
    assert all(p.summed_grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["materialize", "bk"])
def test_grad_scaler_is_refused_before_the_step_and_the_step_then_runs(mode):
    """A ``torch.amp.GradScaler`` scales each per-sample gradient before clipping (so each
    would be clipped at ``C / scale``; before, materialize mode trained so and book-keeping
    failed in the scaler's own assertion): ``scaler.step`` is refused with the fix, nothing
    changes, and the same gradients then step as without the scaler."""
    x, y = make_data(6)
    models = [fxdp.privatize(make_model(), grad_sample_mode=mode) for _ in range(2)]
    opts = [dp(m) for m in models]
    if mode == "bk":
        for m, o in zip(models, opts):
            o.attach_bookkeeping(m.bookkeeping)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for m in models:
        loss = nn.functional.mse_loss(m(x), y)
        scaler.scale(loss)  # the scaler's scale is set; the gradients stay unscaled to compare below
        loss.backward()
    before = flat_params(models[0])
    with pytest.raises(ValueError, match=r"GradScaler drives this DP optimizer.*clip at max_grad_norm / scale"
                                         r".*Fix: drop the GradScaler"):
        scaler.step(opts[0])
    assert torch.equal(flat_params(models[0]), before)
    assert not hasattr(opts[0], "found_inf") and not hasattr(opts[0], "grad_scale")
    for o in opts:
        o.step()
    assert torch.equal(flat_params(models[0]), flat_params(models[1]))
    assert not torch.equal(flat_params(models[0]), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_non_finite_finds_the_entry_and_trusts_no_overflowing_sum(dtype):
    """The check sums the non-negative norms (finite exactly when every entry is): a NaN or
    inf anywhere is found at its (sample, parameter); finite norms whose sum overflows are
    searched entry by entry and pass."""
    from fxdp.optim.clip import first_non_finite

    big = torch.finfo(dtype).max / 2
    assert first_non_finite(torch.ones(4, 3, dtype=dtype)) is None
    assert first_non_finite(torch.full((4, 3), big, dtype=dtype)) is None  # the sum is inf
    for bad in (float("nan"), float("inf")):
        norms = torch.full((4, 3), big, dtype=dtype)
        norms[2, 1] = bad
        assert first_non_finite(norms) == (2, 1)
        norms = torch.zeros(4, 3, dtype=dtype)
        norms[3, 0] = bad
        assert first_non_finite(norms) == (3, 0)


def test_reusing_gradients_without_zero_grad_raises():
    model = make_model()
    opt = dp(model)
    backward(model, *make_data(4))
    opt.step()
    with pytest.raises(ValueError, match="zero_grad"):
        opt.step()


# --- pure functions -------------------------------------------------------------------


def test_clip_functions_match_loops():
    g = torch.Generator().manual_seed(0)
    gs = [
        torch.randn(5, 3, 2, generator=g, dtype=DT),
        torch.randn(5, generator=g, dtype=DT),
    ]  # 2nd: scalar param
    norms = per_param_sample_norms(gs)
    for i in range(5):
        assert float(norms[i, 0]) == pytest.approx(float(gs[0][i].norm()))
        assert float(norms[i, 1]) == pytest.approx(abs(float(gs[1][i])))
    total = per_sample_norms(gs)
    f = clip_factors(total, 1.0)
    sums = clipped_sum(gs, f)
    torch.testing.assert_close(sums[0], sum(f[i] * gs[0][i] for i in range(5)))
    torch.testing.assert_close(sums[1], sum(f[i] * gs[1][i] for i in range(5)))
    empty = [torch.zeros(0, 3, 2), torch.zeros(0)]
    assert per_sample_norms(empty).shape == (0,)
    assert [s.shape for s in clipped_sum(empty, clip_factors(per_sample_norms(empty), 1.0))] == [(3, 2), ()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_as_rounds_toward_zero(dtype):
    """Clip factors cast to a narrower dtype never round up (a factor above ``C / ||g||``
    would let a clipped gradient exceed ``C``), stay within one step of the nearest value,
    and pass unchanged, or widen exactly, otherwise."""
    from fxdp.optim.clip import factors_as

    f = torch.cat([torch.rand(10_000, generator=torch.Generator().manual_seed(3)), torch.tensor([0.0, 1.0, 0.5])])
    low = factors_as(f, dtype)
    assert low.dtype == dtype
    normal = f >= torch.finfo(dtype).tiny  # below: subnormal steps, still never up
    assert bool((low.float() <= f).all())
    assert bool((low.float()[normal] >= f[normal] * (1 - 2 * torch.finfo(dtype).eps)).all())
    assert bool((low.float() < f).any())  # rounding to nearest would have gone up here
    assert low[-3:].tolist() == [0.0, 1.0, 0.5]  # representable: kept
    assert factors_as(f, torch.float32) is f
    torch.testing.assert_close(factors_as(low, torch.float32), low.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noisy_sum_of_half_precision_rounds_once_after_the_noise(dtype):
    """A half-precision sum gets float32 noise and one rounding after it (post-processing of
    the Gaussian mechanism), not noise rounded to the half-precision grid and a second
    rounding of the addition."""
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    got = noisy_sum(x, 0.7, generator=torch.Generator().manual_seed(6))
    noise = gaussian_noise(0.7, x.shape, dtype=torch.float32, generator=torch.Generator().manual_seed(6))
    assert got.dtype == dtype
    assert torch.equal(got, (x.float() + noise).to(dtype))
    assert not torch.equal(got, x + noise.to(dtype))  # rounding twice differs somewhere


def test_gaussian_noise_zero_std_draws_nothing():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(gaussian_noise(0.0, (3,), generator=g), torch.zeros(3))
    assert torch.equal(g.get_state(), state)
    assert gaussian_noise(1.0, (4,), dtype=torch.bfloat16, generator=g).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        gaussian_noise(-1.0, (3,))


def test_flat_noise_is_one_draw_into_a_reused_buffer():
    """One normal_ over every parameter's noise, sums added in place; the buffer is
    reused (no allocation per step) and each call draws fresh noise."""
    sums = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    mech = FlatNoise()
    out = mech(sums, 0.7, generator=torch.Generator().manual_seed(1))
    flat = torch.empty(48).normal_(0.0, 0.7, generator=torch.Generator().manual_seed(1))  # slices at 0, 16, 32
    expected = [s + flat[o:o + s.numel()].view(s.shape) for s, o in zip(sums, (0, 16, 32))]
    for o, e, s in zip(out, expected, sums):
        assert o.shape == s.shape and torch.equal(o, e)
        assert o.untyped_storage().data_ptr() == mech.buffer.untyped_storage().data_ptr()
    g = torch.Generator().manual_seed(2)
    first = [o.clone() for o in mech(sums, 0.7, generator=g)]
    ptr = mech.buffer.data_ptr()
    second = mech(sums, 0.7, generator=g)
    assert mech.buffer.data_ptr() == ptr and not torch.equal(first[0], second[0])


def test_flat_noise_views_are_reused_and_rebuilt_with_the_buffer():
    """The per-parameter views of a kept buffer are made once per layout (no slicing per
    step), and made again from the new buffer when the parameters' layout changes."""
    mech, g = FlatNoise(keep=True), torch.Generator().manual_seed(0)
    like = [torch.zeros(3, 4), torch.zeros(5)]
    first, second = mech.draw(like, 1.0, generator=g), mech.draw(like, 1.0, generator=g)
    assert all(a is b and a._base is mech.buffer for a, b in zip(first, second))
    assert [v.data_ptr() - mech.buffer.data_ptr() for v in second] == [0, 16 * 4]  # slices aligned to 16
    for other in ([torch.zeros(4, 3), torch.zeros(5)], [torch.zeros(3, 4), torch.zeros(17)],
                  [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]):
        views = mech.draw(other, 1.0, generator=g)
        assert [v.shape for v in views] == [o.shape for o in other] and all(v._base is mech.buffer for v in views)
        assert mech.buffer.numel() == 16 + 16 * -(-other[1].numel() // 16)
        assert all(torch.equal(v.reshape(-1), mech.buffer[o:o + v.numel()]) for v, o in zip(views, (0, 16)))


def test_flat_noise_released_with_its_views_unless_kept():
    """``keep=False`` (the default off CPU): the buffer lives only as long as a view of it
    (``p.grad``), so ``zero_grad()`` frees it as non-private training frees its gradients;
    while a view lives the next draw reuses it. The noise is the same draw either way."""
    import gc

    like = [torch.zeros(3, 4), torch.zeros(5)]
    assert FlatNoise().keeps(torch.device("cpu")) and not FlatNoise().keeps(torch.device("cuda"))
    assert FlatNoise(keep=True).keeps(torch.device("cuda")) and not FlatNoise(keep=False).keeps(torch.device("cpu"))
    kept, released = FlatNoise(keep=True), FlatNoise(keep=False)
    a = kept.draw(like, 0.5, generator=torch.Generator().manual_seed(4))
    b = released.draw(like, 0.5, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) and x.shape == y.shape for x, y in zip(a, b))
    assert all(v._base is released.buffer for v in b)
    ptr = released.buffer.data_ptr()
    c = released.draw(like, 0.5, generator=torch.Generator().manual_seed(5))  # views alive: reused
    assert released.buffer.data_ptr() == ptr and all(v._base is released.buffer for v in c)
    del b, c
    gc.collect(0)
    assert released.buffer is None  # the last view gone: nothing of ours holds it
    d = released.draw(like, 0.5, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, d))
    del a, d
    gc.collect(0)
    assert kept.buffer is not None and released.buffer is None


def test_flat_noise_drawn_slice_by_slice_is_the_same_draw(monkeypatch):
    """``draw(lazy=True)`` of a released CPU buffer draws each view's slice (and every
    slice before it, whole slices of at least ``MIN_ELEMENTS`` a call) when the view is
    first read, into storage of that piece alone (no flat buffer): slices aligned to 16
    make the numbers those of one ``normal_`` over the buffer, in any order of reading."""
    like = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(40), torch.zeros(2, 0, 3), torch.zeros(2, 8),
            torch.zeros(1), torch.zeros(0)]
    eager = FlatNoise(keep=False).draw(like, 0.5, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(SliceDraw, "MIN_ELEMENTS", 20)  # whole slices, at least 20 elements a draw
    for order, drawn, pieces in (([0, 1, 2, 4, 5], [32, 32, 80, 112, 112], 3), ([2, 0, 5], [80, 80, 112], 2),
                                 ([5], [112], 1), ([6, 3], [112, 112], 1), ([4, 1, 0, 2, 5], [96, 96, 96, 96, 112], 2)):
        mech, g = FlatNoise(keep=False), torch.Generator().manual_seed(7)
        lazy = mech.draw(like, 0.5, generator=g, lazy=True)
        assert isinstance(lazy, SliceDraw) and len(lazy) == len(like)
        for k, n in zip(order, drawn):  # slices end at 16, 32, 80, 80 (empty), 96, 112, 112 (empty)
            assert torch.equal(lazy[k], eager[k]) and lazy._drawn == n
        views = list(lazy)  # the rest
        assert lazy._drawn == 112 and mech.buffer is None
        assert all(torch.equal(v, e) and v.shape == e.shape and v.is_contiguous() for v, e in zip(views, eager))
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in views if v.numel()}
        assert len(storages) == pieces and sum(storages.values()) == 112 * 4  # the pieces, and nothing more
    assert not isinstance(FlatNoise(keep=True).draw(like, 0.5, lazy=True), SliceDraw)  # kept: one draw
    assert not isinstance(FlatNoise(keep=False).draw(like, 0.0, lazy=True), SliceDraw)  # zeros
    assert not isinstance(FlatNoise().draw(like, 0.5, lazy=True), SliceDraw)  # measuring: the whole draw


def _probe_clock(monkeypatch, draws):
    """Fake the clock and the page-fault counter of ``FlatNoise``'s probe: ``draws`` lists
    (start, end, faults at start, faults at end) of each draw."""
    import fxdp.optim.noise as noise_mod

    clock = iter([t for d in draws for t in d[:2]])
    faults = iter([f for d in draws for f in d[2:]])
    monkeypatch.setattr(noise_mod.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(noise_mod, "_minor_faults", lambda: next(faults))


def _probe_draws(step_s, released_faults=(1000, 950), released_draw_s=0.001):
    """Three kept draws (the first fresh; kept steps fault 100 and 50 times), three released:
    the first 20 ms slower with 2000 faults (10 us a fault, one-off heap growth), then steps
    ``step_s`` apart faulting ``released_faults`` times; three kept again (steps faulting
    60 and 40 times)."""
    d = [(0.0, 0.010, 0, 5000), (0.5, 0.501, 5100, 5100), (1.0, 1.001, 5150, 5150), (1.5, 1.521, 5200, 7200)]
    f = 7200
    for k, (n, took) in enumerate(zip(list(released_faults) + [40, 60, 40], [released_draw_s] * 2 + [0.001] * 3), 1):
        f += n
        start = 1.52 + k * step_s
        d.append((start, start + took, f, f))
    return d


def _probed(monkeypatch, draws, **draw_kw) -> FlatNoise:
    """A ``FlatNoise()`` after the nine draws of its probe, on the faked ``draws``."""
    import gc

    _probe_clock(monkeypatch, draws)
    like, mech = [torch.zeros(3, 4), torch.zeros(5)], FlatNoise()
    for _ in range(9):
        views = mech.draw(like, 0.5, **draw_kw)
        del views  # zero_grad(): a released buffer goes with its views
        gc.collect(0)
    return mech


@pytest.mark.parametrize("step_s,kept", [(1.0, False), (0.1, True)])
def test_flat_noise_on_cpu_is_released_when_its_page_faults_are_cheap(monkeypatch, step_s, kept):
    """``keep=None`` on CPU: three draws with the buffer kept, three with it released, three
    kept again. A released step faults 950 times (the fewer of two: glibc trims its heap now
    and then) against 50 and 40 kept (the more of the two sides counts), at 10 us a fault (the
    first released draw: 20 ms for 2000 faults, one-off and only reported): 9 ms. In a 1 s
    step (0.9% <= 2%) released from then on; in a 100 ms step (9%) kept. The noise is the same
    draw either way."""
    import gc

    _probe_clock(monkeypatch, _probe_draws(step_s))
    like = [torch.zeros(3, 4), torch.zeros(5)]
    mech, ref = FlatNoise(), FlatNoise(keep=True)
    g, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    cpu = torch.device("cpu")
    for k in range(9):
        views = mech.draw(like, 0.5, generator=g)
        assert all(torch.equal(v, r) for v, r in zip(views, ref.draw(like, 0.5, generator=g_ref)))
        assert mech.keeps(cpu) == (k < 2 or 5 <= k < 8 or (k == 8 and kept))
        del views  # zero_grad(): the released buffer goes with its views
        gc.collect(0)
    d = mech.decision
    assert d["keep"] is kept and d["extra_faults_per_step"] == 900
    assert d["fault_us"] == pytest.approx(10.0)
    assert d["released_extra_ms"] == pytest.approx(9.0)
    assert d["first_released_draw_extra_ms"] == pytest.approx(20.0)
    assert d["step_ms"] == pytest.approx(1e3 * step_s)
    views = mech.draw(like, 0.5, generator=g)  # decided: no more timing
    assert all(torch.equal(v, r) for v, r in zip(views, ref.draw(like, 0.5, generator=g_ref)))
    del views
    gc.collect(0)
    assert (mech.buffer is not None) == kept
    assert FlatNoise(keep=True).decision is None and FlatNoise().keeps(cpu)  # undecided: kept


def test_flat_noise_probe_counts_only_what_releasing_adds(monkeypatch):
    """Page faults that come as the process runs, kept or not (glibc trimming its heap more
    often), do not count against releasing: released steps faulting 1000 and 950 times
    between kept ones faulting 50 before and 900 after cost 50 faults (0.5 ms in a 100 ms
    step): released."""
    draws = _probe_draws(0.1)
    f, late = draws[5][3], []
    for (s, e, _, _), n in zip(draws[6:], (900, 900, 1000)):
        f += n
        late.append((s, e, f, f))
    mech = _probed(monkeypatch, draws[:6] + late)
    assert mech.decision["extra_faults_per_step"] == 50 and mech.decision["keep"] is False
    assert mech.decision["released_extra_ms"] == pytest.approx(0.5)


def test_flat_noise_probe_without_fault_counts_times_the_draws(monkeypatch):
    """Where no page faults are counted (no ``resource`` module), the released draws' extra
    time over the kept ones decides: 9 ms more each in a 100 ms step keeps the buffer, and a
    fault count of zero costs nothing."""
    mech = _probed(monkeypatch, [(s, e, 0, 0) for s, e, _, _ in _probe_draws(0.1, released_draw_s=0.010)])
    assert mech.decision["keep"] is True and mech.decision["extra_faults_per_step"] == 0
    assert mech.decision["fault_us"] == pytest.approx(1e6 * FlatNoise.FAULT_SECONDS)
    assert mech.decision["released_extra_ms"] == pytest.approx(9.0)


def test_flat_noise_probe_draws_released_steps_as_they_run_after_it(monkeypatch):
    """The probe's released draws (the fourth to the sixth) of a book-keeping step (``lazy``)
    are drawn as released steps draw after the decision, in pieces as their views are read
    (``SliceDraw``): the faults the probe counts in those steps are the ones releasing costs.
    The numbers are the same draw as a kept buffer's."""
    import gc

    _probe_clock(monkeypatch, _probe_draws(1.0))
    like = [torch.zeros(3, 4), torch.zeros(5)]
    mech, ref = FlatNoise(), FlatNoise(keep=True)
    g, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for k in range(9):
        out = mech.draw(like, 0.5, generator=g, lazy=True, held_bytes=lambda: 1024)
        assert isinstance(out, SliceDraw) is (3 <= k < 6)
        assert all(torch.equal(v, r) for v, r in zip(out, ref.draw(like, 0.5, generator=g_ref)))
        del out
        gc.collect(0)
    assert mech.decision is not None and mech.decision["extra_faults_per_step"] == 900


@pytest.mark.parametrize("held,step_s,kept", [(0, 0.25, True), (4, 0.25, True), (16, 0.25, False),
                                               (128, 0.25, False), (1024, 0.25, False), (128, 0.1, True)])
def test_flat_noise_releases_for_memory_up_to_a_cap(monkeypatch, held, step_s, kept):
    """The decision weighs the share of the step's peak that releasing saves where the caller
    holds ``held_bytes`` at the draw (book-keeping's records), ``min(buffer, held) / (buffer +
    held)``: for a 128-byte buffer (two slices of 16 float32) on 0 / 4 / 16 / 128 / 1024 bytes
    0% / 3% / 11% / 50% / 11%. Releasing costing 9 ms of a 250 ms step (3.6%, over the 2% any
    release may cost) is worth it where it saves at least as large a share, up to 5%: kept for
    0% and 3%, released for 11% and 50%; 9 ms of a 100 ms step (9%) keeps the buffer even
    for 50%."""
    mech = _probed(monkeypatch, _probe_draws(step_s), generator=torch.Generator().manual_seed(2), lazy=True,
                   held_bytes=lambda: held)
    assert mech.decision["keep"] is kept and mech.keeps(torch.device("cpu")) is kept
    assert mech.decision["memory_saved_share"] == pytest.approx(min(128, held) / (128 + held))
    assert mech.decision["allowed_share"] == pytest.approx(max(0.02, min(min(128, held) / (128 + held), 0.05)))
    assert mech.decision["released_extra_ms"] == pytest.approx(9.0)


@pytest.mark.parametrize("keep", [True, False])
def test_optimizer_frees_the_noise_buffer_at_zero_grad_unless_kept(keep):
    """``optimizer.flat_noise.keep = False``: the step's gradients are views of the noise
    buffer and ``zero_grad()`` frees it with them; kept (CPU's default) it survives, and
    either way the update is the same."""
    import gc

    results = []
    for k in (True, keep):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        x, y = torch.randn(8, 4), torch.randn(8, 3)
        opt = dp(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(1))
        assert opt.flat_noise.keep is None and opt.flat_noise.keeps(torch.device("cpu"))
        opt.flat_noise.keep = k
        backward(model, x, y)
        opt.step()
        assert all(p.grad._base is opt.flat_noise.buffer for p in model.parameters())
        opt.zero_grad()
        gc.collect(0)
        assert (opt.flat_noise.buffer is not None) == k
        results.append(flat_params(model))
    assert torch.equal(results[0], results[1])


def test_flat_noise_falls_back_per_sum_and_zero_std_draws_nothing():
    mixed = [torch.randn(3), torch.randn(4, dtype=torch.float64), torch.randn(2, dtype=torch.bfloat16)]
    out = FlatNoise()(mixed, 0.5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for o, s in zip(out, mixed):  # mixed dtypes: exactly noisy_sum per sum, dtypes kept
        assert o.dtype == s.dtype and torch.equal(o, noisy_sum(s, 0.5, generator=g))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    sums = [torch.randn(3), torch.randn(2)]
    assert all(torch.equal(o, s) for o, s in zip(FlatNoise()(sums, 0.0, generator=g), sums))
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="std"):
        FlatNoise()(sums, float("nan"))


def test_deepcopy():
    model = make_model()
    opt = dp(model, noise_multiplier=1.0)
    clone = copy.deepcopy(opt)
    assert clone.noise_multiplier == 1.0 and clone.param_groups is not opt.param_groups


def test_add_param_group_goes_to_wrapped_optimizer():
    model, extra = make_model(), nn.Parameter(torch.zeros(3, dtype=DT))
    opt = dp(model)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.original_optimizer.param_groups) == 2 and opt.params[-1] is extra
    assert extra.summed_grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_clipped_sum_is_formed_in_float32(dtype, monkeypatch):
    """``clipped_sum`` of half-precision per-sample gradients is float32 (``sum_dtype``), equal
    to the float64 sum of the same values to float32 accuracy, also over slices of the batch."""
    import fxdp.optim.clip as clip

    g = torch.Generator().manual_seed(9)
    gs = (torch.randn(40, 6, 5, generator=g) + 3).to(dtype)  # aligned rows: a long sum
    f = torch.rand(40, generator=g)
    want = torch.einsum("b,bij->ij", f.double(), gs.double())
    for slice_bytes in (1 << 24, 6 * 5 * 4 * 7):  # one slice; slices of 7 samples
        monkeypatch.setattr(clip, "_WIDE_SLICE_BYTES", slice_bytes)
        (got,) = clip.clipped_sum([gs], f)
        assert got.dtype == torch.float32 and got.shape == (6, 5)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert clip.sum_dtype(dtype) == torch.float32 and clip.sum_dtype(torch.float64) == torch.float64


def test_half_precision_parameter_gets_its_noisy_sum_rounded_once():
    """A bfloat16 parameter's clipped sum stays float32 through the noise: ``p.grad`` is
    ``(S + N).to(bfloat16)`` of the float32 sum and float32 noise (one rounding, after the
    mechanism), and ``p.summed_grad`` accumulates in float32."""
    torch.manual_seed(4)
    model = nn.Linear(12, 7).bfloat16()
    dp = fxdp.privatize(model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.0), noise_multiplier=0.8, max_grad_norm=0.5,
                      expected_batch_size=8, loss_reduction="sum", generator=torch.Generator().manual_seed(2))
    x = torch.randn(8, 12).bfloat16()
    dp(x).float().square().sum().backward()
    opt.clip_and_accumulate()
    sums = [p.summed_grad.clone() for p in opt.params]
    assert all(s.dtype == torch.float32 for s in sums)
    noisy = FlatNoise()(sums, 0.8 * 0.5, generator=torch.Generator().manual_seed(2))
    opt.add_noise()
    for p, n in zip(opt.params, noisy):
        assert p.grad.dtype == torch.bfloat16
        assert torch.equal(p.grad, n.to(torch.bfloat16))
