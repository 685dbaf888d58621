"""Batch-mixing analysis: prove, op by op, that no sample influences another.

DP-SGD needs every per-sample gradient to depend on its own sample only (Abadi et
al. 2016). Opacus' validator checks module *types*; a functional ``x - x.mean(0)``,
``F.batch_norm(..., training=True)`` or a frozen BatchNorm left in train mode pass
it and silently break the guarantee. This pass reads the graph instead.

It is an abstract interpretation with a *sample-provenance* domain. Every value
carries a tag tensor of its own shape (at a small batch size ``b``): entry ``s+1``
says the element is computed from sample ``s`` only, ``0`` from no sample
(parameters, constants), ``-1`` from several samples. Each op has a transfer
function over tags from its semantics and arguments (the dims of a reduction, the
equation of a matmul, the real index values of a gather):

* data movement (view, permute, cat, flip, indexing with known indices) applies
  the op itself to the tags, so a transposed fold ``[T*B] -> [B, T]`` shows up;
* pointwise ops combine broadcast tags;
* reductions, scans and sorts combine over their dims;
* contractions reduce each operand over the contracted letters of an einsum;
* modules and functional ops with known per-sample structure (conv, norms,
  embeddings, RNNs, attention) combine per row of their batch dimension.

Batch dimensions come from running the graph at two batch sizes
(``fxdp.passes.batch_dims``): a value is *clean* when each element's tag is its
own sample (the index along the batch dimension) or 0; a folded value
(``[B*k, ...]``) must not mix; a value without a batch dimension must carry no
sample. The first op whose clean inputs give an unclean output is the one that
mixes samples: it is reported, and its output is repaired so that later mixing
ops are reported too. Ops without a transfer function are assumed per-sample and
reported as unproven.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .batch_dims import SIZES, classify, input_batch_dim

__all__ = ["analyze_batch_mixing", "register_semantics", "MixingFinding", "MixingResult", "resize_batch", "fmt_hint"]

NO, MIX = 0, -1  # tag values: no sample / several samples; sample s is s + 1
_BIG = 2**62


def _holds_tensor(v: Any) -> bool:
    return isinstance(v, Tensor) or (isinstance(v, (tuple, list)) and bool(v) and all(isinstance(t, Tensor) for t in v))


class _NoTag:
    """Tag of a non-tensor value (ints, shapes, dtypes)."""

    def __repr__(self) -> str:
        return "-"


NT = _NoTag()


# --- tag algebra ---------------------------------------------------------------------

def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes`` for concrete shapes (torch's imports its symbolic
    shape machinery on first use, seconds of start-up); raises RuntimeError."""
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        for i, d in enumerate(s):
            k = nd - len(s) + i
            if d != 1:
                if out[k] not in (1, d):
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} are not broadcastable")
                out[k] = int(d)
    return torch.Size(out)


def const(shape: Sequence[int], v: int = NO) -> Tensor:
    """A uniform tag without memory (a zero-stride view)."""
    return torch.full((), v, dtype=torch.long).expand(tuple(shape))


def uniform(t: Tensor) -> Optional[int]:
    """The value of a tag that is the same everywhere, else None."""
    if t.numel() == 0:
        return NO
    if t.numel() == 1 or all(s == 0 for s in t.stride()):
        return int(t.reshape(-1)[0]) if t.numel() == 1 else int(t.as_strided((1,), (1,))[0])
    return None


def combine(*ts: Tensor) -> Tensor:
    """Elementwise provenance of a value computed from all of ``ts`` (broadcast)."""
    live = [t for t in ts if uniform(t) != NO]
    if not live:
        return const(broadcast_shapes(*[t.shape for t in ts]))
    shape = broadcast_shapes(*[t.shape for t in ts])
    out = live[0]
    for b in live[1:]:
        a, b = torch.broadcast_tensors(out, b)
        res = torch.where(a == NO, b, a)
        out = res.masked_fill((a != NO) & (b != NO) & (a != b), MIX)
    return out.expand(shape) if tuple(out.shape) != tuple(shape) else out


def reduce(t: Tensor, dims: Optional[Sequence[int]] = None, keepdim: bool = True) -> Tensor:
    """Provenance after combining over ``dims`` (all when None)."""
    nd = t.dim()
    dims = list(range(nd)) if dims is None else sorted({d % nd for d in dims}) if nd else []
    if not dims:
        return t
    shape = [1 if i in dims else s for i, s in enumerate(t.shape)]
    u = uniform(t)
    if u is not None or t.numel() == 0:
        out = const(shape, NO if u is None else u)
    else:
        hi = t.amax(dim=dims, keepdim=True)
        lo = torch.where(t > NO, t, _BIG).amin(dim=dims, keepdim=True)
        mn = t.amin(dim=dims, keepdim=True)
        out = torch.where((mn < NO) | ((hi > NO) & (lo != hi)), MIX, hi.clamp(min=NO))
    if not keepdim:
        out = out.reshape([s for i, s in enumerate(t.shape) if i not in dims])
    return out


def reduce_all(t: Tensor) -> Tensor:
    return reduce(t, None, keepdim=False)


def fit(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t`` brought to ``shape``: as is, reshaped (dims dropped), broadcast, or
    combined to one value and broadcast."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    if t.numel() == int(torch.Size(shape).numel()) and t.numel() > 0:
        try:
            return t.reshape(shape)
        except RuntimeError:
            pass
    try:
        if broadcast_shapes(t.shape, shape) == torch.Size(shape):
            return t.expand(shape)
    except RuntimeError:
        pass
    return reduce_all(t).expand(shape)


def along(v: Tensor, d: int, shape: Sequence[int]) -> Tensor:
    """A per-index vector ``v`` laid along dimension ``d`` of ``shape``."""
    view = [1] * len(shape)
    view[d] = -1
    return v.reshape(view).expand(tuple(shape))


def ideal(shape: Sequence[int], d: int, b: int) -> Tensor:
    """Sample i's elements are exactly those at index i along ``d`` (marked, so
    cleanliness checks on it are free)."""
    t = along(torch.arange(1, b + 1), d, shape)
    t._fxdp_ideal = d  # type: ignore[attr-defined]
    return t


def ideal_dim(t: Tensor) -> Optional[int]:
    return getattr(t, "_fxdp_ideal", None)


def per_index(t: Tensor, d: int) -> Tensor:
    """Provenance of each index along ``d`` (combined over the other dims)."""
    return reduce(t, [i for i in range(t.dim()) if i != d], keepdim=False)


def violations(t: Tensor, hint: Any, b: int) -> Tensor:
    """Elements whose provenance is not clean for a value with batch hint ``hint``."""
    if isinstance(hint, int) and not isinstance(hint, bool) and t.dim() > hint and t.shape[hint] == b:
        exp = ideal(t.shape, hint, b)
        return ~((t == NO) | (t == exp))
    if isinstance(hint, tuple) and hint and hint[0] == "fold":
        return t < NO
    return t != NO


def is_clean(t: Tensor, hint: Any, b: int) -> bool:
    d = ideal_dim(t)
    if d is not None and d == hint and not isinstance(hint, bool):
        return True
    u = uniform(t)
    if u == NO:
        return True
    return not bool(violations(t, hint, b).any())


def fmt_hint(hint: Any) -> str:
    if isinstance(hint, int) and not isinstance(hint, bool):
        return f"batch dim {hint}"
    if isinstance(hint, tuple) and hint and hint[0] == "fold":
        return f"batch folded into dim {hint[1]} (B*{hint[2]})"
    if hint is None:
        return "no batch dim"
    return str(hint)


# --- inputs at a chosen batch size ------------------------------------------------------

def resize_batch(args: Sequence[Any], batch_dim: int, b: int) -> List[Any]:
    """Real inputs with batch size ``b``: the example rows, repeated cyclically."""

    def make(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        d = input_batch_dim(t, batch_dim)
        if d is None:
            return t
        n = t.shape[d]
        if n == 0:
            raise ValueError("example inputs need at least one sample")
        return t.index_select(d, torch.arange(b, device=t.device) % n)

    return [tree_map(make, a) for a in args]


@contextlib.contextmanager
def small_model_threads(model: nn.Module, limit: int = 5_000_000):
    """One intra-op thread while analyzing a small model: the example batches are
    tiny, and on a busy machine thread hand-offs cost more than the ops."""
    n = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) <= limit
    if small and n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and n > 1:
            torch.set_num_threads(n)


def fork_rng(*objs: Any) -> Any:
    """``torch.random.fork_rng`` over the CPU and the CUDA devices of the tensors in ``objs``."""
    devs = sorted({t.device.index or 0 for t in tree_flatten(list(objs))[0]
                   if isinstance(t, Tensor) and t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devs)


def _summary(x: Any) -> List[Any]:
    flat, _ = tree_flatten(x)
    return [tuple(v.shape) if isinstance(v, Tensor) else (v if isinstance(v, int) else None) for v in flat]


# --- op tables --------------------------------------------------------------------------

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
            from ..layers.recurrent import rnn_scan

            _SEMANTICS.setdefault(rnn_scan, "dim0")
        except Exception:  # pragma: no cover - layers not available
            pass
    kind = _SEMANTICS.get(fn)
    if kind is not None:
        return kind
    # known functions of other libraries, by name (importing them here would be heavy)
    kind = _THIRD_PARTY.get((getattr(fn, "__module__", None), getattr(fn, "__name__", None)))
    if kind is not None:
        return kind
    from ..rules import rule_for_op

    if rule_for_op(fn) is not None and fn not in _FUNCS:
        return "per_sample"
    if (getattr(fn, "__module__", None) or "").startswith("fxdp.") and callable(fn):
        return "per_sample"
    return None


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


# --- findings ---------------------------------------------------------------------------

@dataclass
class MixingFinding:
    """One problem found at a node (before user-facing formatting)."""

    node: fx.Node
    code: str  # e.g. "batch-reduction", "batch-norm", "state-update", "unknown-op"
    severity: str  # "error", "warning" or "info"
    problem: str
    fix: str
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MixingResult:
    findings: List[MixingFinding]
    hints: Dict[str, List[Any]]  # node name -> batch hint per flattened value
    shapes: Dict[str, List[Any]]  # node name -> shapes at batch size b1
    batch_size: int  # b1
    fold_origin: Dict[str, str]
    failed: Optional[str] = None  # why the analysis could not run


# --- the analysis -----------------------------------------------------------------------

class _Run(fx.Interpreter):
    """Real execution (no grad) calling ``on_node`` after every node."""

    def __init__(self, gm: fx.GraphModule, on_node: Optional[Callable] = None, pre: Optional[Callable] = None):
        super().__init__(gm)
        self.on_node = on_node
        self.pre = pre
        self.shapes: Dict[str, List[Any]] = {}
        self.current: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        state = self.pre(n, self) if self.pre is not None else None
        out = super().run_node(n)  # the model's own errors propagate
        self.shapes[n.name] = _summary(out)
        if self.on_node is not None:
            self.on_node(n, out, self, state)
        return out


def _is_int(h: Any) -> bool:
    return isinstance(h, int) and not isinstance(h, bool)


def _is_fold(h: Any) -> bool:
    return isinstance(h, tuple) and bool(h) and h[0] == "fold"


class BatchMixingAnalysis:
    """See the module docstring. ``run()`` returns a ``MixingResult``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        args: Sequence[Any],
        *,
        batch_dim: int = 0,
        sizes: Tuple[int, int] = SIZES,
        untraceable: Optional[Dict[str, str]] = None,
        root: Optional[nn.Module] = None,
    ) -> None:
        self.gm = gm
        #: the traced module tree (GraphModule keeps only the modules its graph calls)
        self.root_modules = dict((root or gm).named_modules())
        self.args = list(args)
        self.batch_dim = batch_dim
        self.b1, self.b2 = sizes
        self.untraceable = dict(untraceable or {})
        self.tags: Dict[fx.Node, Any] = {}
        self.hints: Dict[str, List[Any]] = {}
        self.findings: List[MixingFinding] = []
        self.fold_origin: Dict[str, str] = {}
        self._dep: Dict[str, bool] = {}
        self._shapes2: Dict[str, List[Any]] = {}
        self._modules = dict(gm.named_modules())

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> MixingResult:
        gen = torch.Generator().manual_seed(0)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        try:
            with torch.no_grad(), fork_rng(self.args):
                torch.manual_seed(seed)
                r2 = _Run(self.gm)
                r2.run(*resize_batch(self.args, self.batch_dim, self.b2))
                self._shapes2 = r2.shapes
                torch.manual_seed(seed)
                r1 = _Run(self.gm, on_node=self._visit, pre=self._pre)
                r1.run(*resize_batch(self.args, self.batch_dim, self.b1))
        except Exception as e:  # the model does not run at these batch sizes
            where = getattr(locals().get("r1", None) or locals().get("r2", None), "current", None)
            return MixingResult(self.findings, self.hints, {}, self.b1, self.fold_origin,
                                failed=f"{type(e).__name__}: {e}" + (f" (at node {where.name})" if where else ""))
        self._loss_reductions()
        return MixingResult(self.findings, self.hints, r1.shapes, self.b1, self.fold_origin)

    # -- helpers -----------------------------------------------------------------------------
    def tag(self, a: Any) -> Any:
        """Tag pytree of an argument (node, literal, or container of them)."""
        if isinstance(a, fx.Node):
            return self.tags.get(a, NT)
        if isinstance(a, Tensor):
            return const(a.shape)
        if isinstance(a, (list, tuple)):
            return type(a)(self.tag(x) for x in a) if not hasattr(a, "_fields") else [self.tag(x) for x in a]
        if isinstance(a, dict):
            return {k: self.tag(v) for k, v in a.items()}
        return NT

    def hint(self, a: Any, i: int = 0) -> Any:
        if isinstance(a, fx.Node):
            hs = self.hints.get(a.name, [])
            return hs[i] if i < len(hs) else None
        return None

    def _flat_tags(self, *objs: Any) -> List[Tensor]:
        out: List[Tensor] = []
        for o in objs:
            flat, _ = tree_flatten(self.tag(o) if not isinstance(o, Tensor) else o)
            out += [t for t in flat if isinstance(t, Tensor)]
        return out

    def _data_dep(self, n: fx.Node) -> bool:
        """Whether ``n`` is computed from the model's inputs (not just parameters)."""
        if n.name not in self._dep:
            stack, seen, found = [n], set(), False
            while stack and not found:
                x = stack.pop()
                if x in seen:
                    continue
                seen.add(x)
                found = x.op == "placeholder" or self._dep.get(x.name, False)
                stack.extend(x.all_input_nodes)
            self._dep[n.name] = found
        return self._dep[n.name]

    def _mod(self, n: fx.Node) -> nn.Module:
        return self._modules[str(n.target)]

    def add(self, n: fx.Node, code: str, severity: str, problem: str, fix: str, **details: Any) -> None:
        self.findings.append(MixingFinding(n, code, severity, problem, fix, details))

    # -- per node ----------------------------------------------------------------------------
    def _pre(self, n: fx.Node, run: _Run) -> Any:
        if n.op != "call_module":
            return None
        m = self._mod(n)
        bufs = {k: b.detach().clone() for k, b in m.named_buffers()}
        attrs = {k: v for k, v in vars(m).items() if isinstance(v, Tensor)}
        return bufs, attrs

    def _visit(self, n: fx.Node, out: Any, run: _Run, state: Any) -> None:
        try:
            self._visit_node(n, out, run, state)
        except Exception as e:  # a bug or gap of the analysis must not look like a model failure
            self.env = run.env
            try:
                self.tags[n] = self._assume(n, out)
            except Exception:
                self.tags[n] = tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
            self._analysis_error(n, e)

    def _analysis_error(self, n: fx.Node, e: Exception) -> None:
        """Fail closed: what the analysis cannot process is not proven safe, so it is an error."""
        self.add(n, "analysis-error", "error",
                 f"the analysis could not process {op_name(n)} ({type(e).__name__}: {e}), so it could not "
                 "prove that samples stay apart",
                 "rewrite this line with ops that keep each sample in its own row (or run "
                 "fxdp.verify(model, example_inputs) to test it dynamically, then ignore=[this finding] if "
                 "you accept it)")

    def _visit_node(self, n: fx.Node, out: Any, run: _Run, state: Any) -> None:
        s1 = run.shapes[n.name]
        s2 = self._shapes2.get(n.name, [])
        self.hints[n.name] = (
            [classify(a, b, self.b1, self.b2) for a, b in zip(s1, s2)] if len(s1) == len(s2)
            else ["ambiguous"] * len(s1)
        )
        env = run.env
        if n.op == "output":
            self._output(n)
            return
        try:
            tag = self._transfer(n, out, env)
        except _Unknown as u:
            tag = self._assume(n, out, unknown=u.reason)
        except Exception as e:  # a transfer function that does not fit this call: not proven, an error
            tag = self._assume(n, out)
            self._analysis_error(n, e)
        tag = self._conform(out, tag)
        self._check(n, out, tag)
        if n.op == "call_module" and state is not None:
            self._module_state(n, state)
        hs = self.hints[n.name]
        if any(_is_fold(h) for h in hs):
            origin = next((self.fold_origin[a.name] for a in n.all_input_nodes if a.name in self.fold_origin), n.name)
            self.fold_origin[n.name] = origin

    def _conform(self, out: Any, tag: Any) -> Any:
        """Make the tag pytree match the value's (robust to ops returning lists/tuples)."""
        flat_v, spec = tree_flatten(out)
        flat_t, _ = tree_flatten(tag)
        if len(flat_t) != len(flat_v):
            tensors = [t for t in flat_t if isinstance(t, Tensor)]
            g = combine(*[reduce_all(t) for t in tensors]) if tensors else const(())
            flat_t = [fit(g, v.shape) if isinstance(v, Tensor) else NT for v in flat_v]
        else:
            flat_t = [
                (fit(t, v.shape) if isinstance(t, Tensor) else const(v.shape)) if isinstance(v, Tensor) else NT
                for t, v in zip(flat_t, flat_v)
            ]
        return tree_unflatten(flat_t, spec)

    def _check(self, n: fx.Node, out: Any, tag: Any, target: Optional[fx.Node] = None) -> None:
        """Report ``n`` if its (clean) inputs give an unclean output; store repaired tags."""
        target = target or n
        flat_v, spec = tree_flatten(out)
        flat_t, _ = tree_flatten(tag)
        hs = self.hints.get(target.name, [])
        bad: List[Tuple[int, Any, Tensor]] = []
        fixed = list(flat_t)
        for i, (v, t) in enumerate(zip(flat_v, flat_t)):
            if not isinstance(v, Tensor) or not isinstance(t, Tensor):
                continue
            h = hs[i] if i < len(hs) else "ambiguous"
            if ideal_dim(t) is not None and ideal_dim(t) == h:
                continue
            if _is_int(h) and t.dim() > h and t.shape[h] == self.b1 and uniform(t) is None:
                exact = t == ideal(t.shape, h, self.b1)
                if bool(exact.all()):  # exactly per-sample: keep the marked (free) form
                    fixed[i] = ideal(t.shape, h, self.b1)
                    continue
                if bool((exact | (t == NO)).all()):
                    continue
                bad.append((i, h, t))
                fixed[i] = self._repair(t, h)
            elif not is_clean(t, h, self.b1):
                bad.append((i, h, t))
                fixed[i] = self._repair(t, h)
        if bad:
            self._explain(n, bad)
        self.tags[target] = tree_unflatten(fixed, spec)

    def _repair(self, t: Tensor, h: Any) -> Tensor:
        if _is_int(h) and t.dim() > h and t.shape[h] == self.b1:
            return ideal(t.shape, h, self.b1)
        if _is_fold(h):
            return t.clamp(min=NO)
        return const(t.shape)

    def _output(self, n: fx.Node) -> None:
        flat, _ = tree_flatten((n.args, n.kwargs))
        seen = set()
        for a in flat:
            if not isinstance(a, fx.Node):
                continue
            for h in self.hints.get(a.name, []):
                if _is_fold(h) and a.name in self.fold_origin and self.fold_origin[a.name] not in seen:
                    origin_name = self.fold_origin[a.name]
                    seen.add(origin_name)
                    origin = next(x for x in self.gm.graph.nodes if x.name == origin_name)
                    self.add(
                        origin, "batch-fold", "warning",
                        f"folds the batch into dimension {h[1]} (size B*{h[2]}) and the model's output keeps it "
                        "folded: per-sample outputs cannot be read off the output, and a loss that is not a plain "
                        "sum/mean over its rows would mix samples",
                        "unfold it before returning (e.g. `y.view(B, T, -1)`), or reduce the folded rows per "
                        "sample in the loss",
                        dim=h[1], k=h[2],
                    )

    # -- unknown / generic ---------------------------------------------------------------------
    def _assume(self, n: fx.Node, out: Any, unknown: Optional[str] = None) -> Any:
        """Tags of an op assumed per-sample (consistent with its output's batch dims)."""
        ins = self._flat_tags(n.args, n.kwargs)
        carries = any(uniform(t) != NO for t in ins)
        hs = self.hints.get(n.name, [])
        flat_v, spec = tree_flatten(out)
        res: List[Any] = []
        for i, v in enumerate(flat_v):
            if not isinstance(v, Tensor):
                res.append(NT)
                continue
            h = hs[i] if i < len(hs) else "ambiguous"
            if _is_int(h) and v.dim() > h and v.shape[h] == self.b1:
                res.append(ideal(v.shape, h, self.b1))
            elif _is_fold(h):
                same = next((t for t in ins if tuple(t.shape) == tuple(v.shape)), None)
                if same is not None:
                    res.append(same.clamp(min=NO))
                else:
                    rows = torch.arange(1, self.b1 + 1).repeat_interleave(h[2])
                    res.append(along(rows, h[1], v.shape))
            else:
                g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
                res.append(g.expand(v.shape))
        if unknown and carries:
            self._unknown(n, unknown)
        return tree_unflatten(res, spec)

    def _unknown(self, n: fx.Node, reason: str) -> None:
        self.add(
            n, "unknown-op", "warning",
            f"{op_name(n)} is not in fxdp's op table ({reason}); it could not be proven to keep samples apart",
            "run fxdp.verify(model, example_inputs) to test it dynamically, or express it with known torch ops",
        )

    # -- transfer dispatch -------------------------------------------------------------------
    def _transfer(self, n: fx.Node, out: Any, env: Dict[fx.Node, Any]) -> Any:
        self.env = env
        fast = self._fast(n, out)
        if fast is not None:
            return fast
        if n.op == "placeholder":
            return tree_map(self._input_tag, out)
        if n.op == "get_attr":
            return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
        if n.op == "call_module":
            return self._module(n, out)
        if n.op == "call_method":
            return self._method(n, str(n.target), out)
        if n.op == "call_function":
            return self._function(n, out)
        raise _Unknown(f"node kind {n.op}")

    # -- fast path ------------------------------------------------------------------------------
    def _fast(self, n: fx.Node, out: Any) -> Any:
        """Skip the tag arithmetic when the answer is known from the batch dims: every
        tensor input is exactly per-sample along its batch dim (or holds no sample),
        and the op keeps positions along that dim apart (pointwise with aligned batch
        dims, per-row ops on dim 0, linear maps over the last dim, reductions that
        leave the batch dim alone)."""
        if n.op not in ("call_function", "call_method", "call_module"):
            return None
        flat_v, spec = tree_flatten(out)
        hs = self.hints.get(n.name, [])
        if not flat_v or len(hs) != len(flat_v):
            return None
        for v, h in zip(flat_v, hs):
            if not isinstance(v, Tensor) or not _is_int(h) or v.dim() <= h or v.shape[h] != self.b1:
                return None
        fam = self._fast_family(n)
        if fam is None:
            return None
        dims: List[Tuple[int, int]] = []  # (batch dim, rank) of each per-sample input
        for a in tree_flatten((n.args, n.kwargs))[0]:
            if not isinstance(a, fx.Node) or not isinstance(self.env.get(a), Tensor):
                continue
            t = self.tags.get(a)
            if not isinstance(t, Tensor):
                return None
            d = ideal_dim(t)
            if d is not None and d == self.hint(a):
                dims.append((d, t.dim()))
            elif uniform(t) != NO:
                return None
        if not dims:
            return None
        kind, arg = fam
        R = flat_v[0].dim()
        if kind == "pointwise":
            ok = len(flat_v) == 1 and all(d + R - r == hs[0] for d, r in dims)
        elif kind == "dim0":
            ok = all(d == 0 for d, _ in dims) and all(h == 0 for h in hs)
        elif kind == "lastdims":  # linear maps / norms over the last ``arg`` dims
            ok = len(flat_v) == 1 and all(d < r - arg and d == hs[0] and r == R for d, r in dims)
        elif kind == "reduce":
            ok = len(dims) == 1 and arg is not None and dims[0][0] not in arg
        else:
            ok = False
        if not ok:
            return None
        return tree_unflatten([ideal(v.shape, h, self.b1) for v, h in zip(flat_v, hs)], spec)

    def _fast_family(self, n: fx.Node) -> Optional[Tuple[str, Any]]:
        if n.op == "call_module":
            m = self._mod(n)
            from torch.nn.modules import activation, conv, dropout, pooling

            if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
                return ("lastdims", 1)
            if isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward:
                return ("lastdims", len(m.normalized_shape))
            if isinstance(m, (conv._ConvNd, nn.GroupNorm, pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd,
                              pooling._AdaptiveMaxPoolNd, pooling._MaxPoolNd)) and m.__module__.startswith("torch.nn"):
                return ("dim0", None)
            if isinstance(m, (nn.Identity, dropout._DropoutNd)) or (
                    m.__module__ == activation.__name__ and not isinstance(
                        m, (nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU,
                            nn.PReLU))):
                return ("pointwise", None)
            return None
        t = n.target
        if n.op == "call_method":
            name = str(t)
            if name.endswith("_") or name in _SHAPE_METHODS:
                return None
        else:
            if t in _OPERATOR_POINTWISE:
                return ("pointwise", None)
            if not _hashable(t) or t not in _FUNCS or semantics_for(t) is not None:
                return None
            name = _FUNCS[t]
        if name in ("where", "max", "min", "nonzero", "argwhere"):
            return None
        if name in _POINTWISE or name in _CONVERT:
            return ("pointwise", None)
        if name in _DIM0:
            return ("dim0", None)
        if name == "linear":
            return ("lastdims", 1)
        if name in _REDUCTIONS and name not in _TWO_INPUT_REDUCTIONS:
            x = n.args[0] if n.args else None
            xv = self.env.get(x) if isinstance(x, fx.Node) else None
            if not isinstance(xv, Tensor):
                return None
            try:
                dims = self._dims(n, name, xv)
            except Exception:
                return None
            return ("reduce", dims if dims else None)
        return None

    def _input_tag(self, v: Any) -> Any:
        if not isinstance(v, Tensor):
            return NT
        d = input_batch_dim(v, self.batch_dim)
        if d is None or v.shape[d] != self.b1:
            return const(v.shape)
        return ideal(v.shape, d, self.b1)

    def V(self, a: Any) -> Any:
        """Real value of an argument."""
        return fx.node.map_aggregate(a, lambda x: self.env[x] if isinstance(x, fx.Node) else x)

    def I(self, a: Any) -> Any:  # noqa: E743
        """Real value of an index argument, on the CPU (where the tags live)."""
        return fx.node.map_aggregate(self.V(a), lambda x: x.cpu() if isinstance(x, Tensor) else x)

    def _function(self, n: fx.Node, out: Any) -> Any:
        t = n.target
        if t is operator.getitem:
            return self._getitem(n, out)
        if t is operator.setitem:
            return self._setitem(n, out)
        if t is getattr:
            attr = n.args[1]
            bt = self.tag(n.args[0])
            if isinstance(bt, Tensor):
                if attr in ("T", "mT", "H", "mH"):
                    return getattr(bt, attr)
                if attr in ("data", "real", "imag"):
                    return bt
            elif hasattr(bt, attr) and not isinstance(bt, _NoTag):  # e.g. .values of torch.return_types.max
                return getattr(bt, attr)
            return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
        if t in _OPERATOR_INPLACE:
            return self._inplace(n, out, self._pointwise(n, out))
        if t in _OPERATOR_POINTWISE or t is operator.matmul:
            if not any(isinstance(v, Tensor) for v in tree_flatten(self.V((n.args, n.kwargs)))[0]):
                return tree_map(lambda v: NT, out)
            return self._matmul(n, out, "matmul") if t is operator.matmul else self._pointwise(n, out)
        if t is torch._C._set_grad_enabled:
            return NT
        sem = semantics_for(t)
        if sem is not None:
            return self._declared(n, out, sem)
        name = _FUNCS.get(t) if _hashable(t) else None
        if name is None:
            if not any(isinstance(v, Tensor) for v in tree_flatten(self.V((n.args, n.kwargs)))[0]):
                return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
            fname = getattr(t, "__name__", None)
            if isinstance(fname, str) and _aten_pointwise(fname) and getattr(t, "__module__", "").startswith("torch"):
                return self._pointwise(n, out)
            raise _Unknown("unknown function")
        return self._named(n, name, out, method=False)

    def _method(self, n: fx.Node, name: str, out: Any) -> Any:
        if name in _SHAPE_METHODS:
            return tree_map(lambda v: NT, out)
        inplace = name.endswith("_") and not name.endswith("__") and name[:-1] not in ("requires_grad", "retain_grad")
        base = name[:-1] if inplace else name
        if name.startswith("__") and name.endswith("__"):
            base = name.strip("_").lstrip("r") if name.startswith("__r") else name.strip("_")
            op = getattr(operator, base, None)
            if op in _OPERATOR_POINTWISE:
                return self._pointwise(n, out)
            if base == "matmul":
                return self._matmul(n, out, "matmul")
            raise _Unknown("unknown method")
        if base in ("zero", "fill", "copy", "fill_diagonal", "normal", "uniform", "random", "bernoulli",
                    "exponential", "geometric", "cauchy", "log_normal") and inplace:
            return self._inplace(n, out, self._overwrite(n, base))
        if not (base in _FACTORY or base in _CONVERT or base in _MOVEMENT or base in _REDUCTIONS
                or base in _POINTWISE or base in _MATMUL or base in _INDEX or base in _NORMS
                or _aten_pointwise(base)):
            raise _Unknown("unknown method")
        tag = self._named(n, base, out, method=True)
        return self._inplace(n, out, tag) if inplace else tag

    def _named(self, n: fx.Node, name: str, out: Any, method: bool) -> Any:
        if name in _FACTORY:
            return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
        if name in _CONVERT:
            return fit(self.tag(n.args[0]), out.shape) if isinstance(out, Tensor) else self.tag(n.args[0])
        if name in ("max", "min") and len(n.args) > 1 and isinstance(self.V(n.args[1]), Tensor):
            return self._pointwise(n, out)
        if name == "where" and len(n.args) + len(n.kwargs) == 1:
            return self._nonzero(n, out, as_tuple=True)
        if name in ("nonzero", "argwhere"):
            return self._nonzero(n, out, as_tuple=bool(n.kwargs.get("as_tuple", False)))
        if name in _POINTWISE or (name not in _MOVEMENT and name not in _REDUCTIONS and name not in _MATMUL
                                  and name not in _INDEX and name not in _NORMS and name not in _DIM0
                                  and name not in _LOSSES and name not in ("pad", "im2col") and _aten_pointwise(name)):
            return self._pointwise(n, out)
        if name in _MOVEMENT:
            return self._movement(n, name, out, method)
        if name == "pad":
            return self._pad(n, out)
        if name in _REDUCTIONS:
            return self._reduction(n, name, out)
        if name in _MATMUL:
            return self._matmul(n, out, name)
        if name in _INDEX:
            return self._index(n, name, out)
        if name in _NORMS:
            return self._norm_fn(n, name, out)
        if name in _DIM0 or name == "im2col":
            return self._dim0(n, out, [n.args[0]] if n.args else list(n.kwargs.values())[:1])
        if name in _LOSSES:
            return self._loss(n, name, out)
        raise _Unknown("unknown function")

    def _declared(self, n: fx.Node, out: Any, kind: str) -> Any:
        """Ops with declared semantics (``register_semantics``)."""
        if kind == "pointwise":
            return self._pointwise(n, out)
        if kind == "dim0":
            return self._dim0(n, out, [n.args[0]] if n.args else list(n.kwargs.values())[:1])
        return self._assume(n, out)  # "per_sample": trusted, consistent with the batch dims

    # -- families ------------------------------------------------------------------------------
    def _pointwise(self, n: fx.Node, out: Any) -> Any:
        ins = self._flat_tags(n.args, n.kwargs)

        def one(v: Any) -> Any:
            if not isinstance(v, Tensor):
                return NT
            parts = []
            for t in ins:
                try:
                    ok = broadcast_shapes(t.shape, v.shape) == v.shape
                except RuntimeError:
                    ok = False
                parts.append(t if ok else reduce_all(t))  # e.g. prelu's per-channel weight
            return combine(*parts, const(v.shape)) if parts else const(v.shape)

        return tree_map(one, out)

    def _inplace(self, n: fx.Node, out: Any, tag: Any) -> Any:
        """An in-place op: the mutated tensor (first argument) now has ``tag``."""
        tgt = n.args[0] if n.args else None
        if isinstance(tgt, fx.Node) and isinstance(out, Tensor):
            self._state_update(n, tgt, tag)
            self._check(n, out, tag, target=tgt)
        return tag

    def _overwrite(self, n: fx.Node, base: str) -> Tensor:
        out = self.V(n.args[0])
        if base == "copy":
            return fit(combine(*self._flat_tags(n.args[1:], n.kwargs)) if len(n.args) > 1 else const(out.shape),
                       out.shape)
        if base == "fill" and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
            return fit(reduce_all(self.tag(n.args[1])), out.shape)
        return const(out.shape)

    def _state_update(self, n: fx.Node, tgt: fx.Node, tag: Any) -> None:
        """In-place updates of buffers/parameters (``get_attr``, possibly through views)."""
        base = tgt
        while base.args and isinstance(base.args[0], fx.Node) and _is_view(base):
            base = base.args[0]
        if base.op != "get_attr":
            return
        rest = [a for a in tree_flatten((n.args[1:], n.kwargs))[0] if isinstance(a, fx.Node)]
        if any(self._data_dep(a) for a in rest):
            self.add(
                n, "state-update", "error",
                f"updates `{base.target}` in place from batch data during the forward: state that outlives the "
                "step (running statistics, caches) carries information about this batch into later steps, "
                "outside the privacy accounting, and couples samples across steps",
                "compute the statistic outside the DP model (or from public data), or keep it per forward "
                "without storing it on the module",
                attr=str(base.target),
            )
        else:
            self.add(
                n, "state-update", "warning",
                f"updates `{base.target}` in place during the forward (not from batch data)",
                "make sure the update never depends on the training data",
                attr=str(base.target),
            )

    def _movement(self, n: fx.Node, name: str, out: Any, method: bool) -> Any:
        args = list(n.args)
        kwargs = dict(n.kwargs)
        index_role = set()
        if name == "repeat_interleave":
            index_role = {1, "repeats"}

        def sub(a: Any, role: Any) -> Any:
            if role in index_role:
                return self.I(a)
            # a node holding tensors (one, or a tuple such as chunk's result) stands for its tags
            return fx.node.map_aggregate(
                a, lambda x: self.tags[x] if isinstance(x, fx.Node) and _holds_tensor(self.env.get(x))
                else (self.env[x] if isinstance(x, fx.Node) else x)
            )

        targs = [sub(a, i) for i, a in enumerate(args)]
        tkw = {k: sub(v, k) for k, v in kwargs.items()}
        if method:
            tag = getattr(targs[0], name)(*targs[1:], **tkw) if name not in ("T", "mT", "H", "mH") \
                else getattr(targs[0], name)
        else:
            tag = n.target(*targs, **tkw)
        return tag

    def _pad(self, n: fx.Node, out: Tensor) -> Tensor:
        mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
        if mode == "constant":
            x = self.tag(n.args[0])
            pad = self.V(n.args[1] if len(n.args) > 1 else n.kwargs["pad"])
            return F.pad(x, tuple(pad), value=NO)
        return self._dim0(n, out, [n.args[0]])

    def _dims(self, n: fx.Node, name: str, x: Tensor) -> Optional[List[int]]:
        pos, default = _REDUCTIONS[name]
        dim: Any = None
        for kw in ("dim", "axis"):
            if kw in n.kwargs:
                dim = self.V(n.kwargs[kw])
        if dim is None and len(n.args) > pos:
            dim = self.V(n.args[pos])
        nd = x.dim()
        if dim is None:
            if default == "all":
                return None
            if default == "legacy_softmax":
                return [0 if nd in (0, 1, 3) else 1]
            if default == "complement":
                raise _Unknown("renorm without dim")
            dim = default
        if isinstance(dim, int):
            dims = [dim]
        else:
            dims = list(dim)
        if not nd:
            return []
        dims = [d % nd for d in dims]
        if default == "complement":
            dims = [i for i in range(nd) if i not in dims]
        return dims

    def _reduction(self, n: fx.Node, name: str, out: Any) -> Any:
        x_node = n.args[0] if n.args else next(iter(n.kwargs.values()))
        x = self.tag(x_node)
        if name in _TWO_INPUT_REDUCTIONS and len(n.args) > 1:
            x = combine(x, self.tag(n.args[1]))
        r = reduce(x, self._dims(n, name, x), keepdim=True)
        # every output element (values, indices, a glu half, a sorted row) depends on the whole reduced slice
        return tree_map(lambda v: fit(r, v.shape) if isinstance(v, Tensor) else NT, out)

    def _einsum_tags(self, eq: str, ops: List[Tensor], out_shape: Sequence[int]) -> Tensor:
        """Provenance of ``torch.einsum(eq, *ops)``: each operand combined over the
        letters it contributes that are summed away, then broadcast into the output."""
        eq = eq.replace(" ", "")
        lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
        subs = lhs.split(",")
        if len(subs) != len(ops):
            raise _Unknown("einsum operands")
        used = set(c for c in eq if c.isalpha())
        spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
        ell_n = max((o.dim() - (len(s) - 3) if "..." in s else 0) for s, o in zip(subs, ops))
        ell = spare[:ell_n]
        full = []
        for s, o in zip(subs, ops):
            if "..." in s:
                k = o.dim() - (len(s) - 3)
                s = s.replace("...", "".join(ell[ell_n - k:]))
            full.append(s)
        if rhs is None:
            letters = "".join(full)
            rhs_full = "".join(ell) + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
        else:
            rhs_full = rhs.replace("...", "".join(ell))
        parts = []
        for s, o in zip(full, ops):
            if len(set(s)) != len(s):
                raise _Unknown("einsum with repeated letters")
            red = [i for i, c in enumerate(s) if c not in rhs_full]
            r = reduce(o, red, keepdim=False)
            keep = [c for c in s if c in rhs_full]
            perm = sorted(range(len(keep)), key=lambda i: rhs_full.index(keep[i]))
            r = r.permute(perm) if perm else r
            view = [1] * len(rhs_full)
            for i, c in enumerate(sorted(keep, key=rhs_full.index)):
                view[rhs_full.index(c)] = r.shape[i]
            parts.append(r.reshape(view))
        return fit(combine(*parts), out_shape)

    def _matmul(self, n: fx.Node, out: Any, name: str) -> Any:
        A = lambda i, kw=None: n.args[i] if len(n.args) > i else n.kwargs.get(kw)  # noqa: E731
        T = lambda a: self.tag(a) if a is not None else None  # noqa: E731
        shape = out.shape if isinstance(out, Tensor) else None

        def mm(a: Tensor, b: Tensor, shape: Sequence[int]) -> Tensor:
            if a.dim() == 1 and b.dim() == 1:
                return self._einsum_tags("i,i->", [a, b], shape)
            if a.dim() == 1:
                return self._einsum_tags("k,...km->...m", [a, b], shape)
            if b.dim() == 1:
                return self._einsum_tags("...nk,k->...n", [a, b], shape)
            return self._einsum_tags("...nk,...km->...nm", [a, b], shape)

        if name in ("matmul", "__matmul__", "mm", "bmm", "mv", "dot", "vdot"):
            return mm(T(A(0, "input")), T(A(1, "other") or A(1, "mat2") or A(1, "vec")), shape)
        if name == "__rmatmul__":
            return mm(T(n.args[1]), T(n.args[0]), shape)
        if name in ("addmm", "addmv", "baddbmm"):
            return combine(fit(T(A(0, "input")), shape), mm(T(n.args[1]), T(n.args[2]), shape))
        if name == "addbmm":
            summed = self._einsum_tags("bnk,bkm->nm", [T(n.args[1]), T(n.args[2])], shape)
            return combine(fit(T(A(0, "input")), shape), summed)
        if name == "addr":
            return combine(fit(T(n.args[0]), shape), self._einsum_tags("n,m->nm", [T(n.args[1]), T(n.args[2])], shape))
        if name in ("outer", "ger"):
            return self._einsum_tags("n,m->nm", [T(n.args[0]), T(n.args[1])], shape)
        if name == "inner":
            a, b = T(n.args[0]), T(n.args[1])
            if a.dim() == 0 or b.dim() == 0:
                return combine(fit(a, shape), fit(b, shape))
            return fit(combine(reduce(a, [-1], False).reshape(list(a.shape[:-1]) + [1] * (b.dim() - 1)),
                               reduce(b, [-1], False)), shape)
        if name == "einsum":
            eq = n.args[0]
            ops = list(n.args[1]) if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
            return self._einsum_tags(self.V(eq), [T(o) for o in ops], shape)
        if name == "linear":
            x, w, b = T(A(0, "input")), T(A(1, "weight")), A(2, "bias")
            r = self._einsum_tags("...i,oi->...o", [x, w], shape)
            return combine(r, fit(T(b), shape)) if b is not None else r
        if name == "bilinear":
            x1, x2, w, b = T(n.args[0]), T(n.args[1]), T(n.args[2]), (n.args[3] if len(n.args) > 3 else None)
            r = self._einsum_tags("...i,...j,oij->...o", [x1, x2, w], shape)
            return combine(r, fit(T(b), shape)) if b is not None else r
        if name in ("chain_matmul", "multi_dot"):
            mats = list(n.args[0]) if name == "multi_dot" else list(n.args)
            vals = [self.V(m) for m in mats]
            r = T(mats[0])
            cur = vals[0]
            for m, v in zip(mats[1:], vals[1:]):
                cur = cur @ v
                r = mm(r, T(m), cur.shape)
            return fit(r, shape)
        if name == "cdist":
            return self._einsum_tags("...pm,...rm->...pr", [T(n.args[0]), T(n.args[1])], shape)
        if name == "tensordot":
            a, b = T(n.args[0]), T(n.args[1])
            dims = self.V(n.args[2] if len(n.args) > 2 else n.kwargs.get("dims", 2))
            if isinstance(dims, int):
                da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
            else:
                da, db = [list(d) if isinstance(d, (list, tuple)) else [d] for d in dims]
            letters = iter("abcdefghijklmnopqrstuvwxyz")
            sa = [next(letters) for _ in range(a.dim())]
            sb = [next(letters) for _ in range(b.dim())]
            for i, j in zip(da, db):
                sb[j % b.dim()] = sa[i % a.dim()]
            outl = [c for i, c in enumerate(sa) if i % a.dim() not in [d % a.dim() for d in da]] + \
                   [c for j, c in enumerate(sb) if j % b.dim() not in [d % b.dim() for d in db]]
            return self._einsum_tags(f"{''.join(sa)},{''.join(sb)}->{''.join(outl)}", [a, b], shape)
        if name == "scaled_dot_product_attention":
            q, k, v = T(A(0, "query")), T(A(1, "key")), T(A(2, "value"))
            mask = A(3, "attn_mask")
            qv = self.V(A(0, "query"))
            kv = self.V(A(1, "key"))
            scores_shape = broadcast_shapes(qv.shape[:-2], kv.shape[:-2]) + (qv.shape[-2], kv.shape[-2])
            s = self._einsum_tags("...le,...se->...ls", [q, k], scores_shape)
            if mask is not None and isinstance(self.V(mask), Tensor):  # a mask node may hold None (timm)
                s = combine(s, self.tag(mask))
            return self._einsum_tags("...ls,...sv->...lv", [s, v], shape)
        raise _Unknown("matmul variant")

    # -- indexing ------------------------------------------------------------------------------
    def _getitem(self, n: fx.Node, out: Any) -> Any:
        base = n.args[0]
        idx = n.args[1]
        bv = self.V(base)
        if not isinstance(bv, Tensor):
            bt = self.tag(base)
            if isinstance(bt, (list, tuple)) or hasattr(bt, "__getitem__") and not isinstance(bt, Tensor):
                try:
                    return bt[self.I(idx)]
                except Exception:
                    pass
            return tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
        return self._index_tensor(n, self.tag(base), bv, self.I(idx), idx, out)

    def _index_tensor(self, n: fx.Node, bt: Tensor, bv: Tensor, iv: Any, inode: Any, out: Tensor) -> Tensor:
        """``bt[iv]`` plus the provenance of tensor indices (numpy's advanced indexing)."""
        items = list(iv) if isinstance(iv, tuple) else [iv]
        nodes = list(inode) if isinstance(inode, tuple) else [inode]
        real: List[Any] = []
        kinds: List[Tuple[str, Any]] = []  # (kind, tag of the index or None)
        for it, nd in zip(items, nodes):
            if isinstance(it, (list,)) and it and not isinstance(it[0], slice):
                it = torch.as_tensor(it)
            if isinstance(it, Tensor) and it.dtype == torch.bool:
                it_tag = self.tag(nd) if isinstance(nd, fx.Node) else const(it.shape)
                nz = it.nonzero(as_tuple=True)
                sel = it_tag[it] if isinstance(it_tag, Tensor) else const((int(it.sum()),))
                for z in nz:
                    real.append(z)
                    kinds.append(("adv", sel))
                continue
            if isinstance(it, Tensor):
                real.append(it)
                t = self.tag(nd) if isinstance(nd, fx.Node) else const(it.shape)
                kinds.append(("adv", t if isinstance(t, Tensor) else const(it.shape)))
            elif it is None:
                real.append(None)
                kinds.append(("none", None))
            elif it is Ellipsis:
                real.append(Ellipsis)
                kinds.append(("ellipsis", None))
            elif isinstance(it, slice):
                real.append(it)
                kinds.append(("slice", None))
            else:
                real.append(it)
                kinds.append(("int", None))
        sel = bt[tuple(real)]
        advs = [t for k, t in kinds if k == "adv"]
        if not advs or all(uniform(t) == NO for t in advs):
            return fit(sel, out.shape)
        # place the broadcast index provenance where numpy puts the advanced dims
        consumed = sum(1 for k, _ in kinds if k in ("slice", "int", "adv"))
        expanded: List[str] = []
        for k, _ in kinds:
            if k == "ellipsis":
                expanded += ["slice"] * (bv.dim() - consumed)
            else:
                expanded.append(k)
        if "ellipsis" not in [k for k, _ in kinds]:
            expanded += ["slice"] * (bv.dim() - consumed)
        adv_pos = [i for i, k in enumerate(expanded) if k in ("adv", "int")]
        contiguous = adv_pos == list(range(adv_pos[0], adv_pos[-1] + 1))
        adv_shape = broadcast_shapes(*[t.shape for t in advs])
        it_tag = combine(*[t.expand(adv_shape) for t in advs])
        start = sum(1 for k in expanded[: adv_pos[0]] if k in ("slice", "none")) if contiguous else 0
        view = [1] * start + list(adv_shape) + [1] * (out.dim() - start - len(adv_shape))
        if len(view) != out.dim():
            return combine(fit(sel, out.shape), reduce_all(it_tag).expand(out.shape))
        return combine(fit(sel, out.shape), it_tag.reshape(view).expand(out.shape))

    def _setitem(self, n: fx.Node, out: Any) -> Any:
        base, idx, val = n.args[0], n.args[1], n.args[2]
        bv = self.V(base)
        if not isinstance(bv, Tensor):
            return NT
        bt = self.tag(base).clone() if isinstance(self.tag(base), Tensor) else const(bv.shape).clone()
        bt = bt.contiguous()
        iv = self.I(idx)
        region = bt[iv]
        vt = self.tag(val) if isinstance(val, fx.Node) and isinstance(self.V(val), Tensor) else const(())
        it_tags = [t for t in self._flat_tags(idx) if uniform(t) != NO]
        new = fit(vt, region.shape)
        if it_tags:
            new = combine(new, *[reduce_all(t) for t in it_tags])
        bt[iv] = new
        self._state_update(n, base, bt)
        self._check(n, bv, bt, target=base)
        return NT

    def _nonzero(self, n: fx.Node, out: Any, as_tuple: bool) -> Any:
        x = self.tag(n.args[0])
        xv = self.I(n.args[0])
        pos = xv.nonzero(as_tuple=True)
        sel = x[pos] if x.dim() else x.reshape(1)[: len(pos[0]) if pos else 0]
        if isinstance(out, Tensor):
            return fit(sel.reshape(-1, 1), out.shape) if out.dim() == 2 else fit(sel, out.shape)
        return type(out)(fit(sel, o.shape) for o in out)

    def _index(self, n: fx.Node, name: str, out: Any) -> Any:
        A = lambda i, kw: n.args[i] if len(n.args) > i else n.kwargs.get(kw)  # noqa: E731
        if name == "index_select":
            x, dim, idx = A(0, "input"), self.V(A(1, "dim")), A(2, "index")
            xt, iv = self.tag(x), self.I(idx)
            d = dim % max(xt.dim(), 1)
            sel = xt.index_select(d, iv)
            return combine(sel, along(self.tag(idx), d, sel.shape)) if self.tag(idx).dim() else sel
        if name in ("gather", "take_along_dim"):
            x = A(0, "input")
            if name == "gather":
                dim, idx = self.V(A(1, "dim")), A(2, "index")
            else:
                idx, dim = A(1, "indices"), self.V(A(2, "dim"))
            xt, iv = self.tag(x), self.I(idx)
            sel = xt.gather(dim, iv) if name == "gather" else torch.take_along_dim(xt, iv, dim)
            return combine(sel, fit(self.tag(idx), sel.shape))
        if name == "take":
            xt, iv = self.tag(n.args[0]), self.I(n.args[1])
            return combine(xt.reshape(-1)[iv], self.tag(n.args[1]))
        if name == "masked_select":
            xt, mv = self.tag(n.args[0]), self.I(n.args[1])
            xv = self.V(n.args[0])
            shape = broadcast_shapes(xv.shape, mv.shape)
            c = combine(xt.expand(shape), self.tag(n.args[1]).expand(shape))
            return c[mv.expand(shape)]
        if name in ("embedding", "one_hot"):
            if name == "embedding" and n.target is torch.embedding:
                idx, w = n.args[1], n.args[0]
            else:
                idx, w = A(0, "input"), A(1, "weight")
            it = self.tag(idx)
            r = it.reshape(list(it.shape) + [1])
            if name == "embedding":
                r = combine(r, reduce_all(self.tag(w)))
                positional = n.args[3] if len(n.args) > 3 and n.target is not torch.embedding else None
                mx = n.kwargs.get("max_norm", positional)
                if mx is not None:
                    self._max_norm(n)
            return fit(r, out.shape)
        if name == "embedding_bag":
            return self._embedding_bag(n, out, A(0, "input"), A(2, "offsets"),
                                       n.kwargs.get("per_sample_weights", n.args[8] if len(n.args) > 8 else None),
                                       bool(n.kwargs.get("include_last_offset", False)), A(1, "weight"))
        # scatter family: out = base with positions written from src (and the index)
        if name in ("scatter", "scatter_add", "scatter_reduce"):
            x, dim, idx = A(0, "input"), self.V(A(1, "dim")), A(2, "index")
            src = A(3, "src") if A(3, "src") is not None else n.kwargs.get("value")
            xt, iv = self.tag(x), self.I(idx)
            st = self.tag(src) if isinstance(src, fx.Node) else const(iv.shape)
            st = combine(fit(st, iv.shape) if tuple(st.shape) != tuple(iv.shape) else st, self.tag(idx))
            return _scatter_tags(xt, dim, iv, st, include_self=name != "scatter")
        if name in ("index_add", "index_copy", "index_fill", "index_reduce"):
            x, dim, idx = A(0, "input"), self.V(A(1, "dim")), A(2, "index")
            xt, iv = self.tag(x), self.I(idx)
            d = dim % xt.dim()
            if name == "index_fill":
                src_shape = list(xt.shape)
                src_shape[d] = iv.numel()
                st = const(src_shape)
                val = A(3, "value")
                if isinstance(val, fx.Node):
                    st = fit(reduce_all(self.tag(val)), src_shape)
            else:
                st = self.tag(A(3, "source"))
            it = along(self.tag(idx), d, st.shape) if self.tag(idx).dim() else fit(self.tag(idx), st.shape)
            st = combine(st, it)
            full = along(iv, d, st.shape).contiguous()
            return _scatter_tags(xt, d, full, st, include_self=name in ("index_add", "index_reduce"))
        if name == "index_put":
            x, indices, vals = n.args[0], n.args[1], n.args[2]
            xt = self.tag(x).clone().contiguous()
            iv = tuple(self.I(indices))
            region = xt[iv]
            new = fit(self.tag(vals), region.shape)
            idx_tags = [t for t in self._flat_tags(indices) if uniform(t) != NO]
            if idx_tags:
                new = combine(new, *[reduce_all(t) for t in idx_tags])
            xt[iv] = new
            return xt
        raise _Unknown(f"{name} variant")

    def _max_norm(self, n: fx.Node) -> None:
        self.add(
            n, "state-update", "error",
            "embedding with max_norm renormalizes the looked-up rows of the weight in place during the forward, "
            "so the parameters change according to this batch's indices, outside DP-SGD",
            "drop max_norm (clip the embedding outside the forward, e.g. after the optimizer step)",
        )

    def _embedding_bag(self, n: fx.Node, out: Tensor, inp: Any, offsets: Any, psw: Any, include_last: bool,
                       weight: Any) -> Tensor:
        it = self.tag(inp)
        iv = self.V(inp)
        w = reduce_all(self.tag(weight)) if weight is not None else const(())
        pt = self.tag(psw) if isinstance(psw, fx.Node) else None
        if iv.dim() == 2:
            c = it if pt is None else combine(it, pt)
            return fit(combine(reduce(c, [1], keepdim=True), w), out.shape)
        ov = self.V(offsets)
        ot = self.tag(offsets)
        rows = []
        bounds = list(ov.tolist()) + ([] if include_last else [iv.shape[0]])
        for j in range(out.shape[0]):
            lo, hi = bounds[j], bounds[j + 1]
            seg = it[lo:hi]
            if pt is not None:
                seg = combine(seg, pt[lo:hi])
            r = combine(reduce_all(seg) if seg.numel() else const(()), ot[j], ot[min(j + 1, ot.shape[0] - 1)])
            rows.append(r)
        return fit(combine(torch.stack(rows).reshape(-1, 1), w), out.shape)

    # -- normalization, per-sample ops, losses ---------------------------------------------------
    def _norm_fn(self, n: fx.Node, name: str, out: Any) -> Any:
        fn = {"batch_norm": F.batch_norm, "instance_norm": F.instance_norm, "layer_norm": F.layer_norm,
              "rms_norm": getattr(F, "rms_norm", None), "local_response_norm": F.local_response_norm,
              "group_norm": F.group_norm}[name]
        if n.target is torch.batch_norm:  # aten order: input, weight, bias, running_mean, running_var, training
            names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]
            b = dict(zip(names, n.args))
            b.update(n.kwargs)
        else:
            try:
                b = dict(inspect.signature(fn).bind(*n.args, **n.kwargs).arguments)
            except (TypeError, ValueError):
                raise _Unknown(f"{name} call")
        x = self.tag(b.get("input"))
        params = [reduce_all(self.tag(b[k])) for k in ("weight", "bias") if b.get(k) is not None]
        if name == "batch_norm":
            training = bool(self.V(b.get("training", False)))
            if training or (b.get("running_mean") is None and b.get("running_var") is None):
                r = reduce(x, [i for i in range(x.dim()) if i != 1], keepdim=True)
            else:
                r = x
            return fit(combine(r, *params), out.shape)
        if name == "instance_norm":
            if b.get("use_input_stats", True) and b.get("running_mean") is not None:
                self.add(
                    n, "state-update", "error",
                    "instance norm with running statistics in training mode updates them from this batch",
                    "use track_running_stats=False (statistics per sample only)",
                )
            r = reduce(x, list(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x
            return fit(combine(r, *params), out.shape)
        if name in ("layer_norm", "rms_norm"):
            shp = self.V(b.get("normalized_shape"))
            k = 1 if isinstance(shp, int) else len(shp)
            r = reduce(x, list(range(x.dim() - k, x.dim())), keepdim=True)
            return fit(combine(r, *params), out.shape)
        if name == "local_response_norm":
            return fit(reduce(x, [1], keepdim=True), out.shape)
        if name == "group_norm":
            r = reduce(x, list(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x
            return fit(combine(r, *params), out.shape)
        raise _Unknown(name)

    def _rows(self, t: Tensor, d: int, size: int) -> Tensor:
        """Per-row provenance along ``d`` when the row count matches, else one value."""
        if t.dim() > d and t.shape[d] == size:
            return per_index(t, d)
        return reduce_all(t).expand(size)

    def _dim0(self, n: fx.Node, out: Any, primary: List[Any]) -> Any:
        """Ops that compute row i of dim 0 from row i of their inputs (convolutions,
        pooling, group/instance norm, per-sample losses); other tensor arguments
        (weights) are combined whole."""
        flat_out = [v for v in tree_flatten(out)[0] if isinstance(v, Tensor)]
        if not flat_out:
            return tree_map(lambda v: NT, out)
        rows_n = flat_out[0].shape[0] if flat_out[0].dim() else None
        ins = self._flat_tags(n.args, n.kwargs)
        prim = set(id(t) for t in self._flat_tags(*primary))
        if rows_n is None:
            g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
            return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)
        parts = []
        for t in ins:
            if id(t) in prim or (t.dim() and t.shape[0] == rows_n and uniform(t) != NO):
                parts.append(self._rows(t, 0, rows_n))
            else:
                parts.append(reduce_all(t).expand(rows_n))
        v = combine(*parts) if parts else const((rows_n,))
        return tree_map(lambda o: (along(v, 0, o.shape) if o.dim() and o.shape[0] == rows_n
                                   else reduce_all(v).expand(o.shape)) if isinstance(o, Tensor) else NT, out)

    def _loss(self, n: fx.Node, name: str, out: Any) -> Any:
        fn = getattr(F, name)
        try:
            b = dict(inspect.signature(fn).bind(*n.args, **n.kwargs).arguments)
        except (TypeError, ValueError):
            raise _Unknown(f"{name} call")
        reduction = b.get("reduction", "mean")
        if b.get("size_average") is not None or b.get("reduce") is not None:
            reduction = F._Reduction.legacy_get_string(b.get("size_average"), b.get("reduce"))
        ins = self._flat_tags(n.args, n.kwargs)
        if reduction == "none":
            return self._dim0(n, out, [n.args[0]])
        g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
        return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)

    # -- modules ---------------------------------------------------------------------------------
    def _module(self, n: fx.Node, out: Any) -> Any:
        m = self._mod(n)
        try:
            b = inspect.signature(m.forward).bind(*n.args, **n.kwargs)
            b.apply_defaults()
            bound = dict(b.arguments)
        except (TypeError, ValueError):
            bound = {}
        first = next(iter(bound.values()), n.args[0] if n.args else None)
        shape = out.shape if isinstance(out, Tensor) else None
        from torch.nn.modules import activation, batchnorm, conv, dropout, instancenorm, loss, pooling, rnn, \
            transformer

        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            x = self.tag(first)
            return combine(self._einsum_tags("...i,oi->...o", [x, const(m.weight.shape)], shape))
        if isinstance(m, nn.Bilinear):
            return self._einsum_tags("...i,...j,oij->...o", [self.tag(bound["input1"]), self.tag(bound["input2"]),
                                                            const(m.weight.shape)], shape)
        if isinstance(m, batchnorm._BatchNorm):
            return self._batchnorm_module(n, m, out, first)
        if isinstance(m, instancenorm._InstanceNorm):
            if m.track_running_stats and m.training:
                self.add(
                    n, "state-update", "error",
                    f"{type(m).__name__}(track_running_stats=True) in training mode updates its running statistics "
                    "from this batch during the forward",
                    "use track_running_stats=False (instance norm keeps statistics per sample)",
                )
            return self._dim0(n, out, [first])
        if isinstance(m, (conv._ConvNd, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Upsample,
                          nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Fold, nn.Unfold)) \
                or isinstance(m, (pooling._MaxPoolNd,)) or isinstance(m, (
                    pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd, pooling._AdaptiveMaxPoolNd, pooling._LPPoolNd,
                    pooling._MaxUnpoolNd, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)) \
                or type(m).__name__.endswith("Pad1d") or type(m).__name__.endswith("Pad2d") \
                or type(m).__name__.endswith("Pad3d"):
            return self._dim0(n, out, [first])
        if isinstance(m, (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())):
            k = len(m.normalized_shape)
            x = self.tag(first)
            return fit(reduce(x, list(range(x.dim() - k, x.dim())), keepdim=True), shape)
        if isinstance(m, nn.Embedding):
            if m.max_norm is not None:
                self._max_norm(n)
            it = self.tag(first)
            return fit(it.reshape(list(it.shape) + [1]), shape)
        if isinstance(m, nn.EmbeddingBag):
            return self._embedding_bag(n, out, first, bound.get("offsets"), bound.get("per_sample_weights"),
                                       m.include_last_offset, None)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU)):
            x = self.tag(first)
            dim = getattr(m, "dim", None)
            if isinstance(m, nn.Softmax2d):
                dim = -3
            if dim is None:
                dim = 0 if x.dim() in (0, 1, 3) else 1
            return tree_map(lambda v: fit(reduce(x, [dim], keepdim=True), v.shape) if isinstance(v, Tensor) else NT,
                            out)
        if isinstance(m, nn.CosineSimilarity):
            x = combine(self.tag(bound["x1"]), self.tag(bound["x2"]))
            return fit(reduce(x, [m.dim], keepdim=True), shape)
        if isinstance(m, nn.PairwiseDistance):
            x = combine(self.tag(bound["x1"]), self.tag(bound["x2"]))
            return fit(reduce(x, [-1], keepdim=True), shape)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return m(self.tag(first))
        if isinstance(m, (nn.Identity,)) or isinstance(m, dropout._DropoutNd) or (
            m.__module__ == activation.__name__ and not isinstance(m, nn.MultiheadAttention)
        ):
            return self._pointwise(n, out)
        if isinstance(m, loss._Loss):
            red = getattr(m, "reduction", "mean")
            ins = self._flat_tags(n.args, n.kwargs)
            if red == "none":
                return self._dim0(n, out, [first])
            g = combine(*[reduce_all(t) for t in ins]) if ins else const(())
            return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)
        if isinstance(m, (rnn.RNNBase, rnn.RNNCellBase, nn.MultiheadAttention, transformer.TransformerEncoderLayer,
                          transformer.TransformerDecoderLayer, transformer.TransformerEncoder,
                          transformer.TransformerDecoder, transformer.Transformer)):
            return self._sequence_module(n, m, bound, out)
        from ..rules import module_call_for

        adapter = module_call_for(m)
        if adapter is not None:  # a leaf with a per-sample rule: follow its functional op
            mc = adapter(m)
            name = _FUNCS.get(mc.op) if _hashable(mc.op) else None
            if name == "instance_norm" and not mc.kwargs.get("use_input_stats", True):
                return self._pointwise(n, out)  # fixed statistics: a per-channel affine map
            if name in _DIM0 or name in ("instance_norm", "group_norm"):
                return self._dim0(n, out, [first])
            return self._assume(n, out)
        if (type(m).__module__ or "").startswith("fxdp."):
            return self._assume(n, out)
        reason = "kept whole: not symbolically traceable" if str(n.target) in self.untraceable else \
            f"leaf module {type(m).__name__} without known semantics"
        tag = self._assume(n, out)
        if str(n.target) not in self.untraceable and any(uniform(t) != NO for t in self._flat_tags(n.args, n.kwargs)):
            self._unknown(n, reason)
        return tag

    def _batchnorm_module(self, n: fx.Node, m: nn.Module, out: Tensor, first: Any) -> Tensor:
        x = self.tag(first)
        batch_stats = m.training or m.running_mean is None
        if not batch_stats:
            return fit(x, out.shape)
        r = reduce(x, [i for i in range(x.dim()) if i != 1], keepdim=True)
        return fit(r, out.shape)

    def _sequence_module(self, n: fx.Node, m: nn.Module, bound: Dict[str, Any], out: Any) -> Any:
        """RNNs, attention and transformer layers: per-sample along the batch
        dimension *they* use (``batch_first``); data in the other positions mixes."""
        from torch.nn.modules import rnn

        bf = getattr(m, "batch_first", None)
        if bf is None:
            for sub in m.modules():
                if isinstance(sub, nn.MultiheadAttention):
                    bf = sub.batch_first
                    break
        bf = bool(bf)
        heads = next((s.num_heads for s in m.modules() if isinstance(s, nn.MultiheadAttention)), 1)
        cell = isinstance(m, rnn.RNNCellBase)
        seq_rank = 2 if cell else 3
        first_val = next((self.V(v) for v in bound.values() if isinstance(self.V(v), Tensor)), None)
        batched = first_val is not None and first_val.dim() == seq_rank
        d_seq = (0 if (bf or cell) else 1) if batched else None
        size = first_val.shape[d_seq] if (batched and d_seq is not None) else None
        parts: List[Tensor] = []
        for name, a in bound.items():
            for t in self._flat_tags(a):
                if size is None:
                    parts.append(reduce_all(t))
                    continue
                if name.endswith("key_padding_mask"):
                    d = 0
                elif name in ("hx",) and not cell:
                    d = 1
                elif name.endswith("mask") and t.dim() == 3 and t.shape[0] == size * heads:
                    parts.append(reduce(per_index(t, 0).reshape(size, heads), [1], keepdim=False))
                    continue
                elif name.endswith("mask"):
                    parts.append(reduce_all(t).expand(size))
                    continue
                elif name == "hx" and cell:
                    d = 0
                else:
                    d = d_seq
                parts.append(self._rows(t, d, size))
        if size is None:
            g = combine(*parts) if parts else const(())
            return tree_map(lambda v: g.expand(v.shape) if isinstance(v, Tensor) else NT, out)
        v = combine(*parts) if parts else const((size,))

        def place(o: Any, d: int) -> Any:
            if not isinstance(o, Tensor):
                return NT
            if o.dim() > d and o.shape[d] == size:
                return along(v, d, o.shape)
            return reduce_all(v).expand(o.shape)

        if isinstance(m, rnn.RNNBase):
            o, h = out
            hs = tree_map(lambda t: place(t, 1), h)
            return (place(o, d_seq), hs)
        if isinstance(m, nn.MultiheadAttention):
            o, w = out
            return (place(o, d_seq), place(w, 0) if isinstance(w, Tensor) else w)
        if cell:
            return tree_map(lambda t: place(t, 0), out)
        return tree_map(lambda t: place(t, d_seq), out)

    def _module_state(self, n: fx.Node, state: Any) -> None:
        """Buffers and tensor attributes a leaf module changed during its forward."""
        bufs, attrs = state
        m = self._mod(n)
        from torch.nn.modules import batchnorm, instancenorm

        if isinstance(m, (batchnorm._BatchNorm, instancenorm._InstanceNorm)):
            return  # reported with the module's semantics
        changed = [k for k, b in m.named_buffers()
                   if k in bufs and (b.shape != bufs[k].shape or not torch.equal(b, bufs[k]))]
        new_attrs = [k for k, v in vars(m).items() if isinstance(v, Tensor) and attrs.get(k) is not v]
        data = any(self._data_dep(a) for a in n.all_input_nodes)
        for k in changed:
            self.add(
                n, "state-update", "error" if data else "warning",
                f"{type(m).__name__} updates its buffer `{k}` during the forward"
                + (" from batch data (e.g. running statistics)" if data else ""),
                "compute such statistics outside the DP model, or switch the module to a mode that does not "
                "update them",
                attr=f"{n.target}.{k}",
            )
        for k in new_attrs:
            self.add(
                n, "state-update", "error" if data else "warning",
                f"{type(m).__name__} assigns a tensor to `self.{k}` during the forward: module state that "
                "outlives the batch",
                "return the value instead of storing it on the module",
                attr=f"{n.target}.{k}",
            )

    # -- explanations ----------------------------------------------------------------------------
    def _explain(self, n: fx.Node, bad: List[Tuple[int, Any, Tensor]]) -> None:
        res = describe_mixing(self, n, bad)
        code, problem, fix = res[:3]
        details = dict(res[3]) if len(res) > 3 else {}
        self.add(n, code, "error", problem, fix, hints=[fmt_hint(h) for _, h, _ in bad], **details)

    def _loss_reductions(self) -> None:
        """A sum/mean over the batch whose result only reaches the output (the loss
        computed inside the model) is a warning, not an error."""
        for f in self.findings:
            if f.code != "batch-reduction" or f.severity != "error" or not f.details.get("linear"):
                continue
            seen, stack, reaches_out, batched_after = set(), list(f.node.users), False, False
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                if u.op == "output":
                    reaches_out = True
                    continue
                if any(_is_int(h) or _is_fold(h) for h in self.hints.get(u.name, [])):
                    batched_after = True
                    break
                stack.extend(u.users)
            if reaches_out and not batched_after:
                f.severity = "warning"
                f.code = "loss-in-model"
                f.problem = (f"{f.details.get('what', op_name(f.node))} reduces over the batch at the end of the "
                             "model: valid only if this is the training loss (a plain sum or mean of per-sample "
                             "terms)")
                f.fix = ("return per-sample outputs and reduce in the loss outside the model; set "
                         "loss_reduction='sum' or 'mean' to match")


class _Unknown(Exception):
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


def _scatter_tags(xt: Tensor, dim: int, idx: Tensor, st: Tensor, include_self: bool) -> Tensor:
    """Provenance of a scatter: positions written get the combined provenance of
    everything written there (and of the old value when accumulating)."""
    src = st[tuple(slice(0, s) for s in idx.shape)] if tuple(st.shape) != tuple(idx.shape) else st
    base = xt.contiguous().clone()
    hi = base.scatter_reduce(dim, idx, src, "amax", include_self=include_self)
    lo_base = torch.where(base > NO, base, _BIG)
    lo = lo_base.scatter_reduce(dim, idx, torch.where(src > NO, src, _BIG), "amin", include_self=include_self)
    mixed = (base < NO).long().scatter_reduce(dim, idx, (src < NO).long(), "amax", include_self=include_self)
    written = torch.zeros_like(base).scatter(dim, idx, torch.ones_like(idx))
    conflict = (mixed > 0) | ((hi > NO) & (lo != _BIG) & (lo != hi))
    res = torch.where(conflict, MIX, hi.clamp(min=NO))
    return torch.where(written.bool(), res, base)


# --- explanations ---------------------------------------------------------------------------

def _family(n: fx.Node) -> str:
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


def _arg_dims(a: "BatchMixingAnalysis", n: fx.Node) -> Optional[List[int]]:
    if n.op == "call_method":
        name = str(n.target).rstrip("_")
    else:
        name = _FUNCS.get(n.target) if _hashable(n.target) else None
    x = next((i for i in n.all_input_nodes if isinstance(a.env.get(i), Tensor)), None)
    if name not in _REDUCTIONS or x is None:
        return None
    try:
        return a._dims(n, name, a.tags.get(x, const(a.env[x].shape)))
    except Exception:
        return None


def _layout(a: "BatchMixingAnalysis", n: fx.Node) -> Optional[Tuple[str, bool]]:
    """(path, batch_first) of the innermost module with a ``batch_first`` flag around ``n``."""
    path = str(n.meta.get("fxdp_module") or "")
    while path:
        m = a.root_modules.get(path)
        bf = getattr(m, "batch_first", None) if m is not None else None
        if isinstance(bf, bool):
            return path, bf
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None


def _layout_hint(a: "BatchMixingAnalysis", n: fx.Node) -> str:
    """'set batch_first' advice when the op runs inside a module with that flag."""
    lay = _layout(a, n)
    if lay is None:
        return ""
    path, bf = lay
    return (f"`{path}` has batch_first={bf}: if its inputs are {'[T, B, ...]' if bf else '[B, T, ...]'}, pass "
            f"batch_first={not bf}; otherwise ")


def describe_mixing(
    a: "BatchMixingAnalysis", n: fx.Node, bad: List[Tuple[int, Any, Tensor]]
) -> tuple:
    """(code, problem, fix[, details]) for a node whose clean inputs give an unclean output."""
    fam = _family(n)
    ins = [i for i in n.all_input_nodes if isinstance(a.env.get(i), Tensor)]
    in_hints = [a.hint(i) for i in ins]
    bdims = sorted({h for h in in_hints if _is_int(h)})
    bd = bdims[0] if bdims else None
    what = op_name(n)
    _, h, t = bad[0]
    out_desc = fmt_hint(h)
    mixed = bool((t == MIX).any())
    if n.op == "call_module":
        m = a._mod(n)
        from torch.nn.modules import batchnorm, rnn

        if isinstance(m, batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in m.parameters())
            if frozen:
                return ("batch-norm",
                        f"{type(m).__name__} `{n.target}` is frozen but in train mode: it still normalizes with the "
                        "statistics of the whole batch (and updates its running statistics), so every sample's "
                        "output depends on all the others; privatize's default GroupNorm replacement is no fix "
                        "for a frozen layer (its parameters cannot adapt)",
                        f"call `model.{n.target}.eval()` after `model.train()` and pass "
                        "rewrite_options={'batchnorm': 'freeze'} to fxdp.privatize (constant running statistics; DP "
                        "only if they come from public data), or unfreeze it so the GroupNorm replacement trains",
                        {})
            return ("batch-norm",
                    f"{type(m).__name__} `{n.target}` normalizes with the statistics of the whole batch in train mode, "
                    "so every sample's output depends on all the others (and its running statistics leak the batch)",
                    "let fxdp.privatize replace it (rewrite_options={'batchnorm': 'groupnorm'}, the default), or "
                    "replace it with nn.GroupNorm / nn.LayerNorm yourself", {})
        if isinstance(m, (rnn.RNNBase, nn.MultiheadAttention)) or "Transformer" in type(m).__name__:
            bf = getattr(m, "batch_first", None)
            return ("batch-layout",
                    f"{type(m).__name__} `{n.target}` (batch_first={bf}) runs over the dimension that holds the "
                    f"batch (input has {fmt_hint(bd)}): it treats samples as time steps or features and mixes them",
                    f"pass batch_first={not bf} to match the data layout, or transpose the input")
        return ("batch-mixing",
                f"{type(m).__name__} `{n.target}` mixes samples (output {out_desc})",
                "keep the batch dimension separate, or run fxdp.verify to see which samples influence each other")
    if fam == "batch_norm":
        return ("batch-norm",
                f"{what} with training=True normalizes with statistics of the whole batch, so every sample's output "
                "depends on all the others",
                "use F.group_norm / F.layer_norm (statistics per sample), or pass training=False with running "
                "statistics computed outside training")
    if fam in ("reduction", "scan", "sort"):
        dims = _arg_dims(a, n)
        over = "all dimensions" if dims is None else f"dim {dims[0] if len(dims) == 1 else dims}"
        batch_in = bd is not None and (dims is None or bd in dims)
        name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", what)
        linear = name.rstrip("_") in ("sum", "mean", "nansum", "nanmean")
        verb = {"reduction": "reduces over", "scan": "accumulates along", "sort": "sorts/selects along"}[fam]
        if batch_in:
            problem = (f"{what} {verb} {over}, which includes the batch dimension ({bd}): the result combines "
                       "all samples" + (", so every sample's output depends on the others" if fam == "reduction"
                                         else ", so each sample's result depends on other samples"))
        else:
            problem = f"{what} {verb} {over} and mixes samples (output {out_desc})"
        base = name.rstrip("_")
        normalizer = base in ("softmax", "log_softmax", "softmin", "normalize", "glu", "gumbel_softmax")
        fix = {"reduction": ("normalize over a per-sample dimension instead (e.g. dim=1 for attention weights "
                             "over the time steps of a [B, T, 1] tensor, or dim=-1)") if normalizer else
                            "reduce over per-sample dimensions instead (e.g. `x - x.mean(-1, keepdim=True)`, "
                            "nn.LayerNorm or nn.GroupNorm); a statistic of the whole batch couples the samples",
               "scan": "apply it along a per-sample dimension (e.g. dim=-1), never across the batch",
               "sort": "sort/select along a per-sample dimension (e.g. dim=-1), never across the batch"}[fam]
        code = "batch-reduction" if fam == "reduction" else f"batch-{fam}"
        return code, problem, fix, {"linear": linear and fam == "reduction", "what": what}
    if fam == "matmul":
        return ("batch-matmul",
                f"{what} contracts the batch dimension ({fmt_hint(bd)} of an operand): each output element sums "
                "over all samples (e.g. a similarity matrix `x @ x.T` across the batch)",
                _layout_hint(a, n) + "contract a per-sample dimension instead (e.g. `x @ W` or torch.bmm over "
                "[B, n, k] x [B, k, m]); objectives that compare samples within a batch cannot be trained with "
                "DP-SGD")
    if fam == "cat":
        return ("batch-cat",
                f"{what} joins batch rows with other data along the batch dimension (output {out_desc}): samples "
                "no longer sit one per row",
                "concatenate along a feature dimension (e.g. dim=-1), or keep the extra rows out of the batch")
    if fam in ("getitem", "index", "setitem"):
        data_idx = any(uniform(a.tags.get(i, const(()))) not in (NO, None) for i in n.all_input_nodes[1:])
        if data_idx and fam != "setitem":
            problem = (f"{what} indexes with values computed from the data across the batch dimension: which "
                       "rows a sample gets depends on other samples")
        elif fam == "setitem":
            problem = f"{what} writes values of other samples into a sample's rows (or mixes the batch)"
        else:
            problem = (f"{what} selects or moves rows along the batch dimension ({fmt_hint(bd)}; e.g. `x[0]`, "
                       "`x[1:]`, `x[perm]`): a sample's result comes from other samples")
        return ("batch-index", problem,
                "index per sample (`x[:, ...]`, gather along a feature dimension) and keep every sample in its own "
                "row; select samples outside the model (in the data loader)")
    if fam == "reorder":
        return ("batch-index",
                f"{what} reorders the batch dimension ({fmt_hint(bd)}): each position now holds another sample",
                "flip/roll along a per-sample dimension (e.g. dims=[-1])")
    if fam == "reshape":
        if _is_int(h):
            return ("batch-fold",
                    f"{what} unfolds a folded batch in an order that mixes samples (e.g. a [T*B] tensor viewed as "
                    "[B, T]): rows of one sample now hold another sample's values",
                    "undo the fold in the order it was made, e.g. `x.view(T, B, D).transpose(0, 1)` for a "
                    "`x.transpose(0, 1).reshape(T * B, D)` fold")
        return ("batch-fold",
                f"{what} merges the batch dimension with other data (output {out_desc}): samples are no longer "
                "separable",
                "keep the batch dimension separate: fold it only together with per-sample dims in the leading "
                "position (`x.reshape(B * T, D)`), and unfold it the same way")
    lay = _layout(a, n)
    if lay is not None and fam in ("other", "module"):
        path, bf = lay
        return ("batch-layout",
                f"{what} inside `{path}` (batch_first={bf}) mixes samples (output {out_desc}): the layer runs over "
                "the dimension that holds the batch, treating samples as time steps or features",
                _layout_hint(a, n) + "transpose the input so the batch sits where the layer expects it")
    if fam == "loss":
        return ("batch-reduction",
                f"{what} reduces the per-sample losses over the batch and the result is used per sample",
                "compute the loss outside the model", {"linear": True, "what": what})
    return ("batch-mixing",
            f"{what} combines values of different samples (output {out_desc}"
            + ("; e.g. broadcasting a [B, 1, D] against a [B, D] tensor pairs every sample with every other)"
               if mixed else ")"),
            "make every operand of this op hold the same sample in the same row (check the broadcast shapes)")


def analyze_batch_mixing(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    batch_dim: int = 0,
    sizes: Tuple[int, int] = SIZES,
    untraceable: Optional[Dict[str, str]] = None,
    root: Optional[nn.Module] = None,
) -> MixingResult:
    """Run the analysis on a traced graph (see the module docstring); ``root`` is
    the module the graph was traced from (for messages about its submodules)."""
    an = BatchMixingAnalysis(gm, example_inputs, batch_dim=batch_dim, sizes=sizes, untraceable=untraceable,
                             root=root)
    with small_model_threads(gm):
        return an.run()
