"""The capture op: the runtime unit of per-sample gradient capture.

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

from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import BatchDimensionError, PerSampleGradientError, UnsupportedOpError, where
from ..rules.base import sq_norms, weighted_sum
from ..rules.tied import GradFactors
from .record import LayerRecord, Recorder

__all__ = ["CaptureOp", "move_to_front", "serves_fold", "unserved_folds"]


def serves_fold(op: "CaptureOp", hint: Any) -> bool:
    """Whether ``op`` serves an input folded as ``hint``: a rule that reads ``[B, k, ...]``
    (``folds``) given a batch-major fold of dimension 0, whose order is known (the
    export path follows it; symbolic tracing's hints carry no order)."""
    return op.folds and hint[1] == 0 and len(hint) > 3 and hint[3] == "major"


def unserved_folds(op: "CaptureOp", hints: Sequence[Any]) -> List[Any]:
    """The fold hints among a trainable capture op's input ``hints`` it cannot serve."""
    if not op.param_index:
        return []
    return [h for h in hints if isinstance(h, tuple) and h and h[0] == "fold" and not serves_fold(op, h)]


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
        if serves_fold(op, hint):
            # rows of one sample are contiguous (batch-major fold): served as [B, k, ...]
            if B is not None and (t.shape[0] % B if B else t.shape[0]):
                raise BatchDimensionError(
                    f"{what} of {op.where()} has {t.shape[0]} rows, not a multiple of the batch size {B}"
                )
            return hint
        # a rule that serves folds meets one it cannot read here (the export path follows its order); a
        # rule that serves none (a group norm's per-channel sums) cannot serve it on either path
        export = ("or, for a model you cannot change (windows, patches), fxdp.privatize(model, capture='export'): "
                  "its graph follows where each sample's rows go (capture='auto', the default, takes it by "
                  "itself)." if op.folds else
                  f"this layer's per-sample rule ({op.rule_name()}) does not serve a folded batch on either capture "
                  "path.")
        raise BatchDimensionError(
            f"{what} of {op.where()} folds the batch into dimension {hint[1]} (size B*{hint[2]}): per-sample "
            "gradients need each sample's rows apart. Fix: keep the batch dimension separate before this layer "
            f"(e.g. apply the layer to a [B, T, d] tensor instead of x.view(B*T, d); Linear accepts any rank); {export}"
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


def _wants_parameters(probe: Any) -> bool:
    """Whether the backward pass running now reaches a capture op's parameters (through the
    view of one of them it took in its forward): ``loss.backward()`` does; so does
    ``torch.autograd.grad(loss, params)``; ``torch.autograd.grad(loss, x)`` (an input
    gradient) and ``loss.backward(inputs=[x])`` do not, and record no per-sample gradient.
    Where the engine cannot answer (a backward run outside its graph tasks) the record is
    taken, as before the probe existed."""
    if probe is None:
        return True
    try:
        return torch._C._will_engine_execute_node(probe)
    except RuntimeError:
        return True


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
        saved = None
        if record:
            with torch.enable_grad():
                out = op.compute_for_capture(inner)
        elif explicit:  # autograd runs a Function's forward with grad disabled already
            out, saved = op.compute_saving(inner)
        else:
            out = op.compute_for_capture(inner)
        if isinstance(out, Tensor):  # the common case, without the pytree round trip
            flat, spec = [out], None
        else:
            flat, spec = tree_flatten(out)
            for o in flat:
                if not isinstance(o, Tensor):
                    raise UnsupportedOpError(
                        f"{op.where()} returns a non-tensor {type(o).__name__}; cannot capture it")
        ctx.op = op
        # the outputs only for the inner graph's backward: holding them otherwise would keep
        # every captured layer's output alive until its backward (the memory of a second
        # activation per layer; the returned detached outputs are the caller's to keep or free)
        ctx.inner = (inner, flat if record else None, needs_grad)
        ctx.explicit = explicit
        ctx.saved = saved  # what the forward computed for the closed-form gradients (a norm's statistics)
        ctx.params = {i: dyn[i] for i in op.param_index if dyn[i].requires_grad}
        # the first trainable parameter came in through a view (CaptureOp.forward): the
        # parameter itself is recorded, the view's node tells backward whether a pass wants it
        k, param = op.__dict__.pop("_probe", (None, None))
        ctx.probe = None
        if k is not None:
            ctx.params[k], ctx.probe = param, dyn[k].grad_fn
        ctx.batch_size = rec.batch_size
        ctx.generation = rec.generation
        ctx.batch_dims = rec.batch_dims.get(op.capture_name, op.default_batch_dims)
        ctx.rng_state = op.__dict__.pop("_rng_before", None)  # FuncCapture: a draw to replay
        # a replayed draw is proven like an unanalysed layer: each sample's output against the batch's
        ctx.outputs = [o.detach() for o in flat] if op.checks_outputs or ctx.rng_state is not None else None
        nondiff = [o for o in flat if not o.is_floating_point() and not o.is_complex()]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        # an output of the inner graph or a view is detached (autograd links a fresh tensor to
        # this node, which in-place ops after it may modify); a fresh one is returned as is
        outs = tuple(o.detach() if o.requires_grad or o._is_view() else o for o in flat)
        op.__dict__["_last_spec"] = spec  # not nn.Module.__setattr__'s checks, once per layer and step
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
        saved, ctx.saved = ctx.saved, None
        if want and ctx.explicit:
            for i, g in op.input_grads(inner, grads, saved).items():
                in_grads[i] = g
        elif want:
            outs = [(o, g) for o, g in zip(flat, grads) if g is not None and o.requires_grad]
            if outs:
                got = torch.autograd.grad(
                    [o for o, _ in outs], [inner[i] for i in want], [g for _, g in outs], allow_unused=True
                )
                for i, g in zip(want, got):
                    in_grads[i] = g
        if ctx.params and _wants_parameters(ctx.probe):
            rec = LayerRecord(
                op=op,
                # detached in the forward; those the inner graph differentiated, again
                inputs=[x.detach() if isinstance(x, Tensor) and x.requires_grad else x for x in inner],
                grads=list(grads),
                params=ctx.params,
                batch_size=ctx.batch_size,
                generation=ctx.generation,
                batch_dims=ctx.batch_dims,
                outputs=ctx.outputs,
                saved=saved,
                rng_state=ctx.rng_state,
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
    #: ``(next capture op, its input index)`` where this op's output reaches only that input,
    #: through a ReLU: book-keeping forms this op's output gradient again from the next op's
    #: record instead of holding it (``fxdp.passes.relu_grads``)
    grad_from: Optional[Tuple["CaptureOp", int]] = None

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
        #: names of this op's parameters that other capture ops use too (tied; set by the capture
        #: pass): book-keeping norms them over all their uses, not as this op's record arrives
        self.shared: FrozenSet[str] = frozenset()
        self.default_batch_dims: Tuple[Tuple[Any, ...], Tuple[Any, ...]] = ((), ())
        self._last_spec = None

    def where(self) -> str:
        return where(self.module_path, self.op_name, self.source)

    def compute(self, dyn: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_for_capture(self, dyn: Sequence[Any]) -> Any:
        """``compute`` inside a capturing forward (where fallbacks add checks)."""
        return self.compute(dyn)

    def compute_saving(self, dyn: Sequence[Any]) -> Tuple[Any, Any]:
        """``(compute_for_capture(dyn), saved)`` on the closed-form input-gradient path:
        ``saved`` is what the op's forward computes anyway for :meth:`input_grads` and
        the per-sample gradients (``None``: nothing)."""
        return self.compute_for_capture(dyn), None

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def explicit_input_grad(self, dyn: Sequence[Any], needs_grad: Sequence[bool]) -> bool:
        """Whether :meth:`input_grads` gives the activations' gradients by formula."""
        return False

    def bk_plan(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Any], dim_out: Any,
                batch_size: Optional[int] = None) -> Dict[str, str]:
        """``{parameter name: how book-keeping handles it}`` at these shapes (for the report;
        batch dimensions as the symbolic-batch pass gives them, a batch-major fold served
        ``[B, k, ...]`` with ``batch_size``)."""
        return {n: f"materialized per sample ({self.rule_name()}, this layer only)"
                for n in sorted(set(self.param_index.values()))}

    def input_grads(self, dyn: Sequence[Any], grads: Sequence[Optional[Tensor]],
                    saved: Any = None) -> Dict[int, Tensor]:
        raise NotImplementedError  # pragma: no cover - only called when explicit_input_grad

    def grad_factors(self, rec: LayerRecord, i: int) -> Optional[GradFactors]:
        """Book-keeping of a tied parameter: input ``i``'s raw per-sample gradient in factored
        form (``fxdp.rules.tied``), or ``None`` (it is materialized)."""
        return None

    def bk_factors(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Any], dim_out: Any,
                   batch_size: Optional[int] = None) -> Dict[str, GradFactors]:
        """``{parameter name: its factors}`` at these shapes (``meta`` tensors; for the report's
        plan of tied parameters, as :meth:`bk_plan`)."""
        return {}

    def keeps_per_sample_grads(self, rec: LayerRecord, idx: Sequence[int]) -> bool:
        """Whether :meth:`norm_sample_sq` of ``idx`` keeps every per-sample gradient on the
        record in no more memory than the record (book-keeping then forms the norms as the
        record arrives and releases it; larger kept gradients wait for the pass's end)."""
        return True  # the default below materializes and keeps

    def norm_sample_sq(self, rec: LayerRecord, idx: Sequence[int], measure: bool = False) -> Dict[int, Tensor]:
        """Raw per-sample squared gradient norms ``[B]`` of the inputs ``idx``
        (book-keeping); materializes by default, and keeps the per-sample gradients on
        the record for :meth:`clipped_sum` (computed once per step, not twice)."""
        gs = self.per_sample_grads(rec)
        rec.kept.update({i: gs[i] for i in idx})
        return {i: sq_norms(gs[i]) for i in idx}

    def clipped_sum(self, rec: LayerRecord, factors: Dict[int, Tensor],
                    into: Optional[Dict[int, Tensor]] = None) -> Dict[int, Tensor]:
        """``sum_i factors[k][i] * raw_grad_i`` for each input k in ``factors``; those it
        can are added into ``into[k]`` in place and left out of the result."""
        gs = {i: rec.kept.pop(i) for i in list(factors) if i in rec.kept}
        if len(gs) < len(factors):
            gs.update({i: g for i, g in self.per_sample_grads(rec).items() if i not in gs})
        into = into or {}
        sums = {i: weighted_sum(f, gs[i], into.get(i)) for i, f in factors.items()}
        return {i: s for i, s in sums.items() if s is not None}

    def clipped_sum_dropping(self, rec: LayerRecord, factors: Dict[int, Tensor],
                             ok: Tensor) -> Optional[Dict[int, Tensor]]:
        """:meth:`clipped_sum` with the samples ``~ok`` (a non-finite gradient, factor 0) left
        out without per-sample gradients, or ``None``: the caller materializes them and zeroes
        those rows (``0 * nan`` is ``nan``)."""
        return None

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
        # the first trainable parameter enters through a view, whose backward node says whether a
        # backward pass reaches the parameters: torch.autograd.grad(loss, x) for an input gradient
        # (adversarial examples, saliency) reaches none, and records nothing (_wants_parameters)
        k = next(i for i in self.param_index if isinstance(dyn[i], Tensor) and dyn[i].requires_grad)
        self.__dict__["_probe"] = (k, dyn[k])
        flat = _CaptureFunction.apply(self, *dyn[:k], dyn[k].view_as(dyn[k]), *dyn[k + 1:])
        spec = self._last_spec
        return flat[0] if spec is None else tree_unflatten(list(flat), spec)

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
            if type(hint) is int and (B is None or x.dim() <= hint or x.shape[hint] == B):
                dims_in.append(hint)  # the common case, as _batch_of finds it, without its call
            else:
                dims_in.append(_batch_of(x, B, hint, f"input {i}", self, strict))
        dims_out: List[Optional[int]] = []
        first_only = getattr(getattr(self, "rule", None), "first_output_only", False)
        for j, g in enumerate(rec.grads):
            if j > 0 and first_only:  # integer outputs beside the data (embedding_bag's offset2bag, ...)
                dims_out.append(None)
                continue
            hint = hints_out[j] if j < len(hints_out) else "unknown"
            if g is None:
                dims_out.append(None)
            elif type(hint) is int and (B is None or g.dim() <= hint or g.shape[hint] == B):
                dims_out.append(hint)
            else:
                dims_out.append(_batch_of(g, B, hint, f"output {j}", self, strict))
        return dims_in, dims_out


def move_to_front(t: Tensor, dim: Any, what: str, op: CaptureOp, B: Optional[int] = None) -> Tensor:
    if isinstance(dim, tuple):  # a batch-major fold of dimension 0: [B*k, ...] -> [B, k, ...]
        return t.reshape(B, t.shape[0] // B if B else 1, *t.shape[1:])
    if dim is None:
        raise BatchDimensionError(
            f"{what} of {op.where()} has no batch dimension, so its per-sample gradients are undefined. "
            "Fix: make sure the layer is applied to batched activations."
        )
    return t if dim == 0 else t.movedim(dim, 0)
