"""The records capture ops hand over in the backward pass, and the :class:`Recorder`
that serves them: ``p.grad_sample`` (materialize) or the book-keeping records (bk)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..bookkeeping import BookKeeping
from ..errors import BatchDimensionError, PerSampleGradientError

if TYPE_CHECKING:
    from .op import CaptureOp

__all__ = ["LayerRecord", "Recorder"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class LayerRecord:
    """What one capture op recorded in one backward pass."""

    op: "CaptureOp"
    inputs: List[Any]  # detached dynamic inputs (activations, parameters, buffers)
    grads: List[Optional[Tensor]]  # gradients of the flat outputs
    params: Dict[int, nn.Parameter]  # dynamic-input index -> parameter needing per-sample grads
    batch_size: int
    generation: int
    batch_dims: Tuple[Tuple[Any, ...], Tuple[Any, ...]]  # (inputs, outputs) batch dims
    # book-keeping: per-sample gradients materialized while computing norms, reused
    # for the clipped sum (dynamic-input index -> [B, *shape])
    kept: Dict[int, Tensor] = field(default_factory=dict)
    #: the op's flat outputs on the batch, for ops whose independence is checked each step
    outputs: Optional[List[Tensor]] = None
    #: recorded on the placeholder sample of an empty batch: no per-sample gradient, no norm
    stand_in: bool = False
    #: book-keeping: raw per-sample squared norms formed as the record arrived (index -> [B])
    sq: Dict[int, Tensor] = field(default_factory=dict)
    #: inputs and output gradients dropped: every per-sample gradient is in ``kept``
    released: bool = False
    #: what the forward computed for the closed-form gradients (``PerSampleRule.forward_saving``)
    saved: Any = None
    #: the CPU generator's state before a fallback layer without batched inputs drew random
    #: numbers in the forward (``FuncCapture``): its per-sample evaluations draw them again
    rng_state: Optional[Tensor] = None
    #: the capture op's values derived from ``inputs`` and ``grads`` (its batch-first
    #: arguments), formed once per record: book-keeping reads them up to four times a step;
    #: ``memo["scratch"]``: what the rule's norms left for its clipped sum (``rules.base.SCRATCH``)
    memo: Dict[str, Any] = field(default_factory=dict)
    #: book-keeping: the output gradient was dropped as the record arrived, to be formed again
    #: from this record of the next capture op when the pass ends (``CaptureOp.grad_from``)
    grad_source: Optional[Tuple["LayerRecord", int]] = None
    #: whether a tensor of the record is half precision (found once, by :meth:`widened`)
    half: Optional[bool] = None

    def widened(self) -> "LayerRecord":
        """The record with its half-precision activations, output gradients, parameters and
        saved values in float32 (exact conversions), for book-keeping to form its per-sample
        norms and its clipped sum from the same values in float32 (``fxdp.optim.clip.sum_dtype``);
        ``self`` where no tensor is half precision, or where the op checks its outputs against
        per-sample evaluations or replays a random draw (those run in the batch's dtype). A copy
        of one layer, made at each use: it shares ``kept``, ``sq`` and the norms' scratch with
        ``self`` (what the norms leave, the sum reads); its batch-first arguments are its own."""
        if self.half is None:
            self.half = any(isinstance(t, Tensor) and t.dtype in _HALF
                            for t in (*self.inputs, *self.grads, *self.kept.values()))
        if not self.half or self.op.checks_outputs or self.rng_state is not None:
            return self

        def wide(t: Any) -> Any:
            return t.float() if isinstance(t, Tensor) and t.dtype in _HALF else t

        scratch = self.memo.setdefault("scratch", {})
        return replace(self, inputs=[wide(x) for x in self.inputs], grads=[wide(g) for g in self.grads],
                       saved=tree_map(wide, self.saved), memo={"scratch": scratch}, half=False)

    def release(self) -> None:
        """Drop the activations and output gradients once ``kept`` holds every
        parameter's per-sample gradient (book-keeping's memory: the record is then
        the per-sample gradients alone, often far smaller than ``a`` and ``g``)."""
        assert all(i in self.kept for i in self.params), "release() needs every per-sample gradient kept"
        self.inputs, self.grads, self.outputs, self.released = [], [], None, True
        self.memo, self.saved = {}, None

    def free(self) -> None:
        """Drop every tensor of the record (book-keeping: its clipped sums are formed)."""
        self.inputs, self.grads, self.outputs, self.kept, self.memo, self.saved = [], [], None, {}, {}, None


class Recorder:
    """Shared state of one privatized module's capture ops.

    Holds the per-forward context (batch size, batch dimensions of every captured
    tensor) and serves each backward record: ``grad_sample_mode="materialize"`` writes
    per-sample gradients into ``p.grad_sample`` following Opacus' convention (for
    ``loss_reduction="mean"`` rows are multiplied by the batch size, so row i is sample
    i's own gradient); ``"bk"`` hands the record to :attr:`bookkeeping`
    (:class:`fxdp.bookkeeping.BookKeeping`), which the optimizer clips from.
    """

    def __init__(self, loss_reduction: str = "mean", mode: str = "materialize") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.bookkeeping: Optional[BookKeeping] = None
        self.set_mode(mode)
        self.generation = 0
        self.batch_size: Optional[int] = None
        #: capture name -> (input batch dims, output batch dims) for the current forward
        self.batch_dims: Dict[str, Tuple[Tuple[Any, ...], Tuple[Any, ...]]] = {}
        self.strict_batch_dims = True
        self._owner: Dict[int, int] = {}  # id(param) -> backward pass of its last per-sample gradient
        self._passes_seen = 0
        self._open_pass: Optional[int] = None
        self.stand_ins: set = set()  # generations of empty batches run on a placeholder sample
        #: user-level DP: forward generation -> group (user) index of each row
        self.groups: Dict[int, Tensor] = {}
        self._pending_groups: Optional[Tensor] = None

    @property
    def mode(self) -> str:
        """``"bk"`` (book-keeping) or ``"materialize"`` (``p.grad_sample``)."""
        return "bk" if self.bookkeeping is not None else "materialize"

    def set_mode(self, mode: str) -> None:
        if mode not in ("bk", "materialize"):
            raise ValueError(f"grad_sample_mode must be 'bk' or 'materialize', got {mode!r}")
        if mode != self.mode:
            self.bookkeeping = BookKeeping(self.loss_reduction) if mode == "bk" else None

    @contextlib.contextmanager
    def materializing(self) -> Iterator[None]:
        """Materialize ``p.grad_sample`` inside the block (the first-step cross-check),
        leaving the book-keeping records of the step untouched."""
        kept, self.bookkeeping = self.bookkeeping, None
        try:
            yield
        finally:
            self.bookkeeping = kept

    def begin_forward(self, batch_size: Optional[int], batch_dims: Dict[str, Any], stand_in: bool = False) -> None:
        """A new forward pass. ``stand_in``: an empty batch run on one placeholder
        sample whose outputs are sliced away (a graph that cannot run on zero rows):
        its records contribute no per-sample gradient (``[0, *shape]``, no norm)."""
        self.generation += 1
        self._open_pass = None  # no backward pass runs during a forward (closes one an error left open)
        self.batch_size = batch_size
        self.batch_dims = batch_dims
        groups, self._pending_groups = self._pending_groups, None
        self.groups = {g: v for g, v in self.groups.items() if g > self.generation - 64}
        if groups is not None and not stand_in:
            if batch_size is not None and groups.shape[0] != batch_size:
                raise BatchDimensionError(
                    f"set_groups was given {groups.shape[0]} group indices, but the batch has {batch_size} "
                    "samples. Fix: pass one user index per row of the next batch"
                )
            self.groups[self.generation] = groups
        if stand_in:
            self.stand_ins.add(self.generation)
        elif self.stand_ins:  # records live one step (or a few accumulated passes): forget old ones
            self.stand_ins = {g for g in self.stand_ins if g > self.generation - 64}

    def set_groups(self, groups: Tensor) -> None:
        """User-level DP: row ``i`` of the next forward belongs to group ``groups[i]``
        (``0..U-1``). Per-sample gradients are summed per group, so ``p.grad_sample``
        has one row per group and clipping bounds each group's (user's) whole
        contribution. Needs materialized per-sample gradients."""
        if self.bookkeeping is not None:
            raise PerSampleGradientError(
                "per-user clipping sums per-sample gradients per user, which book-keeping does not form. "
                "Fix: use grad_sample_mode='materialize' for user-level DP"
            )
        groups = torch.as_tensor(groups)
        if groups.dim() != 1 or groups.dtype not in (torch.int32, torch.int64) or (
                groups.numel() and int(groups.min()) < 0):
            raise ValueError("groups must be a 1-d tensor of non-negative integer group indices, one per row")
        self._pending_groups = groups.long()

    def _group(self, gs: Tensor, generation: int) -> Tensor:
        """Sum the rows of one group (user): ``[B, ...] -> [U, ...]``."""
        groups = self.groups.get(generation)
        if groups is None:
            return gs
        U = int(groups.max()) + 1 if groups.numel() else 0
        return gs.new_zeros((U,) + tuple(gs.shape[1:])).index_add_(0, groups.to(gs.device), gs)

    # -- per-sample gradients -------------------------------------------------
    def on_backward(self, rec: LayerRecord) -> Dict[int, Tensor]:
        """Per-sample gradients for one record; returns the summed (ordinary)
        gradient of each parameter input (book-keeping: keeps the record until the
        backward pass ends and returns nothing: no weight gradient is computed)."""
        rec.stand_in = rec.generation in self.stand_ins
        if self.bookkeeping is not None:  # clipped at the step; no weight gradient is computed
            self.bookkeeping.record(rec)
            return {}
        if rec.stand_in:  # an empty batch: no samples, no rows
            for p in rec.params.values():
                self._accumulate(p, p.new_zeros((0,) + tuple(p.shape)), rec)
            return {i: torch.zeros_like(p) for i, p in rec.params.items()}
        raw = rec.op.per_sample_grads(rec)
        summed: Dict[int, Tensor] = {}
        scale = rec.batch_size if self.loss_reduction == "mean" else 1
        theirs = {t.data_ptr() for t in list(rec.inputs) + list(rec.grads) if isinstance(t, Tensor)}
        for idx, p in rec.params.items():
            gs = raw[idx]
            summed[idx] = gs.sum(0)
            if scale != 1:
                # rescale in place when the rule returned a fresh tensor (saves a copy of
                # the largest tensor of the step); never write into a view of the record
                owned = gs._base is None and gs.data_ptr() not in theirs
                gs = gs.mul_(scale) if owned else gs * scale
            self._accumulate(p, self._group(gs, rec.generation), rec)
        return summed

    def _backward_pass(self) -> int:
        """The id of the backward pass running now (a new one starts with its first record)."""
        if self._open_pass is None:
            self._passes_seen += 1
            self._open_pass = self._passes_seen
            torch.autograd.Variable._execution_engine.queue_callback(self._close_pass)
        return self._open_pass

    def _close_pass(self) -> None:
        self._open_pass = None

    def _accumulate(self, p: nn.Parameter, gs: Tensor, rec: LayerRecord) -> None:
        gs = gs.to(p.dtype)
        prev = getattr(p, "grad_sample", None)
        owner = self._owner.get(id(p))
        now = self._backward_pass()
        if prev is None:
            p.grad_sample = gs
        elif owner == now:
            # another use in the same backward pass (tied weights, or a second forward of the
            # same batch before one backward): row i sums sample i's contributions, as in Opacus
            last = prev[-1] if isinstance(prev, list) else prev
            if last.shape != gs.shape:
                raise PerSampleGradientError(
                    f"one backward pass reached a parameter of shape {tuple(p.shape)} from forwards of "
                    f"{last.shape[0]} and {gs.shape[0]} samples: row i cannot name one sample. Fix: run the "
                    "forwards of one backward pass on the same batch"
                )
            if isinstance(prev, list):
                prev[-1] = last + gs
            else:
                p.grad_sample = prev + gs
        else:
            # a new backward pass before the previous per-sample gradients were consumed:
            # a list with one entry per backward pass (Opacus' gradient accumulation)
            p.grad_sample = (prev if isinstance(prev, list) else [prev]) + [gs]
        self._owner[id(p)] = now
