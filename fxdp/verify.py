"""fxdp.verify: dynamic checks that samples stay apart, and a per-sample
gradient cross-check for the first training step.

* :func:`verify` (``fxdp.verify(model, example_inputs)``): perturb one sample and
  confirm that every other sample's output and per-sample gradient
  (``d (w_i . y_i) / d theta`` inside the batch forward) are unchanged. It catches
  mixing that static analysis cannot see (code it could not trace, ops it was
  told to ignore). It is a test on given inputs, not a proof.
* :func:`cross_check`: a privatized model's ``p.grad_sample`` rows against the
  gradients of each sample run alone (batch of one) -- the definition of a
  per-sample gradient.
* :class:`FirstStepCrossCheck`: records the first training batch of a DPModule and
  runs :func:`cross_check` on it, for ``PrivacyEngine.make_private``.

``fxdp.verify`` is this module, and calling it calls :func:`verify`.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import PerSampleGradientError
from .example_inputs import call_inputs
from .model_state import ModelState
from .passes.batch_dims import BatchDims, batch_size, input_batch_dim, per_arg
from .passes.batch_mixing.ragged import Segmentation, one_bag, segmentation
from .passes.batch_mixing import small_model_threads
from .utils.host_rng import fork_rng

__all__ = ["verify", "cross_check", "FirstStepCrossCheck", "VerifyResult", "CrossCheckResult"]


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`."""

    ok: bool
    perturbed: List[int]
    max_output_change: float  # largest relative change of another sample's output
    max_grad_change: float  # largest relative change of another sample's per-sample gradient
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        head = (f"perturbed sample(s) {self.perturbed}: other samples' outputs changed by at most "
                f"{self.max_output_change:.3g} (relative), per-sample gradients by {self.max_grad_change:.3g}")
        if self.failures:
            more = len(self.failures) - 1
            head += "; " + self.failures[0] + (f" (and {more} more)" if more else "")
        return head

    def __str__(self) -> str:
        lines = [f"fxdp.verify: {'OK' if self.ok else 'FAILED'}: {self.summary()}"]
        lines += [f"  - {f}" for f in self.failures[1:]]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_failed(self) -> "VerifyResult":
        if not self.ok:
            raise PerSampleGradientError(
                f"samples influence each other: {self.summary()}. Fix: run fxdp.check(model, example_inputs) to "
                "find the op that mixes the batch (or bisect the model with fxdp.verify).")
        return self


@dataclass
class CrossCheckResult:
    """Outcome of :func:`cross_check`."""

    ok: bool
    samples: List[int]
    max_rel_error: Dict[str, float]
    failures: List[str] = field(default_factory=list)
    skipped: Optional[str] = None

    def __str__(self) -> str:
        if self.skipped:
            return f"fxdp cross-check skipped: {self.skipped}"
        worst = max(self.max_rel_error.values(), default=0.0)
        lines = [f"fxdp cross-check: {'OK' if self.ok else 'FAILED'}: samples {self.samples}, "
                 f"largest relative error {worst:.3g} over {len(self.max_rel_error)} parameters"]
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)

    def raise_if_failed(self) -> "CrossCheckResult":
        if not self.ok:
            raise PerSampleGradientError(
                "per-sample gradients differ from the gradients of each sample run alone:\n  "
                + "\n  ".join(self.failures)
                + "\nFix: the model mixes samples or a per-sample rule is wrong; run fxdp.check(model, "
                "example_inputs) and fxdp.verify(model, example_inputs) to find the op.")
        return self


# --- helpers ---------------------------------------------------------------------------------

def _batch(args: Sequence[Any], batch_dim: BatchDims) -> int:
    B = batch_size(list(args), batch_dim)
    if B is None:
        raise ValueError("inputs must contain at least one batched tensor")
    return B


def _narrow(args: Sequence[Any], batch_dim: BatchDims, i: int) -> Tuple[Any, ...]:
    """Sample ``i``'s inputs (``batch_dim``: one for every input, or one per positional
    input; flat inputs without one give bag ``i``'s rows, ``passes/batch_mixing/ragged.py``)."""
    dims = per_arg(args, batch_dim)
    seg = segmentation(args, dims)
    if isinstance(seg, Segmentation):
        args, dims = one_bag(args, seg, i), [None if k == seg.offsets else d for k, d in enumerate(dims)]

    def narrow(bd: Optional[int]) -> Callable[[Any], Any]:
        def f(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            d = input_batch_dim(t, bd)
            return t if d is None else t.narrow(d, i, 1)

        return f

    return tuple(tree_map(narrow(bd), a) for a, bd in zip(args, dims))


def _out_dim(o: Tensor, B: int, batch_dim: BatchDims, single: Optional[Tensor] = None) -> Optional[int]:
    """Batch dimension of an output: the dim of size B that has size 1 on one
    sample's output (``single``); by size alone when that cannot tell."""
    cands = [d for d, s in enumerate(o.shape) if s == B]
    if single is not None and B != 1 and single.dim() == o.dim():
        exact = [d for d in cands if single.shape[d] == 1
                 and all(single.shape[k] == o.shape[k] for k in range(o.dim()) if k != d)]
        cands = exact or cands  # e.g. a [B, B] output: one sample gives [1, 1]
    first = batch_dim if isinstance(batch_dim, int) else next((d for d in batch_dim if d is not None), 0)
    if first in cands:
        return first
    return cands[0] if cands else None


def _output_dims(run: Callable[[Tuple[Any, ...]], Any], args: Sequence[Any], batch_dim: BatchDims, B: int,
                 outs: List[Tensor], seed: int) -> List[Optional[int]]:
    """Batch dimension of each (floating) output, from a run (``run(inputs)``) on the first
    sample alone."""
    try:
        with torch.no_grad(), fork_rng(args):
            torch.manual_seed(seed)
            single = _flat_out(run(_narrow(args, batch_dim, 0)))
    except Exception:
        single = []
    if len(single) != len(outs):
        single = [None] * len(outs)  # type: ignore[list-item]
    return [_out_dim(o, B, batch_dim, s1) for o, s1 in zip(outs, single)]


def _perturb(args: Sequence[Any], batch_dim: int, j: int, gen: torch.Generator,
             vocab: Optional[int]) -> Tuple[Any, ...]:
    """Inputs with sample ``j`` changed: floats get noise, ints a different id, bools flip."""

    def f(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        d = input_batch_dim(t, batch_dim)
        if d is None or t.numel() == 0:
            return t
        t = t.clone()
        row = t.narrow(d, j, 1)
        if t.is_floating_point() or t.is_complex():
            scale = float(t.abs().max()) if t.numel() else 1.0
            row.add_(torch.randn(row.shape, generator=gen, dtype=torch.float64).to(row) * (scale + 1.0))
        elif t.dtype == torch.bool:
            row.logical_not_()
        else:
            hi = vocab if vocab is not None else int(t.max()) + 1
            if hi > 1:
                shift = torch.randint(1, hi, row.shape, generator=gen).to(row)
                row.copy_((row + shift) % hi)
        return t

    return tuple(tree_map(f, a) for a in args)


class _Quiet:
    """Make a DPModule behave like its plain graph (no capture, no recorder
    bookkeeping) and restore everything on exit; plain modules pass through."""

    def __init__(self, model: nn.Module, capture: bool = False) -> None:
        self.model = model
        self.capture = capture

    def __enter__(self) -> "_Quiet":
        self.state = ModelState(self.model)
        self.grads = [(p, p.grad, getattr(p, "grad_sample", None)) for p in self.model.parameters()]
        rec = getattr(self.model, "recorder", None)
        self.rec = None
        if rec is not None:
            # book-keeping records of the step are kept aside: the check materializes p.grad_sample
            self.rec = (rec, rec.generation, rec.batch_size, rec.batch_dims, dict(rec._owner), rec.bookkeeping)
            rec.bookkeeping = None
        caps = getattr(self.model, "captures", None) if not self.capture else None
        self.caps = [(c, c.training) for c in (caps or [])]
        for c, _ in self.caps:
            c.training = False
        return self

    def __exit__(self, *exc: Any) -> None:
        for c, flag in self.caps:
            c.training = flag
        for p, g, gs in self.grads:
            p.grad = g
            if gs is None:
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None
            else:
                p.grad_sample = gs
        if self.rec is not None:
            rec, gen, bs, bd, owner, bookkeeping = self.rec
            rec.generation, rec.batch_size, rec.batch_dims = gen, bs, bd
            rec._owner = owner
            rec.bookkeeping = bookkeeping
        self.state.restore()


def _flat_out(out: Any) -> List[Tensor]:
    return [o for o in tree_flatten(out)[0] if isinstance(o, Tensor) and (o.is_floating_point() or o.is_complex())]


def _default_tol(dtype: torch.dtype) -> Tuple[float, float]:
    return (1e-9, 1e-12) if dtype == torch.float64 else _half_tol(dtype, (1e-4, 1e-6))


def _half_tol(dtype: torch.dtype, tol: Tuple[float, float]) -> Tuple[float, float]:
    """``tol``, widened for a half-precision model to what its rounding allows: the batch and
    a sample alone sum in different orders, each rounding to ``eps`` (bfloat16: 2^-7) per
    operation, so their gradients differ by a few ``eps`` (a bfloat16 MLP: 0.3% of the
    gradient's scale, over the float32 tolerance); 2 ``eps`` still fails a mixing op."""
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        return max(tol[0], 2 * eps), tol[1]
    return tol


# --- verify ------------------------------------------------------------------------------------

def verify(
    model: nn.Module,
    example_inputs: Union[Tensor, Sequence[Any], Mapping[str, Any]],
    *,
    batch_first: bool = True,
    perturb: Optional[Sequence[int]] = None,
    gradients: bool = True,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    vocab: Optional[int] = None,
    seed: int = 0,
) -> VerifyResult:
    """Perturb one sample at a time; every other sample's output and per-sample
    gradient must stay unchanged.

    Args:
        model: a module (or a DPModule) in the mode it is trained in; it is not
            modified (buffers, gradients and RNG are restored).
        example_inputs: forward's inputs, with at least 2 samples: a tensor, a tuple of
            positional inputs, or a dict of keyword inputs (a Hugging Face batch).
        batch_first: ``False`` for ``[T, B, ...]`` inputs.
        perturb: indices of the samples to perturb (default: the first and last).
        gradients: also compare the other samples' per-sample gradients
            ``d (w_i . y_i) / d theta`` (``w`` fixed random weights), through their
            sum: one backward pass per run, and a change in any of them changes
            the sum almost surely.
        rtol, atol: tolerances relative to the output/gradient scale (default by
            dtype: 1e-9 for float64, 1e-4 for float32).
        vocab: range of integer inputs (token ids) for perturbation (default: max+1).
        seed: seeds the perturbation, the loss weights and the model's random ops
            (the same dropout masks in every run).
    """
    positional, kwargs = call_inputs(example_inputs)
    names, n_pos = list(kwargs), len(positional)
    args = positional + tuple(kwargs.values())  # perturbed as one tuple; keyword inputs passed by name

    def run(xs: Tuple[Any, ...]) -> Any:
        return model(*xs[:n_pos], **dict(zip(names, xs[n_pos:])))

    batch_dim = 0 if batch_first else 1
    B = _batch(args, batch_dim)
    if B < 2:
        raise ValueError("fxdp.verify needs at least 2 samples to compare")
    J = sorted({j % B for j in (perturb if perturb is not None else (0, B - 1))})
    gen = torch.Generator().manual_seed(seed)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if gradients else []
    failures: List[str] = []
    notes: List[str] = []
    max_out = max_grad = 0.0

    def forward(xs: Tuple[Any, ...]) -> Any:
        with fork_rng(xs):
            torch.manual_seed(seed)
            with torch.set_grad_enabled(bool(params)):
                return run(xs)

    with _Quiet(model), small_model_threads(model):
        base = forward(args)
        outs = _flat_out(base)
        dims = _output_dims(run, args, batch_dim, B, outs, seed)
        if not any(d is not None for d in dims):
            notes.append("no output has a batch dimension; only gradients are compared")
        dtype = outs[0].dtype if outs else torch.float32
        r_tol, a_tol = _default_tol(dtype)
        rtol = r_tol if rtol is None else rtol
        atol = a_tol if atol is None else atol
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]

        def others_grad(out: Any, j: int) -> List[Tensor]:
            """Gradient of sum_{i != j} w_i . y_i: unchanged iff (almost surely, w
            random) no other sample's per-sample gradient changed."""
            terms = []
            for o, w, d in zip(_flat_out(out), weights, dims):
                if d is None:
                    continue
                keep = torch.ones(o.shape[d], dtype=o.dtype, device=o.device)
                keep[j] = 0
                shape = [1] * o.dim()
                shape[d] = -1
                terms.append((o * w * keep.view(shape)).sum())
            if not terms or not params:
                return []
            g = torch.autograd.grad(sum(terms), [p for _, p in params], retain_graph=True, allow_unused=True)
            return [x if x is not None else torch.zeros_like(p) for x, (_, p) in zip(g, params)]

        for j in J:
            others = [i for i in range(B) if i != j]
            pert = forward(_perturb(args, batch_dim, j, gen, vocab))
            for k, (o0, o1, d) in enumerate(zip(outs, _flat_out(pert), dims)):
                if d is None or o0.shape != o1.shape:
                    continue
                scale = float(o0.detach().abs().max()) + 1e-30
                change = (o1 - o0).detach().abs()
                change = change.amax(dim=[x for x in range(change.dim()) if x != d]) if change.dim() > 1 else change
                for i in others:
                    diff = float(change[i])
                    max_out = max(max_out, diff / scale)
                    if diff > atol + rtol * scale:
                        failures.append(f"perturbing sample {j} changed output {k} of sample {i} by {diff:.3g} "
                                        f"(relative {diff / scale:.3g})")
            if params:
                for (name, _), a, b in zip(params, others_grad(base, j), others_grad(pert, j)):
                    diff = float((a - b).norm())
                    ref = float(a.norm()) + 1e-30
                    max_grad = max(max_grad, diff / ref)
                    if diff > atol + rtol * ref:
                        failures.append(f"perturbing sample {j} changed the per-sample gradients of {name} of the "
                                        f"other samples by {diff:.3g} (relative {diff / ref:.3g})")
    return VerifyResult(ok=not failures, perturbed=J, max_output_change=max_out, max_grad_change=max_grad,
                        failures=failures, notes=notes)


# --- cross-check of per-sample gradients -----------------------------------------------------------

def _linear_loss(out: Any, weights: List[Tensor], dims: List[Optional[int]], n: int, reduction: str,
                 i: Optional[int] = None) -> Tensor:
    terms = []
    for o, w, d in zip(_flat_out(out), weights, dims):
        if d is None:
            continue
        w = w if i is None else w.narrow(d, i, 1)
        terms.append((o * w).sum())
    if not terms:
        raise ValueError("no output has a batch dimension; pass loss_fn to cross_check")
    loss = sum(terms)
    return loss / n if reduction == "mean" else loss


def cross_check(
    dp_model: nn.Module,
    inputs: Union[Tensor, Sequence[Any]],
    targets: Sequence[Any] = (),
    loss_fn: Optional[Callable[..., Tensor]] = None,
    *,
    samples: int = 4,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    seed: int = 0,
    kwargs: Optional[Dict[str, Any]] = None,
) -> CrossCheckResult:
    """Compare a DPModule's ``p.grad_sample`` with batch-of-one gradients.

    Runs its own forward/backward on ``inputs`` (``loss_fn(output, *targets)``, or
    a fixed random linear function of the outputs, reduced like the model's
    ``loss_reduction``), then for up to ``samples`` samples the gradient of the
    same loss on that sample alone. ``nn.Dropout`` modules are switched off for
    both; a model that draws other random numbers is skipped. Everything the
    check touches (``grad``, ``grad_sample``, recorder state, buffers, RNG) is
    restored, so it can run in the middle of a training step. ``kwargs``: keyword inputs
    (a Hugging Face batch), batched along dimension 0 (1 with ``batch_first=False``).
    """
    from .module import DPModule

    if not isinstance(dp_model, DPModule):
        raise TypeError("cross_check expects a privatized model (fxdp.privatize / PrivacyEngine.make_private)")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    bd = dp_model.batch_dim
    keys, npos = list(kwargs or {}), len(args)
    if keys:  # keyword inputs ride as positional ones after the others, each at the keyword batch dimension
        args = args + tuple(kwargs[k] for k in keys)  # type: ignore[index]
        if not isinstance(bd, int):
            bd = list(bd) + [None] * (npos - len(bd)) + [0 if dp_model.batch_first else 1] * len(keys)

    def call(*xs: Any) -> Any:
        return dp_model(*xs[:npos], **dict(zip(keys, xs[npos:])))

    B = _batch(args, bd)
    if B == 0:
        return CrossCheckResult(True, [], {}, skipped="empty batch")
    reduction = dp_model.recorder.loss_reduction
    k = max(1, min(samples, B))
    chosen = sorted({round(i * (B - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]  # spread, both ends
    params = [(n, p) for n, p in dp_model.named_parameters() if p.requires_grad]
    drop = [m for m in dp_model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    flags = [m.training for m in drop]
    gen = torch.Generator().manual_seed(seed)
    failures: List[str] = []
    errs: Dict[str, float] = {}
    try:
        for m in drop:
            m.training = False
        with _Quiet(dp_model, capture=True), fork_rng(args):
            torch.manual_seed(seed)
            for _, p in params:
                p.grad = None
                p.grad_sample = None
            rng = torch.get_rng_state()
            with torch.enable_grad():
                out = call(*args)
            if not torch.equal(rng, torch.get_rng_state()):
                return CrossCheckResult(True, [], {}, skipped="the model draws random numbers outside nn.Dropout "
                                                              "modules, so batch and single-sample runs differ")
            outs = _flat_out(out)
            dims = _output_dims(lambda xs: call(*xs), args, bd, B, outs, seed)
            weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
            with torch.enable_grad():
                loss = loss_fn(out, *targets) if loss_fn is not None else _linear_loss(out, weights, dims, B, reduction)
                loss.backward()
            got = {n: p.grad_sample.detach().clone() for n, p in params if getattr(p, "grad_sample", None) is not None}
            dtype = outs[0].dtype if outs else torch.float32
            r_tol, a_tol = (1e-6, 1e-9) if dtype == torch.float64 else _half_tol(dtype, (1e-3, 1e-5))
            rtol = r_tol if rtol is None else rtol
            atol = a_tol if atol is None else atol
            with _Quiet(dp_model):  # plain ops, ordinary autograd
                for i in chosen:
                    xi = _narrow(args, bd, i)
                    with torch.enable_grad():
                        oi = call(*xi)
                        if loss_fn is not None:
                            ti = tuple(t.narrow(0, i, 1) if isinstance(t, Tensor) else t for t in targets)
                            li = loss_fn(oi, *ti)
                        else:
                            li = _linear_loss(oi, weights, dims, 1, reduction, i=i)
                        gi = torch.autograd.grad(li, [p for _, p in params], allow_unused=True)
                    for (name, p), ref in zip(params, gi):
                        ref = torch.zeros_like(p) if ref is None else ref
                        row = got.get(name)
                        if row is None:
                            if ref.abs().max() > 0:
                                failures.append(f"{name}: no grad_sample, but sample {i} alone has a nonzero gradient")
                            continue
                        if row.shape[0] != B:
                            failures.append(f"{name}: grad_sample has {row.shape[0]} rows for a batch of {B}")
                            continue
                        diff = float((row[i] - ref).norm())
                        scale = float(ref.norm())
                        errs[name] = max(errs.get(name, 0.0), diff / (scale + 1e-30))
                        if diff > atol + rtol * scale:
                            failures.append(f"{name}, sample {i}: |grad_sample - batch-of-one| = {diff:.3g} "
                                            f"(relative {diff / (scale + 1e-30):.3g})")
    finally:
        for m, f in zip(drop, flags):
            m.training = f
    return CrossCheckResult(ok=not failures, samples=chosen, max_rel_error=errs, failures=failures)


class FirstStepCrossCheck:
    """Cross-check the per-sample gradients of a DPModule's first training batch.

    Records (detached copies of) the inputs of the first forward in training mode
    with gradients enabled; :meth:`run` -- called once the first backward is done,
    e.g. in the optimizer's first step before clipping -- runs :func:`cross_check`
    on them and raises ``fxdp.PerSampleGradientError`` on a mismatch. The user's
    gradients are left as they were. Later calls do nothing.
    """

    def __init__(self, dp_model: nn.Module, *, samples: int = 4, rtol: Optional[float] = None,
                 atol: Optional[float] = None, raise_on_failure: bool = True) -> None:
        self.model = dp_model
        self.samples = samples
        self.rtol, self.atol = rtol, atol
        self.raise_on_failure = raise_on_failure
        self.inputs: Optional[Tuple[tuple, dict]] = None
        self.result: Optional[CrossCheckResult] = None
        self.done = False
        self._handle = dp_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inputs is None and module.training and torch.is_grad_enabled():
            copy = lambda t: t.detach().clone() if isinstance(t, Tensor) else t  # noqa: E731
            self.inputs = (tree_map(copy, tuple(args)), tree_map(copy, dict(kwargs)))
            self._handle.remove()

    def run(self) -> Optional[CrossCheckResult]:
        """Cross-check the recorded batch (once); None when nothing was recorded yet."""
        if self.done or self.inputs is None:
            return None
        self.done = True
        from .exported_module import ExportedDPModule

        args, kwargs = self.inputs
        self.inputs = None
        if kwargs and not isinstance(self.model, ExportedDPModule):  # the symbolic graph's inputs, in order
            args, kwargs = self.model._positional(args, kwargs), {}
        self.result = cross_check(self.model, args, samples=self.samples, rtol=self.rtol, atol=self.atol,
                                  kwargs=kwargs)
        if self.raise_on_failure:
            self.result.raise_if_failed()
        return self.result

    def close(self) -> None:
        self._handle.remove()
        self.inputs = None
        self.done = True


class _CallableModule(types.ModuleType):
    """``fxdp.verify(...)`` calls :func:`verify`; ``fxdp.verify.cross_check`` stays reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> VerifyResult:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
