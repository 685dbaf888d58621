"""Which transfer function handles a node: its op kind, target and name resolved to
a family, a key of ``transfer.TRANSFER`` (with the op's name in the op tables and
whether it writes its first argument in place)."""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .ops import (_CONVERT, _DIM0, _FACTORY, _FUNCS, _INDEX, _LOSSES, _MATMUL, _MOVEMENT, _NORMS, _OPERATOR_INPLACE,
                  _OPERATOR_POINTWISE, _POINTWISE, _REDUCTIONS, _SHAPE_METHODS, _aten_pointwise, _hashable,
                  _Unknown, semantics_for)

if TYPE_CHECKING:
    from .analysis import BatchMixingAnalysis

#: (family, name in the op tables, in place)
Resolved = Tuple[str, Optional[str], bool]

_DECLARED = {"pointwise": "pointwise", "dim0": "dim0"}  # other declared kinds: "per_sample", trusted
_OVERWRITES = ("zero", "fill", "copy", "fill_diagonal", "normal", "uniform", "random", "bernoulli",
               "exponential", "geometric", "cauchy", "log_normal")


def resolve(an: "BatchMixingAnalysis", n: fx.Node) -> Resolved:
    """The family of ``n``; raises ``_Unknown`` for an op without one."""
    if n.op == "placeholder":
        return "input", None, False
    if n.op == "get_attr":
        return "constant", None, False
    if n.op == "call_module":
        return "module", None, False
    if n.op == "call_method":
        return _method(an, n, str(n.target))
    if n.op == "call_function":
        return _function(an, n)
    raise _Unknown(f"node kind {n.op}")


def _has_tensor(an: "BatchMixingAnalysis", n: fx.Node) -> bool:
    return any(isinstance(v, Tensor) for v in tree_flatten(an.V((n.args, n.kwargs)))[0])


def _function(an: "BatchMixingAnalysis", n: fx.Node) -> Resolved:
    t = n.target
    if t is operator.getitem:
        return "getitem", None, False
    if t is operator.setitem:
        return "setitem", None, False
    if t is getattr:
        return "getattr", None, False
    if t in _OPERATOR_INPLACE:
        return "pointwise", None, True
    if t in _OPERATOR_POINTWISE or t is operator.matmul:
        if not _has_tensor(an, n):
            return "no_tag", None, False
        return ("matmul", "matmul", False) if t is operator.matmul else ("pointwise", None, False)
    if t is torch._C._set_grad_enabled:
        return "grad_mode", None, False
    sem = semantics_for(t)
    if sem is not None:
        return _DECLARED.get(sem, "assume"), None, False
    name = _FUNCS.get(t) if _hashable(t) else None
    if name is None:
        if not _has_tensor(an, n):
            return "constant", None, False
        fname = getattr(t, "__name__", None)
        if isinstance(fname, str) and _aten_pointwise(fname) and getattr(t, "__module__", "").startswith("torch"):
            return "pointwise", None, False
        raise _Unknown("unknown function")
    return _named(an, n, name), name, False


def _method(an: "BatchMixingAnalysis", n: fx.Node, name: str) -> Resolved:
    if name in _SHAPE_METHODS:
        return "no_tag", None, False
    inplace = name.endswith("_") and not name.endswith("__") and name[:-1] not in ("requires_grad", "retain_grad")
    base = name[:-1] if inplace else name
    if name.startswith("__") and name.endswith("__"):
        base = name.strip("_").lstrip("r") if name.startswith("__r") else name.strip("_")
        op = getattr(operator, base, None)
        if op in _OPERATOR_POINTWISE:
            return "pointwise", None, False
        if base == "matmul":
            return "matmul", "matmul", False
        raise _Unknown("unknown method")
    if base in _OVERWRITES and inplace:
        return "overwrite", base, True
    if not (base in _FACTORY or base in _CONVERT or base in _MOVEMENT or base in _REDUCTIONS
            or base in _POINTWISE or base in _MATMUL or base in _INDEX or base in _NORMS
            or _aten_pointwise(base)):
        raise _Unknown("unknown method")
    return _named(an, n, base), base, inplace


def _named(an: "BatchMixingAnalysis", n: fx.Node, name: str) -> str:
    """The family of a function or method known by ``name``."""
    if name in _FACTORY:
        return "constant"
    if name in _CONVERT:
        return "convert"
    if name in ("max", "min") and len(n.args) > 1 and isinstance(an.V(n.args[1]), Tensor):
        return "pointwise"
    if name == "where" and len(n.args) + len(n.kwargs) == 1:
        return "nonzero"
    if name in ("nonzero", "argwhere"):
        return "nonzero"
    if name in _POINTWISE or (name not in _MOVEMENT and name not in _REDUCTIONS and name not in _MATMUL
                              and name not in _INDEX and name not in _NORMS and name not in _DIM0
                              and name not in _LOSSES and name not in ("pad", "im2col") and _aten_pointwise(name)):
        return "pointwise"
    if name in _MOVEMENT:
        return "movement"
    if name == "pad":
        return "pad"
    if name in _REDUCTIONS:
        return "reduction"
    if name in _MATMUL:
        return "matmul"
    if name in _INDEX:
        return "index"
    if name in _NORMS:
        return "norm"
    if name in _DIM0 or name == "im2col":
        return "dim0"
    if name in _LOSSES:
        return "loss"
    raise _Unknown("unknown function")
