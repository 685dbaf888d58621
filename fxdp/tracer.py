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

import linecache
import os
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Set

import torch
import torch.fx as fx
from torch import nn

from .rules import module_call_for

__all__ = ["DPTracer", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXDP_DIR = os.path.dirname(__file__)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _user_frame() -> Optional[str]:
    """``file:line: code`` of the innermost frame outside torch and fxdp."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith(_TORCH_DIR) or fn.startswith(_FXDP_DIR) or fn.startswith("<")):
            line = linecache.getline(fn, f.f_lineno).strip()
            return f"{fn}:{f.f_lineno}" + (f": {line}" if line else "")
        f = f.f_back
    return None


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
        src = _user_frame()
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


def trace(model: nn.Module, tracer: Optional[DPTracer] = None) -> fx.GraphModule:
    """Trace ``model`` with a DPTracer into a GraphModule sharing its submodules.
    ``gm.meta["fxdp_untraceable"]`` maps submodules kept whole to the reason."""
    tracer = tracer or DPTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["fxdp_untraceable"] = dict(tracer.untraceable)
    return gm
