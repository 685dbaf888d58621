"""Tests of PrivacyEngine.save_checkpoint / load_checkpoint: a resumed run equals an
uninterrupted one, and checkpoints load with torch.load(weights_only=True)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxdp import PrivacyEngine
from fxdp.schedulers import StepGradClip, StepNoise

DT = torch.float64
EPOCHS, STEPS_PER_EPOCH = 3, 5


def build(*, accountant="prv", noise_generator=True, clipping="flat", optimizer="sgd", budget=None):
    """A fresh run: model, optimizer, loader, engine and schedulers, all seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(60, 6, generator=g, dtype=DT), torch.randint(0, 3, (60,), generator=g))
    loader = DataLoader(ds, batch_size=12, generator=torch.Generator().manual_seed(2))  # -> sampler generator
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    engine = PrivacyEngine(accountant=accountant)
    extra = {}
    if clipping == "adaptive":
        extra = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
                     min_clipbound=0.01, unclipped_num_std=5.0)
    if budget:
        extra.update(target_epsilon=budget[0], target_delta=budget[1])
    m, o, dl = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.2, max_grad_norm=0.5,
        clipping=clipping, noise_generator=torch.Generator().manual_seed(3) if noise_generator else None, **extra,
    )
    noise = StepNoise(o, step_size=1, gamma=0.9)
    clip = StepGradClip(o, step_size=2, gamma=1.5) if clipping != "adaptive" else None
    return dict(engine=engine, model=model, dp_model=m, opt=o, loader=dl, noise=noise, clip=clip)


def train(run, *, start_epoch=0, stop_after=None, path=None):
    """Train to the end, or save a checkpoint after ``stop_after`` steps and stop."""
    steps = run["engine"].steps
    for epoch in range(start_epoch, EPOCHS):
        for i, (x, y) in enumerate(run["loader"]):
            run["opt"].zero_grad()
            nn.functional.cross_entropy(run["dp_model"](x), y).backward()
            run["opt"].step()
            steps += 1
            if steps == stop_after and i + 1 < len(run["loader"]):
                save(run, path, epoch, finished_epoch=False)
                return
        run["noise"].step()
        if run["clip"] is not None:
            run["clip"].step()
        if steps == stop_after:
            save(run, path, epoch, finished_epoch=True)
            return


def save(run, path, epoch, finished_epoch):
    run["engine"].save_checkpoint(
        path=path, module=run["dp_model"], optimizer=run["opt"], noise_scheduler=run["noise"],
        grad_clip_scheduler=run["clip"], checkpoint_dict={"epoch": epoch + int(finished_epoch)},
    )


def resume(path, **kwargs):
    run = build(**kwargs)
    ckpt = run["engine"].load_checkpoint(
        path=path, module=run["dp_model"], optimizer=run["opt"], noise_scheduler=run["noise"],
        grad_clip_scheduler=run["clip"],
    )
    train(run, start_epoch=ckpt["epoch"])
    return run


def assert_same_run(a, b):
    assert a["engine"].accountant.history == b["engine"].accountant.history
    assert a["engine"].get_epsilon(1e-5) == b["engine"].get_epsilon(1e-5)
    assert a["engine"].steps == b["engine"].steps == EPOCHS * STEPS_PER_EPOCH
    for (k, v), (k2, v2) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=1e-12)
    assert a["opt"].noise_multiplier == b["opt"].noise_multiplier
    assert a["opt"].max_grad_norm == b["opt"].max_grad_norm


@pytest.mark.parametrize(
    "kwargs, stop_after",
    [
        (dict(), 7),  # mid-epoch: Poisson sampler and noise generator resume exactly
        (dict(clipping="adaptive", optimizer="adam", accountant="rdp"), 8),  # DP optimizer state (clip bound)
        (dict(noise_generator=False, accountant="rdp"), 10),  # global RNG: at an epoch boundary
    ],
)
def test_resume_equals_uninterrupted(tmp_path, kwargs, stop_after):
    full = build(**kwargs)
    train(full)
    path = tmp_path / "ckpt.pt"
    stopped = build(**kwargs)
    train(stopped, stop_after=stop_after, path=path)
    assert stopped["engine"].steps == stop_after
    resumed = resume(path, **kwargs)
    assert_same_run(full, resumed)
    # the history is heterogeneous (noise schedule): the resumed accountant holds all of it
    assert len(resumed["engine"].accountant.history) == EPOCHS


def test_checkpoint_contents_are_plain(tmp_path):
    run = build(clipping="adaptive", optimizer="adam")
    train(run, stop_after=6, path=tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)  # no arbitrary unpickling needed
    assert list(ckpt["module_state_dict"]) == list(run["model"].state_dict())  # plain model's keys
    assert ckpt["privacy_accountant_state_dict"]["history"]
    assert "max_grad_norm" in ckpt["optimizer_state_dict"]["dp_state"]
    fx = ckpt["fxdp"]
    assert fx["accountant"] == "prv" and fx["steps"] == 6
    assert fx["optimizer"]["noise_multiplier"] == run["opt"].noise_multiplier
    assert fx["optimizer"]["max_grad_norm"] == run["opt"].max_grad_norm
    assert fx["sample_rate"] == pytest.approx(0.2)
    assert fx["data_loader_state"]["poisson_sampler"]["num_consumed"] == 1
    assert isinstance(fx["optimizer"]["noise_generator_state"], torch.Tensor)
    assert ckpt["noise_scheduler_state_dict"]["last_epoch"] == 1


def test_restores_configuration_and_budget(tmp_path):
    run = build(accountant="rdp", budget=(50.0, 1e-5))
    train(run, stop_after=5, path=tmp_path / "c.pt")
    fresh = build(accountant="rdp")
    assert fresh["opt"].noise_multiplier != run["opt"].noise_multiplier
    fresh["engine"].load_checkpoint(path=tmp_path / "c.pt", module=fresh["dp_model"], optimizer=fresh["opt"])
    assert fresh["opt"].noise_multiplier == run["opt"].noise_multiplier  # scheduled sigma
    assert fresh["opt"].max_grad_norm == run["opt"].max_grad_norm  # scheduled C
    assert fresh["engine"].privacy_budget == (50.0, 1e-5)
    assert fresh["engine"].accountant.history == run["engine"].accountant.history


def test_changed_sample_rate_is_restored(tmp_path):
    run = build(accountant="rdp")
    run["engine"].set_sample_rate(0.4, optimizer=run["opt"])
    train(run, stop_after=3, path=tmp_path / "c.pt")
    fresh = build(accountant="rdp")
    fresh["engine"].load_checkpoint(path=tmp_path / "c.pt", module=fresh["dp_model"], optimizer=fresh["opt"])
    assert fresh["loader"].sample_rate == 0.4 and fresh["opt"].expected_batch_size == pytest.approx(24)
    assert fresh["engine"].accountant.history == [(1.2, 0.4, 2), (1.2 * 0.9, 0.4, 1)]  # 2 steps per epoch now


def test_accountant_mismatch_is_refused(tmp_path):
    run = build(accountant="rdp")
    train(run, stop_after=2, path=tmp_path / "c.pt")
    other = build(accountant="prv")
    with pytest.raises(ValueError, match=r"saved with accountant='rdp'.*Fix: PrivacyEngine\(accountant='rdp'\)"):
        other["engine"].load_checkpoint(path=tmp_path / "c.pt", module=other["dp_model"], optimizer=other["opt"])


def test_never_unpickles(tmp_path):
    run = build(accountant="rdp")
    with pytest.raises(ValueError, match="weights_only=True"):
        run["engine"].load_checkpoint(path=tmp_path / "x.pt", module=run["dp_model"],
                                      torch_load_kwargs={"weights_only": False})
    torch.save({"module_state_dict": {}, "evil": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        run["engine"].load_checkpoint(path=tmp_path / "evil.pt", module=run["dp_model"])


def test_file_object_and_plain_module(tmp_path):
    run = build(accountant="rdp")
    train(run, stop_after=2, path=tmp_path / "unused.pt")
    buf = io.BytesIO()
    run["engine"].save_checkpoint(path=buf, module=run["model"], optimizer=run["opt"])
    buf.seek(0)
    fresh = build(accountant="rdp")
    fresh["engine"].load_checkpoint(path=buf, module=fresh["model"], optimizer=fresh["opt"])
    for v, w in zip(run["model"].state_dict().values(), fresh["model"].state_dict().values()):
        assert torch.equal(v, w)


def test_loads_an_opacus_checkpoint(tmp_path):
    """A checkpoint written by Opacus (plain tensors, '_module.' keys) loads with weights_only=True."""
    opacus = pytest.importorskip("opacus")
    import warnings

    run = build(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = opacus.PrivacyEngine(accountant="rdp")
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        m, o, dl = theirs.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       data_loader=DataLoader(run["loader"].dataset, batch_size=12),
                                       noise_multiplier=1.0, max_grad_norm=1.0)
        for x, y in dl:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        theirs.save_checkpoint(path=tmp_path / "opacus.pt", module=m, optimizer=o)
    run["engine"].load_checkpoint(path=tmp_path / "opacus.pt", module=run["dp_model"], optimizer=run["opt"])
    for v, w in zip(model.state_dict().values(), run["model"].state_dict().values()):
        assert torch.equal(v, w)
    assert run["engine"].accountant.history == theirs.accountant.history
