"""Inline ``torch.no_grad()`` blocks of an exported graph, keeping their grad mode.

``torch.export`` puts a block that changes the grad mode (``torch.no_grad()``, a method
decorated with it: the sinusoidal positions M2M100 / NLLB and Speech2Text compute from the
token ids) into a subgraph called through ``higher_order.wrap_with_set_grad_enabled``. The
batch rules read ATen ops, not subgraphs, so a block that takes batched data would be
refused. This pass copies each block's ops into the graph between two
``torch._C._set_grad_enabled`` calls (the nodes symbolic tracing records for the same
blocks, :mod:`fxdp.tracer`): the same ops in the same grad mode, now read op by op.
"""
from __future__ import annotations

import operator
from typing import Dict

import torch
import torch.fx as fx

__all__ = ["inline_grad_mode_blocks"]

_WRAP = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def inline_grad_mode_blocks(gm: fx.GraphModule, outer: bool = True) -> int:
    """Inline every ``wrap_with_set_grad_enabled`` call of ``gm`` (nested ones too; ``outer``:
    the grad mode the graph runs in, restored after each block). Returns how many."""
    if _WRAP is None:
        return 0
    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not _WRAP:
            continue
        enable, sub_node, *operands = n.args
        sub = getattr(gm, sub_node.target)
        done += inline_grad_mode_blocks(sub, outer=bool(enable))
        env: Dict[fx.Node, fx.Node] = {}
        with gm.graph.inserting_before(n):
            gm.graph.call_function(torch._C._set_grad_enabled, (bool(enable),))
            phs = [x for x in sub.graph.nodes if x.op == "placeholder"]
            env.update(zip(phs, operands))
            outputs = None
            for x in sub.graph.nodes:
                if x.op == "placeholder":
                    continue
                if x.op == "output":
                    outputs = fx.map_arg(x.args[0], env.__getitem__)
                    continue
                if x.op == "get_attr":  # a tensor constant of the block: re-registered on gm
                    name = f"{sub_node.target}_{x.target}".replace(".", "_")
                    setattr(gm, name, getattr(sub, x.target))
                    env[x] = gm.graph.get_attr(name)
                    env[x].meta = dict(x.meta)
                    continue
                env[x] = gm.graph.node_copy(x, env.__getitem__)
            gm.graph.call_function(torch._C._set_grad_enabled, (outer,))
        outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        for u in list(n.users):
            if u.op == "call_function" and u.target is operator.getitem:
                u.replace_all_uses_with(outs[u.args[1]])
                gm.graph.erase_node(u)
        if n.users:  # used whole (not through getitem): not a layout export produces
            raise RuntimeError(f"fxdp: cannot inline {n.name}: its outputs are used whole")
        gm.graph.erase_node(n)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
