"""Cryptographically secure randomness for ``secure_mode`` (noise and Poisson sampling).

Three layers, each answering one attack on a textbook DP-SGD implementation:

1. **Unpredictable bits.** Every random bit comes from the operating system's CSPRNG
   (``os.urandom``: Linux ``getrandom``, a ChaCha20 DRBG) or, for large draws, from a
   ChaCha20 keystream (RFC 8439, via OpenSSL in the optional ``cryptography`` package)
   under a fresh 256-bit key read from ``os.urandom`` for *every* draw. Nothing is
   stored between draws, so there is no state to leak through checkpoints, pickles,
   ``fork()`` or ``torch.Generator.get_state`` and nothing can be replayed. PyTorch's
   Mersenne Twister / Philox generators are statistical, not cryptographic: their
   state is recoverable from outputs.

2. **Smooth floating-point Gaussians.** A Gaussian sample computed in floating point
   takes only finitely many values, unevenly spread; Mironov 2012 ("On significance of
   the least significant bits for differential privacy") broke the Laplace mechanism
   this way, Holohan & Braghin 2021 ("Secure random sampling in differential
   privacy") and Jin et al. 2022 ("Are we there yet? Timing and floating-point attacks
   on differential privacy systems") did the same for Gaussian samplers, Opacus'
   included. Here each standard normal is ``(z1 + z2 + z3 + z4) / 2`` over four
   Box-Muller values from four *different* pairs, each computed in float64 from
   53-bit CSPRNG uniforms (the defence of Holohan & Braghin 2021, Sec. 5, also used by
   Opacus' secure mode), scaled and rounded once to the parameter dtype.

3. **Snapping the released sum** (:func:`secure_gaussian_mechanism`). Even perfect
   noise leaks through ``fl(x + n)``: when ``x + n`` is small the exact sum lies on the
   grid of ``ulp(x)``, so the low bits of the output reveal the binade of ``x``.
   Following Mironov's snapping mechanism, the sum is formed in float64 and rounded to
   a fixed power-of-two grid ``Lambda`` (about ``std / 256``), which does not depend
   on ``x``; the output is then post-processing of the Gaussian mechanism up to the
   float64 rounding error, which is ~2^-40 of a grid cell.

See ``docs/secure_mode.md`` for the argument, its assumptions and residual risks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SecureGenerator",
    "is_secure",
    "backend",
    "set_backend",
    "random_bytes",
    "secure_uniform",
    "secure_standard_normal",
    "secure_normal",
    "secure_bernoulli",
    "snap_grid",
    "secure_gaussian_mechanism",
    "SUMMANDS",
    "SNAP_BITS",
    "MAX_INPUT_RATIO",
]

# --- layer 1: CSPRNG bytes ---------------------------------------------------------------

_BACKENDS = ("auto", "chacha20", "urandom")
#: Draws up to this many bytes always come straight from os.urandom.
_URANDOM_ONLY = 1 << 16
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
#: ChaCha20 has a 32-bit block counter: at most 2^32 blocks of 64 bytes per (key, nonce).
_CHACHA_MAX = (1 << 32) * 64

try:  # optional: ~10x the throughput of os.urandom on large draws
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    _HAVE_CHACHA = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAVE_CHACHA = False

_backend = os.environ.get("FXDP_SECURE_RNG", "auto")
if _backend not in _BACKENDS:  # pragma: no cover - environment misconfiguration
    raise ValueError(f"FXDP_SECURE_RNG must be one of {_BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Choose where secure bits come from: ``"urandom"`` (every byte from the OS),
    ``"chacha20"`` (draws above 64 KiB from a ChaCha20 keystream under a fresh
    ``os.urandom`` key; needs the ``cryptography`` package) or ``"auto"`` (``chacha20``
    when available). Also settable with the environment variable ``FXDP_SECURE_RNG``.
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"secure RNG backend must be one of {_BACKENDS}, got {name!r}")
    if name == "chacha20" and not _HAVE_CHACHA:
        raise ValueError(
            "the chacha20 backend needs the 'cryptography' package (pip install cryptography); "
            "use set_backend('urandom') to read every byte from the operating system"
        )
    _backend = name


def backend() -> str:
    """The backend in effect: ``"chacha20"`` or ``"urandom"``."""
    return "chacha20" if _backend != "urandom" and _HAVE_CHACHA else "urandom"


def _chacha20_keystream(n: int) -> np.ndarray:
    # Fresh key per draw: a keystream is never reused and nothing persists afterwards.
    # The 16-byte IV is OpenSSL's counter (4 bytes, started at 0) || nonce (12 bytes).
    out = np.empty(n, dtype=np.uint8)
    view = memoryview(out)
    for start in range(0, n, _CHACHA_MAX):
        stop = min(n, start + _CHACHA_MAX)
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(4) + os.urandom(12)), mode=None)
        enc = cipher.encryptor()
        for off in range(start, stop, _CHUNK):
            size = min(_CHUNK, stop - off)
            enc.update_into(_ZEROS[:size], view[off : off + size])
    return out


def random_bytes(n: int) -> np.ndarray:
    """``n`` bytes from the CSPRNG (see :func:`set_backend`) as a ``uint8`` array."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= _URANDOM_ONLY or backend() == "urandom":
        return np.frombuffer(bytearray(os.urandom(n)), dtype=np.uint8)
    return _chacha20_keystream(n)


def _random_words(n: int) -> Tensor:
    """``n`` uniformly random 64-bit words (as int64: all bit patterns equally likely)."""
    return torch.from_numpy(random_bytes(8 * n).view(np.int64))


def _uniform_into(out: Tensor, open_low: bool) -> Tensor:
    # top 53 bits of each word (the mask undoes the sign extension of >>), converted exactly
    k = _random_words(out.numel())
    k >>= 11
    k &= (1 << 53) - 1
    out.copy_(k)
    if open_low:
        out += 1.0
    return out.mul_(2.0**-53)


def secure_uniform(n: int, *, open_low: bool = False) -> Tensor:
    """``n`` float64 uniforms ``k * 2^-53``, ``k`` uniform in ``[0, 2^53)`` (or
    ``(k + 1) * 2^-53`` in ``(0, 1]`` with ``open_low``); exact, no rounding."""
    return _uniform_into(torch.empty(n, dtype=torch.float64), open_low)


# --- layer 2: Gaussian samples ---------------------------------------------------------------

#: Box-Muller values summed per returned normal (Holohan & Braghin 2021, Sec. 5).
SUMMANDS = 4
#: Outputs per chunk: temporaries stay a few MiB (reused by the allocator, no page faults).
_NORMAL_CHUNK = 1 << 17


def _box_muller(pairs: int) -> tuple[Tensor, Tensor]:
    """``pairs`` independent pairs of float64 standard normals (Box & Muller 1958)."""
    u = secure_uniform(2 * pairs, open_low=True)  # u1 in (0, 1]: log is finite
    radius = u[:pairs].log_().mul_(-2.0).sqrt_()
    angle = u[pairs:].mul_(2.0 * math.pi)
    cos = torch.cos(angle).mul_(radius)
    return cos, angle.sin_().mul_(radius)


def _standard_normal_into(out: Tensor) -> None:
    n = out.numel()
    if n == 1:  # no partner to share pairs with: use one value of each of 4 pairs
        cos, _ = _box_muller(SUMMANDS)
        out.copy_(cos.sum(0, keepdim=True))
        out.mul_(0.5)
        return
    cos, sin = _box_muller(2 * n)  # 4n normals for n outputs
    # output j uses cos of pairs j and n+j and sin of pairs j+1 and n+j+1 (mod n)
    torch.add(cos[:n], cos[n:], out=out)
    out += torch.roll(sin[:n], 1)
    out += torch.roll(sin[n:], 1)
    out.mul_(0.5)


def secure_standard_normal(n: int) -> Tensor:
    """``n`` float64 ``N(0, 1)`` samples from the CSPRNG, each ``(z1+z2+z3+z4)/2``.

    The four summands come from four different Box-Muller pairs, so no output is a
    function of one pair's shared radius (the structure Holohan & Braghin exploit).
    """
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _NORMAL_CHUNK):
        _standard_normal_into(out[start : start + _NORMAL_CHUNK])
    return out


def secure_normal(
    std: float,
    shape: Sequence[int] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``N(0, std^2)`` samples of ``shape`` from :func:`secure_standard_normal`,
    scaled in float64 and rounded once to ``dtype`` (drawn on the CPU, then moved)."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype)
    buf = torch.empty(min(n, _NORMAL_CHUNK), dtype=torch.float64)
    for start in range(0, n, _NORMAL_CHUNK):
        z = buf[: min(_NORMAL_CHUNK, n - start)]
        _standard_normal_into(z)
        out[start : start + z.numel()].copy_(z.mul_(float(std)))
    return out.reshape(tuple(shape)).to(device=device if device is not None else "cpu")


# --- Poisson sampling ----------------------------------------------------------------------


def secure_bernoulli(n: int, p: float) -> Tensor:
    """``n`` independent booleans, each ``True`` with probability ``floor(p 2^64) / 2^64``.

    Each is one 64-bit CSPRNG word compared with the integer threshold
    ``floor(p * 2^64)`` (exact rational arithmetic, no float rounding): the inclusion
    probability is within ``2^-64`` of ``p`` and never above it, so the privacy
    amplification computed for rate ``p`` stays valid.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p == 1:
        return torch.ones(n, dtype=torch.bool)
    if n == 0 or p == 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = math.floor(Fraction(p) * (1 << 64))  # < 2^64 as p < 1
    words = random_bytes(8 * n).view(np.uint64)
    return torch.from_numpy(words < np.uint64(threshold))


# --- layer 3: snapping ---------------------------------------------------------------------

#: The snapping grid is ``2^(floor(log2 std) - SNAP_BITS)``, i.e. in ``(std/512, std/256]``.
SNAP_BITS = 8
#: Inputs larger than ``MAX_INPUT_RATIO * std`` are refused: the float64 error bound of
#: the snapped sum (docs/secure_mode.md) assumes ``|x| <= 2^20 std``.
MAX_INPUT_RATIO = 2.0**20


def snap_grid(std: float) -> float:
    """The power of two ``Lambda`` that :func:`secure_gaussian_mechanism` rounds to."""
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and > 0, got {std}")
    _, e = math.frexp(std)  # std = m 2^e, m in [0.5, 1): floor(log2 std) = e - 1
    return math.ldexp(1.0, e - 1 - SNAP_BITS)


def secure_gaussian_mechanism(x: Tensor, std: float) -> Tensor:
    """``round_Lambda(x + N(0, std^2))``: the Gaussian mechanism with snapping.

    The sum is formed in float64 (``x`` converted exactly), rounded to the nearest
    multiple of ``Lambda = snap_grid(std)`` (exact: power-of-two scaling) and only then
    cast to ``x.dtype``. The output set ``Lambda * Z`` does not depend on ``x``, which
    removes the low-bit leak of ``fl(x + n)`` (Mironov 2012, Sec. 5); the rounding adds
    at most ``Lambda / 2 <= std / 512`` per coordinate. ``std == 0`` returns ``x``.
    """
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    if std == 0:
        return x.clone()
    xd = x.detach()
    if xd.numel() and not bool(torch.isfinite(xd).all()):
        raise FloatingPointError("secure_gaussian_mechanism got a non-finite input")
    largest = float(xd.abs().max()) if xd.numel() else 0.0
    if largest > MAX_INPUT_RATIO * std:
        raise ValueError(
            f"secure_gaussian_mechanism: |x| reaches {largest:.3g}, more than 2^20 times the noise "
            f"std {std:.3g}; the snapping error bound does not cover it. Clip the inputs (their "
            "sum of clipped gradients should be far below this) or raise the noise"
        )
    lam = snap_grid(std)
    flat = xd.reshape(-1)
    out = torch.empty(flat.numel(), dtype=x.dtype)
    buf = torch.empty(min(flat.numel(), _NORMAL_CHUNK), dtype=torch.float64)
    for start in range(0, flat.numel(), _NORMAL_CHUNK):
        v = buf[: min(_NORMAL_CHUNK, flat.numel() - start)]
        _standard_normal_into(v)
        v.mul_(std).add_(flat[start : start + v.numel()].cpu())  # x + noise, exactly converted, in float64
        out[start : start + v.numel()].copy_(v.div_(lam).round_().mul_(lam))  # exact snap, then cast
    return out.reshape(x.shape).to(x.device)


# --- the generator object that routes fxdp's draws here -------------------------------------


class SecureGenerator(torch.Generator):
    """A ``torch.Generator`` that marks "draw from the CSPRNG".

    fxdp's samplers (:func:`fxdp.optim.noise.gaussian_noise`,
    :class:`fxdp.data.PoissonSampler`) recognise it and take their bits from
    :func:`random_bytes`, never from the PyTorch engine underneath. That engine is
    seeded from ``os.urandom`` so that third-party code drawing from it gets
    unpredictable (though not cryptographic) values. It cannot be seeded or restored
    (:meth:`manual_seed` and :meth:`set_state` raise); copies and unpickled
    instances are fresh secure generators.
    """

    def __new__(cls, device: torch.device | str | None = None) -> SecureGenerator:
        gen = super().__new__(cls, device if device is not None else "cpu")
        torch.Generator.manual_seed(gen, int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        return gen

    def __init__(self, device: torch.device | str | None = None) -> None:
        pass  # torch.Generator is built in __new__

    def manual_seed(self, seed: int) -> SecureGenerator:  # type: ignore[override]
        raise TypeError(
            "a SecureGenerator cannot be seeded: secure_mode randomness must be unpredictable. "
            "Use a torch.Generator (and secure_mode=False) for reproducible runs"
        )

    def set_state(self, new_state: Tensor) -> SecureGenerator:  # type: ignore[override]
        raise TypeError(
            "a SecureGenerator cannot be restored: secure_mode noise and sampling must not be "
            "replayable (fxdp's secure draws do not use this state anyway)"
        )

    def __deepcopy__(self, memo: dict) -> SecureGenerator:
        return type(self)(self.device)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self.device),))

    def __repr__(self) -> str:
        return f"SecureGenerator(device={str(self.device)!r}, backend={backend()!r})"


def is_secure(generator: Any) -> bool:
    """Whether ``generator`` routes fxdp's draws to the CSPRNG."""
    return isinstance(generator, SecureGenerator)
