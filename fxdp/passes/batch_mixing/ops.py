"""Op naming and classification for the batch-mixing analysis: the name tables of
op families, the function objects they stand for, declared semantics of custom ops
(``register_semantics``), user-facing op names and the family of a node."""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

_POINTWISE = """
add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod pow float_power neg negative
abs absolute where masked_fill clamp clip clamp_min clamp_max maximum minimum fmax fmin eq ne lt le gt ge greater
greater_equal less less_equal not_equal logical_and logical_or logical_xor logical_not bitwise_and bitwise_or
bitwise_xor bitwise_not relu relu6 gelu silu elu selu celu leaky_relu rrelu hardtanh hardswish hardsigmoid
hardshrink softshrink tanhshrink softsign softplus mish logsigmoid log_sigmoid sigmoid tanh threshold prelu dropout
alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d exp exp2 expm1 log log2 log10 log1p square sqrt
rsqrt reciprocal sign sgn signbit round floor ceil trunc fix frac lerp addcmul addcdiv isnan isinf isfinite isposinf
isneginf isreal nan_to_num erf erfc erfinv sin cos tan asin acos atan sinh cosh asinh acosh atanh arcsin arccos
arctan arcsinh arccosh arctanh atan2 arctan2 hypot xlogy logit logaddexp logaddexp2 copysign heaviside sinc
deg2rad rad2deg bernoulli normal polar complex real imag angle conj conj_physical positive lgamma digamma polygamma
mvlgamma igamma igammac i0 nextafter ldexp frexp gcd lcm bitwise_left_shift bitwise_right_shift expit
""".split()
_OPERATOR_POINTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.invert, operator.and_, operator.or_, operator.xor,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.lshift, operator.rshift,
}
_OPERATOR_INPLACE = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor,
}
# self tag only (dtype/device/flags from the other arguments)
_CONVERT = """
to type type_as float double half bfloat16 int long bool short char byte cpu cuda detach contiguous clone
requires_grad_ retain_grad pin_memory as_subclass detach_ coalesce cfloat cdouble data
""".split()
_FACTORY = """
zeros ones full empty arange range linspace logspace eye rand randn randint randperm tensor as_tensor zeros_like
ones_like full_like empty_like rand_like randn_like randint_like new_zeros new_ones new_full new_empty new_tensor
tril_indices triu_indices empty_strided scalar_tensor
""".split()
_MOVEMENT = """
view reshape permute transpose t adjoint flatten unflatten ravel squeeze unsqueeze expand expand_as broadcast_to
view_as reshape_as movedim moveaxis swapaxes swapdims narrow select split split_with_sizes chunk tensor_split
hsplit vsplit dsplit unbind repeat tile repeat_interleave flip fliplr flipud roll rot90 diagonal diag_embed diag
tril triu cat concat concatenate stack hstack vstack dstack column_stack row_stack atleast_1d atleast_2d atleast_3d
broadcast_tensors narrow_copy as_strided unfold T mT H mH
""".split()
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack", "row_stack"}
_REORDER = {"flip", "fliplr", "flipud", "roll", "rot90"}

# name -> (position of dim, default dims: "all" / int / tuple / "legacy_softmax" / "complement")
_REDUCTIONS: Dict[str, Tuple[int, Any]] = {
    **{k: (1, "all") for k in "sum nansum mean nanmean prod amax amin max min argmax argmin any all median nanmedian "
       "count_nonzero var std var_mean std_mean aminmax logsumexp unique unique_consecutive histc bincount "
       "trace".split()},
    **{k: (1, "legacy_softmax") for k in ("softmax", "log_softmax", "softmin")},
    **{k: (1, -1) for k in ("sort", "argsort", "mode", "glu", "cumsum", "cumprod", "cummax", "cummin",
                            "logcumsumexp", "gumbel_softmax")},
    "msort": (99, 0),
    "topk": (2, -1), "kthvalue": (2, -1), "diff": (2, -1),
    "quantile": (2, "all"), "nanquantile": (2, "all"), "norm": (2, "all"), "vector_norm": (2, "all"),
    "matrix_norm": (2, (-2, -1)), "renorm": (2, "complement"), "normalize": (2, 1),
    "cosine_similarity": (2, 1), "pairwise_distance": (99, -1), "dist": (99, "all"), "pdist": (99, "all"),
    **{k: (99, (-2, -1)) for k in "det slogdet logdet inverse inv pinv cholesky qr svd eigh eig eigvals eigvalsh "
       "matrix_exp matrix_power matrix_rank svdvals".split()},
}
_TWO_INPUT_REDUCTIONS = {"cosine_similarity", "pairwise_distance", "dist"}
_SCANS = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "diff"}
_SORTS = {"sort", "argsort", "msort", "topk", "kthvalue", "median", "nanmedian", "mode", "unique",
          "unique_consecutive", "quantile", "nanquantile"}
_DIM0 = """
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d max_pool2d max_pool3d
max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices lp_pool1d lp_pool2d lp_pool3d
fractional_max_pool2d fractional_max_pool3d max_unpool1d max_unpool2d max_unpool3d interpolate upsample
upsample_nearest upsample_bilinear grid_sample affine_grid pixel_shuffle pixel_unshuffle channel_shuffle
native_channel_shuffle group_norm
""".split()
_LOSSES = """
cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy
binary_cross_entropy_with_logits kl_div poisson_nll_loss gaussian_nll_loss hinge_embedding_loss margin_ranking_loss
soft_margin_loss multilabel_soft_margin_loss multilabel_margin_loss multi_margin_loss cosine_embedding_loss
triplet_margin_loss triplet_margin_with_distance_loss
""".split()
_MATMUL = """
matmul mm bmm mv dot vdot inner outer ger einsum addmm addmv addbmm baddbmm addr linear bilinear chain_matmul
multi_dot cdist tensordot scaled_dot_product_attention __matmul__ __rmatmul__
""".split()
_INDEX = """
index_select gather take take_along_dim masked_select nonzero argwhere scatter scatter_add scatter_reduce index_add
index_copy index_fill index_put masked_scatter select_scatter slice_scatter diagonal_scatter index_reduce put
embedding one_hot embedding_bag
""".split()
_NORMS = {"batch_norm", "instance_norm", "layer_norm", "rms_norm", "local_response_norm", "group_norm"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "grad_fn", "names"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "element_size", "stride", "is_contiguous",
                  "is_floating_point", "is_complex", "get_device", "data_ptr", "storage_offset", "__len__"}

_NAMESPACES = (torch, F, torch.linalg, torch.special, torch._C._nn, torch.Tensor)


def _function_names() -> Dict[Any, str]:
    """Known function objects -> their name in the op tables."""
    names = set(_POINTWISE) | set(_CONVERT) | set(_FACTORY) | set(_MOVEMENT) | set(_REDUCTIONS) | set(_DIM0) \
        | set(_LOSSES) | set(_MATMUL) | set(_INDEX) | _NORMS
    out: Dict[Any, str] = {}
    for ns in _NAMESPACES:
        for name in names:
            obj = getattr(ns, name, None)
            if obj is not None and callable(obj):
                try:
                    out.setdefault(obj, name)
                except TypeError:  # unhashable
                    pass
    # F.unfold / F.fold are im2col (per sample), not Tensor.unfold
    out[F.unfold] = "im2col"
    out[F.fold] = "im2col"
    out[F.pad] = "pad"
    out[torch.where] = "where"
    return out


_FUNCS = _function_names()
_POINTWISE_CACHE: Dict[str, bool] = {}


_SEMANTICS: Dict[Any, str] = {}
SEMANTIC_KINDS = ("pointwise", "dim0", "per_sample")
_LOADED: List[bool] = []
#: fxdp's graph ops -> positions of arguments they read only the shape of (no sample data flows)
SHAPE_ARGS: Dict[Any, Tuple[int, ...]] = {}


def register_semantics(fn: Callable, kind: str) -> Callable:
    """Declare how a custom function (a ``torch.fx.wrap``-ped op, a graph op of a
    DP layer) treats the batch, so the analysis need not warn about it:

    * ``"pointwise"``: elementwise over broadcast arguments;
    * ``"dim0"``: row i of every output along dim 0 comes from row i of the
      arguments with that many rows (convolution-like);
    * ``"per_sample"``: trusted to keep samples apart along the batch dimensions
      the two-batch-size run finds (e.g. an op with a per-sample rule).
    """
    if kind not in SEMANTIC_KINDS:
        raise ValueError(f"kind must be one of {SEMANTIC_KINDS}, got {kind!r}")
    _SEMANTICS[fn] = kind
    return fn


#: (module, name) of other libraries' functions -> semantics. torchvision's stochastic
#: depth scales row i by row i's own Bernoulli draw (mode "row") or one shared draw
#: (mode "batch"): neither reads another sample's data.
_THIRD_PARTY: Dict[Tuple[Optional[str], Optional[str]], str] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): "dim0",
}


def semantics_for(fn: Any) -> Optional[str]:
    """Declared semantics of ``fn``; fxdp's own graph ops and ops with a registered
    per-sample rule are trusted as ``"per_sample"``."""
    if not _hashable(fn):
        return None
    if not _LOADED:
        _LOADED.append(True)
        try:  # the DP recurrent layers' scan runs along time, row i per sample
            from ...layers.recurrent import rnn_scan

            _SEMANTICS.setdefault(rnn_scan, "dim0")
        except Exception:  # pragma: no cover - layers not available
            pass
        try:  # MultiheadAttention's mask: the queries and keys give it B, L and S only
            from ...layers.attention import attention_mask

            SHAPE_ARGS.setdefault(attention_mask, (2, 3))
        except Exception:  # pragma: no cover - layers not available
            pass
    kind = _SEMANTICS.get(fn)
    if kind is not None:
        return kind
    # known functions of other libraries, by name (importing them here would be heavy)
    kind = _THIRD_PARTY.get((getattr(fn, "__module__", None), getattr(fn, "__name__", None)))
    if kind is not None:
        return kind
    from ...rules import rule_for_op

    if rule_for_op(fn) is not None and fn not in _FUNCS:
        return "per_sample"
    if (getattr(fn, "__module__", None) or "").startswith("fxdp.") and callable(fn):
        return "per_sample"
    return None


def shape_args(fn: Any) -> Tuple[int, ...]:
    """Positions of the arguments ``fn`` reads only the shape of (``SHAPE_ARGS``)."""
    if not _hashable(fn):
        return ()
    semantics_for(fn)  # loads fxdp's own ops' declarations
    return SHAPE_ARGS.get(fn, ())


def _aten_pointwise(name: str) -> bool:
    """Whether aten declares ``name`` pointwise (torch.Tag.pointwise)."""
    if name not in _POINTWISE_CACHE:
        ok = False
        pk = getattr(torch.ops.aten, name, None)
        if pk is not None:
            try:
                ok = any(torch.Tag.pointwise in getattr(pk, o).tags for o in pk.overloads())
            except Exception:
                ok = False
        _POINTWISE_CACHE[name] = ok
    return _POINTWISE_CACHE[name]


def op_name(n: fx.Node) -> str:
    """A short, user-facing name of a node's op."""
    if n.op == "call_module":
        return str(n.target)
    if n.op == "call_method":
        return f".{n.target}()"
    if n.op == "call_function":
        t = n.target
        if t is operator.getitem:
            return "[] (indexing)"
        if t is operator.setitem:
            return "[]= (index assignment)"
        name = getattr(t, "__name__", str(t))
        mod = getattr(t, "__module__", None) or ""
        if mod.startswith("torch.nn.functional") or t in (F.batch_norm, F.layer_norm, F.group_norm):
            return f"F.{name}"
        if mod == "_operator" or mod == "operator":
            return f"operator.{name}"
        if isinstance(t, type(torch.sum)) or mod.startswith("torch"):
            return f"torch.{name}"
        return name
    return str(n.target)


class _Unknown(Exception):
    """No transfer function fits this op: it is assumed per-sample and reported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_view(n: fx.Node) -> bool:
    """Whether ``n`` returns a view of its first argument (so writes reach it)."""
    if n.op == "call_method":
        return str(n.target) in _MOVEMENT
    if n.op == "call_function":
        return n.target is operator.getitem or (_hashable(n.target) and _FUNCS.get(n.target) in _MOVEMENT)
    return False


def _hashable(t: Any) -> bool:
    try:
        hash(t)
        return True
    except TypeError:
        return False


def _family(n: fx.Node) -> str:
    """The op family of ``n`` in a finding's explanation (``describe_mixing``)."""
    if n.op == "call_module":
        return "module"
    t = n.target
    if n.op == "call_method":
        name = str(t).rstrip("_") if not str(t).startswith("__") else str(t).strip("_")
    elif t is operator.getitem:
        return "getitem"
    elif t is operator.setitem:
        return "setitem"
    elif t is operator.matmul:
        return "matmul"
    else:
        name = _FUNCS.get(t, getattr(t, "__name__", "")) if _hashable(t) else ""
    if name in _CAT:
        return "cat"
    if name in _REORDER:
        return "reorder"
    if name in _SCANS:
        return "scan"
    if name in _SORTS:
        return "sort"
    if name in _REDUCTIONS:
        return "reduction"
    if name in _MATMUL or name == "matmul":
        return "matmul"
    if name in _INDEX:
        return "index"
    if name == "batch_norm":
        return "batch_norm"
    if name in _NORMS:
        return "norm"
    if name in _LOSSES:
        return "loss"
    if name in _MOVEMENT:
        return "reshape"
    return "other"

