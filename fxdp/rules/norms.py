"""Per-sample rules for per-sample normalization layers: layer norm, group norm,
instance norm and RMS norm (functional forms, their ``torch.`` aliases and the
``nn`` modules).

All four normalize each sample with statistics of that sample alone, then apply
an affine map: ``y = x_hat * gamma + beta`` with ``x_hat`` the normalized input
(Ba et al. 2016, "Layer normalization"; Wu & He 2018, "Group normalization";
Ulyanov et al. 2016, "Instance normalization"; Zhang & Sennrich 2019, "Root mean
square layer normalization", which has no bias and no centring). The parameters
enter only through the affine map, so with output gradients ``g`` sample i's
gradients are reductions over the positions the parameter is broadcast along
(as in Opacus' ``layer_norm``/``group_norm``/``instance_norm`` grad samplers):

    grad gamma_i = sum_{broadcast positions} g_i * x_hat_i,
    grad beta_i  = sum_{broadcast positions} g_i,

where for layer/RMS norm the parameters have the normalized shape (the sum runs
over the leading, non-normalized dimensions of the sample) and for group and
instance norm they are per channel (the sum runs over the spatial dimensions).
``x_hat`` is recomputed in backward from the saved input with the same functional
op, weight and bias left out, so it matches the forward pass bit for bit.

The per-sample gradients are as small as the parameters, so the book-keeping
hooks (norms, clipped sum) use the base class' materializing defaults.

Refused: an instance norm that normalizes with the batch's own statistics *and*
updates running statistics (``nn.InstanceNorm*d(track_running_stats=True)`` in
training mode, ``F.instance_norm(..., running_mean, running_var,
use_input_stats=True)``): the running statistics are computed from the private
batch and would leak it. Evaluation-mode instance norm with tracked statistics
(``use_input_stats=False``) normalizes with fixed buffers and is supported.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedOpError
from ..layers.batchnorm import FrozenBatchNorm
from .base import FOLDED, SAVED, ModuleCall, PerSampleRule, batch_sum, register_module, register_rule, samples_per_slice

__all__ = ["LayerNormRule", "GroupNormRule", "InstanceNormRule", "RMSNormRule"]

aten = torch.ops.aten


def _shape(normalized_shape: Any) -> Tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _native_layout(x: Tensor) -> Tensor:
    """``x`` as ``native_group_norm`` takes it: contiguous, or on CPU also channels-last (4-d)."""
    if x.is_contiguous() or (x.device.type == "cpu" and x.dim() == 4
                             and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _channel_sum(t: Tensor, folded: bool = False) -> Tensor:
    """``[B, C, *spatial] -> [B, C]`` (``folded``: ``[B, k, C, *spatial]``, each sample's
    ``k`` rows summed too)."""
    dims = (1,) + tuple(range(3, t.dim())) if folded else tuple(range(2, t.dim()))
    return t.sum(dim=dims) if dims else t


class _AffineNormRule(PerSampleRule):
    """Shared ``grad_sample`` for ``y = normalize(x) * weight + bias``."""

    param_args: Tuple[str, ...] = ("weight", "bias")
    input_arg = "input"

    def _normalized(self, args: Mapping[str, Any]) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _reduce(self, t: Tensor, args: Mapping[str, Any], name: str) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        g = grad_output
        out: Dict[str, Tensor] = {}
        if "weight" in needs and args.get("weight") is not None:
            out["weight"] = self._weight_grads(args, g)
        if "bias" in needs and args.get("bias") is not None:
            out["bias"] = self._reduce(g, args, "bias")
        return out

    def _weight_grads(self, args: Mapping[str, Any], g: Tensor) -> Tensor:
        with torch.no_grad():
            xhat = self._normalized(args)  # a fresh tensor: g * x_hat is formed in it, not in a second one
            prod = xhat.mul_(g) if xhat.dtype == g.dtype and xhat.shape == g.shape else g * xhat.to(g.dtype)
        return self._reduce(prod, args, "weight")


class _TrailingNormRule(_AffineNormRule):
    """Parameters of the normalized (trailing) shape: layer norm, RMS norm."""

    folds = True

    def _reduce(self, t: Tensor, args: Mapping[str, Any], name: str) -> Tensor:
        return batch_sum(t, args[name].shape)


#: per-channel norms form ``x_hat`` and ``g * x_hat`` for a slice of the batch of about
#: this many bytes at a time: the two input-sized temporaries of timm ResNet10t's stem
#: GroupNorm (32x32, B = 16) took 7.9 MiB above the rest of the step; its step peak
#: 59.3 -> 57.2 MiB (1.30x -> 1.26x non-private)
_CHANNEL_NORM_SLICE_BYTES = 1 << 20


class _ChannelNormRule(_AffineNormRule):
    """Per-channel parameters (dim 1): group norm, instance norm."""

    def _reduce(self, t: Tensor, args: Mapping[str, Any], name: str) -> Tensor:
        return _channel_sum(t, bool(args.get(FOLDED)))

    def _weight_grads(self, args: Mapping[str, Any], g: Tensor) -> Tensor:
        # the statistics are each sample's own: normalizing a slice of the batch is exact
        x = args["input"]
        B = x.shape[0]
        n = samples_per_slice(_CHANNEL_NORM_SLICE_BYTES, x)
        if n >= B:
            return super()._weight_grads(args, g)
        out = g.new_empty(g.shape[:2])
        saved = args.get(SAVED)
        for s in range(0, B, n):
            part = dict(args, input=x[s:s + n])
            if saved is not None:  # per-sample statistics: sliced with the batch
                part[SAVED] = tuple(t[s:s + n] for t in saved)
            out[s:s + n] = super()._weight_grads(part, g[s:s + n])
        return out


# --------------------------------------------------------------------------- layer norm


@register_rule(F.layer_norm)
class LayerNormRule(_TrailingNormRule):
    """``F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)``."""

    name = "layer_norm"

    def signature(self, input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: D401
        pass

    def forward_saving(self, op, args: Mapping[str, Any]) -> Tuple[Any, Any]:
        # the op's own kernel (F.layer_norm runs native_layer_norm), with its statistics kept
        out, mean, rstd = aten.native_layer_norm(args["input"], list(_shape(args["normalized_shape"])),
                                                 args.get("weight"), args.get("bias"), args.get("eps", 1e-5))
        return out, (mean, rstd)

    def has_input_grad(self, args: Mapping[str, Any]) -> bool:
        return isinstance(args["input"], Tensor)

    def input_grad(self, args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        x, shape = args["input"], list(_shape(args["normalized_shape"]))
        mean, rstd = args.get(SAVED) or aten.native_layer_norm(x, shape, None, None, args.get("eps", 1e-5))[1:]
        return aten.native_layer_norm_backward(grad_output, x, shape, mean, rstd, args.get("weight"),
                                               args.get("bias"), [True, False, False])[0]

    def _normalized(self, args: Mapping[str, Any]) -> Tensor:
        saved = args.get(SAVED)
        if saved is not None:  # the forward's mean and 1/std: no second normalization
            mean, rstd = saved
            return torch.sub(args["input"], mean).mul_(rstd)
        return F.layer_norm(args["input"], _shape(args["normalized_shape"]), None, None, args.get("eps", 1e-5))


@register_rule(torch.layer_norm, torch.ops.aten.layer_norm.default)
class TorchLayerNormRule(LayerNormRule):
    """``torch.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True)``."""

    name = "torch.layer_norm"

    def signature(self, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):  # noqa: D401
        pass


@register_module(nn.LayerNorm)
def _layer_norm_call(m: nn.LayerNorm) -> ModuleCall:
    params = {n: n for n in ("weight", "bias") if getattr(m, n, None) is not None}
    return ModuleCall(F.layer_norm, params=params,
                      kwargs={"normalized_shape": tuple(m.normalized_shape), "eps": m.eps})


# --------------------------------------------------------------------------- RMS norm


@register_rule(F.rms_norm, torch.rms_norm, torch.ops.aten.rms_norm.default)
class RMSNormRule(_TrailingNormRule):
    """``F.rms_norm(input, normalized_shape, weight=None, eps=None)`` (``eps=None``:
    the machine epsilon of the input's dtype, as in PyTorch)."""

    name = "rms_norm"
    param_args = ("weight",)

    def signature(self, input, normalized_shape, weight=None, eps=None):  # noqa: D401
        pass

    def _normalized(self, args: Mapping[str, Any]) -> Tensor:
        return F.rms_norm(args["input"], _shape(args["normalized_shape"]), None, args.get("eps", None))


@register_module(nn.RMSNorm)
def _rms_norm_call(m: nn.RMSNorm) -> ModuleCall:
    params = {"weight": "weight"} if m.weight is not None else {}
    return ModuleCall(F.rms_norm, params=params,
                      kwargs={"normalized_shape": tuple(m.normalized_shape), "eps": m.eps})


# --------------------------------------------------------------------------- group norm


@register_rule(F.group_norm)
class GroupNormRule(_ChannelNormRule):
    """``F.group_norm(input, num_groups, weight=None, bias=None, eps=1e-5)`` on ``[B, C, *]``,
    or on a batch-major fold ``[B*k, C, *]`` (LeViT normalizes ``x.flatten(0, 1)``; each
    of a sample's ``k`` rows is normalized alone, and its gradients summed)."""

    name = "group_norm"
    folds = True

    def signature(self, input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: D401
        pass

    def forward_saving(self, op, args: Mapping[str, Any]) -> Tuple[Any, Any]:
        # the op's own kernel (F.group_norm runs native_group_norm), with its statistics kept
        x = _native_layout(args["input"])
        N, C, G = x.shape[0], x.shape[1], int(args["num_groups"])
        out, mean, rstd = aten.native_group_norm(x, args.get("weight"), args.get("bias"), N, C, x[0, 0].numel(), G,
                                                 args.get("eps", 1e-5))
        return out, (mean, rstd)

    def has_input_grad(self, args: Mapping[str, Any]) -> bool:
        x = args["input"]
        return isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] > 0

    def input_grad(self, args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        x = args["input"].contiguous()
        N, C, G = x.shape[0], x.shape[1], int(args["num_groups"])
        mean, rstd = args.get(SAVED) or aten.native_group_norm(x, None, None, N, C, x[0, 0].numel(), G,
                                                               args.get("eps", 1e-5))[1:]
        return aten.native_group_norm_backward(grad_output.contiguous(), x, mean, rstd, args.get("weight"), N, C,
                                               x[0, 0].numel(), G, [True, False, False])[0]

    def _normalized(self, args: Mapping[str, Any]) -> Tensor:
        x, saved = args["input"], args.get(SAVED)
        if args.get(FOLDED):  # [B, k, C, *]: the forward normalized its B*k rows
            rows = x.flatten(0, 1)
            saved = tuple(t.flatten(0, 1) for t in saved) if saved is not None else None
            return self._normalized(dict(args, input=rows, **{FOLDED: False, SAVED: saved})).reshape(x.shape)
        if saved is not None:  # the forward's per-(sample, group) mean and 1/std
            mean, rstd = saved
            groups = x.reshape(x.shape[0], mean.shape[1], -1)
            return torch.sub(groups, mean.unsqueeze(-1)).mul_(rstd.unsqueeze(-1)).reshape(x.shape)
        return F.group_norm(x, int(args["num_groups"]), None, None, args.get("eps", 1e-5))


@register_rule(torch.group_norm, torch.ops.aten.group_norm.default)
class TorchGroupNormRule(GroupNormRule):
    """``torch.group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True)``."""

    name = "torch.group_norm"

    def signature(self, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):  # noqa: D401
        pass


@register_module(nn.GroupNorm)
def _group_norm_call(m: nn.GroupNorm) -> ModuleCall:
    params = {n: n for n in ("weight", "bias") if getattr(m, n, None) is not None}
    return ModuleCall(F.group_norm, params=params, kwargs={"num_groups": m.num_groups, "eps": m.eps})


# --------------------------------------------------------------------------- instance norm

_RUNNING_STATS_MSG = (
    "{what} normalizes with the batch's own statistics while updating running statistics "
    "(InstanceNorm with track_running_stats=True in training mode): the running mean and variance are "
    "computed from the private batch and would leak it. Fix: construct the layer with "
    "track_running_stats=False (or call F.instance_norm without running_mean/running_var)."
)


def _check_instance_norm(what: str, args: Mapping[str, Any]) -> None:
    running = args.get("running_mean") is not None or args.get("running_var") is not None
    if running and args.get("use_input_stats", True):
        raise UnsupportedOpError(_RUNNING_STATS_MSG.format(what=what))


@register_rule(F.instance_norm)
class InstanceNormRule(_ChannelNormRule):
    """``F.instance_norm(input, running_mean=None, running_var=None, weight=None,
    bias=None, use_input_stats=True, momentum=0.1, eps=1e-5)`` on ``[B, C, *]``."""

    name = "instance_norm"

    def signature(self, input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):  # noqa: D401
        pass

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        bound = super().bind(args, kwargs)
        _check_instance_norm(self.name, bound)
        return bound

    def forward(self, op, args):
        _check_instance_norm(self.name, args)
        return op(**args)

    def _normalized(self, args: Mapping[str, Any]) -> Tensor:
        x = args["input"]
        eps = args.get("eps", 1e-5)
        if args.get("use_input_stats", True):
            return F.instance_norm(x, None, None, None, None, True, 0.0, eps)
        # fixed running statistics (evaluation mode): an elementwise per-channel map
        view = (1, -1) + (1,) * (x.dim() - 2)
        rm = args["running_mean"].to(x.dtype).view(view)
        rv = args["running_var"].to(x.dtype).view(view)
        return (x - rm) * torch.rsqrt(rv + eps)


@register_rule(torch.instance_norm, torch.ops.aten.instance_norm.default)
class TorchInstanceNormRule(InstanceNormRule):
    """``torch.instance_norm(input, weight, bias, running_mean, running_var,
    use_input_stats, momentum, eps, cudnn_enabled)`` (all positional in ATen)."""

    name = "torch.instance_norm"

    def signature(self, input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                  cudnn_enabled):  # noqa: D401
        pass


@register_module(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _instance_norm_call(m: nn.modules.instancenorm._InstanceNorm) -> ModuleCall:
    if m.track_running_stats and m.training:
        raise UnsupportedOpError(_RUNNING_STATS_MSG.format(what=f"{type(m).__name__}({m.num_features})"))
    params = {n: n for n in ("weight", "bias") if getattr(m, n, None) is not None}
    if m.track_running_stats:
        # the running buffers are module attributes (like the parameters), so they
        # follow .to(device) and load_state_dict; they are never trainable
        params.update(running_mean="running_mean", running_var="running_var")
    # evaluation mode with tracked statistics normalizes with the fixed buffers; note
    # the mode is read when the call is built (privatize time)
    kwargs: Dict[str, Any] = {
        "use_input_stats": m.training or not m.track_running_stats,
        "momentum": m.momentum if m.momentum is not None else 0.0,
        "eps": m.eps,
    }
    return ModuleCall(F.instance_norm, params=params, kwargs=kwargs)


@register_module(FrozenBatchNorm)
def _frozen_bn_call(m: FrozenBatchNorm) -> ModuleCall:
    # fixed statistics: the instance norm rule's evaluation mode (a per-channel affine map)
    params = {n: n for n in ("weight", "bias") if getattr(m, n) is not None}
    params.update(running_mean="running_mean", running_var="running_var")
    return ModuleCall(F.instance_norm, params=params, kwargs={"use_input_stats": False, "momentum": 0.0, "eps": m.eps})
