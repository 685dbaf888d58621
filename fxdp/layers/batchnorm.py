"""Per-sample normalization layers that replace BatchNorm (:mod:`fxdp.passes.batchnorm`
chooses and installs them): ``DPGroupNorm`` (group/instance/layer norm of each sample
alone) and ``FrozenBatchNorm`` (the running statistics as constants)."""
from __future__ import annotations

import itertools
import math
import warnings
import weakref
from typing import Dict, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UnsupportedModelError

__all__ = ["DPGroupNorm", "DPGroupNormAct", "FrozenBatchNorm", "FrozenBatchNormAct", "norm_groups"]


#: token -> the DPGroupNorm it names (the graph node passes the token, a string); weak:
#: a freed layer leaves nothing behind
_LAYERS: "weakref.WeakValueDictionary[str, DPGroupNorm]" = weakref.WeakValueDictionary()
_tokens = itertools.count()


def norm_groups(input: Tensor, num_groups: int, token: str) -> int:
    """``num_groups``, or ``1`` when a group of ``input`` (``[B, C, *spatial]``)
    would hold at most 2 values (their normalization is 0 or +-1); raises when the
    whole sample holds at most 2 values."""
    C = int(input.shape[1]) if input.dim() > 1 else 1
    spatial = math.prod(int(s) for s in input.shape[2:])
    if C // num_groups * spatial > 2:
        return num_groups
    where = token.rsplit("@", 1)[0]
    shape = "(B, " + ", ".join(str(int(s)) for s in input.shape[1:]) + ")"
    if C * spatial <= 2:
        raise UnsupportedModelError(
            f"fxdp: the BatchNorm replaced at '{where}' sees inputs of shape {shape}: {C * spatial} "
            "value(s) per sample, and any per-sample normalization of at most 2 values outputs constants (0 or "
            "+-1), erasing the feature. Fix: remove this BatchNorm, or use rewrite_options={'batchnorm': "
            "'freeze'} if its running statistics come from public data."
        )
    layer = _LAYERS.get(token)
    seen = layer.degenerate_inputs if layer is not None else {}
    key = tuple(int(s) for s in input.shape[1:])
    if key not in seen:
        seen[key] = 1
        warnings.warn(
            f"fxdp: the BatchNorm replaced at '{where}' sees inputs of shape {shape}: GroupNorm("
            f"{num_groups}, {C}) would normalize groups of {C // num_groups * spatial} value(s), which outputs "
            f"constants (0 or +-1) and erases the features; normalizing over all {C * spatial} values of each "
            "sample instead (layer norm, groups=1).",
            stacklevel=2,
        )
    return 1


torch.fx.wrap("norm_groups")  # one graph node: plain shape arithmetic at run time


class DPGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` replacing a BatchNorm: falls back to one group when a
    group would hold at most 2 values (see the module docstring)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 where: str = "", device=None, dtype=None) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.token = f"{where}@{next(_tokens)}"
        #: input shapes (without the batch) normalized with one group instead
        self.degenerate_inputs: Dict[Tuple[int, ...], int] = {}
        _LAYERS[self.token] = self

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, norm_groups(input, self.num_groups, self.token), self.weight, self.bias, self.eps)


class FrozenBatchNorm(nn.Module):
    """A BatchNorm's evaluation-mode map with its running statistics as constants
    (never updated, in any mode): ``(x - mean) / sqrt(var + eps) * weight + bias``
    per channel. Same parameters, buffers and ``state_dict`` keys as the BatchNorm."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise UnsupportedModelError(
                f"{type(bn).__name__}(track_running_stats=False) has no running statistics to freeze. Fix: use "
                "rewrite_options={'batchnorm': 'groupnorm'} (or 'layernorm'/'instancenorm')."
            )
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, input: Tensor) -> Tensor:
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               use_input_stats=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


class DPGroupNormAct(DPGroupNorm):
    """:class:`DPGroupNorm` replacing a norm-act layer (timm's ``BatchNormAct2d``:
    normalize, then ``drop``, then ``act``): the replacement keeps what the layer
    does after normalizing, so the model computes the same kind of function."""

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class FrozenBatchNormAct(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` of a norm-act layer (then ``drop``, then ``act``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))
