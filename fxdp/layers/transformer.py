"""Traceable transformer layers: ``nn.Transformer*`` without the fused fast paths.

PyTorch's ``TransformerEncoderLayer`` / ``TransformerEncoder`` / ``Transformer``
check tensor properties before choosing a fused inference kernel (and the
encoder may convert inputs to nested tensors), and the encoder and decoder
inspect mask values to detect causal masks. ``torch.fx`` cannot trace those
branches, so the DPTracer would keep the layers whole (slow ``torch.func``
fallback, and no dropout inside it). These subclasses compute the standard
(non-fast-path) math of the same modules, Fig. 1 of Xiong et al. 2020, "On
layer normalization in the transformer architecture" (post-norm and
``norm_first``), with the same submodules and parameters:

* masks are passed as given to ``DPMultiheadAttention``, which handles bool and
  float masks at run time (PyTorch converts bool masks to float first: equal);
* an ``is_causal=None`` hint is not guessed from the mask values: the mask is
  used as given (equal outputs; PyTorch's detection only picks a kernel);
* no nested-tensor path (``enable_nested_tensor`` is an inference optimization).

Dropout modules stay ``nn.Dropout`` leaves: parameter-free, so per-sample
gradients are exact for the dropout masks actually drawn. ``to_torch`` gives the
PyTorch modules back, sharing the parameters.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor, nn

from .attention import DPMultiheadAttention, _static_flag, transplant

__all__ = [
    "DPTransformerEncoderLayer",
    "DPTransformerDecoderLayer",
    "DPTransformerEncoder",
    "DPTransformerDecoder",
    "DPTransformer",
    "from_torch",
    "to_dp",
    "to_torch",
    "DP_CLASSES",
]


def _dp_children(m: nn.Module) -> None:
    """Convert the PyTorch layers below a freshly constructed DP layer."""
    for name, child in list(m._modules.items()):
        if child is not None:
            m._modules[name] = to_dp(child)


def _hint(is_causal: Optional[bool], name: str) -> bool:
    """``is_causal`` as PyTorch's ``_detect_is_causal_mask`` returns it, without
    inspecting mask values: only an explicit ``True`` is a causal hint."""
    if is_causal is None:
        return False
    return _static_flag(is_causal, name)


class DPTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (same arguments) without the fast path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _dp_children(self)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        is_causal = _static_flag(is_causal, "is_causal")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class DPTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` (same arguments), traceable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _dp_children(self)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        tgt_is_causal = _static_flag(tgt_is_causal, "tgt_is_causal")
        memory_is_causal = _static_flag(memory_is_causal, "memory_is_causal")
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x


class DPTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without the nested-tensor fast path and without
    inspecting mask values for causality."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _dp_children(self)

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        causal = _hint(is_causal, "is_causal")
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class DPTransformerDecoder(nn.TransformerDecoder):
    """``nn.TransformerDecoder`` without inspecting mask values for causality."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _dp_children(self)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        causal = _hint(tgt_is_causal, "tgt_is_causal")
        output = tgt
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask,
                         memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=causal, memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


class DPTransformer(nn.Transformer):
    """``nn.Transformer`` without the input checks that branch on tensor sizes
    (mismatched inputs still fail, in the layers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _dp_children(self)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, src_is_causal: Optional[bool] = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> Tensor:
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


#: PyTorch class -> traceable DP class (the DP class overrides ``forward`` only)
DP_CLASSES: Dict[type, type] = {
    nn.MultiheadAttention: DPMultiheadAttention,
    nn.TransformerEncoderLayer: DPTransformerEncoderLayer,
    nn.TransformerDecoderLayer: DPTransformerDecoderLayer,
    nn.TransformerEncoder: DPTransformerEncoder,
    nn.TransformerDecoder: DPTransformerDecoder,
    nn.Transformer: DPTransformer,
}
_TORCH_OF = {v: k for k, v in DP_CLASSES.items()}


def to_dp(m: nn.Module) -> nn.Module:
    """``m`` with every PyTorch layer of ``DP_CLASSES`` (exact class) in its tree
    turned into the DP class, sharing parameters; ``m`` is not modified."""
    children = {name: to_dp(c) for name, c in m._modules.items() if c is not None}
    changed = {k: c for k, c in children.items() if c is not m._modules[k]}
    if type(m) not in DP_CLASSES and not changed:
        return m
    new = from_torch(m) if type(m) in DP_CLASSES else transplant(m, type(m))
    new._modules.update(changed)
    return new


def from_torch(m: nn.Module) -> nn.Module:
    """The DP class of ``m`` (one level; children are converted separately),
    sharing its parameters and submodules."""
    if isinstance(m, nn.MultiheadAttention):
        return DPMultiheadAttention.from_torch(m)
    for base, dp in DP_CLASSES.items():
        if isinstance(m, base):
            return transplant(m, dp)
    raise TypeError(f"no DP class for {type(m).__name__}")


def to_torch(m: nn.Module) -> nn.Module:
    """``m`` with every DP layer in its tree (itself included) turned back into the
    PyTorch class, sharing parameters; ``m`` itself is returned when it holds none."""
    children = {name: to_torch(c) for name, c in m._modules.items() if c is not None}
    changed = {k: c for k, c in children.items() if c is not m._modules[k]}
    torch_cls = _TORCH_OF.get(type(m))
    if torch_cls is None and not changed:
        return m
    if isinstance(m, DPMultiheadAttention):
        new = m.to_torch()
    else:
        new = transplant(m, torch_cls or type(m))
    new._modules.update(changed)
    return new
