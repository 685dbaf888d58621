"""Fail closed on the module-level graph: the analysis as a guard.

``fxdp.check`` reports what the batch-mixing analysis finds; a privatized model
must *refuse* it, or ``p.grad_sample[i]`` would silently depend on other samples
(``x - x.mean(0)``, a ``[T, B, d]`` tensor viewed as ``[B, T, d]``). ``DPModule``
runs :func:`refuse_mixing` once per input signature, on its first training call,
on its graph before the capture pass (the rewritten model's own ops).
"""
from __future__ import annotations

import linecache
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch.fx as fx
from torch import nn

from ...errors import BatchDimensionError, UnsupportedOpError, where
from ..batch_dims import BatchDims, batch_size
from .analysis import analyze_batch_mixing
from .report import MixingFinding, failed_run


__all__ = ["refuse_mixing", "mixing_refusal", "serve_unsafe", "suppressed", "SUPPRESS", "SOURCE_LINE"]

#: a source line carrying this comment accepts its findings (as in ``fxdp.check``)
SUPPRESS = "fxdp: ignore"
#: ``node.meta["fxdp_source"]``: "file:line: code"
SOURCE_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?:: (?P<code>.*))?$")

#: findings that say the analysis could not run or attribute an input, not that samples mix
UNPROVEN = ("batch-size", "batch-dimension", "unattributed-input", "unproven-op")

FIX = ("Fix: compute the loss outside the model, per sample (e.g. cross_entropy(..., reduction='sum' or 'mean' "
       "over the batch) and do not divide by a count over the batch, such as num_items_in_batch=), and keep "
       "every op within one sample (no batch statistics, no ops along the batch dimension).")


def suppressed(source: Optional[str]) -> bool:
    """Whether the user's source line (``"file:line: code"``) carries ``# fxdp: ignore``."""
    if not source:
        return False
    m = SOURCE_LINE.match(source)
    if m is None:
        return SUPPRESS in source
    return SUPPRESS in (m.group("code") or "") or SUPPRESS in linecache.getline(m.group("file"), int(m.group("line")))


def mixing_refusal(lines: List[str], fix: str = FIX) -> UnsupportedOpError:
    """The error for ops through which samples influence each other (one line each)."""
    more = f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else ""
    return UnsupportedOpError(
        "samples can influence each other in this model, so per-sample gradients (and the DP guarantee) break:\n"
        + "\n".join(lines[:5]) + more + "\n" + fix)


def serve_unsafe(lines: List[str]) -> None:
    """``allow_unsafe_model=True``: the warning that replaces :func:`mixing_refusal`."""
    warnings.warn("fxdp.privatize: allow_unsafe_model=True: serving a model in which samples can influence "
                  "each other; per-sample gradients and the DP guarantee do not hold:\n" + "\n".join(lines),
                  stacklevel=5)


def _line(f: MixingFinding) -> str:
    loc = where(f.node.meta.get("fxdp_module"), str(f.node.target), f.node.meta.get("fxdp_source"))
    return f"  {loc}: {f.code}: {f.problem} (fix: {f.fix})"


def refuse_mixing(gm: fx.GraphModule, args: Sequence[Any], *, batch_dim: BatchDims, untraceable: Dict[str, str],
                  root: nn.Module, allow_unsafe_model: bool = False) -> Optional[List[MixingFinding]]:
    """Run the analysis on ``gm`` with the real inputs ``args``; raise
    ``UnsupportedOpError`` on every error it finds (an op that mixes samples, one it
    could not process), except on source lines marked ``# fxdp: ignore``;
    ``allow_unsafe_model``: warn instead. A model the analysis cannot run at its batch
    sizes (5 and 7: a batch size fixed in the code) is not proven, so it is refused too
    (``report.failed_run``). Buffers are restored. Returns the errors, or None when the
    model does not run on ``args`` at all (nothing analysed: its call raises its own error)."""
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        result = analyze_batch_mixing(gm, args, batch_dim=batch_dim, untraceable=untraceable, root=root)
    finally:
        for b, v in saved:
            if b.shape == v.shape:
                b.data.copy_(v)
    findings = list(result.findings)
    if result.failed:
        failed = failed_run(gm, args, result.failed, batch_size(args, batch_dim), result.failed_at)
        if failed.code == "run-failed":  # fails on these inputs too: the call raises the model's own error
            return None
        findings.append(failed)
    errors = [f for f in findings if f.severity == "error" and not suppressed(f.node.meta.get("fxdp_source"))]
    lines = [_line(f) for f in errors]
    if not lines:
        return errors
    if allow_unsafe_model:
        serve_unsafe(lines)
        return errors
    if all(f.code in UNPROVEN for f in errors):  # nothing found mixing: nothing proven either
        if any(f.code == "batch-dimension" for f in errors):
            raise BatchDimensionError("fxdp cannot read the batch dimension of this call:\n" + "\n".join(lines))
        raise UnsupportedOpError("fxdp cannot prove that samples stay apart in this model, so it does not serve it "
                                 "(per-sample gradients and the DP guarantee would be unchecked):\n" + "\n".join(lines))
    raise mixing_refusal(lines)
