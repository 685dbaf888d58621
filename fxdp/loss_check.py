"""Is the loss a per-sample loss, reduced as ``loss_reduction`` says? Checks on the first
training steps, read from the gradient reaching the model's output.

The loss is outside the model, so these checks read the gradient at the model's output.
For softmax cross-entropy each row ``r`` of it (a sample of ``[B, C]`` logits, a token of
``[B, T, C]``) is exactly ``c_r * (softmax(z_r) - e_{y_r})``, for ``nll_loss`` on
log-probabilities ``-c_r e_{y_r}``: ``c_r`` is solved from the row's most negative entry and
the whole row must match (:func:`row_scales`). Other losses (or a sum of several) do not
match and are not judged.

* **Reduction.** Per-sample gradients follow Opacus' convention: for
  ``loss_reduction="mean"`` the rows are multiplied by the batch size, so a loss summed
  over the batch gives gradients B times too large (clipped far harder than meant), and a
  mean loss with ``loss_reduction="sum"`` B times too small. Privacy holds either way (the
  clip bound caps each row); training silently degrades: a warning, first step.
* **A normalizer the batch shares.** Cross-entropy with class weights and
  ``reduction="mean"`` divides by the batch's sum of weights ``sum_j w_{y_j}``; a token
  loss with ``reduction="mean"`` divides by the batch's count of tokens that are not
  ignored. Each sample's gradient then depends on the other samples' labels or lengths:
  removing one sample rescales every other row, so the clipped sums of two neighbouring
  batches lie farther apart than the bound ``C`` the noise is calibrated to (class
  weights ``[1, 1, 50]``, 16 samples: 3.8 C, ``tests/test_loss_check.py``) and the DP
  guarantee does not hold. Refused (``PerSampleGradientError``; a warning with
  ``allow_unsafe_model``). Token rows: a per-sample loss scales sample ``i``'s rows by a
  number of its own (``1 / (B n_i)`` for the mean of token means), the batch's token
  mean by ``1 / N``, ``N`` the batch's count: that pattern, with lengths ``n_i`` that
  differ, is refused at once. Class weights: a per-sample loss keeps each class's scale
  (times ``B`` for a mean) from batch to batch, the batch-normalized one does not: read
  over the first :data:`WATCHED_STEPS` training steps, refused at the first batch that
  shows it (earlier steps were taken).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .errors import PerSampleGradientError

__all__ = ["LossWatch", "row_scales", "WATCHED_STEPS"]

#: training forwards whose output gradient is read (class weights show only across batches)
WATCHED_STEPS = 4
#: logits are read in float64 pieces of about this many elements (a language model's
#: ``[B, T, V]`` logits would take gigabytes in float64 at once)
_PIECE_ELEMENTS = 1 << 20
#: rows whose target probability is above this have a tiny gradient: ``c`` is ill-defined there
_FITTED = 0.99
#: a token loss's scales are solved from at most this many labelled rows of each sample (its
#: count of labelled rows from all of them): a language model's ``[B, T, V]`` logits are read
#: in ``B x 8`` rows
_ROWS_PER_SAMPLE = 8

_FIX_TOKENS = (
    "Fix: average each sample's own tokens, then over the batch: "
    "(token_loss * mask).sum(1) / mask.sum(1), then .mean() (fxdp.huggingface.per_sample_loss(logits, labels, "
    "'lm') does this for Hugging Face labels)"
)
_FIX_WEIGHTS = (
    "Fix: reduce per sample with a fixed denominator: F.cross_entropy(logits, y, weight=w, reduction='none')"
    ".mean() (or .sum() with loss_reduction='sum')"
)


def _logits(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def row_scales(z: Tensor, g: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """Per row of ``[R, C]`` outputs ``z`` and their gradient ``g``: ``(c, label, kind)``, float64
    ``c`` with ``g_r = c_r (softmax(z_r) - e_{label_r})`` (cross-entropy on logits) or, where no
    row has that form, ``g_r = -c_r e_{label_r}`` (``nll_loss`` on log-probabilities),
    ``label_r`` the row's most negative entry, and ``kind_r`` 1 (usable), 0 (ignored: an
    all-zero row, as ``ignore_index`` and padding give) or -1 (fitted: ``c`` ill-defined).
    ``None`` where the gradient has neither form (another loss). Read in float64 pieces."""
    return _scales(z, g, _cross_entropy_piece) or _scales(z, g, _nll_piece)


def _scales(z: Tensor, g: Tensor, piece: Any) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    R, C = z.shape
    rows = max(1, _PIECE_ELEMENTS // max(C, 1))
    out = []
    for s in range(0, R, rows):
        got = piece(z[s:s + rows].double(), g[s:s + rows].double())
        if got is None:
            return None
        out.append(got)
    return tuple(torch.cat(t) for t in zip(*out))  # type: ignore[return-value]


def _cross_entropy_piece(z: Tensor, g: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    p = torch.softmax(z, dim=-1)
    j = g.argmin(dim=-1, keepdim=True)
    pj = p.gather(1, j)
    c = (g.gather(1, j) / (pj - 1)).squeeze(1)
    ignored = (g == 0).all(dim=1)
    usable = (pj.squeeze(1) < _FITTED) & ~ignored
    if bool(usable.any()):
        pred = c[:, None] * (p - torch.zeros_like(p).scatter_(1, j, 1.0))
        if not torch.allclose(g[usable], pred[usable], rtol=1e-3, atol=1e-6 * float(c[usable].abs().max())):
            return None  # not (only) a softmax cross-entropy
    return torch.where(ignored, 0.0, c), j.squeeze(1), torch.where(usable, 1, torch.where(ignored, 0, -1))


def _nll_piece(z: Tensor, g: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    nonzero = (g != 0).sum(dim=1)
    j = g.argmin(dim=-1)
    c = -g.gather(1, j[:, None]).squeeze(1)
    if bool((nonzero > 1).any()) or bool((c[nonzero == 1] <= 0).any()):
        return None
    ignored = nonzero == 0
    return torch.where(ignored, 0.0, c), j, torch.where(ignored, 0, 1)


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b))


def _reduction(c: Tensor, B: int) -> Optional[str]:
    """``"sum"`` / ``"mean"`` where every usable sample row has the scale 1 / ``1/B``."""
    scale = float(c.median())
    if not torch.allclose(c, torch.full_like(c, scale), rtol=1e-3):
        return None
    if abs(scale - 1.0) < 1e-3:
        return "sum"
    if abs(scale * B - 1.0) < 1e-3:
        return "mean"
    return None


def _token_rows(z: Tensor, g: Tensor, classes: int) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """``(c [B, r], kind [B, r], counts [B])`` for ``[B, ..., C]`` outputs with the classes along
    dimension ``classes`` (-1 or 1): :func:`row_scales` of up to :data:`_ROWS_PER_SAMPLE`
    labelled rows of each sample (a labelled row's gradient is not all zero) and each sample's
    count of labelled rows; ``None`` where those rows are of neither form. Only the picked rows
    are copied (a language model's logits can take gigabytes)."""
    B = z.shape[0]
    C = z.shape[classes]
    if classes == -1:
        z, g = z.reshape(B, -1, C), g.reshape(B, -1, C)
    else:
        z, g = z.reshape(B, C, -1), g.reshape(B, C, -1)
    labelled = torch.linalg.vector_norm(g, ord=float("inf"), dim=2 if classes == -1 else 1) > 0
    r = min(_ROWS_PER_SAMPLE, labelled.shape[1])
    idx = torch.sort(labelled.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :r]

    def pick(t: Tensor) -> Tensor:
        if classes == -1:
            return t.gather(1, idx[:, :, None].expand(B, r, C)).reshape(-1, C)
        return t.gather(2, idx[:, None, :].expand(B, C, r)).transpose(1, 2).reshape(-1, C)

    got = row_scales(pick(z), pick(g))
    if got is None:
        return None
    c, _, kind = got
    return c.view(B, r), kind.view(B, r), labelled.sum(1)


def _token_mean_over_batch(c: Tensor, kind: Tensor, counts: Tensor, tol: float) -> bool:
    """Rows of each sample (tokens, pixels): whether each sample's rows are scaled by ``1 / N``,
    ``N`` the batch's count of labelled rows, while the samples' counts differ (equal counts
    make it the mean of the samples' means: a per-sample loss)."""
    N = int(counts.sum())
    if N == 0 or int(counts.min()) == int(counts.max()):
        return False
    for ci, ki in zip(c, kind):
        ci = ci[ki == 1]
        if ci.numel() == 0:
            continue
        if not (_close(float(ci.min()), float(ci.max()), tol) and _close(float(ci[0]) * N, 1.0, tol)):
            return False  # a scale of its own (token weights, a per-sample mean): not this pattern
    return True


class LossWatch:
    """The checks of one DP module's first :data:`WATCHED_STEPS` training forwards (the
    class scales they read, kept from step to step)."""

    def __init__(self) -> None:
        self.steps = 0
        #: label -> (c * B, c) of the batches read so far
        self.class_scales: Dict[int, Tuple[float, float]] = {}

    def watch(self, output: Any, loss_reduction: str, batch_size: Optional[int], allow_unsafe: bool) -> None:
        """Hook the gradient of this training forward's logits (``[B, C]`` or ``[B, ..., C]``,
        B >= 2) for the checks above."""
        if self.steps >= WATCHED_STEPS:
            return
        self.steps += 1
        z = _logits(output)
        if (z is None or not z.requires_grad or not z.is_floating_point() or z.dim() < 2 or z.shape[-1] < 2
                or not batch_size or batch_size < 2 or int(z.shape[0]) != batch_size):
            return
        first = self.steps == 1
        if z.dim() > 2 and not first:  # a token loss shows its normalizer in one batch: read once (V can be 50k)
            return

        def hook(g: Tensor) -> None:
            with torch.no_grad():
                self._read(z.detach(), g.detach(), loss_reduction, batch_size, first, allow_unsafe)

        z.register_hook(hook)

    def _read(self, z: Tensor, g: Tensor, loss_reduction: str, B: int, first: bool, allow_unsafe: bool) -> None:
        tol = max(1e-5, 8 * torch.finfo(g.dtype).eps)  # c from the loss's own rounding
        if z.dim() > 2:
            # the classes last ([B, T, V]) or along dimension 1 (segmentation's [B, C, H, W])
            rows = _token_rows(z, g, -1) or _token_rows(z, g, 1)
            if rows is not None and _token_mean_over_batch(*rows, tol):
                self._refuse(
                    "the loss divides by the batch's count of tokens or pixels (e.g. cross_entropy(logits.view(-1, "
                    "V), labels.view(-1), ignore_index=...) with reduction='mean'): each sample's gradient is "
                    "scaled by 1 / (labelled tokens in the batch), which depends on the other samples' lengths",
                    _FIX_TOKENS,
                    allow_unsafe)
            return
        scales = row_scales(z, g)
        if scales is None:
            return
        c, label, kind = scales
        usable = kind == 1
        if first and int(usable.sum()) >= 2:
            reduction = _reduction(c[usable], B)
            if reduction is not None and reduction != loss_reduction:
                factor = f"{B} times too {'large' if reduction == 'sum' else 'small'}"
                warnings.warn(
                    f"fxdp: the loss looks reduced with '{reduction}' over the batch (the gradient at the model's "
                    f"output is a cross-entropy gradient scaled by {'1' if reduction == 'sum' else '1/B'}), but "
                    f"make_private/privatize got loss_reduction={loss_reduction!r}: per-sample gradients are "
                    f"{factor} and clipping is not what max_grad_norm says. Fix: use "
                    f"criterion(reduction={loss_reduction!r}), or pass loss_reduction={reduction!r}",
                    stacklevel=2,
                )
        self._class_scales(c[usable], label[usable], B, tol, allow_unsafe)

    def _class_scales(self, c: Tensor, label: Tensor, B: int, tol: float, allow_unsafe: bool) -> None:
        """Sample rows: each class's scale must stay that of the batches before, times ``B``
        (a mean) or as is (a sum, or a fixed denominator)."""
        now: Dict[int, Tuple[float, float]] = {}
        for k in label.unique().tolist():
            ck = c[label == k]
            lo, hi = float(ck.min()), float(ck.max())
            if not _close(lo, hi, tol):
                return  # not a function of the label (per-sample weights of the data): not judged
            now[int(k)] = (hi * B, hi)
        for k, (cb, c1) in now.items():
            old = self.class_scales.get(k)
            if old is not None and not (_close(cb, old[0], tol) or _close(c1, old[1], tol)):
                self._refuse(
                    f"the loss weighs class {k}'s samples by {cb:.6g}/B in this batch and {old[0]:.6g}/B in an "
                    "earlier one: its denominator depends on the batch (cross-entropy with weight= and "
                    "reduction='mean' divides by the batch's sum of class weights; ignore_index with "
                    "reduction='mean', by the batch's count of labelled samples), so each sample's gradient "
                    "depends on the other samples' labels", _FIX_WEIGHTS, allow_unsafe, earlier=self.steps - 1)
                return
        self.class_scales.update(now)

    @staticmethod
    def _refuse(what: str, fix: str, allow_unsafe: bool, earlier: int = 0) -> None:
        msg = (f"fxdp: {what}. Removing one sample then rescales every other sample's gradient, so the clip "
               "bound no longer bounds one sample's influence on the step and the noise does not give the DP "
               f"guarantee. {fix}")
        if allow_unsafe:
            warnings.warn(msg + " (allow_unsafe_model=True: served, without a DP guarantee)", stacklevel=3)
            return
        ran = (f" The {earlier} training step(s) before it used this loss too: their privacy accounting does not "
               "hold either." if earlier else "")
        raise PerSampleGradientError(msg + ". This step was not applied (its backward pass raised)." + ran)
