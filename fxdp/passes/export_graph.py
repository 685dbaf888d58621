"""Capture with ``torch.export``: an ATen training graph with a symbolic batch.

The front end of the PT2E flow (``torch.export`` -> passes -> convert) for models
that symbolic tracing cannot read: optional and keyword arguments, ``*args`` /
``**kwargs``, hooks, tensors made in ``forward``, parametrizations and
``ModelOutput`` results all become ordinary nodes of one graph of ATen ops
(``aten.linear``, ``aten.addmm``, ``aten.embedding``, ``aten.layer_norm``,
``aten.dropout``, ...). The batch is one symbol shared by every input
(``Dim("batch")``); other dimensions are ``Dim.AUTO`` (symbolic where the model
allows, e.g. sequence lengths), except an image's (``static_sizes``). Control flow on tensor values or on the batch
size is an export error, so such a model is refused instead of served.

Each node gets ``meta["fxdp_module"]`` (module path, from ``nn_module_stack``)
and ``meta["fxdp_source"]`` (the user's ``file:line: code``, from
``stack_trace``), as the symbolic tracer writes them.
"""
from __future__ import annotations

import inspect
import linecache
import os
import re
import sys
import traceback
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModelError
from ..layers.quantized import opaque_quantized_linears
from ..model_state import ModelState
from ..utils.custom_backward import Application, check_backwards, watch_functions
from ..utils.host_rng import watch_draws
from ..utils.source import FXDP_DIR, TORCH_DIR
from .inline_grad_mode import inline_grad_mode_blocks

__all__ = ["export_graph", "example_for_export", "symbolic_tracing_drops"]


_MIN_EXAMPLE_BATCH = 2  # export specializes sizes 0 and 1


def example_for_export(flat: List[Any], batch_dims: List[Optional[int]],
                       rows: int = _MIN_EXAMPLE_BATCH) -> List[Any]:
    """Inputs with at least ``rows`` samples (export specializes a batch of 0 or 1,
    as Poisson sampling draws them): rows repeated, or ones for an empty batch (token
    id 1, an attention mask that attends)."""
    out = []
    for t, d in zip(flat, batch_dims):
        if isinstance(t, Tensor) and d is not None and t.shape[d] < rows:
            if t.shape[d] == 0:
                shape = list(t.shape)
                shape[d] = rows
                t = torch.ones(shape, dtype=t.dtype, device=t.device)
            else:
                reps = [1] * t.dim()
                reps[d] = -(-rows // t.shape[d])
                t = t.repeat(*reps).narrow(d, 0, rows)
        out.append(t)
    return out


class ModelCall(nn.Module):
    """``model(*args, **kwargs)`` with both passed as two plain arguments: one input
    structure for ``torch.export`` whatever ``forward``'s signature (``*args``,
    ``**kwargs``, wrappers such as peft's). The graph is called as ``gm(args, kwargs)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self.model(*args, **kwargs)


def static_sizes(t: Tensor, batch_dim: Optional[int]) -> Optional[Tuple[int, ...]]:
    """The sizes other than the batch that a capture fixes, or None where they stay symbolic.

    Images and volumes (floating-point, four dimensions or more) keep their sizes: a
    training pipeline crops them to one size, and symbolic heights and widths cost
    ``torch.export`` minutes of shape algebra on a model that pads them to its windows
    (Swin: 110 s for two stages, 2 s static). Another size is another graph."""
    if t.dim() >= 4 and t.is_floating_point():
        return tuple(int(n) for k, n in enumerate(t.shape) if k != batch_dim)
    return None


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dims: Dict[int, Optional[int]]) -> Any:
    """``dynamic_shapes`` for ``torch.export``: the shared batch Dim at each batched
    leaf, ``Dim.AUTO`` elsewhere except where ``static_sizes`` fixes them (any input
    structure: ``**kwargs``, nested dicts)."""
    from torch.export import Dim, ShapesCollection

    batch = Dim("batch")
    shapes = ShapesCollection()
    flat, _ = tree_flatten((args, kwargs))
    for i, t in enumerate(flat):
        if isinstance(t, Tensor) and t.dim() > 0:
            other = Dim.STATIC if static_sizes(t, dims.get(i)) is not None else Dim.AUTO
            shapes[t] = {k: (batch if k == dims.get(i) else other) for k in range(t.dim())}
    return shapes.dynamic_shapes(model, (args, kwargs))


def _location(n: fx.Node) -> Optional[str]:
    trace = n.meta.get("stack_trace")
    if not trace:
        return None
    lines = trace.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):  # innermost frame outside torch and fxdp: the model's own line
        m = re.match(r'\s*File "([^"]+)", line (\d+)', lines[i])
        if m and not m.group(1).startswith((TORCH_DIR, FXDP_DIR)):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{m.group(1)}:{m.group(2)}" + (f": {code}" if code else "")
    return None


def _annotate(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            path = list(stack.values())[-1][0]
            path = "" if path in ("", "L['self']") else re.sub(r"^L\['self'\]\.?", "", path)
            path = re.sub(r"^model\.?", "", path)  # ModelCall's attribute
        n.meta["fxdp_module"] = path
        src = _location(n)
        if src is not None:
            n.meta["fxdp_source"] = src


def _branch_site(e: BaseException) -> Optional[Tuple[str, int, str]]:
    """``(file, line, code)`` of the innermost frame of the model's own code (not torch's
    or fxdp's) where ``e`` was raised: the line that branched on a tensor value."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    site = None
    for fr in traceback.extract_tb(e.__traceback__):
        if fr.filename and not fr.filename.startswith(skip) and fr.lineno is not None:
            site = (fr.filename, fr.lineno, (fr.line or "").strip())
    return site


def _branch_fix(e: BaseException) -> str:
    site = _branch_site(e)
    where = f" (at {site[0]}:{site[1]}: {site[2]})" if site else ""
    near = "".join(linecache.getline(site[0], k) for k in range(max(1, site[1] - 3), site[1] + 1)) if site else ""
    if "layerdrop" in near.lower():  # Hugging Face's LayerDrop: `torch.rand([]) < config.layerdrop`, then `if`
        return (f"the model branches on a random number{where}: LayerDrop skips a layer for the whole batch "
                "when a draw is below config.layerdrop, a Python branch torch.export cannot capture. Fix: "
                "model.config.layerdrop = 0.0 (or build the model with layerdrop=0.0)")
    return (f"the model branches on tensor values (e.g. `if x.mean() > 0`){where}; such a branch can depend on "
            "other samples and cannot be analysed. Fix: compute both branches and select with torch.where, or "
            "torch.cond")


_HOST_DRAW = (
    "cannot capture {name} with torch.export: it draws random numbers outside torch's ops ({gens}), which run "
    "once, while the model is captured, so their outcome would be the same for every step. Hugging Face's speech "
    "models do so for SpecAugment (wav2vec2, HuBERT, WavLM, Data2VecAudio, SEW; Whisper with apply_spec_augment): "
    "set config.mask_time_prob = 0 and config.mask_feature_prob = 0 (or config.apply_spec_augment = False), or "
    "draw the masks in the data collator and pass mask_time_indices=; wav2vec2's adapter draws its LayerDrop so "
    "(config.layerdrop = 0). Fix: draw with torch ops (torch.rand, torch.bernoulli, dropout) or outside the model")


_CUSTOM_BACKWARD = (
    "{name}: the custom autograd.Function {fn} ({src}) has a backward that is not its forward's derivative "
    "({why}). A captured graph keeps the forward's ops and differentiates them, so the DP model would train on "
    "other gradients than your model's code defines. Fix: write the gradient you want with differentiable ops "
    "(a straight-through estimator: x + (torch.round(x) - x).detach(); gradient reversal by l: "
    "(1 + l) * x.detach() - l * x), or make the Function's backward the derivative of its forward")


def _checked_functions(model: nn.Module, example: Tuple[tuple, dict],
                       functions: List[Application]) -> List[Application]:
    """The custom autograd.Functions export traced through, checked on the example batch
    (``fxdp.utils.custom_backward``): a backward that is not the forward's derivative is refused."""
    if not functions:
        return []
    state = ModelState(model)
    try:
        checked = check_backwards(model, *example)
    finally:
        state.restore()
    for a in checked:
        if not a.same_gradient:
            why = a.reason or f"relative difference {a.difference:.2g} of the two vector-Jacobian products on this batch"
            err = UnsupportedModelError(_CUSTOM_BACKWARD.format(
                name=type(model).__name__, fn=a.name, src=f"at {a.source}" if a.source else "in the model", why=why))
            err.code, err.source = "autograd-function", a.source  # type: ignore[attr-defined]  # for fxdp.check
            raise err
    return checked


def _explain(e: Exception, model: nn.Module) -> UnsupportedModelError:
    text = str(e).strip()
    first = "\n".join(text.splitlines()[:8])
    name = type(model).__name__
    if "batch" in text and ("specializ" in text or "Constraints violated" in text):
        fix = ("the model's computation depends on the batch size (a branch on x.shape[0], or a size fixed to the "
               "batch), so one sample's output depends on how many others are in the batch. Fix: make forward "
               "independent of the batch size")
    elif "data-dependent" in text.lower() or "GuardOnDataDependent" in type(e).__name__:
        fix = _branch_fix(e)
    elif re.search(r"Found <class '[\w.]*Cache'> in output", text):
        fix = ("it returns a cache of past keys and values that torch.export cannot flatten (training does not "
               "read it). Fix: model.config.use_cache = False, or call it with use_cache=False")
    else:
        fix = ("torch.export cannot capture it. Fix: make forward exportable (see the torch.export docs), or "
               "privatize the submodules that hold the trainable parameters")
    return UnsupportedModelError(f"cannot capture {name} with torch.export: {fix}.\n  {type(e).__name__}: {first}")


def _register_output_types() -> None:
    """Let outputs holding tensors in objects pass through the graph: Hugging Face's
    ``DynamicCache`` (returned in training when ``use_cache`` is on, the default of
    GPT-2 and most decoders) becomes a pytree node, so the graph returns its tensors
    and the caller gets the cache object back."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except Exception:  # older or newer transformers without it: export names the type instead
        return
    try:
        register_dynamic_cache_export_support()
    except Exception:
        pass


def export_graph(
    model: nn.Module, args: tuple, kwargs: dict, batch_dims: List[Optional[int]]
) -> Tuple[fx.GraphModule, List[Tuple[int, Optional[int]]]]:
    """Export ``model(*args, **kwargs)`` (non-strict, training IR, dynamic batch).

    ``batch_dims``: the batch dimension of each flattened input leaf (``None``:
    none). Returns the unlifted graph module (parameters as ``get_attr`` of the
    model's own ``Parameter`` objects) and ``(placeholder index, batch dim)`` of
    the batched inputs."""
    flat, spec = tree_flatten((args, kwargs))
    ex_args, ex_kwargs = tree_unflatten(example_for_export(flat, batch_dims), spec)
    dims = {i: d for i, d in enumerate(batch_dims) if d is not None}
    _register_output_types()
    failure: Optional[Exception] = None
    with watch_draws(torch_too=True) as drew, watch_functions() as functions, opaque_quantized_linears(model):
        try:
            call = ModelCall(model)
            ex = (tuple(ex_args), dict(ex_kwargs))
            ep = torch.export.export(call, ex, dynamic_shapes=_dynamic_shapes(call, *ex, dims), strict=False)
        except UnsupportedModelError:
            raise
        except Exception as e:  # export errors come in many types
            failure = e
    if drew.names:  # whether export then failed or not: the draw is the cause to name
        raise UnsupportedModelError(_HOST_DRAW.format(name=type(model).__name__, gens=", ".join(drew.names))) \
            from failure
    if failure is not None:
        raise _explain(failure, model) from failure
    gm = ep.module()
    gm.meta["fxdp_custom_functions"] = _checked_functions(model, ex, functions)
    inline_grad_mode_blocks(gm)  # torch.no_grad() blocks as ops between grad-mode switches
    _annotate(gm)
    tensor_leaves = [i for i, t in enumerate(flat) if isinstance(t, Tensor)]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # placeholders follow the flattened inputs; non-tensor leaves are constants of the graph
    batched: List[Tuple[int, Optional[int]]] = []
    if len(phs) == len(flat):
        batched = [(i, batch_dims[i]) for i in range(len(flat)) if batch_dims[i] is not None]
        leaf_phs = list(enumerate(phs))
    else:
        k = 0
        for i in range(len(flat)):
            if i in tensor_leaves:
                if batch_dims[i] is not None:
                    batched.append((k, batch_dims[i]))
                k += 1
        leaf_phs = list(zip(tensor_leaves, phs))
    gm.meta["fxdp_pinned"] = _pinned_sizes(flat, batch_dims, leaf_phs)
    return gm, batched


def _pinned_sizes(flat: List[Any], batch_dims: List[Optional[int]],
                  leaf_phs: List[Tuple[int, fx.Node]]) -> List[Tuple[int, int, int]]:
    """``(leaf, dim, size)`` of the sizes asked to stay symbolic that the graph fixed: export
    specializes a size of 0 or 1 (a sequence of one token in the example) and any size the
    model's code fixes. The graph serves only inputs of those sizes (its guards refuse others):
    ``ExportedDPModule`` captures another graph for another size."""
    pinned = []
    for i, ph in leaf_phs:
        t, val = flat[i], ph.meta.get("val")
        if not isinstance(t, Tensor) or not isinstance(val, Tensor) or static_sizes(t, batch_dims[i]) is not None:
            continue
        pinned += [(i, d, n) for d, n in enumerate(val.shape) if d != batch_dims[i] and type(n) is int]
    return pinned


def symbolic_tracing_drops(root: nn.Module) -> Optional[str]:
    """What symbolic tracing would silently drop: forward hooks and pre-hooks (the
    traced graph calls submodules' ``forward``, not ``__call__``) and parametrizations
    (``weight_norm``, ``orthogonal``: the parameter becomes a computation); or the calls
    its graph could not take: a ``forward(..., **kwargs)`` traces to one placeholder for all
    keyword arguments, so ``model(x=...)`` finds no argument ``x`` (the calls Hugging Face
    models get). The ``torch.export`` graph keeps hooks and parametrizations as ordinary
    nodes and takes the call's own arguments."""
    from torch.nn.modules import module as module_mod
    from torch.nn.utils import parametrize

    try:
        params = inspect.signature(root.forward).parameters.values()
    except (TypeError, ValueError):  # no Python signature: nothing to tell
        params = []
    keywords = [p.name for p in params if p.kind is p.VAR_KEYWORD]
    if keywords:
        return f"forward(**{keywords[0]})"
    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return "global forward hooks"
    for name, m in root.named_modules():
        if any(not getattr(h, "fxdp_internal", False)
               for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())):
            return f"forward hooks on '{name}'"
        if parametrize.is_parametrized(m):
            return f"parametrizations on '{name}'"
    return None
