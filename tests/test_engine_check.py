"""make_private runs fxdp.check and refuses models that mix samples, unless overridden."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from models import Centered


def _setup(model):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loader = DataLoader(data, batch_size=8)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), loader


def test_make_private_refuses_a_mixing_model_with_the_source_line():
    model, opt, loader = _setup(Centered())
    with pytest.raises(fxdp.UnsupportedModelError, match=r"x - x\.mean\(0\)|mean"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                          noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_make_private_checks_the_example_inputs_as_given(form):
    """``example_inputs`` as a tensor (one input, not its rows), a tuple or a dict of keyword
    inputs: the check runs on them and refuses the mixing model, without a "could not run"."""
    model, opt, loader = _setup(Centered())
    x = torch.randn(8, 4)
    example = {"tensor": x, "tuple": (x,), "dict": {"x": x}}[form]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a check that could not run warns
        with pytest.raises(fxdp.UnsupportedModelError, match="mean"):
            fxdp.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                              noise_multiplier=1.0, max_grad_norm=1.0, example_inputs=example)


def test_make_private_override_warns_and_proceeds():
    model, opt, loader = _setup(Centered())
    with pytest.warns(UserWarning, match="allow_unsafe_model"):
        dp, dp_opt, _ = fxdp.PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            allow_unsafe_model=True, verify_first_step=False,
        )
    assert isinstance(dp, fxdp.DPModule)


def test_clean_model_passes_and_report_is_kept():
    model, opt, loader = _setup(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    engine = fxdp.PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "check did not run" warning
        engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                            max_grad_norm=1.0)
    assert engine.compatibility_report is not None and engine.compatibility_report.ok


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, mask):
        return self.fc(x * (mask - mask.mean(0)))  # mixes through the second input


def test_make_private_checks_every_input_the_model_takes():
    """A batch (x, mask, y) feeds forward(x, mask): the check gets both inputs."""
    data = TensorDataset(torch.randn(16, 4), torch.rand(16, 4), torch.randint(0, 2, (16,)))
    model = TwoInputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fxdp.UnsupportedModelError, match="reduces over dim 0"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8),
                                          noise_multiplier=1.0, max_grad_norm=1.0)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.emb(input_ids)
        return (h * attention_mask[..., None]).sum(1) / attention_mask.float().mean()  # batch-wide mean


def test_make_private_checks_dict_batches_as_keywords():
    rows = [{"input_ids": torch.randint(0, 10, (5,)), "attention_mask": torch.ones(5), "labels": torch.tensor(1)}
            for _ in range(8)]
    model = DictModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fxdp.UnsupportedModelError, match="computed from the whole batch"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=DataLoader(rows, batch_size=4),
                                          noise_multiplier=1.0, max_grad_norm=1.0)
