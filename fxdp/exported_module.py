"""ExportedDPModule: a privatized model captured with ``torch.export``.

Models that symbolic tracing cannot read (Hugging Face transformers, ``*args`` /
``**kwargs``, optional arguments, hooks) are captured with ``torch.export`` on
their first training call, once per input structure (which arguments are given,
their ranks and dtypes, the values of non-tensor arguments); the batch and, where
the model allows, sequence lengths are symbolic, so one graph serves every batch
size (0 and 1 included) and length. Each graph is instrumented by the same
capture pass as a traced model (``fxdp.passes.capture``), with batch dimensions
read from the symbolic shapes (``fxdp.passes.symbolic_batch``).

In eval mode, or without gradients, the model itself runs (dropout off, as the
user expects). ``state_dict`` keys and ``Parameter`` objects are the model's.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .capture import CaptureOp, Recorder
from .module import DPModule, adopt
from .passes.attention_masks import drop_all_true_masks
from .passes.batch_dims import input_batch_dim, per_arg
from .passes.batch_mixing.guard import mixing_refusal, serve_unsafe
from .passes.capture import CAPTURES, insert_captures
from .passes.export_graph import example_for_export, export_graph, static_sizes
from .errors import BatchDimensionError, where
from .passes.symbolic_batch import annotate_batch, batch_symbol, mixing_findings
from .passes.masked_rows import regroup_masked_rows
from .passes.per_sample_loss import rewrite_in_forward_losses
from .passes.probe_batch import probe_batch
from .utils.pytree import input_leaves, input_structure

__all__ = ["ExportedDPModule"]


class ExportedDPModule(DPModule):
    """A ``DPModule`` whose graphs come from ``torch.export`` (see the module docstring)."""

    def __init__(
        self,
        root: nn.Module,
        *,
        recorder: Recorder,
        batch_first: bool = True,
        input_batch_dims: Optional[Sequence[Optional[int]]] = None,
        class_name: str = "DPModule",
        rewrites: Optional[List[Any]] = None,
    ) -> None:
        graph = fx.Graph()
        graph.output(None)
        fx.GraphModule.__init__(self, nn.Module(), graph, class_name)
        adopt(self, root, {CAPTURES: nn.Module()})
        self.recorder = recorder
        self.batch_first = batch_first
        self.batch_dim: Any = list(input_batch_dims) if input_batch_dims is not None else (0 if batch_first else 1)
        self._plain_graph = graph
        self._class_name = class_name
        self.untraceable: Dict[str, str] = {}
        self.rewrites: List[Any] = list(rewrites or [])
        self._batch_dims_cache: Dict[tuple, Dict[str, Any]] = {}
        object.__setattr__(self, "_source_root", root)
        object.__setattr__(self, "_original_model", root)  # strip() gives back the model itself
        #: input structure -> (instrumented graph module, [(flat leaf index, batch dim)])
        object.__setattr__(self, "_graphs", {})
        # forward on the instance: GraphModule sets its (empty) graph's code on this instance's class
        self.__dict__["forward"] = self._run

    @property
    def capture_path(self) -> str:
        return "export"

    # -- inputs ---------------------------------------------------------------------
    def _leaf_batch_dims(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[Optional[int]]:
        return leaf_batch_dims(args, kwargs, self.batch_dim, 0 if self.batch_first else 1)

    @staticmethod
    def _key(args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: List[Optional[int]]) -> Tuple[tuple, List[Any]]:
        """``(key, flat)``: the graph cache key of these inputs and their flat leaves."""
        flat, structure = input_structure((args, kwargs))  # no reference cycle a step (tree_flatten's)
        leaves = []
        for t, d in zip(flat, dims):
            if isinstance(t, Tensor):
                leaves.append(("T", t.dtype, t.dim(), t.device.type, d, static_sizes(t, d)))
            else:
                leaves.append(("V", type(t).__name__, repr(t)))
        return (structure, tuple(leaves)), flat

    # -- capture ----------------------------------------------------------------------
    def _capture(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: List[Optional[int]]) -> tuple:
        gm = exported_graph(self._source_root, args, kwargs, dims, self.recorder.loss_reduction)
        _refuse_mixing(gm, self.allow_unsafe_model, tree_flatten((args, kwargs))[0], dims)
        captures = instrument(gm, self.recorder)
        # a graph serves the input structure of its key (``_key``): torch.export's check of the
        # structure on every call (a forward pre-hook) repeats it, leaving reference cycles a step
        gm.validate_inputs = False
        container = getattr(self, CAPTURES)
        prefix = f"g{len(self._graphs)}_" if self._graphs else ""
        for c in captures:
            container.add_module(prefix + c.capture_name, c)
        leaves = [i for i, d in enumerate(dims) if d is not None]
        if self.__dict__.get("_compile_options") is not None:  # DPModule.compile() ran before this graph
            self._compile_one(gm, captures)
        return gm, [(i, dims[i]) for i in leaves]

    def _compile_graph_code(self) -> None:
        for gm, _ in self._graphs.values():
            self._compile_one(gm, [m for m in gm.modules() if isinstance(m, CaptureOp)])

    def _compile_one(self, gm: fx.GraphModule, captures: List[CaptureOp]) -> None:
        for cap in captures:
            if "forward" not in cap.__dict__:
                cap.forward = torch._dynamo.disable(cap.forward)
        if "forward" not in gm.__dict__:
            gm.forward = torch.compile(gm.forward, **self.__dict__["_compile_options"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # nn.Module's call: this module's hooks, then forward (GraphModule's own call would skip them)
        return nn.Module.__call__(self, *args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """``forward``: the captured graph of these inputs' structure in training, the model
        itself otherwise."""
        if not (self.training and torch.is_grad_enabled()):
            return self._source_root(*args, **kwargs)
        dims = self._leaf_batch_dims(args, kwargs)
        key, flat = self._key(args, kwargs, dims)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args, kwargs, dims)
        pinned = entry[0].meta.get("fxdp_pinned")
        if pinned and any(flat[i].shape[d] != n for i, d, n in pinned):
            entry = self._graph_for_sizes(key, pinned, flat, args, kwargs, dims)
        gm, batched = entry
        B = flat[batched[0][0]].shape[batched[0][1]] if batched else None
        if B == 0:
            return self._empty_batch(gm, flat, tree_flatten((args, kwargs))[1], dims)
        self.recorder.begin_forward(B, {})
        return self._watch_loss(gm(tuple(args), kwargs), B)

    def _graph_for_sizes(self, key: tuple, pinned: List[Tuple[int, int, int]], flat: List[Any],
                         args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: List[Optional[int]]) -> tuple:
        """The graph of inputs whose sizes differ from those the graph of ``key`` fixed
        (``export_graph._pinned_sizes``: captured on a sequence of one token, say). A graph
        captured on these inputs that fixes none takes ``key`` (it serves every size, as
        one graph serves every batch size); the first moves to a key of its own sizes."""
        sized = (key, tuple(flat[i].shape[d] for i, d, _ in pinned))
        entry = self._graphs.get(sized)
        if entry is None:
            entry = self._capture(args, kwargs, dims)
            if entry[0].meta.get("fxdp_pinned"):
                self._graphs[sized] = entry
            else:
                self._graphs[(key, tuple(n for _, _, n in pinned))] = self._graphs[key]
                self._graphs[key] = entry
        return entry

    def _empty_batch(self, gm: fx.GraphModule, flat: List[Any], spec: Any, dims: List[Optional[int]]) -> Any:
        """An empty Poisson batch on a graph that cannot run on zero rows (a reshape
        with -1, as every attention does): run one placeholder sample and slice the
        outputs to zero rows. Its backward gives ``[0, *shape]`` per-sample gradients
        and no clipped contribution; the step adds noise only, as DP-SGD requires."""
        one_args, one_kwargs = tree_unflatten(example_for_export(flat, dims, rows=1), spec)
        self.recorder.begin_forward(1, {}, stand_in=True)
        out = gm(tuple(one_args), one_kwargs)
        hints = gm.meta["fxdp_output_batch"]
        leaves, out_spec = tree_flatten(out)
        if len(hints) != len(leaves):
            raise BatchDimensionError(f"{self._class_name}: cannot tell the batch dimension of the outputs of an "
                                      "empty batch. Fix: skip empty batches (they add noise only)")
        leaves = [t.narrow(h, 0, 0) if isinstance(t, Tensor) and isinstance(h, int) else t
                  for t, h in zip(leaves, hints)]
        return tree_unflatten(leaves, out_spec)

    def capture_example(self, *args: Any, **kwargs: Any) -> None:
        """Capture the graph for inputs like these now (instead of on the first call)."""
        dims = self._leaf_batch_dims(args, kwargs)
        key, _ = self._key(args, kwargs, dims)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args, kwargs, dims)

    @property
    def graphs(self) -> List[fx.GraphModule]:
        """The instrumented graphs captured so far, one per input structure."""
        return [g for g, _ in self._graphs.values()]

    def batch_dims_for(self, args: Tuple[Any, ...]) -> Dict[str, Any]:
        return {}  # static: every capture op carries its symbolic batch dimensions

    def _apply(self, fn: Any, *a: Any, **kw: Any) -> "ExportedDPModule":
        self.drop_graphs()
        return super()._apply(fn, *a, **kw)

    def drop_graphs(self) -> None:
        """Forget the captured graphs: ``.to()``/``.double()`` replace buffers, so the next
        call captures again rather than run graphs holding the old ones."""
        self._graphs.clear()
        for name in list(getattr(self, CAPTURES)._modules):
            delattr(getattr(self, CAPTURES), name)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "ExportedDPModule":
        raise TypeError("an ExportedDPModule cannot be deep-copied; privatize a copy of the model instead")


def leaf_batch_dims(args: Tuple[Any, ...], kwargs: Dict[str, Any], batch_dim: Any,
                    default: int) -> List[Optional[int]]:
    """The batch dimension of every flattened input leaf (positional inputs per
    ``batch_dim``, keyword inputs at ``default``; ``None`` for non-tensors)."""
    dims: List[Optional[int]] = []
    for arg, bd in zip(args, per_arg(args, batch_dim)):
        for t in input_leaves(arg):
            dims.append(input_batch_dim(t, bd) if isinstance(t, Tensor) else None)
    for t in input_leaves(kwargs):
        dims.append(input_batch_dim(t, default) if isinstance(t, Tensor) else None)
    return dims


def exported_graph(root: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                   dims: List[Optional[int]], loss_reduction: str = "mean") -> fx.GraphModule:
    """Capture (``torch.export``), drop the attention masks that attend everywhere
    (:mod:`fxdp.passes.attention_masks`), annotate batch dimensions, regroup masked rows per
    sample (:mod:`fxdp.passes.masked_rows`) and make a loss computed
    inside ``forward`` per-sample (:mod:`fxdp.passes.per_sample_loss`): the graph that
    ``fxdp.check`` analyses and :func:`instrument` turns into the DP graph."""
    gm, batched = export_graph(root, args, kwargs, dims)
    drop_all_true_masks(gm)
    s = batch_symbol(gm, batched)
    annotate_batch(gm, s)
    if regroup_masked_rows(gm, s):  # h[mask].view(B, -1, d): BART's and T5's classification heads
        annotate_batch(gm, s)
    if rewrite_in_forward_losses(gm, loss_reduction):
        annotate_batch(gm, s)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    gm.meta["fxdp_output_batch"] = [(a.meta.get("fxdp_batch") or [None])[0] if isinstance(a, fx.Node) else None
                                    for a in tree_flatten(out.args[0])[0]]
    return gm


def instrument(gm: fx.GraphModule, recorder: Recorder) -> List[CaptureOp]:
    """The capture pass on an exported graph; every capture op gets its symbolic
    batch hints and the model's own parameter names (without ``ModelCall``'s prefix)."""
    captures = insert_captures(gm, recorder)
    container = getattr(gm, CAPTURES)
    for c in captures:
        c.param_index = {i: name[len("model."):] if name.startswith("model.") else name
                         for i, name in c.param_index.items()}
    for n in gm.graph.nodes:
        name = n.meta.get("fxdp_capture")
        if name is None:
            continue
        cap: CaptureOp = getattr(container, name)
        ins = tuple((a.meta.get("fxdp_batch") or [None])[0] if isinstance(a, fx.Node) else None for a in n.args)
        cap.default_batch_dims = (ins, tuple(n.meta.get("fxdp_batch") or ()))
    return captures


def _refuse_mixing(gm: fx.GraphModule, allow_unsafe_model: bool, flat: List[Any],
                   dims: List[Optional[int]]) -> None:
    """Fail closed: an op through which samples can influence each other is an error
    (a warning with ``allow_unsafe_model``): by the batch dimensions' shapes
    (``symbolic_batch``), then by probing each op on this call's inputs (``probe_batch``)."""
    found = mixing_findings(gm) or probe_batch(gm, flat, dims)
    if not found:
        return
    lines = [f"  {where(n.meta.get('fxdp_module'), str(n.target), n.meta.get('fxdp_source'))}: {code}: {problem}"
             for n, code, problem in found]
    if allow_unsafe_model:
        serve_unsafe(lines)
        return
    if any("integrations/moe.py" in str(n.meta.get("fxdp_source")) for n, _, _ in found):
        raise mixing_refusal(lines, _MOE_FIX)
    raise mixing_refusal(lines)


#: Hugging Face's mixture-of-experts layers, by default, sort the whole batch's tokens by expert
_MOE_FIX = ("Fix: this mixture-of-experts layer groups the tokens of the whole batch by expert (a sort, then one "
            "matrix product per expert). Load the model with experts_implementation=\"batched_mm\" (e.g. "
            "AutoModelForCausalLM.from_config(config, experts_implementation=\"batched_mm\")): each token's "
            "chosen experts are applied to it alone, which fxdp serves exactly (its memory grows with the tokens "
            "times an expert's size: practical for small experts)")
