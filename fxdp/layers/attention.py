"""DPMultiheadAttention: ``nn.MultiheadAttention`` that ``torch.fx`` can trace.

``nn.MultiheadAttention.forward`` branches on tensor properties (rank, mask
dtype, a fused inference fast path), so the DPTracer cannot trace it and would
serve the whole layer with the slow ``torch.func`` fallback. This subclass
computes the same math (Vaswani et al. 2017, "Attention is all you need";
PyTorch's non-fast-path ``F.multi_head_attention_forward``) from ops that have
per-sample rules:

* in-projections: ``F.linear(x, in_proj_weight, in_proj_bias)`` for self-attention
  (the linear rule, ``grad W_i = sum_t g_{i,t} x_{i,t}^T``); for cross-attention
  ``packed_linear``, a linear layer on a row block of the packed weight, whose rule
  is the linear rule written into those rows (zeros elsewhere);
* ``bias_k``/``bias_v``: ``append_kv_bias`` appends the bias as one more key/value
  position of every sample; sample i's gradient is the output gradient at that
  position;
* the attention itself (masks, softmax, dropout, ``F.scaled_dot_product_attention``)
  has no parameters, so per-sample gradients flow through it exactly;
* ``out_proj`` is the original ``nn.Linear`` submodule (the linear rule).

Parameters, submodules and ``state_dict`` keys are those of
``nn.MultiheadAttention`` (the packed ``in_proj_weight``/``in_proj_bias`` or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight``), so checkpoints load both
ways. Mask handling that depends on tensor values or dtypes (bool or float
masks, 2-D or 3-D ``attn_mask``) runs inside ``attention_mask``, one graph node
evaluated at run time. ``need_weights``, ``average_attn_weights`` and
``is_causal`` must be Python bools where the layer is called (they select the
graph); attention dropout is an ``nn.Dropout`` submodule so that ``.eval()``
switches it off in a traced graph too.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = ["DPMultiheadAttention", "packed_linear", "append_kv_bias", "attention_mask", "transplant"]

Rows = Optional[Tuple[int, int]]


# --------------------------------------------------------------------------- ops


def packed_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, rows: Rows = None,
                  bias_rows: Rows = None) -> Tensor:
    """``F.linear(input, weight[r0:r1], bias[b0:b1])``: one projection out of packed
    q/k/v weights (``rows``/``bias_rows`` are ``(start, stop)``; ``None``: all rows)."""
    w = weight if rows is None else weight[rows[0]:rows[1]]
    b = bias if bias is None or bias_rows is None else bias[bias_rows[0]:bias_rows[1]]
    return F.linear(input, w, b)


def append_kv_bias(input: Tensor, bias: Tensor) -> Tensor:
    """``[B, S, E] -> [B, S + 1, E]``: ``bias`` (``[1, 1, E]``) appended as a last
    key/value position of every sample (``add_bias_kv``)."""
    return torch.cat([input, bias.reshape(1, 1, -1).expand(input.shape[0], 1, -1)], dim=1)


def _float_mask(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """PyTorch's mask convention: bool ``True`` = masked (``-inf``), float = additive."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def attention_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], q: Tensor, k: Tensor,
                   num_heads: int, causal: bool, extra: int) -> Optional[Tensor]:
    """The additive mask of ``nn.MultiheadAttention``, broadcastable to
    ``[B, num_heads, L, S + extra]`` (``None`` when there is none).

    ``q``: ``[B, L, E]`` projected queries; ``k``: ``[B, S, E]`` projected keys
    before the ``extra`` appended positions (``bias_k``, zero attention), which no
    mask hides. ``causal``: the ``is_causal`` hint without a key padding mask:
    PyTorch then ignores ``attn_mask`` and uses the top-left causal mask over all
    ``S + extra`` keys (as ``F.scaled_dot_product_attention(is_causal=True)``).
    Runs as one graph node (masks carry no parameters; their dtype and rank are
    only known at run time)."""
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    if causal:
        hidden = torch.ones(L, S + extra, dtype=torch.bool, device=q.device).triu(1)
        return torch.zeros(L, S + extra, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        mask = _float_mask(attn_mask, "attn_mask", q.dtype)
        if mask.dim() == 2:
            if tuple(mask.shape) != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be {(L, S)}.")
        elif mask.dim() == 3:
            if tuple(mask.shape) != (B * num_heads, L, S):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {mask.shape}, but should be {(B * num_heads, L, S)}."
                )
            mask = mask.view(B, num_heads, L, S)
        else:
            raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
    if key_padding_mask is not None:
        kpm = _float_mask(key_padding_mask, "key_padding_mask", q.dtype)
        if tuple(kpm.shape) != (B, S):
            raise AssertionError(f"expecting key_padding_mask shape of {(B, S)}, but got {tuple(kpm.shape)}")
        kpm = kpm.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    if mask is not None and extra:
        mask = F.pad(mask, (0, extra))
    return mask


# one graph node each (the DPTracer does not trace into them)
torch.fx.wrap("packed_linear")
torch.fx.wrap("append_kv_bias")
torch.fx.wrap("attention_mask")


# --------------------------------------------------------------------------- module


def transplant(m: nn.Module, cls: type) -> nn.Module:
    """A shallow copy of ``m`` of class ``cls`` with its own parameter, buffer,
    child and hook tables holding the same objects (parameters stay shared, ``m``
    is not modified)."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for key, value in m.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules") or (isinstance(value, dict) and "hook" in key):
            new.__dict__[key] = type(value)(value)  # own tables: hooks added later stay apart
    new.__dict__["_non_persistent_buffers_set"] = set(m.__dict__.get("_non_persistent_buffers_set", ()))
    return new


def _static_flag(value: Any, name: str) -> bool:
    if isinstance(value, torch.fx.Proxy):
        raise TypeError(
            f"DPMultiheadAttention: {name} must be a Python bool where the layer is called, not a traced value "
            "(it selects the computation). Fix: call the layer from a module that passes a constant, e.g. "
            f"attn(q, k, v, {name}=False)."
        )
    return bool(value)


class DPMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the same arguments, parameters, ``state_dict``
    and outputs, written so that ``fxdp.privatize`` gives exact per-sample
    gradients (see the module docstring). ``from_torch``/``to_torch`` convert
    sharing the parameters."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.attn_dropout = nn.Dropout(dropout)

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """The DP layer of ``m``, sharing its parameters and ``out_proj``."""
        new = transplant(m, cls)
        new._modules["attn_dropout"] = nn.Dropout(m.dropout)
        new.attn_dropout.train(m.training)
        return new  # type: ignore[return-value]

    def to_torch(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` sharing this layer's parameters."""
        new = transplant(self, nn.MultiheadAttention)
        new._modules.pop("attn_dropout", None)
        return new  # type: ignore[return-value]

    # -- forward ------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        need_weights = _static_flag(need_weights, "need_weights")
        average_attn_weights = _static_flag(average_attn_weights, "average_attn_weights")
        is_causal = _static_flag(is_causal, "is_causal")
        if isinstance(query, Tensor) and query.dim() == 2:  # unbatched (eager only; not under tracing)
            return self._unbatched(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        E, H = self.embed_dim, self.num_heads
        D = E // H
        q, k, v = self._in_projection(query, key, value)
        if not self.batch_first:  # [L, B, E] -> [B, L, E]
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        k_in = k
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k, v = append_kv_bias(k, self.bias_k), append_kv_bias(v, self.bias_v)
            extra += 1
        if self.add_zero_attn:
            extra += 1
        # PyTorch uses the causal hint instead of attn_mask only without padding mask and weights
        causal = is_causal and key_padding_mask is None and not need_weights
        explicit = need_weights or self.dropout > 0.0
        mask = None
        if (causal and explicit) or (not causal and (attn_mask is not None or key_padding_mask is not None)):
            mask = attention_mask(attn_mask, key_padding_mask, q, k_in, H, causal, extra)
        # heads: [B, L, E] -> [B, H, L, D]
        qh = q.unflatten(-1, (H, D)).transpose(1, 2)
        kh = k.unflatten(-1, (H, D)).transpose(1, 2)
        vh = v.unflatten(-1, (H, D)).transpose(1, 2)
        if self.add_zero_attn:
            kh, vh = F.pad(kh, (0, 0, 0, 1)), F.pad(vh, (0, 0, 0, 1))
        weights = None
        if explicit:
            scores = torch.matmul(qh * math.sqrt(1.0 / float(D)), kh.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if self.dropout > 0.0:
                weights = self.attn_dropout(weights)
            out = torch.matmul(weights, vh)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # [B, L, E]
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:  # separate q/k/v weights, packed bias
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            if b is None:
                return tuple(F.linear(x, w) for x, w in zip((query, key, value), ws))  # type: ignore[return-value]
            return tuple(packed_linear(x, w, b, None, (i * E, (i + 1) * E))  # type: ignore[return-value]
                         for i, (x, w) in enumerate(zip((query, key, value), ws)))
        W = self.in_proj_weight
        if query is key and key is value:  # self-attention: one linear layer on the packed weight
            proj = F.linear(query, W, b)
            return proj[..., :E], proj[..., E:2 * E], proj[..., 2 * E:]
        q = packed_linear(query, W, b, (0, E), (0, E))
        if key is value:  # encoder-decoder attention
            kv = packed_linear(key, W, b, (E, 3 * E), (E, 3 * E))
            return q, kv[..., :E], kv[..., E:]
        return (q, packed_linear(key, W, b, (E, 2 * E), (E, 2 * E)),
                packed_linear(value, W, b, (2 * E, 3 * E), (2 * E, 3 * E)))

    def _unbatched(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                   need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                   is_causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        d = 0 if self.batch_first else 1
        seen: Dict[int, Tensor] = {}

        def batched(t: Tensor) -> Tensor:  # keep self-attention identities
            if id(t) not in seen:
                seen[id(t)] = t.unsqueeze(d)
            return seen[id(t)]

        kpm = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        out, w = self.forward(batched(query), batched(key), batched(value), kpm, need_weights, attn_mask,
                              average_attn_weights, is_causal)
        return out.squeeze(d), (None if w is None else w.squeeze(0))
