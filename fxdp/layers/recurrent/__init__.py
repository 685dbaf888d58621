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

Modules: :mod:`.scan` (``rnn_scan``, its BPTT and the ``fxdp::rnn_scan`` custom op),
:mod:`.packed` (input/output layouts and packed sequences), :mod:`.modules` (the DP
layers and cells), :mod:`.graph_op` (how their ops appear in fx and export graphs).
"""
# The private names below (used by fxdp.rules.recurrent and the tests) stay importable
# from here, where they lived before the split.
from .modules import (  # noqa: F401
    DP_RECURRENT,
    DPGRU,
    DPLSTM,
    DPRNN,
    DPGRUCell,
    DPLSTMCell,
    DPRNNCell,
)
from .packed import pack_padded_sequence, pad_packed_sequence  # noqa: F401
from .scan import (  # noqa: F401
    ScanTape,
    _mask,
    _prev_states,
    _scan_backward,
    _scan_forward,
    _scan_reference,
    rnn_scan,
    rnn_scan_op,
)

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
