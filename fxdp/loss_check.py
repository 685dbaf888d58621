"""Is the loss reduced as ``loss_reduction`` says? A check on the first training step.

Per-sample gradients follow Opacus' convention: for ``loss_reduction="mean"`` the rows
are multiplied by the batch size, so a loss summed over the batch (``reduction="sum"``)
gives gradients B times too large (clipped far harder than meant), and a mean loss with
``loss_reduction="sum"`` gives them B times too small. Privacy holds either way (the
clip bound caps each row), but training silently degrades.

The loss is outside the model, so the check reads the gradient reaching the model's
output. For softmax cross-entropy on ``[B, C]`` logits it is exactly
``c * (softmax(z_i) - e_{y_i})`` with ``c = 1/B`` (mean) or ``1`` (sum): ``c`` is solved
from the most negative entry of each row and the whole row must match. Other losses
(or a sum of several) do not match and are not judged.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["watch_loss_reduction"]


def _logits(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def watch_loss_reduction(output: Any, loss_reduction: str, batch_size: Optional[int]) -> None:
    """Hook the gradient of the first training forward's ``[B, C]`` logits (B >= 2) and
    warn when it is a cross-entropy gradient reduced the other way."""
    z = _logits(output)
    if z is None or not z.requires_grad or z.dim() != 2 or z.shape[1] < 2 or not batch_size or batch_size < 2:
        return
    B = int(z.shape[0])
    if B != batch_size:
        return

    def hook(g: Tensor) -> None:
        with torch.no_grad():
            reduction = _cross_entropy_reduction(z.detach().double(), g.detach().double(), B)
        if reduction is not None and reduction != loss_reduction:
            factor = f"{B} times too {'large' if reduction == 'sum' else 'small'}"
            warnings.warn(
                f"fxdp: the loss looks reduced with '{reduction}' over the batch (the gradient at the model's "
                f"output is a cross-entropy gradient scaled by {'1' if reduction == 'sum' else '1/B'}), but "
                f"make_private/privatize got loss_reduction={loss_reduction!r}: per-sample gradients are {factor} "
                f"and clipping is not what max_grad_norm says. Fix: use criterion(reduction={loss_reduction!r}), "
                f"or pass loss_reduction={reduction!r}",
                stacklevel=2,
            )

    z.register_hook(hook)


def _cross_entropy_reduction(z: Tensor, g: Tensor, B: int) -> Optional[str]:
    p = torch.softmax(z, dim=-1)
    j = g.argmin(dim=-1, keepdim=True)
    pj = p.gather(1, j)
    usable = (pj < 0.99).squeeze(1)  # a row already fitted has a tiny gradient: c is ill-defined
    if int(usable.sum()) < 2:
        return None
    c = (g.gather(1, j) / (pj - 1)).squeeze(1)
    onehot = torch.zeros_like(p).scatter_(1, j, 1.0)
    pred = c[:, None] * (p - onehot)
    if not torch.allclose(g[usable], pred[usable], rtol=1e-3, atol=1e-6 * float(c[usable].abs().max())):
        return None  # not (only) a softmax cross-entropy
    scale = float(c[usable].median())
    if abs(scale - 1.0) < 1e-3:
        return "sum"
    if abs(scale * B - 1.0) < 1e-3:
        return "mean"
    return None
