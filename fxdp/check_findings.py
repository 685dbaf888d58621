"""The findings of ``fxdp.check``: each problem the analyses find, turned into a
:class:`fxdp.report.Finding` located at the user's source line, with its fix; plus the
de-duplication and the ``ignore=`` / ``# fxdp: ignore`` filtering of the report."""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch.fx as fx
from torch import nn

from .model_state import ModelState
from .passes.batch_mixing import MixingFinding, op_name
from .passes.batch_mixing.guard import SOURCE_LINE, SUPPRESS
from .report import Finding
from .utils.source import FXDP_DIR, TORCH_DIR

Ignore = Union[str, Callable[[Finding], bool]]
_SRC = SOURCE_LINE
_SUPPRESS = SUPPRESS


def _user_line(exc: BaseException) -> Optional[Tuple[str, int, str]]:
    """(file, line, code) of the innermost user frame of an exception's traceback (not torch's,
    fxdp's, NumPy's or Python's own: wav2vec2's SpecAugment fails inside np.put_along_axis, its
    line is transformers')."""
    import os
    import random
    import traceback

    import numpy as np

    skipped = (TORCH_DIR, FXDP_DIR, os.path.dirname(np.__file__), "<")
    stdlib = os.path.dirname(random.__file__) + os.sep
    best = None
    for fr in traceback.extract_tb(exc.__traceback__):
        fn = fr.filename
        if not (fn.startswith(skipped) or fn.startswith(stdlib) and "site-packages" not in fn):
            best = (fn, fr.lineno or 0, (fr.line or "").strip())
    return best


def _outer_frames() -> Set[Tuple[str, int]]:
    f = sys._getframe(2)
    out = set()
    while f is not None:
        out.add((f.f_code.co_filename, f.f_lineno))
        f = f.f_back
    return out


def _parse_source(src: Optional[str],
                  outer: Set[Tuple[str, int]]) -> Tuple[Optional[str], Optional[int], Optional[str]]:
    if not src:
        return None, None, None
    m = _SRC.match(src)
    if not m:
        return None, None, None
    file, line = m.group("file"), int(m.group("line"))
    if (file, line) in outer:  # the frame calling fxdp.check, not the model's code
        return None, None, None
    return file, line, m.group("code")


def _finding(f: MixingFinding, loc: Optional[Tuple[str, int, str]], outer: Set[Tuple[str, int]]) -> Finding:
    if loc is not None:
        file, line, code = loc if loc[0] else (None, None, None)
    else:
        file, line, code = _parse_source(f.node.meta.get("fxdp_source"), outer)
    return Finding(
        severity=f.severity, code=f.code, op=op_name(f.node), node=f.node.name,
        module=str(f.node.meta.get("fxdp_module") or ""), file=file, line=line, source=code,
        problem=f.problem, fix=f.fix,
    )


def _autograd_function(name: str, src: Optional[str], outer: Set[Tuple[str, int]]) -> Finding:
    """A custom autograd.Function the capture traced through and found, on the example batch, to
    have the forward's derivative as its backward (``fxdp.utils.custom_backward``)."""
    file, line, code = _parse_source(src, outer)
    return Finding(
        "info", "autograd-function", f"{name}.apply", "", "", file, line, code,
        f"custom autograd.Function {name}: the DP graph runs its forward's ops and differentiates them; its "
        "backward gave the same vector-Jacobian product on the example batch (checked at every capture)",
        "none needed; a backward that departs from the forward's derivative on other inputs is not caught")


def _refusal(msg: str) -> Finding:
    return Finding("error", "privatize", "fxdp.privatize", "", "", None, None, None,
                   f"fxdp.privatize refuses the model: {msg}", "see the message")


def _frozen_bn_notes(gm: fx.GraphModule, kept: List[Any]) -> List[Tuple[MixingFinding, None]]:
    """Frozen BatchNorms in eval mode: fine as written, but privatize's default
    rewrite would replace them."""
    out = []
    for r in kept:
        node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == r.path), None)
        m = gm.get_submodule(r.path) if node is not None else None
        if node is None or m.training:
            continue  # in train mode the analysis reports it as mixing
        out.append((MixingFinding(
            node, "frozen-batchnorm", "warning",
            f"{r.original} `{r.path}` is frozen and in eval mode (fine as written), but privatize's default "
            f"rewrite replaces it by {r.replacement}, whose frozen affine parameters cannot adapt to the new "
            "normalization", "pass rewrite_options={'batchnorm': 'freeze'} to fxdp.privatize (keeps its running "
            "statistics as constants; DP only if they were not computed from the private data), or unfreeze it"),
            None))
    return out


def _untraceable_model(model: nn.Module, e: BaseException, outer: Set[Tuple[str, int]]) -> Finding:
    loc = _user_line(e)
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
    return Finding(
        "warning", "untraceable", type(model).__name__, "", "", loc[0] if loc else None, loc[1] if loc else None,
        loc[2] if loc else None,
        f"the model's forward cannot be traced symbolically ({msg}); privatize keeps it whole (exact but slow "
        "fallback) and none of its ops could be checked",
        "run fxdp.verify(model, example_inputs) to test it dynamically, or move data-dependent Python control "
        "flow (if/for on tensor values) into a submodule",
    )


def _eager_updates(gm: fx.GraphModule, changed: List[str]) -> List[Tuple[MixingFinding, None]]:
    """Buffers changed while tracing by code that does not touch the inputs
    (``self.count += 1``): it runs on every forward, outside the graph."""
    out = []
    node = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    for k in changed:
        if node is None:
            break
        out.append((MixingFinding(
            node, "state-update", "warning",
            f"the forward updates `{k}` in place (with code that does not depend on the inputs, e.g. a step "
            "counter)", "make sure it never depends on the training data; keep state changes out of forward"),
            ("", 0, "")))
    return out


def _proxy_assignments(state: ModelState, *models: nn.Module) -> List[Tuple[MixingFinding, None]]:
    """``self.attr = <traced value>`` in forward: module state set from the batch."""
    out = []
    for m, k, p in state.proxies(*models):
        out.append((MixingFinding(
            p.node, "state-update", "error",
            f"assigns a value computed in the forward to `self.{k}` of {type(m).__name__}: module state that "
            "outlives the batch carries information about it into later steps, outside the privacy accounting",
            "return the value from forward instead of storing it on the module",
        ), None))
    return out


def _untraceable_parts(gm: fx.GraphModule, root: nn.Module, untraceable: Dict[str, str],
                       errors: Dict[str, BaseException]) -> List[Tuple[MixingFinding, Optional[Tuple[str, int, str]]]]:
    from .passes.batch_mixing import BatchMixingAnalysis  # noqa: F401 - semantics live there

    out = []
    for q, reason in untraceable.items():
        node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == q), None)
        if node is None:
            continue
        m = gm.get_submodule(q)
        exc = errors.get(q)
        loc = _user_line(exc) if exc is not None else None
        if _known_torch_module(m):
            continue  # analyzed with torch's documented semantics
        first = reason.splitlines()[0][:200]
        if "cannot assign" in reason:
            out.append((MixingFinding(
                node, "state-update", "error",
                f"{type(m).__name__} `{q}` assigns a traced value to module state in forward ({first})",
                "return the value from forward instead of storing it on the module"), loc))
            continue
        control = "control flow" in reason or "TraceError" in reason
        out.append((MixingFinding(
            node, "untraceable", "warning",
            f"{type(m).__name__} `{q}` cannot be traced symbolically ({first})"
            + ("; Python control flow on tensor values (e.g. `if x.mean() > 0`) may depend on batch statistics"
               if control else "")
            + ". Its inside is not checked; privatize serves it with the exact but slow functorch fallback",
            "run fxdp.verify(model, example_inputs) to test it dynamically, or rewrite the control flow with "
            "tensor ops (torch.where) so it traces"), loc))
    return out


def _known_torch_module(m: nn.Module) -> bool:
    from torch.nn.modules import batchnorm, instancenorm, rnn, transformer

    return m.__module__.startswith("torch.nn") and isinstance(m, (
        batchnorm._BatchNorm, instancenorm._InstanceNorm, rnn.RNNBase, rnn.RNNCellBase, nn.MultiheadAttention,
        transformer.TransformerEncoderLayer, transformer.TransformerDecoderLayer, transformer.TransformerEncoder,
        transformer.TransformerDecoder, transformer.Transformer, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
        nn.EmbeddingBag, nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd))


def _capture_findings(originals: Dict[str, fx.Node], result: Any,
                      cap_nodes: Dict[str, Any]) -> List[Tuple[MixingFinding, None]]:
    """Layers with trainable parameters applied to a folded batch: privatize needs
    each sample's rows apart (it raises BatchDimensionError at the first backward)."""
    out = []
    for name, cn in cap_nodes.items():
        op = cn.graph.owning_module.get_submodule(cn.target) if cn.op == "call_module" else None
        if getattr(getattr(op, "rule", None), "segments", False):  # its bags are the samples
            continue
        for a in cn.args:
            if not isinstance(a, fx.Node):
                continue
            key = a.meta.get("fxdp_capture", a.name)
            hs = result.hints.get(key)
            h = hs[0] if hs else None
            if isinstance(h, tuple) and h and h[0] == "fold" and name in originals:
                origin = result.fold_origin.get(key)
                o = originals.get(origin) if origin else None
                where = f" (folded by {op_name(o)} at {o.meta.get('fxdp_source', '?').split(': ')[0]})" if o else ""
                node = originals[name]
                out.append((MixingFinding(
                    node, "batch-fold", "error",
                    f"{op_name(node)} has trainable parameters and receives a batch folded into dimension "
                    f"{h[1]} (size B*{h[2]}){where}: it would treat the {h[2]} rows of each sample as separate "
                    "samples, and privatize cannot attribute its per-sample gradients",
                    "apply the layer to the unfolded tensor (e.g. nn.Linear/F.linear to [B, T, d] instead of "
                    "x.view(B * T, d)); the layer accepts any number of leading dimensions"
                    + (". For a model you cannot change (windows, patches, a norm over x.flatten(0, 1)): "
                       "fxdp.privatize(model, capture='export') follows each sample's rows through the fold"
                       if getattr(op, "folds", False) else ""),
                    {"export_serves": True} if getattr(op, "folds", False) else {}), None))
                break
    return out


def _privatize_error(originals: Dict[str, fx.Node], e: BaseException, raw: List[Any]) -> MixingFinding:
    msg = str(e)
    # the same node already has an error: do not report the cause twice
    for f, _ in raw:
        if f.severity == "error" and (f"module '{f.node.meta.get('fxdp_module')}'" in msg
                                      or (f.node.meta.get("fxdp_source") or "\0").split(": ")[0] in msg):
            return MixingFinding(f.node, "privatize", "info", f"fxdp.privatize refuses the model: {msg}",
                                 "fix the errors above")
    node = next(n for n in originals.values() if n.op == "output")
    return MixingFinding(node, "privatize", "error", f"fxdp.privatize refuses the model: {msg}",
                         "see the message; the rest of this report assumes it is fixed")


def _dedupe(findings: List[Finding]) -> List[Finding]:
    seen, out = set(), []
    for f in findings:
        key = (f.severity, f.code, f.node, f.problem)
        if key not in seen:
            seen.add(key)
            out.append(f)
    # privatize's refusal of a module already reported (with its line) is a note
    located = {f.module for f in out if f.severity == "error" and f.code != "privatize" and f.module}
    for f in out:
        if f.code == "privatize" and f.severity == "error" and any(f"'{m}'" in f.problem for m in located):
            f.severity = "info"
    # a state update reported with an error at the same module is part of it
    err_mods = {f.module for f in out if f.severity == "error" and f.code == "batch-norm"}
    return [f for f in out if not (f.code == "state-update" and f.severity == "warning" and f.module in err_mods)]


def _ignored(f: Finding, ignores: List[Ignore]) -> bool:
    if f.source and _SUPPRESS in f.source:
        return True
    if f.file and f.line:
        import linecache

        if _SUPPRESS in linecache.getline(f.file, f.line):
            return True
    for ig in ignores:
        if callable(ig):
            if ig(f):
                return True
        elif ig in (f.node, f.code, f.location) or (f.module and (ig == f.module or f.module.startswith(ig + "."))):
            return True
        elif f.file and f.line and ig == f"{f.file}:{f.line}":
            return True
    return False
