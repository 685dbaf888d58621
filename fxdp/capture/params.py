"""Per-sample rules for raw ``nn.Parameter`` uses: broadcasting and matmul.

A parameter ``p`` combined with batched data by an elementwise op,
``out = x (+ - * /) p``, broadcasts over the batch; sample i's gradient is the
chain-rule term restricted to sample i and summed back over the dimensions ``p``
was broadcast along:

    grad p_i = sum_to(p.shape) [ g_i * d out_i / d p ]

with ``d out/d p`` = 1 (add), -1 (subtrahend), x (mul), 1/x (numerator),
-x/p^2 (denominator). ``out = p.expand(B, ...)`` (a ViT's class token) is the
same sum with ``d out/d p`` = 1, and so is ``torch.cat([p.expand(B, ...), x], d)``
on the slice of the output gradient that ``p`` fills along ``d`` (the module-level
graph captures the ``cat``: there the batch size is a shape, not a value). For
``out = x @ W`` (``W`` of shape [k, n]), as for Linear: ``grad W_i = sum_t
x_{i,t}^T g_{i,t}``. A parameter read through views that keep its elements' order
(``p.reshape(1, -1, 1, 1)``) is the same sum on the view, reshaped back. A rule-served op
whose weight ``w = f(W)`` is computed from parameters alone gets ``grad W_i = J_f^T grad
w_i`` (:class:`ComputedArgsRuleCapture`).

Other raw-parameter uses (``self.W.t()`` before the op, ...) go through
``torch.func`` on the same capture (exact, slower); see ``fxdp/capture/functorch.py``.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.fx.node import map_arg

from ..errors import BatchDimensionError
from ..rules.base import batch_sum
from .functorch import FuncCapture
from .record import LayerRecord

__all__ = ["ParamCapture", "BroadcastRuleCapture", "ComputedArgsRuleCapture", "ELEMENTWISE", "EXPAND", "MATMUL",
           "CAT"]

#: op -> kind for elementwise binary ops with a fast rule
ELEMENTWISE: Dict[Any, str] = {
    operator.add: "add", torch.add: "add", "add": "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", "div": "div", torch.true_divide: "div",
    # the ATen overloads of a torch.export graph
    torch.ops.aten.add.Tensor: "add", torch.ops.aten.sub.Tensor: "sub",
    torch.ops.aten.mul.Tensor: "mul", torch.ops.aten.div.Tensor: "div",
}
MATMUL = {operator.matmul, torch.matmul, "matmul", torch.ops.aten.matmul.default, torch.ops.aten.mm.default}
#: ``p.expand(*sizes)`` as a function (the method is a ``call_method`` node named "expand")
EXPAND = {torch.Tensor.expand, torch.ops.aten.expand.default}
#: ``torch.cat(tensors, dim)`` and its aliases
CAT = {torch.cat, torch.concat, torch.concatenate}


_NO_BATCH = (
    "the output of {where} has no batch dimension, so its parameters' per-sample gradients are undefined. "
    "Fix: combine the parameter with batched data in this op (e.g. expand it to the batch size taken from the "
    "input), or pass example_inputs to fxdp.privatize so the batch dimension is traced."
)


class ParamCapture(FuncCapture):
    """Capture of a raw parameter use; explicit rules for elementwise ops and
    ``x @ W``, ``torch.func`` otherwise."""

    kind = "param"
    checks_outputs = False  # a traced region of the graph: analysed like the rest

    def __init__(self, *, fast: Optional[str] = None, param_pos: int = 1, cat: Optional[Dict[str, Any]] = None,
                 view_shape: Optional[Tuple[int, ...]] = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.fast = fast  # "add" | "sub" | "mul" | "div" | "matmul" | "expand" | "expand+cat" | None
        self.param_pos = param_pos  # position of the parameter in the op's two arguments
        #: the op reads the parameter through order-keeping views of this shape (an elementwise op)
        self.view_shape = view_shape
        #: ``expand+cat``: the ``cat`` dim and, per concatenated tensor, ``("input", slot, None)``
        #: or ``("param", slot, sizes)`` with the expand's sizes as ``("const", v)`` / ``("dyn", slot)``
        self.cat = cat

    def rule_name(self) -> str:
        return f"raw parameter ({self.fast})" if self.fast else "raw parameter (torch.func)"

    def compute_for_capture(self, dyn: Any) -> Any:
        if self.fast is not None:  # one known op on the parameter (or an order-keeping view of it)
            return self.fn(*dyn)
        return super().compute_for_capture(dyn)

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        if self.fast is None or rec.grads[0] is None:
            return super().per_sample_grads(rec)
        dims_in, dims_out = self.resolve_batch_dims(rec)
        if self.fast == "expand+cat":
            got = self._cat_grads(rec, dims_out[0])
            return got if got is not None else super().per_sample_grads(rec)
        (pi,) = rec.params
        shape = tuple(rec.inputs[pi].shape)
        # the parameter as the op read it: its views keep the elements' order, so the view's
        # per-sample gradient reshaped is the parameter's
        p = rec.inputs[pi] if self.view_shape is None else rec.inputs[pi].reshape(self.view_shape)
        xi = 1 - pi  # dynamic inputs are [activation, parameter] or [parameter, activation]
        x = rec.inputs[xi]
        g, bo = rec.grads[0], dims_out[0]
        if bo is None:
            raise BatchDimensionError(_NO_BATCH.format(where=self.where()))
        if isinstance(bo, tuple) or isinstance(dims_in[xi], tuple):
            return super().per_sample_grads(rec)  # a batch-major fold ([B*k, ...]): torch.func serves it
        if g.shape[bo] == 0:  # empty batch
            return {pi: p.new_zeros((0,) + shape)}
        if self.fast == "expand":  # d out / d p = 1: the output gradient summed back to p's shape
            per_sample = broadcast_grad(g, bo, tuple(p.shape))
            if per_sample is None:
                return super().per_sample_grads(rec)
            return {pi: per_sample[0].reshape((g.shape[bo],) + tuple(p.shape))}
        if self.fast == "matmul":
            bx = dims_in[xi]
            if bx is None or x.dim() < 2 or p.dim() != 2 or bx != bo:
                return super().per_sample_grads(rec)
            a = x.movedim(bx, 0)
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            gg = g.movedim(bo, 0)
            gg = gg.reshape(gg.shape[0], -1, gg.shape[-1])
            return {pi: torch.bmm(a.transpose(1, 2), gg)}
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, dtype=g.dtype)
        if self.fast == "add":
            d = g
        elif self.fast == "sub":
            d = g if self.param_pos == 0 else -g
        elif self.fast == "mul":
            d = g * x
        else:  # div
            d = g / x if self.param_pos == 0 else -g * x / (p * p)
        per_sample = broadcast_grad(d.expand(g.shape), bo, tuple(p.shape))
        if per_sample is None:
            return super().per_sample_grads(rec)
        return {pi: per_sample[0].reshape((g.shape[bo],) + shape)}


    def _cat_grads(self, rec: LayerRecord, bo: Optional[int]) -> Optional[Dict[int, Tensor]]:
        """``cat([p.expand(...), x, ...], d)``: each parameter's per-sample gradient from the
        slice of the output gradient it fills along ``d`` (``None``: not this layout)."""
        g = rec.grads[0]
        if bo is None:
            raise BatchDimensionError(_NO_BATCH.format(where=self.where()))
        d = self.cat["dim"] % g.dim()
        if d == bo:
            return None  # concatenated along the batch: samples are the entries, not served here
        if g.shape[bo] == 0:  # empty batch
            return {i: rec.inputs[i].new_zeros((0,) + tuple(rec.inputs[i].shape)) for i in rec.params}
        sizes = []
        for kind, slot, template in self.cat["entries"]:
            if kind == "input":
                sizes.append(rec.inputs[slot].shape[d])
            else:  # the expanded parameter's shape: expand is a view, nothing is copied
                args = [rec.inputs[v] if k == "dyn" else v for k, v in template]
                sizes.append(rec.inputs[slot].expand(*args).shape[d])
        if sum(sizes) != g.shape[d]:
            return None
        out: Dict[int, Tensor] = {}
        for (kind, slot, _), chunk in zip(self.cat["entries"], g.split(sizes, dim=d)):
            if kind != "param" or slot not in rec.params:
                continue
            p = rec.inputs[slot]
            got = broadcast_grad(chunk, bo, tuple(p.shape))
            if got is None:
                return None
            ps = got[0].reshape((g.shape[bo],) + tuple(p.shape))
            out[slot] = out[slot] + ps if slot in out else ps
        return out if set(out) == set(rec.params) else None


def broadcast_grad(g: Tensor, bo: int, shape: Tuple[int, ...]) -> Optional[Tuple[Tensor, Optional[int]]]:
    """Sample i's gradient w.r.t. a value of ``shape`` broadcast against the gradient ``g``
    (batch at ``bo``): ``g`` summed over the broadcast dimensions, ``[B, *shape less the
    dimension that met the batch]``, and that dimension (``None`` when the value does not
    span the batch). ``None`` when the value does not broadcast over the batch."""
    R, r = g.dim(), len(shape)
    kept = list(shape)
    k: Optional[int] = None
    if bo >= R - r:  # the value spans the batch dimension: it must broadcast along it
        k = bo - (R - r)
        if kept[k] != 1:
            return None
        kept.pop(k)
    g = g.movedim(bo, 0)
    return batch_sum(g, torch.Size(kept)).reshape((g.shape[0],) + tuple(kept)), k


class BroadcastRuleCapture(ParamCapture):
    """``x + op(W, idx)``: a rule-served op applied to a parameter and parameter-free
    inputs (position embeddings of ``arange(T)``), its output broadcast over the batch.
    Sample i's gradient w.r.t. the op's output is its output gradient summed over the
    broadcast dimensions (as for a raw parameter); the op's own rule turns it into
    sample i's gradient of ``W``, with the parameter-free input repeated per sample."""

    def __init__(self, *, rule: Any, op: Any, value: str, param_names: Dict[str, int], **kw: Any) -> None:
        super().__init__(fast=None, **kw)
        self.rule = rule
        self.op = op
        self.value = value  # the op's node in the capture's subgraph
        self.param_names = dict(param_names)  # rule argument -> dynamic-input index

    def rule_name(self) -> str:
        return f"{self.rule.describe()} (broadcast over the batch)"

    def _prepared(self, rec: LayerRecord) -> tuple:
        """The rule's arguments (input repeated per sample) and the per-sample output gradient."""
        import torch.fx as fx

        seen: Dict[str, Any] = {}

        class _Grab(fx.Interpreter):
            def run_node(self, n: Any) -> Any:
                out = super().run_node(n)
                if n.name == outer.value:
                    seen["args"] = self.map_nodes_to_values(n.args, n)
                    seen["kwargs"] = self.map_nodes_to_values(n.kwargs, n)
                    seen["out"] = out
                return out

        outer = self
        with torch.no_grad():
            _Grab(self.fn).run(*rec.inputs)
        args = self.rule.bind(tuple(seen["args"]), dict(seen["kwargs"]))
        v = seen["out"]
        dims_in, dims_out = self.resolve_batch_dims(rec)
        g, bo = rec.grads[0], dims_out[0]
        if bo is None:
            raise BatchDimensionError(_NO_BATCH.format(where=self.where()))
        got = broadcast_grad(g, bo, tuple(v.shape))
        if got is None:
            raise BatchDimensionError(f"{self.where()}: the broadcast value does not broadcast over the batch")
        d, k = got
        x = args[self.rule.input_arg]
        # the rule's input shares the output's leading dims (linear, embedding, norms: ``folds``)
        if k is not None:
            if k >= v.dim() - 1:
                return None  # the batch meets the feature dim: not this rule's layout
            x = x.squeeze(k)
        args[self.rule.input_arg] = x.expand((d.shape[0],) + tuple(x.shape))
        for name, i in self.param_names.items():
            args[name] = rec.inputs[i]
        return args, d

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        prepared = self._prepared(rec)
        if prepared is None:
            return super().per_sample_grads(rec)
        args, d = prepared
        needs = frozenset(n for n, i in self.param_names.items() if i in rec.params)
        if d.shape[0] == 0:
            return {i: rec.inputs[i].new_zeros((0,) + tuple(rec.inputs[i].shape)) for i in rec.params}
        got = self.rule.grad_sample(args, d, needs)
        return {i: got[n] for n, i in self.param_names.items() if i in rec.params}

    def keeps_per_sample_grads(self, rec: LayerRecord, idx: Any) -> bool:
        return False  # (replaying the graph to find out would cost a forward of the layer)

    def norm_sample_sq(self, rec: LayerRecord, idx: Any, measure: bool = False) -> Dict[int, Tensor]:
        prepared = self._prepared(rec)
        if prepared is None:
            return super().norm_sample_sq(rec, idx)
        args, d = prepared
        names = {i: n for n, i in self.param_names.items()}
        out = self.rule.norm_sample_sq(args, d, frozenset(names[i] for i in idx))
        return {i: out[names[i]] for i in idx}

    def clipped_sum(self, rec: LayerRecord, factors: Dict[int, Tensor],
                    into: Optional[Dict[int, Tensor]] = None) -> Dict[int, Tensor]:
        prepared = self._prepared(rec)
        if prepared is None:
            return super().clipped_sum(rec, factors, into)
        args, d = prepared
        names = {i: n for n, i in self.param_names.items()}
        out: Dict[int, Tensor] = {}
        for i, f in factors.items():
            out[i] = self.rule.clipped_sum(args, d, f, frozenset({names[i]}))[names[i]]
        return out


class ComputedArgsRuleCapture(ParamCapture):
    """``op(x, f(W, ...))``: a rule-served op whose parameter arguments are computed from
    parameters alone (weight standardization: NF-ResNet's ``ScaledStdConv2d``, ``conv2d(x,
    gain * (W - mean) / std)``; weight normalization). Sample i's gradient w.r.t. a computed
    argument ``w = f(W)`` is the rule's; w.r.t. ``W`` it is ``J_f(W)^T`` applied to it, one
    vector-Jacobian product of ``f`` batched over the samples (``torch.func.vmap``): ``f``
    runs once per step more, not once per sample, and the op itself is never re-run."""

    def __init__(self, *, rule: Any, args_fn: Any, use: str, computed: Sequence[str], **kw: Any) -> None:
        super().__init__(fast=None, **kw)
        self.rule = rule
        object.__setattr__(self, "args_fn", args_fn)  # the computed arguments from the dynamic inputs
        self.use = use  # the op's node in the capture's subgraph
        self.computed = list(computed)  # the names of the op's computed arguments there, args_fn's outputs

    def rule_name(self) -> str:
        return f"{self.rule.describe()} (computed weights)"

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        g = rec.grads[0]
        dims_in, dims_out = self.resolve_batch_dims(rec)
        if (len(rec.grads) != 1 or g is None or dims_out[0] != 0 or any(d not in (None, 0) for d in dims_in)
                or rec.rng_state is not None):
            return super().per_sample_grads(rec)  # not batch-first, or a draw to replay: the torch.func path
        if g.shape[0] == 0:  # an empty Poisson batch
            return {i: rec.inputs[i].new_zeros((0,) + tuple(rec.inputs[i].shape)) for i in rec.params}
        nodes = {n.name: n for n in self.fn.graph.nodes}
        placeholders = [n for n in self.fn.graph.nodes if n.op == "placeholder"]
        slots = sorted(rec.params)

        def f(*pv: Tensor) -> tuple:
            vals = list(rec.inputs)
            for i, v in zip(slots, pv):
                vals[i] = v
            return tuple(self.args_fn(*vals))

        values, vjp_fn = torch.func.vjp(f, *[rec.inputs[i] for i in slots])
        lookup = {p: rec.inputs[k] for k, p in enumerate(placeholders)}
        lookup.update({nodes[name]: v for name, v in zip(self.computed, values)})
        use = nodes[self.use]
        value = lookup.__getitem__
        args = self.rule.bind(tuple(map_arg(use.args, value)), dict(map_arg(use.kwargs, value)))
        computed, direct = {}, {}  # rule argument -> args_fn output / dynamic input
        for k, v in self.rule.bind(tuple(use.args), dict(use.kwargs)).items():
            if getattr(v, "name", None) in self.computed:
                computed[k] = self.computed.index(v.name)
            elif v in placeholders and placeholders.index(v) in rec.params:
                direct[k] = placeholders.index(v)
        got = self.rule.grad_sample(args, g, frozenset(computed) | frozenset(direct))
        cot = [None] * len(values)
        for k, j in computed.items():
            cot[j] = got[k]
        out = dict(zip(slots, torch.func.vmap(vjp_fn)(tuple(cot))))
        for k, i in direct.items():
            out[i] = out[i] + got[k]
        return out
