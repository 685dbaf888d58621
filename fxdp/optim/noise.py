"""Gaussian noise for the Gaussian mechanism of DP-SGD (Abadi et al. 2016)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["gaussian_noise", "secure_generator"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def gaussian_noise(
    std: float,
    shape: Sequence[int] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``N(0, std^2)`` of the given shape.

    ``std == 0`` returns zeros without drawing, so non-private runs leave the
    generator untouched. Without a ``generator`` the global RNG of ``device`` is used.
    If the generator lives on another device, sampling happens there and the result
    is moved (a CPU generator can drive noise for CUDA parameters). Half-precision
    noise is drawn in float32 and rounded once.
    """
    if not std >= 0 or std == float("inf"):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if std == 0:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    sample_device = generator.device if generator is not None else device
    sample_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
    noise = torch.normal(
        mean=0.0,
        std=float(std),
        size=tuple(shape),
        generator=generator,
        dtype=sample_dtype,
        device=sample_device,
    )
    return noise.to(device=device, dtype=dtype)


def secure_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 64 bits from ``os.urandom``.

    The seed cannot be predicted or replayed, but the generator itself is PyTorch's
    Philox/Mersenne-Twister and the floating-point sampler is the standard one; a
    stronger secure mode (cryptographic generator and noise robust to floating-point
    attacks, Mironov 2012; Holohan & Braghin 2021) is planned behind the same flag.
    """
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen
