"""Batch rules (``fxdp/passes/batch_rules.py``): on the export path every op that reads
batched data has a rule saying where each input's batch goes, or the model is refused.

Each case is one op after a linear layer. Kept apart: privatize serves it and each
sample's gradient equals the gradient of that sample alone (float64). Mixing: refused
at the first call, by the rule, also where the first call's probe (which perturbs the
first and the last sample) would see nothing: a permutation of the batch that fixes
both ends, an ``index_add`` that adds sample 1 into sample 2, ``h @ h.T @ h``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdp
from fxdp.passes.batch_rules import RULES
from oracle import assert_grad_samples_match, batch_of_one_grads

B, D = 5, 6


def _arange(h):
    return torch.arange(h.shape[0])


def _middle_swap(h):
    """A permutation of the batch that swaps samples 1 and 2 and fixes 0 and B-1."""
    i = _arange(h)
    return torch.where(i == 1, 2, torch.where(i == 2, 1, i))


def _index_put(h):
    out = torch.zeros_like(h)
    out[_arange(h), 0] = h[:, 1]
    return out + h


def _scatter_add(h):
    idx = torch.arange(D).flip(0).expand(h.shape[0], D)
    return torch.zeros_like(h).scatter_add(1, idx, h)


def _attention(h):
    q = h.view(h.shape[0], 2, 3, 1).expand(-1, 2, 3, 4)  # [B, heads, T, d]
    return F.scaled_dot_product_attention(q, q * 0.5, q + 1).flatten(1)[:, :D]


def _no_grad_cumsum(h):
    """Other samples' values, detached, in each sample's output (the torch.no_grad() block is
    inlined, passes/inline_grad_mode.py: its cumsum along the batch is read by its rule)."""
    with torch.no_grad():
        c = h.cumsum(0)
    return (h - c) ** 2


def _linalg(h):
    m = h[:, :4].reshape(-1, 2, 2) + 3 * torch.eye(2, dtype=h.dtype)
    out = torch.cat([torch.linalg.inv(m).flatten(1), torch.linalg.matrix_exp(m).flatten(1)[:, :2]], 1)
    return out * torch.linalg.det(m).unsqueeze(1)


def _solve_search_trapezoid(h):
    a = 3 * torch.eye(2, dtype=h.dtype) + h[:, :4].reshape(-1, 2, 2)
    x = torch.linalg.solve(a, h[:, 4:]).repeat(1, 3)  # a system per sample
    cols = torch.linalg.solve(2 * torch.eye(D, dtype=h.dtype) + 1, h.T).T  # samples as right-hand sides
    steps = torch.searchsorted(torch.tensor([-0.5, 0.0, 0.5], dtype=h.dtype), h.contiguous()).to(h.dtype)
    return x + cols + steps + torch.trapezoid(h, dim=1).unsqueeze(1) + torch.cumulative_trapezoid(h, dim=1).sum(1, True)


def _grid_sample(h):
    grid = h.tanh().view(-1, 3, 1, 2).expand(-1, 3, 2, 2)  # each sample reads its own image
    return F.grid_sample(h.view(-1, 1, 2, 3), grid, align_corners=False).flatten(1)


def _masked_write(h):
    """``x[mask] = v``, ``v`` one value for every selected position (wav2vec2's SpecAugment)."""
    out = h.view(-1, 2, 3).clone()
    out[out[..., 0] > 0] = torch.tensor([1.0, -2.0, 3.0], dtype=h.dtype)
    out[out[..., 1] > 0.5] = torch.tensor([[0.5, 0.0, 1.0]], dtype=h.dtype)  # [1, 3]: one row for all
    return out.flatten(1) * h


#: one op after the layer, each sample kept apart
KEPT = {
    "softmax": lambda h: h.softmax(-1),
    "cumsum": lambda h: h.cumsum(1),
    "cummax": lambda h: torch.cummax(h, 1).values,
    "sort": lambda h: h.sort(-1).values,
    "topk": lambda h: h.topk(2, -1).values.repeat(1, 3),
    "flip_roll": lambda h: h.flip(-1).roll(2, 1),
    "logsumexp_var": lambda h: h - h.logsumexp(-1, keepdim=True) * h.var(-1, keepdim=True),
    "normalize": lambda h: F.normalize(h, dim=-1),
    "cosine": lambda h: h * F.cosine_similarity(h, h.flip(-1), dim=-1).unsqueeze(1),
    "outer_per_sample": lambda h: (h.unsqueeze(-1) @ h.unsqueeze(-2)).sum(-1),
    "einsum_per_sample": lambda h: torch.einsum("bi,bj->bij", h, h).sum(1),
    "einsum_ellipsis": lambda h: torch.einsum("...i,ij->...j", h, torch.ones(D, D))
    + torch.einsum("...ij,...jk->...ik", h.view(-1, 2, 3), h.view(-1, 3, 2)).flatten(1).repeat(1, 2)[:, :D],
    "one_hot": lambda h: h + F.one_hot(h.argmax(-1), D),
    "bmm_baddbmm": lambda h: torch.baddbmm(h.unsqueeze(1), h.unsqueeze(1), torch.ones(D, D).expand(h.shape[0], D, D)).squeeze(1),
    "gather": lambda h: h.gather(1, h.argsort(-1)),
    "index_arange": lambda h: h + h[_arange(h), h.argmax(-1)].unsqueeze(1),
    "index_put_arange": _index_put,
    "scatter_add": _scatter_add,
    "pad": lambda h: F.pad(h, (1, 2))[:, 1:-2] + F.pad(h.unsqueeze(1), (0, 0, 0, 1, 0, 0)).sum(1),
    "cat_stack_unbind": lambda h: torch.cat([h, h], -1)[:, :D] + torch.stack([h, h * 2], 1).unbind(1)[1],
    "norms_pools": lambda h: F.avg_pool1d(F.group_norm(h.view(-1, 2, 3), 1), 1).flatten(1)
    + F.layer_norm(h, (D,)) + F.interpolate(h.unsqueeze(1), size=D).squeeze(1),
    "tril_repeat": lambda h: torch.tril(h.unsqueeze(1).repeat(1, D, 1)).sum(1),
    "attention": _attention,
    # aliases ATen does not tag pointwise (kept by name in exported graphs)
    "aliases": lambda h: torch.multiply(torch.absolute(h), torch.negative(h)).arctan() + torch.special.erf(h)
    * torch.greater(h, 0) + torch.special.logsumexp(h, -1, keepdim=True) + torch.special.softmax(h, -1),
    "linalg": _linalg,
    "diff_cross_vander": lambda h: torch.diff(h, dim=1, append=h[:, :1]) + torch.linalg.cross(h[:, :3], h[:, 3:])
    .repeat(1, 2) + torch.linalg.vander(h[:, :2], N=3).flatten(1),
    "grid_sample": _grid_sample,
    "solve_search_trapezoid": _solve_search_trapezoid,
    # the second argument gives only its dtype / shape (Funnel's ``attention_mask.type_as(inputs_embeds)``,
    # a batched mask cast like a batched tensor of another rank)
    "type_as_expand_as": lambda h: h * (h[:, :1] > 0).type_as(h.unsqueeze(-1)) + h[:, :1].expand_as(h)
    + h.to(h.unsqueeze(1)),
    "masked_write": _masked_write,
    # Mamba's mixer: torch.split of its projections, decomposed to tensor_split
    "tensor_split": lambda h: torch.cat(torch.tensor_split(h, [2, 4], dim=1)[::-1], 1)
    + torch.cat([c.flip(1) for c in torch.tensor_split(h, 3, dim=1)], 1),
    # a MoE layer's tokens repeated once per chosen expert (batched_mm experts), then summed back
    "repeat_interleave_rows": lambda h: (h.repeat_interleave(3, dim=0) * torch.arange(3.0).repeat(h.shape[0])
                                         .unsqueeze(1)).view(-1, 3, D).sum(1) + h.repeat_interleave(2, dim=1)[:, ::2],
    "stft": lambda h: torch.stft(h, n_fft=4, hop_length=2, window=torch.hann_window(4, dtype=h.dtype),
                                 return_complex=True).abs().flatten(1)[:, :D],
}

#: one op after the layer that mixes samples: (op, the rule's code)
MIXING = {
    "matmul_outer": (lambda h: (h @ h.T) @ h, "batch-op"),
    "einsum_over_batch": (lambda h: torch.einsum("bi,ci->bi", h, h), "batch-op"),
    "index_add_middle": (lambda h: h.index_add(0, _middle_swap(h), h), "batch-op"),
    "permute_middle": (lambda h: h + h[_middle_swap(h)], "batch-op"),
    "cummax_batch": (lambda h: torch.cummax(h, 0).values, "batch-op"),
    "sort_batch": (lambda h: h.sort(0).values, "batch-op"),
    "gather_batch": (lambda h: h.gather(0, h.argsort(0)), "batch-op"),
    "pad_shift": (lambda h: F.pad(h, (0, 0, 1, 0))[:-1], "batch-op"),
    "attention_over_batch": (lambda h: F.scaled_dot_product_attention(h[None], h[None], h[None])[0], "batch-op"),
    "no_grad_block": (_no_grad_cumsum, "batch-op"),
    # MRA's mask: [B, K] tiled per head as [1, H*B, K], then read as [B*H, K] (batch-major)
    "repeat_tiles_batch": (lambda h: h * h.unsqueeze(0).repeat(1, 2, 1).reshape(-1, 2, D)[:, 0], "batch-op"),
    "renorm_columns": (lambda h: h.renorm(2, 1, 0.5), "batch-op"),
    "diff_batch": (lambda h: torch.diff(h, dim=0, prepend=torch.zeros(1, D, dtype=h.dtype)), "batch-op"),
    "solve_along_batch": (lambda h: torch.linalg.solve(2 * torch.eye(h.shape[0]) + 1, h), "batch-op"),
    "svdvals_over_batch": (lambda h: h * torch.linalg.svdvals(h.T).sum(), "batch-op"),
    "expand_as_batch_row": (lambda h: h + h[:1].expand_as(h), "batch-index"),
    "repeat_interleave_flat": (lambda h: h * h.repeat_interleave(2)[1::2].view_as(h), "batch-op"),
    "take_reversed": (lambda h: torch.take(h, torch.arange(h.numel()).flip(0)).view_as(h), "batch-rule|batch-fold"),
}


class OneOp(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.l = nn.Linear(D, D)
        self.f = f

    def forward(self, x):
        return self.f(self.l(x)).tanh()


@pytest.mark.parametrize("name", sorted(KEPT))
def test_an_op_that_keeps_samples_apart_is_served_exactly(name, f64):
    torch.manual_seed(0)
    model = OneOp(KEPT[name]).double()
    x = torch.randn(B, D)
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))


@pytest.mark.parametrize("name", sorted(MIXING))
def test_an_op_that_mixes_samples_is_refused_by_its_rule(name):
    f, code = MIXING[name]
    dp = fxdp.privatize(OneOp(f), capture="export")
    with pytest.raises(fxdp.UnsupportedOpError, match=code):
        dp(torch.randn(B, D))


def test_every_rule_is_keyed_by_an_aten_overload():
    assert all(isinstance(op, torch._ops.OpOverload) for op in RULES)


def test_an_op_without_a_rule_is_refused_with_its_name():
    lib = torch.library.Library("fxdp_test_rules", "DEF")
    lib.define("rowwise(Tensor x) -> Tensor")
    lib.impl("rowwise", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("rowwise", lambda x: torch.empty_like(x), "Meta")
    dp = fxdp.privatize(OneOp(lambda h: torch.ops.fxdp_test_rules.rowwise(h)), capture="export")
    with pytest.raises(fxdp.UnsupportedOpError, match="no batch rule for fxdp_test_rules.rowwise"):
        dp(torch.randn(B, D))


@pytest.mark.parametrize("eq, item, dim, rank, out_rank, lands", [
    ("bi,bj->bij", 1, 0, 2, 3, 0),
    ("bi,ci->bi", 1, 0, 2, 2, None),        # c: summed over
    ("...i,ij->...j", 0, 1, 3, 3, 1),
    ("...i,ij->...j", 0, 2, 3, 3, None),    # i: contracted
    ("bi,...i->...b", 0, 0, 2, 3, 2),       # a letter after the output's ellipsis
    ("b...d->...", 0, 0, 4, 2, None),
    ("...d->...", 0, 1, 3, 2, 1),           # an ellipsis dimension, aligned from the right
    ("bij", 0, 0, 3, 3, None),              # implicit output: not read
])
def test_the_einsum_rule_follows_letters_and_ellipses(eq, item, dim, rank, out_rank, lands):
    from fxdp.passes.batch_rules import BatchedArg, rule_of

    u = BatchedArg(None, {"equation": eq}, "tensors", item, dim, rank, out_rank, None)
    assert rule_of(torch.ops.aten.einsum.default)(u) == lands


@pytest.mark.parametrize("values, lands", [
    ((3,), 0), ((1, 3), 0), ((), 0),
    ((7, 3), None),  # a row per selected position: row j goes to the batch's j-th one, wherever it falls
    ((2, 3), None),
])
def test_a_masked_write_keeps_samples_apart_only_with_one_value_for_every_position(values, lands):
    """``x[mask] = v`` on ``x: [B, T, 3]``, ``mask: [B, T]``: ``where(mask, v, x)`` when ``v``
    has no dimension of the selected positions' count."""
    from torch.fx import Graph

    from fxdp.passes.batch_rules import BatchedArg, rule_of

    g = Graph()
    x, mask, v = (g.placeholder(n) for n in ("x", "mask", "v"))
    x.meta["val"], mask.meta["val"] = torch.zeros(4, 5, 3), torch.zeros(4, 5, dtype=torch.bool)
    v.meta["val"] = torch.zeros(values)
    args = {"input": x, "indices": [mask], "values": v, "accumulate": False}
    rule = rule_of(torch.ops.aten.index_put.default)
    assert rule(BatchedArg(None, args, "input", None, 0, 3, 3, 0)) == lands
    assert rule(BatchedArg(None, args, "indices", 0, 0, 2, 3, 0)) == lands


@pytest.mark.parametrize("op", [torch.ops.aten.tensor_split.indices, torch.ops.aten.tensor_split.sections])
def test_tensor_split_along_the_batch_splits_samples(op):
    """Cut along another dimension the batch passes (the case above); cut along the batch, each
    piece holds some samples: no rule can keep them apart."""
    from fxdp.passes.batch_rules import BatchedArg, rule_of

    assert rule_of(op)(BatchedArg(None, {"dim": 1}, "self", None, 0, 2, 2, 0)) == 0
    assert rule_of(op)(BatchedArg(None, {"dim": 0}, "self", None, 0, 2, 2, 0)) is None
