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
import torch.fx as fx
from torch import Tensor
from torch.fx.node import map_arg

from ..errors import BatchDimensionError
from ..rules.base import SCRATCH, batch_sum, norm_dtype
from .functorch import FuncCapture
from .normalized import probe_normalized
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
        if isinstance(bo, tuple):
            return None  # a batch-major fold ([B*k, ...], multiple-choice inputs): torch.func serves it
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


class _ValueGrab(fx.Interpreter):
    """Runs a capture's subgraph and keeps the arguments and output of its node ``name``.
    A module-level class: one defined per call is a reference cycle left every step."""

    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        super().__init__(gm)
        self.name = name
        self.seen: Dict[str, Any] = {}

    def grab(self, *inputs: Any) -> Dict[str, Any]:
        self.run(*inputs)
        return self.seen

    def run_node(self, n: Any) -> Any:
        out = super().run_node(n)
        if n.name == self.name:
            self.seen.update(args=self.map_nodes_to_values(n.args, n), kwargs=self.map_nodes_to_values(n.kwargs, n),
                             out=out)
        return out


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
        with torch.no_grad():
            seen = _ValueGrab(self.fn, self.value).grab(*rec.inputs)
        args = self.rule.bind(tuple(seen["args"]), dict(seen["kwargs"]))
        v = seen["out"]
        dims_in, dims_out = self.resolve_batch_dims(rec)
        g, bo = rec.grads[0], dims_out[0]
        if bo is None:
            raise BatchDimensionError(_NO_BATCH.format(where=self.where()))
        if isinstance(bo, tuple):
            return None  # a batch-major fold ([B*k, ...], multiple-choice inputs): torch.func serves it
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
    runs once per step more, not once per sample, and the op itself is never re-run.
    Book-keeping of a conv or linear weight normalized per output channel (standardized or
    normalized) forms no per-sample gradient: the rule's norms less the form's closed terms,
    read and checked each step (``fxdp/capture/normalized.py``)."""

    def __init__(self, *, rule: Any, args_fn: Any, use: str, computed: Sequence[str], **kw: Any) -> None:
        super().__init__(fast=None, **kw)
        self.rule = rule
        object.__setattr__(self, "args_fn", args_fn)  # the computed arguments from the dynamic inputs
        self.use = use  # the op's node in the capture's subgraph
        self.computed = list(computed)  # the names of the op's computed arguments there, args_fn's outputs

    def rule_name(self) -> str:
        return f"{self.rule.describe()} (computed weights)"

    def _batch_first(self, rec: LayerRecord) -> bool:
        """One output gradient, batch first as every batched input, no draw to replay."""
        g = rec.grads[0]
        dims_in, dims_out = self.resolve_batch_dims(rec)
        return not (len(rec.grads) != 1 or g is None or dims_out[0] != 0
                    or any(d not in (None, 0) for d in dims_in) or rec.rng_state is not None)

    def _graph(self) -> Tuple[Dict[str, Any], list]:
        """The capture's subgraph: its nodes by name and its placeholders, in order."""
        got = self.__dict__.get("_graph_index")
        if got is None:
            got = self.__dict__["_graph_index"] = (
                {n.name: n for n in self.fn.graph.nodes}, [n for n in self.fn.graph.nodes if n.op == "placeholder"])
        return got

    def _args_vjp(self, dyn: Sequence[Any], slots: Sequence[int]) -> tuple:
        """``args_fn``'s outputs and their VJP w.r.t. the parameters at ``slots``."""
        def f(*pv: Tensor) -> tuple:
            vals = list(dyn)
            for i, v in zip(slots, pv):
                vals[i] = v
            return tuple(self.args_fn(*vals))

        return torch.func.vjp(f, *[dyn[i] for i in slots])

    def _bind(self, dyn: Sequence[Any], values: Sequence[Tensor]) -> Dict[str, Any]:
        """The rule's arguments: the dynamic inputs and the computed values."""
        nodes, placeholders = self._graph()
        lookup = {p: dyn[k] for k, p in enumerate(placeholders)}
        lookup.update({nodes[name]: v for name, v in zip(self.computed, values)})
        use = nodes[self.use]
        return self.rule.bind(tuple(map_arg(use.args, lookup.__getitem__)), dict(map_arg(use.kwargs, lookup.__getitem__)))

    # the forward computes the weights once with their VJP, and the input gradient by the rule's
    # formula: no inner autograd graph, and the step's norms and sums reuse the VJP

    def explicit_input_grad(self, dyn: Sequence[Any], needs_grad: Sequence[bool]) -> bool:
        self.__dict__.pop("_pending", None)
        nodes, placeholders = self._graph()
        use = nodes[self.use]
        x = self.rule.bind(tuple(use.args), dict(use.kwargs)).get(self.rule.input_arg)
        if x not in placeholders or sum(needs_grad) != 1 or not needs_grad[placeholders.index(x)]:
            return False
        slots = sorted(self.param_index)
        state = torch.random.get_rng_state()
        values, vjp_fn = self._args_vjp(dyn, slots)
        if not torch.equal(state, torch.random.get_rng_state()):
            torch.random.set_rng_state(state)  # a draw: the recorded path draws it again, and replays it
            return False
        if not self.rule.has_input_grad(self._bind(dyn, values)):
            return False
        self.__dict__["_pending"] = (values, vjp_fn, slots)
        return True

    def compute_saving(self, dyn: Sequence[Any]) -> Tuple[Any, Any]:
        saved = self.__dict__.pop("_pending")
        return self.rule.forward(self._graph()[0][self.use].target, self._bind(dyn, saved[0])), saved

    def input_grads(self, dyn: Sequence[Any], grads: Sequence[Optional[Tensor]],
                    saved: Any = None) -> Dict[int, Tensor]:
        nodes, placeholders = self._graph()
        use = nodes[self.use]
        k = placeholders.index(self.rule.bind(tuple(use.args), dict(use.kwargs))[self.rule.input_arg])
        return {k: self.rule.input_grad(self._bind(dyn, saved[0]), grads[0])}

    def _bound(self, rec: LayerRecord) -> tuple:
        """The computed arguments' values and VJP (the forward's, when it kept them) with the
        parameter slots it is taken at, the rule's bound arguments, and which of them are
        computed (rule argument -> ``args_fn`` output) or parameters read directly (rule
        argument -> dynamic-input index), and the op."""
        nodes, placeholders = self._graph()
        if rec.saved is not None:
            values, vjp_fn, slots = rec.saved
        else:
            slots = sorted(rec.params)
            values, vjp_fn = self._args_vjp(rec.inputs, slots)
        args = self._bind(rec.inputs, values)
        use = nodes[self.use]
        computed, direct = {}, {}  # rule argument -> args_fn output / dynamic input
        for k, v in self.rule.bind(tuple(use.args), dict(use.kwargs)).items():
            if getattr(v, "name", None) in self.computed:
                computed[k] = self.computed.index(v.name)
            elif v in placeholders and placeholders.index(v) in rec.params:
                direct[k] = placeholders.index(v)
        return values, vjp_fn, slots, args, computed, direct, use.target

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        g = rec.grads[0]
        if not self._batch_first(rec):
            return super().per_sample_grads(rec)  # not batch-first, or a draw to replay: the torch.func path
        if g.shape[0] == 0:  # an empty Poisson batch
            return {i: rec.inputs[i].new_zeros((0,) + tuple(rec.inputs[i].shape)) for i in rec.params}
        values, vjp_fn, slots, args, computed, direct, _ = self._bound(rec)
        got = self.rule.grad_sample(args, g, frozenset(computed) | frozenset(direct))
        cot = [None] * len(values)
        for k, j in computed.items():
            cot[j] = got[k]
        out = {i: v for i, v in zip(slots, torch.func.vmap(vjp_fn)(tuple(cot))) if i in rec.params}
        for k, i in direct.items():
            out[i] = out[i] + got[k]
        return out

    # -- book-keeping of per-channel normalized weights (fxdp/capture/normalized.py) ----------

    #: set when the layer cannot take the closed form (its computed arguments or rule): materialized
    not_normalized = False
    #: steps whose probe found a per-channel normalized weight, and steps whose check refused it
    checks_passed = 0
    checks_failed = 0
    #: the form the last probe found (standardized weights are centered, normalized ones not)
    centered_form = True

    def bk_plan(self, dyn: Sequence[Any], out: Tensor, dims_in: Sequence[Any], dim_out: Any,
                batch_size: Optional[int] = None) -> Dict[str, str]:
        from ..rules.conv import ConvRule
        from ..rules.linear import LinearRule

        how = f"materialized per sample ({self.rule_name()}, this layer only)"
        if isinstance(self.rule, (ConvRule, LinearRule)) and not self.not_normalized:
            how = (f"{self.rule.name} rule's norms less the closed form of a per-channel normalized weight "
                   "(standardized or normalized; its VJP checked each step, else " + how + ")")
        return {n: how for n in sorted(set(self.param_index.values()))}

    def _normalized(self, rec: LayerRecord) -> Optional[Dict[str, Any]]:
        """The normalized-weight plan of this record (formed once, on ``rec.memo``), or ``None``:
        the computed weight is not ``γ φ(V)`` per output channel, or the layout is not served."""
        if "normalized" not in rec.memo:
            rec.memo["normalized"] = self._plan_normalized(rec)
        return rec.memo["normalized"]

    def _plan_normalized(self, rec: LayerRecord) -> Optional[Dict[str, Any]]:
        from ..rules.conv import ConvRule
        from ..rules.linear import LinearRule

        if (self.not_normalized or not isinstance(self.rule, (ConvRule, LinearRule)) or not self._batch_first(rec)
                or rec.grads[0].shape[0] == 0):
            return None
        values, vjp_fn, slots, args, computed, direct, op = self._bound(rec)
        W = args.get("weight")
        if list(computed) != ["weight"] or len(values) != 1 or not isinstance(W, Tensor) or W.dim() < 2:
            self.not_normalized = True
            return None
        O = W.shape[0]
        nodes, placeholders = self._graph()
        read = {placeholders.index(v) for v in self.rule.bind(tuple(nodes[self.use].args),
                                                              dict(nodes[self.use].kwargs)).values()
                if v in placeholders}
        free = [i for i in slots if i not in read]  # the parameters W is computed from
        V = [i for i in free if tuple(rec.inputs[i].shape) == tuple(W.shape)]
        gain = [i for i in free if i not in V and rec.inputs[i].numel() == O]
        if len(V) != 1 or len(V) + len(gain) != len(free) or len(gain) > 1:
            self.not_normalized = True
            return None
        pos = {i: k for k, i in enumerate(slots)}

        def vjp(g: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            got = vjp_fn((g,))
            return got[pos[V[0]]], (got[pos[gain[0]]] if gain else None)

        form = probe_normalized(vjp, rec.inputs[V[0]], bool(gain), self._probe_generator(W.device),
                                first=self.centered_form)
        if form is None:
            # this step materializes; the next probes again (the form is the graph's, but a check
            # may also fail on rounding alone)
            self.checks_failed += 1
            return None
        self.checks_passed += 1
        self.centered_form = form.centered  # the next step's probe tries it first
        args[SCRATCH] = {}  # the ghost norm's patch rows, for the clipped sum
        return {"form": form, "args": args, "op": op, "V": V[0], "gain": gain[0] if gain else None,
                "direct": direct}

    def _probe_generator(self, device: torch.device) -> torch.Generator:
        """The probes' own generator, a fresh seed each step (the user's random stream is left
        alone); the check's power needs numbers independent of the weights, not secret ones."""
        self.probes = getattr(self, "probes", 0) + 1
        return torch.Generator(device=device).manual_seed(0x5EED + self.probes)

    def _channel_dots(self, plan: Dict[str, Any], g: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """Per sample and output channel, ``1 · G_io`` (centered forms only) and ``u_o · G_io``
        ``[B, O]``, from the op run on the input with the all-ones and the ``u`` weights:
        ``G_io = Σ_t g_iot a_it`` so ``w · G_io = Σ_t g_iot (w · a_it)``."""
        from ..rules.conv import ConvRule

        form, args, op = plan["form"], plan["args"], plan["op"]
        W = args["weight"]
        B, O = g.shape[0], W.shape[0]
        x = args["input"]
        acc = norm_dtype(g.dtype)
        U = form.u.reshape(W.shape).to(x.dtype)
        if isinstance(self.rule, ConvRule):
            G = args.get("groups", 1) or 1
            z = self.rule.forward(op, {**args, "weight": U, "bias": None})
            u_dot = (g.to(acc) * z.to(acc)).reshape(B, O, -1).sum(2)
            ones_dot = None
            if form.centered:  # the patch sums: one output channel a group
                s = self.rule.forward(op, {**args, "weight": W.new_ones((G,) + tuple(W.shape[1:])).to(x.dtype),
                                           "bias": None, "groups": G})
                gg = g.to(acc).reshape(B * G, O // G, -1)
                ones_dot = torch.bmm(gg, s.to(acc).reshape(B * G, -1, 1)).reshape(B, O)
            return ones_dot, u_dot
        a = x.reshape(B, -1, x.shape[-1]).to(acc)
        gg = g.reshape(B, -1, O).to(acc)
        u_dot = (gg * (a @ form.u.to(acc).t())).sum(1)
        ones_dot = torch.einsum("bto,bt->bo", gg, a.sum(2)) if form.centered else None
        return ones_dot, u_dot

    def _channel_scaled(self, g: Tensor, c: Tensor) -> Tensor:
        """``g`` with output channel o scaled by ``c_o`` (conv: dim 1; linear: the last)."""
        from ..rules.conv import ConvRule

        c = c.to(g.dtype)
        return g * (c.reshape((1, -1) + (1,) * (g.dim() - 2)) if isinstance(self.rule, ConvRule) else c)

    def keeps_per_sample_grads(self, rec: LayerRecord, idx: Any) -> bool:
        return self._normalized(rec) is None  # the closed form needs the record for its clipped sum

    def norm_sample_sq(self, rec: LayerRecord, idx: Any, measure: bool = False) -> Dict[int, Tensor]:
        plan = self._normalized(rec)
        if plan is None:
            return super().norm_sample_sq(rec, idx, measure)
        form, args, g = plan["form"], plan["args"], rec.grads[0]
        out: Dict[int, Tensor] = {}
        V, gain = plan["V"], plan["gain"]
        if V in idx or gain in idx:
            ones_dot, u_dot = self._channel_dots(plan, g)
            if V in idx:  # ‖J_V^T G_i‖²: the rule's norm of c G_i less the form's correction
                whole = self.rule.norm_sample_sq(args, self._channel_scaled(g, form.c), frozenset({"weight"}))
                whole = whole["weight"]
                corr = form.sq_norm_correction(ones_dot, u_dot).to(whole.dtype)
                # the subtraction cancels where the per-sample gradient lies mostly along the mean
                # and direction (positive inputs): a margin of a few ulps of ``whole`` keeps the
                # rounding from lowering the norm the clip factor divides by
                out[V] = (whole - corr).clamp_min(0) + whole * (4 * torch.finfo(whole.dtype).eps)
            if gain is not None and gain in idx:
                out[gain] = (u_dot * u_dot) @ (form.kappa * form.kappa).to(u_dot.dtype)
        for name, i in plan["direct"].items():
            if i in idx:
                out[i] = self.rule.norm_sample_sq(args, g, frozenset({name}))[name]
        return out

    def clipped_sum(self, rec: LayerRecord, factors: Dict[int, Tensor],
                    into: Optional[Dict[int, Tensor]] = None) -> Dict[int, Tensor]:
        plan = self._normalized(rec)
        if plan is None:
            return super().clipped_sum(rec, factors, into)
        args, g = plan["args"], rec.grads[0]
        out: Dict[int, Tensor] = {}
        V, gain = plan["V"], plan["gain"]
        # the form's J^T of the rule's clipped sum for the computed weight: the one linear map the
        # norms took (each sample's term within the bound); it is the VJP, checked this step
        by_factor: Dict[int, list] = {}
        for i in (V, gain):
            if i is not None and i in factors:
                by_factor.setdefault(id(factors[i]), []).append(i)
        for ids in by_factor.values():
            s = self.rule.clipped_sum(args, g, factors[ids[0]], frozenset({"weight"}))["weight"]
            jv, jg = plan["form"].apply(s)
            for i in ids:
                out[i] = jv if i == V else jg.reshape(rec.inputs[i].shape)
        for name, i in plan["direct"].items():
            if i in factors:
                out[i] = self.rule.clipped_sum(args, g, factors[i], frozenset({name}))[name]
        return out
