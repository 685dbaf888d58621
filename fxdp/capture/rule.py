"""The capture op served by a registered per-sample rule (``fxdp.rules``)."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..rules.base import FOLDED, SAVED, SCRATCH, weighted_sum
from ..rules.tied import GradFactors
from .op import CaptureOp, move_to_front
from .record import LayerRecord

__all__ = ["RuleCapture"]


def _move_saved(saved: Any, x: Any, dim: Any, op: CaptureOp, B: Optional[int]) -> Any:
    """A rule's saved forward values, batch first as the input ``x`` becomes: tensors of
    ``x``'s rank take its move; with the batch already first, the rest stay; otherwise
    ``None`` (the rule recomputes them)."""
    items = saved if isinstance(saved, tuple) else (saved,)
    if all(isinstance(t, Tensor) and isinstance(x, Tensor) and t.dim() == x.dim() for t in items):
        out = tuple(move_to_front(t, dim, "a saved value", op, B) for t in items)
    elif dim == 0:
        out = items
    else:
        return None
    return out if isinstance(saved, tuple) else out[0]


class RuleCapture(CaptureOp):
    """Capture served by a registered per-sample rule (``fxdp.rules``)."""

    kind = "rule"

    def __init__(self, *, rule, op: Callable, names: Sequence[str], static: Dict[str, Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.rule = rule
        self.op = op
        self.names = list(names)
        self.static = dict(static)
        #: book-keeping methods measured per shape (``bk_methods="measure"``):
        #: ``{(shapes, needs): {"method", "model" (the cost model's choice), "ms"}}``
        self.bk_methods: Dict[tuple, Dict[str, Any]] = {}

    def rule_name(self) -> str:
        return self.rule.describe()

    @property
    def folds(self) -> bool:  # type: ignore[override]
        return self.rule.folds

    def bound(self, dyn: Sequence[Any]) -> Dict[str, Any]:
        args = dict(zip(self.names, dyn))
        args.update(self.static)
        return args

    def compute(self, dyn: Sequence[Any]) -> Any:
        return self.rule.forward(self.op, self.bound(dyn))

    def compute_saving(self, dyn: Sequence[Any]) -> Tuple[Any, Any]:
        return self.rule.forward_saving(self.op, self.bound(dyn))

    def _planned(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Any], dim_out: Any,
                 batch_size: Optional[int]) -> Tuple[Dict[str, Any], Tensor]:
        """Bound arguments and output, batch first as the records are (:meth:`_prepare`), at
        the report's shapes."""
        args = self.bound(dyn)

        def front(t: Tensor, d: Any, what: str) -> Tensor:
            if isinstance(d, tuple) and not batch_size:
                return t  # a fold without the batch size: read as it stands
            return t if d in (None, 0) else move_to_front(t, d, what, self, batch_size)

        arg = self.rule.input_arg
        if arg in self.names:
            args[arg] = front(args[arg], dims_in[self.names.index(arg)], "the input")
        return args, front(out, dim_out, "the output")

    def bk_plan(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Any], dim_out: Any,
                batch_size: Optional[int] = None) -> Dict[str, str]:
        args, g = self._planned(dyn, out, dims_in, dim_out, batch_size)
        plan = self.rule.bk_plan(args, g, frozenset(self.names[i] for i in self.param_index))
        return {p: plan[self.names[i]] for i, p in self.param_index.items() if self.names[i] in plan}

    def bk_factors(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Any], dim_out: Any,
                   batch_size: Optional[int] = None) -> Dict[str, GradFactors]:
        if not any(self.names[i] in self.rule.factored for i in self.param_index):
            return {}
        args, g = self._planned(dyn, out, dims_in, dim_out, batch_size)
        found = {p: self.rule.grad_factors(args, g, self.names[i]) for i, p in self.param_index.items()}
        return {p: f for p, f in found.items() if f is not None}

    def explicit_input_grad(self, dyn: Sequence[Any], needs_grad: Sequence[bool]) -> bool:
        arg = self.rule.input_arg
        if arg is None or arg not in self.names:
            return False
        i = self.names.index(arg)
        if not needs_grad[i] or sum(needs_grad) != 1:
            return False
        return self.rule.has_input_grad(self.bound(dyn))

    def input_grads(self, dyn: Sequence[Any], grads: Sequence[Optional[Tensor]],
                    saved: Any = None) -> Dict[int, Tensor]:
        if len(grads) != 1 or grads[0] is None:
            return {}
        args = self.bound(dyn)
        if saved is not None:
            args[SAVED] = saved
        return {self.names.index(self.rule.input_arg): self.rule.input_grad(args, grads[0])}

    def prepared(self, rec: LayerRecord) -> Tuple[Dict[str, Any], Tensor, FrozenSet[str]]:
        """Bound arguments and output gradient, batch-first, and the needed names; formed
        once per record (read-only: the rules read their arguments, never assign them, but
        for ``args[SCRATCH]``, the record's dict from its norms to its clipped sum)."""
        memo = rec.memo.get("prepared")
        if memo is None:
            memo = rec.memo["prepared"] = self._prepare(rec)
        return memo

    def _prepare(self, rec: LayerRecord) -> Tuple[Dict[str, Any], Tensor, FrozenSet[str]]:
        dims_in, dims_out = self.resolve_batch_dims(rec)
        args = self.bound(rec.inputs)
        g = rec.grads[0]
        if g is None:  # output unused by the loss
            g = torch.zeros_like(self.compute(rec.inputs))
            dims_out = [dims_out[0] if dims_out and dims_out[0] is not None else 0]
        g = move_to_front(g, dims_out[0], "the output", self, rec.batch_size)
        if self.rule.input_arg is not None and self.rule.input_arg in self.names:
            i = self.names.index(self.rule.input_arg)
            x = args[self.rule.input_arg]
            args[self.rule.input_arg] = move_to_front(x, dims_in[i], "the input", self, rec.batch_size)
            if isinstance(dims_in[i], tuple):  # a batch-major fold [B*k, ...], now [B, k, ...]
                args[FOLDED] = True
            if rec.saved is not None:  # batch first like the input: moved with it, or left out
                saved = _move_saved(rec.saved, x, dims_in[i], self, rec.batch_size)
                if saved is not None:
                    args[SAVED] = saved
        needs = frozenset(self.names[i] for i in rec.params)
        args[SCRATCH] = rec.memo.setdefault("scratch", {})
        return args, g, needs

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        if rec.kept and all(i in rec.kept for i in rec.params):
            return dict(rec.kept)
        args, g, needs = self.prepared(rec)
        if g.shape[0] == 0:  # empty batch: no samples, no rows
            return {i: rec.inputs[i].new_zeros((0,) + tuple(rec.inputs[i].shape)) for i in rec.params}
        raw = self.rule.grad_sample(args, g, needs)
        return {i: raw[self.names[i]] for i in rec.params}

    def grad_factors(self, rec: LayerRecord, i: int) -> Optional[GradFactors]:
        if rec.released or self.names[i] not in self.rule.factored:
            return None
        args, g, _ = self.prepared(rec)
        return self.rule.grad_factors(args, g, self.names[i]) if g.shape[0] > 0 else None

    def keeps_per_sample_grads(self, rec: LayerRecord, idx: Sequence[int]) -> bool:
        args, g, _ = self.prepared(rec)
        return g.shape[0] > 0 and self.rule.bk_keeps(args, g, frozenset(self.names[i] for i in idx))

    def norm_sample_sq(self, rec: LayerRecord, idx: Sequence[int], measure: bool = False) -> Dict[int, Tensor]:
        args, g, _ = self.prepared(rec)
        if g.shape[0] == 0:
            return {i: g.new_zeros(0) for i in idx}
        needs = frozenset(self.names[i] for i in idx)
        method = self._measured_method(args, g, needs) if measure else None
        out, kept = (self.rule.norm_sample_sq_keep(args, g, needs, method) if method is not None
                     else self.rule.norm_sample_sq_keep(args, g, needs))
        rec.kept.update({i: kept[self.names[i]] for i in idx if self.names[i] in kept})
        return {i: out[self.names[i]] for i in idx}

    #: rounds of :meth:`_measured_method`, each timing every candidate once, in turn
    measure_rounds = 3

    def _measured_method(self, args: Dict[str, Any], g: Tensor, needs: FrozenSet[str]) -> Optional[str]:
        """The faster exact book-keeping method at these shapes, timed once per shape
        (norms and clipped sum of each candidate, the best of ``measure_rounds`` runs, the
        candidates in turn: timed back to back, the first candidate, the cost model's choice,
        ran cold and lost ties it wins in the steps after) and cached in :attr:`bk_methods`;
        ``None`` when the rule has one method only."""
        candidates = self.rule.bk_candidates(args, g, needs)
        if len(candidates) < 2:
            return None
        key = (tuple(g.shape[1:]), tuple(t.shape[1:] for t in args.values() if isinstance(t, Tensor)), needs)
        if key not in self.bk_methods:
            ms = {m: float("inf") for m in candidates}
            for _ in range(self.measure_rounds):
                for m in candidates:
                    ms[m] = min(ms[m], self._time_method(args, g, needs, m))
            self.bk_methods[key] = {"method": min(ms, key=ms.get), "model": candidates[0], "ms": ms}
        return self.bk_methods[key]["method"]

    def _time_method(self, args: Dict[str, Any], g: Tensor, needs: FrozenSet[str], method: str) -> float:
        sync = torch.cuda.synchronize if g.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        _, kept = self.rule.norm_sample_sq_keep(args, g, needs, method)
        ones = g.new_ones(g.shape[0])
        for v in kept.values():
            torch.einsum("b,b...->...", ones.to(v.dtype), v)
        rest = needs - set(kept)
        if rest:
            self.rule.clipped_sum(args, g, ones, frozenset(rest))
        sync()
        return (time.perf_counter() - start) * 1e3

    def clipped_sum_dropping(self, rec: LayerRecord, factors: Dict[int, Tensor],
                             ok: Tensor) -> Optional[Dict[int, Tensor]]:
        """The dropped samples' rows of the batch-first input and output gradient (and of kept
        per-sample gradients) are zeroed in copies, and the forward's saved values and the
        norms' scratch left out (recomputed from the zeroed rows): a sample's term depends on
        its own rows only, so the others' are unchanged. Where a sum is still not finite (a
        rule reading another batched argument), ``None``."""
        def zeroed(t: Any) -> Any:
            if not isinstance(t, Tensor) or not t.is_floating_point():
                return t
            return torch.where(ok.view((-1,) + (1,) * (t.dim() - 1)), t, 0)

        if rec.released:  # every per-sample gradient kept
            return {i: weighted_sum(f, zeroed(rec.kept[i])) for i, f in factors.items()}
        arg = self.rule.input_arg
        if arg is None or arg not in self.names:
            return None
        args, g, _ = self.prepared(rec)
        if g.shape[0] != ok.shape[0]:
            return None
        clean = {k: v for k, v in args.items() if k != SAVED}
        clean[arg], clean[SCRATCH] = zeroed(args[arg]), {}
        g = zeroed(g)
        out: Dict[int, Tensor] = {}
        for i, f in factors.items():
            if i in rec.kept:
                out[i] = weighted_sum(f, zeroed(rec.kept[i]))
            else:
                out[i] = self.rule.clipped_sum(clean, g, f, frozenset({self.names[i]}))[self.names[i]]
        return out if all(bool(torch.isfinite(v).all()) for v in out.values()) else None

    def clipped_sum(self, rec: LayerRecord, factors: Dict[int, Tensor],
                    into: Optional[Dict[int, Tensor]] = None) -> Dict[int, Tensor]:
        into = into or {}
        out: Dict[int, Tensor] = {}
        if rec.kept:
            done = [i for i in factors if i in rec.kept]
            for i in done:  # sum_i c_i g_i of kept per-sample gradients
                s = weighted_sum(factors[i], rec.kept.pop(i), into.get(i))
                if s is not None:
                    out[i] = s
            factors = {i: f for i, f in factors.items() if i not in done}
            if not factors:
                return out
        args, g, _ = self.prepared(rec)
        if g.shape[0] == 0:
            return {**out, **{i: torch.zeros_like(rec.inputs[i]) for i in factors}}
        # one rule call per distinct factor vector (flat clipping: a single call)
        groups: Dict[int, List[int]] = {}
        for i, f in factors.items():
            groups.setdefault(id(f), []).append(i)
        for ids in groups.values():
            needs = frozenset(self.names[i] for i in ids)
            if self.rule.clipped_sum_into and into:
                dst = {self.names[i]: into[i] for i in ids if i in into}
                res = self.rule.clipped_sum(args, g, factors[ids[0]], needs, into=dst)
            else:
                res = self.rule.clipped_sum(args, g, factors[ids[0]], needs)
            out.update({i: res[self.names[i]] for i in ids if self.names[i] in res})
        return out
