"""Batch-dimension propagation: which dimension of every value is the batch.

Runs the graph twice on fake tensors (no data, no compute, no side effects) with
two batch sizes b1 != b2 and compares shapes node by node: a dimension whose size
goes b1 -> b2 is the batch dimension; one that goes k*b1 -> k*b2 folds the batch
with k other positions; one that does not change does not depend on the batch.
Ints are classified the same way (an int equal to the batch size is ``"B"``).

Hints per flattened value: an int (batch dimension), ``None`` (no batch),
``"B"`` (the batch size itself), ``("fold", dim, k)``, or ``"ambiguous"``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["propagate_batch_dims", "classify", "input_batch_dim", "per_arg", "batch_size"]

SIZES = (5, 7)


def input_batch_dim(t: Tensor, batch_dim: Optional[int]) -> Optional[int]:
    """Batch dimension of a model input: ``batch_dim`` when the tensor has it, else 0
    (``None``: the input has no batch dimension, e.g. EmbeddingBag's flat indices)."""
    if t.dim() == 0 or batch_dim is None:
        return None
    return batch_dim if t.dim() > batch_dim else 0


BatchDims = Union[int, Sequence[Optional[int]]]


def per_arg(args: Sequence[Any], batch_dim: BatchDims) -> List[Optional[int]]:
    """The batch dimension for each positional input: one int for all, or one per input."""
    if isinstance(batch_dim, int):
        return [batch_dim] * len(args)
    dims = list(batch_dim)
    if len(dims) < len(args):
        dims += [dims[-1] if dims else 0] * (len(args) - len(dims))
    return dims


def batch_size(args: Sequence[Any], batch_dim: "BatchDims") -> Optional[int]:
    """The batch size of positional inputs ``args``: the first batched tensor's size along
    its batch dimension (None when no tensor has one)."""
    for a, bd in zip(args, per_arg(args, batch_dim)):
        for t in tree_flatten(a)[0]:
            d = input_batch_dim(t, bd) if isinstance(t, Tensor) else None
            if d is not None:
                return int(t.shape[d])
    return None


def classify(v1: Any, v2: Any, b1: int, b2: int) -> Any:
    if isinstance(v1, tuple) and isinstance(v2, tuple):  # shapes
        if len(v1) != len(v2):
            return "ambiguous"
        changed = [d for d, (s1, s2) in enumerate(zip(v1, v2)) if s1 != s2]
        if not changed:
            return None
        if len(changed) > 1:
            return "ambiguous"
        d = changed[0]
        s1, s2 = v1[d], v2[d]
        if s1 == b1 and s2 == b2:
            return d
        if s1 % b1 == 0 and s2 % b2 == 0 and s1 // b1 == s2 // b2:
            return ("fold", d, s1 // b1)
        return "ambiguous"
    if isinstance(v1, int) and isinstance(v2, int) and not isinstance(v1, bool):
        if v1 == v2:
            return None
        return "B" if (v1, v2) == (b1, b2) else "ambiguous"
    return None


def _summary(x: Any) -> List[Any]:
    flat, _ = tree_flatten(x)
    return [tuple(v.shape) if isinstance(v, Tensor) else (v if isinstance(v, int) else None) for v in flat]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: Dict[str, List[Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = _summary(out)
        return out


def _fake_inputs(args: Sequence[Any], batch_dim: BatchDims, b: int) -> List[Any]:
    def maker(bd: Optional[int]) -> Any:
        def make(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            d = input_batch_dim(t, bd)
            shape = list(t.shape)
            if d is not None:
                shape[d] = b
            return torch.zeros(shape, dtype=t.dtype, device=t.device)

        return make

    return [tree_map(maker(bd), a) for a, bd in zip(args, per_arg(args, batch_dim))]


def propagate_batch_dims(
    gm: fx.GraphModule, args: Sequence[Any], batch_dim: BatchDims = 0, sizes: Tuple[int, int] = SIZES
) -> Optional[Dict[str, List[Any]]]:
    """``{node name: [hint per flattened value]}``, or ``None`` when the graph
    cannot run on fake tensors (data-dependent code)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    runs = []
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a failed fake run is expected for data-dependent code
    try:
        for b in sizes:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                rec = _Recorder(gm)
                rec.run(*_fake_inputs(args, batch_dim, b))
            runs.append(rec.values)
    except Exception:
        return None
    finally:
        log.setLevel(level)
    b1, b2 = sizes
    out: Dict[str, List[Any]] = {}
    for name, vals1 in runs[0].items():
        vals2 = runs[1].get(name, [])
        if len(vals1) != len(vals2):
            out[name] = ["ambiguous"] * len(vals1)
            continue
        out[name] = [classify(v1, v2, b1, b2) for v1, v2 in zip(vals1, vals2)]
    return out
