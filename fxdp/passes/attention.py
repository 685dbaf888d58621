"""Rewrite pass: attention and transformer layers -> traceable DP layers.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` branch on tensor properties
(fused fast paths, nested tensors, causal-mask detection), so ``torch.fx``
cannot trace them and the DPTracer would keep them whole behind the slow
``torch.func`` fallback. Each is replaced by its ``fxdp.layers`` subclass, which
computes the same (non-fast-path) math from ops with per-sample rules and shares
the original's parameters and submodules (same ``state_dict``). The rewrite is
reversible: ``DPModule.strip()`` gives back the original classes with the trained
parameters.

Replaced: the exact classes and subclasses that keep the base ``forward`` (and,
for the transformer layers, the base ``_sa_block``/``_mha_block``/``_ff_block``);
a subclass with its own ``forward`` may compute anything, so it is left alone. The
root module cannot be replaced in place: wrap it (``nn.Sequential(layer)``).

Option (``rewrite_options``): ``"attention": False`` keeps the PyTorch modules
(then served, exactly but slowly, by the ``torch.func`` fallback, which refuses
dropout inside them).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

from torch import nn

from ..layers.attention import transplant
from ..layers.transformer import DP_CLASSES, from_torch, to_torch
from .rewrite import Rewrite, register_rewrite, replace_submodule

__all__ = ["rewrite_attention"]

_METHODS = ("forward", "_sa_block", "_mha_block", "_ff_block")

_REASON = {
    nn.MultiheadAttention: "nn.MultiheadAttention.forward branches on tensor properties (mask dtype, rank, a "
    "fused fast path) that torch.fx cannot trace; the whole layer would use the slow torch.func fallback",
    nn.TransformerEncoderLayer: "nn.TransformerEncoderLayer.forward checks tensor properties for its fused "
    "fast path, which torch.fx cannot trace",
    nn.TransformerDecoderLayer: "nn.TransformerDecoderLayer is replaced together with its attention layers "
    "so the whole decoder stays traceable",
    nn.TransformerEncoder: "nn.TransformerEncoder.forward has a nested-tensor fast path and inspects mask "
    "values to detect causal masks, which torch.fx cannot trace",
    nn.TransformerDecoder: "nn.TransformerDecoder.forward inspects mask values to detect causal masks, "
    "which torch.fx cannot trace",
    nn.Transformer: "nn.Transformer.forward checks input sizes with Python branches torch.fx cannot trace",
}


def _base(m: nn.Module) -> Any:
    """The PyTorch class ``m`` is rewritten as, or ``None``."""
    if type(m) in DP_CLASSES.values():
        return None
    for base in DP_CLASSES:
        if isinstance(m, base):
            keeps = all(getattr(type(m), f, None) is getattr(base, f, None) for f in _METHODS)
            return base if keeps else None
    return None


def _details(m: nn.Module, base: type) -> Dict[str, Any]:
    if base is nn.MultiheadAttention:
        return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout, batch_first=m.batch_first,
                    bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                    add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim)
    if base in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        return dict(norm_first=m.norm_first, activation=getattr(m.activation, "__name__", type(m.activation).__name__))
    if base in (nn.TransformerEncoder, nn.TransformerDecoder):
        return dict(num_layers=m.num_layers, final_norm=m.norm is not None)
    return dict(d_model=m.d_model, nhead=m.nhead, batch_first=m.batch_first)


def _restorer(cls: type) -> Callable[[nn.Module], nn.Module]:
    def restore(m: nn.Module) -> nn.Module:
        """The PyTorch modules back (parameters shared), as class ``cls`` at the top."""
        torch_m = to_torch(m)
        return torch_m if type(torch_m) is cls else transplant(torch_m, cls)

    return restore


@register_rewrite(order=30, options=("attention",))
def rewrite_attention(root: nn.Module, options: Dict[str, Any], copied: set) -> List[Rewrite]:
    """Replace attention/transformer layers below ``root`` by their DP classes."""
    enabled = options.get("attention", True)
    if not isinstance(enabled, bool):
        raise TypeError(f"rewrite_options['attention'] must be True or False, got {enabled!r}")
    if not enabled:
        return []
    if _base(root) is not None:
        warnings.warn(
            f"fxdp: the model itself is an {type(root).__name__}, which cannot be rewritten in place (its forward "
            "is not traceable, so it will use the slow torch.func fallback). Fix: privatize a wrapper, e.g. "
            "nn.Sequential(model).",
            stacklevel=3,
        )
    paths = [p for p, m in root.named_modules(remove_duplicate=False) if p and _base(m) is not None]
    made: Dict[int, nn.Module] = {}  # a module shared by several paths stays shared
    rewrites: List[Rewrite] = []
    for path in paths:  # pre-order: parents first, so children are fetched from the new parents
        m = root.get_submodule(path)
        base = _base(m)
        if base is None:  # pragma: no cover - replaced through a shared parent
            continue
        new = made.get(id(m))
        if new is None:
            new = made[id(m)] = from_torch(m)
        replace_submodule(root, path, new, copied)
        copied.add(path)  # ``new`` already owns its child table
        rewrites.append(Rewrite(
            path=path,
            original=type(m).__name__,
            replacement=type(new).__name__,
            reason=_REASON[base] + "; the replacement computes the same math from ops with per-sample rules "
            "and shares the parameters",
            reversible=True,
            details=_details(m, base),
            restore=_restorer(type(m)),
        ))
    return rewrites
