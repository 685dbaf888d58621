"""Transfer functions of leaf modules (``call_module`` nodes), by module type: one
handler per kind of layer in an ordered table, the first whose type matches."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple

import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import activation, batchnorm, conv, dropout, instancenorm, pooling, rnn, transformer
from torch.nn.modules import loss as nn_loss
from torch.utils._pytree import tree_map

from ..ops import _DIM0, _FUNCS, _hashable
from ..tags import NO, NT, combine, const, fit, reduce, uniform
from .generic import assume, report_unknown
from .indexing import embedding_bag
from .inplace import max_norm
from .matmul import einsum_tags
from .norms import whole
from .pointwise import dim0_rows, pointwise
from .sequence import sequence_module

if TYPE_CHECKING:
    from ..analysis import BatchMixingAnalysis

#: a handler: (analysis, node, module, output, first argument, bound arguments, output shape) -> tag
_Handler = Callable[["BatchMixingAnalysis", fx.Node, nn.Module, Any, Any, Dict[str, Any], Any], Any]


def _bind(m: nn.Module, n: fx.Node) -> Dict[str, Any]:
    try:
        b = inspect.signature(m.forward).bind(*n.args, **n.kwargs)
        b.apply_defaults()
        return dict(b.arguments)
    except (TypeError, ValueError):
        return {}


def _linear(an, n, m, out, first, bound, shape):
    x = an.tag(first)
    return combine(einsum_tags("...i,oi->...o", [x, const(m.weight.shape)], shape))


def _bilinear(an, n, m, out, first, bound, shape):
    return einsum_tags("...i,...j,oij->...o", [an.tag(bound["input1"]), an.tag(bound["input2"]),
                                              const(m.weight.shape)], shape)


def _batchnorm(an, n, m, out, first, bound, shape):
    x = an.tag(first)
    batch_stats = m.training or m.running_mean is None
    if not batch_stats:
        return fit(x, out.shape)
    r = reduce(x, [i for i in range(x.dim()) if i != 1], keepdim=True)
    return fit(r, out.shape)


def _instancenorm(an, n, m, out, first, bound, shape):
    if m.track_running_stats and m.training:
        an.add(
            n, "state-update", "error",
            f"{type(m).__name__}(track_running_stats=True) in training mode updates its running statistics "
            "from this batch during the forward",
            "use track_running_stats=False (instance norm keeps statistics per sample)",
        )
    return dim0_rows(an, n, out, [first])


def _rowwise(an, n, m, out, first, bound, shape):
    return dim0_rows(an, n, out, [first])


def _layernorm(an, n, m, out, first, bound, shape):
    k = len(m.normalized_shape)
    x = an.tag(first)
    return fit(reduce(x, list(range(x.dim() - k, x.dim())), keepdim=True), shape)


def _embedding(an, n, m, out, first, bound, shape):
    if m.max_norm is not None:
        max_norm(an, n)
    it = an.tag(first)
    return fit(it.reshape(list(it.shape) + [1]), shape)


def _embedding_bag(an, n, m, out, first, bound, shape):
    return embedding_bag(an, n, out, first, bound.get("offsets"), bound.get("per_sample_weights"),
                         m.include_last_offset, None)


def _softmax(an, n, m, out, first, bound, shape):
    x = an.tag(first)
    dim = getattr(m, "dim", None)
    if isinstance(m, nn.Softmax2d):
        dim = -3
    if dim is None:
        dim = 0 if x.dim() in (0, 1, 3) else 1
    return tree_map(lambda v: fit(reduce(x, [dim], keepdim=True), v.shape) if isinstance(v, Tensor) else NT,
                    out)


def _cosine(an, n, m, out, first, bound, shape):
    x = combine(an.tag(bound["x1"]), an.tag(bound["x2"]))
    return fit(reduce(x, [m.dim], keepdim=True), shape)


def _pairwise(an, n, m, out, first, bound, shape):
    x = combine(an.tag(bound["x1"]), an.tag(bound["x2"]))
    return fit(reduce(x, [-1], keepdim=True), shape)


def _flatten(an, n, m, out, first, bound, shape):
    return m(an.tag(first))


def _pointwise(an, n, m, out, first, bound, shape):
    return pointwise(an, n, out)


def _loss(an, n, m, out, first, bound, shape):
    red = getattr(m, "reduction", "mean")
    ins = an.flat_tags(n.args, n.kwargs)
    if red == "none":
        return dim0_rows(an, n, out, [first])
    return whole(ins, out)


def _sequence(an, n, m, out, first, bound, shape):
    return sequence_module(an, n, m, bound, out)


def _is_rowwise(m: nn.Module) -> bool:
    """Row i of the output from row i of the input: convolutions, pooling, padding, ..."""
    return isinstance(m, (conv._ConvNd, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Upsample,
                          nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Fold, nn.Unfold)) \
        or isinstance(m, (pooling._MaxPoolNd,)) or isinstance(m, (
            pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd, pooling._AdaptiveMaxPoolNd, pooling._LPPoolNd,
            pooling._MaxUnpoolNd, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)) \
        or type(m).__name__.endswith("Pad1d") or type(m).__name__.endswith("Pad2d") \
        or type(m).__name__.endswith("Pad3d")


def _is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Identity,)) or isinstance(m, dropout._DropoutNd) or (
        m.__module__ == activation.__name__ and not isinstance(m, nn.MultiheadAttention)
    )


_LAYER_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_SEQUENCE = (rnn.RNNBase, rnn.RNNCellBase, nn.MultiheadAttention, transformer.TransformerEncoderLayer,
             transformer.TransformerDecoderLayer, transformer.TransformerEncoder, transformer.TransformerDecoder,
             transformer.Transformer)

#: (does the handler apply to this module, handler), tried in order
_HANDLERS: List[Tuple[Callable[[nn.Module], bool], _Handler]] = [
    (lambda m: isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward, _linear),
    (lambda m: isinstance(m, nn.Bilinear), _bilinear),
    (lambda m: isinstance(m, batchnorm._BatchNorm), _batchnorm),
    (lambda m: isinstance(m, instancenorm._InstanceNorm), _instancenorm),
    (_is_rowwise, _rowwise),
    (lambda m: isinstance(m, _LAYER_NORMS), _layernorm),
    (lambda m: isinstance(m, nn.Embedding), _embedding),
    (lambda m: isinstance(m, nn.EmbeddingBag), _embedding_bag),
    (lambda m: isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU)), _softmax),
    (lambda m: isinstance(m, nn.CosineSimilarity), _cosine),
    (lambda m: isinstance(m, nn.PairwiseDistance), _pairwise),
    (lambda m: isinstance(m, (nn.Flatten, nn.Unflatten)), _flatten),
    (_is_pointwise, _pointwise),
    (lambda m: isinstance(m, nn_loss._Loss), _loss),
    (lambda m: isinstance(m, _SEQUENCE), _sequence),
]


def _other(an: "BatchMixingAnalysis", n: fx.Node, m: nn.Module, out: Any, first: Any) -> Any:
    """A leaf without a handler: its per-sample rule's functional op, fxdp's own
    layers (trusted), or assumed per-sample and reported."""
    from ....rules import module_call_for

    adapter = module_call_for(m)
    if adapter is not None:  # a leaf with a per-sample rule: follow its functional op
        mc = adapter(m)
        name = _FUNCS.get(mc.op) if _hashable(mc.op) else None
        if name == "instance_norm" and not mc.kwargs.get("use_input_stats", True):
            return pointwise(an, n, out)  # fixed statistics: a per-channel affine map
        if name in _DIM0 or name in ("instance_norm", "group_norm"):
            return dim0_rows(an, n, out, [first])
        return assume(an, n, out)
    if (type(m).__module__ or "").startswith("fxdp."):
        return assume(an, n, out)
    reason = "kept whole: not symbolically traceable" if str(n.target) in an.untraceable else \
        f"leaf module {type(m).__name__} without known semantics"
    tag = assume(an, n, out)
    if str(n.target) not in an.untraceable and any(uniform(t) != NO for t in an.flat_tags(n.args, n.kwargs)):
        report_unknown(an, n, reason, tag)
    return tag


def module(an: "BatchMixingAnalysis", n: fx.Node, out: Any, name: Any = None) -> Any:
    """A ``call_module`` node: the handler of the first matching module type."""
    m = an.submodule(n)
    bound = _bind(m, n)
    first = next(iter(bound.values()), n.args[0] if n.args else None)
    shape = out.shape if isinstance(out, Tensor) else None
    for applies, handler in _HANDLERS:
        if applies(m):
            if str(n.target) not in an.untraceable:
                return handler(an, n, m, out, first, bound, shape)
            try:  # kept whole: a subclass with its own forward may not return what its base does
                return handler(an, n, m, out, first, bound, shape)
            except Exception:  # the fallback serving it checks every step
                return _other(an, n, m, out, first)
    return _other(an, n, m, out, first)
