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

import inspect  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402


def quiet_privatize(model: nn.Module, **kw):
    """``fxdp.privatize`` without its fallback warnings (tests assert on behaviour)."""
    import fxdp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxdp.privatize(model, **kw)


def line_of(obj, marker: str) -> int:
    """Line number of the first source line of ``obj`` that contains ``marker``."""
    lines, start = inspect.getsourcelines(obj)
    return next(start + i for i, line in enumerate(lines) if marker in line)


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


# -- privatize a model and compare its grad_sample with the batch-of-one reference ---------------


def check_privatized(model, x, *, reduction="mean", batch_first=True, in_dim=0, out_dim=None, seed=0, capture="auto"):
    """privatize(model); loss = weighted sum of outputs (mean or sum over the batch);
    compare every grad_sample with the batch-of-one reference."""
    out_dim = in_dim if out_dim is None else out_dim
    dp = quiet_privatize(model, loss_reduction=reduction, batch_first=batch_first, capture=capture)
    out = dp(x)
    ref = model(x)
    o = out[0] if isinstance(out, tuple) else out
    r = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(o, r, rtol=0, atol=1e-10)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o.shape, generator=gen)
    B = x.shape[in_dim]
    loss = (o * w).sum()
    if reduction == "mean":
        loss = loss / B
    loss.backward()

    def sample_loss(oi, i):
        oi = oi[0] if isinstance(oi, tuple) else oi
        return (oi * w.narrow(out_dim, i, 1)).sum()

    expected = batch_of_one_grads(model, [x], sample_loss, [in_dim])
    assert_grad_samples_match(dp, expected)
    # p.grad keeps its usual meaning
    scale = 1.0 / B if reduction == "mean" else 1.0
    for n, p in dp.named_parameters():
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(p.grad, expected[n].sum(0) * scale, rtol=1e-6, atol=1e-9)
    return dp


def check_recurrent(model, inputs, *, dims, out_dim=0, reduction="mean", **kw):
    """privatize(model, **kw) on several inputs (``dims``: their batch dimensions):
    equal outputs, grad_sample equal to batch-of-one, p.grad their (scaled) sum."""
    dp = quiet_privatize(model, loss_reduction=reduction, **kw)
    out = dp(*inputs)
    ref = model(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out.shape, generator=gen)
    B = out.shape[out_dim]
    loss = (out * w).sum() / (B if reduction == "mean" else 1)
    loss.backward()
    expected = batch_of_one_grads(model, inputs, lambda o, i: (o * w.narrow(out_dim, i, 1)).sum(), dims)
    assert_grad_samples_match(dp, expected)
    scale = 1.0 / B if reduction == "mean" else 1.0
    for n, p in dp.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n].sum(0) * scale, rtol=1e-6, atol=1e-9)
    return dp


def check_attention(model, inputs, batch_first, dims=None, seed=0):
    """privatize(model): equal outputs, per-sample gradients equal batch-of-one."""
    d = 0 if batch_first else 1
    dims = dims or [d] * len(inputs)
    dp = quiet_privatize(model, batch_first=batch_first)
    out = dp(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=0, atol=1e-10)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * w).sum().div(inputs[0].shape[d]).backward()
    exp = batch_of_one_grads(model, inputs, lambda o, i: (o * w.narrow(d, i, 1)).sum(), dims)
    assert_grad_samples_match(dp, exp)
    return dp


def assert_check_plans_as_run(plans: Dict[str, str], dp, run: Callable[[], None]) -> None:
    """``fxdp.check``'s book-keeping ``plans`` (parameter name -> plan) equal, for every
    parameter a capture reached, its plan at the shapes its record arrived with in ``run()`` (a backward pass of ``dp``, privatized in book-keeping mode); a
    parameter several captures reached is planned as tied, from the factors its uses gave."""
    from fxdp.bookkeeping import BookKeeping
    from fxdp.check_layers import tied_plan

    ran: Dict[str, list] = {}
    factors: Dict[str, list] = {}
    record = BookKeeping.record

    def spy(self, rec):
        index = {p: i for i, p in rec.op.param_index.items()}
        if hasattr(rec.op, "prepared"):  # a rule's capture: its plan at the shapes it ran with
            planned = rec.op.rule.bk_plan(*rec.op.prepared(rec))
            planned = {p: planned[rec.op.names[i]] for i, p in rec.op.param_index.items() if rec.op.names[i] in planned}
        else:  # a raw parameter's or the torch.func fallback's: materialized whatever the shapes
            planned = rec.op.bk_plan(rec.inputs, rec.grads[0], [], None)
        for param, how in planned.items():
            ran.setdefault(param, []).append(how)
            factors.setdefault(param, []).append(rec.op.grad_factors(rec, index[param]))
        record(self, rec)

    dp.bookkeeping.attached = True
    BookKeeping.record = spy
    try:
        run()
    finally:
        BookKeeping.record = record
    assert ran
    for param, hows in ran.items():
        expected = hows[0] if len(hows) == 1 else tied_plan(hows, factors[param])
        assert plans[param] == expected, (param, plans[param], hows)


def train_hf_epoch(model: nn.Module, x: Dict[str, Tensor], repeats: int = 4, batch_size: int = 4):
    """make_private (book-keeping, RDP) on a Hugging Face model whose ``labels=`` loss it trains, one
    epoch over the rows of ``x`` (input_ids, attention_mask, labels) repeated; returns the engine and
    ``[(parameter, its value before)]`` of the trainable parameters."""
    import fxdp

    keys = ("input_ids", "attention_mask", "labels")
    data = torch.utils.data.TensorDataset(*(x[k].repeat(repeats, 1) for k in keys))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    before = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p, _ in before], lr=0.1)
    engine = fxdp.PrivacyEngine(accountant="rdp")
    dp, opt, dl = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                      max_grad_norm=1.0, grad_sample_mode="bk")
    for batch in dl:
        opt.zero_grad()
        dp(**dict(zip(keys, batch))).loss.backward()
        opt.step()
    return engine, before
