"""Per-sample rule for ``F.linear`` / ``nn.Linear`` on inputs of any rank.

For ``y = a W^T + b`` with activations ``a: [B, ..., d]`` and output gradients
``g: [B, ..., p]`` the gradient of sample i is a sum of outer products over its
positions (Goodfellow 2015, "Efficient per-example gradient computations"):

    grad W_i = sum_t g_{i,t} a_{i,t}^T,      grad b_i = sum_t g_{i,t}.

Book-keeping (Bu et al. 2023) needs only norms and the clipped sum. On a sequence
of length T the ghost norm (Li et al. 2021, Goodfellow 2015)

    ||grad W_i||^2 = <a_i a_i^T, g_i g_i^T>

costs about 2 B T^2 (d + p) against 2 B T p d for materializing; the rule picks
the cheaper one from the shapes.
"""
from __future__ import annotations

import math
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    KEPT_PASSES, ModuleCall, PerSampleRule, gram_bytes, gram_inner, into_target, register_module,
    register_rule, samples_per_slice, sq_norms, weighted_sum,
)
from .tied import GradFactors

aten = torch.ops.aten


def _flat(t: Tensor) -> Tensor:
    """[B, ..., d] -> [B, T, d] (T = product of the middle dims, 1 for rank 2)."""
    return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


def _rows(t: Tensor) -> Tensor:
    """[B, ..., d] -> [B T, d]: every position a row (a view where the layout allows)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _dims(a: Tensor, g: Tensor) -> Tuple[int, int, int]:
    """``(T, d, p)`` of activations ``[B, ..., d]`` and output gradients ``[B, ..., p]``,
    from the shapes alone (the cost model runs once per layer and step)."""
    if a.dim() == 2:
        return 1, a.shape[1], g.shape[-1]
    return math.prod(a.shape[1:-1]), a.shape[-1], g.shape[-1]


#: ghost norms form their two ``[T, T]`` Gram matrices and product for a slice of the batch
#: of about this many bytes at a time (at T = 2048 in float32, 48 MiB a sample: the whole
#: batch's would dwarf the layer's record)
_GHOST_SLICE_BYTES = 1 << 22


def _ghost_norms(a: Tensor, g: Tensor) -> Tensor:
    """``[B]``: ``<a_i a_i^T, g_i g_i^T>`` (Li et al. 2021), a slice of the batch at a time."""
    B, T = a.shape[0], a.shape[1]
    temp = gram_bytes(T, a.shape[2], g.shape[2], torch.promote_types(a.dtype, g.dtype))
    n = samples_per_slice(_GHOST_SLICE_BYTES, extra_bytes=temp)
    if n >= B:
        return gram_inner(a, g)
    return torch.cat([gram_inner(a[s:s + n], g[s:s + n]) for s in range(0, B, n)])


@register_rule(F.linear, torch._C._nn.linear, aten.linear.default)
class LinearRule(PerSampleRule):
    name = "linear"
    folds = True

    #: ghost norms when their ``B T^2 (d + p)`` beats what materializing adds. Materialized
    #: gradients larger than the record are not kept and cost ``B T p d`` again for the
    #: clipped sum: ghost when ``T (d + p) <= ghost_ratio * p d``. Kept ones give the
    #: clipped sum for ``kept_passes`` memory passes over ``B p d`` (norm, contraction,
    #: write), which ghost norms' own clipped sum (``B T p d``) rarely beats: ghost only
    #: when ``T^2 (d + p) <= ghost_ratio * kept_passes * p d`` (measured: ViT's MLP at
    #: T = 65, d = 128, p = 512 materializes faster, which the first rule missed)
    ghost_ratio: float = 1.0
    kept_passes: float = KEPT_PASSES

    def signature(self, input, weight, bias=None):  # noqa: D401 - binding only
        pass

    def has_input_grad(self, args: Mapping[str, Any]) -> bool:
        return isinstance(args["input"], Tensor) and args["input"].dim() >= 2

    def input_grad(self, args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        # autocast may run the op in a lower precision: differentiate in grad_output's dtype
        w, dtype = args["weight"], args["input"].dtype
        gi = grad_output.matmul(w if w.dtype == grad_output.dtype else w.to(grad_output.dtype))
        return gi if gi.dtype == dtype else gi.to(dtype)

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        a, g = _flat(args["input"]), _flat(grad_output)
        out: Dict[str, Tensor] = {}
        if "weight" in needs:
            out["weight"] = torch.bmm(g.transpose(1, 2), a)
        if "bias" in needs:
            out["bias"] = g.sum(1)
        return out

    factored = frozenset({"weight"})

    def grad_factors(self, args: Mapping[str, Any], grad_output: Tensor, name: str) -> Optional[GradFactors]:
        """``grad W_i = g_iᵀ a_i``: rows of the output gradient against the activations'."""
        return GradFactors(right=_flat(args["input"]), left=_flat(grad_output)) if name == "weight" else None

    @staticmethod
    def keeps(T: int, d: int, p: int) -> bool:
        """Materialized ``[B, p, d]`` gradients are kept when no larger than the record
        ``B T (d + p)`` they replace: book-keeping then holds at most what the clipped sum
        needs. (Keeping up to twice the record, ViT's MLP at T = 65, d = 128, p = 512: a
        step peak of 1.51x non-private's against 1.21x, for 2-3% of the step formed as the
        record arrives and none formed at the pass's end; ``benchmarks/README.md``, Round 20.)"""
        return p * d <= T * (p + d)

    def use_ghost(self, T: int, d: int, p: int) -> bool:
        if T <= 1:
            return False
        if self.keeps(T, d, p):
            return T * T * (d + p) <= self.ghost_ratio * self.kept_passes * p * d
        return T * (d + p) <= self.ghost_ratio * p * d

    def bk_plan(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, str]:
        T, d, p = _dims(args["input"], grad_output)
        out: Dict[str, str] = {}
        if "weight" in needs:
            if T == 1:
                out["weight"] = "rank-one norm ||g||·||a||; clipped sum (c∘g)ᵀa"
            elif self.use_ghost(T, d, p):
                out["weight"] = f"ghost norm (T={T}, d={d}, p={p}: cheaper than materializing); clipped sum (c∘g)ᵀa"
            elif self.keeps(T, d, p):
                out["weight"] = f"materialized [B, {p}, {d}] (T={T}: T²(d+p) > {self.kept_passes:g}·pd), kept for the clipped sum"
            else:
                out["weight"] = (f"materialized [B, {p}, {d}] (T={T}: T(d+p)={T * (d + p)} > pd={p * d}); "
                                 "clipped sum (c∘g)ᵀa")
        if "bias" in needs:
            out["bias"] = "per-sample Σ_t g (exact, [B, p])"
        return out

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        return self.norm_sample_sq_keep(args, grad_output, needs)[0]

    def bk_candidates(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Tuple[str, ...]:
        T, d, p = _dims(args["input"], grad_output)
        if "weight" not in needs or T == 1:  # rank one is cheapest at T = 1 by a factor p d / (d + p)
            return ()
        return ("ghost", "materialize") if self.use_ghost(T, d, p) else ("materialize", "ghost")

    def bk_keeps(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> bool:
        T, d, p = _dims(args["input"], grad_output)
        if T == 1:
            return False
        return "weight" not in needs or (not self.use_ghost(T, d, p) and self.keeps(T, d, p))

    def norm_sample_sq_keep(
        self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str], method: Optional[str] = None
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Rank one or ghost norms where cheaper (``method`` overrides the cost model:
        ``"ghost"`` or ``"materialize"``); a materialized sequence gradient
        ``[B, p, d]`` is kept (when no larger than the record) so the clipped sum
        is a contraction over B instead of another ``B T p d`` matmul."""
        a, g = args["input"], grad_output
        T, d, p = _dims(a, g)
        out: Dict[str, Tensor] = {}
        kept: Dict[str, Tensor] = {}
        if T == 1:  # rank one: ||g a^T||_F^2 = ||g||^2 ||a||^2 and ||grad b||^2 = ||g||^2, O(B (d + p))
            g_sq = sq_norms(g)
            if "weight" in needs:
                out["weight"] = sq_norms(a) * g_sq
            if "bias" in needs:
                out["bias"] = g_sq
            return out, kept
        a, g = _flat(a), _flat(g)
        if "weight" in needs:
            if method == "ghost" or (method is None and self.use_ghost(T, d, p)):
                out["weight"] = _ghost_norms(a, g)
            else:
                ps = torch.bmm(g.transpose(1, 2), a)
                out["weight"] = sq_norms(ps)
                if self.keeps(T, d, p):
                    kept["weight"] = ps
        if "bias" in needs:
            ps = g.sum(1)
            out["bias"] = sq_norms(ps)
            kept["bias"] = ps
        return out, kept

    clipped_sum_into = True

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str],
        into: Optional[Dict[str, Tensor]] = None,
    ) -> Dict[str, Tensor]:
        a, g = args["input"], grad_output
        T, d, p = _dims(a, g)
        f = factors if factors.dtype == g.dtype else factors.to(g.dtype)
        into = into or {}
        out: Dict[str, Tensor] = {}
        if "weight" in needs:  # bilinear in (a, g): scale the smaller of the two
            if d < p:
                lhs, rhs = _rows(g).t(), _rows(_scale_rows(a, f if a.dtype == f.dtype else f.to(a.dtype), T))
            else:
                lhs, rhs = _rows(_scale_rows(g, f, T)).t(), _rows(a)
            dst = into_target(into, "weight", lhs.dtype, (p, d))
            if dst is not None:
                dst.addmm_(lhs, rhs)  # no fresh [p, d] sum
            else:
                out["weight"] = lhs @ rhs
        if "bias" in needs:  # per-sample Σ_t g (at T = 1, g itself)
            s = weighted_sum(f, _rows(g) if T == 1 else _flat(g).sum(1), into.get("bias"))
            if s is not None:
                out["bias"] = s
        return out


def _scale_rows(t: Tensor, f: Tensor, T: int) -> Tensor:
    """``f_i * t_i`` for ``t: [B, ..., k]``, as ``[B, k]`` at ``T = 1`` or ``[B, T, k]``."""
    return _rows(t) * f.view(-1, 1) if T == 1 else _flat(t) * f.view(-1, 1, 1)


@register_module(nn.Linear)
def _linear_call(m: nn.Linear) -> ModuleCall:
    return ModuleCall(F.linear, params={"weight": "weight", "bias": "bias"})


@register_rule(aten.addmm.default)
class AddmmRule(PerSampleRule):
    """``addmm(bias, x, W, beta=1, alpha=1) = beta * bias + alpha * x @ W``: a
    linear layer with the weight stored ``[d, p]`` (Hugging Face GPT-2's
    ``Conv1D`` after ``x.view(-1, d)``, a folded batch). It is the linear rule on
    ``W^T`` (the same norms; gradients transposed), scaled by ``alpha``/``beta``."""

    name = "addmm"
    param_args = ("input", "mat2")
    input_arg = "mat1"
    folds = True

    def signature(self, input, mat1, mat2, beta=1, alpha=1):  # noqa: D401 - binding only
        pass

    def forward(self, op, args: Mapping[str, Any]) -> Any:
        return op(args["input"], args["mat1"], args["mat2"], beta=args.get("beta", 1), alpha=args.get("alpha", 1))

    def has_input_grad(self, args: Mapping[str, Any]) -> bool:
        return isinstance(args["mat1"], Tensor) and isinstance(args["mat2"], Tensor) and args["mat1"].dim() == 2

    def input_grad(self, args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        # d(alpha * x @ W)/dx = alpha * g @ W^T: no inner autograd graph, whose saved output
        # would add a [B*T, p] tensor per layer to the forward's memory (GPT-2's Conv1D)
        alpha = args.get("alpha", 1)
        g = grad_output.matmul(args["mat2"].to(grad_output.dtype).t())
        return (g if alpha == 1 else g * alpha).to(args["mat1"].dtype)

    def _linear(self, args: Mapping[str, Any], grad_output: Tensor) -> Tuple[Dict[str, Any], Tensor]:
        alpha = args.get("alpha", 1)
        return {"input": args["mat1"], "weight": args["mat2"].t()}, (grad_output if alpha == 1 else grad_output * alpha)

    @staticmethod
    def _names(needs: FrozenSet[str]) -> FrozenSet[str]:
        return frozenset({"mat2": "weight", "input": "bias"}[n] for n in needs)

    def _back(self, res: Dict[str, Tensor], args: Mapping[str, Any]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        if "weight" in res:
            out["mat2"] = res["weight"].transpose(-1, -2)
        if "bias" in res:
            beta, alpha = args.get("beta", 1), args.get("alpha", 1)
            b = res["bias"]
            out["input"] = b if beta == alpha else b * (beta / alpha)
        return out

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        la, g = self._linear(args, grad_output)
        return self._back(_LINEAR.grad_sample(la, g, self._names(needs)), args)

    factored = frozenset({"mat2"})

    def grad_factors(self, args: Mapping[str, Any], grad_output: Tensor, name: str) -> Optional[GradFactors]:
        """``grad W_i = a_iᵀ (alpha g_i)`` for the ``[d, p]`` weight: the linear rule's factors swapped."""
        if name != "mat2":
            return None
        la, g = self._linear(args, grad_output)
        return GradFactors(right=_flat(g), left=_flat(la["input"]))

    def bk_candidates(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Tuple[str, ...]:
        la, g = self._linear(args, grad_output)
        return _LINEAR.bk_candidates(la, g, self._names(needs))

    def bk_keeps(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> bool:
        la, g = self._linear(args, grad_output)
        return _LINEAR.bk_keeps(la, g, self._names(needs))

    def norm_sample_sq_keep(
        self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str], method: Optional[str] = None
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        la, g = self._linear(args, grad_output)
        norms, kept = _LINEAR.norm_sample_sq_keep(la, g, self._names(needs), method)
        ratio = (args.get("beta", 1) / args.get("alpha", 1)) ** 2
        if "bias" in norms and ratio != 1:
            norms["bias"] = norms["bias"] * ratio
        return {{"weight": "mat2", "bias": "input"}[k]: v for k, v in norms.items()}, self._back(kept, args)

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        return self.norm_sample_sq_keep(args, grad_output, needs)[0]

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str]
    ) -> Dict[str, Tensor]:
        la, g = self._linear(args, grad_output)
        return self._back(_LINEAR.clipped_sum(la, g, factors, self._names(needs)), args)

    def bk_plan(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, str]:
        la, g = self._linear(args, grad_output)
        plan = _LINEAR.bk_plan(la, g, self._names(needs))
        return {{"weight": "mat2", "bias": "input"}[k]: v for k, v in plan.items()}


_LINEAR = LinearRule()
