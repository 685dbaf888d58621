"""Transfer functions of ops whose tags follow from the op's kind alone: inputs,
constants and factories, non-tensor results, dtype/device conversions, attribute
reads, and ops assumed per-sample (declared, or unknown and reported)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ...batch_dims import input_batch_dim
from ..ops import op_name, shape_args
from ..lowering import prove_by_lowering
from ..probe import probe_samples
from ..ragged import Segmentation, flat_inputs, segment_tags
from ..tags import NO, NT, _is_fold, _is_int, _NoTag, along, combine, const, fit, ideal, reduce_all, uniform

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis


def arg(n: fx.Node, i: int, kw: Optional[str] = None) -> Any:
    """Argument ``i`` of ``n``, or its keyword ``kw`` when passed by name (None when absent)."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(kw)


def input_tags(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str]) -> Any:
    """A placeholder: sample i at index i of its batch dimension."""
    phs = [p for p in n.graph.nodes if p.op == "placeholder"]
    k = phs.index(n)
    bd = an.input_dims[k] if k < len(an.input_dims) else (an.batch_dim if isinstance(an.batch_dim, int) else 0)

    seg = an.segments
    if isinstance(seg, Segmentation) and k in seg.flat:  # flat data: each row is its bag's sample
        return segment_tags(out.shape, seg.bag_len(), an.b1)
    if isinstance(seg, str) and k in flat_inputs(an.args, an.input_dims):
        an.add(n, "unattributed-input", "error",
               f"input `{n.target}` has no batch dimension, yet it is not a value every sample shares that "
               f"fxdp can tell: {seg}, so its elements cannot be attributed to samples",
               "give it a batch dimension (input_batch_dims), pass a tensor every sample shares as a buffer of "
               "the model (register_buffer), or pass flat per-sample data with the offsets that cut it into "
               "samples (nn.EmbeddingBag's input and offsets, input_batch_dims=[None, 0])")

    def one(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return NT
        d = input_batch_dim(v, bd)
        if d is None or v.shape[d] != an.b1:
            return const(v.shape)
        return ideal(v.shape, d, an.b1)

    return tree_map(one, out)


def constant(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str]) -> Any:
    """Parameters, buffers, factories and functions of no tensor: no sample."""
    return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)


def no_tag(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str]) -> Any:
    """Sizes, shapes and flags, and operators on plain numbers: not tensors."""
    return tree_map(lambda v: NT, out)


def grad_mode(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str]) -> Any:
    """``torch._C._set_grad_enabled``: no value."""
    return NT


def convert(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str]) -> Any:
    """dtype/device/copy conversions: the tags of the first argument."""
    return fit(an.tag(n.args[0]), out.shape) if isinstance(out, Tensor) else an.tag(n.args[0])


def attribute(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str]) -> Any:
    """``getattr(x, attr)`` in the graph: transposes, views of the data, fields of results."""
    attr = n.args[1]
    bt = an.tag(n.args[0])
    if isinstance(bt, Tensor):
        if attr in ("T", "mT", "H", "mH"):
            return getattr(bt, attr)
        if attr in ("data", "real", "imag"):
            return bt
    elif hasattr(bt, attr) and not isinstance(bt, _NoTag):  # e.g. .values of torch.return_types.max
        return getattr(bt, attr)
    return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)


def _fxdp_own(an: "BatchMixingAnalysis", n: fx.Node) -> bool:
    """A graph op or layer of fxdp itself (the DP layers' internals)."""
    if n.op == "call_module":
        return (type(an.submodule(n)).__module__ or "").startswith("fxdp.")
    return n.op == "call_function" and (getattr(n.target, "__module__", None) or "").startswith("fxdp.")


def assume(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Optional[str] = None,
           unknown: Optional[str] = None) -> Any:
    """Tags of an op assumed per-sample (consistent with its output's batch dims);
    with ``unknown`` (the reason), reported when it carries samples. Arguments the op
    reads only the shape of (``ops.SHAPE_ARGS``) carry no samples into it."""
    shape_only = shape_args(n.target) if n.op == "call_function" else ()
    ins = an.flat_tags([a for i, a in enumerate(n.args) if i not in shape_only], n.kwargs)
    carries = any(uniform(t) != NO for t in ins)
    hs = an.hints.get(n.name, [])
    flat_v, spec = tree_flatten(out)
    res: List[Any] = []
    for i, v in enumerate(flat_v):
        if not isinstance(v, Tensor):
            res.append(NT)
            continue
        h = hs[i] if i < len(hs) else "ambiguous"
        if _is_int(h) and v.dim() > h and v.shape[h] == an.b1:
            res.append(ideal(v.shape, h, an.b1))
        elif _is_fold(h):
            same = next((t for t in ins if tuple(t.shape) == tuple(v.shape)), None)
            if same is not None:
                res.append(same.clamp(min=NO))
            else:
                rows = torch.arange(1, an.b1 + 1).repeat_interleave(h[2])
                res.append(along(rows, h[1], v.shape))
        elif (h is None or h == "ambiguous") and _fxdp_own(an, n):
            # fxdp's own graph ops (a PackedSequence's data, time-major across samples, and its
            # batch sizes): trusted, what the user's code reads of them again has a batch dimension
            res.append(const(v.shape))
        else:
            g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
            res.append(g.expand(v.shape))
    tags = tree_unflatten(res, spec)
    if unknown and carries:
        report_unknown(an, n, unknown, tags)
    return tags


def report_unknown(an: "BatchMixingAnalysis", n: fx.Node, reason: str, tags: Any) -> None:
    """An op not in the table that carries samples: proven when the ATen graph it lowers
    to keeps them apart by the batch rules (``lowering.py``); otherwise an error, whether
    the rules or the probe (``probe.py``) find samples combined or nothing proves the op."""
    verdict, why = prove_by_lowering(an, n)
    if verdict == "proven":
        return
    found = probe_samples(an, n, tags)
    if found is not None or verdict == "mixes":
        an.add(n, "unknown-op", "error",
               f"{op_name(n)} is not in fxdp's op table ({reason}) and could not be shown to keep samples apart: "
               + "; ".join(x for x in (found, why if verdict == "mixes" else None) if x),
               "express it with known torch ops that keep each sample in its own rows (or, if it is per-sample, "
               "fxdp.passes.batch_mixing.register_semantics(op, 'per_sample'))")
        return
    an.add(n, "unproven-op", "error",
           f"{op_name(n)} is not in fxdp's op table ({reason}) and fxdp cannot prove that it keeps samples apart: "
           f"{why}. Perturbing each sample's inputs moved only that sample's outputs on this batch, which is "
           "evidence, not a proof",
           "express it with torch ops fxdp reads; or, if it is per-sample, declare it with "
           "fxdp.passes.batch_mixing.register_semantics(op, 'per_sample'), or test it with "
           "fxdp.verify(model, example_inputs) and mark the line `# fxdp: ignore`")
