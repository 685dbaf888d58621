"""Rewrite records and module substitution shared by the rewrite passes.

A rewrite pass (``batchnorm.py``, ``recurrent.py``, ``attention.py``) replaces
modules that cannot give exact per-sample gradients by DP-compatible ones before
tracing, and returns one ``Rewrite`` per replacement. Substitution copies the
parent modules along the replaced path (``replace_submodule``), so the user's
model object is never mutated while every parameter stays shared (an optimizer
built on the original model keeps working).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from torch import nn

__all__ = ["Rewrite", "replace_submodule", "RewritePass", "register_rewrite", "rewrite_passes", "known_options"]


@dataclass
class Rewrite:
    """One replacement: what was replaced, where, by what, why."""

    path: str  # qualified module name ("" is the root)
    original: str  # class name of the replaced module, e.g. "BatchNorm2d"
    replacement: str  # class name of the new module, e.g. "GroupNorm"
    reason: str  # why the original cannot be used under DP
    reversible: bool = False  # strip()/export can give back the original type with trained weights
    details: Dict[str, Any] = field(default_factory=dict)
    #: builds a standard torch module from the (trained) replacement; None if not reversible
    restore: Optional[Callable[[nn.Module], nn.Module]] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("restore", None)
        return d


#: a rewrite pass: (root module, options, copied paths) -> rewrites applied to
#: ``root`` in place through ``replace_submodule(root, path, new, copied)``
RewritePass = Callable[[nn.Module, Dict[str, Any], set], List[Rewrite]]

_PASSES: List[tuple] = []  # (order, pass)
_OPTIONS: set = set()


def register_rewrite(order: int, options: tuple = ()) -> Callable[[RewritePass], RewritePass]:
    """Decorator: run this rewrite pass in privatize (lower ``order`` first); it
    accepts the ``rewrite_options`` keys named in ``options``."""

    def deco(fn: RewritePass) -> RewritePass:
        _PASSES.append((order, fn))
        _PASSES.sort(key=lambda t: t[0])
        _OPTIONS.update(options)
        return fn

    return deco


def rewrite_passes() -> List[RewritePass]:
    return [fn for _, fn in _PASSES]


def known_options() -> set:
    return set(_OPTIONS)


def _own_containers(m: nn.Module) -> nn.Module:
    c = copy.copy(m)
    c._modules = dict(m._modules)  # type: ignore[assignment]
    return c


def replace_submodule(root: nn.Module, path: str, new: nn.Module, copied: set) -> None:
    """Set ``root.<path> = new``; each ancestor of ``path`` below ``root`` is replaced
    by a shallow copy with its own child table the first time (tracked in
    ``copied``), so modules shared with the user's model are not modified."""
    if not path:
        raise ValueError("cannot replace the root module in place; rewrite its children")
    parts = path.split(".")
    parent = root
    prefix = ""
    for name in parts[:-1]:
        prefix = f"{prefix}.{name}" if prefix else name
        child = parent._modules[name]
        if prefix not in copied:
            child = _own_containers(child)
            parent._modules[name] = child
            copied.add(prefix)
        parent = child
    parent._modules[parts[-1]] = new
