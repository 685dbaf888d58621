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

``fxdp.check`` is this module, and calling it calls :func:`check`. It runs the
analyses; the report's findings, layer table and graph are built in the sibling
modules ``check_findings``, ``check_layers`` and ``check_graph``.
"""
from __future__ import annotations

import sys
import time
import types
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .capture import Recorder
from .check_findings import (
    Ignore,
    _autograd_function,
    _capture_findings,
    _dedupe,
    _eager_updates,
    _finding,
    _frozen_bn_notes,
    _ignored,
    _outer_frames,
    _parse_source,
    _privatize_error,
    _proxy_assignments,
    _refusal,
    _untraceable_parts,
    _user_line,
)
from .check_graph import _graph
from .capture.op import unserved_folds
from .check_layers import _bk_plans, _bk_plans_exported, _layers
from .errors import FxdpError, SymbolicGraphError, UnsupportedModelError
from .example_inputs import call_inputs
from .model_state import ModelState
from .passes.batch_dims import batch_size as first_batch_size
from .passes.batch_mixing import MixingFinding, analyze_batch_mixing, small_model_threads
from .passes.batch_mixing.report import failed_run
from .privatize import checkpointed_modules
from .report import CompatibilityReport, Finding, LayerInfo
from .tracer import DPTracer, trace

__all__ = ["check", "assert_compatible", "CompatibilityReport"]


class _CheckTracer(DPTracer):
    """DPTracer that also keeps the exception of each untraceable submodule (for
    the source line of the offending control flow)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.trace_errors: Dict[str, BaseException] = {}

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


def _batch_size(args: Sequence[Any], kwargs: Dict[str, Any], batch_dim: Any, default: int) -> int:
    B = first_batch_size(list(args), batch_dim) or first_batch_size([kwargs], default)
    if B is None:
        raise ValueError("example_inputs must contain at least one batched tensor")
    return B


def check(
    model: nn.Module,
    example_inputs: Union[Tensor, Sequence[Any], Mapping[str, Any]],
    *,
    batch_first: bool = True,
    input_batch_dims: Optional[Sequence[Optional[int]]] = None,
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
        example_inputs: the positional inputs of ``forward`` (a tensor or a tuple), or
            a dict of its keyword inputs (a Hugging Face batch); every tensor is
            batched along the batch dimension.
        batch_first: ``False`` when inputs are ``[T, B, ...]`` (batch dimension 1).
        input_batch_dims: the batch dimension of each positional input, ``None`` for
            one without (``nn.EmbeddingBag``'s flat indices next to ``offsets``:
            ``[None, 0]``), as in ``privatize``; overrides ``batch_first``.
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
    args, kwargs = call_inputs(example_inputs, example_kwargs)
    batch_dim: Any = 0 if batch_first else 1
    if input_batch_dims is not None:
        batch_dim = list(input_batch_dims)
        if dynamic:
            raise ValueError("fxdp.check(dynamic=True) perturbs samples along one batch dimension; it does not "
                             "take input_batch_dims: drop dynamic=True, or pass inputs batched along batch_first")
    B0 = _batch_size(args, kwargs, batch_dim, 0 if batch_first else 1)
    if B0 < 1:
        raise ValueError("example_inputs need at least one sample")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    outer = _outer_frames()
    ignores = list(ignore)
    with small_model_threads(model):
        return _check(model, args, batch_dim, B0, batch_size, outer, ignores, rewrite_options, leaf_modules,
                      dynamic, batch_first, t0, kwargs)


def _check(model: nn.Module, args: Tuple[Any, ...], batch_dim: Any, B0: int, batch_size: Optional[int],
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
        except Exception:  # symbolic tracing cannot read it: the exported graph is analysed below
            gm = None
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
                raw.append((failed_run(gm, args, result.failed, B0, result.failed_at), None))
            raw += _untraceable_parts(gm, root, untraceable, tracer.trace_errors)
            raw += [(f, None) for f in result.findings]
            raw += _frozen_bn_notes(gm, frozen_bn)
            graph = _graph(gm, result, rewrites)
            originals = {n.name: n for n in gm.graph.nodes}
            captures, cap_error, cap_nodes = _captures(gm)  # privatize's capture pass, in place: gm is done
            folds = _capture_findings(originals, result, cap_nodes)
            raw += folds
            if cap_error is not None:
                raw.append((_privatize_error(originals, cap_error, raw), None))
            layers = _layers(root, captures, rewrites, batch_size or B0, gm=gm if captures is None else None,
                             plans=_bk_plans(gm, cap_nodes, result, B0, batch_size or B0) if captures is not None else None)
            findings = [_finding(f, loc, outer) for f, loc in raw] + [_refusal(m) for m in refusals]
            if cap_error is not None and (not isinstance(cap_error, FxdpError)
                                          or isinstance(cap_error, SymbolicGraphError)) \
                    or any(f.details.get("export_serves") for f, _ in folds):
                # privatize serves this model through torch.export instead (given example inputs, as here and
                # in make_private, also for a fold the export path follows): report that graph's analysis
                findings, layers = _check_exported(root, args, {}, batch_dim, rewrites, batch_size or B0, outer)
                findings += [_refusal(m) for m in refusals]
        if dynamic:
            findings.append(_dynamic(model, args, batch_first, dict(rewrite_options or {})))
        checkpointed = checkpointed_modules(model)
        if checkpointed:
            findings.append(Finding(
                "info", "checkpointing", type(model).__name__, "", checkpointed[0], None, None, None,
                "gradient checkpointing is on, but the DP model runs each layer once, without recomputation "
                "(per-sample gradients exact; memory as without it: book-keeping holds each trainable layer's "
                "input and output gradient to the step)", "a smaller physical batch with BatchMemoryManager if "
                "memory is short; gradient_checkpointing_disable() to drop the flag"))
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


def assert_compatible(model: nn.Module, example_inputs: Union[Tensor, Sequence[Any], Mapping[str, Any]],
                      **kwargs: Any) -> CompatibilityReport:
    """``check(model, example_inputs, **kwargs).raise_if_errors()``: raises
    ``fxdp.UnsupportedModelError`` naming every op that breaks DP (for
    ``PrivacyEngine.make_private``); returns the report otherwise."""
    return check(model, example_inputs, **kwargs).raise_if_errors()


# --- pieces (findings: check_findings.py; layer table: check_layers.py; graph: check_graph.py) ---

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


class _CallableModule(types.ModuleType):
    """``fxdp.check(...)`` calls :func:`check`; ``fxdp.check.assert_compatible`` etc. stay reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompatibilityReport:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def _check_exported(root: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], batch_dim: Any,
                    rewrites: List[Any], batch_size: int,
                    outer: Set[Tuple[str, int]]) -> Tuple[List[Finding], List[LayerInfo]]:
    """Findings and layer table from the ``torch.export`` graph privatize runs."""
    from .exported_module import exported_graph, instrument, leaf_batch_dims
    from .passes.probe_batch import probe_batch
    from .passes.symbolic_batch import mixing_findings

    def finding(node: Optional[fx.Node], code: str, problem: str, fix: str) -> Finding:
        src = node.meta.get("fxdp_source") if node is not None else None
        file, line, text = _parse_source(src, outer)
        return Finding("error", code, str(node.target) if node is not None else type(root).__name__,
                       node.name if node is not None else "", str(node.meta.get("fxdp_module") or "")
                       if node is not None else "", file, line, text, problem, fix)

    dims = leaf_batch_dims(args, kwargs, batch_dim, batch_dim if isinstance(batch_dim, int) else 0)
    try:
        gm = exported_graph(root, args, kwargs, dims)
    except FxdpError as e:  # cannot be captured: an error, never a pass, at the line that stops export
        msg = str(e)
        problem, _, rest = msg.partition(". Fix: ")
        f = finding(None, getattr(e, "code", "export"), problem, rest.split("\n")[0] if rest else "see the message")
        loc = _user_line(e.__cause__) if e.__cause__ is not None else None
        if loc is not None and (loc[0], loc[1]) not in outer:
            f.file, f.line, f.source = loc
        if getattr(e, "source", None):  # where the model calls what is refused (a custom autograd.Function)
            f.file, f.line, f.source = _parse_source(e.source, outer)
        return [f], _layers(root, None, rewrites, batch_size, whole=True)
    fixes = {"batch-reduction": "compute the loss outside the model, per sample; normalize over per-sample "
                                "dimensions only",
             "batch-op": "apply the op along a per-sample dimension (e.g. dim=-1), never across the batch",
             "batch-index": "keep every sample in its own row (index or slice per-sample dimensions only)",
             "batch-norm": "use GroupNorm/LayerNorm, or nn.BatchNorm modules (privatize replaces those)",
             "batch-fold": "move the batch dimension with .transpose/.permute, and fold or unfold it only next to "
                           "its own dimensions ([B, T, d] <-> [B*T, d])",
             "batch-rule": "express it with ops fxdp has batch rules for (fxdp/passes/batch_rules.py), or register "
                           "one for a custom op (fxdp.passes.batch_rules.register_batch_rule) with a test that it "
                           "keeps samples apart",
             "batch-probe": "express it with ops that keep each sample in its own rows (or capture='fx', whose "
                            "analysis reads ops by their semantics)"}
    found = mixing_findings(gm) or probe_batch(gm, tree_flatten((args, kwargs))[0], dims)
    findings = [finding(n, code, problem, fixes[code]) for n, code, problem in found]
    findings += [_autograd_function(a.name, a.source, outer) for a in gm.meta.get("fxdp_custom_functions", ())]
    captures = None
    if not findings:
        try:
            captures = instrument(gm, Recorder())
        except FxdpError as e:
            findings.append(finding(None, "capture", str(e), "see the message"))
        for c in captures or ():  # a fold its rule cannot serve: privatize refuses it at the first backward
            for h in unserved_folds(c, c.default_batch_dims[0]):
                node = next((n for n in gm.graph.nodes if n.meta.get("fxdp_capture") == c.capture_name), None)
                findings.append(finding(node, "batch-fold", f"a layer with trainable parameters receives a batch "
                                        f"folded into dimension {h[1]} (size B*{h[2]}), which its per-sample rule "
                                        f"({c.rule_name()}) does not serve",
                                        "keep the batch dimension separate before this layer (a [B, k, ...] tensor "
                                        "instead of x.flatten(0, 1))"))
                break
    return findings, _layers(root, captures, rewrites, batch_size,
                             plans=_bk_plans_exported(gm, batch_size) if captures is not None else None)
