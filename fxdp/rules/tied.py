"""Per-sample norms of a tied parameter from its uses' factors, without per-sample gradients.

A parameter used by several ops (GPT-2's, BERT's, T5's and BART's token embedding, which
is also the language-model head) gets from sample i the gradient ``G_i = Σ_k G_{k,i}``
over its uses k, whose squared norm is not a sum of the uses' norms:

    ||G_i||² = Σ_k ||G_{k,i}||² + 2 Σ_{k<l} <G_{k,i}, G_{l,i}>.

Each use's rule gives its norm (ghost, rank one, repeated tokens: its own method) and its
gradient in factored form, a sum of outer products over the sample's positions
``G_{k,i} = L_{k,i}ᵀ R_{k,i}`` (:class:`GradFactors`; a linear layer's ``L = g``,
``R = a``; an embedding's ``L`` the one-hot rows of its tokens, ``R = g``). The cross
term is the ghost norm's identity (Goodfellow 2015; Li et al. 2021, "Large language
models can be strong differentially private learners") between two uses:

    <L_kᵀ R_k, L_lᵀ R_l> = Σ_{t,s} (L_k L_lᵀ)_{ts} (R_k R_lᵀ)_{ts},

``T_k T_l (m + n)`` a sample against ``(T_k + T_l) m n`` for materializing ``[m, n]``
gradients. Against an embedding's one-hot rows ``L_k L_lᵀ`` is a gather,
``(E Lᵀ)_{ts} = L[s, x_t]``: the cross term of GPT-2's tied embedding and head costs
``T² d``, and its ``[B, V, d]`` per-sample gradients (2.5 GB per use at B = 16,
V = 50257, d = 768) are never formed. The clipped sum is each use's own, with the
same factors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import norm_dtype, samples_per_slice

__all__ = ["GradFactors", "cross_inner", "factored_cheaper", "use_factors"]


@dataclass
class GradFactors:
    """Sample i's gradient of one use of a parameter, viewed as ``[m, n]`` (row-major):
    ``G_i = L_iᵀ R_i`` with ``right: [B, T, n]`` and either ``left: [B, T, m]`` (dense
    rows) or ``index: [B, T]`` (one-hot rows: ``L_{i,t} = e_{index[i, t]}``; a position
    that adds nothing, an embedding's padding, has a zero ``right`` row)."""

    right: Tensor
    left: Optional[Tensor] = None
    index: Optional[Tensor] = None
    m: int = 0

    @property
    def shape(self) -> tuple:
        """``(m, n)``: the parameter's shape as these factors lay out its gradient."""
        return (self.m if self.left is None else self.left.shape[-1], self.right.shape[-1])

    def positions(self) -> int:
        return self.right.shape[1]


#: cross terms form ``[T_k, T_l]`` matrices for a slice of the batch of about this many bytes at a time
_SLICE_BYTES = 1 << 22


def factored_cheaper(factors: Sequence[GradFactors]) -> bool:
    """Whether the cross terms of these uses cost no more multiply-adds than materializing
    each use's ``[B, m, n]`` per-sample gradients (``T_k m n`` a sample each)."""
    m, n = factors[0].shape
    cross = sum(f.positions() * h.positions() * ((0 if f.left is None or h.left is None else m) + n)
                for k, f in enumerate(factors) for h in factors[k + 1:])
    return cross <= sum(f.positions() for f in factors) * m * n


def use_factors(factors: Sequence[Optional[GradFactors]]) -> bool:
    """Whether a tied parameter is normed from its uses' factors (``None``: a use without):
    every use has them, laid out alike, and their cross terms cost no more than materializing."""
    return (all(f is not None for f in factors) and len({f.shape for f in factors}) == 1
            and factored_cheaper(factors))


def cross_inner(f: GradFactors, h: GradFactors) -> Tensor:
    """``[B]``: ``<G_{f,i}, G_{h,i}>`` per sample, ``Σ_{t,s} (L_f L_hᵀ)_{ts} (R_f R_hᵀ)_{ts}``,
    a slice of the batch at a time (the ``[T_f, T_h]`` products of the whole batch would
    outgrow the records at long sequences)."""
    B, Tf, Th = f.right.shape[0], f.positions(), h.positions()
    dtype = _cross_dtype(f, h)
    dense = (f.left, h.left) if f.left is not None and h.left is not None else ()  # gathers copy no rows
    copies = sum(t[:1].numel() for t in (f.right, h.right, *dense) if t.dtype != dtype)
    n = samples_per_slice(_SLICE_BYTES, extra_bytes=(3 * Tf * Th + copies) * max(f.right.element_size(), 8))
    parts = [_cross(_rows(f, s, s + n), _rows(h, s, s + n)) for s in range(0, B, n)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows(f: GradFactors, s: int, e: int) -> GradFactors:
    return GradFactors(f.right[s:e], None if f.left is None else f.left[s:e],
                       None if f.index is None else f.index[s:e], f.m)


def _cross_dtype(f: GradFactors, h: GradFactors) -> torch.dtype:
    """The cross term's dtype: at least float32 (a half-precision product of the two uses'
    rows is rounded entry by entry before the sum)."""
    return norm_dtype(torch.promote_types(f.right.dtype, h.right.dtype))


def _cross(f: GradFactors, h: GradFactors) -> Tensor:
    dtype = _cross_dtype(f, h)
    right = torch.bmm(f.right.to(dtype), h.right.to(dtype).transpose(1, 2))  # [b, T_f, T_h]
    if f.left is not None and h.left is not None:
        left = torch.bmm(f.left.to(dtype), h.left.to(dtype).transpose(1, 2))
    elif f.index is not None and h.index is not None:  # one-hot rows: 1 where the tokens agree
        left = (f.index.unsqueeze(2) == h.index.unsqueeze(1)).to(dtype)
    elif f.index is not None:  # (E L_hᵀ)_{ts} = L_h[s, x_t]
        left = torch.gather(h.left, 2, f.index.unsqueeze(1).expand(-1, h.positions(), -1)).transpose(1, 2)
    else:  # (L_f Eᵀ)_{ts} = L_f[t, x_s]
        left = torch.gather(f.left, 2, h.index.unsqueeze(1).expand(-1, f.positions(), -1))
    return (left.to(dtype) * right).sum((1, 2), dtype=norm_dtype(dtype))
