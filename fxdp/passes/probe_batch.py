"""Probe the ops of a ``torch.export`` graph for samples that influence each other,
on real inputs: perturb one sample's rows of an op's inputs, run the op again, and
see whether another sample's rows of its outputs move.

A second check after ``symbolic_batch.mixing_findings``, which reads shapes and each
op's batch rule (``batch_rules``: an op that combines samples along the batch, as
``torch.cummax(x, 0)`` or ``x.index_add(0, idx, y)``, or that has no rule, is refused
there). This pass runs the graph
once (no autograd) at the call that captures it and probes every op that reads
batched data, except elementwise ops, views and the ops whose rows the batch
annotation already follows (``TRUSTED``): the first and the last sample are
perturbed in turn (``batch_mixing.probe.perturbed``: noise, token ids moved to
another valid id, masks flipped), each run under one seed (attention dropout draws the
same mask). Another sample's output rows that move are an error; so is an op that
gives another result when run again. Evidence on this batch, not a proof: an op can depend on another sample
only in some regions of its input.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batch_mixing.probe import moved, perturbed, same
from .symbolic_batch import _checks_only, _data_dependent

__all__ = ["probe_batch", "TRUSTED"]

aten = torch.ops.aten

#: ops whose rows the batch annotation follows (views, copies, joins along other
#: dimensions are checked by ``symbolic_batch``; an embedding's rows are its ids' rows,
#: a bag's are cut by its offsets) or that draw random numbers shaped like their input
#: without reading it
TRUSTED = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.cat.default, aten.stack.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout,
    aten.type_as.default, aten.view_as.default, aten.reshape_as.default, aten.expand_as.default,
    aten.unflatten.int, aten.movedim.int, aten.dropout.default, aten.native_dropout.default,
    aten.feature_dropout.default, aten.alpha_dropout.default, aten.empty_like.default, aten.zeros_like.default,
    aten.ones_like.default, aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
    aten.bernoulli.p, aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
    # draws written over their input (timm's DropPath: ``x.new_empty((B, 1, 1, 1)).bernoulli_(keep)``)
    aten.bernoulli_.float, aten.uniform_.default, aten.normal_.default, aten.exponential_.default, aten.embedding.default, aten.embedding_bag.default, aten.embedding_bag.padding_idx,
    aten._embedding_bag.default, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.lift_fresh_copy.default,
    operator.getitem,
}


def _pointwise(t: Any) -> bool:
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags


def _rows(x: Tensor, hint: Any, s: int) -> Optional[Tensor]:
    """A mask of sample ``s``'s elements of ``x`` with batch hint ``hint`` (None: cannot tell)."""
    if isinstance(hint, int) and not isinstance(hint, bool) and 0 <= hint < x.dim():
        idx = [slice(None)] * x.dim()
        idx[hint] = s
        m = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        m[tuple(idx)] = True
        return m
    if isinstance(hint, tuple) and len(hint) > 3 and hint[0] == "fold" and hint[3] == "major" \
            and isinstance(hint[1], int) and isinstance(hint[2], int):
        d, k = hint[1], hint[2]
        idx = [slice(None)] * x.dim()
        idx[d] = slice(s * k, (s + 1) * k)
        m = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        m[tuple(idx)] = True
        return m
    return None


def _batched(hint: Any) -> bool:
    return hint is not None and hint != "B"


def _probe(n: fx.Node, run: Callable[[List[Any]], Any], vals: List[Any], nodes: List[Any],
           B: int, dep: Dict[fx.Node, bool]) -> Optional[str]:
    """What perturbing the first and the last sample finds (None: nothing)."""
    live = [i for i, a in enumerate(nodes) if isinstance(a, fx.Node) and isinstance(vals[i], Tensor) and dep.get(a)
            and _batched((a.meta.get("fxdp_batch") or [None])[0])]
    if not live:
        return None
    # the op's output in the graph's run drew other random numbers: compare runs under one seed
    outs = tree_flatten(run(list(vals)))[0]
    hints = list(n.meta.get("fxdp_batch") or [])
    again = tree_flatten(run(list(vals)))[0]
    if len(again) != len(outs) or not all(not isinstance(o, Tensor) or (isinstance(a, Tensor) and a.shape == o.shape
                                          and bool(same(o, a).all())) for o, a in zip(outs, again)):
        return "it does not give the same result when run again (random?)"
    gen = torch.Generator().manual_seed(0)
    for s in sorted({0, B - 1}):
        values = list(vals)
        for i in live:
            m = _rows(vals[i], nodes[i].meta["fxdp_batch"][0], s)
            if m is None:
                return None  # a fold of unknown order: symbolic_batch reads it
            values[i] = perturbed(vals[i], m, gen)
        for j, (o, o2) in enumerate(zip(outs, tree_flatten(run(values))[0])):
            if not isinstance(o, Tensor) or not isinstance(o2, Tensor):
                continue
            if o2.shape != o.shape:
                return f"perturbing sample {s} changed the shape of output {j}"
            h = hints[j] if j < len(hints) else None
            own = _rows(o, h, s) if _batched(h) else None
            if own is None:  # no batch dimension (symbolic_batch judges where it is used), or a fold
                continue     # of unknown order (symbolic_batch reads its layout)
            if bool((moved(o, o2) & ~own).any()):
                return f"perturbing sample {s}'s rows changed another sample's rows of its output {j}"
    return None


class _Run(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, B: int) -> None:
        super().__init__(gm)
        self.B = B
        self.dep = _data_dependent(gm)
        self.checks = _checks_only(gm)  # values that reach only runtime checks reach no sample's output
        self.found: List[Tuple[fx.Node, str, str]] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target not in TRUSTED and not _pointwise(n.target) and n not in self.checks:
            flat, spec = tree_flatten((n.args, n.kwargs))
            vals = [self.env[a] if isinstance(a, fx.Node) else a for a in flat]

            def run(values: List[Any]) -> Any:  # on copies: an in-place op (hardswish_) writes its input
                args, kwargs = tree_unflatten([v.clone() if isinstance(v, Tensor) else v for v in values], spec)
                torch.manual_seed(0)  # a random op (attention dropout) draws the same numbers each run
                return n.target(*args, **kwargs)

            try:
                problem = _probe(n, run, vals, flat, self.B, self.dep)
            except Exception as e:  # the op does not run on perturbed values: nothing shown
                problem = f"it could not be run on perturbed inputs ({type(e).__name__}: {e})"
            if problem is not None:
                self.found.append((n, "batch-probe", f"{n.target} could not be shown to keep samples apart: "
                                                     f"{problem}"))
        return out


def probe_batch(gm: fx.GraphModule, flat: List[Any], dims: List[Optional[int]]) -> List[Tuple[fx.Node, str, str]]:
    """``[(node, "batch-probe", problem)]`` for the ops of an annotated export graph
    (``symbolic_batch.annotate_batch``) through which one sample's rows moved another's,
    run on the inputs ``flat`` (its flattened call; ``dims``: their batch dimensions; a
    batch of fewer than two samples is probed on its rows repeated). The graph's buffers
    and the RNG are left as they were."""
    from .export_graph import example_for_export

    flat = example_for_export(flat, dims, rows=2)
    B = next((t.shape[d] for t, d in zip(flat, dims) if isinstance(t, Tensor) and d is not None), 0)
    if B < 2:
        return []
    runner = _Run(gm, B)
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng():
            runner.run(*flat)
    finally:
        for b, v in saved:
            b.copy_(v)
    return runner.found
