"""Capture pass: replace every use of a trainable parameter by a capture op.

A *use* is the first node that combines batched data with a parameter:

* a leaf module with trainable parameters (``call_module``): its registered rule
  (``fxdp.rules``), or the ``torch.func`` fallback when none is registered;
* a functional op with a registered rule whose parameter arguments are
  parameters (``F.linear(x, self.weight)``, ``F.conv2d``, ...);
* anything else (raw parameters: ``x + self.pos``, ``x @ self.W.t()``,
  ``torch.cat([self.cls.expand(B, -1, -1), x], 1)``): the op and the parameter-only
  subgraph before it, by an explicit raw-parameter rule where one applies
  (``fxdp.capture.params``), else through the fallback.

A parameter used by several capture ops (tied weights) gets the sum of their
per-sample contributions. Frozen parameters are left alone. Nodes get
``meta["fxdp_capture"]`` (the capture op's name).
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import CaptureOp, FuncCapture, Recorder, RuleCapture
from ..errors import SymbolicGraphError, UnsupportedModelError, UnsupportedOpError, where
from ..rules import module_call_for, rule_for_op
from ..capture.params import (CAT, ELEMENTWISE, EXPAND, MATMUL, BroadcastRuleCapture, ComputedArgsRuleCapture,
                              ParamCapture)
from .aliasing import writes_into
from .batch_rules import NO_DATA
from .relu_grads import link_relu_grads
from .symbolic_batch import is_shape_value

__all__ = ["insert_captures", "CAPTURES"]

CAPTURES = "_fxdp_captures"

#: functional ops whose output for one sample depends on the other samples
MIXING_OPS = {torch.nn.functional.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default}


def _op_name(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"call_module {n.target}"
    t = n.target
    name = getattr(t, "__name__", str(t))
    mod = getattr(t, "__module__", None) or ""
    if mod.startswith("torch.nn.functional"):
        name = f"F.{name}"
    return name if n.op == "call_function" else f".{name}()"


def _where(n: fx.Node) -> str:
    return where(n.meta.get("fxdp_module"), _op_name(n), n.meta.get("fxdp_source"))


def _batch_norm_training(n: fx.Node) -> bool:
    """Whether a batch_norm call uses batch statistics (True unless provably not)."""
    if n.target in (torch.batch_norm, torch.ops.aten.batch_norm.default):  # (input, weight, bias, running_mean, running_var, training, ...)
        v = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", True)
    else:  # F.batch_norm(input, running_mean, running_var, weight, bias, training=False, ...)
        v = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
    return not (isinstance(v, bool) and v is False)


#: ops that return their input's values (a copy, a device or dtype move)
_VALUE_COPIES = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device,
                 torch.ops.aten._to_copy.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default,
                 torch.ops.aten.contiguous.default}

_SHAPE_ATTRS = {"shape", "ndim"}
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel"}
_SHAPE_ARITH = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                operator.mod, operator.neg, len, int, max, min}


def _fx_shape(n: fx.Node, shapes: Set[fx.Node]) -> bool:
    """In a symbolically traced graph: ``x.shape``, ``x.size(...)`` and arithmetic on them."""
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS:
        return True
    if n.op == "call_method" and n.target in _SHAPE_METHODS:
        return True
    if n.op == "call_function" and n.target in _SHAPE_ARITH:
        nodes = n.all_input_nodes
        return bool(nodes) and all(a in shapes for a in nodes)
    return False


class FunctionalModuleCall:
    """``module(*args, **kwargs)`` with the trainable parameters passed explicitly
    (``torch.func.functional_call``), for the fallback rule. A plain object
    holding the module, so deep copies of the DP model stay consistent."""

    def __init__(self, module: nn.Module, pnames: List[str], template: List[Any], spec: Any, slots: List[int]):
        self.module = module
        self.pnames = pnames
        self.template = template
        self.spec = spec
        self.slots = slots

    def __call__(self, *dyn: Any) -> Any:
        vals = list(self.template)
        k = len(self.slots)
        for i, v in zip(self.slots, dyn[:k]):
            vals[i] = v
        args, kwargs = tree_unflatten(vals, self.spec)
        params = dict(zip(self.pnames, dyn[k:]))
        return torch.func.functional_call(self.module, params, tuple(args), dict(kwargs))


class _CaptureBuilder:
    def __init__(self, gm: fx.GraphModule, recorder: Recorder) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.recorder = recorder
        self.trainable: Dict[int, str] = {
            id(p): n for n, p in gm.named_parameters() if p.requires_grad
        }
        if not hasattr(gm, CAPTURES):
            gm.add_module(CAPTURES, nn.Module())
        self.container: nn.Module = getattr(gm, CAPTURES)
        self.input_dep: Dict[fx.Node, bool] = {}  # batched, or computed from the inputs
        self.data: Dict[fx.Node, bool] = {}  # computed from the inputs' values
        self.pdeps: Dict[fx.Node, Set[str]] = {}
        self.shapes: Set[fx.Node] = set()
        #: parameter-only nodes copied into a capture op's subgraph (it computes them)
        self.absorbed: Set[fx.Node] = set()

    # -- analysis ---------------------------------------------------------------
    def _attr(self, n: fx.Node) -> Any:
        obj: Any = self.gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj

    def _module(self, n: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(n.target))

    def _own_trainable(self, n: fx.Node) -> Set[str]:
        if n.op == "get_attr":
            v = self._attr(n)
            return {self.trainable[id(v)]} if isinstance(v, Tensor) and id(v) in self.trainable else set()
        if n.op == "call_module" and not str(n.target).startswith(CAPTURES):
            m = self._module(n)
            return {self.trainable[id(p)] for p in m.parameters() if id(p) in self.trainable}
        return set()

    def is_shape(self, n: fx.Node) -> bool:
        """Scalar shape arithmetic (``x.shape[1]``, ``sym_size``): not sample data."""
        return n in self.shapes

    def analyze(self) -> None:
        for n in self.graph.nodes:
            if is_shape_value(n) or _fx_shape(n, self.shapes):
                self.shapes.add(n)
            # shape arithmetic is not sample data; in an exported graph a value whose symbolic
            # shape holds the batch is batched (a buffer expanded to B), and a value cut from such
            # a constant without its batch is a constant again (peft's prompt tokens, expanded to
            # the batch and sliced to one row: the prompt embedding is a parameter subgraph)
            args = [a for a in n.all_input_nodes if a not in self.shapes]
            batched = any(h is not None for h in n.meta.get("fxdp_batch", ())) and n not in self.shapes
            self.data[n] = (n.op == "placeholder" or any(self.data[a] for a in args)) and n not in self.shapes
            self.input_dep[n] = self.data[n] or batched
            deps = set(self._own_trainable(n))
            for a in args:
                deps |= self.pdeps[a]
            self.pdeps[n] = deps

    def param_derived(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and not self.input_dep[n] and bool(self.pdeps[n])

    # -- capture construction -----------------------------------------------------
    def run(self) -> List[CaptureOp]:
        self.analyze()
        made: List[CaptureOp] = []
        for n in list(self.graph.nodes):
            if n.op == "output":
                bad = [a for a in tree_flatten((n.args, n.kwargs))[0] if self.param_derived(a)]
                if bad:
                    names = sorted(set().union(*(self.pdeps[a] for a in bad)))
                    raise UnsupportedModelError(
                        f"parameters {names} reach the model's output without passing through the batch "
                        f"(at {_where(bad[0])}); their per-sample gradients are undefined. Fix: compute "
                        "terms that do not depend on the data (e.g. weight penalties) outside the model."
                    )
                continue
            if not self.input_dep[n]:
                continue
            if n.op == "call_function" and n.target in MIXING_OPS and _batch_norm_training(n):
                raise UnsupportedOpError(
                    f"{_where(n)} normalizes with batch statistics (training=True), so one sample's output "
                    "depends on the others and per-sample gradients (and the DP guarantee) break. Fix: use "
                    "GroupNorm/LayerNorm, or nn.BatchNorm modules (fxdp.privatize replaces those)."
                )
            if n.target in NO_DATA:  # new_zeros(A, ...): A's dtype, not its values (Mamba's scan state)
                continue
            own = self._own_trainable(n)
            derived = [a for a in n.all_input_nodes if self.param_derived(a)]
            if not own and not derived:
                if n.op == "call_module":
                    self._module_adapter(n, self._module(n))  # options refused even when frozen
                continue
            made.append(self.capture(n, derived))
        uses = Counter(p for c in made for p in c.param_index.values())
        for c in made:  # tied parameters, known before the first backward pass
            c.shared = frozenset(p for p in c.param_index.values() if uses[p] > 1)
        # drop parameter-only nodes the capture ops absorbed; a general dead-code
        # elimination would also drop in-place ops whose results are unused (x.mul_(2)). A
        # random op the capture absorbed (dropout on DeBERTa's relative embeddings) counts
        # as impure, yet left here it would draw its numbers a second time
        for n in reversed(list(self.graph.nodes)):
            if n.op in ("get_attr", "call_function", "call_method") and not self.input_dep.get(n, True) \
                    and not n.users and (not n.is_impure() or n in self.absorbed and _seeded(n)):
                self.graph.erase_node(n)
        self.gm.recompile()
        return made

    def _common(self, n: fx.Node) -> Dict[str, Any]:
        name = n.name
        return dict(
            capture_name=name,
            recorder=self.recorder,
            module_path=n.meta.get("fxdp_module", ""),
            source=n.meta.get("fxdp_source"),
            op_name=_op_name(n),
        )

    def _get_attr(self, before: fx.Node, target: str) -> fx.Node:
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(target)
        self.input_dep[node] = self.data[node] = False
        self.pdeps[node] = self._own_trainable(node)
        return node

    def _indices(self, dyn: List[Any]) -> Tuple[Dict[int, str], List[int]]:
        params: Dict[int, str] = {}
        buffers: List[int] = []
        for i, d in enumerate(dyn):
            if isinstance(d, fx.Node) and d.op == "get_attr":
                v = self._attr(d)
                if isinstance(v, Tensor) and id(v) in self.trainable:
                    params[i] = self.trainable[id(v)]
                elif isinstance(v, Tensor):
                    buffers.append(i)
        return params, buffers

    def capture(self, n: fx.Node, derived: List[fx.Node]) -> CaptureOp:
        if n.op == "call_module" and not derived:
            m = self._module(n)
            mc = self._module_adapter(n, m)
            if mc is not None:
                return self._module_rule(n, m, mc)
            return self._module_fallback(n, m)
        if n.op == "call_function":
            rule = rule_for_op(n.target)
            if rule is not None and all(a.op == "get_attr" for a in derived):
                return self._op_rule(n, rule)
        linear = self._transposed_weight(n)
        if linear is not None:
            return self._linear_rule(n, *linear)
        return self._subgraph(n)

    def _transposed_weight(self, n: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
        """``(x, W)`` where ``n`` is ``x @ W.t()`` (``W.T``, ``W.transpose(0, 1)``,
        ``W.permute(1, 0)``; in an exported graph ``mm(x, permute(W, [1, 0]))``) of a 2-D
        parameter used directly: ``F.linear(x, W)``, which the linear rule serves (a language
        model's head computed on its embedding's weight), not the ``torch.func`` fallback."""
        if n.op not in ("call_function", "call_method") or n.target not in MATMUL or n.kwargs or len(n.args) != 2:
            return None
        x, t = n.args
        if not (isinstance(x, fx.Node) and isinstance(t, fx.Node)) or not self.input_dep[x] or self.input_dep[t]:
            return None
        w = t.args[0] if t.args and t.op in ("call_method", "call_function") else None
        if not isinstance(w, fx.Node) or w.op != "get_attr" or not _swaps_two_dims(t):
            return None
        v = self._attr(w)
        if not (isinstance(v, Tensor) and v.dim() == 2 and id(v) in self.trainable):
            return None
        return x, w

    def _linear_rule(self, n: fx.Node, x: fx.Node, w: fx.Node) -> CaptureOp:
        dyn = [x, w]
        params, buffers = self._indices(dyn)
        cap = RuleCapture(rule=rule_for_op(F.linear), op=F.linear, names=["input", "weight"], static={},
                          param_index=params, buffer_index=buffers, **self._common(n))
        return self._install(n, cap, dyn)

    def _module_adapter(self, n: fx.Node, m: nn.Module) -> Any:
        """The module's ModuleCall (validating its options), or None without a rule."""
        adapter = module_call_for(m)
        if adapter is None:
            return None
        if parametrize.is_parametrized(m):  # its rule would read the computed weight as the parameter
            raise SymbolicGraphError(
                f"{_where(n)}: {type(m).__name__} has parametrizations (weight_norm, spectral_norm, ...): its "
                "weight is computed from other parameters, which the module-level graph does not see, so they "
                "would get no per-sample gradients. Fix: privatize(..., capture='export') (the default "
                "capture='auto' does so)")
        try:
            return adapter(m)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"{_where(n)}: {e}") from None

    def _install(self, n: fx.Node, cap: CaptureOp, dyn: List[Any]) -> CaptureOp:
        self.container.add_module(cap.capture_name, cap)
        with self.graph.inserting_before(n):
            new = self.graph.call_module(f"{CAPTURES}.{cap.capture_name}", tuple(dyn))
        new.meta.update(n.meta)
        new.meta["fxdp_capture"] = cap.capture_name
        self.input_dep[new] = self.data[new] = True  # never recomputed inside another capture's region
        self.pdeps[new] = set()  # the capture op owns these parameters' per-sample gradients
        n.replace_all_uses_with(new)
        self.graph.erase_node(n)
        if hasattr(new, "_rename"):
            new._rename(n.name)  # keep the user's variable name in the generated code
        return cap

    def _validate(self, n: fx.Node, rule: Any, bound: Dict[str, Any]) -> None:
        try:
            rule.bind((), bound)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"{_where(n)}: {e}") from None

    def _module_rule(self, n: fx.Node, m: nn.Module, mc: Any) -> CaptureOp:
        rule = rule_for_op(mc.op)
        if rule is None:
            raise UnsupportedOpError(f"{_where(n)}: module adapter names op {mc.op} with no registered rule")
        if len(n.args) > len(mc.inputs):
            raise UnsupportedOpError(
                f"{_where(n)}: called with {len(n.args)} arguments, the rule expects {len(mc.inputs)}"
            )
        bound: Dict[str, Any] = dict(zip(mc.inputs, n.args))
        for k, v in n.kwargs.items():  # self.l(input=x)
            if k not in mc.inputs or k in bound:
                raise UnsupportedOpError(f"{_where(n)}: unexpected keyword argument {k!r} for {type(m).__name__}")
            bound[k] = v
        for arg, attr in mc.params.items():
            v = getattr(m, attr)
            bound[arg] = self._get_attr(n, f"{n.target}.{attr}") if v is not None else None
        bound.update(mc.kwargs)
        names = [k for k, v in bound.items() if isinstance(v, fx.Node)]
        static = {k: v for k, v in bound.items() if not isinstance(v, fx.Node)}
        self._validate(n, rule, {k: (self._attr(v) if isinstance(v, fx.Node) and v.op == "get_attr" else v)
                                 for k, v in bound.items()})
        dyn = [bound[k] for k in names]
        params, buffers = self._indices(dyn)
        cap = RuleCapture(rule=rule, op=mc.op, names=names, static=static, param_index=params,
                          buffer_index=buffers, **self._common(n))
        return self._install(n, cap, dyn)

    def _op_rule(self, n: fx.Node, rule: Any) -> CaptureOp:
        try:
            bound = rule.bind(tuple(n.args), dict(n.kwargs))
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"{_where(n)}: {e}") from None
        except TypeError as e:
            raise UnsupportedOpError(f"{_where(n)}: cannot bind the call for rule {rule.name}: {e}") from None
        names = [k for k, v in bound.items() if isinstance(v, fx.Node)]
        static = {k: v for k, v in bound.items() if not isinstance(v, fx.Node)}
        dyn = [bound[k] for k in names]
        params, buffers = self._indices(dyn)
        bad = [names[i] for i in params if names[i] not in rule.param_args]
        if bad:
            return self._subgraph(n)  # a parameter in an unusual slot: the exact fallback
        cap = RuleCapture(rule=rule, op=n.target, names=names, static=static, param_index=params,
                          buffer_index=buffers, **self._common(n))
        return self._install(n, cap, dyn)

    def _module_fallback(self, n: fx.Node, m: nn.Module) -> CaptureOp:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedOpError(
                f"{_where(n)}: {type(m).__name__} normalizes with batch statistics, so one sample's output "
                "depends on the others and per-sample gradients (and the DP guarantee) break. Fix: replace it "
                "with nn.GroupNorm (keeps the affine weights) or nn.LayerNorm."
            )
        leaves, spec = tree_flatten((n.args, n.kwargs))
        slots = [i for i, v in enumerate(leaves) if isinstance(v, fx.Node)]
        pnames = [k for k, p in m.named_parameters() if p.requires_grad]
        pnodes = [self._get_attr(n, f"{n.target}.{k}") for k in pnames]
        fn = FunctionalModuleCall(m, pnames, [None if i in slots else v for i, v in enumerate(leaves)], spec, slots)
        dyn = [leaves[i] for i in slots] + pnodes
        params, buffers = self._indices(dyn)
        cap = FuncCapture(fn=fn, description=type(m).__name__, param_index=params, buffer_index=buffers,
                          **self._common(n))
        return self._install(n, cap, dyn)

    def _subgraph(self, n: fx.Node) -> CaptureOp:
        if n.op == "call_function" and n.target in MIXING_OPS:
            raise UnsupportedOpError(
                f"{_where(n)} normalizes with batch statistics, so one sample's output depends on the others "
                "and per-sample gradients (and the DP guarantee) break. Fix: use GroupNorm/LayerNorm, or "
                "fxdp.privatize's BatchNorm replacement."
            )
        # the parameter-only ancestors of n (stop at batched values)
        region: List[fx.Node] = []
        shapes: List[fx.Node] = []  # scalar shape values the region reads (sizes taken from inputs)
        # draws from neither parameters nor samples (dropout on Funnel's sinusoid positions): made
        # once in the model's graph and passed in, so that recomputing the region per sample reads
        # the forward pass's numbers instead of drawing new ones
        drawn: List[fx.Node] = []
        seen: Set[fx.Node] = set()
        acts = [a for a in n.all_input_nodes if self.input_dep[a]]

        def visit(x: fx.Node) -> None:
            # a constant expanded to the batch that the region cuts down again (peft's prompt tokens,
            # expanded to B and sliced to one row) is recomputed with it, from the batch size
            if x in seen or self.input_dep[x] and (self.data[x] or x in acts):
                return
            seen.add(x)
            if self.is_shape(x):
                shapes.append(x)
                return
            if _seeded(x) and not self.pdeps[x]:
                drawn.append(x)
                return
            for a in x.all_input_nodes:
                visit(a)
            region.append(x)

        for a in n.all_input_nodes:
            visit(a)
        order = {x: i for i, x in enumerate(self.graph.nodes)}
        # writes in place into the region's values before n (BEiT's relative-position index,
        # built by slice assignments into zeros) are copied with it, or the copy reads them unwritten
        while extra := sorted((w for w in writes_into(region) if w not in seen and order[w] < order[n]),
                              key=order.__getitem__):
            for w in extra:
                if self.input_dep[w]:
                    raise UnsupportedOpError(
                        f"{_where(w)} writes batched data in place into a value that {_where(n)} combines with "
                        "parameters; its per-sample gradients cannot be captured. Fix: build that value out of "
                        "place (torch.where, torch.cat) from data and parameters")
                visit(w)
        region.sort(key=order.__getitem__)
        self.absorbed.update(region)
        attrs = [x for x in region if x.op == "get_attr"]
        for x in region:
            if x.op == "placeholder":  # pragma: no cover - placeholders are input-dependent
                raise UnsupportedOpError(f"{_where(n)}: unexpected input in a parameter subgraph")
        sub = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for i, a in enumerate(acts):
            env[a] = sub.placeholder(f"act_{i}")
        for x in shapes + drawn:
            env[x] = sub.placeholder(x.name)
        for x in attrs:
            env[x] = sub.placeholder(x.name)
        for x in region:
            if x.op != "get_attr":
                env[x] = sub.node_copy(x, env.__getitem__)
        use = sub.node_copy(n, env.__getitem__)
        use.target = self._out_of_place(n, acts)
        sub.output(use)
        fn = fx.GraphModule(self.gm, sub, "ParamUse")
        dyn = acts + shapes + drawn + attrs
        params, buffers = self._indices(dyn)
        hidden = set().union(*(self.pdeps[x] for x in region)) - set(params.values()) if region else set()
        if hidden:  # parameters used inside a module applied to parameter-only values (DETR's queries)
            raise SymbolicGraphError(
                f"{_where(n)}: parameters {sorted(hidden)} are used by a layer applied to parameter-only values "
                "and then broadcast over the batch; the module-level graph cannot give them per-sample "
                "gradients. Fix: privatize(..., capture='export') (the default capture='auto' does so)"
            )
        computed = self._computed_args_rule(n, region, dyn, env, sub, use)
        if computed is not None:
            cap = ComputedArgsRuleCapture(fn=fn, description=_op_name(n), param_index=params, buffer_index=buffers,
                                          **computed, **self._common(n))
            return self._install(n, cap, dyn)
        broadcast = self._broadcast_rule(n, region, params, dyn, env)
        if broadcast is not None:
            cap: CaptureOp = BroadcastRuleCapture(fn=fn, description=_op_name(n), param_index=params,
                                                  buffer_index=buffers, **broadcast, **self._common(n))
            return self._install(n, cap, dyn)
        fast, pos, view = self._fast_param_rule(n, params, dyn, region)
        cat = None if fast else self._cat_plan(n, region, params, dyn)
        cap = ParamCapture(fn=fn, description=_op_name(n), fast="expand+cat" if cat else fast, param_pos=pos,
                           cat=cat, view_shape=view, param_index=params, buffer_index=buffers, **self._common(n))
        return self._install(n, cap, dyn)

    def _out_of_place(self, n: fx.Node, acts: List[fx.Node]) -> Any:
        """The op a capture runs for the use ``n``: an in-place ATen op on an activation
        (``h += self.bias``, ConvBERT's separable convolution) as its out-of-place form, since
        the capture's inputs are leaves it may not write, and its output is what the graph
        reads after it (torch.export points later reads of the activation at the op's output). Refused
        where another op reads the activation itself: a view taken before the write sees the write."""
        t = n.target
        if not (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable and n.args
                and isinstance(n.args[0], fx.Node) and n.args[0] in acts):
            return t
        functional = getattr(getattr(torch.ops.aten, t._schema.name.split("::")[-1].rstrip("_"), None),
                             t._overloadname, None)
        if functional is None or len(n.args[0].users) > 1:
            raise UnsupportedOpError(
                f"{_where(n)} writes a parameter into an activation in place ({t}) that another op also reads "
                "(a view taken before the write sees it); the capture cannot reproduce that write. Fix: use the "
                "out-of-place op (h = h + self.bias instead of h += self.bias)")
        return functional

    def _cat_plan(self, n: fx.Node, region: List[fx.Node], params: Dict[int, str],
                  dyn: List[Any]) -> Optional[Dict[str, Any]]:
        """``torch.cat([p.expand(B, ...), x], d)`` (a ViT's class token as symbolic tracing
        reads it: ``B`` is a shape, so the ``cat`` is the parameter's first use): the
        ``cat`` dim and each concatenated tensor, when the region before the ``cat`` is
        parameters expanded directly and nothing else."""
        if n.op != "call_function" or n.target not in CAT or len(n.args) > 2:
            return None
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or set(n.kwargs) - {"tensors", "dim"}:
            return None
        slot = {x: i for i, x in enumerate(dyn)}
        entries, used = [], set()
        for t in tensors:
            if not isinstance(t, fx.Node):
                return None
            if slot.get(t) is not None and slot[t] not in params:  # an activation
                entries.append(("input", slot[t], None))
                continue
            sizes = self._expand_sizes(t, slot, params)
            if sizes is None:
                return None
            entries.append(("param", slot[t.args[0]], sizes))
            used |= {t, t.args[0]}
        return {"dim": dim, "entries": entries} if used and used == set(region) else None

    @staticmethod
    def _expand_sizes(t: fx.Node, slot: Dict[fx.Node, int], params: Dict[int, str]) -> Optional[List[tuple]]:
        """``p.expand(*sizes)`` of a parameter ``p`` itself: the sizes as ``("const", int)`` or
        ``("dyn", slot)`` (a shape value the capture op receives), else ``None``."""
        expand = (t.op == "call_method" and t.target == "expand") or (t.op == "call_function" and t.target in EXPAND)
        if not expand or t.kwargs or len(t.args) < 2 or slot.get(t.args[0]) not in params:
            return None
        sizes = t.args[1] if len(t.args) == 2 and isinstance(t.args[1], (list, tuple)) else t.args[1:]
        out: List[tuple] = []
        for v in sizes:
            if isinstance(v, int):
                out.append(("const", v))
            elif isinstance(v, fx.Node) and v in slot:
                out.append(("dyn", slot[v]))
            else:
                return None
        return out

    def _computed_args_rule(self, n: fx.Node, region: List[fx.Node], dyn: List[Any], env: Dict[fx.Node, fx.Node],
                            sub: fx.Graph, use: fx.Node) -> Optional[Dict[str, Any]]:
        """``op(x, f(W, ...))``: an op with a per-sample rule whose parameter arguments are
        computed from parameters alone (weight standardization, NF-ResNet's ``ScaledStdConv2d``;
        weight normalization): the rule serves the computed arguments, ``f``'s batched
        vector-Jacobian product the parameters (:class:`ComputedArgsRuleCapture`)."""
        rule = rule_for_op(n.target) if n.op == "call_function" else None
        if rule is None or rule.input_arg is None:
            return None
        try:
            bound = rule.bind(tuple(n.args), dict(n.kwargs))
        except Exception:
            return None
        x = bound.get(rule.input_arg)
        if not isinstance(x, fx.Node) or not self.input_dep.get(x, False):
            return None
        computed: List[fx.Node] = []
        for k, v in bound.items():
            if k == rule.input_arg or not isinstance(v, fx.Node):
                continue
            if v in region and v.op != "get_attr":
                if k not in rule.param_args or v in computed:
                    return None
                computed.append(v)
            elif v not in dyn:  # another activation
                return None
        if not computed:
            return None
        g = fx.Graph()
        copied: Dict[fx.Node, fx.Node] = {}
        g.graph_copy(sub, copied)
        g.output(tuple(copied[env[v]] for v in computed))
        args_fn = fx.GraphModule(self.gm, g, "ComputedArgs")
        args_fn.graph.eliminate_dead_code()  # the op itself (a module's purity is read from args_fn)
        args_fn.recompile()
        return dict(rule=rule, args_fn=args_fn, use=use.name, computed=[env[v].name for v in computed])

    def _broadcast_rule(self, n: fx.Node, region: List[fx.Node], params: Dict[int, str], dyn: List[Any],
                        env: Dict[fx.Node, fx.Node]) -> Optional[Dict[str, Any]]:
        """``x + op(W, ...)`` where ``op`` has a per-sample rule and reads only parameters and
        parameter-free values (position embeddings of ``arange(T)``): the rule serves ``W``
        with the per-sample gradient of the broadcast value as its output gradient."""
        if ELEMENTWISE.get(n.target) != "add" or n.kwargs or len(n.args) != 2:
            return None
        v = next((a for a in n.args if isinstance(a, fx.Node) and a in region), None)
        if v is None or not self.input_dep.get(n.args[1 - n.args.index(v)], False):
            return None
        while v.op == "call_function" and v.target in _VALUE_COPIES and v.args and v.args[0] in region:
            v = v.args[0]  # GPT-2's position_embeds.to(device): the same values
        if v.op != "call_function":
            return None
        rule = rule_for_op(v.target)
        if rule is None or rule.input_arg is None or not rule.folds:
            return None
        try:
            bound = rule.bind(tuple(v.args), dict(v.kwargs))
        except Exception:
            return None
        slot = {x: i for i, x in enumerate(dyn)}
        names: Dict[str, int] = {}
        for k, x in bound.items():
            if isinstance(x, fx.Node) and slot.get(x) in params:
                if k not in rule.param_args:
                    return None
                names[k] = slot[x]
        if set(params) != set(names.values()) or not isinstance(bound.get(rule.input_arg), fx.Node):
            return None
        return dict(rule=rule, op=v.target, value=env[v].name, param_names=names)

    def _fast_param_rule(self, n: fx.Node, params: Dict[int, str], dyn: List[Any],
                         region: List[fx.Node]) -> Tuple[Optional[str], int, Optional[Tuple[int, ...]]]:
        """An explicit raw-parameter rule applies to ``op(x, p)`` / ``op(p, x)`` with a
        parameter used directly (no parameter-only ops before it) or, for elementwise ops,
        through views that keep its elements' order (``x * self.gamma.reshape(1, -1, 1, 1)``,
        timm's ConvNeXt layer scale; the view's shape is returned), and to ``p.expand(...)``."""
        expand = (n.op == "call_method" and n.target == "expand") or (n.op == "call_function" and n.target in EXPAND)
        if expand and len(params) == 1 and not n.kwargs and n.args and n.args[0] is dyn[next(iter(params))]:
            return "expand", 0, None
        if n.kwargs or len(n.args) != 2 or len(dyn) != 2 or len(params) != 1:
            return None, 1, None
        (pi,) = params
        if not all(isinstance(a, fx.Node) for a in n.args) or dyn[1 - pi] not in n.args:
            return None, 1, None
        view = None
        if dyn[pi] not in n.args:  # the parameter through views: its elements in order, reshaped
            v = n.args[1] if n.args[0] is dyn[1 - pi] else n.args[0]
            view = self._order_kept_view(v, dyn[pi], region) if n.target in ELEMENTWISE else None
            if view is None:
                return None, 1, None
            pos = n.args.index(v)
        elif set(n.args) != set(dyn):
            return None, 1, None
        else:
            pos = n.args.index(dyn[pi])  # the parameter's position in the op's arguments
        key = n.target
        if key in ELEMENTWISE:
            return ELEMENTWISE[key], pos, view
        if key in MATMUL and pos == 1:
            return "matmul", pos, None
        return None, 1, None

    def _order_kept_view(self, v: fx.Node, p: fx.Node, region: List[fx.Node]) -> Optional[Tuple[int, ...]]:
        """The shape of ``v`` where it is the parameter ``p`` through views that keep the
        order of its elements (reshape, view, unsqueeze, squeeze, flatten, indexing by
        ``None``/``:``/``...``) and nothing else of the region; ``None`` otherwise."""
        chain: List[fx.Node] = []
        while v is not p:
            if v not in region or not _keeps_order(v):
                return None
            chain.append(v)
            v = v.args[0]
        if set(region) != {p, *chain}:
            return None
        t = torch.empty(self._attr(p).shape, device="meta")
        for c in reversed(chain):
            rest = c.args[1:]
            t = getattr(t, c.target)(*rest, **c.kwargs) if c.op == "call_method" else c.target(t, *rest, **c.kwargs)
        return tuple(t.shape) if t.numel() == self._attr(p).numel() else None


#: views that keep a tensor's elements in order (a parameter's per-sample gradient through
#: one is the view's, reshaped back)
_ORDER_KEPT_METHODS = {"reshape", "view", "unsqueeze", "squeeze", "flatten", "contiguous"}
_ORDER_KEPT_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.ops.aten.view.default,
                         torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
                         torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims,
                         torch.ops.aten.squeeze.default, torch.ops.aten.flatten.using_ints,
                         torch.ops.aten.alias.default}


def _keeps_order(v: fx.Node) -> bool:
    """``v`` is a view of its first argument that keeps its elements' order, with constant
    sizes (ints, not a dtype: ``view(torch.float16)`` reinterprets the bits)."""
    if not v.args or not isinstance(v.args[0], fx.Node) or v.kwargs:
        return False
    rest = v.args[1:]
    if v.op == "call_function" and v.target is operator.getitem:
        if len(rest) != 1:
            return False
        idx = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
    if not ((v.op == "call_method" and v.target in _ORDER_KEPT_METHODS)
            or (v.op == "call_function" and v.target in _ORDER_KEPT_FUNCTIONS)):
        return False
    flat = [d for a in rest for d in (a if isinstance(a, (list, tuple)) else (a,))]
    return all(type(d) is int for d in flat)


_TRANSPOSE = {"t", "transpose", "permute", torch.t, torch.transpose, torch.permute, torch.ops.aten.t.default,
              torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.numpy_T.default,
              torch.ops.aten.mT.default}


def _swaps_two_dims(t: fx.Node) -> bool:
    """``t`` is the transpose of a 2-D tensor, its first argument: ``.t()``, ``.T``, ``.mT``,
    ``transpose(0, 1)`` (any two distinct dims of two), ``permute(1, 0)``, and their ATen ops."""
    if t.op == "call_function" and t.target is getattr:
        return len(t.args) == 2 and t.args[1] in ("T", "mT")
    if t.target not in _TRANSPOSE or t.kwargs:
        return False
    rest = t.args[1:]
    name = t.target if isinstance(t.target, str) else t.target.__name__.split(".")[0]
    if name in ("t", "numpy_T", "mT"):
        return not rest
    if name == "transpose":
        return len(rest) == 2 and all(isinstance(d, int) for d in rest) and rest[0] % 2 != rest[1] % 2
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]


def insert_captures(gm: fx.GraphModule, recorder: Recorder) -> List[CaptureOp]:
    """Insert capture ops into ``gm`` in place; returns them in graph order, those whose output
    gradient the next op's record gives marked (:func:`~fxdp.passes.relu_grads.link_relu_grads`)."""
    made = _CaptureBuilder(gm, recorder).run()
    link_relu_grads(gm)
    return made


def _seeded(n: fx.Node) -> bool:
    """An ATen op that draws from the random generator (and writes nothing else)."""
    return isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags \
        and not n.target._schema.is_mutable
