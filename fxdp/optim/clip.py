"""Clipping math for DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Pure functions over lists of per-sample gradients ``g[k]`` of shape ``[B, *p_k.shape]``,
split (norms -> factors -> clipped sum) so that book-keeping, which forms norms and
clipped sums without per-sample gradients, uses the same factors: every clip factor
and every non-finite decision of fxdp is made here (:meth:`Clipping.factors`).

``Clipping`` is the value an optimizer step hands to its source of clipped sums
(:mod:`fxdp.optim.grad_source`): the bound(s) read at that step and the non-finite policy.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "Clipping",
    "ClipResult",
    "ClipStats",
    "per_param_sample_norms",
    "per_sample_norms",
    "clip_factors",
    "factors_as",
    "sum_dtype",
    "clipped_sum",
    "clip_statistics",
    "first_non_finite",
    "adaptive_gradient_noise_multiplier",
    "private_unclipped_fraction",
    "geometric_clipbound_update",
]

#: Added to norms before dividing, as Opacus does, so that zero gradients give factor 1.
EPS = 1e-6


def per_param_sample_norms(grad_samples: Sequence[Tensor]) -> Tensor:
    """L2 norm of each sample's gradient, separately for each parameter: ``[B, K]``.

    Norms are computed in at least float32 (low-precision squares overflow or lose
    the small entries) and gathered on the device of the first parameter.
    """
    if len(grad_samples) == 0:
        raise ValueError("per_param_sample_norms needs at least one per-sample gradient")
    norms = [
        torch.linalg.vector_norm(
            g.reshape(g.shape[0], math.prod(g.shape[1:])),
            dim=1,
            dtype=torch.promote_types(g.dtype, torch.float32),
        )
        for g in grad_samples
    ]
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
    device = norms[0].device
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms], dim=1)


def per_sample_norms(grad_samples: Sequence[Tensor]) -> Tensor:
    """L2 norm of each sample's gradient over all parameters together: ``[B]``."""
    return torch.linalg.vector_norm(per_param_sample_norms(grad_samples), dim=1)


def clip_factors(norms: Tensor, max_norm: float | Tensor) -> Tensor:
    """Per-sample scale ``min(1, C / (norm + 1e-6))``, so that ``factor * norm <= C``.

    ``norms`` is ``[B]`` (flat clipping, scalar ``C``) or ``[B, K]`` with ``max_norm``
    broadcastable to ``[K]`` (per-layer clipping).
    """
    return (max_norm / (norms + EPS)).clamp(max=1.0)


def factor_of(factors: Tensor, k: int) -> Tensor:
    """Parameter ``k``'s column of ``[B]`` (flat) or ``[B, K]`` (per-layer) factors."""
    return factors if factors.dim() == 1 else factors[:, k]


def factors_as(factors: Tensor, dtype: torch.dtype) -> Tensor:
    """``factors`` in ``dtype``, rounded toward zero where the cast rounds. A clip factor
    rounded up (bfloat16 keeps 8 significant bits: up to 0.4%, float16 0.05%) would scale
    a clipped gradient past the bound ``C`` the noise is calibrated to; rounded down, every
    sample's contribution stays within it."""
    if factors.dtype == dtype:
        return factors
    low = factors.to(dtype)
    if torch.finfo(dtype).eps <= torch.finfo(factors.dtype).eps:
        return low  # as precise or more: exact
    return torch.where(low.to(factors.dtype) > factors, torch.nextafter(low, torch.zeros_like(low)), low)


@functools.lru_cache(maxsize=None)
def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a clipped sum is formed, accumulated and noised in: ``dtype``, at least
    float32. A half-precision sum rounded before the noise moves each coordinate by up to
    half an ulp of the *sum*, depending on the data: two neighbouring batches' rounded sums
    then lie farther apart than the bound ``C`` the noise is calibrated to (bfloat16,
    1024 aligned clipped gradients: 2.2-2.3 C, ``docs/secure_mode.md``). In float32 that
    rounding is ~1e-7 of the sum; the one rounding to the parameter's dtype comes after
    the noise, as post-processing."""
    return torch.promote_types(dtype, torch.float32)


#: a half-precision clipped sum is formed over slices of the batch of about this many bytes of
#: float32 per-sample gradients (no float32 copy of a whole ``p.grad_sample``)
_WIDE_SLICE_BYTES = 1 << 24


def clipped_sum(grad_samples: Sequence[Tensor], factors: Tensor) -> list[Tensor]:
    """``sum_i factors[i] * g[i]`` for each parameter (one einsum, no clipped copy).

    ``factors`` is ``[B]`` (shared by all parameters) or ``[B, K]`` (column ``k`` for
    parameter ``k``), applied in each gradient's dtype (:func:`factors_as`). The result
    has each parameter's shape, in :func:`sum_dtype` of its gradient's dtype: a
    half-precision gradient is summed in float32, a slice of the batch at a time.
    """
    out = []
    for k, g in enumerate(grad_samples):
        f = factor_of(factors, k).to(g.device)
        wide = sum_dtype(g.dtype)
        if wide == g.dtype:
            out.append(torch.einsum("i,i...->...", factors_as(f, g.dtype), g))
            continue
        f, step = factors_as(f, wide), max(1, _WIDE_SLICE_BYTES // max(1, g[:1].numel() * 4))
        total = torch.zeros(g.shape[1:], dtype=wide, device=g.device)
        for s in range(0, g.shape[0], step):
            total += torch.einsum("i,i...->...", f[s:s + step], g[s:s + step].to(wide))
        out.append(total)
    return out


def first_non_finite(norms: Tensor) -> tuple[int, int] | None:
    """``(sample, parameter)`` of the first non-finite entry of a ``[B, K]`` norm matrix.

    A NaN or inf anywhere in a sample's gradient makes its norm non-finite, so checking
    the ``B x K`` norms is enough and costs one device sync. Norms are non-negative, so
    their sum is finite exactly when every entry is, unless it overflows (then the
    entries are searched, as for a non-finite one): two calls on the common path.
    """
    if math.isfinite(norms.sum()):
        return None
    bad = ~torch.isfinite(norms)
    if not bool(bad.any()):
        return None  # the sum overflowed
    i, k = (int(v) for v in bad.nonzero()[0])
    return i, k


NONFINITE_POLICIES = ("raise", "drop")


@dataclass(frozen=True)
class Clipping:
    """The clipping of one step: flat bound ``C``, or one bound ``C_k`` per parameter
    (per-layer, McMahan et al. 2018; then ``bound = sqrt(sum C_k^2)``, the sensitivity),
    and what a NaN/inf per-sample gradient does: ``"raise"`` ``FloatingPointError``
    before anything changes, or ``"drop"`` the sample (factor 0, a warning)."""

    bound: float
    per_parameter: tuple[float, ...] | None = None
    nonfinite: str = "raise"

    def factors(self, norms: Tensor, shapes: Sequence[Sequence[int]] = ()) -> tuple[Tensor, Tensor | None]:
        """Clip factors from per-parameter norms ``[B, K]`` (the optimizer's parameter
        order): ``[B]`` (flat) or ``[B, K]`` (per-layer), and the mask of the finite
        samples when some were dropped (``None`` otherwise). ``shapes`` name the
        parameters in the error message."""
        ok = self._finite(norms, shapes)
        if self.per_parameter is None:
            total = torch.linalg.vector_norm(norms, dim=1)
            factors = clip_factors(total, self.bound)
        else:
            if norms.shape[1] != len(self.per_parameter):
                raise ValueError(
                    f"per_layer clipping: {len(self.per_parameter)} bounds for {norms.shape[1]} trainable "
                    "parameters (parameters were added or unfrozen)"
                )
            factors = clip_factors(norms, torch.tensor(self.per_parameter, dtype=norms.dtype, device=norms.device))
        if ok is not None:  # 0 * nan is nan: the caller zeroes the dropped rows too
            factors = torch.where(ok.view(-1, *[1] * (factors.dim() - 1)), factors, 0)
        return factors, ok

    def _finite(self, norms: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor | None:
        bad = first_non_finite(norms)
        if bad is None:
            return None
        i, k = bad
        if self.nonfinite == "drop":
            ok = torch.isfinite(norms).all(dim=1)
            warnings.warn(
                f"nonfinite='drop': sample indices {(~ok).nonzero().reshape(-1).tolist()} of the current batch "
                "have a non-finite per-sample gradient; their contribution was dropped (clip factor 0), they "
                "stay counted in the accounting",
                RuntimeWarning,
                stacklevel=5,
            )
            return ok
        shape = f", shape {tuple(shapes[k])}" if k < len(shapes) else ""
        raise FloatingPointError(
            f"non-finite per-sample gradient: sample index {i} of the current batch (parameter #{k}{shape}) "
            f"has gradient norm {float(norms[i, k])}; the step was not applied. Check the loss/inputs of that "
            "sample (e.g. log of 0, division by 0, overflow in low precision)."
        )


@dataclass
class ClipResult:
    """What clipping one logical batch gives: ``sums[k] = sum_i c_ik g_ik`` in the
    optimizer's parameter order, the per-parameter norms ``[B, K]`` (dropped samples: 0)
    and the factors ``[B]`` or ``[B, K]``."""

    sums: list[Tensor]
    norms: Tensor
    factors: Tensor

    def add(self, other: ClipResult) -> ClipResult:
        """Two backward passes of one step (gradient accumulation)."""
        return ClipResult([a + b for a, b in zip(self.sums, other.sums)], torch.cat([self.norms, other.norms]),
                          torch.cat([self.factors, other.factors]))


@dataclass(frozen=True)
class ClipStats:
    """Per-sample gradient norm statistics of one optimizer step, for tuning ``C``.

    They are computed from the raw per-sample norms and are therefore *not*
    differentially private: use them for debugging, don't publish them.
    """

    num_samples: int
    max_grad_norm: float
    fraction_clipped: float
    mean_norm: float
    min_norm: float
    q25_norm: float
    median_norm: float
    q75_norm: float
    max_norm: float

    @property
    def quantiles(self) -> dict[float, float]:
        """Norm quantiles ``{0.0: min, 0.25: .., 0.5: median, 0.75: .., 1.0: max}``."""
        return {
            0.0: self.min_norm,
            0.25: self.q25_norm,
            0.5: self.median_norm,
            0.75: self.q75_norm,
            1.0: self.max_norm,
        }


def clip_statistics(norms: Tensor, clipped: Tensor, max_grad_norm: float) -> ClipStats:
    """Summarise per-sample ``norms`` ``[B]`` and the ``clipped`` mask ``[B]`` of a step."""
    n = int(norms.numel())
    if n == 0:
        nan = math.nan
        return ClipStats(0, float(max_grad_norm), nan, nan, nan, nan, nan, nan, nan)
    x = norms.detach().to(torch.float64).flatten()
    q = torch.quantile(x, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64, device=x.device))
    q0, q25, q50, q75, q100 = (float(v) for v in q)
    return ClipStats(
        num_samples=n,
        max_grad_norm=float(max_grad_norm),
        fraction_clipped=float(clipped.to(torch.float64).mean()),
        mean_norm=float(x.mean()),
        min_norm=q0,
        q25_norm=q25,
        median_norm=q50,
        q75_norm=q75,
        max_norm=q100,
    )


# --- Adaptive clipping: Andrew, Thakkar, McMahan, Ramaswamy 2021 ----------------------
# "Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021, arXiv:1905.03871).


def adaptive_gradient_noise_multiplier(noise_multiplier: float, unclipped_num_std: float) -> float:
    """Noise multiplier left for the gradient sum when the clip count is also released.

    Theorem 1 of Andrew et al. 2021: releasing the clipped gradient sum with noise
    ``sigma_grad * C`` and the centred unclipped count ``sum_i (b_i - 1/2)`` (sensitivity
    1/2) with noise ``sigma_b`` is exactly as private as one Gaussian mechanism with
    noise multiplier ``sigma`` where ``sigma^-2 = sigma_grad^-2 + (2 sigma_b)^-2``. Hence

        sigma_grad = (sigma^-2 - (2 sigma_b)^-2)^(-1/2),

    which is defined only for ``sigma < 2 sigma_b``. ``sigma = 0`` (no privacy) gives 0.
    """
    if noise_multiplier == 0:
        return 0.0
    if not noise_multiplier < 2 * unclipped_num_std:
        raise ValueError(
            "adaptive clipping: the gradient noise multiplier "
            "sigma_grad = (sigma^-2 - (2*sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Theorem 1) "
            f"is undefined for noise_multiplier={noise_multiplier} and "
            f"unclipped_num_std={unclipped_num_std}; it needs "
            "noise_multiplier < 2 * unclipped_num_std (increase unclipped_num_std; the paper "
            "suggests about expected_batch_size / 20)"
        )
    return (noise_multiplier**-2 - (2 * unclipped_num_std) ** -2) ** -0.5


def private_unclipped_fraction(
    unclipped: float, num_samples: int, noise: float, expected_num: float
) -> float:
    """Noisy fraction of unclipped samples, ``(sum_i (b_i - 1/2) + noise) / m + 1/2``.

    Centring the bits makes the sensitivity 1/2 (Theorem 1 above), and dividing by the
    public expected count ``m`` instead of the actual batch size keeps the batch size,
    which Poisson sampling makes private, out of the released value.
    """
    return (unclipped - 0.5 * num_samples + noise) / expected_num + 0.5


def geometric_clipbound_update(
    clipbound: float,
    unclipped_fraction: float,
    target_unclipped_quantile: float,
    learning_rate: float,
    min_clipbound: float,
    max_clipbound: float,
) -> float:
    """Geometric step ``C * exp(-lr * (b - gamma))`` towards the target quantile, clamped.

    Too many unclipped samples (``b > gamma``) shrink ``C``; too few grow it.
    """
    new = clipbound * math.exp(-learning_rate * (unclipped_fraction - target_unclipped_quantile))
    return min(max(new, min_clipbound), max_clipbound)
