"""fxdp.grad_sample: Opacus' GradSampleModule and register_grad_sampler."""
from __future__ import annotations

import torch
from torch import nn

import fxdp
from fxdp.grad_sample import GradSampleModule, register_grad_sampler
from oracle import assert_grad_samples_match, batch_of_one_grads


class ScaleShift(nn.Module):
    """A custom layer with an Opacus-style grad sampler."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift


@register_grad_sampler(ScaleShift)
def compute_scale_shift_grad_sample(layer, activations, backprops):
    a = activations[0]
    dims = tuple(range(1, a.dim() - 1))
    return {layer.scale: (a * backprops).sum(dims), layer.shift: backprops.sum(dims)}


def test_grad_sample_module_is_privatize(f64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert isinstance(gsm, GradSampleModule) and isinstance(gsm, fxdp.DPModule) and gsm._module is model
    assert not isinstance(model, GradSampleModule)
    x = torch.randn(5, 4)
    gsm(x).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))


def test_registered_grad_sampler_serves_the_layer_exactly(f64):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), ScaleShift(4), nn.Linear(4, 2))
    dp = fxdp.privatize(model, loss_reduction="sum")
    assert [r["rule"] for r in dp.capture_table()][1] == "opacus grad sampler (compute_scale_shift_grad_sample)"
    x = torch.randn(6, 3, 4)
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))
