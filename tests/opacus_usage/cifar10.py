"""Opacus examples/cifar10.py: flat and per-layer clipping, grad_sample_mode "hooks" and
"no_op" (per-sample gradients computed by the user with make_functional + vmap),
accountant.get_epsilon, saving model and optimizer state."""
import io

import torch
import torch.nn as nn
from torch.func import grad_and_value, vmap
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP  # noqa: F401
from opacus.grad_sample.functorch import make_functional


def convnet(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(start_dim=1, end_dim=-1), nn.Linear(128, num_classes, bias=True),
    )


def train(model, train_loader, optimizer, grad_sample_mode):
    model.train()
    criterion = nn.CrossEntropyLoss()
    if grad_sample_mode == "no_op":
        fmodel, _fparams = make_functional(model)

        def compute_loss_stateless_model(params, sample, target):
            predictions = fmodel(params, sample.unsqueeze(0))
            return criterion(predictions, target.unsqueeze(0))

        ft_compute_sample_grad = vmap(grad_and_value(compute_loss_stateless_model), in_dims=(None, 0, 0))
        params = list(model.parameters())
    for images, target in train_loader:
        output = model(images)
        if grad_sample_mode == "no_op":
            per_sample_grads, per_sample_losses = ft_compute_sample_grad(params, images, target)
            for p, g in zip(params, per_sample_grads):
                p.grad_sample = g.detach()
        else:
            criterion(output, target).backward()
        optimizer.step()
        optimizer.zero_grad()


def run(clipping, grad_sample_mode):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))
    train_loader = DataLoader(data, batch_size=32, shuffle=True)
    model = convnet(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n_layers = len([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    max_grad_norm = [1.5 / n_layers ** 0.5] * n_layers if clipping == "per_layer" else 1.5
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.5,
        max_grad_norm=max_grad_norm, clipping=clipping, grad_sample_mode=grad_sample_mode,
    )
    train(model, train_loader, optimizer, grad_sample_mode)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, buf)
    return privacy_engine.accountant.get_epsilon(delta=1e-5)


def main():
    return {"epsilon": run("flat", "hooks"), "epsilon_per_layer": run("per_layer", "hooks"),
            "epsilon_no_op": run("flat", "no_op")}
