"""Tests of fxdp.PrivacyEngine: Opacus compatibility, DP-SGD step, validation, budget guard."""

from __future__ import annotations

import copy
import math
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp import PrivacyBudgetExceeded, PrivacyEngine
from fxdp.accountants import RDPAccountant, create_accountant
from fxdp.data import DPDataLoader
from fxdp.optim import DPOptimizer
from models import FlatBags

DT = torch.float64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 1, **kwargs) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, **kwargs)


def make_private(model=None, loader=None, accountant="rdp", lr=0.1, momentum=0.0, **kwargs):
    model = model if model is not None else make_model()
    loader = loader if loader is not None else make_loader()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    engine = PrivacyEngine(accountant=accountant)
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    dp_model, dp_opt, dp_loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, **kwargs)
    return engine, dp_model, dp_opt, dp_loader


def train_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# --- Opacus compatibility ----------------------------------------------------------------

OPACUS_STYLE_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    {import_line}
    {bmm_import}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
    train_loader = DataLoader(data, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = nn.CrossEntropyLoss()

    privacy_engine = PrivacyEngine(accountant="rdp")
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier={sigma},
        max_grad_norm=1.0,
        poisson_sampling={poisson},
    )
    model.train()
    for epoch in range(2):
        with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=8, optimizer=optimizer) as loader:
            for x, y in loader:
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
    epsilon = privacy_engine.get_epsilon(delta=1e-5)
    weights = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
    """
)


def run_script(library: str, sigma: float = 1.1, poisson: bool = True, bmm_library: str | None = None) -> dict:
    src = OPACUS_STYLE_SCRIPT.format(
        import_line=f"from {library} import PrivacyEngine",
        bmm_import=f"from {bmm_library or library}.utils.batch_memory_manager import BatchMemoryManager",
        sigma=sigma,
        poisson=poisson,
    )
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(src, f"<{library} script>", "exec"), scope)
    return scope


@pytest.mark.parametrize("bmm_library", ["fxdp", "opacus"])
def test_opacus_style_script_runs_unchanged(bmm_library):
    """Only the PrivacyEngine import changes (Opacus' own BatchMemoryManager works too)."""
    if bmm_library == "opacus":
        pytest.importorskip("opacus")
    out = run_script("fxdp", bmm_library=bmm_library)
    assert math.isfinite(out["epsilon"]) and out["epsilon"] > 0
    assert isinstance(out["privacy_engine"].accountant, RDPAccountant)
    assert out["privacy_engine"].steps == 2 * 4  # one accountant step per logical batch
    # same state_dict keys as the plain model (no "_module." prefix)
    assert set(out["weights"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_script_matches_opacus_without_noise():
    """sigma = 0, fixed batches: the same script gives Opacus' weights (exact per-sample clipping)."""
    pytest.importorskip("opacus")
    ours = run_script("fxdp", sigma=0.0, poisson=False)
    theirs = run_script("opacus", sigma=0.0, poisson=False)
    theirs_weights = {k.removeprefix("_module."): v for k, v in theirs["weights"].items()}  # Opacus' wrapper prefix
    assert set(ours["weights"]) == set(theirs_weights)
    for k, v in ours["weights"].items():
        torch.testing.assert_close(v, theirs_weights[k], rtol=0, atol=1e-12)
    assert ours["privacy_engine"].accountant.history == theirs["privacy_engine"].accountant.history


def test_make_private_returns_private_objects():
    model = make_model()
    keys = list(model.state_dict())
    engine, dp_model, dp_opt, dp_loader = make_private(model=model, accountant="prv")
    assert isinstance(dp_model, fxdp.DPModule) and list(dp_model.state_dict()) == keys
    assert isinstance(dp_opt, DPOptimizer) and isinstance(dp_loader, DPDataLoader)
    assert dp_loader.sample_rate == pytest.approx(1 / 4)
    assert dp_opt.expected_batch_size == pytest.approx(16)
    assert engine.accountant.mechanism() == "prv" and engine.steps == 0
    # parameters are shared: training the DP model trains the user's model
    assert all(p is q for p, q in zip(dp_model.parameters(), model.parameters()))


def test_accepts_privatized_module_and_dp_optimizer():
    model = make_model()
    dp = fxdp.privatize(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=16)
    engine = PrivacyEngine(accountant="rdp")
    m, o, _ = engine.make_private(module=dp, optimizer=opt, data_loader=make_loader(), noise_multiplier=0.5,
                                  max_grad_norm=2.0)
    assert m is dp and o.original_optimizer is opt.original_optimizer and o.noise_multiplier == 0.5
    with pytest.raises(ValueError, match="already privatized with loss_reduction='mean'"):
        PrivacyEngine(accountant="rdp").make_private(module=dp, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                     data_loader=make_loader(), noise_multiplier=1.0,
                                                     max_grad_norm=1.0, loss_reduction="sum")


# --- the DP step ---------------------------------------------------------------------------


@pytest.mark.parametrize("privatized", [False, True])
@pytest.mark.parametrize("mode", ["bk", "materialize"])
def test_make_private_trains_a_text_classifier_on_flat_token_ids(mode, privatized):
    """PyTorch's text-classification pattern: nn.EmbeddingBag on flat token ids and their
    offsets (a collate_fn concatenates the samples), with input_batch_dims=[None, 0] given to
    make_private, or to privatize before it: the static check on the loader's batch, Poisson
    batches, the first step's cross-check against each bag alone, the accountant. Before,
    make_private had no input_batch_dims and the cross-check raised TypeError on them."""

    def collate(batch):
        lens = torch.tensor([len(t) for t, _ in batch], dtype=torch.long)
        offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]]) if batch else lens
        text = torch.cat([t for t, _ in batch]) if batch else torch.zeros(0, dtype=torch.long)
        return text, offsets, torch.tensor([y for _, y in batch], dtype=torch.long)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 40, (int(torch.randint(2, 9, (), generator=g)),), generator=g), i % 2)
            for i in range(64)]
    torch.manual_seed(0)
    module = FlatBags(40, 8)
    if privatized:
        module = fxdp.privatize(module, input_batch_dims=[None, 0], grad_sample_mode=mode)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5), grad_sample_mode=mode,
        data_loader=DataLoader(data, batch_size=16, collate_fn=collate), noise_multiplier=1.0, max_grad_norm=1.0,
        input_batch_dims=[None, 0])
    assert privatized or engine.compatibility_report.ok
    before = model.fc.weight.detach().clone()
    for text, offsets, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(text, offsets), y).backward()
        opt.step()
    assert engine.steps == len(loader) and 0 < engine.get_epsilon(1e-5) < math.inf
    assert not torch.equal(before, model.fc.weight)


def test_sigma0_huge_clip_equals_sgd():
    """sigma = 0 and C = 1e6: one DP step is exactly non-private SGD on the same batch."""
    model = make_model()
    ref = copy.deepcopy(model)
    loader = make_loader(batch_size=16, shuffle=False)
    with pytest.warns(UserWarning, match="Poisson"):
        _, dp_model, dp_opt, dp_loader = make_private(model=model, loader=loader, noise_multiplier=0.0,
                                                      max_grad_norm=1e6, poisson_sampling=False, lr=0.3)
    x, y = next(iter(dp_loader))
    train_step(dp_model, dp_opt, x, y)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    train_step(ref, ref_opt, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_poisson_step_divides_by_expected_batch_size():
    """With Poisson batches the mean uses q*N (the actual batch size is private)."""
    model = make_model()
    ref = copy.deepcopy(model)
    loader = make_loader(batch_size=16, generator=torch.Generator().manual_seed(3))
    _, dp_model, dp_opt, dp_loader = make_private(model=model, loader=loader, noise_multiplier=0.0,
                                                  max_grad_norm=1e6, lr=0.3)
    x, y = next(iter(dp_loader))
    assert len(x) != 16  # a real Poisson batch
    train_step(dp_model, dp_opt, x, y)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    ref_opt.zero_grad()
    (nn.functional.cross_entropy(ref(x), y, reduction="sum") / 16).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_first_step_cross_check():
    engine, dp_model, dp_opt, dp_loader = make_private()
    x, y = next(iter(dp_loader))
    train_step(dp_model, dp_opt, x, y)
    result = engine._bindings[-1].cross_check.result
    assert result is not None and result.ok
    engine, *_ = make_private(verify_first_step=False)
    assert engine._bindings[-1].cross_check is None


def test_accountant_records_each_real_step():
    engine, dp_model, dp_opt, dp_loader = make_private(noise_multiplier=1.3)
    for x, y in dp_loader:
        train_step(dp_model, dp_opt, x, y)
    assert engine.accountant.history == [(1.3, 0.25, 4)]
    assert engine.steps == 4
    ref = RDPAccountant()
    for _ in range(4):
        ref.step(noise_multiplier=1.3, sample_rate=0.25)
    assert engine.get_epsilon(1e-5) == ref.get_epsilon(1e-5)


def test_batch_memory_manager_one_step_per_logical_batch():
    engine, dp_model, dp_opt, dp_loader = make_private()
    with fxdp.BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=5, optimizer=dp_opt) as small:
        n_physical = 0
        for x, y in small:
            assert len(x) <= 5
            train_step(dp_model, dp_opt, x, y)
            n_physical += 1
    assert engine.steps == 4 and n_physical > 4


def test_grad_accumulation_refused_with_poisson():
    engine, dp_model, dp_opt, dp_loader = make_private(momentum=0.9)
    it = iter(dp_loader)
    before = [p.detach().clone() for p in dp_model.parameters()]
    dp_opt.zero_grad()
    for _ in range(2):
        x, y = next(it)
        nn.functional.cross_entropy(dp_model(x), y).backward()
    with pytest.raises(ValueError, match="gradient accumulation detected.*BatchMemoryManager"):
        dp_opt.step()
    assert all(torch.equal(p, b) for p, b in zip(dp_model.parameters(), before))
    assert engine.steps == 0


def test_grad_accumulation_without_poisson_is_accounted():
    """Fixed batches (Opacus semantics): k accumulated batches are one step at rate k*q."""
    with pytest.warns(UserWarning, match="Poisson"):
        engine, dp_model, dp_opt, dp_loader = make_private(poisson_sampling=False)
    it = iter(dp_loader)
    for _ in range(2):
        x, y = next(it)
        nn.functional.cross_entropy(dp_model(x), y).backward()
    dp_opt.step()
    assert engine.accountant.history == [(1.0, 0.5, 1)]


def test_shuffling_caveat_recorded():
    with pytest.warns(UserWarning, match="does not cover|analyses Poisson subsampling"):
        engine, _, _, loader = make_private(loader=make_loader(shuffle=True), poisson_sampling=False)
    assert not isinstance(loader, DPDataLoader)
    assert len(engine.caveats) == 1 and "Poisson" in engine.caveats[0]
    assert PrivacyEngine().caveats == []


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_multiplier=-1.0), r"noise_multiplier must be a finite number >= 0, got noise_multiplier=-1\.0.*Fix"),
        (dict(noise_multiplier=float("nan")), r"noise_multiplier must be a finite number >= 0"),
        (dict(max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0.*max_grad_norm=0\.0.*Fix"),
        (dict(max_grad_norm=-2.0), r"max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=[1.0, 1.0]), r"a list of bounds needs clipping='per_layer'"),
        (dict(clipping="per_layer"), r"clipping='per_layer' needs max_grad_norm as a list"),
        (dict(clipping="ghost"), r"unknown clipping='ghost'"),
        (dict(loss_reduction="none"), r"loss_reduction must be 'mean' or 'sum'"),
        (dict(target_epsilon=1.0), r"needs both target_epsilon and target_delta"),
        (dict(target_epsilon=1.0, target_delta=1.5), r"target_delta must be in the open interval \(0, 1\)"),
        (dict(target_epsilon=-1.0, target_delta=1e-5), r"target_epsilon must be a number > 0"),
        (dict(noise_generator=torch.Generator(), secure_mode=True), r"secure_mode=True.*do not pass noise_generator"),
    ],
)
def test_bad_arguments(kwargs, message):
    secure = kwargs.pop("secure_mode", False)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dict(module=model, optimizer=opt, data_loader=make_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PrivacyEngine(accountant="rdp", secure_mode=secure).make_private(**args)


def test_optimizer_with_foreign_parameters():
    model = make_model()
    other = nn.Linear(2, 2).to(DT)
    opt = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer holds 2 parameter\(s\) that are not parameters of the module.*"
                                         r"Fix: build the optimizer from module.parameters\(\)"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=make_loader(), noise_multiplier=1.0,
                                     max_grad_norm=1.0)


def test_model_in_eval_mode():
    model = make_model().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"module is in eval mode.*Fix: call model.train\(\)"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=make_loader(), noise_multiplier=1.0,
                                     max_grad_norm=1.0)


def test_unsupported_modes():
    with pytest.raises(NotImplementedError, match="ghost_fsdp"):
        make_private(grad_sample_mode="ghost_fsdp")
    with pytest.raises(NotImplementedError, match="wrap_model=False"):
        make_private(wrap_model=False)
    with pytest.raises(ValueError, match="unknown accountant='moments'"):
        PrivacyEngine(accountant="moments")
    make_private(grad_sample_mode="functorch")  # Opacus' modes are accepted


def test_bad_delta_and_sample_rate():
    engine, _, dp_opt, _ = make_private()
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match=r"delta must be in the open interval \(0, 1\)"):
            engine.get_epsilon(delta=delta)
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\].*Fix"):
            engine.set_sample_rate(q, optimizer=dp_opt)
    with pytest.raises(ValueError, match="data_loader yields no batches"):
        make_private(loader=DataLoader(TensorDataset(torch.zeros(0, 6)), batch_size=4))


def test_make_private_with_epsilon():
    model, loader = make_model(), make_loader()
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m, o, dl = engine.make_private_with_epsilon(module=model, optimizer=opt, data_loader=loader, target_epsilon=2.0,
                                                target_delta=1e-5, epochs=3, max_grad_norm=1.0)
    for _ in range(3):
        for x, y in dl:
            train_step(m, o, x, y)
    assert engine.steps == 12
    assert 2.0 - 0.011 <= engine.get_epsilon(1e-5) <= 2.0
    with pytest.raises(ValueError, match=r"target_delta must be in the open interval"):
        PrivacyEngine().make_private_with_epsilon(module=model, optimizer=opt, data_loader=loader, target_epsilon=2.0,
                                                  target_delta=0.0, epochs=3, max_grad_norm=1.0)


# --- privacy budget ------------------------------------------------------------------------


def expected_allowed_steps(accountant: str, sigma: float, q: float, eps: float, delta: float) -> int:
    acc = create_accountant(accountant)
    n = 0
    while True:
        acc.step(noise_multiplier=sigma, sample_rate=q)
        if acc.get_epsilon(delta) > eps:
            return n
        n += 1


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_guard_stops_before_exceeding(accountant):
    sigma, q, eps, delta = 2.0, 0.25, 3.0, 1e-5
    allowed = expected_allowed_steps(accountant, sigma, q, eps, delta)
    assert 5 < allowed < 40
    engine, dp_model, dp_opt, dp_loader = make_private(accountant=accountant, noise_multiplier=sigma,
                                                       momentum=0.9, target_epsilon=eps, target_delta=delta,
                                                       noise_generator=torch.Generator().manual_seed(0))
    assert engine.privacy_budget == (eps, delta)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        for _ in range(100):
            for x, y in dp_loader:
                dp_opt.zero_grad()
                nn.functional.cross_entropy(dp_model(x), y).backward()
                params = [p.detach().clone() for p in dp_model.parameters()]
                state = copy.deepcopy(dp_opt.state_dict())
                history = list(engine.accountant.history)
                gen_state = dp_opt.generator.get_state()
                dp_opt.step()
    assert engine.steps == allowed
    assert engine.get_epsilon(delta) <= eps
    assert "would bring epsilon" in str(info.value) and "not applied" in str(info.value)
    # the refused step changed nothing
    assert all(torch.equal(p, b) for p, b in zip(dp_model.parameters(), params))
    after = dp_opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert engine.accountant.history == history
    assert torch.equal(dp_opt.generator.get_state(), gen_state)


def test_budget_with_epsilon_planning_and_enforce():
    model, loader = make_model(), make_loader()
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m, o, dl = engine.make_private_with_epsilon(module=model, optimizer=opt, data_loader=loader, target_epsilon=1.0,
                                                target_delta=1e-5, epochs=2, max_grad_norm=1.0, enforce_budget=True)
    assert engine.privacy_budget == (1.0, 1e-5)
    steps = 0
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(10):
            for x, y in dl:
                train_step(m, o, x, y)
                steps += 1
    assert steps >= 8 and engine.get_epsilon(1e-5) <= 1.0
    engine.set_privacy_budget(None)
    o.zero_grad()
    x, y = next(iter(dl))
    train_step(m, o, x, y)  # no budget: trains on
    assert engine.get_epsilon(1e-5) > 1.0


def test_zero_noise_exceeds_any_budget():
    engine, dp_model, dp_opt, dp_loader = make_private(noise_multiplier=0.0, target_epsilon=100.0, target_delta=1e-5)
    x, y = next(iter(dp_loader))
    with pytest.raises(PrivacyBudgetExceeded, match="inf"):
        train_step(dp_model, dp_opt, x, y)
    assert engine.steps == 0


def test_opacus_ghost_mode_returns_criterion_and_trains_as_bk():
    """Opacus' fast-gradient-clipping call (4 return values, criterion) runs book-keeping:
    the same weights as grad_sample_mode="bk" with the same seeds."""
    results = []
    for mode in ("ghost", "bk"):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine(accountant="rdp")
        kw = dict(module=model, optimizer=opt, data_loader=make_loader(), noise_multiplier=1.0, max_grad_norm=0.5,
                  noise_generator=torch.Generator().manual_seed(3), grad_sample_mode=mode)
        torch.manual_seed(4)  # the Poisson sampler's draws
        if mode == "ghost":
            dp_model, dp_opt, criterion, loader = engine.make_private(criterion=nn.CrossEntropyLoss(), **kw)
        else:
            (dp_model, dp_opt, loader), criterion = engine.make_private(**kw), nn.CrossEntropyLoss()
        assert dp_model.recorder.mode == "bk"
        for x, y in loader:
            dp_opt.zero_grad()
            criterion(dp_model(x), y).backward()
            dp_opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = make_model()
    kw = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=make_loader(),
              noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    with pytest.raises(ValueError, match=r"reduction='sum' but loss_reduction='mean'"):
        PrivacyEngine().make_private(criterion=nn.CrossEntropyLoss(reduction="sum"), **kw)
    out = PrivacyEngine().make_private(**kw)  # Opacus' default criterion: cross-entropy
    assert len(out) == 4 and isinstance(out[2], nn.CrossEntropyLoss) and out[2].reduction == "mean"


@pytest.mark.parametrize("mode", ["bk", "materialize"])
def test_parameter_unfrozen_after_make_private_is_refused_not_silently_skipped(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = fxdp.PrivacyEngine()
    dp, opt, dl = engine.make_private(module=model, optimizer=opt, data_loader=torch.utils.data.DataLoader(data, 8),
                                      noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                      poisson_sampling=False, verify_first_step=False)
    model[0].requires_grad_(True)  # unfrozen later (after the first steps): no capture op serves it
    before = model[0].weight.detach().clone()
    x, y = next(iter(dl))
    nn.functional.cross_entropy(dp(x), y).backward()
    with pytest.raises((fxdp.PerSampleGradientError, ValueError), match="frozen .* unfrozen later"):
        opt.step()
    assert torch.equal(model[0].weight, before)


def test_bk_clips_over_the_optimizers_parameters_as_materialize_does():
    """A trainable parameter outside the optimizer does not enter the clip norm in
    either mode: both give the same clipped update."""
    results = []
    for mode in ("bk", "materialize"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        opt = torch.optim.SGD(model[2].parameters(), lr=0.5)  # only the head
        engine = fxdp.PrivacyEngine()
        dp, opt, dl = engine.make_private(module=model, optimizer=opt,
                                          data_loader=torch.utils.data.DataLoader(data, 8), noise_multiplier=0.0,
                                          max_grad_norm=0.05, grad_sample_mode=mode, poisson_sampling=False)
        x, y = next(iter(dl))
        nn.functional.cross_entropy(dp(x), y).backward()
        opt.step()
        results.append(model[2].weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


class EmbeddingThenTranspose(nn.Module):
    """Opacus' imdb.py: the embedding's output is transposed, so its gradient arrives
    non-contiguous."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(7, 2)

    def forward(self, x):
        return self.fc(self.emb(x).transpose(1, 2)).mean(1)


def test_embedding_followed_by_a_transpose_trains_in_book_keeping():
    torch.manual_seed(3)
    x = torch.randint(0, 20, (16, 7))
    x[:, 1] = x[:, 0]  # repeated tokens within a sample: the grouped-norm path
    data = TensorDataset(x, torch.randint(0, 2, (16,)))
    model = EmbeddingThenTranspose()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp, opt, dl = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=DataLoader(data, 8),
                                               noise_multiplier=1.0, max_grad_norm=1.0)
    before = model.emb.weight.detach().clone()
    for xb, yb in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(dp(xb), yb).backward()
        opt.step()
    assert not torch.equal(model.emb.weight, before)


def test_delta_at_least_one_over_n_is_warned():
    data = TensorDataset(torch.randn(50, 4), torch.randint(0, 2, (50,)))
    model = nn.Linear(4, 2)
    engine = PrivacyEngine()
    with pytest.warns(UserWarning, match=r"delta=0.05 is at least 1/N = 1/50"):
        engine.make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(data, 10), target_epsilon=3.0, target_delta=0.05,
                                         epochs=1, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="at least 1/N"):
        engine.get_epsilon(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.get_epsilon(1e-5)  # well below 1/N: no warning


def test_make_private_twice_on_the_same_model_is_warned():
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = nn.Linear(4, 2)
    kw = dict(data_loader=DataLoader(data, 8), noise_multiplier=1.0, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    with pytest.warns(UserWarning, match="make_private was already called on this model"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def test_a_weighted_sampler_replaced_by_poisson_sampling_is_warned():
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = nn.Linear(4, 2)
    sampler = torch.utils.data.WeightedRandomSampler(torch.ones(16), num_samples=16)
    with pytest.warns(UserWarning, match="WeightedRandomSampler is replaced by Poisson sampling"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(data, 8, sampler=sampler), noise_multiplier=1.0,
                                     max_grad_norm=1.0)
    model2 = nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a plain shuffling loader: nothing is lost
        PrivacyEngine().make_private(module=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=0.1),
                                     data_loader=DataLoader(data, 8, shuffle=True), noise_multiplier=1.0,
                                     max_grad_norm=1.0)


def test_an_accountant_registered_like_opacus_is_usable_by_the_engine():
    """register_accountant (Opacus' API) adds to the one registry the engine reads."""
    from fxdp.accountants import RDPAccountant, register_accountant
    from fxdp.accountants.registry import ACCOUNTANTS

    class MyRDP(RDPAccountant):
        pass

    register_accountant("my-rdp", MyRDP)
    try:
        engine = fxdp.PrivacyEngine(accountant="my-rdp")
        assert isinstance(engine.accountant, MyRDP)
        engine.accountant.step(noise_multiplier=1.0, sample_rate=0.1)
        assert engine.get_epsilon(1e-5) > 0
    finally:
        ACCOUNTANTS.pop("my-rdp", None)
    with pytest.raises(ValueError, match="register_accountant"):
        fxdp.PrivacyEngine(accountant="my-rdp")
