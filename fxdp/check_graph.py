"""The graph of ``fxdp.check``'s report: the traced model's tensor-carrying nodes and
their edges, with batch-dimension shapes, for the picture ``fxdp.report`` draws."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set

import torch.fx as fx

from .passes.batch_mixing import op_name


def _graph(gm: fx.GraphModule, result: Any, rewrites: Sequence[Any] = ()) -> Dict[str, Any]:
    """Nodes carrying tensors (and the inputs/outputs), for the picture. The inside
    of a module privatize rewrites is drawn as one node (``alias`` maps the
    hidden nodes to it)."""
    by_path = {r.path: r for r in rewrites if r.path}
    paths = sorted(by_path, key=len)  # outermost first

    def group_of(n: fx.Node) -> Optional[str]:
        mod = str(n.meta.get("fxdp_module") or "")
        return next((p for p in paths if mod == p or mod.startswith(p + ".")), None)

    keep: List[Any] = []
    alias: Dict[str, str] = {}
    drawn: Set[str] = set()
    for n in gm.graph.nodes:
        shapes = result.shapes.get(n.name, [])
        tensor = any(isinstance(s, tuple) for s in shapes)
        if not (n.op in ("placeholder", "output") or (tensor and n.op != "get_attr")):
            continue
        g = group_of(n) if n.op not in ("placeholder", "output") else None
        if g is None:
            keep.append(n)
            continue
        alias[n.name] = f"[{g}]"
        if alias[n.name] not in drawn:
            drawn.add(alias[n.name])
            keep.append(_Group(alias[n.name], by_path[g], n))
    kept = {k.name for k in keep}
    nodes, edges = [], set()
    for n in keep:
        if isinstance(n, _Group):
            r = n.rewrite
            nodes.append({"name": n.name, "label": f"{r.path} ({r.original})", "kind": "group",
                          "module": "", "shape": f"privatize: -> {r.replacement}"})
            continue
        shapes = result.shapes.get(n.name, [])
        hints = result.hints.get(n.name, [])
        shape = next((s for s in shapes if isinstance(s, tuple)), None)
        h = hints[shapes.index(shape)] if shape is not None and shapes.index(shape) < len(hints) else None
        label = n.name if n.op in ("placeholder", "output") else op_name(n)
        if n.op == "call_module":
            label = f"{n.target} ({type(gm.get_submodule(str(n.target))).__name__})"
        nodes.append({"name": n.name, "label": label,
                      "kind": n.op, "module": str(n.meta.get("fxdp_module") or ""),
                      "shape": _shape_str(shape, h, result.batch_size) if shape is not None else ""})
    names = {n.name for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        dst = alias.get(n.name, n.name)
        if dst not in kept or n.name not in names:
            continue
        for a in _tensor_parents(n, {x for x in names if alias.get(x, x) in kept}):
            src = alias.get(a, a)
            if src != dst:
                edges.add((src, dst))
    order = {k.name: i for i, k in enumerate(keep)}
    return {"nodes": nodes, "edges": sorted(edges, key=lambda e: (order[e[1]], order[e[0]])), "alias": alias}


class _Group:
    """A rewritten module drawn as one node."""

    def __init__(self, name: str, rewrite: Any, first: fx.Node) -> None:
        self.name = name
        self.rewrite = rewrite
        self.first = first


def _tensor_parents(n: fx.Node, kept: Set[str]) -> List[str]:
    out, stack, seen = [], list(n.all_input_nodes), set()
    while stack:
        a = stack.pop()
        if a.name in seen:
            continue
        seen.add(a.name)
        if a.name in kept:
            out.append(a.name)
        elif a.op != "get_attr":
            stack.extend(a.all_input_nodes)
    return sorted(set(out))


def _shape_str(shape: tuple, hint: Any, b: int) -> str:
    dims = [str(s) for s in shape]
    if isinstance(hint, int) and not isinstance(hint, bool) and hint < len(dims):
        dims[hint] = "B"
    elif isinstance(hint, tuple) and hint and hint[0] == "fold" and hint[1] < len(dims):
        dims[hint[1]] = f"B*{hint[2]}"
    return "[" + ", ".join(dims) + "]"
