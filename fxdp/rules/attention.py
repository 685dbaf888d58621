"""Per-sample rules for the ops of fxdp's DP multi-head attention
(:mod:`fxdp.layers.attention`): one projection out of packed q/k/v weights, and the
bias appended to keys/values."""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.attention import Rows, append_kv_bias, packed_linear
from .base import PerSampleRule, register_rule, rule_for_op

__all__ = ["PackedLinearRule", "AppendKVBiasRule"]


def _pad_rows(t: Tensor, shape: torch.Size, rows: Rows) -> Tensor:
    """``[B, r, ...]`` per-sample gradients of a row block -> ``[B, *shape]``."""
    if rows is None:
        return t
    full = t.new_zeros((t.shape[0],) + tuple(shape))
    full[:, rows[0]:rows[1]] = t
    return full


@register_rule(packed_linear)
class PackedLinearRule(PerSampleRule):
    """``packed_linear``: the linear rule on the used row block, zeros elsewhere
    (a parameter used by several blocks sums them, as for any tied weight)."""

    name = "packed_linear"

    def signature(self, input, weight, bias=None, rows=None, bias_rows=None):  # noqa: D401 - binding only
        pass

    @staticmethod
    def _linear() -> PerSampleRule:
        rule = rule_for_op(F.linear)
        assert rule is not None
        return rule

    @staticmethod
    def _sliced(args: Mapping[str, Any]) -> Dict[str, Any]:
        w, b, r, br = args["weight"], args.get("bias"), args.get("rows"), args.get("bias_rows")
        return {
            "input": args["input"],
            "weight": w if r is None else w[r[0]:r[1]],
            "bias": b if b is None or br is None else b[br[0]:br[1]],
        }

    def _pad(self, out: Dict[str, Tensor], args: Mapping[str, Any]) -> Dict[str, Tensor]:
        res = {}
        for name, key in (("weight", "rows"), ("bias", "bias_rows")):
            if name in out:
                res[name] = _pad_rows(out[name], args[name].shape, args.get(key))
        return res

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        return self._pad(self._linear().grad_sample(self._sliced(args), grad_output, needs), args)

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        # the zero rows add nothing to the norm: the linear rule's norms (ghost or not) are exact
        return self._linear().norm_sample_sq(self._sliced(args), grad_output, needs)

    def clipped_sum(self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor,
                    needs: FrozenSet[str]) -> Dict[str, Tensor]:
        out = self._linear().clipped_sum(self._sliced(args), grad_output, factors, needs)
        res = {}
        for name, key in (("weight", "rows"), ("bias", "bias_rows")):
            if name in out:
                r = args.get(key)
                if r is None:
                    res[name] = out[name]
                else:
                    full = out[name].new_zeros(args[name].shape)
                    full[r[0]:r[1]] = out[name]
                    res[name] = full
        return res


@register_rule(append_kv_bias)
class AppendKVBiasRule(PerSampleRule):
    """``append_kv_bias``: sample i's gradient is its output gradient at the
    appended position, ``grad bias_i = g_{i, S}``."""

    name = "kv_bias"
    param_args = ("bias",)

    def signature(self, input, bias):  # noqa: D401 - binding only
        pass

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        if "bias" not in needs:
            return {}
        g = grad_output[:, -1]
        return {"bias": g.reshape((g.shape[0],) + tuple(args["bias"].shape))}
