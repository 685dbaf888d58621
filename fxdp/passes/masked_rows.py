"""Rows picked by a boolean mask, regrouped per sample: ``h[mask].view(B, -1, ...)``.

BART's, T5's (and mBART's, PLBart's, LED's, ...) sequence classification heads pool the
hidden state of each sample's end-of-sequence tokens: ``h[eos_mask, :]`` gathers the masked
rows of every sample into one ``[N, d]`` tensor (sample-major order, ``N`` known only at run
time), and ``.view(B, -1, d)`` cuts it back into samples. That is sample ``b``'s own rows only
when every sample has as many masked rows (the model checks it with
``torch.unique_consecutive`` of the counts); otherwise the cut mixes samples. The batch rules
cannot follow a size known only at run time, so such a model was refused.

This pass replaces ``view(index(h, [mask]), [B, -1, ...])`` (``h`` and ``mask`` batched on
dimension 0, ``mask`` over ``h``'s leading dimensions) by ``fxdp::rows_per_sample(h, mask)``:
the same values, computed per sample, and a refusal of the step (``ValueError``) when the
samples' counts differ. Its batch rule keeps sample ``b`` in row ``b``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor

from .batch_rules import BatchedArg, register_batch_rule
from .probe_batch import TRUSTED

__all__ = ["rows_per_sample", "regroup_masked_rows"]

aten = torch.ops.aten


@torch.library.custom_op("fxdp::rows_per_sample", mutates_args=())
def rows_per_sample(h: Tensor, mask: Tensor) -> Tensor:
    """``h[mask].view(B, k, *h.shape[mask.dim():])`` where every sample has ``k`` masked rows."""
    B = h.shape[0]
    counts = mask.reshape(B, -1).sum(1)
    if B and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"fxdp: the model gathers the rows its mask selects and cuts them into samples (h[mask].view(B, -1, "
            f"...)), but the samples select {sorted(set(counts.tolist()))} rows: the cut would give one sample "
            "another's rows. Fix: give every sample the same number of selected tokens (e.g. one end-of-sequence "
            "token each)")
    k = int(counts[0]) if B else 0
    return h[mask].reshape(B, k, *h.shape[mask.dim():])


@rows_per_sample.register_fake
def _rows_per_sample_fake(h: Tensor, mask: Tensor) -> Tensor:
    k = torch.library.get_ctx().new_dynamic_size()
    return h.new_empty(h.shape[0], k, *h.shape[mask.dim():])


def _setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    h, mask = inputs
    ctx.save_for_backward(mask)
    ctx.shape = h.shape


def _backward(ctx: Any, g: Tensor) -> tuple:
    (mask,) = ctx.saved_tensors
    grad = g.new_zeros(ctx.shape)
    grad[mask] = g.reshape(-1, *ctx.shape[mask.dim():])
    return grad, None


rows_per_sample.register_autograd(_backward, setup_context=_setup)


def _sample_rows(u: BatchedArg) -> Optional[int]:
    """Sample b's rows come from its own rows of ``h`` and its own mask row."""
    return 0 if u.name in ("h", "mask") and u.dim == 0 else None


register_batch_rule(torch.ops.fxdp.rows_per_sample.default, _sample_rows)
# its rows are sample-wise by construction (a perturbed mask changes the counts: refused, not probed)
TRUSTED.add(torch.ops.fxdp.rows_per_sample.default)


def _batch_first(n: Any, s: Any) -> bool:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(val, Tensor) and val.dim() > 0 and (n.meta.get("fxdp_batch") or [None])[0] == 0


def regroup_masked_rows(gm: fx.GraphModule, s: Any) -> int:
    """Replace each ``view(index(h, [mask]), [B, -1, ...])`` (see the module docstring; needs
    ``annotate_batch``'s hints, batch symbol ``s``). Returns how many."""
    from .symbolic_batch import _expr

    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (aten.view.default, aten.reshape.default):
            continue
        src, sizes = n.args[0], n.args[1]
        if not (isinstance(src, fx.Node) and src.target is aten.index.Tensor and len(src.args) == 2):
            continue
        h, indices = src.args
        if len(indices) != 1 or not isinstance(indices[0], fx.Node):
            continue
        mask = indices[0]
        mval = mask.meta.get("val")
        if not (isinstance(mval, Tensor) and mval.dtype == torch.bool and mval.dim() >= 2
                and _batch_first(h, s) and _batch_first(mask, s)):
            continue
        first = sizes[0].meta.get("val") if isinstance(sizes[0], fx.Node) else sizes[0]
        if not (isinstance(first, torch.SymInt) and _expr(first) == s) or len(sizes) < 2 or sizes[1] != -1:
            continue
        hval = h.meta["val"]
        if list(sizes[2:]) != list(hval.shape[mval.dim():]):
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(torch.ops.fxdp.rows_per_sample.default, (h, mask))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        done += 1
    if done:
        gm.recompile()
    return done
