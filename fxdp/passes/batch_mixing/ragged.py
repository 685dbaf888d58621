"""Flat inputs: the samples' data concatenated along dimension 0 and cut into samples
by an offsets input, as ``nn.EmbeddingBag`` takes them (``input`` and
``per_sample_weights`` beside ``offsets``, ``input_batch_dims=[None, 0]``).

Such an input has no batch dimension, yet every element belongs to one sample: element
``i`` to bag ``j`` when ``offsets[j] <= i < offsets[j + 1]``. The batch-mixing analysis
tags it so (:func:`segment_tags`), and runs the model at its two batch sizes on inputs
rebuilt with ``k`` elements a bag, each bag's own elements repeated (:func:`resize_ragged`):
the flat dimension is then the batch folded with ``k``, a fold the analysis checks like
any other. An input without a batch dimension that no offsets input cuts into samples
cannot be attributed to them (:func:`segmentation` returns the reason), so the analysis
refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..batch_dims import input_batch_dim
from .tags import along

__all__ = ["Segmentation", "flat_inputs", "segmentation", "resize_ragged", "segment_tags", "one_bag"]


@dataclass(frozen=True)
class Segmentation:
    """Positional inputs ``flat`` (no batch dimension, ``length`` rows) cut into bags by
    the 1-D input ``offsets`` (bag ``j`` starts at ``bounds[j]``, ends at ``bounds[j + 1]``)."""

    offsets: int
    flat: Tuple[int, ...]
    bounds: Tuple[int, ...]

    @property
    def bags(self) -> int:
        return len(self.bounds) - 1

    def bag_len(self) -> int:
        """``k``, the rows a bag gets in the analysis' inputs: the longest bag's, at least 1."""
        return max([1] + [e - s for s, e in zip(self.bounds, self.bounds[1:])])


def flat_inputs(args: Sequence[Any], dims: Sequence[Optional[int]]) -> List[int]:
    """Positional inputs declared without a batch dimension that hold data (a tensor of
    rank >= 1, or a container of them; a 0-d tensor is a scalar every sample shares)."""
    return [i for i, (a, d) in enumerate(zip(args, dims))
            if d is None and any(isinstance(t, Tensor) and t.dim() >= 1 for t in tree_flatten(a)[0])]


def _is_offsets(t: Any, d: Optional[int], length: int) -> bool:
    if not isinstance(t, Tensor) or t.dim() != 1 or input_batch_dim(t, d) != 0 or t.numel() == 0:
        return False
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        return False
    v = t.detach().cpu()
    return int(v[0]) == 0 and bool((v[1:] >= v[:-1]).all()) and int(v[-1]) <= length


def segmentation(args: Sequence[Any], dims: Sequence[Optional[int]],
                 prefer: Sequence[int] = ()) -> Union[Segmentation, str, None]:
    """How the flat inputs of ``args`` are cut into samples: a :class:`Segmentation`;
    ``None`` when there are no flat inputs; otherwise the reason they cannot be
    attributed to samples (a string). ``prefer``: inputs the model passes as offsets
    (to ``embedding_bag``), which decide between several inputs that could be."""
    flat = flat_inputs(args, dims)
    if not flat:
        return None
    nested = [i for i in flat if not isinstance(args[i], Tensor)]
    if nested:
        return f"input {nested[0]} is a container of tensors without a batch dimension"
    lengths = {int(args[i].shape[0]) for i in flat}
    if len(lengths) > 1:
        return f"the inputs without a batch dimension have different lengths {sorted(lengths)}"
    (length,) = lengths
    cands = [i for i, (a, d) in enumerate(zip(args, dims)) if _is_offsets(a, d, length)]
    if len(cands) > 1 and len(set(cands) & set(prefer)) == 1:
        cands = sorted(set(cands) & set(prefer))
    if len(cands) != 1:
        return ("no batched 1-D integer input is their offsets (0 first, non-decreasing, at most their length "
                f"{length})" if not cands else f"inputs {cands} could each be their offsets")
    off = [int(v) for v in args[cands[0]].detach().cpu().tolist()]
    return Segmentation(cands[0], tuple(flat), tuple(off) + (length,))


def resize_ragged(args: Sequence[Any], dims: Sequence[Optional[int]], seg: Segmentation, b: int,
                  resize: Any) -> List[Any]:
    """``args`` at batch size ``b``: bag ``j`` is bag ``j mod bags`` of the example, its
    rows repeated to ``k`` (:meth:`Segmentation.bag_len`); offsets ``0, k, 2k, ...``; the
    other inputs by ``resize(args, dims, b)`` (cyclically, as the batched analysis does)."""
    k = seg.bag_len()
    rows: List[int] = []
    for j in range(b):
        s, e = seg.bounds[j % seg.bags], seg.bounds[j % seg.bags + 1]
        # an empty bag gets some valid row: the analysis reads where rows go, not their values
        rows += [s + r % (e - s) for r in range(k)] if e > s else [0] * k
    out = resize(args, dims, b)
    for i in seg.flat:
        out[i] = args[i].index_select(0, torch.tensor(rows, device=args[i].device))
    off = args[seg.offsets]
    out[seg.offsets] = torch.arange(0, k * b, k, dtype=off.dtype, device=off.device)
    return out


def segment_tags(shape: Sequence[int], k: int, b: int) -> Tensor:
    """Tags of a flat input at batch size ``b`` with ``k`` rows a bag: row ``i`` is sample
    ``i // k``'s."""
    return along(torch.arange(1, b + 1).repeat_interleave(k), 0, shape)


def one_bag(args: Sequence[Any], seg: Segmentation, i: int) -> List[Any]:
    """Bag ``i``'s rows of the flat inputs and its offsets (``[0]``); the other inputs as given."""
    out = list(args)
    s, e = seg.bounds[i], seg.bounds[i + 1]
    for k in seg.flat:
        out[k] = args[k][s:e]
    out[seg.offsets] = args[seg.offsets].new_zeros(1)
    return out
