"""fxdp.lightning.DPCallback: DP-SGD inside Lightning's fit loop (CPU, tiny model)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import fxdp  # noqa: E402
from fxdp.data import DPDataLoader  # noqa: E402
from fxdp.lightning import DPCallback  # noqa: E402
from fxdp.optim import DPOptimizer  # noqa: E402

N, BATCH = 64, 16  # 4 batches per epoch: sample rate q = 1/4


class Lit(L.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.loss = nn.CrossEntropyLoss()
        self.automatic_optimization = not manual
        self.seen: list = []  # (model type, optimizer type) inside training_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((type(self.model), type(self.optimizers().optimizer)))
        loss = self.loss(self.model(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.5)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))
    return DataLoader(ds, batch_size=BATCH, shuffle=True)


def fit(lit, callback, **trainer_kwargs):
    kwargs = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  callbacks=callback if isinstance(callback, list) else [callback])
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's num_workers hints
        trainer.fit(lit, loader())
    return trainer


def make_callback(**kwargs) -> DPCallback:
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("noise_generator", torch.Generator().manual_seed(2))
    return DPCallback(max_grad_norm=1.0, delta=1e-5, accountant="rdp", **kwargs)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_fit_is_private_and_accounted(manual):
    torch.manual_seed(3)  # Poisson sampling draws from the global generator
    lit = Lit(manual=manual)
    model = lit.model
    before = [p.detach().clone() for p in model.parameters()]
    dp = make_callback()
    trainer = fit(lit, dp)

    # every training step ran through the DPModule and the DPOptimizer
    assert lit.seen and all(m is fxdp.DPModule or issubclass(m, fxdp.DPModule) for m, _ in lit.seen)
    assert all(issubclass(o, DPOptimizer) for _, o in lit.seen)
    assert isinstance(dp.dp_data_loader, DPDataLoader)
    # one accountant step per optimizer step, 2 epochs of len(loader) = 4 batches each
    assert trainer.global_step == 8 and dp.engine.steps == 8
    expected = fxdp.accountants.RDPAccountant()
    expected.step(noise_multiplier=1.0, sample_rate=BATCH / N)
    expected.history = [(1.0, BATCH / N, 8)]
    eps = expected.get_epsilon(1e-5)
    assert [h[:2] for h in dp.history] == [(0, 4), (1, 8)]
    assert dp.history[-1][2] == pytest.approx(eps, rel=1e-9) and eps > 0
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(eps, rel=1e-6)
    # the original model is back on the LightningModule and holds the trained weights
    assert lit.model is model
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad_sample is None for p in model.parameters() if hasattr(p, "grad_sample"))


def test_noise_free_step_equals_clipped_mean():
    """sigma = 0: the update Lightning applies is exactly the mean of per-sample clipped
    gradients over the expected batch size (the DP-SGD step, computed by hand)."""
    torch.manual_seed(3)
    lit = Lit()
    init = [p.detach().clone() for p in lit.model.parameters()]
    batches = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append([t.clone() for t in batch])

    dp = make_callback(noise_multiplier=0.0, verify_first_step=False)
    fit(lit, [dp, Record()], max_epochs=1, max_steps=1)
    assert dp.engine.steps == 1 and len(batches) == 1
    x, y = batches[0]
    ref = Lit().model  # same seed: same initial weights
    for p, q in zip(ref.parameters(), init):
        assert torch.equal(p, q)
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(len(x)):  # each sample alone, clipped to norm 1
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        g = [p.grad.clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        for t, gi in zip(total, g):
            t += gi * min(1.0, 1.0 / (float(norm) + 1e-6))
    for p, p0, t in zip(lit.model.parameters(), init, total):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * t / BATCH, rtol=1e-5, atol=1e-6)


def test_budget_stops_training():
    torch.manual_seed(3)
    lit = Lit()
    dp = make_callback(target_epsilon=5.0)
    trainer = fit(lit, dp, max_epochs=50)
    allowed = dp.engine.steps
    assert 0 < allowed < 200 and trainer.global_step == allowed  # stopped early, every step accounted
    assert dp.engine.get_epsilon(1e-5) <= 5.0
    # one more step at the same (sigma, q) would exceed the budget
    assert dp.engine._epsilon_after(1, 1.0, BATCH / N) > 5.0


def test_min_epochs_past_budget_raises():
    lit = Lit()
    dp = make_callback(target_epsilon=1.0)
    with pytest.raises(fxdp.PrivacyBudgetExceeded):
        fit(lit, dp, max_epochs=100, min_epochs=100)


@pytest.mark.parametrize("kwargs, match", [
    (dict(accumulate_grad_batches=2), "accumulate_grad_batches=2 is refused"),
    (dict(gradient_clip_val=1.0), "gradient_clip_val=1.0 is refused"),
    (dict(precision="bf16-mixed"), "mixed precision"),
])
def test_unsafe_trainer_settings_are_refused(kwargs, match):
    lit = Lit()
    before = [p.detach().clone() for p in lit.model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(lit, make_callback(), **kwargs)
    assert all(torch.equal(b, p) for b, p in zip(before, lit.model.parameters()))


def test_ambiguous_model_needs_a_name():
    lit = Lit()
    lit.head = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="module='<attribute name>'"):
        fit(lit, make_callback())
    with pytest.raises(AttributeError, match="no nn.Module attribute 'net'"):
        fit(Lit(), make_callback(module="net"))


def test_dp_lightning_data_module_poisson_samples_the_training_loader():
    from fxdp.data import DPDataLoader
    from fxdp.lightning import DPLightningDataModule

    ds = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(ds, batch_size=8)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(ds, batch_size=8)

    dm = DPLightningDataModule(DM(), generator=torch.Generator().manual_seed(0))
    train = dm.train_dataloader()
    assert isinstance(train, DPDataLoader) and train.sample_rate == pytest.approx(8 / 40)
    assert not isinstance(dm.val_dataloader(), DPDataLoader)
