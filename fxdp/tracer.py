"""DPTracer: symbolic tracing that decides leaves for DP and keeps provenance.

Leaves are (1) modules served by a per-sample rule (``nn.Linear``, convolutions,
embeddings, norms; subclasses keeping the base ``forward``), (2) parameter-free
``torch.nn`` modules (kept whole for readable graphs), (3) modules the user
names, and (4) submodules that cannot be traced symbolically (data-dependent
control flow): their partial trace is rolled back, the call is kept as a leaf,
and the reason is recorded in ``tracer.untraceable``.

Every node gets ``meta["fxdp_module"]`` (the path of the innermost module whose
code created it) and ``meta["fxdp_source"]`` (``file:line`` of the user's code).

Grad-mode changes (``torch.no_grad()``, ``torch.enable_grad()``,
``torch.set_grad_enabled``) are recorded as ``torch._C._set_grad_enabled`` nodes;
plain ``torch.fx`` drops them, which would silently train through code the user
excluded from differentiation.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Optional, Set

import torch
import torch.fx as fx
from torch import nn

from .errors import SymbolicGraphError
from .rules import module_call_for
from .utils.custom_backward import watch_functions
from .utils.host_rng import watch_draws
from .utils.source import user_frame

__all__ = ["DPTracer", "trace"]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


class DPTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` for privatization (see the module docstring)."""

    def __init__(self, leaf_modules: Iterable[type] = (), leaf_names: Iterable[str] = ()) -> None:
        super().__init__()
        self.user_leaf_types = tuple(leaf_modules)
        self.user_leaf_names: Set[str] = set(leaf_names)
        #: qualified name -> reason, for submodules kept whole because tracing failed
        self.untraceable: Dict[str, str] = {}
        self._path_stack: list = [""]

    # -- leaves ---------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.untraceable or qualname in self.user_leaf_names:
            return True
        if self.user_leaf_types and isinstance(m, self.user_leaf_types):
            return True
        if module_call_for(m) is not None:
            return True
        is_torch_nn = m.__module__.startswith("torch.nn") or m.__module__.startswith("torch.ao.nn")
        if is_torch_nn and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # parameter-free torch modules stay whole (readable graphs); torch modules
            # with parameters are traced into their parts when they can be
            return not _has_params(m)
        return False

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # last node before this call
        saved_stack = dict(self.module_stack)
        saved_calls = dict(self.num_calls)
        self._path_stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # data-dependent control flow, Proxy misuse, ...
            self._rollback(last)
            self.module_stack.clear()
            self.module_stack.update(saved_stack)
            self.num_calls = saved_calls
            self.untraceable[qualname] = f"{type(e).__name__}: {e}".strip()
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._path_stack.pop()

    def _rollback(self, last: fx.Node) -> None:
        nodes = []
        n = last.next
        while n is not self.graph._root:
            nodes.append(n)
            n = n.next
        for n in reversed(nodes):
            self.graph.erase_node(n)

    # -- provenance -----------------------------------------------------------
    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["fxdp_module"] = target if kind == "call_module" else self._path_stack[-1]
        src = user_frame()
        if src is not None:
            node.meta["fxdp_source"] = src
        return node

    # -- grad mode --------------------------------------------------------------
    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        real = torch._C._set_grad_enabled
        tracer = self

        def recording_set_grad_enabled(mode: bool) -> None:
            real(mode)
            tracer.create_node("call_function", real, (bool(mode),), {})

        torch._C._set_grad_enabled = recording_set_grad_enabled
        prev = torch.is_grad_enabled()
        try:
            return super().trace(root, concrete_args)
        finally:
            torch._C._set_grad_enabled = real
            real(prev)


def _none_defaults(model: nn.Module) -> Dict[str, None]:
    """``forward``'s arguments that default to ``None`` (``hidden=None``, ``mask=None``),
    traced as the concrete ``None``: a proxy in their place would take the ``is not None``
    branch of ``if hidden is None`` and build a graph for a call nobody makes. fx guards
    the specialization; :class:`fxdp.module.DPModule` traces another graph for calls that
    pass some of them."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: None for p in params
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace(model: nn.Module, tracer: Optional[DPTracer] = None,
          none_args: Optional[Set[str]] = None) -> fx.GraphModule:
    """Trace ``model`` with a DPTracer into a GraphModule sharing its submodules.
    ``gm.meta["fxdp_untraceable"]`` maps submodules kept whole to the reason;
    ``gm.meta["fxdp_none_args"]`` names the arguments traced as ``None`` (default: every
    argument whose default is ``None``; ``none_args`` chooses a subset)."""
    tracer = tracer or DPTracer()
    concrete = _none_defaults(model)
    if none_args is not None:
        concrete = {k: v for k, v in concrete.items() if k in none_args}
    with watch_draws(torch_too=True) as drew, watch_functions() as functions:
        graph = tracer.trace(model, concrete or None)
    if functions:
        # the graph would hold the Function's forward ops and drop its backward; the export capture
        # checks on the first batch that the backward is the forward's derivative
        f = functions[0]
        raise SymbolicGraphError(
            f"{type(model).__name__} applies the custom autograd.Function {f.name} (at {f.source}); symbolic "
            "tracing keeps its forward's ops and drops its backward, unchecked. Fix: privatize(model, "
            "capture='export'), which checks that the backward is the forward's derivative (capture='auto' does so)")
    if drew.names:
        # traced ops draw nothing, so a draw ran once, at tracing, on values that are not the
        # inputs' and its outcome is now fixed in the graph: a dropout mask on positions built with
        # arange became a constant, a LayerDrop branch on torch.rand([]) was taken once for all steps
        raise SymbolicGraphError(
            f"{type(model).__name__} draws random numbers outside the operations on its inputs "
            f"({', '.join(drew.names)}: e.g. dropout on positions built with torch.arange, a LayerDrop test on "
            "torch.rand([])); symbolic tracing would fix their outcome for every step. Fix: "
            "privatize(model, capture='export') (capture='auto' does so)")
    for n in graph.nodes:  # fx renames a specialized argument's placeholder ("y_1"): keep forward's name
        if n.op == "placeholder" and isinstance(n.target, str) and n.target.endswith("_1") \
                and n.target[:-2] in concrete:
            n.target = n.target[:-2]
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["fxdp_untraceable"] = dict(tracer.untraceable)
    gm.meta["fxdp_none_args"] = frozenset(concrete)
    return gm
