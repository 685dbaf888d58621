"""fxdp.validators: Opacus' ModuleValidator at Opacus' path, fixing with privatize's rewrites."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdp
from fxdp.validators import ModuleValidator, register_module_fixer, register_module_validator
from fxdp.validators.errors import (
    IllegalModuleConfigurationError,
    NotYetSupportedModuleError,
    ShouldReplaceModuleError,
    UnsupportedModuleError,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.frozen_bn = nn.BatchNorm2d(8).requires_grad_(False)  # Opacus' validator misses this one
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = self.frozen_bn(torch.relu(self.bn(self.conv(x))))
        y, _ = self.lstm(h.flatten(2).transpose(1, 2))
        return self.fc(y[:, -1])


def test_validate_lists_what_fix_replaces_and_fix_makes_it_valid():
    torch.manual_seed(0)
    model = Net()
    errors = ModuleValidator.validate(model, strict=False)
    assert all(isinstance(e, ShouldReplaceModuleError) for e in errors)
    assert {str(e).split(" at ")[1].split("'")[1] for e in errors} == {"bn", "frozen_bn", "lstm"}
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(model, strict=True)
    assert not ModuleValidator.is_valid(model)
    fixed = ModuleValidator.fix(model)
    assert ModuleValidator.validate(fixed, strict=False) == [] and ModuleValidator.is_valid(fixed)
    assert type(model.bn) is nn.BatchNorm2d  # the model is untouched
    # the fixed model is what privatize would have trained: same outputs
    x = torch.randn(4, 3, 6, 6)
    dp = fxdp.privatize(model)
    torch.testing.assert_close(fixed(x), dp(x))
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 2, (4,)))
    opt = torch.optim.SGD(fixed.parameters(), lr=0.1)
    m, opt, dl = fxdp.PrivacyEngine().make_private(module=fixed, optimizer=opt,
                                                   data_loader=torch.utils.data.DataLoader(data, 2),
                                                   noise_multiplier=1.0, max_grad_norm=1.0)
    for xb, yb in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()


def test_eval_mode_and_unsupported_subclasses_are_reported():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(4)).eval()
    kinds = {type(e) for e in ModuleValidator.validate(model)}
    assert kinds == {IllegalModuleConfigurationError, NotYetSupportedModuleError}


def test_registered_validators_and_fixers_run():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    @register_module_validator(Custom)
    def _validate(module):
        return [ShouldReplaceModuleError("Custom must be replaced")]

    @register_module_fixer(Custom)
    def _fix(module, **kwargs):
        return nn.Identity()

    try:
        model = nn.Sequential(nn.Linear(3, 3), Custom())
        assert [str(e) for e in ModuleValidator.validate(model)] == ["Custom must be replaced"]
        assert isinstance(ModuleValidator.fix(model)[1], nn.Identity)
    finally:
        ModuleValidator.VALIDATORS.pop(Custom)
        ModuleValidator.FIXERS.pop(Custom)
