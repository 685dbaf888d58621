"""Reporting of the batch-mixing analysis: the findings and the result it returns,
and the user-facing explanation (code, problem, fix) of a node that mixes samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten
from torch import Tensor, nn
from torch.nn.modules import batchnorm, rnn

from ...utils.host_rng import fork_rng
from .ops import _FUNCS, _REDUCTIONS, _family, _hashable, op_name
from .tags import MIX, NO, _is_fold, _is_int, const, fmt_hint, uniform
from .transfer.reduction import reduce_dims

if TYPE_CHECKING:
    from .analysis import BatchMixingAnalysis


@dataclass
class MixingFinding:
    """One problem found at a node (before user-facing formatting)."""

    node: fx.Node
    code: str  # e.g. "batch-reduction", "batch-norm", "state-update", "unknown-op"
    severity: str  # "error", "warning" or "info"
    problem: str
    fix: str
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MixingResult:
    findings: List[MixingFinding]
    hints: Dict[str, List[Any]]  # node name -> batch hint per flattened value
    shapes: Dict[str, List[Any]]  # node name -> shapes at batch size b1
    batch_size: int  # b1
    fold_origin: Dict[str, str]
    failed: Optional[str] = None  # why the analysis could not run
    failed_at: Optional[str] = None  # the node it failed at


def failed_run(gm: fx.GraphModule, args: Sequence[Any], why: str, B0: Optional[int],
               at: Optional[str] = None) -> MixingFinding:
    """The error for a model the analysis could not run at its batch sizes (``why``, at
    node ``at``): nothing is proven (fail closed). Code ``"run-failed"`` when it fails on
    ``args`` (batch size ``B0``) too; ``"batch-size"`` when a node passes ``B0`` as a
    literal (a batch size fixed in the code, located there); else ``"batch-dimension"``
    (an input whose batch dimension is not where it is read)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None) or next(iter(gm.graph.nodes))
    try:
        with torch.no_grad(), fork_rng(args):
            fx.Interpreter(gm).run(*args)  # not gm(*args): GraphModule prints failures to stderr
    except Exception:
        return MixingFinding(first, "run-failed", "error", f"the model fails on the example inputs ({why})",
                             "check the example input shapes and dtypes (--input-shape/--dtype on the command line)")
    fixed = next((n for n in gm.graph.nodes if n.op != "placeholder" and B0 is not None and B0 > 1 and any(
        type(v) is int and v == B0 for v in tree_flatten((n.args, n.kwargs))[0])), None)
    if fixed is not None:
        return MixingFinding(
            fixed, "batch-size", "error",
            f"the model runs on this batch (size {B0}) but fails at other batch sizes ({why}): it hard-codes the "
            "batch size, and DP-SGD's Poisson sampling gives every step a different one",
            "use the runtime batch size (`x.shape[0]`, `x.view(x.shape[0], -1)`) instead of a constant")
    return MixingFinding(
        nodes.get(at or "", first), "batch-dimension", "error",
        f"the model runs on this batch (size {B0}) but fails when the batch dimension changes ({why}): an input "
        "has no batch dimension where fxdp reads one, so per-sample gradients cannot be attributed",
        "pass a single sample with its batch dimension (`x.unsqueeze(0)`); batch_first=False for [T, B, ...] "
        "inputs; input_batch_dims for inputs without a batch dimension (flat indices next to their offsets)")


def _arg_dims(a: "BatchMixingAnalysis", n: fx.Node) -> Optional[List[int]]:
    if n.op == "call_method":
        name = str(n.target).rstrip("_")
    else:
        name = _FUNCS.get(n.target) if _hashable(n.target) else None
    x = next((i for i in n.all_input_nodes if isinstance(a.env.get(i), Tensor)), None)
    if name not in _REDUCTIONS or x is None:
        return None
    try:
        return reduce_dims(a, n, name, a.tags.get(x, const(a.env[x].shape)))
    except Exception:
        return None


def _layout(a: "BatchMixingAnalysis", n: fx.Node) -> Optional[Tuple[str, bool]]:
    """(path, batch_first) of the innermost module with a ``batch_first`` flag around ``n``."""
    path = str(n.meta.get("fxdp_module") or "")
    while path:
        m = a.root_modules.get(path)
        bf = getattr(m, "batch_first", None) if m is not None else None
        if isinstance(bf, bool):
            return path, bf
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None


def _layout_hint(a: "BatchMixingAnalysis", n: fx.Node) -> str:
    """'set batch_first' advice when the op runs inside a module with that flag."""
    lay = _layout(a, n)
    if lay is None:
        return ""
    path, bf = lay
    return (f"`{path}` has batch_first={bf}: if its inputs are {'[T, B, ...]' if bf else '[B, T, ...]'}, pass "
            f"batch_first={not bf}; otherwise ")


class _Case(NamedTuple):
    """What the explanation of a mixing node starts from."""

    a: "BatchMixingAnalysis"
    n: fx.Node
    fam: str  # the node's op family (``ops._family``)
    bd: Optional[int]  # the first batch dim of its inputs
    what: str  # the op's user-facing name
    h: Any  # the batch hint of the first unclean output
    t: Tensor  # its tags
    out_desc: str  # the hint, in words


def _describe_module(c: _Case) -> tuple:
    a, n, bd, out_desc = c.a, c.n, c.bd, c.out_desc
    m = a.submodule(n)
    if isinstance(m, batchnorm._BatchNorm):
        frozen = not any(p.requires_grad for p in m.parameters())
        if frozen:
            return ("batch-norm",
                    f"{type(m).__name__} `{n.target}` is frozen but in train mode: it still normalizes with the "
                    "statistics of the whole batch (and updates its running statistics), so every sample's "
                    "output depends on all the others; privatize's default GroupNorm replacement is no fix "
                    "for a frozen layer (its parameters cannot adapt)",
                    f"call `model.{n.target}.eval()` after `model.train()` and pass "
                    "rewrite_options={'batchnorm': 'freeze'} to fxdp.privatize (constant running statistics; DP "
                    "only if they come from public data), or unfreeze it so the GroupNorm replacement trains",
                    {})
        return ("batch-norm",
                f"{type(m).__name__} `{n.target}` normalizes with the statistics of the whole batch in train mode, "
                "so every sample's output depends on all the others (and its running statistics leak the batch)",
                "let fxdp.privatize replace it (rewrite_options={'batchnorm': 'groupnorm'}, the default), or "
                "replace it with nn.GroupNorm / nn.LayerNorm yourself", {})
    if isinstance(m, (rnn.RNNBase, nn.MultiheadAttention)) or "Transformer" in type(m).__name__:
        bf = getattr(m, "batch_first", None)
        return ("batch-layout",
                f"{type(m).__name__} `{n.target}` (batch_first={bf}) runs over the dimension that holds the "
                f"batch (input has {fmt_hint(bd)}): it treats samples as time steps or features and mixes them",
                f"pass batch_first={not bf} to match the data layout, or transpose the input")
    flat = a.V(n.args[0]) if n.args else None
    if isinstance(m, nn.EmbeddingBag) and isinstance(flat, Tensor) and flat.dim() == 1:
        return ("batch-mixing",
                f"{type(m).__name__} `{n.target}` takes flat indices read as a batch: each bag mixes the rows of "
                f"several of them (output {out_desc})",
                "flat indices beside offsets have no batch dimension: pass input_batch_dims=[None, 0] "
                "(fxdp.privatize, make_private, fxdp.check), so each bag is one sample")
    return ("batch-mixing",
            f"{type(m).__name__} `{n.target}` mixes samples (output {out_desc})",
            "keep the batch dimension separate, or run fxdp.verify to see which samples influence each other")


def _describe_batch_norm(c: _Case) -> tuple:
    what = c.what
    return ("batch-norm",
            f"{what} with training=True normalizes with statistics of the whole batch, so every sample's output "
            "depends on all the others",
            "use F.group_norm / F.layer_norm (statistics per sample), or pass training=False with running "
            "statistics computed outside training")


def _describe_reduction(c: _Case) -> tuple:  # reductions, scans, sorts
    a, n, fam, bd, what, out_desc = c.a, c.n, c.fam, c.bd, c.what, c.out_desc
    dims = _arg_dims(a, n)
    over = "all dimensions" if dims is None else f"dim {dims[0] if len(dims) == 1 else dims}"
    batch_in = bd is not None and (dims is None or bd in dims)
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", what)
    linear = name.rstrip("_") in ("sum", "mean", "nansum", "nanmean")
    verb = {"reduction": "reduces over", "scan": "accumulates along", "sort": "sorts/selects along"}[fam]
    if batch_in:
        problem = (f"{what} {verb} {over}, which includes the batch dimension ({bd}): the result combines "
                   "all samples" + (", so every sample's output depends on the others" if fam == "reduction"
                                     else ", so each sample's result depends on other samples"))
    else:
        problem = f"{what} {verb} {over} and mixes samples (output {out_desc})"
    base = name.rstrip("_")
    normalizer = base in ("softmax", "log_softmax", "softmin", "normalize", "glu", "gumbel_softmax")
    fix = {"reduction": ("normalize over a per-sample dimension instead (e.g. dim=1 for attention weights "
                         "over the time steps of a [B, T, 1] tensor, or dim=-1)") if normalizer else
                        "reduce over per-sample dimensions instead (e.g. `x - x.mean(-1, keepdim=True)`, "
                        "nn.LayerNorm or nn.GroupNorm); a statistic of the whole batch couples the samples",
           "scan": "apply it along a per-sample dimension (e.g. dim=-1), never across the batch",
           "sort": "sort/select along a per-sample dimension (e.g. dim=-1), never across the batch"}[fam]
    code = "batch-reduction" if fam == "reduction" else f"batch-{fam}"
    return code, problem, fix, {"linear": linear and fam == "reduction", "what": what}


def _describe_matmul(c: _Case) -> tuple:
    a, n, bd, what = c.a, c.n, c.bd, c.what
    return ("batch-matmul",
            f"{what} contracts the batch dimension ({fmt_hint(bd)} of an operand): each output element sums "
            "over all samples (e.g. a similarity matrix `x @ x.T` across the batch)",
            _layout_hint(a, n) + "contract a per-sample dimension instead (e.g. `x @ W` or torch.bmm over "
            "[B, n, k] x [B, k, m]); objectives that compare samples within a batch cannot be trained with "
            "DP-SGD")


def _describe_cat(c: _Case) -> tuple:
    what, out_desc = c.what, c.out_desc
    return ("batch-cat",
            f"{what} joins batch rows with other data along the batch dimension (output {out_desc}): samples "
            "no longer sit one per row",
            "concatenate along a feature dimension (e.g. dim=-1), or keep the extra rows out of the batch")


def _describe_index(c: _Case) -> tuple:  # getitem, index functions, setitem
    a, n, fam, bd, what = c.a, c.n, c.fam, c.bd, c.what
    data_idx = any(uniform(a.tags.get(i, const(()))) not in (NO, None) for i in n.all_input_nodes[1:])
    if data_idx and fam != "setitem":
        problem = (f"{what} indexes with values computed from the data across the batch dimension: which "
                   "rows a sample gets depends on other samples")
    elif fam == "setitem":
        problem = f"{what} writes values of other samples into a sample's rows (or mixes the batch)"
    else:
        problem = (f"{what} selects or moves rows along the batch dimension ({fmt_hint(bd)}; e.g. `x[0]`, "
                   "`x[1:]`, `x[perm]`): a sample's result comes from other samples")
    return ("batch-index", problem,
            "index per sample (`x[:, ...]`, gather along a feature dimension) and keep every sample in its own "
            "row; select samples outside the model (in the data loader)")


def _describe_reorder(c: _Case) -> tuple:
    bd, what = c.bd, c.what
    return ("batch-index",
            f"{what} reorders the batch dimension ({fmt_hint(bd)}): each position now holds another sample",
            "flip/roll along a per-sample dimension (e.g. dims=[-1])")


def _describe_reshape(c: _Case) -> tuple:
    h, what, out_desc = c.h, c.what, c.out_desc
    if _is_int(h):
        return ("batch-fold",
                f"{what} unfolds a folded batch in an order that mixes samples (e.g. a [T*B] tensor viewed as "
                "[B, T]): rows of one sample now hold another sample's values",
                "undo the fold in the order it was made, e.g. `x.view(T, B, D).transpose(0, 1)` for a "
                "`x.transpose(0, 1).reshape(T * B, D)` fold")
    return ("batch-fold",
            f"{what} merges the batch dimension with other data (output {out_desc}): samples are no longer "
            "separable",
            "keep the batch dimension separate: fold it only together with per-sample dims in the leading "
            "position (`x.reshape(B * T, D)`), and unfold it the same way")


def _describe_loss(c: _Case) -> tuple:
    what = c.what
    return ("batch-reduction",
            f"{what} reduces the per-sample losses over the batch and the result is used per sample",
            "compute the loss outside the model", {"linear": True, "what": what})


def _describe_other(c: _Case) -> tuple:
    """Inside a module with a ``batch_first`` flag: the layout; else the generic explanation."""
    a, n, fam, what, out_desc = c.a, c.n, c.fam, c.what, c.out_desc
    mixed = bool((c.t == MIX).any())
    lay = _layout(a, n)
    if lay is not None and fam in ("other", "module"):
        path, bf = lay
        return ("batch-layout",
                f"{what} inside `{path}` (batch_first={bf}) mixes samples (output {out_desc}): the layer runs over "
                "the dimension that holds the batch, treating samples as time steps or features",
                _layout_hint(a, n) + "transpose the input so the batch sits where the layer expects it")
    return ("batch-mixing",
            f"{what} combines values of different samples (output {out_desc}"
            + ("; e.g. broadcasting a [B, 1, D] against a [B, D] tensor pairs every sample with every other)"
               if mixed else ")"),
            "make every operand of this op hold the same sample in the same row (check the broadcast shapes)")


#: op family (``ops._family``) -> its explanation; others: ``_describe_other``
_DESCRIBE: Dict[str, Callable[[_Case], tuple]] = {
    "module": _describe_module,
    "batch_norm": _describe_batch_norm,
    **{k: _describe_reduction for k in ("reduction", "scan", "sort")},
    "matmul": _describe_matmul,
    "cat": _describe_cat,
    **{k: _describe_index for k in ("getitem", "index", "setitem")},
    "reorder": _describe_reorder,
    "reshape": _describe_reshape,
    "loss": _describe_loss,
}


def describe_mixing(
    a: "BatchMixingAnalysis", n: fx.Node, bad: List[Tuple[int, Any, Tensor]]
) -> tuple:
    """(code, problem, fix[, details]) for a node whose clean inputs give an unclean output."""
    fam = _family(n)
    ins = [i for i in n.all_input_nodes if isinstance(a.env.get(i), Tensor)]
    in_hints = [a.hint(i) for i in ins]
    bdims = sorted({h for h in in_hints if _is_int(h)})
    bd = bdims[0] if bdims else None
    _, h, t = bad[0]
    case = _Case(a, n, fam, bd, op_name(n), h, t, fmt_hint(h))
    return _DESCRIBE.get(fam, _describe_other)(case)


def demote_loss_reductions(findings: List[MixingFinding], hints: Dict[str, List[Any]]) -> None:
    """A sum/mean over the batch whose result only reaches the output (the loss
    computed inside the model) is a warning, not an error."""
    for f in findings:
        if f.code != "batch-reduction" or f.severity != "error" or not f.details.get("linear"):
            continue
        seen, stack, reaches_out, batched_after = set(), list(f.node.users), False, False
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                reaches_out = True
                continue
            if any(_is_int(h) or _is_fold(h) for h in hints.get(u.name, [])):
                batched_after = True
                break
            stack.extend(u.users)
        if reaches_out and not batched_after:
            f.severity = "warning"
            f.code = "loss-in-model"
            f.problem = (f"{f.details.get('what', op_name(f.node))} reduces over the batch at the end of the "
                         "model: valid only if this is the training loss (a plain sum or mean of per-sample "
                         "terms)")
            f.fix = ("return per-sample outputs and reduce in the loss outside the model; set "
                     "loss_reduction='sum' or 'mean' to match")
