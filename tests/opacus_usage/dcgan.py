"""Opacus examples/dcgan.py: a private discriminator trained on real and fake batches in
one backward pass (two forwards), a non-private generator through it, accountant.get_epsilon."""
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine

nz, ngf, ndf, nc = 16, 8, 8, 1


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.GroupNorm(min(32, ndf * 8), ndf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.GroupNorm(min(32, ndf * 4), ndf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.GroupNorm(min(32, ndf * 2), ndf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.GroupNorm(min(32, ndf), ndf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.GroupNorm(min(32, ndf * 2), ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.GroupNorm(min(32, ndf * 4), ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.GroupNorm(min(32, ndf * 8), ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
        )

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


def main():
    torch.manual_seed(0)
    dataloader = DataLoader(TensorDataset(torch.rand(64, 1, 64, 64) * 2 - 1), batch_size=16, shuffle=True)
    netG, netD = Generator(), Discriminator()
    criterion = nn.BCELoss()
    optimizerD = optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    privacy_engine = PrivacyEngine(secure_mode=False)
    netD, optimizerD, dataloader = privacy_engine.make_private(
        module=netD, optimizer=optimizerD, data_loader=dataloader, noise_multiplier=1.0, max_grad_norm=1.0,
    )
    optimizerG = optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for _ in range(2):
        for data in dataloader:
            optimizerD.zero_grad(set_to_none=True)
            real_data = data[0]
            batch_size = real_data.size(0)
            output = netD(real_data)
            errD_real = criterion(output, torch.full((batch_size,), 1.0))
            fake = netG(torch.randn(batch_size, nz, 1, 1))
            output = netD(fake.detach())
            errD_fake = criterion(output, torch.full((batch_size,), 0.0))
            errD = errD_real + errD_fake
            errD.backward()
            optimizerD.step()
            optimizerD.zero_grad(set_to_none=True)
            optimizerG.zero_grad()
            errG = criterion(netD(fake), torch.full((batch_size,), 1.0))
            errG.backward()
            optimizerG.step()
            epsilon = privacy_engine.accountant.get_epsilon(delta=1e-5)
    return {"epsilon": epsilon}
