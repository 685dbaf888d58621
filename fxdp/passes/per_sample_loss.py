"""Losses computed inside ``forward``, rewritten as means of per-sample losses.

A model called with ``labels=`` (every Hugging Face head) returns
``cross_entropy(logits.view(-1, V), labels.view(-1))``: a mean over every row of the
batch, tokens included, divided by the *batch's* count of labels that are not
``ignore_index``. Through that count one sample's gradient depends on the others, so
the loss as written is not a per-sample loss. This pass, on the exported graph
(``node.meta["fxdp_batch"]`` from :mod:`fxdp.passes.symbolic_batch`), replaces a
mean-reduced loss that the graph returns by

    loss = mean_i l_i   (``loss_reduction="sum"``: sum_i l_i),
    l_i  = mean over sample i's own rows (tokens) whose label is not ignored,

which the engine's ``loss_reduction`` scaling turns into exact per-sample gradients
of ``l_i``. For classification (one label per sample), MSE and BCE the value is the
model's own; for token losses each sample weighs the same instead of in proportion
to its token count (dp-transformers does the same). A scalar computed from
parameters alone added to the loss (AdaLoRA's orthogonality penalty) is added to each
``l_i``: ``mean_i (l_i + R)`` is the model's value, and each sample's loss is its loss
alone. Losses with class weights, other reductions, or used again inside the graph are
left alone: the mixing analysis refuses them.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten

__all__ = ["rewrite_in_forward_losses", "PER_SAMPLE_LOSS"]

#: meta key on the rewritten loss node (its value: the reduction over samples)
PER_SAMPLE_LOSS = "fxdp_per_sample_loss"

#: loss op -> (name of its reduction argument's position, positional index)
_LOSSES = {
    aten.cross_entropy_loss.default: 3,
    aten.mse_loss.default: 2,
    aten.binary_cross_entropy_with_logits.default: 4,
}
_MEAN = 1


def _arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _batch_row(n: fx.Node) -> Optional[bool]:
    """``False``: rows are samples; ``True``: a batch-major fold ``[B*k, ...]``; ``None``: neither."""
    h = (n.meta.get("fxdp_batch") or [None])[0]
    if h == 0:
        return False
    if isinstance(h, tuple) and h[0] == "fold" and h[1] == 0 and len(h) > 3 and h[3] == "major":
        return True
    return None


def _batch_size_source(gm: fx.GraphModule) -> Optional[tuple]:
    for p in gm.graph.nodes:
        if p.op == "placeholder":
            h = (p.meta.get("fxdp_batch") or [None])[0]
            if isinstance(h, int) and isinstance(p.meta.get("val"), torch.Tensor):
                return p, h
    return None


def rewrite_in_forward_losses(gm: fx.GraphModule, loss_reduction: str = "mean") -> List[fx.Node]:
    """Rewrite every returned mean-reduced loss of ``gm`` (see the module docstring);
    returns the new loss nodes (``meta[PER_SAMPLE_LOSS]`` set). Re-annotate batch
    dimensions afterwards."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(out_node.all_input_nodes)
    source = _batch_size_source(gm)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])
    if source is None or fake_mode is None:
        return []
    rewritten = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _LOSSES:
            continue
        tail, term = _plus_term(n, out_node)
        if tail not in returned or set(tail.users) != {out_node} \
                or _arg(n, _LOSSES[n.target], "reduction", _MEAN) != _MEAN:
            continue
        x = n.args[0]
        folded = _batch_row(x) if isinstance(x, fx.Node) else None
        if folded is None:
            continue
        if n.target is aten.cross_entropy_loss.default and _arg(n, 2, "weight", None) is not None:
            continue  # a class-weighted mean divides by the batch's total weight
        if n.target is aten.binary_cross_entropy_with_logits.default and (
                _arg(n, 2, "weight", None) is not None or _arg(n, 3, "pos_weight", None) is not None):
            continue
        with gm.graph.inserting_before(tail):
            new = _per_sample_mean(gm, n, source, fake_mode, loss_reduction, term)
        new.meta.update({k: v for k, v in n.meta.items() if k not in ("val", "fxdp_batch")})
        new.meta[PER_SAMPLE_LOSS] = loss_reduction
        tail.replace_all_uses_with(new)
        if tail is not n:
            gm.graph.erase_node(tail)
        gm.graph.erase_node(n)
        rewritten.append(new)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _plus_term(n: fx.Node, out_node: fx.Node) -> tuple:
    """``(returned node, term)``: the loss itself (``term`` None), or ``loss + term`` where the
    term is a scalar computed from parameters alone (AdaLoRA adds its orthogonality penalty to
    the labels= loss in place: ``outputs.loss += w * R(P, Q)``). A loss of that form is
    ``mean_i (l_i + term)``: each sample's own loss carries the term, as it does alone."""
    users = list(n.users)
    if len(users) != 1 or users[0] is out_node:
        return n, None
    t = users[0]
    if t.op != "call_function" or t.target not in (aten.add.Tensor, aten.add_.Tensor) or t.kwargs \
            or len(t.args) != 2 or t.args[0] is not n or not isinstance(t.args[1], fx.Node):
        return n, None
    term = t.args[1]
    val = term.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 0 or _reads_inputs(term):
        return n, None
    return t, term


def _reads_inputs(x: fx.Node) -> bool:
    """Whether ``x`` is computed from the graph's inputs (sizes aside): their values, not parameters."""
    seen, todo = set(), [x]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.op == "placeholder":
            return True
        if v.target is aten.sym_size.int:
            continue
        todo += v.all_input_nodes
    return False


def _per_sample_mean(gm: fx.GraphModule, n: fx.Node, source: tuple, fake_mode: Any,
                     loss_reduction: str, term: Optional[fx.Node] = None) -> fx.Node:
    g = gm.graph

    def call(target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        node = g.call_function(target, args, kwargs)
        vals = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with fake_mode:
            node.meta["val"] = target(*vals[0], **vals[1])
        for k in ("fxdp_module", "fxdp_source", "stack_trace", "nn_module_stack"):
            if k in n.meta:
                node.meta[k] = n.meta[k]
        return node

    ph, d = source
    B = call(aten.sym_size.int, ph, d)
    x, t = n.args[0], n.args[1]
    dtype = n.meta["val"].dtype
    if n.target is aten.cross_entropy_loss.default:
        ii = _arg(n, 4, "ignore_index", -100)
        ls = _arg(n, 5, "label_smoothing", 0.0)
        per = call(aten.cross_entropy_loss.default, x, t, None, 0, ii, ls)  # ignored rows are 0
        valid = call(aten._to_copy.default, call(aten.ne.Scalar, t, ii), dtype=dtype)
        num = call(aten.sum.dim_IntList, call(aten.view.default, per, [B, -1]), [1])
        den = call(aten.sum.dim_IntList, call(aten.view.default, valid, [B, -1]), [1])
        l_i = call(aten.div.Tensor, num, call(aten.clamp_min.default, den, 1.0))
    else:
        args = list(n.args)
        pos = _LOSSES[n.target]
        args = args[:pos] + [0] + args[pos + 1:] if len(args) > pos else args
        kwargs = dict(n.kwargs)
        if len(n.args) <= pos:
            kwargs["reduction"] = 0
        per = call(n.target, *args, **kwargs)
        l_i = call(aten.mean.dim, call(aten.view.default, per, [B, -1]), [1])
    if term is not None:
        l_i = call(aten.add.Tensor, l_i, term)
    return call(aten.mean.default if loss_reduction == "mean" else aten.sum.default, l_i)
