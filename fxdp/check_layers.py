"""The layer table of ``fxdp.check``'s report: per parameter, the per-sample rule that
privatize's capture pass picks (or would pick), its book-keeping plan, the rewrite that
replaced its module and the memory of its per-sample gradients."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .errors import FxdpError
from .report import LayerInfo
from .rules.tied import use_factors


Meta = Optional[Tuple[Any, Optional[int]]]  # a value's stand-in (a meta tensor) and its batch dimension


def _bk_plans(gm: fx.GraphModule, cap_nodes: Dict[str, Any], result: Any, example: int,
              batch_size: int) -> Dict[str, str]:
    """``{parameter name: book-keeping method}`` from each capture op's traced shapes at the
    ``example`` batch size (ghost vs materialized norms are chosen from these shapes at run
    time, too), the batch at ``batch_size``."""

    original = {cn.name: orig for orig, cn in cap_nodes.items()}  # a capture's output: its op's node
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.get_default_dtype())

    def meta(node: Any) -> Meta:  # the symbolic tracer's shapes, by the original node's name
        name = node if isinstance(node, str) else original.get(node.name, node.name)
        shapes, hints = result.shapes.get(name) or [], result.hints.get(name) or []
        if not shapes or not isinstance(shapes[0], tuple):
            return None  # a non-tensor value (a scan's tape, an absent h0)
        return _at_batch(list(shapes[0]), hints[0] if hints else None, example, batch_size, dtype)

    return _plans(gm, list(cap_nodes.items()), meta, batch_size)


def _at_batch(shape: List[int], hint: Any, example: Optional[int], batch_size: int, dtype: torch.dtype) -> Meta:
    """A meta tensor of ``shape`` (traced at the ``example`` batch size) at ``batch_size``, and
    its batch dimension: an int, or a batch-major fold ``[B*k, ...]`` of k rows a sample (served
    ``[B, k, ...]`` by the capture ops, ``capture.op._batch_of``)."""
    if isinstance(hint, int) and hint < len(shape):
        shape[hint] = batch_size
    elif isinstance(hint, tuple) and hint[:2] == ("fold", 0) and hint[3:4] == ("major",) and example:
        shape[0] = batch_size * (shape[0] // example)
    else:
        hint = None
    return torch.empty(shape, dtype=dtype, device="meta"), hint


def _bk_plans_exported(gm: fx.GraphModule, batch_size: int) -> Dict[str, str]:
    """:func:`_bk_plans` on an instrumented ``torch.export`` graph: each value's shape from its
    fake tensor, the batch dimension at ``batch_size`` (a batch-major fold's rows at
    ``batch_size`` times its rows a sample) and other symbolic sizes at the example's."""

    def size(s: Any) -> int:
        return s if isinstance(s, int) else int(s.node.hint)

    example = next((size(n.meta["val"].shape[h]) for n in gm.graph.nodes if n.op == "placeholder"
                    and isinstance(n.meta.get("val"), torch.Tensor)
                    and isinstance(h := (n.meta.get("fxdp_batch") or [None])[0], int)), None)

    def meta(node: Any) -> Meta:
        v, hint = node.meta.get("val"), (node.meta.get("fxdp_batch") or [None])[0]
        if isinstance(v, torch.SymInt):  # a size taken in the graph ("B": the batch size, as expand takes it)
            return (batch_size if hint == "B" else size(v)), None
        if not isinstance(v, torch.Tensor):
            return None
        return _at_batch([size(s) for s in v.shape], hint, example, batch_size, v.dtype)

    return _plans(gm, [(n, n) for n in gm.graph.nodes if n.meta.get("fxdp_capture")], meta, batch_size)


def _plans(gm: fx.GraphModule, captures: List[Tuple[Any, fx.Node]], meta: Callable[[Any], Meta],
           batch_size: Optional[int]) -> Dict[str, str]:
    """Each capture op's ``bk_plan`` at the shapes ``meta`` gives its arguments and output
    (``captures``: pairs of the output's key for ``meta`` and the capture node); a parameter
    several ops use (tied) is planned as book-keeping serves it (``tied_plan``)."""
    out: Dict[str, List[str]] = {}
    factors: Dict[str, List[Any]] = {}
    for key, cn in captures:
        try:
            op = gm.get_submodule(str(cn.target))
            dyn, dims = [], []
            for a in cn.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    obj: Any = gm
                    for part in str(a.target).split("."):
                        obj = getattr(obj, part)
                    dyn.append(torch.empty_like(obj, device="meta") if isinstance(obj, torch.Tensor) else obj)
                    dims.append(None)
                elif isinstance(a, fx.Node):
                    m = meta(a)
                    dyn.append(m[0] if m is not None else None)
                    dims.append(m[1] if m is not None else None)
                else:
                    dyn.append(a)
                    dims.append(None)
            o = meta(key)
            if o is None:
                continue
            plan = op.bk_plan(dyn, o[0], dims, o[1], batch_size)
            found = op.bk_factors(dyn, o[0], dims, o[1], batch_size)
            for name, how in plan.items():
                out.setdefault(name, []).append(how)
                factors.setdefault(name, []).append(found.get(name))
        except Exception:  # the plan is informative only: never fail the report on it
            continue
    return {name: hows[0] if len(hows) == 1 else tied_plan(hows, factors[name]) for name, hows in out.items()}


#: the plans of a parameter several ops use (``BookKeeping._squared_norms``: its norm is not a sum of norms)
TIED = ("tied (used by {n} ops): per-sample gradients materialized at each use and summed, then normed; "
        "clipped sum: their weighted sum")
TIED_FACTORED = ("tied (used by {n} ops): each use's norm ({uses}) plus their cross terms ⟨L_k L_lᵀ, R_k R_lᵀ⟩ "
                 "(no per-sample gradients); clipped sum: each use's")


def tied_plan(hows: List[str], factors: List[Any]) -> str:
    """A tied parameter's plan from its uses' plans and factored gradients (``None`` where a
    use has none), as book-keeping decides (``rules.tied.use_factors``)."""
    if not use_factors(factors):
        return TIED.format(n=len(hows))
    return TIED_FACTORED.format(n=len(hows), uses="; ".join(sorted(h.split(";")[0] for h in hows)))


def _layers(root: nn.Module, captures: Optional[list], rewrites: List[Any], batch_size: int,
            whole: bool = False, gm: Optional[fx.GraphModule] = None,
            plans: Optional[Dict[str, str]] = None) -> List[LayerInfo]:
    rules: Dict[str, List[str]] = {}
    if captures is not None:
        for c in captures:
            for p in sorted(set(c.param_index.values())):
                r = c.rule_name()
                if r not in rules.setdefault(p, []):
                    rules[p].append(r)
    elif gm is not None:
        rules = _predicted_rules(gm)
    out = []
    for name, p in root.named_parameters():
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        rw = max((r for r in rewrites if r.path and name.startswith(r.path + ".")), key=lambda r: len(r.path),
                 default=None)
        if not p.requires_grad:
            rule = "frozen (no per-sample gradient)"
        elif whole:
            rule = f"functorch fallback ({type(root).__name__}.forward, kept whole)"
        else:
            rule = " + ".join(rules.get(name, [])) or "unused (no gradient reaches it)"
        out.append(LayerInfo(
            name=name, module=mod, shape=list(p.shape), numel=p.numel(), dtype=str(p.dtype).replace("torch.", ""),
            trainable=p.requires_grad, rule=rule,
            grad_sample_bytes=batch_size * p.numel() * p.element_size() if p.requires_grad else 0,
            rewrite=f"{rw.original} -> {rw.replacement}" if rw else None,
            bookkeeping=(plans or {}).get(name) if p.requires_grad else None,
        ))
    return out


def _predicted_rules(gm: fx.GraphModule) -> Dict[str, List[str]]:
    """The rule privatize would pick per parameter when its capture pass fails."""
    from .rules import module_call_for, rule_for_op

    names = {id(p): n for n, p in gm.named_parameters()}
    out: Dict[str, List[str]] = {}
    from .capture import CaptureOp

    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, CaptureOp):  # inserted before the capture pass failed
                for p in set(m.param_index.values()):
                    out.setdefault(p, [m.rule_name()])
                continue
            ad = module_call_for(m)
            try:
                rule = rule_for_op(ad(m).op) if ad is not None else None
            except FxdpError:  # the adapter refuses this configuration (reported by the capture pass)
                rule = None
            r = rule.describe() if rule is not None else f"functorch fallback ({type(m).__name__})"
            for p in m.parameters():
                if id(p) in names and p.requires_grad:
                    out.setdefault(names[id(p)], [r + " (predicted)"])
        elif n.op == "get_attr":
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.Parameter) and obj.requires_grad and id(obj) in names:
                user = next(iter(n.users), None)
                rule = rule_for_op(user.target) if user is not None and user.op == "call_function" else None
                r = rule.describe() if rule is not None else "functorch fallback"
                out.setdefault(names[id(obj)], [r + " (predicted)"])
    return out
