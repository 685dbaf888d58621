"""DP-compatible recurrent layers: ``nn.RNN``/``nn.GRU``/``nn.LSTM`` and their cells.

``nn.LSTM`` runs its recurrence in one ATen call, so the per-step uses of its
weights are invisible to a graph pass. ``DPLSTM`` (and ``DPRNN``, ``DPGRU``) is a
subclass with the same constructor, parameters and ``state_dict`` whose forward
is written as capturable graph ops, per layer and direction:

1. the input projection for the whole sequence, hoisted out of the time loop,
   ``Gx = F.linear(x, W_ih, b_ih)`` on ``[B, T, in]``: one op, served by the
   linear rule (Goodfellow 2015: ``grad W_ih_i = sum_t dG_{i,t} x_{i,t}^T``);
2. the recurrence ``rnn_scan(Gx, W_hh, b_hh, h0, c0, W_hr, lengths)``: a tight
   loop of tensor ops on the precomputed gates whose backward is a hand-written
   backpropagation through time (BPTT, Werbos 1990). It returns one tensor
   ``S [B, T+1, S_d]``: every state (``h`` and, for the LSTM, ``c``) including
   the initial one, so outputs, ``h_n`` and ``c_n`` are slices of it.

The per-sample rule of ``rnn_scan`` (``fxdp.rules.recurrent``) is the
sequence-linear rule: with the gate gradients ``dG [B, T, G]`` from BPTT and the
stacked previous states ``H_prev [B, T, P]``

    grad W_hh_i = sum_t dG_{i,t} h_{i,t-1}^T      (one bmm over the batch)
    grad b_hh_i = sum_t dG_{i,t}
    grad W_hr_i = sum_t dh_{i,t} u_{i,t}^T        (LSTM projection, u = o * tanh(c))

It is exact: the recurrent weight's gradient *is* this sum over its per-step uses,
each evaluated at the state that step saw. The BPTT runs once: the scan's
autograd backward (which the capture op runs for the input gradients) leaves
``dG`` on a per-call ``ScanTape`` that the rule reads; if that backward did not
run (no input needed a gradient) the rule runs the BPTT itself.

``PackedSequence`` inputs are unpacked to padded ``[B, T, in]`` plus lengths;
the scan masks padded steps (``h_t = h_{t-1}`` there, so states stop at each
sequence's end and the reverse direction starts at it), and outputs are repacked
with the input's sort order. Cells (``DPLSTMCell`` ...) are two ``F.linear`` ops
and elementwise math, so each call is served by the linear rule.

Use ``fxdp.layers.pack_padded_sequence``/``pad_packed_sequence`` (drop-in for
torch's) inside a privatized model: torch's versions cannot be traced by
``torch.fx``, so the module calling them would be kept whole (exact, slower).
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from ..errors import UnsupportedModelError

__all__ = [
    "DPRNN",
    "DPGRU",
    "DPLSTM",
    "DPRNNCell",
    "DPGRUCell",
    "DPLSTMCell",
    "rnn_scan",
    "ScanTape",
    "pack_padded_sequence",
    "pad_packed_sequence",
    "DP_RECURRENT",
]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


# -- graph ops: one fx node per call ---------------------------------------------------

def _find_proxy(x: Any) -> Optional[torch.fx.Proxy]:
    """The first fx Proxy in nested tuples/lists/dicts (without rebuilding them:
    PackedSequence is a namedtuple that cannot be rebuilt from mapped fields)."""
    if isinstance(x, torch.fx.Proxy):
        return x
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for a in items:
        p = _find_proxy(a)
        if p is not None:
            return p
    return None


def _graph_op(fn: Callable) -> Callable:
    """Record ``fn`` as one ``call_function`` node when called on fx proxies (like
    ``torch.fx.wrap``, but independent of how the caller imported it)."""

    @functools.wraps(fn)
    def op(*args: Any, **kwargs: Any) -> Any:
        proxy = _find_proxy((args, kwargs))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", op, args, kwargs)
        if torch.compiler.is_exporting():
            # torch.export records ATen ops: the scan becomes the custom op fxdp::rnn_scan (one
            # node, served by its rule), the plumbing runs as ordinary tensor ops, and what has
            # no exportable form yet (packed sequences) fails closed
            return _exportable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return op


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and is_fake(t)


def _transforms_active() -> bool:
    return torch._C._are_functorch_transforms_active()


# -- the scan --------------------------------------------------------------------------

class ScanTape:
    """Per-call scratch space shared by one ``rnn_scan`` call, its autograd
    backward and its per-sample rule: the forward's saved states and the gate
    gradients of the backward. Created fresh for every call (``_new_tape``)."""

    __slots__ = ("saved", "grads")

    def __init__(self) -> None:
        self.saved: Optional[dict] = None
        self.grads: Optional[dict] = None

    def clear(self) -> None:
        self.saved = None
        self.grads = None

    def __repr__(self) -> str:  # keeps generated graph code readable
        return "ScanTape()"


@_graph_op
def _new_tape(like: Tensor) -> ScanTape:
    return ScanTape()


def _dims(gx: Tensor, w_hh: Tensor, mode: str) -> Tuple[int, int, int, int, int]:
    """(B, T, G, H, P): batch, time, gates, hidden size, recurrent state size."""
    if mode not in _GATES:
        raise ValueError(f"rnn_scan: unknown mode {mode!r}; expected one of {sorted(_GATES)}")
    B, T, G = gx.shape
    H = G // _GATES[mode]
    return B, T, G, H, w_hh.shape[1]


def _mask(lengths: Optional[Tensor], B: int, T: int, device: torch.device) -> Optional[Tensor]:
    """``[B, T]`` bool, True where a step is inside its sequence; None when all are."""
    if lengths is None:
        return None
    lengths = lengths.to(device)
    if lengths.shape != (B,):
        raise ValueError(f"rnn_scan: lengths must have shape [{B}], got {tuple(lengths.shape)}")
    m = torch.arange(T, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    if not _transforms_active() and bool(m.all()):
        return None
    return m


def _scan_forward(gx, w_hh, b_hh, h0, c0, w_hr, mask, mode, reverse) -> dict:
    """Run the recurrence on precomputed input gates; returns what BPTT needs."""
    B, T, G, H, P = _dims(gx, w_hh, mode)
    lstm, gru = mode == "LSTM", mode == "GRU"
    Sd = P + H if lstm else H
    S = gx.new_empty(B, T + 1, Sd)
    first = T if reverse else 0
    S[:, first, :P] = 0 if h0 is None else h0
    if lstm:
        S[:, first, P:] = 0 if c0 is None else c0
    wt = w_hh.t()
    # b_hh enters every gate additively except GRU's n gate (inside r * (W_hn h + b_hn))
    gxb = gx + b_hh if (b_hh is not None and not gru) else gx
    A = gx.new_empty(B, T, G) if (lstm or gru) else None  # gate activations
    GH = gx.new_empty(B, T, H) if gru else None  # GRU: W_hn h + b_hn
    U = gx.new_empty(B, T, H) if (lstm and w_hr is not None) else None  # LSTM proj: o * tanh(c)
    tc = gx.new_empty(B, H) if lstm else None
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        prev, new = (t + 1, t) if reverse else (t, t + 1)
        h = S[:, prev, :P]
        out_h = S[:, new, :P]
        if lstm:
            a = A[:, t]
            pre = torch.addmm(gxb[:, t], h, wt)
            torch.sigmoid(pre, out=a)
            torch.tanh(pre[:, 2 * H : 3 * H], out=a[:, 2 * H : 3 * H])
            c_new = S[:, new, P:]
            torch.mul(a[:, H : 2 * H], S[:, prev, P:], out=c_new)
            c_new.addcmul_(a[:, :H], a[:, 2 * H : 3 * H])
            torch.tanh(c_new, out=tc)
            if w_hr is None:
                torch.mul(a[:, 3 * H :], tc, out=out_h)
            else:
                torch.mul(a[:, 3 * H :], tc, out=U[:, t])
                torch.mm(U[:, t], w_hr.t(), out=out_h)
        elif gru:
            a = A[:, t]
            gh = torch.mm(h, wt) if b_hh is None else torch.addmm(b_hh, h, wt)
            torch.add(gx[:, t, : 2 * H], gh[:, : 2 * H], out=a[:, : 2 * H])
            a[:, : 2 * H].sigmoid_()
            GH[:, t] = gh[:, 2 * H :]
            n = a[:, 2 * H :]
            torch.addcmul(gx[:, t, 2 * H :], a[:, :H], gh[:, 2 * H :], out=n)
            n.tanh_()
            # h' = (1 - z) n + z h = n + z (h - n), torch's formula
            torch.sub(h, n, out=out_h)
            out_h.mul_(a[:, H : 2 * H]).add_(n)
        else:
            torch.addmm(gxb[:, t], h, wt, out=out_h)
            out_h.tanh_() if mode == "RNN_TANH" else out_h.relu_()
        if mask is not None:  # padded steps keep the state
            S[:, new] = torch.where(mask[:, t, None], S[:, new], S[:, prev])
    return dict(S=S, A=A, GH=GH, U=U, mask=mask, w_hh=w_hh, w_hr=w_hr, mode=mode, reverse=reverse,
                version=S._version)


def _scan_backward(sv: dict, dS: Tensor) -> dict:
    """BPTT through ``_scan_forward``: gradients of the hh pre-activations ``dG``
    (``[B, T, G]``), of the input gates ``dgx``, of the initial states, and for the
    LSTM projection the total state gradients ``dHt``."""
    S, A, mask, w_hh, w_hr, mode, reverse = (sv[k] for k in ("S", "A", "mask", "w_hh", "w_hr", "mode", "reverse"))
    if S._version != sv["version"]:
        raise RuntimeError(
            "rnn_scan: its output states were modified in place after the forward pass, so backpropagation "
            "through time would use wrong values. Fix: clone the output before modifying it in place."
        )
    B, T1 = S.shape[:2]
    T = T1 - 1
    G = w_hh.shape[0]
    H = G // _GATES[mode]
    P = w_hh.shape[1]
    lstm, gru = mode == "LSTM", mode == "GRU"
    Snew, Sprev = (S[:, :T], S[:, 1:]) if reverse else (S[:, 1:], S[:, :T])
    dSnew = dS[:, :T] if reverse else dS[:, 1:]
    first = T if reverse else 0
    dG = S.new_empty(B, T, G)
    dHt = S.new_empty(B, T, P) if (lstm and w_hr is not None) else None
    carry_h = S.new_zeros(B, P)
    order = range(T) if reverse else range(T - 1, -1, -1)
    if lstm:
        i, f, g, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
        tc = torch.tanh(Snew[..., P:])
        Ko = tc * o * (1 - o)  # d pre_o / d u
        Kc = o * (1 - tc * tc)  # d c / d u
        Kifg = torch.stack([g * i * (1 - i), Sprev[..., P:] * f * (1 - f), i * (1 - g * g)], 2)  # d pre / d c
        carry_c = S.new_zeros(B, H)
        for t in order:
            m = None if mask is None else mask[:, t, None]
            dh = dSnew[:, t, :P] + carry_h
            if w_hr is not None:
                dHt[:, t] = dh if m is None else dh * m
                du = dh @ w_hr
            else:
                du = dh
            dc_in = dSnew[:, t, P:] + carry_c
            dc = torch.addcmul(dc_in, du, Kc[:, t])
            dg = dG[:, t]
            torch.mul(du, Ko[:, t], out=dg[:, 3 * H :])
            torch.mul(dc.unsqueeze(1), Kifg[:, t], out=dg[:, : 3 * H].view(B, 3, H))
            if m is None:
                carry_c = dc * f[:, t]
                carry_h = dg @ w_hh
            else:
                dg.masked_fill_(~m, 0)
                carry_c = torch.where(m, dc * f[:, t], dc_in)
                carry_h = torch.where(m, dg @ w_hh, dh)
        dgx = dG
        dc0 = carry_c + dS[:, first, P:]
    elif gru:
        r, z, n = A[..., :H], A[..., H : 2 * H], A[..., 2 * H :]
        Kn = (1 - z) * (1 - n * n)
        Kh = torch.stack([Kn * sv["GH"] * r * (1 - r), (Sprev - n) * z * (1 - z), Kn * r], 2)
        DH = S.new_empty(B, T, H)
        for t in order:
            m = None if mask is None else mask[:, t, None]
            dh = dSnew[:, t] + carry_h
            dg = dG[:, t]
            torch.mul(dh.unsqueeze(1), Kh[:, t], out=dg.view(B, 3, H))
            if m is None:
                DH[:, t] = dh
                carry_h = torch.addmm(dh * z[:, t], dg, w_hh)
            else:
                DH[:, t] = dh * m
                dg.masked_fill_(~m, 0)
                carry_h = torch.where(m, torch.addmm(dh * z[:, t], dg, w_hh), dh)
        dgx = dG.clone()
        dgx[..., 2 * H :] = DH * Kn  # the input side of n is not multiplied by r
        dc0 = None
    else:
        K = 1 - Snew * Snew if mode == "RNN_TANH" else (Snew > 0).to(S.dtype)
        for t in order:
            dh = dSnew[:, t] + carry_h
            dg = dG[:, t]
            torch.mul(dh, K[:, t], out=dg)
            if mask is None:
                carry_h = dg @ w_hh
            else:
                m = mask[:, t, None]
                dg.masked_fill_(~m, 0)
                carry_h = torch.where(m, dg @ w_hh, dh)
        dgx = dG
        dc0 = None
    dh0 = carry_h + dS[:, first, :P]
    return dict(dG=dG, dgx=dgx, dh0=dh0, dc0=dc0, dHt=dHt)


def _prev_states(sv: dict) -> Tensor:
    """``[B, T, P]``: the recurrent state each step saw (a view of ``S``)."""
    S, P = sv["S"], sv["w_hh"].shape[1]
    T = S.shape[1] - 1
    return S[:, 1:, :P] if sv["reverse"] else S[:, :T, :P]


class _ScanFn(torch.autograd.Function):
    """``rnn_scan`` with the hand-written BPTT as its backward."""

    @staticmethod
    def forward(ctx, gx, w_hh, b_hh, h0, c0, w_hr, mask, tape, mode, reverse):  # type: ignore[override]
        sv = _scan_forward(gx, w_hh, b_hh, h0, c0, w_hr, mask, mode, reverse)
        S = sv["S"]
        # the tape keeps a detached alias: holding the output itself would make a
        # reference cycle through its grad_fn
        sv["S"] = S.detach()
        tape.saved = sv
        ctx.tape = tape
        return S

    @staticmethod
    def backward(ctx, dS):  # type: ignore[override]
        tape: ScanTape = ctx.tape
        sv = tape.saved
        if sv is None:
            raise RuntimeError("rnn_scan: backward ran twice through the same forward")
        need = ctx.needs_input_grad
        gr = _scan_backward(sv, dS)
        tape.grads = gr  # read by the per-sample rule right after this backward
        dG = gr["dG"]
        d_w_hh = d_b_hh = d_w_hr = None
        if need[1]:
            d_w_hh = torch.tensordot(dG, _prev_states(sv), dims=([0, 1], [0, 1]))
        if need[2]:
            d_b_hh = dG.sum((0, 1))
        if need[5]:
            d_w_hr = torch.tensordot(gr["dHt"], sv["U"], dims=([0, 1], [0, 1]))
        return (gr["dgx"] if need[0] else None, d_w_hh, d_b_hh, gr["dh0"] if need[3] else None,
                gr["dc0"] if need[4] else None, d_w_hr, None, None, None, None)


def _scan_reference(gx, w_hh, b_hh, h0, c0, w_hr, mask, mode, reverse) -> Tensor:
    """The same recurrence in differentiable per-step ops: used under torch.func
    transforms (the fallback's vmap/vjp), and as the tests' second opinion."""
    B, T, _, H, P = _dims(gx, w_hh, mode)
    h = gx.new_zeros(B, P) if h0 is None else h0
    c = gx.new_zeros(B, H) if c0 is None else c0
    states: List[Optional[Tensor]] = [None] * (T + 1)
    first = T if reverse else 0
    states[first] = torch.cat([h, c], 1) if mode == "LSTM" else h
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        new = t if reverse else t + 1
        gh = F.linear(h, w_hh, b_hh)
        x = gx[:, t]
        if mode == "LSTM":
            gi, gf, gg, go = (x + gh).chunk(4, 1)
            c2 = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
            h2 = torch.sigmoid(go) * torch.tanh(c2)
            if w_hr is not None:
                h2 = F.linear(h2, w_hr)
        elif mode == "GRU":
            xr, xz, xn = x.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            nn_ = torch.tanh(xn + r * hn)
            h2, c2 = nn_ + z * (h - nn_), c
        else:
            h2 = torch.tanh(x + gh) if mode == "RNN_TANH" else torch.relu(x + gh)
            c2 = c
        if mask is not None:
            m = mask[:, t, None]
            h2, c2 = torch.where(m, h2, h), torch.where(m, c2, c)
        h, c = h2, c2
        states[new] = torch.cat([h, c], 1) if mode == "LSTM" else h
    return torch.stack(states, 1)  # type: ignore[arg-type]


@_graph_op
def rnn_scan(
    gates_x: Tensor,
    weight_hh: Tensor,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    tape: Optional[ScanTape] = None,
    mode: str = "LSTM",
    reverse: bool = False,
) -> Tensor:
    """Run one direction of one recurrent layer on precomputed input gates.

    Args:
        gates_x: ``[B, T, G]``, ``x W_ih^T + b_ih`` (gate order as in torch).
        weight_hh, bias_hh: ``[G, P]``, ``[G]``; weight_hr: ``[P, H]`` (LSTM proj_size).
        h0, c0: ``[B, P]``, ``[B, H]`` initial states (zeros when None).
        lengths: ``[B]`` valid steps per sequence; padded steps keep the state.
        tape: per-call scratch shared with the per-sample rule (``_new_tape``).
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        reverse: run from the last valid step to the first.

    Returns:
        ``S [B, T+1, S_d]``: all states in time order, the initial state at slot 0
        (slot T when ``reverse``); ``S_d = P + H`` for the LSTM (``h`` then ``c``),
        else ``H``. The output at step t is slot t+1 (slot t when ``reverse``).
    """
    B, T, _, H, P = _dims(gates_x, weight_hh, mode)
    if _is_fake(gates_x):  # batch-dimension analysis: shapes only
        return gates_x.new_empty(B, T + 1, P + H if mode == "LSTM" else H)
    mask = _mask(lengths, B, T, gates_x.device)
    if _transforms_active():
        return _scan_reference(gates_x, weight_hh, bias_hh, h0, c0, weight_hr, mask, mode, reverse)
    tape = ScanTape() if tape is None else tape
    args = (gates_x, weight_hh, bias_hh, h0, c0, weight_hr)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return _ScanFn.apply(*args, mask, tape, mode, reverse)
    with torch.no_grad():
        sv = _scan_forward(*args, mask, mode, reverse)
    tape.saved = sv
    return sv["S"]


# -- the scan as a custom op, for torch.export --------------------------------------------

@torch.library.custom_op("fxdp::rnn_scan", mutates_args=())
def rnn_scan_op(gates_x: Tensor, weight_hh: Tensor, bias_hh: Optional[Tensor], h0: Optional[Tensor],
                c0: Optional[Tensor], weight_hr: Optional[Tensor], lengths: Optional[Tensor], mode: str,
                reverse: bool) -> Tensor:
    """``rnn_scan`` as one op of the ``torch.export`` graph (no tape: its per-sample rule
    reruns the scan's BPTT from the recorded inputs and output gradient)."""
    B, T, _, _, _ = _dims(gates_x, weight_hh, mode)
    with torch.no_grad():
        return _scan_forward(gates_x, weight_hh, bias_hh, h0, c0, weight_hr, _mask(lengths, B, T, gates_x.device),
                             mode, reverse)["S"]


@rnn_scan_op.register_fake
def _rnn_scan_fake(gates_x, weight_hh, bias_hh, h0, c0, weight_hr, lengths, mode, reverse):
    B, T, _, H, P = _dims(gates_x, weight_hh, mode)
    return gates_x.new_empty(B, T + 1, P + H if mode == "LSTM" else H)


def _rnn_scan_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:7])
    ctx.mode, ctx.reverse = inputs[7], inputs[8]


def _rnn_scan_backward(ctx: Any, dS: Tensor) -> tuple:
    gx, w_hh, b_hh, h0, c0, w_hr, lengths = ctx.saved_tensors
    need = ctx.needs_input_grad
    B, T, _, _, _ = _dims(gx, w_hh, ctx.mode)
    with torch.no_grad():  # recompute the states (the op keeps no tape), then BPTT
        sv = _scan_forward(gx, w_hh, b_hh, h0, c0, w_hr, _mask(lengths, B, T, gx.device), ctx.mode, ctx.reverse)
        gr = _scan_backward(sv, dS.contiguous())
        dG = gr["dG"]
        d_w_hh = torch.tensordot(dG, _prev_states(sv), dims=([0, 1], [0, 1])) if need[1] else None
        d_b_hh = dG.sum((0, 1)) if need[2] and b_hh is not None else None
        d_w_hr = torch.tensordot(gr["dHt"], sv["U"], dims=([0, 1], [0, 1])) if need[5] and w_hr is not None \
            else None
    return (gr["dgx"] if need[0] else None, d_w_hh, d_b_hh, gr["dh0"] if need[3] and h0 is not None else None,
            gr["dc0"] if need[4] and c0 is not None else None, d_w_hr, None, None, None)


rnn_scan_op.register_autograd(_rnn_scan_backward, setup_context=_rnn_scan_setup)


def _export_rnn_scan(gates_x: Tensor, weight_hh: Tensor, bias_hh: Optional[Tensor] = None,
                     h0: Optional[Tensor] = None, c0: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
                     lengths: Optional[Tensor] = None, tape: Any = None, mode: str = "LSTM",
                     reverse: bool = False) -> Tensor:
    return rnn_scan_op(gates_x, weight_hh, bias_hh, h0, c0, weight_hr, lengths, mode, reverse)


def _export_rnn_begin(input: Any, batch_first: bool, input_size: int) -> Any:
    if not isinstance(input, Tensor):
        raise UnsupportedModelError(
            "fxdp's DP recurrent layers take packed sequences only on the symbolic-tracing path for now. Fix: "
            "privatize(model, capture='fx'), or pass a padded [B, T, d] tensor"
        )
    return _rnn_begin.__wrapped__(input, batch_first, input_size)


def _exportable(fn: Callable) -> Callable:
    """What a graph op runs while ``torch.export`` traces it."""
    special = {"rnn_scan": _export_rnn_scan, "_new_tape": lambda like: None, "_rnn_begin": _export_rnn_begin}
    if fn.__name__ in special:
        return special[fn.__name__]
    if fn.__name__ in ("pack_padded_sequence", "pad_packed_sequence"):
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise UnsupportedModelError(
                f"{fn.__name__} on the torch.export path is not supported yet. Fix: privatize(model, "
                "capture='fx'), or pass padded [B, T, d] tensors to the recurrent layer"
            )
        return refuse
    return fn


# -- input/output plumbing (runtime dispatch on the input kind) ------------------------

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


# -- layers ----------------------------------------------------------------------------

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
    """Shared forward of ``DPRNN``/``DPGRU``/``DPLSTM`` (see the module docstring)."""

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
