"""The transfer functions of the batch-mixing analysis, one per op family, and the
one table the interpreter dispatches through.

Each entry is ``fn(analysis, node, out, name) -> tag``: ``out`` is the node's real
output, ``name`` the op's name in the op tables (``fxdp.passes.batch_mixing.ops``)
where the family has variants, and the result the tag pytree of ``out``.
``fxdp.passes.batch_mixing.dispatch`` picks the family of a node."""
from __future__ import annotations

from typing import Any, Callable, Dict

from . import generic, indexing, inplace, matmul, modules, movement, norms, pointwise, reduction

Transfer = Callable[..., Any]

TRANSFER: Dict[str, Transfer] = {
    # no arithmetic on tags
    "input": generic.input_tags,
    "constant": generic.constant,
    "no_tag": generic.no_tag,
    "grad_mode": generic.grad_mode,
    "convert": generic.convert,
    "getattr": generic.attribute,
    "assume": generic.assume,
    # elementwise and row-wise
    "pointwise": pointwise.pointwise,
    "dim0": pointwise.dim0,
    # data movement
    "movement": movement.movement,
    "pad": movement.pad,
    # reductions, contractions
    "reduction": reduction.reduction,
    "matmul": matmul.matmul,
    # indexing and writes
    "getitem": indexing.getitem,
    "setitem": indexing.setitem,
    "nonzero": indexing.nonzero,
    "index": indexing.index,
    "overwrite": inplace.overwrite,
    # normalizations, losses, modules
    "norm": norms.norm,
    "loss": norms.loss,
    "module": modules.module,
}
