"""Per-sample weight gradients of convolutions, and the kernels of their clipped sums:
the exact methods the convolution rules (:mod:`fxdp.rules.conv`) choose from per layer.

Computing the per-sample weight gradients. Two general exact methods, chosen per
layer from the shapes (and two for special layers, below):

* ``groups``: the per-sample weight gradients *are* the weight gradient of one
  grouped convolution that puts every sample in its own group: the input viewed
  as ``[1, B*C, ...]`` (a free view), the output gradient as ``[1, B*O, ...]`` and
  ``groups = B*G``; ``aten.convolution_backward`` with output mask (weight only)
  returns ``[B*O, C/G, *k]``, i.e. ``[B, *W.shape]``. No patch tensor is formed;
  it runs a slice of the batch at a time, bounding oneDNN's workspace.
* ``unfold``: patches ``[B, C*prod(k), T]`` (``F.unfold``; 3-d by a strided view),
  then one batched matmul per group.

Timing (float32, torch 2.13, this project's 2-core CPU, 2 threads, ms per layer,
min of 5 on a lightly loaded machine; ``groups`` = batch-as-groups
``convolution_backward``, ``strided`` = ``as_strided`` patch view + einsum,
``rochette`` = forward conv of the channel-transposed input with the output
gradient as kernel, ``sum`` = the ordinary (non-per-sample) weight gradient, a
floor; ``pick`` = the rule's choice)::

    layer (batch)                     unfold  strided  groups  rochette   sum   pick
    MNIST 1->16 k8 s2 p3 @28 (512)      13.2      7.6     8.1       6.1   1.6  groups
    MNIST 16->32 k4 s2 @14 (512)        10.5     11.2     5.5       7.5   2.6  groups
    CIFAR 3->32 k3 @32 (128)             7.2      9.3     9.9       5.6   2.8  groups
    CIFAR 32->32 k3 @32 (128)           89.5    170.2    17.8      78.4  16.9  groups
    CIFAR 64->64 k3 @16 (128)           70.6     90.8    18.7      60.9  15.0  groups
    CIFAR 64->128 k3 @8 (128)           29.2     34.1    40.9      54.6   8.4  unfold
    CIFAR 128->256 k3 @4 (128)          61.8     65.4   142.0     144.8   9.6  unfold
    CIFAR 256->256 k3 @4 (128)         136.4    143.6   305.0     315.0  17.0  unfold
    depthwise 64 k3 @16 (128)           52.1     75.7     3.3       3.3   3.3  groups
    groups=4 64->128 k3 @16 (128)       48.2     62.4    11.7      43.2   9.6  groups

``groups`` is 1.0-1.3x the non-per-sample floor on the large CIFAR maps and
grouped/depthwise layers (4-16x faster than ``unfold``) and 2-5x the floor on the
MNIST layers (1.6-1.9x faster than ``unfold``). ``unfold`` + bmm wins on small
maps with wide layers, where oneDNN's weight-gradient kernel with many large
groups is slow. ``strided`` (the einsum copies the strided view) and
``rochette`` are never clearly best (``rochette``'s edge on the two 1-input-channel
rows did not hold in a single-thread rerun: MNIST 1->16 groups 23 / rochette 20 /
unfold 49, CIFAR 3->32 20 / 29 / 29). A sweep of 3x3 layers (channels 16-256, maps
4-16, batch 128) puts the crossover at a per-group weight ``O/G * C/G * prod(k)``
of about 1000 per output position ``T``; the rule picks ``groups`` below
``groups_weight_per_position * T`` (a tunable class attribute), else ``unfold``.
The MNIST 16->32 layer at its real 13x13 input (T = 25) is near the crossover
(the two methods within noise of each other). On the wide, small layers the
book-keeping ghost norm is far cheaper still (:mod:`fxdp.rules.conv`). Heuristics were tuned on
CPU only. The ghost norms' Gram matrices take patch rows ``[T, d]`` in any order of
``d``: on wide layers with small maps they are copied from
a channels-last view of the input, in runs of ``C/G * k`` contiguous entries, 2-4x
faster than the channel-first copy (``CHANNELS_LAST_MIN_RUN``; interleaved full
book-keeping steps, 1 thread: CIFAR-10 CNN at B = 128 1.37x -> 1.30x non-private,
MNIST CNN 1.58x -> 1.53x, torchvision ResNet18 1.70x -> 1.65x).

1x1 convolutions with stride 1, no padding and one group take ``pointwise``: one
batched matmul ``g_i [O, T] @ x_i^T [T, C]`` on views of the input and output gradient,
in either layout (channels-last tensors, as ConvNeXt's permuted LayerNorm hands its 1x1
convolutions, made the batch-as-groups view copy both). ms, 1 thread, batch 16,
``groups`` / ``pointwise``: 16->16 at 32x32 0.30 / 0.20 (channels-last 2.40 / 0.16),
40->160 at 16x16 1.37 / 1.07 (2.88 / 0.90), 576->96 at 2x2 7.3 / 0.21; batch 128,
64->64 at 16x16 9.9 / 8.5 (17.3 / 7.3). timm ConvNeXt-atto's DP step, interleaved:
1.64x -> 1.52x non-private.

Layers with one input channel per group take a third method, ``correlate``: the
forward convolution of the input, every (sample, channel) a group, with the output
gradient as kernel (Rochette et al. 2019; the conv's stride becomes the kernel's
dilation), where oneDNN's many-group weight gradient is slow: every depthwise layer
(ConvNeXt, MobileNetV3, EfficientNet), and a single-channel input (MNIST's first layer)
on maps of up to 1024 output positions. ms, 1 thread, batch 16 unless noted,
``correlate`` / ``groups``, medians of interleaved runs: depthwise 7x7 at 16x16 40
channels 0.52 / 8.9, 5x5 at 4x4 672 channels 0.45 / 6.1, 5x5 stride 2 at 32x32 96
channels 2.0 / 14.7, 3x3 at 16x16 64 / 128 channels 0.22 / 0.35 and 0.40 / 0.69, 3x3
stride 2 at 32x32 24 channels 0.22 / 0.33, 3x3 dilation 2 at 16x16 0.43 / 2.96; one
input channel: MNIST's 1->16 8x8 stride 2 at 28x28, batch 32 / 128, 0.49 / 0.72 and
1.79 / 2.71, 1->32 3x3 at 28x28 (batch 128) 2.7 / 4.2; but 1->64 7x7 stride 2 at
128x128 (4096 positions) 8.5 / 7.0, and 1->8 9x9 stride 4 at 100x100 5.1 / 4.9, which
keep ``groups``. (Before the zero padding stayed in the correlation, ``_correlate_padding``,
3x3 and strided depthwise layers had measured slower and kept ``groups``.)
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import gram_bytes, gram_inner, norm_dtype, samples_per_slice

__all__ = [
    "Geom", "weight_shape", "wgrad", "ghost_norms", "gram_from_pixels", "patch_gram_costs", "ps_groups",
    "ps_pointwise", "ps_unfold", "ps_correlate", "sum_unfold", "sum_correlate", "patches", "patch_rows", "grouped",
    "layout_of", "f_pad_arg", "ghost_norms_keeping_rows", "sum_patch_rows", "KEPT_PATCH_ROWS_MAX_BYTES",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# 2-d patches: a strided view copied out beats F.unfold's im2col up to this many
# patch entries C*prod(k) (measured on CPU, batch 32-128: 1.6-1.9x faster at 64-1152,
# 1.3x slower at 2304)
STRIDED_PATCHES_MAX_D = 1200
# patch rows [T, d] for ghost norms and clipped sums, d in (k..., C/G) order, are copied
# from a channels-last input when a patch row's contiguous run C/G * k_last is at least
# this many times the output row (the channel-first copy's inner run). Measured on CPU
# (ms, 1 thread, batch 128 / 16, channels-last incl. the layout copy / channel-first):
# MNIST 16->32 k4 s2 at 13x13 0.60 / 1.19, 128 ch k3 at 4x4 2.5 / 8.4, 64 ch at 8x8
# (B = 16) 0.18 / 0.39, 512 ch at 1x1 0.07 / 0.27; 3 ch at 32x32 0.65 / 0.10 (kept)
CHANNELS_LAST_MIN_RUN = 4


def f_pad_arg(pairs: Sequence[Tuple[int, int]]) -> List[int]:
    """``F.pad``'s argument (last dim first) from per-dim ``(left, right)`` pairs."""
    out: List[int] = []
    for left, right in reversed(pairs):
        out += [left, right]
    return out


class Geom:
    """A convolution normalized for gradient extraction: ``x`` (batch first, padded
    explicitly when the padding is asymmetric or not zeros), symmetric zero
    padding ``pad`` still to apply, and the conv's static parameters."""

    __slots__ = ("x", "k", "stride", "pad", "dilation", "groups", "n")

    def __init__(self, x: Tensor, k, stride, pad, dilation, groups: int) -> None:
        self.x, self.k, self.stride, self.pad, self.dilation, self.groups = x, tuple(k), stride, pad, dilation, groups
        self.n = len(self.k)

    def rows(self, start: int, stop: int) -> "Geom":
        """The same convolution on samples ``start:stop`` (every per-sample quantity is exact
        on a slice of the batch)."""
        return Geom(self.x[start:stop], self.k, self.stride, self.pad, self.dilation, self.groups)


def weight_shape(geo: Geom, g: Tensor) -> Tuple[int, ...]:
    return (g.shape[1], geo.x.shape[1] // geo.groups) + geo.k


def wgrad(geo: Geom, g: Tensor, x: Tensor, groups: int, shape: Sequence[int]) -> Tensor:
    """The weight gradient (``aten.convolution_backward``, weight only) of a convolution
    with ``groups`` groups and a weight of ``shape``."""
    w = g.new_empty(1).expand(*shape)
    n = geo.n
    return torch.ops.aten.convolution_backward(
        g,
        x,
        w,
        None,
        list(geo.stride),
        list(geo.pad),
        list(geo.dilation),
        False,
        [0] * n,
        groups,
        (False, True, False),
    )[1]


# ps_groups runs on slices of the batch whose input and output gradient take about this
# many bytes: oneDNN's reorders and workspace (about twice the slice) then add a slice, not
# the batch, to the step's peak. CIFAR-10 CNN, B = 32: the transient of 64->64 at 16x16
# 13.4 -> 6.6 MiB (8-sample slices), of 32->32 at 32x32 10.1 -> 3.3 MiB; the step's peak
# 35.9 -> 29.6 MiB. Time equal within the spread (ms, 1 thread, whole batch / 1 MiB / 2 MiB
# slices, median of 21: B = 128 32->32 at 32x32 35.1 / 37.1 / 35.2, 64->64 at 16x16
# 42.0 / 41.8 / 44.4; B = 16 3->64 k7 s2 at 32x32 2.5 / 2.8 / 2.4).
GROUPS_SLICE_BYTES = 1 << 20


def _ps_groups(geo: Geom, x: Tensor, g: Tensor) -> Tensor:
    B, C, O = x.shape[0], x.shape[1], g.shape[1]
    xs = x.reshape(1, B * C, *x.shape[2:])
    gs = g.reshape(1, B * O, *g.shape[2:]).contiguous()
    w = wgrad(geo, gs, xs, B * geo.groups, (B * O, C // geo.groups) + geo.k)
    return w.reshape(B, O, C // geo.groups, *geo.k)


def ps_groups(geo: Geom, g: Tensor) -> Tensor:
    """Per-sample weight gradients as the weight gradient of a conv with one group per
    sample, a slice of the batch at a time (``GROUPS_SLICE_BYTES``)."""
    x = geo.x
    B = x.shape[0]
    n = samples_per_slice(GROUPS_SLICE_BYTES, x, g)
    if n >= B:
        return _ps_groups(geo, x, g)
    out = g.new_empty((B, g.shape[1], x.shape[1] // geo.groups) + geo.k)
    for s in range(0, B, n):
        out[s:s + n] = _ps_groups(geo, x[s:s + n], g[s:s + n])
    return out


#: ghost norms form patch rows and two [T, T] Gram matrices per group for a slice of the
#: batch of about this many bytes at a time (CIFAR-10 CNN, B = 128: the whole batch's took
#: 42 MiB above the rest at the end of the backward pass)
GHOST_SLICE_BYTES = 1 << 22
#: one strided add of :func:`_patch_gram_from_pixels` costs about this many multiply-adds of
#: its batched matmul (measured, 1 thread: 3.3e9 strided adds / s against 3.6e10 MAC / s)
STRIDED_ADD_COST = 11
#: ... which runs only where one sample's pixel Gram matrices and sums take at most this many
#: bytes (the patches' Gram matrices have strips; these do not): 4 MiB, 32x32 padded maps
PIXEL_GRAM_MAX_BYTES = 1 << 22


def _padded_sizes(geo: Geom) -> Tuple[int, ...]:
    return tuple(s + 2 * p for s, p in zip(geo.x.shape[2:], geo.pad))


def _pixel_stages(geo: Geom, out_spatial: Sequence[int]) -> List[Tuple[int, int]]:
    """``(taps, entries per group)`` of each summed stage of :func:`_patch_gram_from_pixels`
    (the last dim first)."""
    sizes = list(_padded_sizes(geo))
    out = []
    for j in reversed(range(geo.n)):
        sizes[j] = out_spatial[j]
        out.append((geo.k[j], math.prod(s * s for s in sizes)))
    return out


def patch_gram_costs(geo: Geom, out_spatial: Sequence[int]) -> Tuple[int, int]:
    """Multiply-adds per sample and group of the patches' Gram matrix ``[T, T]``: from the
    patches (``T^2 d``), and from the pixels (:func:`_patch_gram_from_pixels`: ``N^2 C/G``
    for ``N`` padded input positions, plus its strided adds)."""
    T, N = math.prod(out_spatial), math.prod(_padded_sizes(geo))
    cg = geo.x.shape[1] // geo.groups
    adds = sum(taps * size for taps, size in _pixel_stages(geo, out_spatial))
    return T * T * cg * math.prod(geo.k), N * N * cg + STRIDED_ADD_COST * adds


def _patch_gram_from_pixels(geo: Geom, out_spatial: Sequence[int]) -> Tensor:
    """``[B*G, T, T]``: the Gram matrix of each sample's patches, ``<P_t, P_s> = sum_k
    Q[t + k, s + k]``, from the Gram matrix ``Q = X^T X`` of its (padded) pixels ``X:
    [C/G, N]``, one tap of one spatial dim at a time (a patch is its pixels at the taps'
    offsets: exact, a reassociation of the same sums). ``N^2 C/G`` multiply-adds against
    the patches' ``T^2 C/G prod(k)``: 3x3 stride-1 layers on small maps do a quarter of
    them. ms, 1 thread, ghost norms by patches / pixels: ResNet18's 64->64 at 8x8, B = 16
    / 64, 1.14 / 0.62 and 4.82 / 2.43; 128->128 at 4x4 (B = 64) 1.42 / 0.81; at 224x224
    inputs, B = 16, 256->256 at 14x14 30.2 / 11.2, 512->512 at 7x7 7.7 / 2.5."""
    x = geo.x.to(norm_dtype(geo.x.dtype))  # half precision: the taps' sums in float32
    if any(geo.pad):
        x = F.pad(x, f_pad_arg([(p, p) for p in geo.pad]))
    B, C, G, n = x.shape[0], x.shape[1], geo.groups, geo.n
    sp = tuple(x.shape[2:])
    X = x.reshape(B * G, C // G, math.prod(sp))
    R = torch.bmm(X.transpose(1, 2), X).view((B * G,) + sp + sp)  # [B*G, *S, *S]
    for j in reversed(range(n)):  # sum over dim j's taps: its padded size -> its output size
        d, s, o = geo.dilation[j], geo.stride[j], out_spatial[j]
        acc: Optional[Tensor] = None
        for tap in range(geo.k[j]):
            span = slice(d * tap, d * tap + s * (o - 1) + 1, s)
            idx = [slice(None)] * (1 + 2 * n)
            idx[1 + j] = idx[1 + n + j] = span
            part = R[tuple(idx)]
            if acc is None:
                acc = part.clone(memory_format=torch.contiguous_format)
            else:
                acc.add_(part)
        R = acc
    T = math.prod(out_spatial)
    return R.reshape(B * G, T, T)


def _pixel_gram_bytes(geo: Geom, out_spatial: Sequence[int], element_size: int) -> int:
    """One sample's temporaries in :func:`ghost_norms` by the pixels: their Gram matrices,
    the largest partial sum, and three ``[T, T]`` (the patches', the output gradient's, their
    product)."""
    N, T = math.prod(_padded_sizes(geo)), math.prod(out_spatial)
    return geo.groups * (N * N + max(size for _, size in _pixel_stages(geo, out_spatial)) + 3 * T * T) * element_size


def gram_from_pixels(geo: Geom, out_spatial: Sequence[int], element_size: int) -> bool:
    """Whether :func:`ghost_norms` forms the patches' Gram matrix from the pixels': fewer
    multiply-adds (:func:`patch_gram_costs`) and a sample's temporaries within
    ``PIXEL_GRAM_MAX_BYTES``."""
    by_patches, by_pixels = patch_gram_costs(geo, out_spatial)
    return by_pixels < by_patches and _pixel_gram_bytes(geo, out_spatial, element_size) <= PIXEL_GRAM_MAX_BYTES


def ghost_norms(geo: Geom, g: Tensor) -> Tensor:
    """``[B]``: ``sum_groups <P_i P_i^T, g_i g_i^T>``, the ghost norm (Li et al. 2021) on the
    patches ``P_i`` of each sample, a slice of the batch at a time. The patches' Gram matrix
    is formed from the pixels' where that is cheaper (:func:`gram_from_pixels`)."""
    B, G = g.shape[0], geo.groups
    out_spatial = tuple(g.shape[2:])
    T = math.prod(out_spatial)
    if gram_from_pixels(geo, out_spatial, g.element_size()):
        n = samples_per_slice(GHOST_SLICE_BYTES, extra_bytes=_pixel_gram_bytes(geo, out_spatial, g.element_size()))

        def norms(geo: Geom, g: Tensor) -> Tensor:
            gg = g.reshape(g.shape[0] * G, g.shape[1] // G, T).to(norm_dtype(g.dtype))
            gram_g = torch.bmm(gg.transpose(1, 2), gg)
            gram_p = _patch_gram_from_pixels(geo, out_spatial)
            return (gram_p * gram_g).sum((1, 2)).reshape(g.shape[0], G).sum(1)
    else:
        d = geo.x.shape[1] // G * math.prod(geo.k)
        dtype = torch.promote_types(geo.x.dtype, g.dtype)
        temp = T * G * d * geo.x.element_size() + G * gram_bytes(T, d, g.shape[1] // G, dtype)
        n = samples_per_slice(GHOST_SLICE_BYTES, extra_bytes=temp)  # patches and Gram strips

        def norms(geo: Geom, g: Tensor) -> Tensor:
            P, gg = grouped(geo, g, any_order=True)  # Gram matrices: d's order does not matter
            return gram_inner(P, gg).reshape(g.shape[0], G).sum(1)

    if n >= B:
        return norms(geo, g)
    return torch.cat([norms(geo.rows(s, s + n), g[s:s + n])
                      for s in range(0, B, n)])


#: book-keeping keeps a ghost norm's patch rows for the layer's clipped sum where the whole
#: batch's take at most this many bytes (the size of ghost norms' own sliced temporaries at
#: the end of the backward pass) and at most ``keep_ratio`` times the record
#: (:meth:`fxdp.rules.conv._ConvMath.keeps_patch_rows`)
KEPT_PATCH_ROWS_MAX_BYTES = GHOST_SLICE_BYTES


def ghost_norms_keeping_rows(geo: Geom, g: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """:func:`ghost_norms` by the patches, the whole batch at once, the patch rows ``[B*G, T,
    d]`` it formed, and whether their ``d`` is ordered ``(k..., C/G)`` (:func:`patch_rows`),
    for :func:`sum_patch_rows`."""
    P, gg = grouped(geo, g, any_order=True)
    return gram_inner(P, gg).reshape(g.shape[0], geo.groups).sum(1), P, _rows_channels_last(geo, g.shape[2:])


def sum_patch_rows(geo: Geom, rows: Tensor, channels_last: bool, g: Tensor,
                   into: Optional[Tensor] = None) -> Optional[Tensor]:
    """``sum_i grad W_i = sum_i g_i^T P_i`` from the patch rows a ghost norm kept
    (:func:`ghost_norms_keeping_rows`; ``channels_last``: ``d`` ordered ``(k..., C/G)``): one
    matmul per group over samples and positions together, instead of a weight-gradient
    convolution that forms the patches again (MNIST's 16->32 4x4 stride-2 layer at 13x13,
    B = 32: 0.44-0.51 ms in the step). Added into ``into`` (contiguous, the weight's shape)
    when given, returning ``None``."""
    B, O, G = g.shape[0], g.shape[1], geo.groups
    T = math.prod(g.shape[2:])
    P = rows.reshape(B, G, T, -1).transpose(0, 1).reshape(G, B * T, -1)
    gg = g.reshape(B, G, O // G, T).permute(1, 2, 0, 3).reshape(G, O // G, B * T)
    channels_last = channels_last and math.prod(geo.k) > 1  # a 1x1 kernel's two orders are one
    if into is not None and not channels_last:  # the weight's own order: no fresh [O, d]
        into.view(G, O // G, -1).baddbmm_(gg, P)
        return None
    w = torch.bmm(gg, P)  # [G, O/G, d]
    cg = geo.x.shape[1] // G
    if channels_last:  # d ordered (k..., C/G): to the weight's (C/G, k...)
        w = w.reshape((O,) + geo.k + (cg,)).movedim(-1, 1)
    else:
        w = w.reshape((O, cg) + geo.k)
    if into is not None:
        into.add_(w)
        return None
    return w.contiguous()


def ps_pointwise(geo: Geom, g: Tensor) -> Tensor:
    """Per-sample weight gradients of a 1x1 convolution (stride 1, no padding, one
    group): ``g_i [O, T] @ x_i^T [T, C]``, one batched matmul on views of either layout
    (channel-first, or channels-last as after ConvNeXt's permuted LayerNorm, where the
    batch-as-groups view ``[1, B*C, ...]`` would copy both tensors)."""
    x = geo.x
    B, C, O = x.shape[0], x.shape[1], g.shape[1]
    return torch.bmm(g.flatten(2), x.flatten(2).transpose(1, 2)).reshape(B, O, C, *geo.k)


def layout_of(t: Tensor) -> torch.memory_format:
    """``t``'s memory format: channels-last (2-d and 3-d) when it is stored so."""
    if not t.is_contiguous():
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def patches(geo: Geom, out_spatial: Sequence[int]) -> Tensor:
    """Input patches ``[B, C * prod(k), T]`` (channel-major, like ``F.unfold``)."""
    x = geo.x
    B, C = x.shape[:2]
    if geo.n == 2 and C * math.prod(geo.k) > STRIDED_PATCHES_MAX_D:
        return F.unfold(x, geo.k, dilation=geo.dilation, padding=geo.pad, stride=geo.stride)
    if geo.n == 1:
        return F.unfold(
            x.unsqueeze(2),
            (1, geo.k[0]),
            dilation=(1, geo.dilation[0]),
            padding=(0, geo.pad[0]),
            stride=(1, geo.stride[0]),
        )
    if any(geo.pad):
        x = F.pad(x, f_pad_arg([(p, p) for p in geo.pad]))
    x = x.contiguous()
    st = x.stride()
    sp = st[2:]
    view = x.as_strided(
        (B, C) + geo.k + tuple(out_spatial),
        st[:2] + tuple(s * d for s, d in zip(sp, geo.dilation)) + tuple(s * t for s, t in zip(sp, geo.stride)),
    )
    return view.reshape(B, C * math.prod(geo.k), math.prod(out_spatial))


def _rows_channels_last(geo: Geom, out_spatial: Sequence[int]) -> bool:
    """Whether :func:`patch_rows` orders ``d`` as ``(k..., C/G)`` (copied channels-last)."""
    return geo.x.shape[1] // geo.groups * geo.k[-1] >= CHANNELS_LAST_MIN_RUN * out_spatial[-1]


def patch_rows(geo: Geom, out_spatial: Sequence[int]) -> Tensor:
    """Patches ``[B*G, T, d]`` per group with ``d`` in any order: ``(k..., C/G)``,
    copied from a channels-last input (long contiguous runs on wide layers with small
    maps), or ``F.unfold``'s ``(C/G, k...)``."""
    x = geo.x
    B, C, G = x.shape[0], x.shape[1], geo.groups
    T = math.prod(out_spatial)
    if not _rows_channels_last(geo, out_spatial):
        return patches(geo, out_spatial).reshape(B * G, -1, T).transpose(1, 2)
    if any(geo.pad):
        x = F.pad(x, f_pad_arg([(p, p) for p in geo.pad]))
    x = x.movedim(1, -1).contiguous()  # [B, *S, C]; free when the input is channels-last
    st = x.stride()
    sp = st[1:-1]
    view = x.as_strided(
        (B,) + tuple(out_spatial) + geo.k + (G, C // G),
        (st[0],) + tuple(s * t for s, t in zip(sp, geo.stride)) + tuple(s * d for s, d in zip(sp, geo.dilation))
        + (C // G, 1),
    )
    if G > 1:
        view = view.movedim(-2, 1)  # [B, G, *out, *k, C/G]
    return view.reshape(B * G, T, -1)


def grouped(geo: Geom, g: Tensor, any_order: bool = False) -> Tuple[Tensor, Tensor]:
    """Patches ``[B*G, T, d]`` and output gradients ``[B*G, T, p]`` per group. With
    ``any_order`` (Gram matrices) ``d`` may be ordered ``(k..., C/G)`` (see
    :func:`patch_rows`); otherwise it is the weight's ``(C/G, k...)``."""
    B, O, G = g.shape[0], g.shape[1], geo.groups
    T = math.prod(g.shape[2:])
    if any_order:
        P = patch_rows(geo, g.shape[2:])
    else:
        P = patches(geo, g.shape[2:]).reshape(B * G, -1, T).transpose(1, 2)
    gg = g.reshape(B * G, O // G, T).transpose(1, 2)
    return P, gg


def _correlate_padding(geo: Geom, g: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    """The input and the padding for the correlations below: the zero padding stays the
    convolution's (no padded copy of the input) while the output gradient, their kernel,
    is larger than it; otherwise oneDNN takes a slow path and the input is padded first.
    ms, batch 16, 5x5 depthwise, ``F.pad`` / conv padding: 240 ch at 4x4 1.80 / 0.21,
    96 ch at 32x32 16.3 / 3.5; at 2x2 (padding 2) 0.32 / 1.29."""
    if all(s > p for s, p in zip(g.shape[2:], geo.pad)):
        return geo.x, tuple(geo.pad)
    return F.pad(geo.x, f_pad_arg([(p, p) for p in geo.pad])), (0,) * geo.n


def _ps_one_position(geo: Geom, x: Tensor, g: Tensor, pad: Tuple[int, ...]) -> Tensor:
    """The correlation below where the output map is one position (a depthwise layer at the
    end of an ImageNet network on 32x32 inputs): each (sample, output channel)'s gradient is
    its output gradient times the taps it read, at the dilation from the padded input's
    start. PyTorch runs a one-tap grouped kernel on one sample, one thread, unstrided and
    undilated, as a loop over the groups: 1.7 µs a group (ms, B = 16: EfficientNet-B0's
    1152-channel 5x5 at 1x1 16.7 a slice against 0.03 here). ``x`` comes padded: a one-tap
    kernel is never larger than a nonzero padding (:func:`_correlate_padding`)."""
    B, C, O = x.shape[0], x.shape[1], g.shape[1]
    assert not any(pad), "_correlate_padding pads the input for a one-position output map"
    taps = x[(slice(None), slice(None)) + tuple(slice(0, (k - 1) * d + 1, d) for k, d in zip(geo.k, geo.dilation))]
    taps = taps.unsqueeze(2).expand(B, C, O // C, *geo.k).reshape(B, O, *geo.k)  # output o reads channel o // m
    return (taps * g.reshape(B, O, *(1,) * geo.n)).unsqueeze(2)


def _ps_correlate(geo: Geom, x: Tensor, g: Tensor, pad: Tuple[int, ...]) -> Tensor:
    if math.prod(g.shape[2:]) == 1:
        return _ps_one_position(geo, x, g, pad)
    B, C, O = x.shape[0], x.shape[1], g.shape[1]
    w = _CONV[geo.n](
        x.reshape(1, B * C, *x.shape[2:]), g.reshape(B * O, 1, *g.shape[2:]),
        stride=geo.dilation, padding=pad, dilation=geo.stride, groups=B * C,
    )
    w = w[(slice(None), slice(None)) + tuple(slice(0, k) for k in geo.k)]  # the span can exceed k
    return w.reshape(B, O, 1, *geo.k)


def ps_correlate(geo: Geom, g: Tensor) -> Tensor:
    """Per-sample weight gradients of a convolution with one input channel per group
    as one forward convolution (Rochette et al. 2019): the input with every (sample,
    channel) as a group, correlated with the output gradient as the kernel. The conv's
    stride becomes the kernel's dilation, its dilation the stride. A slice of the batch
    at a time (``GROUPS_SLICE_BYTES``), as :func:`ps_groups`: oneDNN's copies of the
    input and kernel in its blocked layouts grow with the groups (MobileNetV3-small at
    B = 16: the step's peak 27.4 MiB with the whole batch, against 25.3 before)."""
    x, pad = _correlate_padding(geo, g)
    B = x.shape[0]
    n = samples_per_slice(GROUPS_SLICE_BYTES, x, g)
    if n >= B:
        return _ps_correlate(geo, x, g, pad)
    out = g.new_empty((B, g.shape[1], 1) + geo.k)
    for s in range(0, B, n):
        out[s:s + n] = _ps_correlate(geo, x[s:s + n], g[s:s + n], pad)
    return out


def sum_correlate(geo: Geom, g: Tensor) -> Tensor:
    """``sum_i grad W_i`` of a convolution with one input channel per group: the per-sample
    correlations of :func:`ps_correlate`, a slice of the batch at a time, summed over its
    samples. One correlation with the samples inside each channel's group (their sum in its
    channels) ran up to 17x slower: ms, 1 thread, B = 16, depthwise 7x7 at 4x4 / 16x16 1.54 /
    7.17 against 0.16 / 0.44, 5x5 at 2x2 (1152 channels) 2.38 / 1.12, 3x3 stride 2 at 32x32
    7.21 / 1.40; B = 64 7x7 at 2x2 9.28 / 6.30; never slower (7x7 at 2x2, B = 16: even)."""
    x, pad = _correlate_padding(geo, g)
    B = x.shape[0]
    n = samples_per_slice(GROUPS_SLICE_BYTES, x, g)
    out = None
    for s in range(0, B, n):
        w = _ps_correlate(geo, x[s:s + n], g[s:s + n], pad).sum(0)
        out = w if out is None else out.add_(w)
    return out


#: :func:`sum_unfold` copies the patches channels-last (runs of ``C/G k``) where the permuted
#: ``[O, d]`` result it adds is at most this many times the ``B T`` rows, not channel-first
#: (runs of the output row: 2 on a 2x2 map). µs, 1 thread, 3x3 at 2x2, channel-first /
#: channels-last: B = 16 128->32 394 / 135 (DenseNet's third block at 32x32 inputs), 64->64 234 /
#: 116, 128->128 531 / 329, 256->256 930 / 1116, 512->512 4012 / 4403; B = 128 64->64 1694 / 585;
#: at one position channel-first wins (128->32 32 / 61, 512->512 837 / 1965)
SUM_ROWS_MAX_OUT_PER_ROW = 2


def sum_unfold(geo: Geom, g: Tensor, into: Optional[Tensor] = None) -> Optional[Tensor]:
    """``sum_i grad W_i``: patches and one batched matmul over the groups, contracting
    samples and positions together (the weight gradient of ``g``, :func:`sum_patch_rows`);
    added into ``into`` (contiguous, the weight's shape and dtype) when given, returning
    ``None``."""
    B, O, G = g.shape[0], g.shape[1], geo.groups
    T = math.prod(g.shape[2:])
    if T > 1 and O // G <= SUM_ROWS_MAX_OUT_PER_ROW * B * T and _rows_channels_last(geo, g.shape[2:]):
        return sum_patch_rows(geo, patch_rows(geo, g.shape[2:]), True, g, into)
    # channel-first patches: the [O, d] result needs no permuted copy
    return sum_patch_rows(geo, grouped(geo, g)[0], False, g, into)


def _ps_unfold(geo: Geom, g: Tensor) -> Tensor:
    B, O, C, G = g.shape[0], g.shape[1], geo.x.shape[1], geo.groups
    T = math.prod(g.shape[2:])
    P = patches(geo, g.shape[2:]).reshape(B * G, -1, T)
    gg = g.reshape(B * G, O // G, T)
    return torch.bmm(gg, P.transpose(1, 2)).reshape(B, O, C // G, *geo.k)


def ps_unfold(geo: Geom, g: Tensor) -> Tensor:
    """Per-sample weight gradients by patches + one batched matmul (patches in the
    weight's own ``(C/G, k...)`` order, so the result needs no permuted copy), a slice of
    the batch whose patches take about ``GROUPS_SLICE_BYTES`` at a time: the patches are
    ``C prod(k) / stride^2`` times the input, and sliced they add a slice, not the batch,
    to the step's peak. As fast or faster than whole (ms, 1 thread, whole / sliced: RGB
    3->32 3x3 at 32x32 B = 128 9.1 / 8.6, B = 512 62.9 / 32.3; 7x7 stride 2 B = 64 7.3 / 7.1)."""
    B = g.shape[0]
    patch = geo.x.shape[1] * math.prod(geo.k) * math.prod(g.shape[2:]) * geo.x.element_size()
    n = samples_per_slice(GROUPS_SLICE_BYTES, extra_bytes=patch)
    if n >= B:
        return _ps_unfold(geo, g)
    out = g.new_empty((B, g.shape[1], geo.x.shape[1] // geo.groups) + geo.k)
    for s in range(0, B, n):
        out[s:s + n] = _ps_unfold(geo.rows(s, s + n), g[s:s + n])
    return out
