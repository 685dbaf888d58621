"""fxdp.privatize: trace, rewrite, capture -> DPModule."""
from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .capture import Recorder
from .errors import FxdpError, SymbolicGraphError, UnsupportedModelError
from .example_inputs import call_inputs
from .module import DPModule
from .passes.capture import CAPTURES, insert_captures
from .passes.export_graph import symbolic_tracing_drops
from .passes.rewrite import Rewrite, _own_containers, known_options, rewrite_passes
from .tracer import DPTracer, trace

__all__ = ["privatize"]


def whole_model_graph(model: nn.Module, error: Exception) -> fx.GraphModule:
    """A graph with one placeholder per ``forward`` argument and a single call of
    the model, for models whose own ``forward`` cannot be traced."""
    graph = fx.Graph()
    phs = []
    for name, prm in inspect.signature(model.forward).parameters.items():
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            raise UnsupportedModelError(
                f"cannot trace {type(model).__name__}.forward symbolically ({type(error).__name__}: {error}) and "
                "it takes *args/**kwargs, so it cannot be kept whole either. Fix: give forward named arguments, "
                "or move the untraceable code into a submodule."
            ) from error
        default = () if prm.default is prm.empty else (prm.default,)
        phs.append(graph.placeholder(name, default_value=default[0] if default else inspect.Signature.empty))
    node = graph.call_function(_call_whole, tuple(phs))
    node.meta["fxdp_module"] = ""
    node.meta["fxdp_untraceable_root"] = f"{type(error).__name__}: {error}"
    graph.output(node)
    gm = fx.GraphModule(nn.Module(), graph, type(model).__name__)
    gm.meta["fxdp_untraceable"] = {"": f"{type(error).__name__}: {error}".strip()}
    return gm


def _call_whole(*args: Any) -> Any:  # pragma: no cover - replaced by a capture op
    raise RuntimeError("placeholder for an untraceable model")


def whole_model_capture(gm: fx.GraphModule, model: nn.Module, recorder: Recorder) -> list:
    """Serve an untraceable model with one fallback capture op."""
    from torch.utils._pytree import tree_flatten

    from .passes.capture import FunctionalModuleCall
    from .capture import FuncCapture

    gm.add_module(CAPTURES, nn.Module())
    node = next(n for n in gm.graph.nodes if n.target is _call_whole)
    phs = list(node.args)
    pnames = [k for k, p in model.named_parameters() if p.requires_grad]
    _, spec = tree_flatten((tuple(phs), {}))
    fn = FunctionalModuleCall(model, pnames, [None] * len(phs), spec, list(range(len(phs))))
    with gm.graph.inserting_before(node):
        pnodes = [gm.graph.get_attr(k) for k in pnames]
        cap = FuncCapture(fn=fn, description=type(model).__name__, capture_name="model", recorder=recorder,
                          param_index={len(phs) + i: k for i, k in enumerate(pnames)}, module_path="",
                          op_name=f"{type(model).__name__}.forward")
        getattr(gm, CAPTURES).add_module("model", cap)
        new = gm.graph.call_module(f"{CAPTURES}.model", tuple(phs) + tuple(pnodes))
    new.meta.update(node.meta)
    new.meta["fxdp_capture"] = "model"
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    # get_attr targets must resolve on the GraphModule: borrow the model's tree
    from .module import adopt

    adopt(gm, model, {CAPTURES: getattr(gm, CAPTURES)})
    gm.recompile()
    return [cap]

GRAD_SAMPLE_MODES = ("materialize", "bk")
CAPTURE_MODES = ("auto", "fx", "export")


def _exported(model: nn.Module, root: nn.Module, rewrites: List[Rewrite], loss_reduction: str, batch_first: bool,
              input_batch_dims: Optional[Sequence[Optional[int]]],
              example: Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]], grad_sample_mode: str,
              allow_unsafe_model: bool, recorder: Optional[Recorder] = None) -> DPModule:
    from .exported_module import ExportedDPModule

    recorder = recorder or Recorder(loss_reduction=loss_reduction, mode=grad_sample_mode)
    dp = ExportedDPModule(root, recorder=recorder,
                          batch_first=batch_first, input_batch_dims=input_batch_dims,
                          class_name=type(model).__name__, rewrites=rewrites)
    dp.allow_unsafe_model = allow_unsafe_model
    if example is not None:
        dp.capture_example(*example[0], **example[1])
    return dp

def apply_rewrites(model: nn.Module, options: Dict[str, Any]) -> Tuple[nn.Module, List[Rewrite]]:
    """Run the rewrite passes on a container copy of ``model`` (parameters shared,
    the user's module objects untouched). Returns the root to trace and the rewrites."""
    root = _own_containers(model)
    copied: set = set()
    rewrites: List[Rewrite] = []
    unknown = set(options) - known_options()
    if unknown:
        raise ValueError(f"unknown rewrite_options {sorted(unknown)}; known: {sorted(known_options())}")
    for rewrite_pass in rewrite_passes():
        rewrites += rewrite_pass(root, options, copied)
    _warn_when_left_behind_batchnorm_runs(model, rewrites)
    return (root if rewrites else model), rewrites


def _warn_when_left_behind_batchnorm_runs(model: nn.Module, rewrites: List[Rewrite]) -> None:
    """The rewrites work on a copy: the user's object keeps its BatchNorm layers, which
    the DP model replaced (GroupNorm, frozen statistics) and never trains. Running that
    object later (evaluating or saving it instead of the returned model) gives other
    outputs than the trained DP model: warn the first time it happens."""
    from torch.nn.modules.batchnorm import _BatchNorm

    left = []
    for rw in rewrites:
        try:
            m = model.get_submodule(rw.path) if rw.path else model
        except AttributeError:
            continue
        if isinstance(m, _BatchNorm) and "GroupNorm" in rw.replacement:  # frozen BatchNorm = its eval mode
            left.append((rw.path, m))
    if not left:
        return
    warned = [False]

    def hook(module: nn.Module, args: Any) -> None:
        if warned[0] or torch.compiler.is_compiling() or torch.compiler.is_exporting() or any(
                isinstance(a, (fx.Proxy, torch._subclasses.FakeTensor)) for a in args):
            return  # fxdp.check / torch.export reading the original model
        path = next((p for p, m in left if m is module), None)
        if path is None:  # a deep copy of the original (its hooks are copied too): the user's own copy
            return
        warned[0] = True
        warnings.warn(
            f"fxdp: {type(model).__name__}.{path} ({type(module).__name__}) ran, but this is the model object "
            "passed to privatize/make_private: in the DP model its BatchNorm layers are replaced (see "
            "dp_model.rewrites) and only the replacements are trained; these keep their initial statistics and "
            "give other outputs. Fix: evaluate and save the model returned by make_private/privatize (or its "
            "._module), not the original object",
            stacklevel=2,
        )

    hook.fxdp_internal = True  # type: ignore[attr-defined]  # fxdp's own: not a user hook tracing would drop
    for _, m in left:
        if m not in _LEFT_BEHIND_WATCHED:  # privatize and fxdp.check on the same model: one hook
            _LEFT_BEHIND_WATCHED.add(m)
            m.register_forward_pre_hook(hook)


#: BatchNorm layers of user models already watched (weak: a freed model is forgotten)
_LEFT_BEHIND_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def checkpointed_modules(model: nn.Module) -> List[str]:
    """The modules with activation (gradient) checkpointing switched on: a Hugging Face
    model's ``gradient_checkpointing`` flags (``gradient_checkpointing_enable()``)."""
    return [path or type(model).__name__ for path, m in model.named_modules()
            if getattr(m, "gradient_checkpointing", False) is True]


def _warn_checkpointing_not_applied(model: nn.Module) -> None:
    """Activation checkpointing recomputes a block's forward in the backward pass; the
    captured graph runs each op once (``torch.export`` and symbolic tracing inline the
    checkpointed calls), so the flag changes nothing there: say so, with what it costs."""
    where = checkpointed_modules(model)
    if not where:
        return
    warnings.warn(
        f"fxdp: gradient checkpointing is enabled on {type(model).__name__} ({', '.join(where[:3])}"
        f"{', ...' if len(where) > 3 else ''}) but the DP model does not apply it: its captured graph runs each "
        "layer once, without recomputation in the backward pass. Per-sample gradients are exact; the step's "
        "memory is that of the graph without recomputation (book-keeping holds each trainable layer's input and "
        "output gradient to the optimizer step for its clipped sum, which recomputation would not free). Fix, "
        "if memory is short: a smaller physical batch with fxdp's BatchMemoryManager (the logical batch and its "
        "accounting unchanged); call gradient_checkpointing_disable() to silence this",
        stacklevel=3,
    )


def _variant_builder(model: nn.Module, root: nn.Module, rewrites: List[Rewrite], recorder: Recorder,
                     leaf_modules: Iterable[type], batch_first: bool,
                     input_batch_dims: Optional[Sequence[Optional[int]]],
                     allow_unsafe_model: bool) -> Callable[[set], DPModule]:
    """Builds the DP graph of ``root`` for a call passing some arguments that default to
    ``None`` (see :meth:`DPModule._variant`): the same rewritten modules and recorder."""
    leaf_modules = tuple(leaf_modules)

    def build(none_args: set) -> DPModule:
        gm = trace(root, DPTracer(leaf_modules=leaf_modules), none_args=none_args)
        if gm.meta.get("fxdp_untraceable"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: with these arguments given, symbolic tracing cannot read "
                f"{sorted(gm.meta['fxdp_untraceable'])}. Fix: privatize(model, capture='export')"
            )
        plain_graph = copy.deepcopy(gm.graph)
        insert_captures(gm, recorder)
        v = DPModule(gm, gm.graph, plain_graph=plain_graph, recorder=recorder, batch_first=batch_first,
                     input_batch_dims=input_batch_dims, class_name=type(model).__name__, rewrites=rewrites)
        from .module import adopt

        adopt(v, root, {CAPTURES: getattr(gm, CAPTURES)})
        object.__setattr__(v, "_source_root", root)
        v.meta["fxdp_none_args"] = gm.meta["fxdp_none_args"]
        v.allow_unsafe_model = allow_unsafe_model
        return v

    return build


def privatize(
    model: nn.Module,
    *,
    loss_reduction: str = "mean",
    batch_first: bool = True,
    input_batch_dims: Optional[Sequence[Optional[int]]] = None,
    example_inputs: Union[Tensor, Sequence[Any], Mapping[str, Any], None] = None,
    leaf_modules: Iterable[type] = (),
    grad_sample_mode: str = "materialize",
    rewrite_options: Optional[Dict[str, Any]] = None,
    capture: str = "auto",
    allow_unsafe_model: bool = False,
) -> DPModule:
    """Rewrite ``model``'s graph so one backward pass gives per-sample gradients.

    Args:
        model: any ``nn.Module`` traceable by ``torch.fx`` (submodules that are not
            are kept whole and served by the ``torch.func`` fallback).
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the
            batch; ``p.grad_sample[i]`` is then sample i's own gradient.
        batch_first: ``False`` when sequence inputs are ``[T, B, ...]``.
        input_batch_dims: the batch dimension of each positional input, ``None``
            for an input without one (e.g. ``nn.EmbeddingBag``'s flat indices next
            to ``offsets``: ``[None, 0]``; such an input is cut into samples by the
            offsets, and one that no offsets input cuts is refused); overrides
            ``batch_first``.
        example_inputs: optional inputs to analyze batch dimensions up front
            (otherwise done on the first forward pass of each input signature): a
            tensor, a tuple of positional inputs, or a dict of keyword inputs.
        leaf_modules: module classes to keep whole (served by a rule or the fallback).
        grad_sample_mode: ``"materialize"``: ``p.grad_sample`` per parameter;
            ``"bk"`` (book-keeping): per-sample norms and clipped sums without
            per-sample gradients, formed when the backward pass ends (needs the
            clip bound: use ``PrivacyEngine.make_private``; see ``fxdp.bookkeeping``).
        rewrite_options: options of the rewrite passes (see ``docs/rewrites.md``).
        capture: how the graph is captured. ``"fx"``: symbolic tracing (readable
            module-level graphs; parts it cannot read are served by the ``torch.func``
            fallback); ``"export"``: ``torch.export`` (ATen graphs, on the first
            training call of each input structure, see ``fxdp.exported_module``);
            ``"auto"`` (default): symbolic tracing when it reads the whole model,
            ``torch.export`` otherwise (Hugging Face models, ``**kwargs``, hooks), and
            when a layer gets a folded batch whose order symbolic tracing does not follow
            (windows, a norm over ``x.flatten(0, 1)``): here given ``example_inputs``
            (``make_private`` passes its loader's batch), else at the first training
            call (``DPModule.capture_path``).
        allow_unsafe_model: serve a model in which samples influence each other
            (``x - x.mean(0)``, ops along the batch) with a warning instead of
            refusing it; its per-sample gradients are then not each sample's own and
            there is no DP guarantee. Default: refused (``UnsupportedOpError`` at the
            first training call of each input signature, or here with ``example_inputs``).

    Returns:
        A ``DPModule`` (a ``torch.fx.GraphModule``) sharing ``model``'s parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdp.privatize expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DPModule):
        raise UnsupportedModelError("this model is already privatized (a DPModule); privatize the original model")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")

    example = None if example_inputs is None else call_inputs(example_inputs)
    _warn_checkpointing_not_applied(model)

    root, rewrites = apply_rewrites(model, dict(rewrite_options or {}))
    if capture == "auto" and symbolic_tracing_drops(root):
        capture = "export"
    if capture == "export":
        return _exported(model, root, rewrites, loss_reduction, batch_first, input_batch_dims, example,
                         grad_sample_mode, allow_unsafe_model)
    tracer = DPTracer(leaf_modules=leaf_modules)
    whole = False
    try:
        gm = trace(root, tracer)
    except Exception as e:
        if capture == "auto":  # the model's own forward is not traceable: torch.export reads it
            return _exported(model, root, rewrites, loss_reduction, batch_first, input_batch_dims,
                             example, grad_sample_mode, allow_unsafe_model)
        # keep it whole (one fallback capture)
        gm = whole_model_graph(root, e)
        whole = True
    if capture == "auto" and (whole or gm.meta.get("fxdp_untraceable")):
        # symbolic tracing cannot read all of it: capture with torch.export instead
        return _exported(model, root, rewrites, loss_reduction, batch_first, input_batch_dims, example,
                         grad_sample_mode, allow_unsafe_model)
    plain_graph = copy.deepcopy(gm.graph)
    recorder = Recorder(loss_reduction=loss_reduction, mode=grad_sample_mode)
    if whole:
        captures = whole_model_capture(gm, root, recorder)
    else:
        try:
            captures = insert_captures(gm, recorder)
        except Exception as e:
            if capture != "auto" or (isinstance(e, FxdpError) and not isinstance(e, SymbolicGraphError)):
                raise  # a refusal stays a refusal
            # an op the module-level graph cannot serve (a slice of a parameter, ...): the ATen graph can
            return _exported(model, root, rewrites, loss_reduction, batch_first, input_batch_dims,
                             example, grad_sample_mode, allow_unsafe_model)
    dp = DPModule(
        gm,
        gm.graph,
        plain_graph=plain_graph,
        recorder=recorder,
        batch_first=batch_first,
        input_batch_dims=input_batch_dims,
        class_name=type(model).__name__,
        untraceable=gm.meta.get("fxdp_untraceable"),
        rewrites=rewrites,
    )
    dp.allow_unsafe_model = allow_unsafe_model
    # adopt the user's module tree (GraphModule copies only referenced attributes)
    from .module import adopt

    adopt(dp, root, {CAPTURES: getattr(gm, CAPTURES)})
    # kept outside the module tree (no duplicate state_dict keys): strip() rebuilds from them
    object.__setattr__(dp, "_source_root", root)
    if whole:
        object.__setattr__(dp, "_original_model", root)
    dp.meta["fxdp_none_args"] = gm.meta.get("fxdp_none_args", frozenset())
    if not whole:
        object.__setattr__(dp, "_build_variant", _variant_builder(model, root, rewrites, recorder, leaf_modules,
                                                                   batch_first, input_batch_dims, allow_unsafe_model))
    fallbacks = [c for c in captures if c.kind == "functorch"]
    if fallbacks or dp.untraceable:
        lines = [f"  {c.module_path or c.capture_name}: {c.rule_name()}" for c in fallbacks]
        lines += [f"  {k}: kept whole, not traceable ({v.splitlines()[0][:120]})" for k, v in dp.untraceable.items()]
        warnings.warn(
            "fxdp.privatize: these parts use the slower torch.func fallback (their inside is not analysed; every "
            "step checks that each sample's output alone equals its output in the batch, and refuses the step "
            "if not):\n" + "\n".join(lines),
            stacklevel=2,
        )
    if capture == "auto" and not whole:  # at the first training call whose folds this graph cannot serve
        # from the module's own root and recorder: a deep copy of it builds on its copies
        object.__setattr__(dp, "_export_builder", lambda mod: _exported(
            model, mod._source_root, mod.rewrites, loss_reduction, batch_first, input_batch_dims, None,
            grad_sample_mode, mod.allow_unsafe_model, recorder=mod.recorder))
    if example is not None:
        args, kwargs = example
        dims = dp.batch_dims_for(dp._positional(args, dict(kwargs)) if kwargs else args)
        if capture == "auto" and dp.folds_for_export(dims):
            # a layer that reads [B, k, ...] gets a folded batch whose order symbolic tracing does not
            # follow (windows, a norm over x.flatten(0, 1)): the ATen graph follows it
            return _exported(model, root, rewrites, loss_reduction, batch_first, input_batch_dims, example,
                             grad_sample_mode, allow_unsafe_model)
    return dp
