"""DPModule: the privatized GraphModule.

Same forward signature, outputs, parameters and ``state_dict`` as the original
model; every use of a trainable parameter runs through a capture op (see
``fxdp.capture``). After ``loss.backward()`` each trainable parameter has
``p.grad_sample`` (Opacus' convention) besides its ordinary ``p.grad``.
``strip()`` gives back a plain GraphModule without capture ops.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from .bookkeeping import BookKeeping
from .loss_check import WATCHED_STEPS, LossWatch
from .capture import CaptureOp, Recorder
from .capture.op import unserved_folds
from .passes.batch_dims import input_batch_dim, per_arg, propagate_batch_dims
from .passes.batch_mixing.guard import refuse_mixing
from .passes.capture import CAPTURES
from .utils.pytree import input_structure

__all__ = ["DPModule", "adopt"]


def adopt(gm: fx.GraphModule, model: nn.Module, extra: Optional[Dict[str, nn.Module]] = None) -> fx.GraphModule:
    """Make ``gm`` own exactly ``model``'s children, parameters and buffers (same
    objects, same order), so its ``state_dict`` equals the model's.

    ``GraphModule(root, graph)`` copies only the attributes the graph references,
    as bare containers; a DP model must keep every weight and module type."""
    mods = OrderedDict((k, v) for k, v in model._modules.items() if k != CAPTURES)
    for k, v in (extra or {}).items():
        mods[k] = v
    gm._modules = mods
    # tensors made in forward (torch.tensor([...])) are the graph's constants: keep them,
    # outside the state_dict
    consts = {k: v for k, v in gm._buffers.items() if k.startswith("_tensor_constant") and k not in model._buffers}
    gm._parameters = OrderedDict(model._parameters)
    gm._buffers = OrderedDict(model._buffers)
    gm._buffers.update(consts)
    gm._non_persistent_buffers_set = set(model._non_persistent_buffers_set) | set(consts)
    gm.training = model.training
    return gm


def _signature(args: Tuple[Any, ...], batch_dim: Any) -> Tuple[Optional[int], tuple]:
    """(batch size, a key of everything but the batch size and flat inputs' lengths)."""
    B: Optional[int] = None
    key: List[Any] = []
    for arg, bd in zip(args, per_arg(args, batch_dim)):
        flat, structure = input_structure(arg)  # a tree_flatten a step left a reference cycle
        key.append(structure)
        for t in flat:
            if isinstance(t, Tensor):
                d = input_batch_dim(t, bd)
                shape = list(t.shape)
                if d is not None:
                    if B is None:
                        B = shape[d]
                    shape[d] = -1
                elif shape:  # a flat input (no batch dimension): its length varies with its bags
                    shape[0] = -1
                key.append((tuple(shape), t.dtype, t.device.type))
            else:
                key.append(type(t).__name__)
    return B, tuple(key)


class DPModule(fx.GraphModule):
    """A privatized model (a ``torch.fx.GraphModule``)."""

    #: ``privatize(allow_unsafe_model=True)``: a model in which samples influence each other
    #: is served with a warning instead of refused (no DP guarantee)
    allow_unsafe_model: bool = False

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        *,
        plain_graph: fx.Graph,
        recorder: Recorder,
        batch_first: bool = True,
        input_batch_dims: Optional[Sequence[Optional[int]]] = None,
        class_name: str = "DPModule",
        untraceable: Optional[Dict[str, str]] = None,
        rewrites: Optional[List[Dict[str, Any]]] = None,
    ) -> None:
        super().__init__(root, graph, class_name)
        adopt(self, root, {CAPTURES: getattr(root, CAPTURES)})
        self.recorder = recorder
        self.batch_first = batch_first
        # one int for every input, or one entry per positional input (None: no batch dim)
        self.batch_dim: Any = list(input_batch_dims) if input_batch_dims is not None else (0 if batch_first else 1)
        self._plain_graph = plain_graph
        self._class_name = class_name
        self.untraceable: Dict[str, str] = dict(untraceable or {})
        self.rewrites: List[Any] = list(rewrites or [])  # fxdp.passes.rewrite.Rewrite records
        self._batch_dims_cache: Dict[tuple, Dict[str, Any]] = {}
        self._proven: set = set()  # input signatures the mixing guard has passed

    @property
    def _module(self) -> nn.Module:
        """The model that is trained (Opacus' ``GradSampleModule._module``): the model
        passed to privatize, with privatize's rewrites applied; same ``Parameter``
        objects and ``state_dict`` keys as this DP model (``torch.save(
        model._module.state_dict(), path)`` as in Opacus' examples)."""
        return self._source_root

    # -- capture ops ----------------------------------------------------------------
    @property
    def captures(self) -> List[CaptureOp]:
        moved = self.__dict__.get("_export_path")
        if moved is not None:
            return moved.captures
        return list(getattr(self, CAPTURES).children())

    @property
    def capture_path(self) -> str:
        """``"fx"`` (symbolic tracing) or ``"export"`` (``torch.export``): how the graph
        that trains was captured. ``privatize(model)`` (``capture="auto"``, no example
        inputs) starts on ``"fx"`` and moves to ``"export"`` at the first training call
        where a layer gets a folded batch whose order only the ATen graph follows."""
        return "export" if self.__dict__.get("_export_path") is not None else "fx"

    def _apply(self, fn: Any, *a: Any, **kw: Any) -> "DPModule":
        moved = self.__dict__.get("_export_path")
        if moved is not None:  # not a submodule (no second state_dict): dropped as its own _apply would
            moved.drop_graphs()
        return super()._apply(fn, *a, **kw)

    def folds_for_export(self, dims: Dict[str, Any]) -> bool:
        """Whether a trainable layer whose rule reads a batch-major fold gets a fold this
        symbolic graph cannot serve (``dims``: capture name -> (input hints, output hints),
        :meth:`batch_dims_for`): the export path follows where each sample's rows go."""
        return any(c.folds and unserved_folds(c, dims.get(c.capture_name, ((), ()))[0])
                   for c in getattr(self, CAPTURES).children())

    def _move_to_export(self, dims: Dict[str, Any]) -> Optional["DPModule"]:
        """At a training call whose folds this graph cannot serve, the model captured
        with ``torch.export`` (same parameters and recorder), which serves this and every
        later call as this module's ``forward`` (its hooks run as before); ``None`` where
        this graph serves the call, or where ``capture`` was not ``"auto"``."""
        build = self.__dict__.get("_export_builder")
        if build is None or not self.folds_for_export(dims):
            return None
        moved = build(self)
        moved.train(self.training)
        if "_compile_options" in self.__dict__:
            moved.compile(**self.__dict__["_compile_options"])
        self.__dict__["_export_path"] = moved
        self.__dict__["forward"] = moved  # this module's call (its hooks) runs the moved graph
        return moved

    def capture_table(self) -> List[Dict[str, Any]]:
        """One row per capture op: module path, op, rule, parameters, source line."""
        return [
            dict(
                name=c.capture_name,
                module=c.module_path,
                op=c.op_name,
                rule=c.rule_name(),
                params=sorted(set(c.param_index.values())),
                source=c.source,
            )
            for c in self.captures
        ]

    # -- forward ------------------------------------------------------------------
    def batch_dims_for(self, args: Tuple[Any, ...]) -> Dict[str, Any]:
        """Batch dimensions of every capture op's inputs and outputs for inputs like
        ``args`` (cached per input signature)."""
        return self._batch_dims(args, _signature(args, self.batch_dim)[1])

    def _batch_dims(self, args: Tuple[Any, ...], key: tuple) -> Dict[str, Any]:
        if key not in self.__dict__.setdefault("_proven", set()):
            self._refuse_mixing(args, key)
        dims = self._batch_dims_cache.get(key)
        if dims is None:
            hints = propagate_batch_dims(self, args, self.batch_dim)
            dims = {}
            for n in self.graph.nodes:
                name = n.meta.get("fxdp_capture")
                if name is None:
                    continue
                if hints is None:
                    dims[name] = (("unknown",) * len(n.args), ("unknown",) * 8)
                    continue
                ins = tuple(hints.get(a.name, [None])[0] if isinstance(a, fx.Node) else None for a in n.args)
                dims[name] = (ins, tuple(hints.get(n.name, [])))
            self._batch_dims_cache[key] = dims
        return dims

    def _refuse_mixing(self, args: Tuple[Any, ...], key: tuple) -> None:
        """Fail closed, once per input signature (``passes/batch_mixing/guard.py``): the
        batch-mixing analysis on the graph before capture ops (the rewritten model's own
        ops) with these inputs; flat inputs without a batch dimension are cut into
        samples by their offsets (``passes/batch_mixing/ragged.py``). Not on an empty
        batch (nothing to analyse: the next batch is), nor on a model kept whole: that
        is served by the fallback, which checks every step."""
        if not _signature(args, self.batch_dim)[0]:
            return
        if self.__dict__.get("_original_model") is None:
            plain = fx.GraphModule(self, copy.deepcopy(self._plain_graph), self._class_name)
            if refuse_mixing(plain, args, batch_dim=self.batch_dim, untraceable=self.untraceable,
                             root=self.__dict__.get("_source_root", self),
                             allow_unsafe_model=self.allow_unsafe_model) is None:
                return  # these inputs do not run the model: nothing proven, the next call is analysed
        self._proven.add(key)  # refused signatures are analysed (and refused) again

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        moved = self.__dict__.get("_export_path")
        if moved is not None:  # captured again with torch.export (see _move_to_export): its graph is forward
            if moved.training != self.training:
                moved.train(self.training)
            return super().__call__(*args, **kwargs)
        variant = self._variant(args, kwargs)
        if variant is not None:
            return variant(*args, **kwargs)
        if self.training and torch.is_grad_enabled():
            given = (args, kwargs)
            if kwargs:
                args = self._positional(args, kwargs)
                kwargs = {}
            B, key = _signature(args, self.batch_dim)  # once a step: the batch size and the cache key
            dims = self._batch_dims(args, key)
            moved = self._move_to_export(dims) if key not in self.__dict__.setdefault("_served", set()) else None
            if moved is not None:
                return super().__call__(*given[0], **given[1])
            self._served.add(key)
            self.recorder.begin_forward(B, dims)
            return self._watch_loss(super().__call__(*args, **kwargs), B)
        return super().__call__(*args, **kwargs)

    def _variant(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional["DPModule"]:
        """The graph for a call passing arguments this one was traced without.

        Arguments defaulting to ``None`` are traced as ``None`` (``fxdp.tracer``), the call
        Opacus' examples make (``forward(x, hidden=None)``); a call that passes some of
        them runs a graph traced with them (built on first use, same parameters, capture
        ops reporting to the same recorder, this module's hooks)."""
        traced_none = self.meta.get("fxdp_none_args") if hasattr(self, "meta") else None
        if not traced_none:
            return None
        names = self.__dict__.get("_placeholder_names")
        if names is None:  # once: this runs on every call
            names = self.__dict__["_placeholder_names"] = [n.target for n in self.graph.nodes if n.op == "placeholder"]
        given = {name for i, name in enumerate(names) if name in traced_none and (
            (i < len(args) and args[i] is not None) or kwargs.get(name) is not None)}
        if not given:
            return None
        build = self.__dict__.get("_build_variant")
        if build is None:
            raise TypeError(
                f"{self._class_name}.forward was captured with {sorted(given)} = None and cannot take "
                "them. Fix: privatize the model again and call it with these arguments"
            )
        variants = self.__dict__.setdefault("_variants", {})
        key = frozenset(traced_none - given)
        if key not in variants:
            v = build(set(key))
            for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                         "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                if hasattr(self, attr):
                    setattr(v, attr, getattr(self, attr))  # the same dicts: hooks added later apply too
            v.__dict__["_build_variant"] = build
            v.__dict__["_variants"] = variants
            v.train(self.training)
            variants[key] = v
        v = variants[key]
        if v.training != self.training:
            v.train(self.training)
        return v

    def _watch_loss(self, output: Any, batch_size: Optional[int]) -> Any:
        """The first training forwards: check that the loss is a per-sample loss reduced as
        ``loss_reduction`` says (:mod:`fxdp.loss_check`)."""
        watch = self.__dict__.get("_loss_watch")
        if watch is None:
            watch = self.__dict__["_loss_watch"] = LossWatch()
        if watch.steps < WATCHED_STEPS:
            watch.watch(output, self.recorder.loss_reduction, batch_size, self.allow_unsafe_model)
        return output

    def _positional(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, ...]:
        names = [n.target for n in self.graph.nodes if n.op == "placeholder"]
        out = list(args)
        for name in names[len(args):]:
            if name in kwargs:
                out.append(kwargs.pop(name))
            else:
                default = [n for n in self.graph.nodes if n.op == "placeholder" and n.target == name][0].args
                if not default:
                    raise TypeError(f"forward() missing argument {name!r}")
                out.append(default[0])
        if kwargs:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(kwargs)}")
        return tuple(out)

    # -- per-sample gradients -------------------------------------------------------
    @property
    def grad_sample_mode(self) -> str:
        """``"bk"`` (book-keeping: clipped sums without per-sample gradients) or
        ``"materialize"`` (``p.grad_sample``); settable, the same graph serves both."""
        return self.recorder.mode

    @grad_sample_mode.setter
    def grad_sample_mode(self, mode: str) -> None:
        self.recorder.set_mode(mode)

    @property
    def bookkeeping(self) -> Optional[BookKeeping]:
        """The records a ``"bk"`` model's backward passes leave for the optimizer
        (``optimizer.attach_bookkeeping(model.bookkeeping)``); ``None`` in materialize mode."""
        return self.recorder.bookkeeping

    def compile(self, **options: Any) -> "DPModule":  # type: ignore[override]
        """``torch.compile`` the model's code between its capture ops (``options`` go to
        ``torch.compile``). A capture op hands records to the recorder in its backward
        pass, a side effect Dynamo cannot trace, so each one stays eager (a graph break:
        ``torch._dynamo.disable``) and the ops between them (activations, norms without
        parameters, attention) are compiled. ``torch.nn.Module.compile`` would compile
        the recorder's Python state changes too and fail. Returns ``self``."""
        self.__dict__["_compile_options"] = dict(options)
        moved = self.__dict__.get("_export_path")
        if moved is not None:
            moved.compile(**options)
        self._compile_graph_code()
        return self

    def _compile_graph_code(self) -> None:
        options = self.__dict__.get("_compile_options")
        if options is None:
            return
        for cap in self.captures:
            if "forward" not in cap.__dict__:  # once per capture op
                cap.forward = torch._dynamo.disable(cap.forward)
        if "forward" not in self.__dict__:
            self.forward = torch.compile(self.forward, **options)

    def bookkeeping_methods(self) -> Dict[str, List[Dict[str, Any]]]:
        """Per layer, the book-keeping method used at each input shape seen so far where
        the rule has several exact ones and ``bk_methods="measure"``: the measured
        winner, the cost model's choice and the milliseconds of each candidate."""
        out: Dict[str, List[Dict[str, Any]]] = {}
        for cap in self.captures:
            for (out_shape, in_shapes, needs), choice in getattr(cap, "bk_methods", {}).items():
                out.setdefault(cap.capture_name, []).append(
                    {"output_shape": out_shape, "params": sorted(needs), **choice})
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad``, ``p.grad_sample`` and book-keeping records not yet clipped."""
        super().zero_grad(set_to_none=set_to_none)
        for p in self.parameters():
            p.grad_sample = None
        if self.recorder.bookkeeping is not None:
            self.recorder.bookkeeping.clear(list(self.parameters()))

    def set_groups(self, groups: Tensor) -> None:
        """User-level DP (several records per user): row ``i`` of the *next* forward
        belongs to user ``groups[i]`` (``0..U-1``). Each parameter's ``grad_sample``
        then has one row per user, the sum of that user's records' gradients, so
        clipping bounds a user's whole contribution (McMahan et al. 2018, "Learning
        Differentially Private Recurrent Language Models"). Pair it with
        :class:`fxdp.data.UserPoissonSampler` (users, not records, are sampled) and
        ``grad_sample_mode="materialize"``."""
        self.recorder.set_groups(groups)

    def grad_samples(self) -> Dict[str, Optional[Tensor]]:
        return {n: getattr(p, "grad_sample", None) for n, p in self.named_parameters()}

    # -- strip ----------------------------------------------------------------------
    def strip(self) -> fx.GraphModule:
        """A plain GraphModule without capture ops: same submodules and parameters
        (shared, not copied), same outputs."""
        original = getattr(self, "_original_model", None)
        if original is not None:  # an untraceable model kept whole
            return original
        if any(r.reversible for r in self.rewrites):
            return self._restored()
        gm = fx.GraphModule(self, copy.deepcopy(self._plain_graph), self._class_name)
        adopt(gm, self)
        return gm

    def _restored(self) -> fx.GraphModule:
        """Trace a module tree in which reversible rewrites are undone (standard
        torch modules with the trained weights)."""
        from .passes.rewrite import _own_containers, replace_submodule
        from .tracer import DPTracer, trace

        root = _own_containers(self._source_root)
        copied: set = set()
        for r in self.rewrites:
            if r.reversible and r.restore is not None:
                replace_submodule(root, r.path, r.restore(self._source_root.get_submodule(r.path)), copied)
        gm = trace(root, DPTracer())
        return adopt(gm, root)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "DPModule":
        cls = type(self)
        res = cls.__new__(cls)
        memo[id(self)] = res
        moved = self.__dict__.get("_export_path")
        # a module moved to the export path is copied as it was before: the copy moves at its first call
        own = {k: v for k, v in self.__dict__.items() if k != "_export_path" and not (k == "forward" and v is moved)}
        state = copy.deepcopy(own, memo)
        graph = state.pop("_graph")
        res.__dict__.update(state)
        res.graph = graph  # re-owns the graph and regenerates the code
        return res
