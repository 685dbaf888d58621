"""Per-sample rules for embeddings: ``F.embedding`` / ``torch.embedding`` /
``nn.Embedding`` and ``F.embedding_bag`` / ``nn.EmbeddingBag``.

Embedding. For a lookup ``y_{i,t} = W[x_{i,t}]`` with indices ``x: [B, ...]`` into
``W: [V, D]`` and output gradients ``g: [B, ..., D]``, sample i's gradient is a
scatter-add of its output-gradient rows into the rows of ``W`` it looked up
(Yousefpour et al. 2021, "Opacus: user-friendly differential privacy library in
PyTorch", embedding grad sampler):

    grad W_i[v] = sum_{t : x_{i,t} = v, v != padding_idx} g_{i,t}.

Unlike Opacus this honours ``padding_idx``: as in PyTorch's own backward, the
padding row receives no gradient. Materialized per-sample gradients are
``[B, V, D]``, which is rarely affordable; the book-keeping hooks (Bu et al. 2023,
"Differentially private optimization on large model at small cost") never build
it. Grouping equal token ids within a sample (a segment sum over the (sample,
token) pairs, found with one sort) gives

    ||grad W_i||^2 = sum_{v} || sum_{t : x_{i,t} = v} g_{i,t} ||^2,

in O(B T D) time and memory against the O(B T^2) of the ghost norm of Li et al.
2021 ("Large language models can be strong differentially private learners",
``<1[x_t = x_s], g_t g_s^T>``) and the O(B V D) of materializing. The clipped sum
``sum_i c_i grad W_i`` is one ``index_add`` of the scaled rows into ``[V, D]``.

Embedding bag. Bags are samples: the output is ``[B, D]``. In ``sum``/``mean``
mode the j-th index of bag i contributes ``w_j g_i`` to row ``x_j``, with ``w_j``
the per-sample weight (``sum``), ``1 / |bag i|`` (``mean``, padding entries not
counted) or 1; so ``grad W_i[v] = c_{i,v} g_i`` with ``c_{i,v} = sum_{j in bag
i : x_j = v} w_j`` and ``||grad W_i||^2 = ||g_i||^2 sum_v c_{i,v}^2``. In ``max``
mode feature d of bag i is copied from the row ``m_{i,d}`` holding the maximum
(PyTorch's own ``max_indices``, recomputed in backward, so ties break as in
PyTorch): ``grad W_i[m_{i,d}, d] = g_{i,d}`` and ``||grad W_i||^2 = ||g_i||^2``
(empty bags: zero).

Refused options (``UnsupportedOpError``): ``max_norm`` renormalizes the looked-up
rows of ``W`` in place during the forward pass, a side effect that depends on
the whole batch; ``scale_grad_by_freq`` scales gradients by token frequencies
counted over the whole batch, mixing samples; ``sparse=True`` produces sparse
gradients that per-sample clipping cannot use.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedOpError
from .base import ModuleCall, PerSampleRule, into_target, norm_dtype, register_module, register_rule, samples_per_slice
from .tied import GradFactors

__all__ = ["EmbeddingRule", "TorchEmbeddingRule", "EmbeddingBagRule", "AtenEmbeddingBagRule"]


def _check_options(op_name: str, args: Mapping[str, Any]) -> None:
    """Refuse the options that cannot be made exact or private."""
    if args.get("max_norm", None) is not None:
        raise UnsupportedOpError(
            f"{op_name} with max_norm={args['max_norm']} is not supported: max_norm renormalizes the "
            "looked-up rows of the weight in place during the forward pass, a side effect that depends "
            "on every sample of the batch. Fix: use max_norm=None (clip the weight rows outside the "
            "model if needed)."
        )
    if args.get("scale_grad_by_freq", False):
        raise UnsupportedOpError(
            f"{op_name} with scale_grad_by_freq=True is not supported: the gradient is scaled by token "
            "frequencies counted over the whole batch, which mixes samples. Fix: use "
            "scale_grad_by_freq=False."
        )
    if args.get("sparse", False):
        raise UnsupportedOpError(
            f"{op_name} with sparse=True is not supported: sparse gradients cannot be clipped per "
            "sample. Fix: use sparse=False."
        )


# --------------------------------------------------------------------------- embedding


#: book-keeping's embedding clipped sum scales and scatters the batch in slices of about
#: this many bytes of output gradient: a slice (the scaled copy, and as much again inside
#: the scatter), not the record, adds to the step's peak memory. Embedding net, B = 32:
#: 64 / 128 / 256 KiB slices peak at 1.17 / 1.24 / 1.51 MiB in the optimizer step; time
#: equal within the spread from 128 KiB up (64 KiB: 4 samples a slice, slower at B = 128)
_CLIPPED_SUM_CHUNK_BYTES = 1 << 17


def _add_rows(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``out[index[j]] += rows[j]`` for every ``j`` (repeated indices add up), in place.
    On CPU ``index_add_``: ms, 1 thread, rows of 16 / 128 / 768 (embedding net, BERT,
    GPT-2 widths), 1.3x / 3.1x / 3.3x faster than ``index_put_`` with ``accumulate``, and
    4-12x with 2 threads, where that one runs serially. Elsewhere ``index_put_``, whose CUDA
    kernel sorts the indices (a deterministic sum) where ``index_add_`` uses atomics."""
    if out.device.type == "cpu":
        return out.index_add_(0, index, rows)
    return out.index_put_((index,), rows, accumulate=True)


def _row_sums(n: int, index: Tensor, rows: Tensor) -> Tensor:
    """``[n, D]``: ``out[k] = Σ_{j: index[j] = k} rows[j]``."""
    return _add_rows(rows.new_zeros(n, rows.shape[1]), index, rows)


def _token_rows(idx: Tensor, g: Tensor, V: int, padding_idx: Optional[int]) -> Tuple[Tensor, Tensor, int]:
    """Flatten a lookup to rows: ``keys = i * V + x_{i,t}`` and ``rows = g_{i,t}``
    (``[N]``, ``[N, D]``), dropping padding positions; also returns B."""
    B = idx.shape[0]
    D = g.shape[-1]
    idx = idx.reshape(B, -1).long()  # int32 indices: keys i * V + x may overflow
    rows = g.reshape(-1, D)
    keys = (idx + torch.arange(B, device=idx.device).view(B, 1) * V).reshape(-1)
    if rows.shape[0] != keys.shape[0]:  # pragma: no cover - malformed call
        raise ValueError(f"embedding: {keys.shape[0]} indices but {rows.shape[0]} gradient rows")
    if padding_idx is not None:
        keep = idx.reshape(-1) != padding_idx
        keys, rows = keys[keep], rows[keep]
    return keys, rows, B


# Repeated tokens are found with a [samples, V] int16 count table (no sort). On CPU
# the table is a reused scratch of about one L2 cache (random scatters into a larger
# one miss the cache) filled a chunk of samples at a time; vocabularies too large
# for chunks of >= 8 samples, or (elsewhere) tables over _COUNT_TABLE_MAX entries,
# sort each sample's tokens instead.
_COUNT_TABLE_MAX = 1 << 25
_CPU_TABLE_BYTES = 1 << 20
_count_scratch: Dict[torch.device, Tensor] = {}


def _counted_repeats(idx: Tensor, table: Tensor, out: Tensor) -> None:
    n, L = idx.shape
    table.scatter_add_(1, idx, torch.ones((), dtype=table.dtype, device=idx.device).expand(n, L))
    torch.gt(table.gather(1, idx), 1, out=out)
    table.scatter_(1, idx, 0)  # leave the table zeroed for the next chunk or call


def _repeated(idx: Tensor, V: int) -> Tensor:
    """``[B, L]`` bool: position ``t`` of sample ``i`` holds a token that occurs
    more than once in sample ``i``."""
    B, L = idx.shape
    out = torch.empty(B, L, dtype=torch.bool, device=idx.device)
    if L < 2**15:  # int16 counts cannot overflow
        if idx.device.type == "cpu":
            chunk = _CPU_TABLE_BYTES // (2 * V)
            if chunk >= 8 and B * V <= _COUNT_TABLE_MAX:
                buf = _count_scratch.get(idx.device)
                if buf is None or buf.numel() < chunk * V:
                    buf = _count_scratch[idx.device] = torch.zeros(chunk * V, dtype=torch.int16)
                for s in range(0, B, chunk):
                    n = min(chunk, B - s)
                    _counted_repeats(idx[s : s + n], buf[: n * V].view(n, V), out[s : s + n])
                return out
        elif B * V <= _COUNT_TABLE_MAX:
            _counted_repeats(idx, torch.zeros(B, V, dtype=torch.int16, device=idx.device), out)
            return out
    sk, perm = torch.sort(idx, dim=1)
    eq = sk[:, 1:] == sk[:, :-1]
    rep = torch.zeros(B, L, dtype=torch.bool, device=idx.device)
    rep[:, 1:] |= eq
    rep[:, :-1] |= eq
    return out.zero_().scatter_(1, perm, rep)


def _embedding_norms(idx: Tensor, g: Tensor, V: int, padding_idx: Optional[int]) -> Tensor:
    """``[B]``: ``‖Σ_t e_{x_{i,t}} g_{i,t}ᵀ‖²`` per sample without a ``[B, V, D]`` tensor.

    Rows of distinct tokens are orthogonal, so the norm is ``Σ_t ‖g_{i,t}‖²`` over
    tokens seen once plus ``‖Σ g‖²`` per repeated (sample, token) group; only the
    (few) repeated positions are grouped. In at least float32 (a bfloat16 norm and its
    sum over the tokens read up to 1% off).
    """
    B = idx.shape[0]
    idx = idx.reshape(B, -1).long()
    L, D = idx.shape[1], g.shape[-1]
    g = g.reshape(B, L, D)
    sq = torch.linalg.vector_norm(g, dim=-1, dtype=norm_dtype(g.dtype)).pow_(2)
    rep = _repeated(idx, V)
    if padding_idx is not None:
        pad = idx == padding_idx
        rep &= ~pad
        sq = sq.masked_fill(pad, 0)
    out = sq.masked_fill(rep, 0).sum(1)
    src = rep.view(-1).nonzero().squeeze(1)
    if src.numel() == 0:
        return out
    keys = idx.reshape(-1)[src] + torch.div(src, L, rounding_mode="floor") * V
    uniq, inv = torch.unique(keys, return_inverse=True)
    # reshape, not view: the output gradient may be a non-contiguous view (a transpose after the embedding)
    sums = _row_sums(uniq.shape[0], inv, g.reshape(B * L, D).index_select(0, src).to(out.dtype))
    return out.index_add_(0, torch.div(uniq, V, rounding_mode="floor"), sums.pow(2).sum(1))


@register_rule(F.embedding)
class EmbeddingRule(PerSampleRule):
    """``F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)``."""

    name = "embedding"
    param_args = ("weight",)
    input_arg = "input"
    folds = True

    def signature(self, input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                  scale_grad_by_freq=False, sparse=False):  # noqa: D401 - binding only
        pass

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        bound = super().bind(args, kwargs)
        _check_options(self.name, bound)
        return bound

    def forward(self, op, args):
        _check_options(self.name, args)
        return op(**args)

    # layout helpers (overridden by the torch.embedding alias)
    def _indices(self, args: Mapping[str, Any]) -> Tensor:
        return args[self.input_arg]

    def _padding_idx(self, args: Mapping[str, Any], V: int) -> Optional[int]:
        p = args.get("padding_idx", None)
        if p is None:
            return None
        p = int(p)
        return p + V if p < 0 else p

    def _rows(self, args: Mapping[str, Any], grad_output: Tensor):
        V = args["weight"].shape[0]
        keys, rows, B = _token_rows(self._indices(args), grad_output, V, self._padding_idx(args, V))
        return keys, rows, B, V

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        if "weight" not in needs:
            return {}
        keys, rows, B, V = self._rows(args, grad_output)
        return {"weight": _row_sums(B * V, keys, rows).view(B, V, rows.shape[1])}

    factored = frozenset({"weight"})

    def grad_factors(self, args: Mapping[str, Any], grad_output: Tensor, name: str) -> Optional[GradFactors]:
        """``grad W_i = E_iᵀ g_i``, ``E_i`` the one-hot rows of sample i's tokens (as indices);
        padding positions add nothing: their output-gradient rows are zeroed."""
        if name != "weight":
            return None
        V = args["weight"].shape[0]
        idx = self._indices(args)
        B = idx.shape[0]
        idx = idx.reshape(B, -1).long()
        g = grad_output.reshape(B, idx.shape[1], grad_output.shape[-1])
        pad = self._padding_idx(args, V)
        if pad is not None:
            g = g.masked_fill((idx == pad).unsqueeze(-1), 0)
        return GradFactors(right=g, index=idx, m=V)

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        if "weight" not in needs:
            return {}
        V = args["weight"].shape[0]
        return {"weight": _embedding_norms(self._indices(args), grad_output, V, self._padding_idx(args, V))}

    def bk_plan(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, str]:
        return {n: "norms from repeated tokens only (no [B, V, D]); clipped sum: one scatter of c∘g" for n in needs}

    clipped_sum_into = True

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str],
        into: Optional[Dict[str, Tensor]] = None,
    ) -> Dict[str, Tensor]:
        if "weight" not in needs:
            return {}
        # one scatter of the per-sample scaled output gradient, a small slice of the batch at
        # a time (the embedding net at B = 128: quarters of the batch peaked at 1.5x
        # non-private's memory, 256 KiB slices at 1.2x, in the same time)
        V, D = args["weight"].shape
        idx = self._indices(args)
        B = idx.shape[0]
        pad = self._padding_idx(args, V)
        f = factors.to(grad_output.dtype).view((B,) + (1,) * (grad_output.dim() - 1))
        dst = into_target(into, "weight", grad_output.dtype, (V, D))
        out = dst if dst is not None else grad_output.new_zeros(V, D)  # straight into the noise buffer
        step = samples_per_slice(_CLIPPED_SUM_CHUNK_BYTES, grad_output)
        for s in range(0, B, step):
            i, rows = idx[s:s + step].reshape(-1), (grad_output[s:s + step] * f[s:s + step]).reshape(-1, D)
            if pad is not None:
                keep = i != pad
                i, rows = i[keep], rows[keep]
            _add_rows(out, i, rows)
        return {} if out is dst else {"weight": out}


@register_rule(torch.embedding, torch.ops.aten.embedding.default)
class TorchEmbeddingRule(EmbeddingRule):
    """The ATen form ``torch.embedding(weight, indices, padding_idx=-1,
    scale_grad_by_freq=False, sparse=False)``: a negative ``padding_idx`` means none."""

    name = "torch.embedding"
    input_arg = "indices"

    def signature(self, weight, indices, padding_idx=-1, scale_grad_by_freq=False,
                  sparse=False):  # noqa: D401 - binding only
        pass

    def forward(self, op, args):
        _check_options(self.name, args)
        return op(args["weight"], args["indices"], args.get("padding_idx", -1),
                  args.get("scale_grad_by_freq", False), args.get("sparse", False))

    def _padding_idx(self, args: Mapping[str, Any], V: int) -> Optional[int]:
        p = args.get("padding_idx", -1)
        return None if p is None or int(p) < 0 else int(p)


@register_module(nn.Embedding)
def _embedding_call(m: nn.Embedding) -> ModuleCall:
    kwargs = {
        "padding_idx": m.padding_idx,
        "max_norm": m.max_norm,
        "norm_type": m.norm_type,
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "sparse": m.sparse,
    }
    _check_options("nn.Embedding", kwargs)
    return ModuleCall(F.embedding, params={"weight": "weight"}, kwargs=kwargs)


# --------------------------------------------------------------------------- embedding bag

_MODES = {"sum": 0, "mean": 1, "max": 2}


@register_rule(F.embedding_bag)
class EmbeddingBagRule(PerSampleRule):
    """``F.embedding_bag``: 2-D ``input [B, L]`` (B bags of L) or 1-D ``input`` with
    ``offsets`` (``include_last_offset`` honoured); modes sum, mean and max;
    ``per_sample_weights`` (sum mode); ``padding_idx``. Bags are samples."""

    name = "embedding_bag"
    param_args = ("weight",)
    input_arg = None  # bags are always dim 0 of the output; 1-D input + offsets handled here
    segments = True

    def signature(self, input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False,
                  mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False,
                  padding_idx=None):  # noqa: D401 - binding only
        pass

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        bound = super().bind(args, kwargs)
        self._check(bound)
        return bound

    def _check(self, args: Mapping[str, Any]) -> None:
        _check_options(self.name, args)
        mode = args.get("mode", "mean")
        if mode not in _MODES:
            raise UnsupportedOpError(f"{self.name} with mode={mode!r} is not supported; use 'sum', 'mean' or 'max'.")

    def forward(self, op, args):
        self._check(args)
        return op(**args)

    # ----------------------------------------------------------------- layout
    @staticmethod
    def _padding_idx(args: Mapping[str, Any], V: int) -> Optional[int]:
        p = args.get("padding_idx", None)
        if p is None:
            return None
        p = int(p)
        return p + V if p < 0 else p

    @staticmethod
    def _flat(args: Mapping[str, Any]) -> Tuple[Tensor, Tensor, Optional[Tensor], int]:
        """1-D indices, offsets (of the B bag starts), flat per-sample weights, B."""
        x = args["input"].long()
        psw = args.get("per_sample_weights", None)
        if x.dim() == 2:
            B, L = x.shape
            offsets = torch.arange(B, device=x.device, dtype=torch.long) * L
            return x.reshape(-1), offsets, (None if psw is None else psw.reshape(-1)), B
        if x.dim() != 1:
            raise UnsupportedOpError(f"embedding_bag: input must be 1-D or 2-D, got {x.dim()}-D")
        offsets = args.get("offsets", None)
        if offsets is None:
            raise UnsupportedOpError("embedding_bag: a 1-D input needs offsets")
        B = offsets.numel() - (1 if args.get("include_last_offset", False) else 0)
        return x, offsets[:B].long(), psw, B

    def _entries(self, args: Mapping[str, Any]) -> Tuple[Tensor, Tensor, Tensor, int, int]:
        """sum/mean: for each counted index j, its bag ``b_j``, token ``x_j`` and
        coefficient ``w_j`` (``[N]`` each), plus B and V."""
        V = args["weight"].shape[0]
        x, starts, psw, B = self._flat(args)
        pos = torch.arange(x.numel(), device=x.device)
        bag = torch.searchsorted(starts.contiguous(), pos, right=True) - 1
        keep = bag >= 0
        pad = self._padding_idx(args, V)
        if pad is not None:
            keep = keep & (x != pad)
        bag, tok = bag[keep], x[keep]
        dtype = args["weight"].dtype
        if psw is not None:
            coef = psw[keep].to(dtype)
        else:
            coef = torch.ones(bag.shape[0], dtype=dtype, device=x.device)
        if args.get("mode", "mean") == "mean":
            count = torch.bincount(bag, minlength=B).to(dtype)
            coef = coef / count[bag]
        return bag, tok, coef, B, V

    def _max_indices(self, args: Mapping[str, Any]) -> Tuple[Tensor, Tensor]:
        """max mode: PyTorch's ``max_indices [B, D]`` and a ``[B]`` mask of non-empty bags."""
        weight = args["weight"]
        V = weight.shape[0]
        x, starts, _, _ = self._flat(args)
        pad = self._padding_idx(args, V)
        with torch.no_grad():
            # include_last_offset=False with the B bag starts: the last bag runs to the end.
            _, _, bag_size, max_idx = torch.embedding_bag(
                weight.detach(), x, starts, False, _MODES["max"], False, None, False,
                pad,  # None: no padding row (-1 would mean row V-1)
            )
        return max_idx, bag_size > 0

    # ----------------------------------------------------------------- rules
    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        if "weight" not in needs:
            return {}
        g = grad_output
        B, D = g.shape
        V = args["weight"].shape[0]
        if args.get("mode", "mean") == "max":
            max_idx, valid = self._max_indices(args)
            out = torch.zeros(B, V, D, dtype=g.dtype, device=g.device)
            src = (g * valid.to(g.dtype).unsqueeze(1)).unsqueeze(1)
            return {"weight": out.scatter_add_(1, max_idx.unsqueeze(1), src)}
        bag, tok, coef, B, V = self._entries(args)
        return {"weight": _row_sums(B * V, bag * V + tok, g[bag] * coef.to(g.dtype).unsqueeze(1)).view(B, V, D)}

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        if "weight" not in needs:
            return {}
        g = grad_output
        dtype = norm_dtype(g.dtype)  # a bfloat16 norm reads up to 1% off
        gsq = torch.linalg.vector_norm(g, dim=1, dtype=dtype).pow_(2)
        if args.get("mode", "mean") == "max":
            _, valid = self._max_indices(args)
            return {"weight": gsq * valid.to(dtype)}
        bag, tok, coef, B, V = self._entries(args)
        out = torch.zeros(B, dtype=dtype, device=g.device)
        if bag.numel() == 0:
            return {"weight": out}
        uniq, inv = torch.unique(bag * V + tok, return_inverse=True)
        # the coefficients as the clipped sum applies them (in g's dtype), summed in the norm's
        c = torch.zeros(uniq.shape[0], dtype=dtype, device=g.device).index_add_(0, inv, coef.to(g.dtype).to(dtype))
        out.index_add_(0, torch.div(uniq, V, rounding_mode="floor"), c.pow(2))
        return {"weight": out * gsq}

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str]
    ) -> Dict[str, Tensor]:
        if "weight" not in needs:
            return {}
        g = grad_output
        D = g.shape[1]
        V = args["weight"].shape[0]
        f = factors.to(g.dtype)
        out = torch.zeros(V, D, dtype=g.dtype, device=g.device)
        if args.get("mode", "mean") == "max":
            max_idx, valid = self._max_indices(args)
            return {"weight": out.scatter_add_(0, max_idx, g * (f * valid.to(g.dtype)).unsqueeze(1))}
        bag, tok, coef, _, _ = self._entries(args)
        return {"weight": _row_sums(V, tok, g[bag] * (coef.to(g.dtype) * f[bag]).unsqueeze(1))}


@register_rule(torch.ops.aten.embedding_bag.padding_idx, torch.ops.aten.embedding_bag.default)
class AtenEmbeddingBagRule(EmbeddingBagRule):
    """``aten.embedding_bag`` of the ``torch.export`` graph: the rule above on the ATen
    arguments (``indices`` flat, ``offsets`` of the bags, ``mode`` 0/1/2). The op returns
    ``(output, offset2bag, bag_size, max_indices)``; the output's rows are the bags. A 2-D
    input arrives flattened (a batch-major fold) with ``offsets = arange(0, B*L, L)``."""

    folds = True  # the flattened [B*L] indices of a 2-D input
    first_output_only = True  # offset2bag, bag_size, max_indices are integer bookkeeping

    def signature(self, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=None):  # noqa: D401
        pass

    def _check(self, args: Mapping[str, Any]) -> None:
        _check_options(self.name, args)
        if int(args.get("mode", 1)) not in _MODES.values():
            raise UnsupportedOpError(f"{self.name} with mode={args.get('mode')!r} is not supported")

    def forward(self, op, args):
        self._check(args)
        names = ["weight", "indices", "offsets", "scale_grad_by_freq", "mode", "sparse", "per_sample_weights",
                 "include_last_offset", "padding_idx"]
        return op(*[args.get(n) for n in names[:3]], *[args.get(n, d) for n, d in zip(
            names[3:], [False, 0, False, None, False, None])])

    @staticmethod
    def _as_functional(args: Mapping[str, Any]) -> Dict[str, Any]:
        mode = {v: k for k, v in _MODES.items()}[int(args.get("mode", 0))]
        pad = args.get("padding_idx", None)
        return {"input": args["indices"], "weight": args["weight"], "offsets": args["offsets"], "mode": mode,
                "per_sample_weights": args.get("per_sample_weights", None),
                "include_last_offset": bool(args.get("include_last_offset", False)),
                "padding_idx": None if pad is None or int(pad) < 0 else int(pad)}

    def grad_sample(self, args, grad_output, needs):
        return super().grad_sample(self._as_functional(args), grad_output, needs)

    def norm_sample_sq(self, args, grad_output, needs):
        return super().norm_sample_sq(self._as_functional(args), grad_output, needs)

    def clipped_sum(self, args, grad_output, factors, needs):
        return super().clipped_sum(self._as_functional(args), grad_output, factors, needs)


@register_module(nn.EmbeddingBag)
def _embedding_bag_call(m: nn.EmbeddingBag) -> ModuleCall:
    kwargs = {
        "max_norm": m.max_norm,
        "norm_type": m.norm_type,
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "mode": m.mode,
        "sparse": m.sparse,
        "include_last_offset": m.include_last_offset,
        "padding_idx": m.padding_idx,
    }
    _check_options("nn.EmbeddingBag", kwargs)
    return ModuleCall(
        F.embedding_bag,
        inputs=("input", "offsets", "per_sample_weights"),
        params={"weight": "weight"},
        kwargs=kwargs,
    )
