"""Backward passes that do not reach the parameters record nothing: an input gradient through the
DP model (adversarial examples, saliency), ``loss.backward(inputs=[x])``. Before, such a pass was
recorded as a second backward pass of the step and the step was refused as gradient accumulation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdp

DT = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("mode", ["materialize", "bk"])
def test_adversarial_training_steps_on_the_adversarial_loss(mode):
    """FGSM: the input gradient of the batch's loss through the DP model, then a DP step on the
    perturbed batch. With sigma = 0 and a bound no gradient reaches, the step is the plain
    gradient step of the adversarial loss."""
    m = _model()
    plain = _model()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    dp, opt, _ = fxdp.PrivacyEngine().make_private(
        module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=1e6, grad_sample_mode=mode, poisson_sampling=False)
    opt.zero_grad()
    xr = x.clone().requires_grad_(True)
    gx, = torch.autograd.grad(nn.functional.cross_entropy(dp(xr), y), xr)
    ref, = torch.autograd.grad(nn.functional.cross_entropy(plain(xr), y), xr)
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-15)
    xa = (x + 0.1 * gx.sign()).detach()
    nn.functional.cross_entropy(dp(xa), y).backward()
    opt.step()
    nn.functional.cross_entropy(plain(xa), y).backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad, rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_are_those_of_the_training_pass_only():
    m = _model()
    dp = fxdp.privatize(m)
    x, y = _data(6)
    xr = x.clone().requires_grad_(True)
    torch.autograd.grad(nn.functional.cross_entropy(dp(xr), y), xr)  # an input gradient: nothing recorded
    nn.functional.cross_entropy(dp(xr), y).backward(inputs=[xr])  # nor here
    assert all(getattr(p, "grad_sample", None) is None for p in m.parameters())
    xa = (x + 0.1 * xr.grad.sign()).detach()
    nn.functional.cross_entropy(dp(xa), y).backward()
    for i in range(len(x)):
        gi = torch.autograd.grad(nn.functional.cross_entropy(m(xa[i:i + 1]), y[i:i + 1]), list(m.parameters()))
        for p, g in zip(m.parameters(), gi):
            assert not isinstance(p.grad_sample, list)  # one backward pass recorded
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-10, atol=1e-13)


def test_autograd_grad_of_the_parameters_still_records():
    m = _model()
    dp = fxdp.privatize(m, loss_reduction="sum")
    x, y = _data(4)
    params = list(m.parameters())
    summed = torch.autograd.grad(nn.functional.cross_entropy(dp(x), y, reduction="sum"), params)
    for p, s in zip(params, summed):
        assert p.grad_sample.shape == (4,) + p.shape
        torch.testing.assert_close(p.grad_sample.sum(0), s, rtol=1e-10, atol=1e-13)
