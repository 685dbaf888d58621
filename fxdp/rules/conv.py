"""Per-sample rules for convolutions: ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``
and the modules ``nn.Conv1d/2d/3d`` (every ``padding_mode``) and
``nn.ConvTranspose1d/2d/3d``.

Math. For ``y = conv(x, W) + b`` with groups ``G`` let ``P_i[t]`` be sample i's
input patch under output position t (``C/G * prod(k)`` values per group, read from
the *padded* input) and ``g_i[t]`` the output gradient there. Sample i's gradient
is a sum of outer products over the T output positions (Goodfellow 2015,
"Efficient per-example gradient computations"; Rochette et al. 2019, "Efficient
per-example gradient computations in convolutional neural networks"):

    grad W_i[group] = sum_t g_i[t, group]^T P_i[t, group],     grad b_i = sum_t g_i[t].

Padding modes. ``nn.ConvNd`` with ``padding_mode`` reflect / replicate / circular
pads the input with ``F.pad`` and convolves with no padding; the patches ``P_i``
must then be read from *that* padded input, not from a zero-padded one (Opacus
1.6 unfolds with zero padding: its per-sample gradients are wrong for reflect,
replicate and circular padding, checked against batch-of-one gradients). The module adapter maps these
modules onto :func:`conv_nd`, which mirrors ``nn.ConvNd._conv_forward`` exactly,
and the rule pads the recorded input the same way before extracting gradients.

Transposed convolutions are the adjoints of convolutions: ``<conv_transpose(x, W),
g> = <x, conv(g, W)>`` with the same stride, padding, dilation and groups (the
output padding only fixes the output's size), so the per-sample gradient of
``conv_transpose`` is the per-sample gradient of a plain convolution whose input
is the output gradient ``g`` and whose output gradient is ``x``.

Per-sample weight gradients: four exact methods (``groups``, ``unfold`` (also, on small maps,
for layers whose windows do not overlap and inputs of channel counts off oneDNN's block of 8,
as RGB stems), ``pointwise`` for 1x1 layers,
``correlate`` for depthwise and single-channel ones), chosen per layer
from the shapes by ``ConvRule.method``; they, their patches and their measurements
are in :mod:`fxdp.rules.conv_grads`.

Book-keeping (Bu et al. 2023). ``norm_sample_sq`` uses the ghost norm (Li et al.
2021) ``||grad W_i||^2 = sum_groups <P_i P_i^T, g_i g_i^T>`` (two T x T Gram
matrices, the patches' formed from the pixels' where cheaper:
:func:`~fxdp.rules.conv_grads.patch_gram_costs`) when its cost ``T^2 (d + p)`` is
below ``ghost_ratio * T p d`` of the materialized gradient (per group, ``d = C/G
prod(k)``, ``p = O/G``; this also bounds the Gram matrices' memory by that of the
gradients), or below
``unkept_ghost_ratio`` (1.3) times that where the materialized gradients would not
be kept (measured: the Gram matrices' matmuls beat the per-sample methods per
multiply-add, ResNet18 at 32x32 inputs 1.64x -> 1.51x non-private at B = 64), else it materializes
with the method chosen above. ``clipped_sum`` scales the output gradient by the
clipping factors and takes one ordinary weight gradient
(``aten.convolution_backward``), never forming per-sample gradients; on maps of
at most ``sum_unfold_max_positions`` (4) positions it is patches + one matmul
instead, and on ``correlate`` layers the per-sample correlations of the scaled output
gradient summed over the batch, a slice at a time (:func:`~fxdp.rules.conv_grads.sum_correlate`;
ms, batch 16, weight gradient / matmul: 512->512 3x3 at 1x1 18.0 / 2.4,
256->512 stride 2 at 2x2 4.7 / 0.8, 256->256 at 2x2 4.1 / 1.7; at 4x4, T = 16,
the weight gradient wins: 0.87 / 1.38). Measured
(same machine, but busy, so only the ratios mean much; ms, batch 128): norms of
CIFAR 128->256 @4 ghost 7.6 vs materialized 247, 256->256 @4 24 vs 234, 64->128 @8
36 vs 91; ``clipped_sum`` vs per-sample gradients + weighted sum 12-40 vs 58-274 on
those layers and 2.2 vs 7.8 on MNIST 1->16.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedOpError
from .base import (
    KEPT_PASSES, SCRATCH, ModuleCall, PerSampleRule, into_target, register_module, register_rule,
    samples_per_slice, sq_norms, weighted_sum,
)
from .conv_grads import (
    KEPT_PATCH_ROWS_MAX_BYTES, Geom, f_pad_arg, ghost_norms, ghost_norms_keeping_rows, gram_from_pixels, layout_of,
    ps_correlate, ps_groups, ps_pointwise, ps_unfold, sum_correlate, sum_patch_rows, sum_unfold, weight_shape, wgrad,
)

aten = torch.ops.aten

__all__ = ["conv_nd", "conv_transpose_nd", "ConvRule", "ConvNdRule", "ConvTransposeRule", "ConvTransposeNdRule"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PAD_MODES = ("zeros", "reflect", "replicate", "circular")
#: on CPU a convolution's input gradient runs a slice of the batch of about this many bytes
#: (input and output gradient) at a time: oneDNN reorders the whole batch's output and input
#: gradients into its blocked layout, two temporaries of the input gradient's size at once
#: (the CIFAR-10 CNN's 32->32 layer at B = 128: 32 MiB of the step's peak); sliced they are
#: a slice's, and as fast or faster (ms, 1 thread, whole / sliced: 32->32 3x3 at 32x32
#: B = 128 12.6 / 12.3, B = 512 124 / 71; 64->64 at 16x16 B = 128 10.0 / 9.9)
INPUT_GRAD_SLICE_BYTES = 4 << 20


# ----------------------------------------------------------------------------
# functional ops for the modules
# ----------------------------------------------------------------------------
def _tuple(v: Any, n: int, what: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(e) for e in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"{what} must be an int or {n} ints, got {v}")
    return v


def _pad_pairs(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> List[Tuple[int, int]]:
    """Per spatial dim ``(left, right)`` padding, as PyTorch computes it (``"same"``
    puts the odd extra element on the right)."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * n
        if padding == "same":
            out = []
            for d, k in zip(dilation, kernel):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return out
        raise ValueError(f"invalid padding string {padding!r}, should be 'same' or 'valid'")
    return [(p, p) for p in _tuple(padding, n, "padding")]


def conv_nd(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """``nn.Conv{1,2,3}d``'s forward as a function (dimension from ``weight``): for
    ``padding_mode != "zeros"`` the input is padded with ``F.pad(..., mode=padding_mode)``
    (``"same"`` asymmetric like the module) and convolved with no padding, exactly as
    ``nn.ConvNd._conv_forward``."""
    n = weight.dim() - 2
    conv = _CONV[n]
    if padding_mode == "zeros":
        return conv(input, weight, bias, stride, padding, dilation, groups)
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {_PAD_MODES}, got {padding_mode!r}")
    k = tuple(weight.shape[2:])
    pairs = _pad_pairs(padding, k, _tuple(dilation, n, "dilation"))
    return conv(F.pad(input, f_pad_arg(pairs), mode=padding_mode), weight, bias, stride, 0, dilation, groups)


def _transpose_output_padding(
    input: Tensor,
    output_size: Optional[Sequence[int]],
    output_padding: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
) -> Any:
    """``nn.ConvTransposeNd._output_padding``: the output padding giving ``output_size``."""
    if output_size is None:
        return output_padding
    n = len(kernel)
    output_size = list(output_size)
    if len(output_size) == n + 2:
        output_size = output_size[2:]
    if len(output_size) != n:
        raise ValueError(f"output_size must have {n} or {n + 2} elements (got {len(output_size)})")
    res = []
    for d in range(n):
        lo = (input.size(d + 2) - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + 1
        if not lo <= output_size[d] <= lo + stride[d] - 1:
            raise ValueError(f"requested an output size of {output_size}, but valid sizes range from a minimum of {lo}")
        res.append(output_size[d] - lo)
    return tuple(res)


def conv_transpose_nd(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
    output_size: Optional[Sequence[int]] = None,
) -> Tensor:
    """``nn.ConvTranspose{1,2,3}d``'s forward as a function (``output_size`` picks the
    output padding as the module does)."""
    n = weight.dim() - 2
    if output_size is not None:
        output_padding = _transpose_output_padding(
            input,
            output_size,
            output_padding,
            _tuple(stride, n, "stride"),
            _tuple(padding, n, "padding"),
            tuple(weight.shape[2:]),
            _tuple(dilation, n, "dilation"),
        )
    return _CONV_T[n](input, weight, bias, stride, padding, output_padding, groups, dilation)


# ----------------------------------------------------------------------------
# the call's geometry
# ----------------------------------------------------------------------------
def _check_batched(input: Tensor, weight: Tensor, what: str) -> None:
    n = weight.dim() - 2
    if not isinstance(input, Tensor) or input.dim() != n + 2:
        rank = input.dim() if isinstance(input, Tensor) else type(input).__name__
        raise UnsupportedOpError(
            f"{what}: per-sample gradients need a batched input of rank {n + 2} "
            f"([B, C, {', '.join('*' * n)}]), got rank {rank}"
            + (" (an unbatched input)." if rank == n + 1 else ".")
            + " Fix: add the batch dimension (x.unsqueeze(0)) before the layer."
        )


def _conv_geom(args: Mapping[str, Any]) -> Geom:
    x, w = args["input"], args["weight"]
    _check_batched(x, w, f"conv{w.dim() - 2}d")
    k = tuple(w.shape[2:])
    mode = args.get("padding_mode", "zeros") or "zeros"
    static = (k, _hashable(args.get("stride", 1)), _hashable(args.get("padding", 0)),
              _hashable(args.get("dilation", 1)), mode)
    try:
        hash(static)
    except TypeError:  # an argument type the cache cannot key: formed afresh
        stride, pad, dilation, pairs = _static_geom.__wrapped__(*static)
    else:
        stride, pad, dilation, pairs = _static_geom(*static)
    if pairs is not None:
        x = F.pad(x, f_pad_arg(pairs), mode="constant" if mode == "zeros" else mode)
    return Geom(x, k, stride, pad, dilation, int(args.get("groups", 1)))


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v  # ATen overloads take lists


@functools.lru_cache(maxsize=1024)
def _static_geom(k: Tuple[int, ...], stride: Any, padding: Any, dilation: Any, mode: str):
    """``(stride, pad, dilation, pairs)`` of a convolution's static arguments: symmetric zero
    padding ``pad``, or ``pairs`` to pad the input with first (``None``: nothing to pad).
    Formed once per layer configuration: the rule asks for it up to four times a step."""
    n = len(k)
    stride, dilation = _tuple(stride, n, "stride"), _tuple(dilation, n, "dilation")
    pairs = _pad_pairs(padding, k, dilation)
    if mode == "zeros" and all(a == b for a, b in pairs):
        return stride, tuple(a for a, _ in pairs), dilation, None
    return stride, (0,) * n, dilation, (tuple(pairs) if any(a or b for a, b in pairs) else None)


def _transpose_geom(args: Mapping[str, Any], grad_output: Tensor) -> Tuple[Geom, Tensor]:
    """The plain convolution whose per-sample weight gradients are those of the
    transposed convolution: input ``g``, output gradient ``x``."""
    x, w = args["input"], args["weight"]
    _check_batched(x, w, f"conv_transpose{w.dim() - 2}d")
    n = w.dim() - 2
    stride = _tuple(args.get("stride", 1), n, "stride")
    dilation = _tuple(args.get("dilation", 1), n, "dilation")
    pad = _tuple(args.get("padding", 0), n, "padding")
    k = tuple(w.shape[2:])
    g = grad_output
    # an output padding >= stride (allowed when dilation > stride) adds output
    # positions no input reaches: cut the (zero-padded) gradient to the reached span
    reach = [(x.shape[2 + i] - 1) * stride[i] + (k[i] - 1) * dilation[i] + 1 for i in range(n)]
    if any(g.shape[2 + i] + 2 * pad[i] - reach[i] >= stride[i] for i in range(n)):
        if any(pad):
            g = F.pad(g, f_pad_arg([(p, p) for p in pad]))
        for i in range(n):
            g = g.narrow(2 + i, 0, reach[i])
        pad = (0,) * n
    return Geom(g, k, stride, pad, dilation, int(args.get("groups", 1))), x


def _pointwise(geo: Geom) -> bool:
    """A 1x1 convolution at stride 1, unpadded, one group: a matmul per position."""
    return geo.groups == 1 and all(k == 1 for k in geo.k) and all(s == 1 for s in geo.stride) and not any(geo.pad)


def _disjoint(geo: Geom) -> bool:
    """Whether the windows do not overlap (each stride at least the dilated kernel, no
    padding: 1x1 layers, ViT's and ConvNeXt's patchify stems and downsampling, ResNet's
    strided 1x1 shortcuts). The patches are then a copy of at most the input and the layer
    is a linear layer over positions, with the linear rule's costs: per-sample gradients by
    ``unfold`` + one batched matmul, and when kept, ghost norms only under its bound."""
    return not any(geo.pad) and all(s >= d * (k - 1) + 1 for k, s, d in zip(geo.k, geo.stride, geo.dilation))


class _ConvMath:
    """Shared per-sample machinery; rules provide ``_setup(args, g) -> (geo, gout)``."""

    #: per-sample weight gradients by batch-as-groups conv backward when the
    #: per-group weight ``O/G x C/G prod(k)`` has at most this many entries per
    #: output position (``T``), else by unfold + bmm (measured, see the module doc)
    groups_weight_per_position: float = 1000.0
    #: ... but by unfold + bmm (sliced) on maps of at most ``unfold_max_positions`` output
    #: positions for layers of disjoint windows (:func:`_disjoint`) and for inputs whose channel
    #: count is not a multiple of ``channel_block`` (RGB stems; DenseNet-like widths), where
    #: the batch-as-groups weight gradient takes oneDNN's slow path (it blocks channels by 8
    #: on AVX2; measured there). ms, 1 thread, B = 16, groups against unfold: RGB 3->32 3x3 at
    #: 32x32 1.73 / 0.82, 3->16 3x3 stride 2 at 64x64 1.56 / 0.76, ResNet's 7x7 stride-2 stem at
    #: 32x32 2.07 / 1.45 (T = 256), 5x5 stride 2 at 64x64 5.18 / 2.40, 4x4 patchify at 128x128
    #: 3.54 / 2.67 (T = 1024), 12->32 3x3 at 32x32 3.93 / 2.20, 36->48 at 16x16 3.12 / 1.95;
    #: from T = 2304 even (3x3 stride 2 at 96x96 2.71 / 2.81), at 224x224 groups wins (3x3
    #: stride 2 6.85 / 15.9, 4x4 patchify 8.12 / 9.84). Multiples of 8: groups (8->32 3x3 at
    #: 32x32 1.68 / 1.71, 24->32 3.02 / 4.04, 40->48 at 16x16 1.84 / 2.20, 48->64 at 8x8 0.75 / 1.04).
    #: The channel rule is for 2-d layers only: 1-d even (µs, 3->32 k5 at 256 212 / 272, 12->32 k3
    #: at 128 229 / 204), 3-d mixed (12->16 3x3x3 at 8^3 2910 / 3449); disjoint windows win at any
    #: rank (3-d 3->32 2x2x2 stride 2 at 16^3 683 / 389, 1-d 3->64 k4 stride 4 174 / 148)
    unfold_max_positions: int = 1024
    channel_block: int = 8
    #: layers with one input channel per group and a kernel of at least this many taps:
    #: per-sample weight gradients by ``ps_correlate`` (depthwise layers at any stride;
    #: a single-channel input, as MNIST's first layer, up to
    #: ``correlate_max_positions_one_channel`` output positions; measured, see
    #: :mod:`fxdp.rules.conv_grads`)
    correlate_min_kernel: int = 1
    correlate_max_positions_one_channel: int = 1024
    #: 1x1 convolutions (stride 1, no padding, one group): per-sample weight gradients by
    #: one batched matmul on views of the input and output gradient (``ps_pointwise``)
    pointwise: bool = True
    #: ghost norms when ``T (d + p) <= ghost_ratio * p d`` (per group) ...
    ghost_ratio: float = 1.0
    #: ... and up to ``ghost_ratio * unkept_ghost_ratio`` where materialized gradients would
    #: not be kept (``keep_ratio``): both methods then pay a weight-gradient convolution for
    #: the clipped sum, and the Gram matrices' batched matmuls do more multiply-adds a
    #: millisecond than the per-sample methods. ms, 1 thread, B = 16 / 64, ghost norms + sum
    #: against materialized + sum (``T (d + p) / p d``): ResNet18's 64->64 at 8x8 (1.11) 2.0 /
    #: 8.7 against 5.7 / 21.0, 128->64 at 8x8 (1.06) 3.7 / 15.2 against 4.6 / 38.4, 128->128
    #: at 12x12 (1.25) 15.2 / 62.2 against 17.5 / 103.2; 48->48 at 8x8 (1.48) 1.42 / 5.39
    #: against 1.21 / 5.37. Kept ones win at 1.2 (ConvNeXt's 40->80 2x2 stride 2: 0.59 / 3.0
    #: against 0.99 / 4.3)
    unkept_ghost_ratio: float = 1.3
    #: a layer of disjoint windows (:func:`_disjoint`: 1x1, patchify, strided 1x1) whose
    #: materialized gradients would be kept is a linear layer over positions and takes the
    #: linear rule's bound: ghost norms only when ``T^2 (d + p) <= ghost_ratio * kept_passes *
    #: p d`` (the kept gradients' clipped sum is a contraction, not a weight-gradient pass).
    #: ms, 1 thread, B = 16 / 64, ghost norms + sum against kept + contraction: ConvNeXt-atto's
    #: 80->320 at 8x8 2.4 / 11.5 against 0.66 / 3.4, 320->80 1.47 / 7.1 against 0.67 / 4.3;
    #: MobileNetV3's 40->120 at 4x4 0.22 / 0.39 against 0.08 / 0.22; in the whole step
    #: (interleaved A/B, B = 16 / 64) ConvNeXt-atto 1.40x / 1.22x -> 1.40x / 1.17x
    #: non-private, MobileNetV3 1.40x / 1.03x -> 1.38x / 1.03x. Their per-sample gradients by
    #: ``unfold`` (µs, B = 16 / 64, ghost + sum against ``groups`` and ``unfold``, kept + contraction):
    #: HF ViT's 3->128 8x8 patchify at 64x64 1406 / 5970 against 1112 / 4687 and 819 / 4412;
    #: ConvNeXt-atto's 40->80 2x2 stride 2 at 16x16 1050 / 4023 against 1411 / 2817 and
    #: 492 / 1909; ResNet18's 1x1 stride-2 64->128 at 8x8 288 / 671 against 958 / 2401 and
    #: 121 / 396; a one-channel 8x8 patchify at 64x64 by ``correlate`` 437, ``unfold`` 260
    kept_passes: float = KEPT_PASSES
    #: materialized per-sample weight gradients are kept for the clipped sum when at most
    #: this many times the record (input and output gradient): recomputing them costs a
    #: weight-gradient convolution, and the batch-as-groups one costs 1-5x an ordinary one;
    #: so are a ghost norm's patch rows (:meth:`keeps_patch_rows`)
    keep_ratio: float = 2.0
    #: book-keeping's clipped sum by patches + matmul (``sum_unfold``) when the output
    #: map has at most this many positions, else by the weight-gradient convolution
    #: (measured, see the module doc)
    sum_unfold_max_positions: int = 4

    def _setup(self, args: Mapping[str, Any], grad_output: Tensor) -> Tuple[Geom, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def method(self, geo: Geom, gout: Tensor) -> str:
        """``"pointwise"``, ``"correlate"``, ``"groups"`` or ``"unfold"`` for the per-sample
        weight gradients."""
        if self.pointwise and _pointwise(geo):
            return "pointwise"
        T = math.prod(gout.shape[2:])
        small = T <= self.unfold_max_positions
        if small and geo.groups == 1 and _disjoint(geo):
            return "unfold"
        if geo.x.shape[1] == geo.groups and math.prod(geo.k) >= self.correlate_min_kernel and (
            geo.groups > 1 or T <= self.correlate_max_positions_one_channel
        ):
            return "correlate"
        if small and geo.n == 2 and geo.groups == 1 and geo.x.shape[1] % self.channel_block:
            return "unfold"
        per_group = (gout.shape[1] // geo.groups) * (geo.x.shape[1] // geo.groups) * math.prod(geo.k)
        return "groups" if per_group <= self.groups_weight_per_position * T else "unfold"

    def _ghost_bound(self, geo: Geom, gout: Tensor) -> float:
        """The largest ``T (d + p) / p d`` served by ghost norms at these shapes."""
        return self.ghost_ratio * (1.0 if self._would_keep(geo, gout) else self.unkept_ghost_ratio)

    def _would_keep(self, geo: Geom, gout: Tensor) -> bool:
        """Whether materialized per-sample gradients would be kept: at most ``keep_ratio``
        times the record (input and output gradient)."""
        return self._over_record(geo, gout) <= self.keep_ratio

    @staticmethod
    def _over_record(geo: Geom, gout: Tensor) -> float:
        """The per-sample weight gradients' size over the record's (input and output gradient)."""
        return gout.shape[0] * math.prod(weight_shape(geo, gout)) / max(1, gout.numel() + geo.x.numel())

    def keeps_patch_rows(self, geo: Geom, gout: Tensor) -> bool:
        """Whether ghost norms keep the patch rows they form for the clipped sum
        (:func:`~fxdp.rules.conv_grads.sum_patch_rows`): formed from the patches (not the
        pixels'), the whole batch's within ``KEPT_PATCH_ROWS_MAX_BYTES`` and ``keep_ratio``
        times the record (input and output gradient), of one dtype with the output gradient."""
        if geo.x.dtype != gout.dtype or gram_from_pixels(geo, gout.shape[2:], gout.element_size()):
            return False
        rows = gout.shape[0] * math.prod(gout.shape[2:]) * geo.x.shape[1] * math.prod(geo.k)
        return (rows * geo.x.element_size() <= KEPT_PATCH_ROWS_MAX_BYTES
                and rows <= self.keep_ratio * (gout.numel() + geo.x.numel()))

    def use_ghost(self, geo: Geom, gout: Tensor) -> bool:
        return self._ghost_test(geo, gout)[0]

    def _ghost_test(self, geo: Geom, gout: Tensor, explain: bool = False) -> Tuple[bool, str]:
        """Whether ghost norms serve these shapes, and (``explain``) the comparison that decided."""
        T = math.prod(gout.shape[2:])
        d = geo.x.shape[1] // geo.groups * math.prod(geo.k)
        p = gout.shape[1] // geo.groups
        if T > 1 and geo.groups == 1 and _disjoint(geo) and self._would_keep(geo, gout):
            cost, factor, what = T * T * (d + p), self.ghost_ratio * self.kept_passes, "disjoint windows, kept: T²(d+p)"
        else:  # T = 1: the rank-one norm |g|^2 |a|^2
            cost, factor, what = T * (d + p), self._ghost_bound(geo, gout), "T(d+p)"
        ghost = cost <= factor * p * d
        bound = f"pd={p * d}" if factor == 1 else f"{factor:g}·pd={factor * p * d:.0f}"
        return ghost, (f"T={T}: {what}={cost} {'<=' if ghost else '>'} {bound}" if explain else "")

    def bk_plan(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, str]:
        geo, gout = self._setup(args, grad_output)
        out: Dict[str, str] = {}
        if "weight" in needs:
            ghost, why = self._ghost_test(geo, gout, explain=True)
            if ghost:
                pixels = gram_from_pixels(geo, gout.shape[2:], gout.element_size())
                gram = "; the patches' Gram matrix from the pixels'" if pixels else ""
                summed = ("one matmul of c∘g on the ghost norm's patch rows (kept)" if self.keeps_patch_rows(geo, gout)
                          else "one weight-gradient convolution of c∘g")
                out["weight"] = f"ghost norm ({why}{gram}); clipped sum: {summed}"
            else:
                if not self._would_keep(geo, gout):
                    summed = ("clipped sum: one weight-gradient convolution of c∘g (per-sample gradients "
                              f"over {self.keep_ratio:g}x the layer's record)")
                elif self.bk_keeps(args, grad_output, frozenset({"weight"})):
                    summed = "kept for the clipped sum (no larger than the layer's record: formed as it arrives)"
                else:
                    summed = (f"kept for the clipped sum (up to {self.keep_ratio:g}x the layer's record: formed at the "
                              "end of the backward pass)")
                out["weight"] = f"materialized by {self.method(geo, gout)} ({why}); {summed}"
        if "bias" in needs:
            out["bias"] = "per-sample Σ g over positions"
        return out

    def _methods(self, geo: Geom, gout: Tensor) -> Tuple[str, ...]:
        """The exact per-sample methods at these shapes, the cost model's (:meth:`method`)
        first: ``groups`` and ``unfold`` always (both slice the batch); ``correlate`` with one
        input channel per group; ``pointwise`` for 1x1 layers."""
        best = self.method(geo, gout)
        valid = ["groups", "unfold"]
        if geo.x.shape[1] == geo.groups:
            valid.append("correlate")
        if _pointwise(geo):
            valid.append("pointwise")
        return (best,) + tuple(m for m in valid if m != best)

    def _weight_ps(self, geo: Geom, gout: Tensor, method: Optional[str] = None) -> Tensor:
        method = method or self.method(geo, gout)
        if method == "pointwise":
            return ps_pointwise(geo, gout)
        if method == "correlate":
            return ps_correlate(geo, gout)
        if method == "groups":
            return ps_groups(geo, gout)
        return ps_unfold(geo, gout)

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        _check_batched(args["input"], args["weight"], self.name)
        out: Dict[str, Tensor] = {}
        if "weight" in needs:
            out["weight"] = self._weight_ps(*self._setup(args, grad_output))
        if "bias" in needs:
            out["bias"] = self._bias_ps(args, grad_output)
        return out

    @staticmethod
    def _bias_ps(args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        return grad_output.sum(tuple(range(2, grad_output.dim()))) if grad_output.dim() > 2 else grad_output

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        return self.norm_sample_sq_keep(args, grad_output, needs)[0]

    def bk_candidates(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Tuple[str, ...]:
        if "weight" not in needs:
            return ()
        geo, gout = self._setup(args, grad_output)
        if math.prod(gout.shape[2:]) == 1:  # rank one: the ghost norm is O(B (d + p))
            return ()
        # ghost norms, or the per-sample gradients by each exact method (the choice among
        # them is the cost model's too: measured, HF ViT's patchify stem by groups took 1.4x
        # the time of unfold, ConvNeXt's 2x2 downsampling 2.9x)
        materialized = self._methods(geo, gout)
        return ("ghost",) + materialized if self.use_ghost(geo, gout) else materialized + ("ghost",)

    def bk_keeps(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> bool:
        if "weight" not in needs:
            return True  # the bias's [B, O] is always kept
        geo, gout = self._setup(args, grad_output)
        # kept gradients larger than the record wait for the end of the backward pass: formed
        # as it arrives they add to the activations it still holds (CIFAR-10's 64->64 layer at
        # 16x16, 1.12x its record: the step's peak, B = 128 / 512, 109.8 / 440.2 -> 107.8 /
        # 431.8 MiB, bench_models.py --memory-only; time unchanged)
        return not self.use_ghost(geo, gout) and self._over_record(geo, gout) <= min(1.0, self.keep_ratio)

    def norm_sample_sq_keep(
        self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str], method: Optional[str] = None
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Ghost norms where cheaper (``method`` overrides the cost model: ``"ghost"``,
        ``"materialize"`` by the cost model's method, or one of :meth:`_methods`: ``"groups"``,
        ``"unfold"``, ``"correlate"``, ``"pointwise"``); otherwise the per-sample gradients are
        materialized and, when at most ``keep_ratio`` times the size of the record
        (input and output gradient), kept, so the clipped sum is a contraction instead
        of a second weight-gradient pass."""
        _check_batched(args["input"], args["weight"], self.name)
        out: Dict[str, Tensor] = {}
        kept: Dict[str, Tensor] = {}
        if "weight" in needs:
            geo, gout = self._setup(args, grad_output)
            if method == "ghost" or (method is None and self.use_ghost(geo, gout)):
                scratch = args.get(SCRATCH)
                if scratch is not None and self.keeps_patch_rows(geo, gout):
                    # for the clipped sum: one matmul on them (sum_patch_rows); their d's order
                    out["weight"], scratch["patch_rows"], scratch["rows_channels_last"] = (
                        ghost_norms_keeping_rows(geo, gout))
                else:
                    out["weight"] = ghost_norms(geo, gout)
            else:
                ps = self._weight_ps(geo, gout, None if method == "materialize" else method)
                out["weight"] = sq_norms(ps)
                if self._would_keep(geo, gout):
                    kept["weight"] = ps
        if "bias" in needs:
            ps = self._bias_ps(args, grad_output)
            out["bias"] = sq_norms(ps)
            kept["bias"] = ps  # [B, O]: smaller than any output gradient
        return out, kept

    clipped_sum_into = True

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str],
        into: Optional[Dict[str, Tensor]] = None,
    ) -> Dict[str, Tensor]:
        _check_batched(args["input"], args["weight"], self.name)
        B = grad_output.shape[0]
        f = factors.to(grad_output.dtype).reshape((B,) + (1,) * (grad_output.dim() - 1))
        into = into or {}
        out: Dict[str, Tensor] = {}
        if "weight" in needs:
            geo, gout = self._setup(args, grad_output)
            gout = gout * f  # bilinear in (input, output gradient): scale either
            dst = into_target(into, "weight", gout.dtype, weight_shape(geo, gout))
            scratch = args.get(SCRATCH) or {}
            rows = scratch.pop("patch_rows", None)  # the ghost norm's, freed once summed
            if rows is not None:
                s = sum_patch_rows(geo, rows, scratch["rows_channels_last"], gout, dst)
                if s is not None:
                    out["weight"] = s
            elif self.method(geo, gout) == "correlate":
                out["weight"] = sum_correlate(geo, gout)
            elif math.prod(gout.shape[2:]) <= self.sum_unfold_max_positions:
                s = sum_unfold(geo, gout, dst)  # straight into the noise buffer: no fresh sum
                if s is not None:
                    out["weight"] = s
            else:
                # g in the input's layout: a channel-first copy of a channels-last g (ConvNeXt)
                # would be a transposing copy, and oneDNN would convert it back
                g_ = gout.contiguous(memory_format=layout_of(geo.x))
                out["weight"] = wgrad(geo, g_, geo.x, geo.groups, weight_shape(geo, gout))
        if "bias" in needs:
            s = weighted_sum(f.reshape(B), self._bias_ps(args, grad_output), into.get("bias"))
            if s is not None:
                out["bias"] = s
        return out


# ----------------------------------------------------------------------------
def _sizes(op: Any, args: Mapping[str, Any]) -> Any:
    """Size arguments as the op takes them: ATen overloads (a torch.export graph)
    want lists where the functional form also takes an int (the rule's defaults)."""
    if not isinstance(op, torch._ops.OpOverload):
        return lambda v: v
    k = args["weight"].dim() - 2
    return lambda v: [int(v)] * k if isinstance(v, int) else v


# rules
# ----------------------------------------------------------------------------
@register_rule(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
               aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
               aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
class ConvRule(_ConvMath, PerSampleRule):
    """``F.conv{1,2,3}d`` (zero padding: ints, tuples, ``"same"``, ``"valid"``)."""

    name = "conv"

    def signature(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: D401
        pass

    def forward(self, op, args: Mapping[str, Any]) -> Any:
        n = _sizes(op, args)
        padding = args["padding"]
        if getattr(op, "_overloadname", None) == "padding" and not isinstance(padding, str):
            # the string overload's own default ("valid"), which exported graphs leave out (HF EfficientNet)
            padding = "valid"
        return op(args["input"], args["weight"], args["bias"], n(args["stride"]), n(padding),
                  n(args["dilation"]), args["groups"])

    def _setup(self, args, grad_output):
        return _conv_geom(args), grad_output

    def has_input_grad(self, args: Mapping[str, Any]) -> bool:
        # zero padding given as numbers: PyTorch's own input-gradient kernel applies as is
        x, w = args["input"], args["weight"]
        return (
            isinstance(x, Tensor)
            and x.dim() == w.dim()
            and (args.get("padding_mode", "zeros") or "zeros") == "zeros"
            and not isinstance(args.get("padding", 0), str)
        )

    def input_grad(self, args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        geo = _conv_geom(args)
        dt = grad_output.dtype  # autocast may run the op in a lower precision
        x, w = geo.x.to(dt), args["weight"].to(dt)

        def grad(g: Tensor, x: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(
                g, x, w, None, list(geo.stride), list(geo.pad), list(geo.dilation), False, [0] * geo.n,
                geo.groups, (True, False, False))[0]

        B = x.shape[0]
        n = samples_per_slice(INPUT_GRAD_SLICE_BYTES, x, grad_output) if x.device.type == "cpu" else B
        if n >= B:
            return grad(grad_output, x).to(geo.x.dtype)
        out = torch.empty_like(geo.x)
        for s in range(0, B, n):
            out[s:s + n] = grad(grad_output[s:s + n], x[s:s + n])
        return out


@register_rule(conv_nd)
class ConvNdRule(ConvRule):
    """:func:`conv_nd` (``nn.Conv{1,2,3}d`` with any ``padding_mode``)."""

    name = "conv_nd"

    def signature(
        self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"
    ):  # noqa: D401
        pass

    def forward(self, op, args: Mapping[str, Any]) -> Any:
        return op(**args)


@register_rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
class ConvTransposeRule(_ConvMath, PerSampleRule):
    """``F.conv_transpose{1,2,3}d``: the adjoint of a convolution (see module doc)."""

    name = "conv_transpose"

    def signature(self, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        pass

    def forward(self, op, args: Mapping[str, Any]) -> Any:
        n = _sizes(op, args)
        return op(args["input"], args["weight"], args["bias"], n(args["stride"]), n(args["padding"]),
                  n(args["output_padding"]), args["groups"], n(args["dilation"]))

    def _setup(self, args, grad_output):
        return _transpose_geom(args, grad_output)


@register_rule(conv_transpose_nd)
class ConvTransposeNdRule(ConvTransposeRule):
    """:func:`conv_transpose_nd` (``nn.ConvTranspose{1,2,3}d``)."""

    name = "conv_transpose_nd"

    def signature(
        self, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, output_size=None
    ):
        pass

    def forward(self, op, args: Mapping[str, Any]) -> Any:
        return op(**args)


# ----------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------
_BASES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def _base_of(m: nn.Module) -> type:
    for base in type(m).__mro__:
        if base in _BASES:
            return base
    raise TypeError(type(m).__name__)  # pragma: no cover - only registered types get here


def _check_conv_forward(m: nn.Module) -> None:
    base = _base_of(m)
    if getattr(type(m), "_conv_forward", None) is not getattr(base, "_conv_forward", None):
        raise UnsupportedOpError(
            f"{type(m).__name__} overrides _conv_forward of {base.__name__}, so its computation is not a plain "
            "convolution of its weight. Fix: override forward instead (the module is then traced through and "
            "its F.conv call captured), or register a rule for it (docs/custom_rules.md)."
        )


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_call(m: nn.modules.conv._ConvNd) -> ModuleCall:
    _check_conv_forward(m)
    return ModuleCall(
        conv_nd,
        params={"weight": "weight", "bias": "bias"},
        kwargs=dict(
            stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode
        ),
    )


@register_module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose_call(m: nn.modules.conv._ConvTransposeNd) -> ModuleCall:
    if m.padding_mode != "zeros":
        raise UnsupportedOpError(
            f"{type(m).__name__} with padding_mode={m.padding_mode!r}: PyTorch supports only 'zeros' here."
        )
    return ModuleCall(
        conv_transpose_nd,
        inputs=("input", "output_size"),
        params={"weight": "weight", "bias": "bias"},
        kwargs=dict(
            stride=m.stride, padding=m.padding, output_padding=m.output_padding, groups=m.groups, dilation=m.dilation
        ),
    )
