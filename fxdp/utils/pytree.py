"""A call's inputs flattened without reference cycles, for the per-step path.

``torch.utils._pytree.tree_flatten`` builds a recursive closure on each call: a reference
cycle that only the garbage collector frees. Called on each forward's inputs, it made every
training step leave garbage (the benchmarks' MNIST CNN 7 objects a step, the zoo's ViT 32 with
torch.export's own input check): a generation-0 collection every 9-100 steps, each promoting
what the step held at that moment, until now and then a full collection walks the whole heap
(130-200 ms in a process training the MNIST CNN; ``benchmarks/README.md``, Round 32).
Inputs made of tuples, lists, dicts, tensors, ``None`` and Python scalars (what models take)
are flattened here into the leaves ``tree_flatten`` gives, in its order; any other node
(a namedtuple, an ``OrderedDict``, a registered output class) goes to ``tree_flatten``.
"""
from __future__ import annotations

from typing import Any, Hashable, List, Tuple

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["input_leaves", "input_structure"]

#: leaves for torch's pytree as well (not registered nodes): a tensor is checked apart
_SCALARS = frozenset({int, float, bool, complex, str, bytes, type(None)})
_LEAF = "*"


class _Other(Exception):
    """A node this module leaves to ``tree_flatten``."""


def _walk(tree: Any, leaves: List[Any]) -> Hashable:
    """Append ``tree``'s leaves to ``leaves`` (``tree_flatten``'s order); its structure.
    A plain function, not a closure: nothing refers back to it."""
    kind = type(tree)
    if kind is tuple or kind is list:
        return (kind.__name__, tuple(_walk(x, leaves) for x in tree))
    if kind is dict:  # values in insertion order, as torch's dict flatten
        return ("dict", tuple(tree), tuple(_walk(x, leaves) for x in tree.values()))
    if kind in _SCALARS or isinstance(tree, Tensor):
        leaves.append(tree)
        return _LEAF
    raise _Other


def input_structure(tree: Any) -> Tuple[List[Any], Hashable]:
    """``(leaves, structure)``: the leaves of ``tree_flatten(tree)`` and a hashable key of
    its structure (where ``tree_flatten`` serves it, its spec's text): two inputs of one
    structure get the same key."""
    leaves: List[Any] = []
    try:
        return leaves, _walk(tree, leaves)
    except _Other:
        flat, spec = tree_flatten(tree)
        return flat, ("spec", str(spec))


def input_leaves(tree: Any) -> List[Any]:
    """The leaves of ``tree_flatten(tree)``."""
    return input_structure(tree)[0]
