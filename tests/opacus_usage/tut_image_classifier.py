"""Opacus tutorial building_image_classifier: ModuleValidator.validate/fix (BatchNorm),
make_private_with_epsilon, optimizer.noise_multiplier, BatchMemoryManager,
privacy_engine.get_epsilon. The tutorial's torchvision ResNet18 is replaced by a small
CNN with BatchNorm (torchvision is not installed beside CI's torch)."""
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator

EPSILON, DELTA, EPOCHS, MAX_GRAD_NORM = 50.0, 1e-5, 2, 1.2
BATCH_SIZE, MAX_PHYSICAL_BATCH_SIZE = 64, 16


def small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def main():
    torch.manual_seed(0)
    train_loader = DataLoader(TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))),
                              batch_size=BATCH_SIZE)
    model = small_resnet()
    errors = ModuleValidator.validate(model, strict=False)
    assert errors, "BatchNorm must be reported"
    model = ModuleValidator.fix(model)
    assert ModuleValidator.validate(model, strict=False) == []
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.RMSprop(model.parameters(), lr=1e-3)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, epochs=EPOCHS, target_epsilon=EPSILON,
        target_delta=DELTA, max_grad_norm=MAX_GRAD_NORM,
    )
    sigma = optimizer.noise_multiplier
    for _ in range(EPOCHS):
        model.train()
        with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=MAX_PHYSICAL_BATCH_SIZE,
                                optimizer=optimizer) as memory_safe_data_loader:
            for images, target in memory_safe_data_loader:
                optimizer.zero_grad()
                loss = criterion(model(images), target)
                loss.backward()
                optimizer.step()
        epsilon = privacy_engine.get_epsilon(DELTA)
    return {"epsilon": epsilon, "sigma": sigma}
