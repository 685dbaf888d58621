"""Prove an op without a transfer function by lowering it to ATen.

Symbolic tracing leaves some calls opaque to the tag table: ``torch.fft`` on
features, a helper kept whole with ``torch.fx.wrap``, a method fxdp does not list.
Such an op is captured here alone with ``torch.export`` (its real inputs, the
batch dimension of each read from its tags) and the ATen graph it lowers to is
read by the same batch rules as a model captured on the export path
(:mod:`fxdp.passes.batch_rules`, via ``symbolic_batch.mixing_findings``): every
ATen op must put each argument's batch on its output's batch dimension.

An input folded batch-major (``[B*k, ...]``, sample i's rows together, as the
analysis's tags show) is passed unflattened and flattened inside the captured
call, so the rules follow its rows. The verdict is ``proven`` (no finding),
``mixes`` (a rule finds samples combined: ``fft(x, dim=0)``, a flip of the batch)
or ``unproven`` (it does not export, an ATen op has no rule, an input's samples
are spread otherwise). The probe (``probe.py``) is evidence on one batch, never a proof:
an unproven op is refused (``transfer/generic.report_unknown``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .tags import NO, is_clean, uniform

if TYPE_CHECKING:
    from .analysis import BatchMixingAnalysis

__all__ = ["prove_by_lowering", "Verdict"]

#: ``(verdict, why)``: verdict ``"proven"``, ``"mixes"`` or ``"unproven"``
Verdict = Tuple[str, str]

#: findings of the ATen graph that show samples combined (``batch-rule``: an op fxdp cannot read;
#: ``batch-fold``: a folded batch whose order is not known)
_MIXING = ("batch-op", "batch-reduction", "batch-norm", "batch-index")


class _OpCall(nn.Module):
    """The op alone, as a module ``torch.export`` can capture. ``folds``: flat input leaf
    -> dimension of a batch-major fold, passed as ``[.., B, k, ..]`` and flattened back
    here, so the graph follows where each sample's rows are."""

    def __init__(self, call: Callable[..., Any], folds: Optional[Dict[int, int]] = None) -> None:
        super().__init__()
        self.call = call
        self.folds = dict(folds or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.folds:
            flat, spec = tree_flatten((args, kwargs))
            flat = [v.flatten(self.folds[i], self.folds[i] + 1) if i in self.folds else v for i, v in enumerate(flat)]
            args, kwargs = tree_unflatten(flat, spec)
        return self.call(*args, **kwargs)


def _callable(an: "BatchMixingAnalysis", n: fx.Node) -> Callable[..., Any]:
    """The op of ``n``: a function, a method of its first argument, or a leaf module
    (registered in :class:`_OpCall`, so its parameters are constants of the graph)."""
    if n.op == "call_module":
        return an.submodule(n)
    if n.op == "call_method":
        name = str(n.target)
        return lambda obj, *a, **kw: getattr(obj, name)(*a, **kw)
    return n.target


def _batch_dim(v: Tensor, t: Any, b: int) -> Tuple[bool, Optional[int], int]:
    """``(readable, dim, k)``: the dimension that holds the samples of value ``v`` by its
    tags ``t`` (``None``: it holds none), ``k`` rows a sample along it (``k > 1``: a
    batch-major fold ``[B*k, ...]``, sample i's rows ``i*k .. i*k+k-1``); unreadable when no
    single dimension does (samples combined, several dimensions of the batch's size, a
    fold of another order)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(v.shape):
        return False, None, 1
    if uniform(t) == NO:
        return True, None, 1
    dims = [d for d in range(v.dim()) if v.shape[d] == b and is_clean(t, d, b)]
    if len(dims) == 1:
        return True, dims[0], 1
    if dims:
        return False, None, 1
    for d in range(v.dim()):
        k = v.shape[d] // b
        if k > 1 and v.shape[d] == b * k:
            rows = torch.arange(1, b + 1).repeat_interleave(k)
            view = [1] * v.dim()
            view[d] = -1
            own = rows.view(view).expand(v.shape)
            if bool(((t == own) | (t == NO)).all()):
                return True, d, k
    return False, None, 1


def _key(n: fx.Node, vals: List[Any], dims: List[Optional[int]]) -> Optional[tuple]:
    """One verdict per op and input signature (a helper called in every block; a leaf
    module per instance, its own weights)."""
    try:
        leaves = tuple((tuple(v.shape), v.dtype, d) if isinstance(v, Tensor) else v for v, d in zip(vals, dims))
        key = (n.op, n.target, leaves)
        hash(key)
        return key
    except TypeError:
        return None


def _plain(v: Any) -> Any:
    """fx's immutable lists and dicts as plain ones (torch.export recurses on them)."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if type(v) is tuple:
        return tuple(_plain(x) for x in v)
    return v


def prove_by_lowering(an: "BatchMixingAnalysis", n: fx.Node) -> Verdict:
    """Whether op ``n`` keeps samples apart, read from the ATen graph it exports to."""
    from ..export_graph import export_graph
    from ..symbolic_batch import annotate_batch, batch_symbol, mixing_findings

    if n.op not in ("call_function", "call_method", "call_module"):
        return "unproven", f"a {n.op} node is not lowered"
    vals, spec = tree_flatten((an.V(n.args), an.V(n.kwargs)))
    tags = tree_flatten((an.tag(n.args), an.tag(n.kwargs)))[0]
    if len(tags) != len(vals):
        return "unproven", "its arguments could not be matched to their tags"
    dims: List[Optional[int]] = []
    folds: Dict[int, int] = {}
    inputs: List[Any] = []
    for i, (v, t) in enumerate(zip(vals, tags)):
        readable, d, k = _batch_dim(v, t, an.b1) if isinstance(v, Tensor) else (True, None, 1)
        if not readable:
            return "unproven", "an argument's samples are not along one dimension of the batch's size"
        dims.append(d)
        if isinstance(v, Tensor):
            v = v.detach().clone()
            if k > 1:  # [.., B*k, ..] as [.., B, k, ..]: the batch a dimension of its own
                v, folds[i] = v.unflatten(d, (an.b1, k)), d
        inputs.append(v)
    if not any(d is not None for d in dims):
        return "unproven", "no argument holds samples along a dimension"
    key = _key(n, vals, dims)
    cache: Dict[Any, Verdict] = an.lowered
    if key is not None and key in cache:
        return cache[key]
    args, kwargs = _plain(tree_unflatten(inputs, spec))
    op = _callable(an, n)
    state = [(b, b.detach().clone()) for b in op.buffers()] if isinstance(op, nn.Module) else []
    try:
        with _quiet(), torch.random.fork_rng():
            gm, batched = export_graph(_OpCall(op, folds), tuple(args), dict(kwargs), dims)
            annotate_batch(gm, batch_symbol(gm, batched))
            found = mixing_findings(gm)
    except Exception as e:  # it does not export: nothing read
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        verdict: Verdict = ("unproven", f"it does not lower to ATen with torch.export ({type(e).__name__}: {why})")
    else:
        mixing = [(m, code, problem) for m, code, problem in found if code in _MIXING]
        if mixing:
            m, code, problem = mixing[0]
            verdict = ("mixes", f"its ATen op {m.target}: {code}: {problem}")
        elif found:
            m, code, problem = found[0]
            verdict = ("unproven", f"its ATen op {m.target}: {problem}")
        else:
            verdict = ("proven", "")
    finally:
        with torch.no_grad():
            for b, v in state:  # a leaf's buffers as they were (the analysis tracks its state updates)
                b.copy_(v)
    if key is not None:
        cache[key] = verdict
    return verdict


@contextlib.contextmanager
def _quiet() -> Any:
    """torch.export's warnings and logs about the op are not the user's concern here."""
    log = logging.getLogger("torch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
