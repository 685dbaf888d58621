"""Fallback capture op: per-sample gradients with ``torch.func`` (vmap over vjp).

Serves (1) leaf modules with trainable parameters and no registered rule, and
(2) raw ``nn.Parameter`` uses: the first op that combines batched data with a
parameter (``x + self.pos``, ``x * self.scale``, ``x @ self.W``,
``self.cls.expand(B, -1, -1)``), together with any parameter-only ops before it
(``self.W.t()``). For sample i it evaluates the op on sample i alone and pulls
sample i's output gradient back to the parameters (the definition of a
per-sample gradient, so it is exact for any op that does not mix samples). Ints
equal to the batch size (``B`` in ``expand(B, -1, -1)``) become 1 for the
single-sample evaluation.

``torch.vmap`` batches the per-sample evaluations; where an op has no batching
rule, a loop over samples gives the same result more slowly. Ops that draw random
numbers (dropout inside a fallback layer) are refused: re-evaluating them per
sample would not reproduce the forward pass's randomness; unless the layer reads
no batched input (a parameter-only subgraph repeated over the batch), whose one
draw every sample shares: it is replayed from the generator's state before the
forward (``vmap(randomness="same")``), and the outputs' check proves it each step.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .op import CaptureOp
from .record import LayerRecord
from ..errors import BatchDimensionError, PerSampleGradientError, UnsupportedOpError
from ..utils.host_rng import watch_draws

__all__ = ["FuncCapture"]

_warned: set = set()


class FuncCapture(CaptureOp):
    """Capture whose per-sample gradients come from ``torch.func``."""

    kind = "functorch"
    checks_outputs = True  # its inside is not analysed: prove independence on every batch
    #: a batch-major fold of dimension 0 (``w.repeat(B, 1, 1)``): one sample's rows are its block
    folds = True

    def __init__(self, *, fn: Callable[..., Any], description: str = "", **kw: Any) -> None:
        super().__init__(**kw)
        object.__setattr__(self, "fn", fn)  # may close over shared modules: not a submodule
        self.description = description

    def rule_name(self) -> str:
        return f"functorch fallback ({self.description})" if self.description else "functorch fallback"

    def compute(self, dyn: Sequence[Any]) -> Any:
        return self.fn(*dyn)

    def compute_for_capture(self, dyn: Sequence[Any]) -> Any:
        state = torch.random.get_rng_state()
        with watch_draws(torch_too=False) as host:  # NumPy's or Python's: never replayed per sample
            out = self.fn(*dyn)
        if host.names:
            raise UnsupportedOpError(
                f"{self.where()} draws random numbers with {', '.join(host.names)} inside a fallback layer; its "
                "per-sample recomputation would draw others. Fix: draw with torch ops (torch.rand, dropout) or "
                "outside the model (for Hugging Face's SpecAugment: config.mask_time_prob = 0, or masks passed "
                "as mask_time_indices=)."
            )
        if not torch.equal(state, torch.random.get_rng_state()):
            if self.draws_batch_free(dyn):
                # one draw every sample shares (DeBERTa's dropout on its relative embeddings),
                # replayed for each (``LayerRecord.rng_state``)
                self.__dict__["_rng_before"] = state
                return out
            raise UnsupportedOpError(
                f"{self.where()} draws random numbers (e.g. dropout) inside a fallback layer; its per-sample "
                "gradients cannot be recomputed exactly. Fix: set its dropout to 0, move the dropout out of "
                "this layer, or register a per-sample rule for it (docs/custom_rules.md)."
            )
        return out

    def draws_batch_free(self, dyn: Sequence[Any]) -> bool:
        """Whether the random numbers this op drew are drawn from no sample's data, so that
        every sample shares them: when it reads no batched input. (A random op that meets the
        batch, ``torch.normal(x, self.sigma)``, draws per sample: refused.)"""
        return all(i in self.param_index or i in self.buffer_index or not isinstance(x, Tensor)
                   for i, x in enumerate(dyn))

    def per_sample_grads(self, rec: LayerRecord) -> Dict[int, Tensor]:
        B = rec.batch_size
        dims_in, dims_out = self.resolve_batch_dims(rec)
        hints_in = rec.batch_dims[0]
        dyn = list(rec.inputs)
        for i, x in enumerate(dyn):
            if isinstance(x, Tensor) or i in self.param_index:
                continue
            hint = hints_in[i] if i < len(hints_in) else None
            if hint == "B":
                dyn[i] = 1
            elif hint not in (None, "unknown"):
                raise BatchDimensionError(
                    f"{self.where()} takes an argument derived from the batch size ({dyn[i]!r}) that is not the "
                    "batch size itself; per-sample gradients would be wrong. Fix: keep the batch dimension "
                    "separate (avoid folding it into other dimensions) around trainable parameters."
                )
        pidx = list(rec.params)
        bidx = [i for i, d in enumerate(dims_in) if d is not None]
        oidx = [j for j, g in enumerate(rec.grads) if g is not None]
        for j in oidx:
            if dims_out[j] is None:
                raise BatchDimensionError(
                    f"output {j} of {self.where()} has no batch dimension but receives a gradient: it mixes all "
                    "samples, so per-sample gradients are undefined."
                )
        if B == 0 or not oidx:
            n = B if B is not None else 0
            return {i: torch.zeros((n,) + tuple(rec.inputs[i].shape), dtype=rec.inputs[i].dtype) for i in pidx}

        def one(xs: Sequence[Tensor], gs: Sequence[Tensor]) -> tuple:
            d = list(dyn)
            for i, x in zip(bidx, xs):
                d[i] = x

            def f(*ps: Tensor) -> tuple:
                dd = list(d)
                for i, p in zip(pidx, ps):
                    dd[i] = p
                flat, _ = tree_flatten(self.fn(*dd))
                return tuple(flat[j] for j in oidx)

            outs, vjp = torch.func.vjp(f, *[rec.inputs[i] for i in pidx])
            return tuple(vjp(tuple(gs))) + tuple(outs)

        xs, xdims = zip(*[_per_sample(rec.inputs[i], dims_in[i], B) for i in bidx]) if bidx else ((), ())
        gs, gdims = zip(*[_per_sample(rec.grads[j], dims_out[j], B) for j in oidx])
        try:
            def vmapped(*args: Tensor) -> tuple:
                k = len(bidx)
                xs1 = [_one_sample(a, d) for a, d in zip(args[:k], xdims)]
                gs1 = [_one_sample(g, d) for g, d in zip(args[k:], gdims)]
                return one(xs1, gs1)

            in_dims = tuple(d if d is not None else 0 for d in xdims + gdims)
            with _replayed(rec.rng_state):  # each sample draws the forward's numbers again
                out = torch.func.vmap(vmapped, in_dims=in_dims,
                                      randomness="error" if rec.rng_state is None else "same")(*xs, *gs)
        except Exception as e:  # no batching rule for some op: loop over samples
            key = (self.capture_name, type(e).__name__)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"fxdp: {self.where()}: torch.vmap failed ({type(e).__name__}); computing per-sample "
                    "gradients of this fallback layer one sample at a time (exact, slower).",
                    stacklevel=2,
                )
            rows: List[tuple] = []
            for s in range(B):
                xs1 = [x[s] if d is None else x.narrow(d, s, 1) for x, d in zip(xs, xdims)]
                gs1 = [g[s] if d is None else g.narrow(d, s, 1) for g, d in zip(gs, gdims)]
                with _replayed(rec.rng_state):
                    rows.append(one(xs1, gs1))
            out = tuple(torch.stack([r[k] for r in rows]) for k in range(len(rows[0])))
        if rec.outputs is not None:
            self._check_independent(rec, out[len(pidx):], oidx, dims_out)
        return {i: o for i, o in zip(pidx, out)}

    def _check_independent(self, rec: LayerRecord, alone: Sequence[Tensor], oidx: List[int],
                           dims_out: List[Any]) -> None:
        """Each sample's output computed alone must equal its output in the batch:
        the proof, on this batch, that the unanalysed layer keeps samples apart."""
        for j, a in zip(oidx, alone):
            batched, d = _per_sample(rec.outputs[j], dims_out[j], rec.batch_size)
            if d is not None:
                batched = batched.movedim(d, 0)
                a = a.squeeze(d + 1)  # [B, ...]: the singleton batch of each evaluation
            if a.shape != batched.shape or not torch.allclose(a, batched, rtol=1e-5, atol=1e-6, equal_nan=True):
                diff = (a - batched).abs().flatten(1).amax(1) if a.shape == batched.shape else None
                who = f" (sample {int(diff.argmax())} differs by {float(diff.max()):.3g})" if diff is not None else ""
                raise PerSampleGradientError(
                    f"{self.where()}: its output for a sample computed alone differs from that sample's output in "
                    f"the batch{who}, so it mixes samples (or depends on the batch size) and its per-sample "
                    "gradients would not bound what one sample contributes. The step is refused. Fix: make this "
                    "part of the model traceable (fxdp.check shows the line), or remove the cross-sample "
                    "computation"
                )


def _per_sample(t: Tensor, dim: Any, B: int) -> tuple:
    """``(t, dim)`` for ``vmap`` over samples: a batch-major fold of dimension 0
    (``[B*k, ...]``) as ``[B, k, ...]`` with ``dim`` None (one sample's value is its
    ``[k, ...]`` block, the fold of a batch of one); otherwise as given."""
    if isinstance(dim, tuple):
        return t.reshape(B, t.shape[0] // B, *t.shape[1:]), None
    return t, dim


def _one_sample(t: Tensor, dim: Any) -> Tensor:
    """One sample's value inside ``vmap``: its batch dimension restored as size 1, or its
    block of a batch-major fold as is."""
    return t if dim is None else t.unsqueeze(dim)


@contextlib.contextmanager
def _replayed(state: Optional[Tensor]) -> Iterator[None]:
    """The CPU generator at ``state`` inside, as it was after (nothing when ``state`` is None)."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(state)
        yield
