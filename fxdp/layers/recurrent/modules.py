"""The DP recurrent modules: ``DPRNN``/``DPGRU``/``DPLSTM`` (an ``F.linear`` input
projection and one ``rnn_scan`` per layer and direction) and the cells ``DPRNNCell``/
``DPGRUCell``/``DPLSTMCell`` (two ``F.linear`` ops and elementwise math), with
``DP_RECURRENT``, the torch class -> DP class table of the rewrite pass."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph_op import _graph_op
from .packed import _rnn_begin, _rnn_end, _rnn_end_state, _rnn_state
from .scan import _new_tape, rnn_scan


def _share_parameters(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` exactly ``old``'s parameters, buffers and children (same objects,
    same order, so the state_dicts match and optimizers keep working)."""
    new._parameters = OrderedDict(old._parameters)
    new._buffers = OrderedDict(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for k, v in old._modules.items():
        new._modules.setdefault(k, v)
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    new.train(old.training)
    return new


def _rnn_config(m: nn.RNNBase) -> dict:
    kw = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
              batch_first=m.batch_first, dropout=float(m.dropout), bidirectional=m.bidirectional)
    if isinstance(m, nn.LSTM):
        kw["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        kw["nonlinearity"] = m.nonlinearity
    return kw


def _cell_config(m: nn.RNNCellBase) -> dict:
    kw = dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias)
    if isinstance(m, nn.RNNCell):
        kw["nonlinearity"] = m.nonlinearity
    return kw


class _DPRecurrent:
    """Shared forward of ``DPRNN``/``DPGRU``/``DPLSTM`` (see :mod:`fxdp.layers.recurrent`)."""

    #: the torch class this layer stands in for
    torch_class: type = nn.Module

    def _dp_init(self) -> None:
        if self.dropout > 0 and self.num_layers > 1:  # type: ignore[attr-defined]
            # a module (not F.dropout): torch.fx bakes self.training into traced code
            self.inter_layer_dropout = nn.Dropout(self.dropout)  # type: ignore[attr-defined]

    @classmethod
    def from_module(cls, m: nn.RNNBase) -> nn.Module:
        """The DP layer holding ``m``'s Parameter objects (no copy, no RNG use)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's dropout/num_layers warning was already shown
            new = cls(**_rnn_config(m), device="meta")  # type: ignore[call-arg]
        return _share_parameters(new, m)

    def to_torch(self) -> nn.Module:
        """A standard torch module sharing this layer's parameters."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = self.torch_class(**_rnn_config(self), device="meta")  # type: ignore[arg-type]
        return _share_parameters(m, self)  # type: ignore[arg-type]

    def forward(self, input, hx=None):  # noqa: C901 - one layer loop
        mode = self.mode  # type: ignore[attr-defined]
        L = self.num_layers  # type: ignore[attr-defined]
        D = 2 if self.bidirectional else 1  # type: ignore[attr-defined]
        H = self.hidden_size  # type: ignore[attr-defined]
        proj = getattr(self, "proj_size", 0)
        P = proj if proj > 0 else H
        lstm = mode == "LSTM"
        begin = _rnn_begin(input, self.batch_first, self.input_size)  # type: ignore[attr-defined]
        x, lengths, info = begin[0], begin[1], begin[2]
        h0 = c0 = None
        if hx is not None:
            if lstm:
                h0 = _rnn_state(hx[0], info, x, L * D, P, "h_0")
                c0 = _rnn_state(hx[1], info, x, L * D, H, "c_0")
            else:
                h0 = _rnn_state(hx, info, x, L * D, H, "h_0")
        hs, cs = [], []
        for layer in range(L):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                k = layer * D + d
                gx = F.linear(x, getattr(self, "weight_ih" + sfx),
                              getattr(self, "bias_ih" + sfx) if self.bias else None)  # type: ignore[attr-defined]
                s = rnn_scan(
                    gx,
                    getattr(self, "weight_hh" + sfx),
                    getattr(self, "bias_hh" + sfx) if self.bias else None,  # type: ignore[attr-defined]
                    None if h0 is None else h0[k],
                    None if c0 is None else c0[k],
                    getattr(self, "weight_hr" + sfx) if proj > 0 else None,
                    lengths,
                    _new_tape(gx),
                    mode,
                    d == 1,
                )
                last = 0 if d else -1
                hs.append(s[:, last, :P])
                if lstm:
                    cs.append(s[:, last, P:])
                outs.append(s[:, :-1, :P] if d else s[:, 1:, :P])
            x = outs[0] if D == 1 else torch.cat(outs, 2)
            if layer < L - 1 and self.dropout > 0:  # type: ignore[attr-defined]
                x = self.inter_layer_dropout(x)  # type: ignore[attr-defined]
        out = _rnn_end(x, info)
        h_n = _rnn_end_state(torch.stack(hs, 0), info)
        if lstm:
            return out, (h_n, _rnn_end_state(torch.stack(cs, 0), info))
        return out, h_n


class DPRNN(_DPRecurrent, nn.RNN):
    """``nn.RNN`` (tanh or relu) with per-sample gradients: same constructor,
    parameters, ``state_dict`` and outputs (see the module docstring)."""

    torch_class = nn.RNN

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dp_init()


class DPGRU(_DPRecurrent, nn.GRU):
    """``nn.GRU`` with per-sample gradients (see the module docstring)."""

    torch_class = nn.GRU

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dp_init()


class DPLSTM(_DPRecurrent, nn.LSTM):
    """``nn.LSTM`` (incl. ``proj_size``) with per-sample gradients (see the module docstring)."""

    torch_class = nn.LSTM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dp_init()


# -- cells -------------------------------------------------------------------------------

@_graph_op
def _cell_begin(input: Tensor, hx: Any, hidden_size: int, lstm: bool) -> tuple:
    """(x ``[B, in]``, h, c or None, unbatched) with zero states when ``hx`` is None."""
    if input.dim() not in (1, 2):
        raise ValueError(f"recurrent cell: expected input to be 1-D or 2-D, got {input.dim()}-D instead")
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    if hx is None:
        z = x.new_zeros(x.shape[0], hidden_size)
        return x, z, (z if lstm else None), unbatched
    states = list(hx) if lstm else [hx]
    for i, s in enumerate(states):
        if s.dim() != input.dim():
            raise ValueError(f"recurrent cell: expected hidden state to be {input.dim()}-D like the input, got "
                             f"{s.dim()}-D")
        states[i] = s.unsqueeze(0) if unbatched else s
    return x, states[0], (states[1] if lstm else None), unbatched


@_graph_op
def _cell_end(out: Any, unbatched: bool) -> Any:
    if not unbatched:
        return out
    return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


class _DPCell:
    torch_class: type = nn.Module

    @classmethod
    def from_module(cls, m: nn.RNNCellBase) -> nn.Module:
        new = cls(**_cell_config(m), device="meta")  # type: ignore[call-arg]
        return _share_parameters(new, m)

    def to_torch(self) -> nn.Module:
        m = self.torch_class(**_cell_config(self), device="meta")  # type: ignore[arg-type]
        return _share_parameters(m, self)  # type: ignore[arg-type]

    def _gates(self, x: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        return (F.linear(x, self.weight_ih, self.bias_ih),  # type: ignore[attr-defined]
                F.linear(h, self.weight_hh, self.bias_hh))  # type: ignore[attr-defined]


class DPRNNCell(_DPCell, nn.RNNCell):
    """``nn.RNNCell`` as two ``F.linear`` ops (linear rule) and the activation."""

    torch_class = nn.RNNCell

    def forward(self, input, hx=None):
        b = _cell_begin(input, hx, self.hidden_size, False)
        gi, gh = self._gates(b[0], b[1])
        h = torch.tanh(gi + gh) if self.nonlinearity == "tanh" else torch.relu(gi + gh)
        return _cell_end(h, b[3])


class DPGRUCell(_DPCell, nn.GRUCell):
    """``nn.GRUCell`` as two ``F.linear`` ops (linear rule) and elementwise math."""

    torch_class = nn.GRUCell

    def forward(self, input, hx=None):
        b = _cell_begin(input, hx, self.hidden_size, False)
        h = b[1]
        gi, gh = self._gates(b[0], h)
        H = self.hidden_size
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
        n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
        return _cell_end(n + z * (h - n), b[3])


class DPLSTMCell(_DPCell, nn.LSTMCell):
    """``nn.LSTMCell`` as two ``F.linear`` ops (linear rule) and elementwise math."""

    torch_class = nn.LSTMCell

    def forward(self, input, hx=None):
        b = _cell_begin(input, hx, self.hidden_size, True)
        gi, gh = self._gates(b[0], b[1])
        gates = gi + gh
        H = self.hidden_size
        i = torch.sigmoid(gates[:, :H])
        f = torch.sigmoid(gates[:, H : 2 * H])
        g = torch.tanh(gates[:, 2 * H : 3 * H])
        o = torch.sigmoid(gates[:, 3 * H :])
        c = f * b[2] + i * g
        return _cell_end((o * torch.tanh(c), c), b[3])


#: torch class -> DP class
DP_RECURRENT = OrderedDict(
    [
        (nn.RNN, DPRNN),
        (nn.GRU, DPGRU),
        (nn.LSTM, DPLSTM),
        (nn.RNNCell, DPRNNCell),
        (nn.GRUCell, DPGRUCell),
        (nn.LSTMCell, DPLSTMCell),
    ]
)
