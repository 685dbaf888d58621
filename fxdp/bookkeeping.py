"""Book-keeping clipping: clipped sums without per-sample gradients.

Bu, Wang, Zha, Karypis 2023, "Differentially Private Optimization on Large Model
at Small Cost" (book-keeping, BK): DP-SGD needs only

    sum_i c_i g_i,   c_i = min(1, C / ||g_i||),

not the per-sample gradients g_i. Each capture op keeps its activations ``a`` and
output gradients ``g`` during the backward pass; when the pass ends, each rule
gives per-sample squared norms from ``(a, g)`` (ghost norms where cheaper,
Goodfellow 2015 / Li et al. 2021), the norms give the clip factors, and each rule
forms its layer's clipped sum ``a^T (c * g)`` directly. Autograd never computes
the non-private weight gradients, and the records are freed as soon as the sums
are formed.

Exactness notes: a parameter used by several capture ops (tied weights) has
per-sample gradient g_i = g1_i + g2_i, whose norm is not a sum of norms: such
parameters are materialized per sample (only they). Layers served by the
``torch.func`` fallback materialize only their own per-sample gradients.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import torch
from torch import Tensor

from .errors import PerSampleGradientError

if TYPE_CHECKING:  # capture.py calls finish_backward; the types only are needed here
    from .capture import LayerRecord, Recorder

__all__ = ["finish_backward"]


def _scale(recorder: Recorder, B: int) -> float:
    """Raw per-sample gradients of a mean-reduced loss carry 1/B (Opacus' convention undoes it)."""
    return float(B) if recorder.loss_reduction == "mean" else 1.0


def finish_backward(recorder: Recorder, records: List[LayerRecord]) -> None:
    """Per-sample norms, clip factors and clipped sums for one backward pass."""
    if not records:
        return
    if all(r.generation in recorder.stand_ins for r in records):  # an empty batch: no samples
        empty = torch.zeros(0)
        recorder.norms.append(empty)
        recorder.factors.append(empty)
        recorder.passes += 1
        return
    cfg = recorder.clipping
    if cfg is None:
        raise PerSampleGradientError(
            "grad_sample_mode='bk' forms clipped sums at the end of the backward pass and needs the clip "
            "bound: use PrivacyEngine.make_private(..., grad_sample_mode='bk'), or set "
            "dp_model.recorder.clipping = fxdp.capture.ClipConfig(bounds=lambda: C)."
        )
    B = records[0].batch_size
    if any(r.batch_size != B for r in records):
        raise PerSampleGradientError("records of one backward pass disagree on the batch size")
    scale = _scale(recorder, B)

    if cfg.params is not None:  # clip over the optimizer's parameters only, as materialize mode does
        records = [r for r in records if any(id(p) in cfg.params for p in r.params.values())]
        for r in records:
            r.params = {i: p for i, p in r.params.items() if id(p) in cfg.params}
        if not records:
            recorder.passes += 1
            return
    uses: Dict[int, int] = {}
    for r in records:
        for p in r.params.values():
            uses[id(p)] = uses.get(id(p), 0) + 1
    params = {id(p): p for r in records for p in r.params.values()}

    # 1. per-sample squared norms per parameter (raw scale)
    sq: Dict[int, Tensor] = {}
    tied: Dict[int, Tensor] = {}  # materialized per-sample gradients of tied parameters
    for r in records:
        single = [i for i, p in r.params.items() if uses[id(p)] == 1]
        multi = [i for i, p in r.params.items() if uses[id(p)] > 1]
        if single:
            for i, v in r.op.norm_sample_sq(r, single).items():
                sq[id(r.params[i])] = v
        if multi:
            gs = r.op.per_sample_grads(r)
            for i in multi:
                k = id(r.params[i])
                tied[k] = tied[k] + gs[i] if k in tied else gs[i]
    for k, g in tied.items():
        sq[k] = g.flatten(1).pow(2).sum(1)

    # 2. clip factors (Opacus' convention: norms of scale * raw gradients)
    keys = list(params)
    norms = torch.stack([sq[k] for k in keys], 1).clamp_min(0).sqrt() * scale if keys else None
    bounds = cfg.bounds()
    if cfg.per_layer:
        C = torch.tensor([float(bounds[k]) for k in keys], dtype=norms.dtype, device=norms.device)
        factors = (C / (norms + 1e-6)).clamp(max=1.0)  # [B, P]
        per_param = {k: factors[:, j] for j, k in enumerate(keys)}
        recorder.norms.append(norms.detach())
    else:
        total = norms.norm(dim=1)
        factors = (float(bounds) / (total + 1e-6)).clamp(max=1.0)  # [B]
        per_param = {k: factors for k in keys}
        recorder.norms.append(total.detach())
    # nonfinite="drop" (failure handling): factor 0 for samples with a NaN/inf gradient;
    # recorder.norms keeps their non-finite norms, so the optimizer can report them.
    bad = None
    if getattr(recorder, "nonfinite", "raise") == "drop":
        bad = ~torch.isfinite(norms).all(dim=1)
        if bool(bad.any()):
            factors = torch.where(bad.view(-1, *[1] * (factors.dim() - 1)), 0, factors)
            per_param = {k: factors[:, j] for j, k in enumerate(keys)} if cfg.per_layer else {k: factors for k in keys}
        else:
            bad = None
    recorder.factors.append(factors.detach())

    # 3. clipped sums sum_i c_i * (scale * raw_i), layer by layer
    sums: Dict[int, Tensor] = {}
    # one scaled tensor per distinct factor vector: RuleCapture.clipped_sum groups a
    # layer's parameters by tensor identity and then calls the rule once per layer
    scaled = {id(f): f * scale for f in {id(f): f for f in per_param.values()}.values()}
    for r in records:
        want = {i: scaled[id(per_param[id(p)])] for i, p in r.params.items() if uses[id(p)] == 1}
        if want and bad is not None:  # a^T (0 * nan) is nan: materialize and zero the bad rows
            gs = r.op.per_sample_grads(r)
            for i, f in want.items():
                g = torch.where(bad.view(-1, *[1] * (gs[i].dim() - 1)), 0, gs[i])
                k = id(r.params[i])
                v = torch.einsum("b,b...->...", f.to(g.dtype), g)
                sums[k] = sums[k] + v if k in sums else v
        elif want:
            for i, v in r.op.clipped_sum(r, want).items():
                k = id(r.params[i])
                sums[k] = sums[k] + v if k in sums else v
    for k, g in tied.items():
        if bad is not None:
            g = torch.where(bad.view(-1, *[1] * (g.dim() - 1)), 0, g)
        sums[k] = torch.einsum("b,b...->...", (per_param[k] * scale).to(g.dtype), g)

    for k, v in sums.items():
        p = params[k]
        v = v.to(p.dtype).reshape(p.shape)
        recorder.clipped[k] = recorder.clipped[k] + v if k in recorder.clipped else v
        recorder.clipped_params[k] = p
    recorder.passes += 1
