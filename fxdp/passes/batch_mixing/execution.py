"""Real execution for the batch-mixing analysis: example inputs resized to a chosen
batch size, the graph run node by node (no grad) with a hook, under a forked RNG
and a thread limit for small models."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..batch_dims import BatchDims, input_batch_dim, per_arg


def resize_batch(args: Sequence[Any], batch_dim: BatchDims, b: int) -> List[Any]:
    """Real inputs with batch size ``b``: the example rows, repeated cyclically
    (``batch_dim``: one for every input, or one per positional input, ``None``: none)."""

    def maker(bd: Optional[int]) -> Callable[[Any], Any]:
        def make(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            d = input_batch_dim(t, bd)
            if d is None:
                return t
            n = t.shape[d]
            if n == 0:
                raise ValueError("example inputs need at least one sample")
            return t.index_select(d, torch.arange(b, device=t.device) % n)

        return make

    return [tree_map(maker(bd), a) for a, bd in zip(args, per_arg(args, batch_dim))]


@contextlib.contextmanager
def small_model_threads(model: nn.Module, limit: int = 5_000_000):
    """One intra-op thread while analyzing a small model: the example batches are
    tiny, and on a busy machine thread hand-offs cost more than the ops."""
    n = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) <= limit
    if small and n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and n > 1:
            torch.set_num_threads(n)


def _summary(x: Any) -> List[Any]:
    flat, _ = tree_flatten(x)
    return [tuple(v.shape) if isinstance(v, Tensor) else (v if isinstance(v, int) else None) for v in flat]


class _Run(fx.Interpreter):
    """Real execution (no grad) calling ``on_node`` after every node."""

    def __init__(self, gm: fx.GraphModule, on_node: Optional[Callable] = None, pre: Optional[Callable] = None):
        super().__init__(gm)
        self.on_node = on_node
        self.pre = pre
        self.shapes: Dict[str, List[Any]] = {}
        self.current: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        state = self.pre(n, self) if self.pre is not None else None
        out = super().run_node(n)  # the model's own errors propagate
        self.shapes[n.name] = _summary(out)
        if self.on_node is not None:
            self.on_node(n, out, self, state)
        return out
