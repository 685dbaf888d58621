"""``rnn_scan``: the recurrence of one layer and direction on precomputed input gates,
its hand-written BPTT backward, the ``ScanTape`` it shares with its per-sample rule, and
the custom op ``fxdp::rnn_scan`` that stands for it in ``torch.export`` graphs."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...passes.batch_rules import BatchedArg, register_batch_rule
from .graph_op import _EXPORT_FORMS, _graph_op, _is_fake, _transforms_active

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


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


#: the LSTM and GRU backward form their per-step coefficients for blocks of time steps
#: whose gate gradients take about this many bytes, not for the whole sequence at once:
#: the [B, T, H]-sized coefficient tensors and their temporaries were most of the
#: backward's peak (IMDb LSTM, T = 256: the step's peak 76.1 -> 62.2 MiB at B = 32,
#: 292 -> 236 MiB at B = 128)
_BLOCK_BYTES = 1 << 20


def _time_blocks(T: int, reverse: bool, step_bytes: int) -> List[Tuple[int, int]]:
    """``[lo, hi)`` blocks of ``range(T)`` in backward order (last block first unless ``reverse``)."""
    n = max(1, _BLOCK_BYTES // max(1, step_bytes))
    blocks = [(lo, min(lo + n, T)) for lo in range(0, T, n)]
    return blocks if reverse else blocks[::-1]


def _lstm_coefficients(A: Tensor, c_new: Tensor, c_prev: Tensor, H: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """For steps of activated gates ``A`` (i, f, g, o) and cell states ``c_new``/``c_prev``:
    ``d pre_o / d u``, ``d c / d u``, ``d pre_{i,f,g} / d c`` (``[B, t, 3, H]``) and ``f``."""
    i, f, g, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
    tc = torch.tanh(c_new)
    Ko = tc * o * (1 - o)
    Kc = o * (1 - tc * tc)
    del tc
    Kifg = A.new_empty(A.shape[0], A.shape[1], 3, H)  # written in place: no stacked copy
    torch.mul(g * i, 1 - i, out=Kifg[:, :, 0])
    torch.mul(c_prev * f, 1 - f, out=Kifg[:, :, 1])
    torch.mul(i, 1 - g * g, out=Kifg[:, :, 2])
    return Ko, Kc, Kifg, f


def _gru_coefficients(A: Tensor, GH: Tensor, h_prev: Tensor, H: int) -> Tuple[Tensor, Tensor, Tensor]:
    """For steps of activated gates ``A`` (r, z, n), the hh part of n's pre-activation
    ``GH`` and the previous states: ``d pre_{r,z,n} / d h`` (``[B, t, 3, H]``), the input
    side of n's coefficient ``Kn``, and ``z``."""
    r, z, n = A[..., :H], A[..., H : 2 * H], A[..., 2 * H :]
    Kn = (1 - z) * (1 - n * n)
    Kh = A.new_empty(A.shape[0], A.shape[1], 3, H)  # written in place: no stacked copy
    torch.mul(Kn * GH * r, 1 - r, out=Kh[:, :, 0])
    torch.mul((h_prev - n) * z, 1 - z, out=Kh[:, :, 1])
    torch.mul(Kn, r, out=Kh[:, :, 2])
    return Kh, Kn, z


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
        carry_c = S.new_zeros(B, H)
        for lo, hi in _time_blocks(T, reverse, B * G * S.element_size()):
            Ko, Kc, Kifg, f = _lstm_coefficients(A[:, lo:hi], Snew[:, lo:hi, P:], Sprev[:, lo:hi, P:], H)
            for t in (range(lo, hi) if reverse else range(hi - 1, lo - 1, -1)):
                k = t - lo
                m = None if mask is None else mask[:, t, None]
                dh = dSnew[:, t, :P] + carry_h
                if w_hr is not None:
                    dHt[:, t] = dh if m is None else dh * m
                    du = dh @ w_hr
                else:
                    du = dh
                dc_in = dSnew[:, t, P:] + carry_c
                dc = torch.addcmul(dc_in, du, Kc[:, k])
                dg = dG[:, t]
                torch.mul(du, Ko[:, k], out=dg[:, 3 * H :])
                torch.mul(dc.unsqueeze(1), Kifg[:, k], out=dg[:, : 3 * H].view(B, 3, H))
                if m is None:
                    carry_c = dc * f[:, k]
                    carry_h = dg @ w_hh
                else:
                    dg.masked_fill_(~m, 0)
                    carry_c = torch.where(m, dc * f[:, k], dc_in)
                    carry_h = torch.where(m, dg @ w_hh, dh)
        dgx = dG
        dc0 = carry_c + dS[:, first, P:]
    elif gru:
        dgx = S.new_empty(B, T, G)
        for lo, hi in _time_blocks(T, reverse, B * G * S.element_size()):
            Kh, Kn, z = _gru_coefficients(A[:, lo:hi], sv["GH"][:, lo:hi], Sprev[:, lo:hi], H)
            DH = S.new_empty(B, hi - lo, H)
            for t in (range(lo, hi) if reverse else range(hi - 1, lo - 1, -1)):
                k = t - lo
                m = None if mask is None else mask[:, t, None]
                dh = dSnew[:, t] + carry_h
                dg = dG[:, t]
                torch.mul(dh.unsqueeze(1), Kh[:, k], out=dg.view(B, 3, H))
                if m is None:
                    DH[:, k] = dh
                    carry_h = torch.addmm(dh * z[:, k], dg, w_hh)
                else:
                    DH[:, k] = dh * m
                    dg.masked_fill_(~m, 0)
                    carry_h = torch.where(m, torch.addmm(dh * z[:, k], dg, w_hh), dh)
            dgx[:, lo:hi, : 2 * H] = dG[:, lo:hi, : 2 * H]
            torch.mul(DH, Kn, out=dgx[:, lo:hi, 2 * H :])  # the input side of n is not multiplied by r
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


def _rnn_scan_batch(u: BatchedArg) -> Optional[int]:
    """Sample b's states come from its own gates, initial states and length (batch first);
    the weights are shared."""
    return 0 if u.name in ("gates_x", "h0", "c0", "lengths") and u.dim == 0 else None


register_batch_rule(torch.ops.fxdp.rnn_scan.default, _rnn_scan_batch)


def _export_rnn_scan(gates_x: Tensor, weight_hh: Tensor, bias_hh: Optional[Tensor] = None,
                     h0: Optional[Tensor] = None, c0: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
                     lengths: Optional[Tensor] = None, tape: Any = None, mode: str = "LSTM",
                     reverse: bool = False) -> Tensor:
    return rnn_scan_op(gates_x, weight_hh, bias_hh, h0, c0, weight_hr, lengths, mode, reverse)


# what torch.export runs in place of these graph ops (graph_op._exportable)
_EXPORT_FORMS.update({"rnn_scan": _export_rnn_scan, "_new_tape": lambda like: None})
