"""Opacus tutorial intro_to_advanced_features: make_private's three objects,
GradSampleModule, forbid_accumulation_hook, DPDataLoader.from_data_loader, DPOptimizer
built by hand, RDPAccountant + get_optimizer_hook_fn, a DPOptimizer subclass with Laplace
noise (_check_processed_flag, _mark_as_processed)."""
import torch
from torch import nn
from torch.distributions.laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.privacy_engine import forbid_accumulation_hook


class SampleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class LaplaceDPOptimizer(DPOptimizer):
    def add_noise(self):
        laplace = Laplace(loc=0, scale=self.noise_multiplier * self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = p.summed_grad + laplace.sample(p.summed_grad.shape)
            _mark_as_processed(p.summed_grad)


def main():
    torch.manual_seed(0)
    DATASET = TensorDataset(torch.randn(100, 16), torch.randint(0, 2, (100,)))
    out = {}

    privacy_engine = PrivacyEngine()
    model = SampleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data_loader = DataLoader(DATASET, batch_size=10)
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader, max_grad_norm=1.0, noise_multiplier=1.0,
    )
    for x, y in data_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    out["epsilon"] = privacy_engine.get_epsilon(1e-5)

    model = SampleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data_loader = DataLoader(DATASET, batch_size=10)
    model = GradSampleModule(model)
    y = model(torch.randn(10, 16))
    y.sum().backward()
    grad, grad_sample = model.fc1.weight.grad, model.fc1.weight.grad_sample
    assert grad_sample.shape == (10,) + grad.shape
    # the tutorial prints whether grad_sample.mean(0) equals grad: with a summed output (y.sum()) it does
    # not, in either library (grad_sample rows are scaled by the batch size for the default mean reduction)
    out["grad_sample_mean_equals_grad"] = float(torch.allclose(grad, grad_sample.mean(dim=0)))
    model.zero_grad()

    model.register_forward_pre_hook(forbid_accumulation_hook)
    model(torch.randn(10, 16)).sum().backward()
    try:
        model(torch.randn(10, 16)).sum().backward()
        raise AssertionError("a second backward before the step must fail")
    except ValueError:
        pass
    model.zero_grad()

    dp_data_loader = DPDataLoader.from_data_loader(data_loader, distributed=False)
    assert dp_data_loader.dataset == data_loader.dataset and len(dp_data_loader) == len(data_loader)
    batch_sizes = [len(x) for x, _ in dp_data_loader]
    assert len(batch_sizes) == len(data_loader)
    data_loader = dp_data_loader

    sample_rate = 1 / len(data_loader)
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)
    optimizer = DPOptimizer(optimizer=optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=expected_batch_size)
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    for x, y in data_loader:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    out["epsilon_manual_rdp"] = accountant.get_epsilon(delta=1e-5)

    laplace = LaplaceDPOptimizer(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=expected_batch_size)
    for x, y in data_loader:
        nn.functional.cross_entropy(model(x), y).backward()
        laplace.step()
        laplace.zero_grad()
    return out
