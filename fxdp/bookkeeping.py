"""Book-keeping clipping: clipped sums without per-sample gradients.

Bu, Wang, Zha, Karypis 2023, "Differentially Private Optimization on Large Model
at Small Cost" (book-keeping, BK): DP-SGD needs only

    sum_i c_i g_i,   c_i = min(1, C / ||g_i||),

not the per-sample gradients g_i. Each capture op hands its record (activations ``a``
and output gradients ``g``) to :class:`BookKeeping` during the backward pass; autograd
never computes the non-private weight gradients. As each record arrives, its rule gives
per-sample squared norms from ``(a, g)`` (ghost norms where cheaper, Goodfellow 2015 /
Li et al. 2021); a layer whose per-sample gradients were materialized for that keeps
them and drops ``a`` and ``g``, so the backward pass does not hold every layer's output
gradient at once. At the optimizer step, :meth:`fxdp.optim.clip.Clipping.factors` turns
the norms into clip factors with the bound of that step, and each rule forms its
layer's clipped sum ``a^T (c * g)`` directly; the records are freed as soon as the
sums are formed.

Exactness notes: a parameter used by several capture ops (tied weights) has
per-sample gradient g_i = g1_i + g2_i, whose norm is not a sum of norms: it is the
uses' norms plus their cross terms, formed from each use's factored gradient
(``fxdp.rules.tied``; a language model's tied embedding and head), or, where a use
has no factored form or materializing is cheaper, from the per-sample gradients
materialized at each use (only those parameters). Layers served by the ``torch.func``
fallback materialize only their own per-sample gradients, once per step.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from .errors import PerSampleGradientError
from .optim.clip import ClipResult, Clipping, factor_of, factors_as, sum_dtype
from .optim.grad_source import ClippedSumSource
from .rules.base import sq_norms, weighted_sum
from .rules.tied import cross_inner, use_factors

if TYPE_CHECKING:  # fxdp.capture hands records over; the types only are needed here
    from .capture import LayerRecord

__all__ = ["BookKeeping"]


@dataclass
class _Pass:
    """One finished backward pass: its records (stand-ins dropped) and raw per-sample
    squared norms ``{id(p): [B]}``; tied parameters either keep their per-sample
    gradients (``tied``) or are summed use by use as single ones are (``factored``)."""

    records: List[LayerRecord]
    batch_size: int
    sq: Dict[int, Tensor]
    tied: Dict[int, Tensor]
    uses: Dict[int, int]
    factored: Set[int]


class BookKeeping(ClippedSumSource):
    """Records of the backward passes since the last step, and their clipped sums.

    ``loss_reduction="mean"``: raw per-sample gradients of a mean loss carry ``1/B``;
    norms and sums are of ``B *`` raw, Opacus' convention (each row a sample's own gradient).
    """

    sums_into = True
    #: drop an output gradient that the next capture op's record gives through a ReLU, and form
    #: it again when the pass ends (``fxdp.passes.relu_grads``); ``False``: hold it to the step
    recompute_relu_grads = True
    #: ... where the gradient takes at least this many bytes (below, the memory is nothing beside
    #: the step's, and forming it again costs kernel calls: MNIST's ``[32, 32]``) and at least this
    #: fraction of the trainable parameters' bytes (from the last step): where parameter-sized
    #: buffers dwarf it, it does not move the step's peak (torchvision VGG11 at 32x32, B = 32:
    #: 1.030x -> 1.028x non-private's peak for 3.7% of the step, ``benchmarks/README.md``, Round 34)
    recompute_min_bytes = 1 << 18
    recompute_min_param_fraction = 0.125

    def __init__(self, loss_reduction: str = "mean") -> None:
        self.loss_reduction = loss_reduction
        self.records: List[LayerRecord] = []  # the backward pass running now
        self.pending: List[_Pass] = []  # finished backward passes, not yet clipped
        self._consumed = 0  # passes clipped by the current step
        #: set by ``DPOptimizer.attach_bookkeeping``: without a step to clip them, records would pile up
        self.attached = False
        #: ``bk_methods="measure"``: where a rule has several exact methods (ghost or materialized
        #: norms), time them on the first batch of each shape and keep the faster, per layer
        self.measure = False
        self._clipping: List[_Pass] = []  # the passes being clipped (for :meth:`held_bytes`)
        self._params = (0, 0)  # (count, bytes) of the trainable parameters the last step clipped

    # -- capture side ---------------------------------------------------------------
    def record(self, rec: LayerRecord) -> None:
        """Keep one capture op's record until the step; the first of a backward pass
        queues the close of that pass."""
        if not self.attached:
            raise PerSampleGradientError(
                "grad_sample_mode='bk' forms clipped sums at the optimizer step and needs its clip bound: use "
                "PrivacyEngine.make_private(..., grad_sample_mode='bk'), or "
                "DPOptimizer(...).attach_bookkeeping(dp_model.bookkeeping) before the first backward pass."
            )
        if not self.records:
            torch.autograd.Variable._execution_engine.queue_callback(self._close_pass)
        self.records.append(rec)
        # tied parameters (marked by the capture pass) wait for every use: their norm is not a
        # sum of the uses' (a mark only; each pass counts its uses again)
        single = [i for i in rec.params if rec.op.param_index.get(i) not in rec.op.shared]
        # a layer whose norms keep its per-sample gradients: norms now, and drop a and g
        # (other layers need a and g at the step anyway: their norms wait for the pass's end)
        try:
            if single and not rec.stand_in and rec.op.keeps_per_sample_grads(rec, single):
                rec.sq = rec.op.norm_sample_sq(rec.widened(), single, self.measure)  # half precision: float32
                if rec.params and all(i in rec.kept for i in rec.params):
                    rec.release()
            self._defer_grad(rec)
        except BaseException:
            self.records = []  # the pass is abandoned (autograd drops its queued close with it)
            raise

    def _defer_grad(self, rec: LayerRecord) -> None:
        """Drop ``rec``'s output gradient where the record of the capture op it feeds through a
        ReLU (``CaptureOp.grad_from``; this pass, the same forward) holds that op's input and
        output gradient: :meth:`_restore_grads` forms it again when the pass ends. Only a record
        whose norms wait for the pass's end (nothing formed from its gradient yet)."""
        link = rec.op.grad_from
        if (link is None or not self.recompute_relu_grads or rec.stand_in or rec.released or rec.sq or rec.kept
                or set(rec.memo) - {"prepared", "scratch"} or rec.memo.get("scratch")
                or len(rec.grads) != 1 or rec.grads[0] is None
                or rec.grads[0].numel() * rec.grads[0].element_size()
                < max(self.recompute_min_bytes, self.recompute_min_param_fraction * self._params[1])):
            return
        dst, i = link
        # a capture op runs once a forward (each graph node is an op of its own), and its record
        # arrived shortly before this one (it is downstream): the latest of this forward's
        src = next((r for r in reversed(self.records) if r.op is dst and r.generation == rec.generation), None)
        if (src is None or src.released or src.stand_in or len(src.grads) != 1
                or (src.grads[0] is None and src.grad_source is None)
                or i >= len(src.inputs) or not isinstance(src.inputs[i], Tensor)
                or src.inputs[i].shape != rec.grads[0].shape
                or not src.op.explicit_input_grad(src.inputs, [j == i for j in range(len(src.inputs))])):
            return
        rec.grads, rec.grad_source = [None], (src, i)
        rec.memo = {}  # its batch-first view of the gradient too (``RuleCapture.prepared``: formed again)

    @staticmethod
    def _restore_grads(records: List[LayerRecord]) -> None:
        """The output gradients :meth:`_defer_grad` dropped, formed again in arrival order (the
        later layer of a chain first): the next op's input gradient by its own closed form, as
        the backward pass formed it, through the ReLU's derivative ``threshold_backward(g, x, 0)``.
        Before any norm: a layer's norms and clipped sums read the same tensor."""
        with torch.no_grad():
            for r in records:
                if r.grad_source is None:
                    continue
                src, i = r.grad_source
                g_in = src.op.input_grads(src.inputs, src.grads, src.saved)[i]
                r.grads, r.grad_source = [torch.ops.aten.threshold_backward(g_in, src.inputs[i], 0)], None

    def _close_pass(self) -> None:
        """The per-sample norms of the pass that just ended (errors surface in backward)."""
        records, self.records = self.records, []
        self._restore_grads(records)
        records = [r for r in records if not r.stand_in]
        B = records[0].batch_size if records else 0
        if any(r.batch_size != B for r in records):
            raise PerSampleGradientError("records of one backward pass disagree on the batch size")
        uses: Dict[int, int] = {}
        for r in records:
            for p in r.params.values():
                uses[id(p)] = uses.get(id(p), 0) + 1
        sq, tied, factored = self._squared_norms(records, uses, self.measure)
        self.pending.append(_Pass(records, B, sq, tied, uses, factored))

    # -- optimizer side (ClippedSumSource) --------------------------------------------
    def check(self, params: Sequence[nn.Parameter]) -> int:
        if not self.pending:
            raise ValueError(
                "no clipped gradients: call loss.backward() on the privatized model (in training mode) "
                "before optimizer.step(), and optimizer.zero_grad() after it"
            )
        return len(self.pending)

    def accumulated_passes(self, params: Sequence[nn.Parameter]) -> int:
        return len(self.pending) or max(self._consumed, 1)

    def clear(self, params: Sequence[nn.Parameter]) -> None:
        self.records, self.pending, self._consumed = [], [], 0

    def clip_and_sum(self, params: Sequence[nn.Parameter], clipping: Clipping,
                     into: Callable[[], Sequence[Tensor]] | None = None, into_scale: float = 1.0) -> ClipResult:
        """Clip and sum every pass of the step. With ``into``, ``into_scale`` times each
        layer's clipped sum is added into ``into()[k]`` as soon as it is formed (so no
        sum outlives its layer) and ``ClipResult.sums`` is empty; ``into`` is called once,
        after every factor is known, so a non-finite gradient raises before it. Layers are
        summed in the order of their parameters' positions (``into()[k]`` is read in
        increasing ``k``, as :class:`~fxdp.optim.noise.SliceDraw` draws) and each record's
        tensors are freed once its sums are formed."""
        passes, self.pending = self.pending, []
        self._consumed = len(passes)
        reached = {id(p) for ps in passes for r in ps.records for p in r.params.values()}
        for p in params:
            if p.grad is not None and id(p) not in reached:
                raise PerSampleGradientError(
                    f"a parameter of shape {tuple(p.shape)} got an ordinary (non-private) gradient but no "
                    "per-sample one: it was frozen (requires_grad=False) when the model was privatized and "
                    "unfrozen later, so no capture op serves it. The step was not applied. Fix: unfreeze it "
                    "before make_private, or call make_private again (on the original model) after unfreezing"
                )
        params = list(params)
        if len(params) != self._params[0]:  # once: the parameters a step clips rarely change
            self._params = (len(params), sum(p.numel() * p.element_size() for p in params))
        position = {id(p): k for k, p in enumerate(params)}
        clipped = [self._factors(ps, params, position, clipping) for ps in passes]  # may raise
        self._clipping = passes
        try:
            return self._clip_passes(passes, params, position, clipped, into, into_scale, clipping)
        finally:
            self._clipping = []

    def _clip_passes(self, passes: List[_Pass], params: List[nn.Parameter], position: Dict[int, int],
                     clipped: list, into: Callable[[], Sequence[Tensor]] | None, into_scale: float,
                     clipping: Clipping) -> ClipResult:
        """:meth:`clip_and_sum` once every pass's factors are known."""
        out = into() if into is not None else None
        result = None
        for ps, (norms, factors, ok, scale) in zip(passes, clipped):
            if norms is None:  # an empty batch (run on a stand-in sample) or nothing trainable reached
                sums = [] if out is not None else [torch.zeros_like(p, dtype=sum_dtype(p.dtype)) for p in params]
                norms = factors = torch.zeros(ps.batch_size, len(params), device=params[0].device if params else None)
                if clipping.per_parameter is None:
                    factors = factors[:, 0]
            else:
                sums = self._clipped_sums(ps, params, position, factors * (scale * into_scale), ok, out)
            r = ClipResult(sums, norms.detach(), factors.detach())
            result = r if result is None else result.add(r)
        assert result is not None, "check() runs first"
        return result

    def held_bytes(self) -> int:
        """Bytes the records of the step being clipped hold now (activations, output gradients,
        kept per-sample gradients and what their norms left for their sums; each storage once).
        Read by ``into()``, before any record is freed: what a noise buffer held through the
        passes stacks on at the draw (0 outside ``clip_and_sum``)."""
        seen: Dict[int, int] = {}
        for ps in self._clipping:
            for r in ps.records:
                model = set(r.op.param_index) | set(r.op.buffer_index)  # the model's tensors, not the record's
                own = [x for i, x in enumerate(r.inputs) if i not in model and isinstance(x, Tensor)]
                for t in own + [g for g in r.grads if g is not None] + list(r.kept.values()) + _scratch(r):
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def _factors(self, ps: _Pass, params: List[nn.Parameter], position: Dict[int, int], clipping: Clipping):
        """Per-sample norms ``[B, K]``, clip factors, the finite-sample mask and the loss
        scale of one backward pass (norms ``None`` when the pass reached no parameter)."""
        B, scale = ps.batch_size, (float(ps.batch_size) if self.loss_reduction == "mean" else 1.0)
        sq = {k: v for k, v in ps.sq.items() if k in position}
        if not sq:
            return None, None, None, scale
        dtype = functools.reduce(torch.promote_types, {v.dtype for v in sq.values()})  # one dtype: no call
        cols = [sq.get(id(p)) for p in params]
        if any(c is None for c in cols):  # parameters no record of this pass reached
            zero = torch.zeros(B, dtype=dtype, device=next(iter(sq.values())).device)
            cols = [zero if c is None else c for c in cols]
        norms = torch.stack([c if c.dtype == dtype else c.to(dtype) for c in cols], 1).clamp_min(0).sqrt() * scale
        factors, ok = clipping.factors(norms, [p.shape for p in params])
        if ok is not None:
            norms = torch.where(ok[:, None], norms, 0)
        return norms, factors, ok, scale

    @staticmethod
    def _squared_norms(records: List[LayerRecord], uses: Dict[int, int], measure: bool = False):
        """Raw per-sample squared norms ``{id(p): [B]}``; the per-sample gradients of the tied
        parameters materialized for them; the tied parameters normed from their uses' factors."""
        sq: Dict[int, Tensor] = {}
        shared: Dict[int, List[Tuple[LayerRecord, int]]] = {}
        for r in records:
            single = [i for i, p in r.params.items() if uses[id(p)] == 1]
            multi = [i for i, p in r.params.items() if uses[id(p)] > 1]
            late = [i for i in single if i not in r.sq]  # not formed as the record arrived
            if late:
                r.sq.update(r.op.norm_sample_sq(r.widened(), late, measure))
                if not multi and r.params and all(i in r.kept for i in r.params):
                    r.release()  # kept per-sample gradients larger than the record replace it now
            for i in single:
                sq[id(r.params[i])] = r.sq[i]
            for i in multi:
                shared.setdefault(id(r.params[i]), []).append((r, i))
        tied: Dict[int, Tensor] = {}
        factored: Set[int] = set()
        formed: Dict[int, Dict[int, Tensor]] = {}  # a record's per-sample gradients, formed once
        for k, at in shared.items():
            norms = _tied_norms(at, measure)
            if norms is not None:
                sq[k] = norms
                factored.add(k)
                continue
            for r, i in at:
                gs = formed.get(id(r))
                if gs is None:
                    gs = formed[id(r)] = _per_sample_grads(r.widened())
                tied[k] = tied[k] + gs[i] if k in tied else gs[i]
            sq[k] = sq_norms(tied[k])
        return sq, tied, factored

    @staticmethod
    def _clipped_sums(ps: _Pass, params: List[nn.Parameter], position: Dict[int, int], scaled: Tensor,
                      ok: Tensor | None, out: List[Tensor] | None = None) -> List[Tensor]:
        """``sum_i c_i * (scale * raw_i)`` per parameter, layer by layer (``scaled = c * scale``);
        with ``out``, each layer's sum is added into ``out[k]`` at once and ``[]`` returned."""
        # one factor tensor per parameter; flat clipping shares one object, so a layer's
        # rule is called once for all its parameters (RuleCapture groups by identity)
        column = {k: factor_of(scaled, k) for k in range(len(params))} if scaled.dim() == 2 else None
        cast: Dict[Tuple[Optional[int], torch.dtype], Tensor] = {}

        def factor(k: int, dtype: torch.dtype) -> Tensor:
            """Parameter ``k``'s factors in a record's dtype, rounded down (``factors_as``);
            one object per dtype under flat clipping."""
            key = (None if column is None else k, dtype)
            if key not in cast:
                cast[key] = factors_as(scaled if column is None else column[k], dtype)
            return cast[key]

        sums: Dict[int, Tensor] = {}

        def add(k: int, v: Tensor) -> None:
            if out is not None:  # freed at once: the step never holds every layer's sum
                out[k].add_(v.reshape(out[k].shape))
            else:
                sums[k] = sums[k] + v if k in sums else v

        first = {id(r): min((position[id(p)] for p in r.params.values() if id(p) in position), default=len(params))
                 for r in ps.records}
        for rec in sorted(ps.records, key=lambda r: first[id(r)]):
            r = rec.widened()  # half precision: summed in float32 from the values its norms read
            dtype = _least_precise(r, scaled.dtype)
            want = {i: factor(position[id(p)], dtype) for i, p in r.params.items()
                    if id(p) in position and (ps.uses[id(p)] == 1 or id(p) in ps.factored)}
            dropping = r.op.clipped_sum_dropping(r, want, ok) if want and ok is not None else None
            if dropping is not None:  # the dropped samples' rows zeroed: a^T (0 * nan) would be nan
                for i, v in dropping.items():
                    add(position[id(r.params[i])], v)
            elif want and ok is not None:  # materialize and zero the dropped rows
                gs = _per_sample_grads(r)
                for i, f in want.items():
                    g = torch.where(ok.view(-1, *[1] * (gs[i].dim() - 1)), gs[i], 0)
                    add(position[id(r.params[i])], weighted_sum(f, g))
            elif want and r.released:  # sum_i c_i g_i of the kept per-sample gradients
                for i, f in want.items():
                    k = position[id(r.params[i])]
                    v = weighted_sum(f, r.kept.pop(i), None if out is None else out[k])
                    if v is not None:
                        add(k, v)
            elif want:  # the rule adds what it can straight into ``out``
                into = None if out is None else {i: out[position[id(r.params[i])]] for i in want}
                for i, v in r.op.clipped_sum(r, want, into).items():
                    add(position[id(r.params[i])], v)
            rec.free()  # its sums are formed: the step's memory falls as the noise buffer fills
        for pid, g in ps.tied.items():
            if pid not in position:
                continue
            k = position[pid]
            if ok is not None:
                g = torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g, 0)
            add(k, weighted_sum(factor(k, g.dtype), g))
        if out is not None:
            return []
        # a half-precision parameter's sum stays float32 through the noise (``sum_dtype``)
        return [sums[k].to(sum_dtype(p.dtype)).reshape(p.shape) if k in sums
                else torch.zeros_like(p, dtype=sum_dtype(p.dtype)) for k, p in enumerate(params)]


def _least_precise(r: LayerRecord, default: torch.dtype) -> torch.dtype:
    """The least precise floating dtype among a record's tensors: its clip factors, rounded
    down to it (``factors_as``), are cast exactly to whatever dtype its rule computes in."""
    dtypes = {t.dtype for t in (*r.inputs, *r.grads, *r.kept.values()) if isinstance(t, Tensor) and t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=default)


def _tied_norms(uses: List[Tuple[LayerRecord, int]], measure: bool) -> Optional[Tensor]:
    """``[B]``: a tied parameter's per-sample squared norms, its uses' own norms plus twice
    their cross terms from their factored gradients (``fxdp.rules.tied``); ``None`` where a
    use has no factored form or materializing costs less."""
    factors = [r.op.grad_factors(r.widened(), i) for r, i in uses]
    if not use_factors(factors):
        return None
    total = None
    for r, i in uses:
        own = r.sq[i] if i in r.sq else r.op.norm_sample_sq(r.widened(), [i], measure)[i]
        total = own if total is None else total + own
    for k, f in enumerate(factors):
        for h in factors[k + 1:]:
            total = total + 2 * cross_inner(f, h)
    return total


def _scratch(rec: LayerRecord) -> List[Tensor]:
    """The tensors a record's norms left for its clipped sum (``memo["scratch"]``, the rules'
    ``args[SCRATCH]``: a convolution's patch rows)."""
    return [t for t in rec.memo.get("scratch", {}).values() if isinstance(t, Tensor)]


def _per_sample_grads(rec: LayerRecord) -> Dict[int, Tensor]:
    """The record's per-sample gradients: those kept, or formed again from ``(a, g)``."""
    return dict(rec.kept) if rec.released else rec.op.per_sample_grads(rec)
