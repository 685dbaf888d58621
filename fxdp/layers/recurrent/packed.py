"""Input/output plumbing of the DP recurrent layers: padded, unbatched and
``PackedSequence`` inputs to a batch-first ``[B, T, in]`` tensor plus lengths and back,
and fx-traceable ``pack_padded_sequence``/``pad_packed_sequence``."""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ...errors import UnsupportedModelError
from .graph_op import _EXPORT_FORMS, _graph_op, _is_fake, _transforms_active


class _ShapeOnlyPacked:
    """Stand-in for a PackedSequence during fake-tensor shape analysis (a packed
    sequence's layout depends on the lengths' values, which fake tensors lack)."""

    def __init__(self, padded: Tensor, lengths: Tensor) -> None:
        self.padded = padded  # batch-first
        self.lengths = lengths


class _RunInfo:
    __slots__ = ("packed", "unbatched", "batch_first", "shape_only")

    def __init__(self, packed=None, unbatched=False, batch_first=True, shape_only=None) -> None:
        self.packed = packed
        self.unbatched = unbatched
        self.batch_first = batch_first
        self.shape_only = shape_only


def _packed_rows(batch_sizes: Tensor) -> Tensor:
    """Indices of a PackedSequence's rows in the flattened time-major ``[T * B]``
    grid of its sorted batch (row of step t, sequence j: t * B + j, j < batch_sizes[t])."""
    T = batch_sizes.shape[0]
    B = int(batch_sizes[0]) if T else 0
    keep = torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)
    return keep.flatten().nonzero().squeeze(1)


def _unpack(p: PackedSequence, padding_value: float = 0.0, total_length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``pad_packed_sequence(p, batch_first=True)`` from index ops only (so it runs
    under torch.func transforms, where torch's C++ version cannot)."""
    bs, data = p.batch_sizes, p.data
    T = bs.shape[0]
    B = int(bs[0]) if T else 0
    rows = _packed_rows(bs)
    pos = torch.full((T * B,), data.shape[0], dtype=torch.long)
    pos[rows] = torch.arange(rows.shape[0])
    pad = data.new_full((1,) + tuple(data.shape[1:]), padding_value)
    x = torch.cat([data, pad]).index_select(0, pos.to(data.device)).view((T, B) + tuple(data.shape[1:]))
    x = x.transpose(0, 1)
    lengths = (bs.unsqueeze(1) > torch.arange(B)).sum(0)
    if p.unsorted_indices is not None:
        x = x.index_select(0, p.unsorted_indices)
        lengths = lengths.index_select(0, p.unsorted_indices.cpu())
    if total_length is not None:
        if total_length < T:
            raise ValueError(f"Expected total_length to be at least the length of the longest sequence ({T}), "
                             f"got {total_length}")
        x = torch.cat([x, x.new_full((B, total_length - T) + tuple(x.shape[2:]), padding_value)], 1)
    return x, lengths


def _pack(y: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack batch-first ``y`` (original batch order) with ``like``'s layout."""
    bs, si = like.batch_sizes, like.sorted_indices
    ys = y if si is None else y.index_select(0, si)
    T = bs.shape[0]
    flat = ys[:, :T].transpose(0, 1).reshape((T * ys.shape[0],) + tuple(ys.shape[2:]))
    data = flat.index_select(0, _packed_rows(bs).to(y.device))
    return PackedSequence(data, bs, si, like.unsorted_indices)


@_graph_op
def pack_padded_sequence(input: Tensor, lengths: Any, batch_first: bool = False,
                         enforce_sorted: bool = True) -> PackedSequence:
    """``torch.nn.utils.rnn.pack_padded_sequence`` that ``torch.fx`` records as one
    node (so the module calling it stays traceable under ``fxdp.privatize``) and
    that runs under ``torch.func`` transforms (the fallback's per-sample vjp)."""
    if _is_fake(input):
        return _ShapeOnlyPacked(input if batch_first else input.transpose(0, 1), torch.as_tensor(lengths))  # type: ignore[return-value]
    if not _transforms_active():
        return torch.nn.utils.rnn.pack_padded_sequence(input, lengths, batch_first=batch_first,
                                                       enforce_sorted=enforce_sorted)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if enforce_sorted:
        if bool((lengths[1:] > lengths[:-1]).any()):
            raise RuntimeError("`lengths` array must be sorted in decreasing order when `enforce_sorted` is True.")
        sorted_lengths, sorted_indices = lengths, None
    else:
        sorted_lengths, sorted_indices = torch.sort(lengths, descending=True)
        sorted_indices = sorted_indices.to(input.device)
    T = int(sorted_lengths[0]) if lengths.numel() else 0
    batch_sizes = (sorted_lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
    x = input if batch_first else input.transpose(0, 1)
    like = PackedSequence(x.new_empty(0), batch_sizes, sorted_indices, None)
    return _pack(x, like)


@_graph_op
def pad_packed_sequence(sequence: PackedSequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``torch.nn.utils.rnn.pad_packed_sequence`` that ``torch.fx`` records as one
    node and that runs under ``torch.func`` transforms."""
    if isinstance(sequence, _ShapeOnlyPacked):
        x = sequence.padded
        if total_length is not None:
            x = x.new_empty((x.shape[0], total_length) + tuple(x.shape[2:]))
        return (x if batch_first else x.transpose(0, 1)), sequence.lengths
    if not _transforms_active():
        return torch.nn.utils.rnn.pad_packed_sequence(sequence, batch_first=batch_first, padding_value=padding_value,
                                                      total_length=total_length)
    x, lengths = _unpack(sequence, padding_value, total_length)
    return (x if batch_first else x.transpose(0, 1)), lengths


@_graph_op
def _rnn_begin(input: Any, batch_first: bool, input_size: int) -> Tuple[Tensor, Optional[Tensor], _RunInfo]:
    """(x ``[B, T, in]``, lengths or None, info) for any accepted input."""
    if isinstance(input, PackedSequence):
        x, lengths = _unpack(input)
        info = _RunInfo(packed=input, batch_first=batch_first)
    elif isinstance(input, _ShapeOnlyPacked):
        x, lengths = input.padded, input.lengths
        info = _RunInfo(batch_first=batch_first, shape_only=input)
    elif isinstance(input, Tensor):
        if input.dim() == 2:
            x, lengths, info = input.unsqueeze(0), None, _RunInfo(unbatched=True, batch_first=batch_first)
        elif input.dim() == 3:
            x, lengths, info = (input if batch_first else input.transpose(0, 1)), None, _RunInfo(batch_first=batch_first)
        else:
            raise ValueError(f"recurrent layer: expected input to be 2-D (unbatched) or 3-D (batched), got "
                             f"{input.dim()}-D of shape {tuple(input.shape)}")
    else:
        raise TypeError(f"recurrent layer: expected a Tensor or PackedSequence, got {type(input).__name__}")
    if x.shape[-1] != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {x.shape[-1]}")
    if x.shape[1] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    return x, lengths, info


@_graph_op
def _rnn_state(h: Tensor, info: _RunInfo, x: Tensor, layers: int, size: int, name: str) -> Tensor:
    """A user-given initial state as ``[layers, B, size]``."""
    if not isinstance(h, Tensor):
        raise TypeError(f"recurrent layer: {name} must be a Tensor, got {type(h).__name__}")
    if info.unbatched:
        if h.dim() != 2:
            raise RuntimeError(f"For unbatched 2-D input, {name} should also be 2-D but got {h.dim()}-D tensor")
        h = h.unsqueeze(1)
    expected = (layers, x.shape[0], size)
    if tuple(h.shape) != expected:
        raise RuntimeError(f"Expected hidden size {expected}, got {list(h.shape)} for {name}")
    return h


@_graph_op
def _rnn_end(y: Tensor, info: _RunInfo) -> Union[Tensor, PackedSequence]:
    """Batch-first padded output ``y`` in the caller's layout (a fresh tensor)."""
    if info.shape_only is not None:
        return _ShapeOnlyPacked(y, info.shape_only.lengths)  # type: ignore[return-value]
    if info.packed is not None:
        return _pack(y, info.packed)
    if info.unbatched:
        y = y.squeeze(0)
    elif not info.batch_first:
        y = y.transpose(0, 1)
    # never hand out a view of the scan's saved states (in-place ops on it would corrupt BPTT)
    return y.clone(memory_format=torch.contiguous_format) if y._base is not None else y


@_graph_op
def _rnn_end_state(h: Tensor, info: _RunInfo) -> Tensor:
    return h.squeeze(1) if info.unbatched else h


def _export_rnn_begin(input: Any, batch_first: bool, input_size: int) -> Any:
    if not isinstance(input, Tensor):
        raise UnsupportedModelError(
            "fxdp's DP recurrent layers take packed sequences only on the symbolic-tracing path for now. Fix: "
            "privatize(model, capture='fx'), or pass a padded [B, T, d] tensor"
        )
    return _rnn_begin.__wrapped__(input, batch_first, input_size)


# what torch.export runs in place of these graph ops (graph_op._exportable)
_EXPORT_FORMS["_rnn_begin"] = _export_rnn_begin
