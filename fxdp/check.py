"""fxdp.check: a static DP-compatibility report of a model.

``fxdp.check(model, example_inputs=(x,))`` runs what ``fxdp.privatize`` runs --
the rewrite passes, the DP tracer, the capture pass -- without changing the model,
then the batch-mixing analysis (``fxdp.passes.batch_mixing``), and reports:

* every op that lets one sample influence another (errors), located by module
  path and the user's source line, with a concrete fix;
* what could not be proven (untraceable submodules, ops without semantics:
  warnings that suggest ``fxdp.verify``);
* per parameter, the per-sample rule privatize will use and the memory of its
  per-sample gradients; the rewrites privatize will apply.

``fxdp.check`` is this module, and calling it calls :func:`check`.
"""
from __future__ import annotations

import re
import sys
import time
import types
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .capture import Recorder
from .model_state import ModelState
from .errors import FxdpError, SymbolicGraphError, UnsupportedModelError
from .passes.batch_dims import input_batch_dim
from .passes.batch_mixing import MixingFinding, analyze_batch_mixing, fork_rng, op_name, small_model_threads
from .report import CompatibilityReport, Finding, LayerInfo
from .tracer import _FXDP_DIR, _TORCH_DIR, DPTracer, trace

__all__ = ["check", "assert_compatible", "CompatibilityReport"]

Ignore = Union[str, Callable[[Finding], bool]]
_SRC = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?:: (?P<code>.*))?$")
_SUPPRESS = "fxdp: ignore"


class _CheckTracer(DPTracer):
    """DPTracer that also keeps the exception of each untraceable submodule (for
    the source line of the offending control flow)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.trace_errors: Dict[str, BaseException] = {}
        #: (Function class name, module path, "file:line: code") of custom autograd Functions traced through
        self.autograd_functions: List[Tuple[str, str, Optional[str]]] = []

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        # torch.fx traces *through* a custom autograd.Function's forward and drops its backward
        from .tracer import _user_frame

        raw = torch.autograd.Function.__dict__["apply"]
        tracer = self

        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0]):
                tracer.autograd_functions.append((cls.__name__, tracer._path_stack[-1], _user_frame()))
            return raw.__func__(cls, *args, **kwargs)

        torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment]
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.autograd.Function.apply = raw  # type: ignore[assignment]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        # torch.fx's lookup scans all named parameters on every attribute access
        # (quadratic in the model size); same result from a table built once
        if isinstance(attr_val, torch.Tensor) and not self.param_shapes_constant:
            if getattr(self, "_names_root", None) is not self.root:
                self._names_root = self.root
                self._pnames = {}
                self._bnames = {}
                for k, v in self.root.named_parameters():
                    self._pnames.setdefault(id(v), k)
                for k, v in self.root.named_buffers():
                    self._bnames.setdefault(id(v), k)
            name = self._pnames.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
            if name is None and self.proxy_buffer_attributes:
                name = self._bnames.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
            if isinstance(attr_val, nn.Parameter):
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _rollback(self, last: fx.Node) -> None:
        exc = sys.exc_info()[1]
        if exc is not None:
            self.trace_errors[self._path_stack[-1]] = exc
        super()._rollback(last)


def _user_line(exc: BaseException) -> Optional[Tuple[str, int, str]]:
    """(file, line, code) of the innermost user frame of an exception's traceback."""
    import traceback

    best = None
    for fr in traceback.extract_tb(exc.__traceback__):
        fn = fr.filename
        if not (fn.startswith(_TORCH_DIR) or fn.startswith(_FXDP_DIR) or fn.startswith("<")):
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


def _batch_size(args: Sequence[Any], batch_dim: int) -> int:
    for t in tree_flatten(list(args))[0]:
        if isinstance(t, Tensor):
            d = input_batch_dim(t, batch_dim)
            if d is not None:
                return int(t.shape[d])
    raise ValueError("example_inputs must contain at least one batched tensor")


def check(
    model: nn.Module,
    example_inputs: Union[Tensor, Sequence[Any]],
    *,
    batch_first: bool = True,
    batch_size: Optional[int] = None,
    ignore: Iterable[Ignore] = (),
    rewrite_options: Optional[Dict[str, Any]] = None,
    leaf_modules: Iterable[type] = (),
    dynamic: bool = False,
    example_kwargs: Optional[Dict[str, Any]] = None,
) -> CompatibilityReport:
    """Report whether ``model`` can be trained with DP-SGD through ``fxdp.privatize``.

    Args:
        model: the ``nn.Module`` to analyze, in the mode it will be trained in
            (``model.train()``). It is not modified.
        example_inputs: the positional inputs of ``forward`` (a tensor or a tuple);
            every tensor is batched along the batch dimension.
        batch_first: ``False`` when inputs are ``[T, B, ...]`` (batch dimension 1).
        batch_size: batch size for the per-sample gradient memory of
            ``report.layers`` (default: the example batch size).
        ignore: findings to accept anyway: a node name, a finding code
            (``"batch-reduction"``), a module path, a location ``"model.py:42"``, or
            a predicate on :class:`fxdp.report.Finding`. A ``# fxdp: ignore``
            comment on the source line also suppresses its findings.
        rewrite_options: options of privatize's rewrite passes.
        leaf_modules: module classes to keep whole (as in privatize).
        dynamic: also run :func:`fxdp.verify` (perturb one sample, compare the
            others) and report a failure as an error.
        example_kwargs: keyword inputs of ``forward`` (``input_ids=``,
            ``attention_mask=`` of a Hugging Face model), batched like the others.

    Models that symbolic tracing cannot read completely are analysed on the
    graph ``privatize`` runs for them: the ``torch.export`` graph
    (``fxdp.passes.symbolic_batch.mixing_findings``), where whatever cannot be
    captured is an error.

    Returns:
        A :class:`fxdp.report.CompatibilityReport`; ``report.ok`` is False when any
        finding breaks differential privacy.
    """
    from .module import DPModule

    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdp.check expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DPModule):
        raise UnsupportedModelError("fxdp.check analyzes the original model; this one is already privatized")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    batch_dim = 0 if batch_first else 1
    B0 = _batch_size(list(args) + list(kwargs.values()), batch_dim)
    if B0 < 1:
        raise ValueError("example_inputs need at least one sample")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    outer = _outer_frames()
    ignores = list(ignore)
    with small_model_threads(model):
        return _check(model, args, batch_dim, B0, batch_size, outer, ignores, rewrite_options, leaf_modules,
                      dynamic, batch_first, t0, kwargs)


def _check(model: nn.Module, args: Tuple[Any, ...], batch_dim: int, B0: int, batch_size: Optional[int],
           outer: Set[Tuple[str, int]], ignores: List[Ignore], rewrite_options: Optional[Dict[str, Any]],
           leaf_modules: Iterable[type], dynamic: bool, batch_first: bool, t0: float,
           kwargs: Optional[Dict[str, Any]] = None) -> CompatibilityReport:
    from .passes.export_graph import symbolic_tracing_drops
    from .privatize import apply_rewrites

    state = ModelState(model)
    raw: List[Tuple[MixingFinding, Optional[Tuple[str, int, str]]]] = []  # (finding, override location)
    refusals: List[str] = []  # rewrite passes that refuse the model
    graph: Dict[str, Any] = {"nodes": [], "edges": []}
    try:
        try:
            root, rewrites = apply_rewrites(model, dict(rewrite_options or {}))
        except UnsupportedModelError as e:  # a rewrite pass refuses (e.g. batchnorm='off' on a frozen BatchNorm)
            root, rewrites = model, []
            refusals.append(str(e))
        root, frozen_bn = _keep_frozen_batchnorms(model, root, rewrites)
        tracer = _CheckTracer(leaf_modules=leaf_modules)
        try:
            gm = trace(root, tracer) if not kwargs else None
        except Exception as e:
            gm = None
            whole_error = e
        if gm is None or (gm.meta.get("fxdp_untraceable") and not frozen_bn) or symbolic_tracing_drops(root):
            # privatize captures this model with torch.export: analyse that graph
            state.restore()
            findings, layers = _check_exported(root, args, kwargs or {}, batch_dim, rewrites, batch_size or B0,
                                               outer)
            findings += [_refusal(m) for m in refusals]
        else:
            raw += _proxy_assignments(state, model, root)
            raw += _eager_updates(gm, state.changed())
            state.restore()  # undo attribute assignments and buffer updates done while tracing
            untraceable = dict(gm.meta.get("fxdp_untraceable", {}))
            result = analyze_batch_mixing(gm, args, batch_dim=batch_dim, untraceable=untraceable, root=root)
            if result.failed:
                raw.append((_failed_run(gm, args, result.failed, B0), None))
            raw += _untraceable_parts(gm, root, untraceable, tracer.trace_errors)
            raw += [(f, None) for f in result.findings]
            raw += _frozen_bn_notes(gm, frozen_bn)
            graph = _graph(gm, result, rewrites)
            originals = {n.name: n for n in gm.graph.nodes}
            captures, cap_error, cap_nodes = _captures(gm)  # privatize's capture pass, in place: gm is done
            raw += _capture_findings(originals, result, cap_nodes)
            if cap_error is not None:
                raw.append((_privatize_error(originals, cap_error, raw), None))
            layers = _layers(root, captures, rewrites, batch_size or B0, gm=gm if captures is None else None,
                             plans=_bk_plans(gm, cap_nodes, result) if captures is not None else None)
            findings = [_finding(f, loc, outer) for f, loc in raw] + [_refusal(m) for m in refusals]
            findings += [_autograd_function(*a, outer) for a in tracer.autograd_functions]
            if cap_error is not None and (not isinstance(cap_error, FxdpError)
                                          or isinstance(cap_error, SymbolicGraphError)):
                # privatize serves this model through torch.export instead: report that graph's analysis
                findings, layers = _check_exported(root, args, {}, batch_dim, rewrites, batch_size or B0, outer)
                findings += [_refusal(m) for m in refusals]
        if dynamic:
            findings.append(_dynamic(model, args, batch_first, dict(rewrite_options or {})))
        if not model.training:
            findings.append(Finding(
                "warning", "eval-mode", type(model).__name__, "", "", None, None, None,
                "the model is in eval mode; DP training runs it in train mode, where BatchNorm and dropout behave "
                "differently", "call model.train() before fxdp.check"))
    finally:
        state.restore()
    findings = _dedupe(findings)
    kept, ignored = [], []
    for f in findings:
        if f.severity != "info" and _ignored(f, ignores):
            f.ignored = True
            ignored.append(f)
        else:
            kept.append(f)
    kept.sort(key=lambda f: {"error": 0, "warning": 1, "info": 2}[f.severity])
    return CompatibilityReport(
        model=type(model).__name__,
        findings=kept,
        layers=layers,
        rewrites=[r.to_dict() for r in rewrites],
        ignored=ignored,
        batch_dim=batch_dim,
        batch_size=batch_size or B0,
        example_batch_size=B0,
        graph=graph,
        seconds=time.perf_counter() - t0,
    )


def assert_compatible(model: nn.Module, example_inputs: Union[Tensor, Sequence[Any]],
                      **kwargs: Any) -> CompatibilityReport:
    """``check(model, example_inputs, **kwargs).raise_if_errors()``: raises
    ``fxdp.UnsupportedModelError`` naming every op that breaks DP (for
    ``PrivacyEngine.make_private``); returns the report otherwise."""
    return check(model, example_inputs, **kwargs).raise_if_errors()


# --- pieces -----------------------------------------------------------------------------------

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


def _autograd_function(name: str, module: str, src: Optional[str], outer: Set[Tuple[str, int]]) -> Finding:
    file, line, code = _parse_source(src, outer)
    return Finding(
        "warning", "autograd-function", f"{name}.apply", "", module, file, line, code,
        f"custom autograd.Function {name} is traced through: torch.fx (and so fxdp.privatize) keeps its forward "
        "and drops its custom backward, so the privatized model's gradients are those of the forward's ops, "
        "and what the backward does to the batch is not checked",
        "register a per-sample rule for it (fxdp.register_rule on a torch.fx.wrap-ped function), or check the "
        "gradients with fxdp.verify(model, example_inputs)")


def _refusal(msg: str) -> Finding:
    return Finding("error", "privatize", "fxdp.privatize", "", "", None, None, None,
                   f"fxdp.privatize refuses the model: {msg}", "see the message")


def _keep_frozen_batchnorms(model: nn.Module, root: nn.Module, rewrites: List[Any]) -> Tuple[nn.Module, List[Any]]:
    """Undo, for the analysis only, privatize's replacement of *frozen* BatchNorms
    by a per-sample normalization: their frozen affine parameters cannot adapt to
    the new function, so it is no fix; they are analyzed as written (in train
    mode they mix the batch -- the case Opacus' validator accepts)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from .passes.rewrite import replace_submodule

    kept = []
    copied: set = set()
    for r in rewrites:
        try:
            orig = model.get_submodule(r.path)
        except AttributeError:
            continue
        if isinstance(orig, _BatchNorm) and not any(p.requires_grad for p in orig.parameters()) \
                and r.replacement != "FrozenBatchNorm" and r.path:
            replace_submodule(root, r.path, orig, copied)
            kept.append(r)
    return root, kept


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


def _failed_run(gm: fx.GraphModule, args: Sequence[Any], why: str, B0: int) -> MixingFinding:
    node = next(n for n in gm.graph.nodes if n.op == "placeholder") if any(
        n.op == "placeholder" for n in gm.graph.nodes) else next(iter(gm.graph.nodes))
    try:
        with torch.no_grad(), fork_rng(args):
            fx.Interpreter(gm).run(*args)  # not gm(*args): GraphModule prints failures to stderr
        runs = True
    except Exception:
        runs = False
    if runs:
        return MixingFinding(
            node, "batch-size", "error",
            f"the model runs on the example batch (size {B0}) but fails at other batch sizes ({why}): it "
            "hard-codes the batch size, and DP-SGD's Poisson sampling gives every step a different one",
            "use the runtime batch size (`x.shape[0]`, `x.view(x.shape[0], -1)`) instead of a constant")
    return MixingFinding(
        node, "run-failed", "error", f"the model fails on the example inputs ({why})",
        "check the example input shapes and dtypes (--input-shape/--dtype on the command line)")


def _captures(gm: fx.GraphModule) -> Tuple[Optional[list], Optional[BaseException], Dict[str, Any]]:
    """privatize's capture pass on ``gm`` (in place): (capture ops, error, {replaced node name: capture node})."""
    from .passes.capture import insert_captures

    try:
        caps = insert_captures(gm, Recorder())
    except (FxdpError, TypeError, ValueError, RuntimeError) as e:
        return None, e, {}
    # capture nodes carry the name of the node they replace in meta
    nodes = {n.meta["fxdp_capture"]: n for n in gm.graph.nodes if n.meta.get("fxdp_capture")}
    return caps, None, nodes


def _capture_findings(originals: Dict[str, fx.Node], result: Any,
                      cap_nodes: Dict[str, Any]) -> List[Tuple[MixingFinding, None]]:
    """Layers with trainable parameters applied to a folded batch: privatize needs
    each sample's rows apart (it raises BatchDimensionError at the first backward)."""
    out = []
    for name, cn in cap_nodes.items():
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
                    "x.view(B * T, d)); the layer accepts any number of leading dimensions"), None))
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


def _bk_plans(gm: fx.GraphModule, cap_nodes: Dict[str, Any], result: Any) -> Dict[str, str]:
    """``{parameter name: book-keeping method}`` from each capture op's traced shapes
    (ghost vs materialized norms are chosen from these shapes at run time, too)."""
    out: Dict[str, str] = {}

    def meta(name: str, k: int = 0) -> Optional[Tuple[torch.Tensor, Optional[int]]]:
        shapes, hints = result.shapes.get(name) or [], result.hints.get(name) or []
        if k >= len(shapes) or not isinstance(shapes[k], tuple):
            return None
        h = hints[k] if k < len(hints) and isinstance(hints[k], int) else None
        return torch.empty(shapes[k], device="meta"), h

    for orig, cn in cap_nodes.items():
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
                    m = meta(a.name)  # None for non-tensor values (a scan's tape, an absent h0)
                    dyn.append(m[0] if m is not None else None)
                    dims.append(m[1] if m is not None else None)
                else:
                    dyn.append(a)
                    dims.append(None)
            o = meta(orig)
            if o is None:
                continue
            for name, how in op.bk_plan(dyn, o[0], dims, o[1]).items():
                out.setdefault(name, how)
        except Exception:  # the plan is informative only: never fail the report on it
            continue
    return out


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


def _dynamic(model: nn.Module, args: Sequence[Any], batch_first: bool, options: Dict[str, Any]) -> Finding:
    """fxdp.verify on the model as privatize trains it (after its rewrites)."""
    from .privatize import apply_rewrites
    from .verify import verify

    try:
        model = apply_rewrites(model, options)[0]
    except FxdpError:
        pass
    res = verify(model, args, batch_first=batch_first)
    if res.ok:
        return Finding("info", "verify", "fxdp.verify", "", "", None, None, None,
                       f"dynamic check (fxdp.verify after privatize's rewrites) passed: {res.summary()}",
                       "nothing to do")
    return Finding("error", "verify", "fxdp.verify", "", "", None, None, None,
                   f"dynamic check (fxdp.verify after privatize's rewrites) failed: {res.summary()}",
                   "find the op that mixes samples (see the findings above, or bisect the model with fxdp.verify)")


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


class _CallableModule(types.ModuleType):
    """``fxdp.check(...)`` calls :func:`check`; ``fxdp.check.assert_compatible`` etc. stay reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompatibilityReport:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def _check_exported(root: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], batch_dim: int,
                    rewrites: List[Any], batch_size: int,
                    outer: Set[Tuple[str, int]]) -> Tuple[List[Finding], List[LayerInfo]]:
    """Findings and layer table from the ``torch.export`` graph privatize runs."""
    from .exported_module import exported_graph, instrument, leaf_batch_dims
    from .passes.symbolic_batch import mixing_findings

    def finding(node: Optional[fx.Node], code: str, problem: str, fix: str) -> Finding:
        src = node.meta.get("fxdp_source") if node is not None else None
        file, line, text = _parse_source(src, outer)
        return Finding("error", code, str(node.target) if node is not None else type(root).__name__,
                       node.name if node is not None else "", str(node.meta.get("fxdp_module") or "")
                       if node is not None else "", file, line, text, problem, fix)

    dims = leaf_batch_dims(args, kwargs, batch_dim, batch_dim)
    try:
        gm = exported_graph(root, args, kwargs, dims)
    except FxdpError as e:  # cannot be captured: an error, never a pass, at the line that stops export
        msg = str(e)
        problem, _, rest = msg.partition(". Fix: ")
        f = finding(None, "export", problem, rest.split("\n")[0] if rest else "see the message")
        loc = _user_line(e.__cause__) if e.__cause__ is not None else None
        if loc is not None and (loc[0], loc[1]) not in outer:
            f.file, f.line, f.source = loc
        return [f], _layers(root, None, rewrites, batch_size, whole=True)
    fixes = {"batch-reduction": "compute the loss outside the model, per sample; normalize over per-sample "
                                "dimensions only",
             "batch-op": "apply the op along a per-sample dimension (e.g. dim=-1), never across the batch",
             "batch-index": "keep every sample in its own row (index or slice per-sample dimensions only)",
             "batch-norm": "use GroupNorm/LayerNorm, or nn.BatchNorm modules (privatize replaces those)"}
    findings = [finding(n, code, problem, fixes[code]) for n, code, problem in mixing_findings(gm)]
    captures = None
    if not findings:
        try:
            captures = instrument(gm, Recorder())
        except FxdpError as e:
            findings.append(finding(None, "capture", str(e), "see the message"))
    return findings, _layers(root, captures, rewrites, batch_size)
