"""Reference per-sample gradients: each sample run alone (batch of one), plain PyTorch."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import Tensor, nn


def batch_of_one_grads(
    model: nn.Module,
    inputs: Sequence[Tensor],
    loss_fn: Callable[..., Tensor],
    batch_dims: Sequence[int] | None = None,
) -> Dict[str, Tensor]:
    """``{param name: [B, *shape]}``: gradient of ``loss_fn(model(*inputs_i), i)`` for
    each sample i alone. ``loss_fn(output, i)`` returns sample i's loss term (a
    scalar) from the model's output on that sample alone. ``batch_dims[k]`` is the
    batch dimension of ``inputs[k]`` (default 0; ``None`` for a non-batched input).
    """
    batch_dims = list(batch_dims) if batch_dims is not None else [0] * len(inputs)
    B = next(t.shape[d] for t, d in zip(inputs, batch_dims) if d is not None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: torch.zeros((B,) + p.shape, dtype=p.dtype) for n, p in named}
    for i in range(B):
        xi = [t if d is None else t.narrow(d, i, 1) for t, d in zip(inputs, batch_dims)]
        loss = loss_fn(model(*xi), i)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), gr in zip(named, grads):
            if gr is not None:
                out[n][i] = gr
    return out


def assert_grad_samples_match(model: nn.Module, expected: Dict[str, Tensor], rtol: float = 1e-6, atol: float = 1e-9):
    """Every trainable parameter's ``grad_sample`` equals the batch-of-one gradients."""
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None, f"frozen {n} got grad_sample"
            continue
        gs = getattr(p, "grad_sample", None)
        if gs is None and p.grad is None:
            # not reached by the backward pass (e.g. used under torch.no_grad())
            assert not expected[n].any(), f"{n} has no grad_sample but a nonzero reference gradient"
            continue
        assert gs is not None, f"{n} has no grad_sample"
        exp = expected[n]
        assert gs.shape == exp.shape, f"{n}: shape {tuple(gs.shape)} != {tuple(exp.shape)}"
        torch.testing.assert_close(gs, exp, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# -- shared test helpers ---------------------------------------------------------------

import warnings  # noqa: E402
import zlib  # noqa: E402


def use_float64():
    """Float64 as the default dtype for a test; a module applies it to all its tests
    with ``_float64 = pytest.fixture(autouse=True)(use_float64)``."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


def quiet_privatize(model: nn.Module, **kw):
    """``fxdp.privatize`` without its fallback warnings (tests assert on behaviour)."""
    import fxdp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxdp.privatize(model, **kw)


def seed_of(*key) -> int:
    """A deterministic seed from a test case (``hash`` of str is salted per process)."""
    return zlib.crc32(repr(key).encode())


class FnModel(nn.Module):
    """A parameter holder whose forward calls ``fn(self, *inputs)``."""

    def __init__(self, fn, **params):
        super().__init__()
        for k, v in params.items():
            setattr(self, k, nn.Parameter(v.clone()))
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def sample_loss(out_i: Tensor, r_i: Tensor) -> Tensor:
    """A nonlinear per-sample loss term."""
    return (out_i * r_i).sum() + 0.3 * out_i.pow(2).sum()


def grad_output(out: Tensor, r: Tensor, scale: float) -> Tensor:
    """dL/d(out) for L = scale * sum_i sample_loss(out_i, r_i)."""
    loss = sum(sample_loss(out[i], r[i]) for i in range(out.shape[0])) * scale
    (g,) = torch.autograd.grad(loss, out)
    return g


def clipped_sums_materialized(dp, x, w, bounds, per_layer):
    """Reference clipped sums from materialized ``grad_sample`` (loss: mean of ``w * dp(x)``),
    flat (``bounds`` a float) or per layer (a list, one bound per trainable parameter)."""
    dp(x).mul(w).sum().div(x.shape[0]).backward()
    params = [p for p in dp.parameters() if p.requires_grad]
    gs = [p.grad_sample for p in params]
    if per_layer:
        fac = [(bounds[j] / (g.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1) for j, g in enumerate(gs)]
    else:
        tot = torch.stack([g.flatten(1).norm(dim=1) for g in gs], 1).norm(dim=1)
        fac = [(bounds / (tot + 1e-6)).clamp(max=1)] * len(gs)
    return [torch.einsum("b,b...->...", f, g) for f, g in zip(fac, gs)]


def bk_clipped_sums(dp, run: Callable[[], None], bounds, per_layer: bool = False) -> Dict[int, Tensor]:
    """Run ``run()`` (forward and backward of ``dp``, privatized with grad_sample_mode="bk")
    and clip what it recorded as a DP optimizer step with ``bounds`` would (a float, or one
    bound per trainable parameter): ``{id(p): clipped sum}``. Checks the records are freed."""
    from fxdp.optim.clip import Clipping

    params = [p for p in dp.parameters() if p.requires_grad]
    dp.bookkeeping.attached = True
    run()
    if per_layer:
        clipping = Clipping(bound=float(sum(c * c for c in bounds)) ** 0.5, per_parameter=tuple(bounds))
    else:
        clipping = Clipping(bound=float(bounds))
    sums = dp.bookkeeping.clip_and_sum(params, clipping).sums
    assert dp.bookkeeping.pending == [] and dp.bookkeeping.records == []  # activations freed once summed
    return {id(p): s for p, s in zip(params, sums)}
