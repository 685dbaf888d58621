"""Capture ops: the runtime unit of per-sample gradient capture.

A capture op replaces one use of trainable parameters in the graph (a
``call_module`` on a leaf, a functional op, or a small parameter subgraph and its
consumer). Its forward is the original op. Its backward (an
``autograd.Function``) returns the usual gradients of the activations -- computed
by PyTorch's own derivative of the op, with the parameters detached -- and hands
the record (activations, output gradients) to the ``Recorder``, which turns it
into per-sample gradients with the op's rule. The op's output is a fresh tensor,
so in-place ops after it (``nn.ReLU(inplace=True)``) are fine.

This is the observer of torch.ao.quantization's FX mode: ``DPModule.strip()``
removes capture ops and gives back the plain graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import BatchDimensionError, PerSampleGradientError, UnsupportedOpError, where

__all__ = ["CaptureOp", "Recorder", "LayerRecord", "ClipConfig"]


@dataclass
class ClipConfig:
    """Clipping for book-keeping, set by the DP optimizer: ``bounds()`` returns the
    current bound (flat) or ``{id(param): bound}`` (per-layer)."""

    bounds: Callable[[], Any]
    per_layer: bool = False
    #: ids of the parameters clipped together (the optimizer's, as in materialize mode); None: all captured
    params: Optional[FrozenSet[int]] = None


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


class Recorder:
    """Shared state of one privatized module's capture ops.

    Holds the per-forward context (batch size, batch dimensions of every captured
    tensor) and writes per-sample gradients into ``p.grad_sample`` following
    Opacus' convention (for ``loss_reduction="mean"`` rows are multiplied by the
    batch size, so row i is sample i's own gradient).
    """

    def __init__(self, loss_reduction: str = "mean", mode: str = "materialize") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.mode = mode
        self.generation = 0
        self.batch_size: Optional[int] = None
        #: capture name -> (input batch dims, output batch dims) for the current forward
        self.batch_dims: Dict[str, Tuple[Tuple[Any, ...], Tuple[Any, ...]]] = {}
        self.strict_batch_dims = True
        self._owner: Dict[int, int] = {}  # id(param) -> backward pass of its last per-sample gradient
        self._passes_seen = 0
        self._open_pass: Optional[int] = None
        self.records: List[LayerRecord] = []  # book-keeping: this backward pass's records
        #: book-keeping: the clipping the optimizer asks for, and what each backward produced
        self.clipping: Optional["ClipConfig"] = None
        self.clipped: Dict[int, Tensor] = {}  # id(param) -> sum of clipped per-sample gradients
        self.clipped_params: Dict[int, nn.Parameter] = {}
        self.norms: List[Tensor] = []  # per backward pass: per-sample gradient norms [B] (or [B, P])
        self.factors: List[Tensor] = []
        self.passes = 0  # backward passes accumulated since the optimizer consumed them
        self.stand_ins: set = set()  # generations of empty batches run on a placeholder sample
        #: user-level DP: forward generation -> group (user) index of each row
        self.groups: Dict[int, Tensor] = {}
        self._pending_groups: Optional[Tensor] = None

    def _end_of_backward(self) -> None:
        from .bookkeeping import finish_backward

        records, self.records = self.records, []
        finish_backward(self, records)

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
        if self.mode == "bk":
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
        if self.mode == "bk":
            if not self.records:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self.records.append(rec)
            return {}
        if rec.generation in self.stand_ins:  # an empty batch: no samples, no rows
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


def _batch_of(t: Tensor, B: Optional[int], hint: Any, what: str, op: "CaptureOp", strict: bool) -> Optional[int]:
    """Resolve the batch dimension of tensor ``t`` from the propagated ``hint``."""
    if isinstance(hint, int):
        if B is not None and t.dim() > hint and t.shape[hint] != B:
            raise BatchDimensionError(
                f"{what} of {op.where()} has size {t.shape[hint]} at its batch dimension {hint}, "
                f"but the batch has {B} samples. Fix: keep one batch dimension through the model."
            )
        return hint
    if hint is None:
        return None
    if isinstance(hint, tuple) and hint and hint[0] == "fold":
        if op.folds and hint[1] == 0 and len(hint) > 3 and hint[3] == "major":
            # rows of one sample are contiguous (batch-major fold): served as [B, k, ...]
            if B is not None and (t.shape[0] % B if B else t.shape[0]):
                raise BatchDimensionError(
                    f"{what} of {op.where()} has {t.shape[0]} rows, not a multiple of the batch size {B}"
                )
            return hint
        raise BatchDimensionError(
            f"{what} of {op.where()} folds the batch into dimension {hint[1]} (size B*{hint[2]}): per-sample "
            "gradients need each sample's rows apart. Fix: keep the batch dimension separate before this layer "
            "(e.g. apply the layer to a [B, T, d] tensor instead of x.view(B*T, d); Linear accepts any rank)."
        )
    if hint == "unknown":  # propagation could not run: use the unique dimension of size B
        if B is None:
            return None
        dims = [d for d, s in enumerate(t.shape) if s == B]
        if len(dims) == 1:
            return dims[0]
        if not dims:
            return None
        if not strict and 0 in dims:
            return 0
        raise BatchDimensionError(
            f"cannot tell which dimension of {what} of {op.where()} (shape {tuple(t.shape)}) is the batch "
            f"(batch size {B}). Fix: pass example_inputs to fxdp.privatize so the batch dimension is traced, "
            "or use a batch size that differs from the other dimensions."
        )
    raise BatchDimensionError(f"{what} of {op.where()}: batch dimension {hint!r} is not supported")


def _autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class _CaptureFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: "CaptureOp", *dyn: Any):  # type: ignore[override]
        rec = op.recorder
        needs_grad = [
            isinstance(x, Tensor) and x.requires_grad and i not in op.param_index and i not in op.buffer_index
            for i, x in enumerate(dyn)
        ]
        inner = [x.detach() if isinstance(x, Tensor) else x for x in dyn]
        # a rule with a closed-form input gradient needs no inner autograd graph
        explicit = any(needs_grad) and op.explicit_input_grad(inner, needs_grad)
        record = any(needs_grad) and not explicit
        if record:
            for i, need in enumerate(needs_grad):
                if need:
                    inner[i] = inner[i].requires_grad_(True)
        with torch.enable_grad() if record else torch.no_grad():
            out = op.compute_for_capture(inner)
        flat, spec = tree_flatten(out)
        for o in flat:
            if not isinstance(o, Tensor):
                raise UnsupportedOpError(f"{op.where()} returns a non-tensor {type(o).__name__}; cannot capture it")
        ctx.op = op
        ctx.spec = spec
        ctx.inner = (inner, flat, needs_grad)
        ctx.explicit = explicit
        ctx.params = {i: dyn[i] for i in op.param_index if dyn[i].requires_grad}
        ctx.batch_size = rec.batch_size
        ctx.generation = rec.generation
        ctx.batch_dims = rec.batch_dims.get(op.capture_name, op.default_batch_dims)
        ctx.outputs = [o.detach() for o in flat] if op.checks_outputs else None
        nondiff = [o for o in flat if not o.is_floating_point() and not o.is_complex()]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        outs = tuple(o.detach() for o in flat)
        op._last_spec = spec
        return outs

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):  # type: ignore[override]
        op: CaptureOp = ctx.op
        if ctx.inner is None:
            raise PerSampleGradientError(
                f"backward ran twice through the same forward of {op.where()}. Per-sample gradients are "
                "recorded once per forward. Fix: sum the losses and call backward once, or run a new forward."
            )
        inner, flat, needs_grad = ctx.inner
        ctx.inner = None  # free activations as soon as they are used
        in_grads: List[Optional[Tensor]] = [None] * len(inner)
        want = [i for i, n in enumerate(needs_grad) if n]
        if want and ctx.explicit:
            for i, g in op.input_grads(inner, grads).items():
                in_grads[i] = g
        elif want:
            outs = [(o, g) for o, g in zip(flat, grads) if g is not None and o.requires_grad]
            if outs:
                got = torch.autograd.grad(
                    [o for o, _ in outs], [inner[i] for i in want], [g for _, g in outs], allow_unused=True
                )
                for i, g in zip(want, got):
                    in_grads[i] = g
        if ctx.params:
            rec = LayerRecord(
                op=op,
                inputs=[x.detach() if isinstance(x, Tensor) else x for x in inner],
                grads=list(grads),
                params=ctx.params,
                batch_size=ctx.batch_size,
                generation=ctx.generation,
                batch_dims=ctx.batch_dims,
                outputs=ctx.outputs,
            )
            ctx.outputs = None
            for i, g in op.recorder.on_backward(rec).items():
                in_grads[i] = g
        return (None, *in_grads)


class CaptureOp(nn.Module):
    """A graph node's op with per-sample gradient capture.

    ``compute(dyn)`` runs the op on the node's dynamic inputs (activations,
    parameters, buffers, in node-argument order); ``per_sample_grads(record)``
    turns a backward record into raw per-sample gradients ``{input index:
    [B, *shape]}``. Subclasses: ``RuleCapture`` (a registered rule) and
    ``FuncCapture`` (``torch.func`` fallback). Holds no parameters or buffers, so
    privatizing does not change the ``state_dict``.
    """

    kind = "capture"
    #: whether a batch-major fold ([B*k, ...]) can be served as [B, k, ...]
    folds = False
    #: whether the batch's outputs are kept to check, every step, that each sample's
    #: output alone equals its output in the batch (ops whose inside is not analysed)
    checks_outputs = False

    def __init__(
        self,
        capture_name: str,
        recorder: Recorder,
        param_index: Dict[int, str],
        buffer_index: Sequence[int] = (),
        module_path: str = "",
        source: Optional[str] = None,
        op_name: str = "",
    ) -> None:
        super().__init__()
        self.capture_name = capture_name
        object.__setattr__(self, "recorder", recorder)  # shared, not a submodule
        self.param_index = dict(param_index)  # dynamic-input index -> parameter name
        self.buffer_index = set(buffer_index)
        self.module_path = module_path
        self.source = source
        self.op_name = op_name
        self.default_batch_dims: Tuple[Tuple[Any, ...], Tuple[Any, ...]] = ((), ())
        self._last_spec = None

    def where(self) -> str:
        return where(self.module_path, self.op_name, self.source)

    def compute(self, dyn: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_for_capture(self, dyn: Sequence[Any]) -> Any:
        """``compute`` inside a capturing forward (where fallbacks add checks)."""
        return self.compute(dyn)

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def explicit_input_grad(self, dyn: Sequence[Any], needs_grad: Sequence[bool]) -> bool:
        """Whether :meth:`input_grads` gives the activations' gradients by formula."""
        return False

    def bk_plan(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Optional[int]],
                dim_out: Optional[int]) -> Dict[str, str]:
        """``{parameter name: how book-keeping handles it}`` at these shapes (for the report)."""
        return {n: f"materialized per sample ({self.rule_name()}, this layer only)"
                for n in sorted(set(self.param_index.values()))}

    def input_grads(self, dyn: Sequence[Any], grads: Sequence[Optional[Tensor]]) -> Dict[int, Tensor]:
        raise NotImplementedError  # pragma: no cover - only called when explicit_input_grad

    def norm_sample_sq(self, rec: LayerRecord, idx: Sequence[int]) -> Dict[int, Tensor]:
        """Raw per-sample squared gradient norms ``[B]`` of the inputs ``idx``
        (book-keeping); materializes by default, and keeps the per-sample gradients on
        the record for :meth:`clipped_sum` (computed once per step, not twice)."""
        gs = self.per_sample_grads(rec)
        rec.kept.update({i: gs[i] for i in idx})
        return {i: gs[i].flatten(1).pow(2).sum(1) for i in idx}

    def clipped_sum(self, rec: LayerRecord, factors: Dict[int, Tensor]) -> Dict[int, Tensor]:
        """``sum_i factors[k][i] * raw_grad_i`` for each input k in ``factors``."""
        gs = {i: rec.kept.pop(i) for i in list(factors) if i in rec.kept}
        if len(gs) < len(factors):
            gs.update({i: g for i, g in self.per_sample_grads(rec).items() if i not in gs})
        return {i: torch.einsum("b,b...->...", f.to(gs[i].dtype), gs[i]) for i, f in factors.items()}

    def rule_name(self) -> str:
        return self.kind

    def forward(self, *dyn: Any) -> Any:
        active = (
            self.training
            and torch.is_grad_enabled()
            and any(isinstance(dyn[i], Tensor) and dyn[i].requires_grad for i in self.param_index)
        )
        if not active:
            # eval mode, no_grad regions and frozen parameters: the plain op, ordinary autograd
            return self.compute(list(dyn))
        if _autocast_enabled():
            raise UnsupportedOpError(
                f"{self.where()} runs under torch.autocast: per-sample gradients are not supported with "
                "mixed-precision autocast (the op would run in a lower precision than its recorded inputs). "
                "Fix: train without torch.autocast, or convert the whole model and its inputs to one dtype "
                "(e.g. model.to(torch.bfloat16))."
            )
        flat = _CaptureFunction.apply(self, *dyn)
        return tree_unflatten(list(flat), self._last_spec)

    def extra_repr(self) -> str:
        return f"{self.op_name}, rule={self.rule_name()}, params={sorted(set(self.param_index.values()))}"

    # -- batch dims -------------------------------------------------------------
    def resolve_batch_dims(self, rec: LayerRecord) -> Tuple[List[Optional[int]], List[Optional[int]]]:
        hints_in, hints_out = rec.batch_dims
        strict = self.recorder.strict_batch_dims
        B = rec.batch_size
        dims_in: List[Optional[int]] = []
        for i, x in enumerate(rec.inputs):
            if not isinstance(x, Tensor) or i in self.param_index or i in self.buffer_index:
                dims_in.append(None)
                continue
            hint = hints_in[i] if i < len(hints_in) else "unknown"
            dims_in.append(_batch_of(x, B, hint, f"input {i}", self, strict))
        dims_out: List[Optional[int]] = []
        first_only = getattr(getattr(self, "rule", None), "first_output_only", False)
        for j, g in enumerate(rec.grads):
            if j > 0 and first_only:  # integer outputs beside the data (embedding_bag's offset2bag, ...)
                dims_out.append(None)
                continue
            hint = hints_out[j] if j < len(hints_out) else "unknown"
            dims_out.append(None if g is None else _batch_of(g, B, hint, f"output {j}", self, strict))
        return dims_in, dims_out


def _move_to_front(t: Tensor, dim: Any, what: str, op: CaptureOp, B: Optional[int] = None) -> Tensor:
    if isinstance(dim, tuple):  # a batch-major fold of dimension 0: [B*k, ...] -> [B, k, ...]
        return t.reshape(B, t.shape[0] // B if B else 1, *t.shape[1:])
    if dim is None:
        raise BatchDimensionError(
            f"{what} of {op.where()} has no batch dimension, so its per-sample gradients are undefined. "
            "Fix: make sure the layer is applied to batched activations."
        )
    return t if dim == 0 else t.movedim(dim, 0)


class RuleCapture(CaptureOp):
    """Capture served by a registered per-sample rule (``fxdp.rules``)."""

    kind = "rule"

    def __init__(self, *, rule, op: Callable, names: Sequence[str], static: Dict[str, Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.rule = rule
        self.op = op
        self.names = list(names)
        self.static = dict(static)

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

    def bk_plan(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Optional[int]],
                dim_out: Optional[int]) -> Dict[str, str]:
        args = self.bound(dyn)
        g = out if dim_out in (None, 0) else out.movedim(dim_out, 0)
        arg = self.rule.input_arg
        if arg in self.names:
            d = dims_in[self.names.index(arg)]
            if d not in (None, 0):
                args[arg] = args[arg].movedim(d, 0)
        plan = self.rule.bk_plan(args, g, frozenset(self.names[i] for i in self.param_index))
        return {p: plan[self.names[i]] for i, p in self.param_index.items() if self.names[i] in plan}

    def explicit_input_grad(self, dyn: Sequence[Any], needs_grad: Sequence[bool]) -> bool:
        arg = self.rule.input_arg
        if arg is None or arg not in self.names:
            return False
        i = self.names.index(arg)
        if not needs_grad[i] or sum(needs_grad) != 1:
            return False
        return self.rule.has_input_grad(self.bound(dyn))

    def input_grads(self, dyn: Sequence[Any], grads: Sequence[Optional[Tensor]]) -> Dict[int, Tensor]:
        if len(grads) != 1 or grads[0] is None:
            return {}
        return {self.names.index(self.rule.input_arg): self.rule.input_grad(self.bound(dyn), grads[0])}

    def prepared(self, rec: LayerRecord) -> Tuple[Dict[str, Any], Tensor, FrozenSet[str]]:
        """Bound arguments and output gradient, batch-first, and the needed names."""
        dims_in, dims_out = self.resolve_batch_dims(rec)
        args = self.bound(rec.inputs)
        g = rec.grads[0]
        if g is None:  # output unused by the loss
            g = torch.zeros_like(self.compute(rec.inputs))
            dims_out = [dims_out[0] if dims_out and dims_out[0] is not None else 0]
        g = _move_to_front(g, dims_out[0], "the output", self, rec.batch_size)
        if self.rule.input_arg is not None and self.rule.input_arg in self.names:
            i = self.names.index(self.rule.input_arg)
            args[self.rule.input_arg] = _move_to_front(args[self.rule.input_arg], dims_in[i], "the input", self,
                                                       rec.batch_size)
        needs = frozenset(self.names[i] for i in rec.params)
        return args, g, needs

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        if rec.kept and all(i in rec.kept for i in rec.params):
            return dict(rec.kept)
        args, g, needs = self.prepared(rec)
        if g.shape[0] == 0:  # empty batch: no samples, no rows
            return {i: rec.inputs[i].new_zeros((0,) + tuple(rec.inputs[i].shape)) for i in rec.params}
        raw = self.rule.grad_sample(args, g, needs)
        return {i: raw[self.names[i]] for i in rec.params}

    def norm_sample_sq(self, rec: LayerRecord, idx: Sequence[int]) -> Dict[int, Tensor]:
        args, g, _ = self.prepared(rec)
        if g.shape[0] == 0:
            return {i: g.new_zeros(0) for i in idx}
        out, kept = self.rule.norm_sample_sq_keep(args, g, frozenset(self.names[i] for i in idx))
        rec.kept.update({i: kept[self.names[i]] for i in idx if self.names[i] in kept})
        return {i: out[self.names[i]] for i in idx}

    def clipped_sum(self, rec: LayerRecord, factors: Dict[int, Tensor]) -> Dict[int, Tensor]:
        out: Dict[int, Tensor] = {}
        for i in [i for i in factors if i in rec.kept]:  # sum_i c_i g_i of kept per-sample gradients
            gs = rec.kept.pop(i)
            out[i] = torch.einsum("b,b...->...", factors[i].to(gs.dtype), gs)
        factors = {i: f for i, f in factors.items() if i not in out}
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
            res = self.rule.clipped_sum(args, g, factors[ids[0]], frozenset(self.names[i] for i in ids))
            out.update({i: res[self.names[i]] for i in ids})
        return out
