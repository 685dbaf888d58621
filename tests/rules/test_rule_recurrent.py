"""DP recurrent layers and the per-sample rule of their recurrence
(``fxdp/rules/recurrent.py``, ``rnn_scan``): same outputs and gradients as torch's
RNN/GRU/LSTM (and cells); per-sample gradients through fxdp.privatize equal
batch-of-one gradients (float64). The rewrite pass (parameters, state_dict, strip):
tests/passes/test_pass_recurrent.py."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from fxdp.layers import DPLSTM, DPLSTMCell, DPRNN, pack_padded_sequence, pad_packed_sequence
from fxdp.layers.recurrent import DP_RECURRENT, _scan_reference, rnn_scan
from models import SeqClassifier
from oracle import check_recurrent as check, quiet_privatize

pytestmark = pytest.mark.usefixtures("one_thread", "f64")
privatize = quiet_privatize


def flat(out):
    """Floating tensors of a (nested) RNN output; PackedSequence -> its data."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat(o)]
    return [out]


# -- layers alone: outputs and gradients equal torch's --------------------------------------

KINDS = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]
INPUTS = ["tensor", "packed_sorted", "packed_unsorted", "unbatched"]
CONFIGS = [
    dict(kind=k, kw=kw, inp=inp, layers=L, bi=bi, bf=n % 2 == 0, bias=n % 3 != 0, hx=n % 4 in (1, 2),
         T=(1, 3, 4)[n % 3], B=(1, 3, 2)[(n // 3) % 3])
    for n, ((k, kw), inp, (L, bi)) in enumerate(itertools.product(KINDS, INPUTS, [(1, False), (2, True)]))
]


def _make_input(cfg, gen):
    B, T, inp = cfg["B"], cfg["T"], cfg["inp"]
    if inp == "unbatched":
        x = torch.randn(T, 3, generator=gen, requires_grad=True)
        return x, x, None
    x = torch.randn(B, T, 3, generator=gen, requires_grad=True)
    if inp == "tensor":
        return x, (x if cfg["bf"] else x.transpose(0, 1)), None
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    if inp == "packed_sorted":
        lengths = lengths.sort(descending=True).values
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                               enforce_sorted=inp == "packed_sorted")
    return x, packed, lengths


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "{kind}{kw}-{inp}-L{layers}{bi}-bf{bf}-bias{bias}-hx{hx}-T{T}B{B}"
                         .format(**{**c, "kw": "".join(f"{k}={v}" for k, v in c["kw"].items()),
                                    "bi": "bi" if c["bi"] else ""}))
def test_layer_matches_torch(cfg):
    """Outputs (incl. PackedSequence layout, h_n, c_n) and all gradients equal torch's."""
    gen = torch.Generator().manual_seed(len(str(cfg)))
    torch.manual_seed(len(str(cfg)))
    cls = getattr(nn, cfg["kind"])
    m = cls(3, 4, num_layers=cfg["layers"], bias=cfg["bias"], batch_first=cfg["bf"], bidirectional=cfg["bi"],
            **cfg["kw"])
    dp = DP_RECURRENT[cls].from_module(m)
    assert type(dp) is DP_RECURRENT[cls] and isinstance(dp, cls)
    leaf, x, _ = _make_input(cfg, gen)
    args = [x]
    hx_leaves = []
    if cfg["hx"]:
        D = 2 if cfg["bi"] else 1
        P = cfg["kw"].get("proj_size", 4)
        batch = () if cfg["inp"] == "unbatched" else (cfg["B"],)
        h0 = torch.randn(cfg["layers"] * D, *batch, P if cfg["kind"] == "LSTM" else 4, generator=gen,
                         requires_grad=True)
        hx_leaves = [h0]
        if cfg["kind"] == "LSTM":
            c0 = torch.randn(cfg["layers"] * D, *batch, 4, generator=gen, requires_grad=True)
            hx_leaves.append(c0)
            args.append((h0, c0))
        else:
            args.append(h0)
    ref, out = m(*args), dp(*args)
    if isinstance(ref[0], PackedSequence):
        assert isinstance(out[0], PackedSequence)
        for a, b in zip(ref[0][1:], out[0][1:]):
            assert (a is None and b is None) or torch.equal(a, b)
    rf, of = flat(ref), flat(out)
    assert [t.shape for t in rf] == [t.shape for t in of]
    for a, b in zip(rf, of):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    ws = [torch.randn(t.shape, generator=gen) for t in rf]
    wrt = [leaf] + hx_leaves + list(m.parameters())
    g_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(rf, ws)), wrt, retain_graph=True)
    g_dp = torch.autograd.grad(sum((t * w).sum() for t, w in zip(of, ws)), wrt)
    for a, b in zip(g_ref, g_dp):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
@pytest.mark.parametrize("case", ["batched", "no_hx", "unbatched", "empty"])
def test_cells_match_torch(cls, case):
    torch.manual_seed(0)
    m = cls(3, 4, bias=case != "no_hx")
    dp = DP_RECURRENT[cls].from_module(m)
    shape = {"batched": (2, 3), "no_hx": (2, 3), "unbatched": (3,), "empty": (0, 3)}[case]
    x = torch.randn(*shape, requires_grad=True)
    args = [x]
    if case != "no_hx":
        h = torch.randn(*shape[:-1], 4)
        args.append((h, torch.randn_like(h)) if cls is nn.LSTMCell else h)
    ref, out = flat(m(*args)), flat(dp(*args))
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    if case != "empty":
        g_ref = torch.autograd.grad(sum(t.sum() for t in ref), [x] + list(m.parameters()))
        g_dp = torch.autograd.grad(sum(t.sum() for t in out), [x] + list(m.parameters()))
        for a, b in zip(g_ref, g_dp):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


def test_edge_cases_follow_torch():
    torch.manual_seed(1)
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    dp = DPLSTM.from_module(m)
    empty = torch.randn(2, 0, 3)  # empty batch: allowed by torch
    for a, b in zip(flat(m(empty)), flat(dp(empty))):
        assert a.shape == b.shape
    with pytest.raises(RuntimeError, match="sequence length"):
        dp(torch.randn(0, 2, 3))
    with pytest.raises(RuntimeError, match="input_size"):
        dp(torch.randn(2, 2, 5))
    with pytest.raises(RuntimeError, match="hidden size"):
        dp(torch.randn(2, 2, 3), (torch.randn(4, 3, 4), torch.randn(4, 2, 4)))


def test_fast_scan_equals_reference_scan():
    """The hand-written BPTT equals autograd through the per-step reference (the
    implementation used under torch.func transforms), with masking, both directions."""
    torch.manual_seed(2)
    for mode, reverse in itertools.product(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"], [False, True]):
        G = {"LSTM": 16, "GRU": 12}.get(mode, 4)
        gx = torch.randn(3, 5, G, requires_grad=True)
        w, b = torch.randn(G, 4, requires_grad=True), torch.randn(G, requires_grad=True)
        h0 = torch.randn(3, 4, requires_grad=True)
        lengths = torch.tensor([5, 2, 3])
        mask = torch.arange(5) < lengths[:, None]
        S1 = rnn_scan(gx, w, b, h0, None, None, lengths, None, mode, reverse)
        S2 = _scan_reference(gx, w, b, h0, None, None, mask, mode, reverse)
        torch.testing.assert_close(S1, S2, rtol=0, atol=1e-12)
        gw = torch.randn(S1.shape)
        g1 = torch.autograd.grad((S1 * gw).sum(), [gx, w, b, h0])
        g2 = torch.autograd.grad((S2 * gw).sum(), [gx, w, b, h0])
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("steps_per_block", [1, 3])
def test_backward_in_time_blocks(steps_per_block, mode, monkeypatch):
    """The LSTM and GRU backward form their coefficients a block of time steps at a time
    (one step, and 3 + 3 + 1 of 7): BPTT equals autograd through the reference scan, with
    masking and initial states (and an LSTM projection), both directions; per-sample
    gradients through fxdp.privatize equal batch-of-one gradients (the tape feeds them)."""
    import fxdp.layers.recurrent.scan as scan

    lstm = mode == "LSTM"
    B, T, H = 3, 7, 4
    P = 2 if lstm else H
    G = (4 if lstm else 3) * H
    monkeypatch.setattr(scan, "_BLOCK_BYTES", steps_per_block * B * G * 8)  # float64
    blocks = []
    name = "_lstm_coefficients" if lstm else "_gru_coefficients"
    inner = getattr(scan, name)
    monkeypatch.setattr(scan, name, lambda A, *a: blocks.append(A.shape[1]) or inner(A, *a))
    torch.manual_seed(4)
    for reverse in (False, True):
        gx = torch.randn(B, T, G, requires_grad=True)
        w, b = torch.randn(G, P, requires_grad=True), torch.randn(G, requires_grad=True)
        w_hr = torch.randn(P, H, requires_grad=True) if lstm else None
        h0 = torch.randn(B, P, requires_grad=True)
        c0 = torch.randn(B, H, requires_grad=True) if lstm else None
        lengths = torch.tensor([7, 2, 5])
        mask = torch.arange(T) < lengths[:, None]
        blocks.clear()
        S1 = rnn_scan(gx, w, b, h0, c0, w_hr, lengths, None, mode, reverse)
        S2 = _scan_reference(gx, w, b, h0, c0, w_hr, mask, mode, reverse)
        torch.testing.assert_close(S1, S2, rtol=0, atol=1e-12)
        gw = torch.randn(S1.shape)
        inputs = [t for t in (gx, w, b, h0, c0, w_hr) if t is not None]
        g1 = torch.autograd.grad((S1 * gw).sum(), inputs)
        g2 = torch.autograd.grad((S2 * gw).sum(), inputs)
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
        assert sum(blocks) == T and max(blocks) == steps_per_block
    rnn = nn.LSTM(3, H, proj_size=P, bidirectional=True, batch_first=True) if lstm else \
        nn.GRU(3, H, bidirectional=True, batch_first=True)
    model = SeqClassifier(rnn, 2 * P)
    fast_path(check(model, [torch.randn(B, T, 3)], dims=[0], reduction="sum", batch_first=True))


def test_in_place_change_of_the_states_is_refused():
    gx = torch.randn(2, 3, 8, requires_grad=True)
    S = rnn_scan(gx, torch.randn(8, 2), mode="LSTM")
    S.mul_(2)  # would corrupt the states BPTT reads
    with pytest.raises(RuntimeError, match="modified in place"):
        S.sum().backward()


# -- privatize: per-sample gradients equal batch-of-one gradients ---------------------------

def fast_path(dp):
    """Every recurrent weight is served by the recurrent/linear rules, no fallback."""
    rules = {c["rule"] for c in dp.capture_table()}
    assert "recurrent_scan" in rules and not any("fallback" in r for r in rules), rules


@pytest.mark.parametrize("name,make,reduction", [
    ("lstm_bi_2layer", lambda bf: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=bf), "mean"),
    ("lstm_proj_bi", lambda bf: nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=bf), "sum"),
    ("gru_bi", lambda bf: nn.GRU(3, 4, bidirectional=True, batch_first=bf), "mean"),
    ("rnn_relu_2layer", lambda bf: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", batch_first=bf), "sum"),
    ("rnn_tanh_nobias", lambda bf: nn.RNN(3, 4, bias=False, batch_first=bf), "mean"),
])
@pytest.mark.parametrize("bf", [True, False])
def test_per_sample_gradients(name, make, reduction, bf):
    torch.manual_seed(3)
    rnn = make(bf)
    D = 2 if rnn.bidirectional else 1
    model = SeqClassifier(rnn, D * (rnn.proj_size or rnn.hidden_size))
    B, T = 3, 3  # T == B must not confuse batch dimensions
    x = torch.randn(B, T, 3) if bf else torch.randn(T, B, 3)
    dp = check(model, [x], dims=[0 if bf else 1], reduction=reduction, batch_first=bf)
    fast_path(dp)
    assert [r.original for r in dp.rewrites] == [type(rnn).__name__]


class PackedModel(nn.Module):
    def __init__(self, rnn, pack):
        super().__init__()
        self.rnn = rnn
        self.pack = pack
        self.head = nn.Linear(2 * rnn.hidden_size, 2)

    def forward(self, x, lengths):
        packed = self.pack(x, lengths, batch_first=True, enforce_sorted=False)
        y, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        padded, _ = pad_packed_sequence(y, batch_first=True)
        # padded steps are zeros: sum over time before the head so they add nothing
        return self.head(padded.sum(1)) + self.head(torch.cat([h[-1], h[-2]], -1))


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_packed_sequences_with_varying_lengths(cls):
    """fxdp.layers.pack_padded_sequence keeps the model traceable: fast path, exact."""
    torch.manual_seed(4)
    model = PackedModel(cls(3, 4, num_layers=2, bidirectional=True, batch_first=True), pack_padded_sequence)
    x = torch.randn(4, 5, 3)
    lengths = torch.tensor([2, 5, 1, 3])
    dp = check(model, [x, lengths], dims=[0, 0])
    fast_path(dp)


class DataDependent(PackedModel):
    def forward(self, x, lengths):
        if int(lengths.min()) < 1:  # data-dependent control flow: not traceable
            raise ValueError("empty sequence")
        return super().forward(x, lengths)


def test_untraceable_module_runs_the_dp_layer_under_the_fallback():
    """A module torch.fx cannot trace is kept whole and served by the torch.func
    fallback: the DP layer and fxdp's pack/unpack then run under torch.func (the
    per-step reference scan, index-op packing), still exact."""
    torch.manual_seed(5)
    model = DataDependent(nn.LSTM(3, 4, bidirectional=True, batch_first=True), pack_padded_sequence)
    x = torch.randn(5, 4, 3)  # the whole model is kept: batch dims are read from sizes, keep them distinct
    lengths = torch.tensor([4, 1, 3, 2, 4])
    dp = check(model, [x, lengths], dims=[0, 0], capture="fx")  # the symbolic-tracing fallback on purpose
    assert [r.replacement for r in dp.rewrites] == ["DPLSTM"] and "" in dp.untraceable


def test_pack_helpers_match_torch_under_transforms():
    torch.manual_seed(16)
    x = torch.randn(3, 4, 2)
    lengths = torch.tensor([2, 4, 1])
    ref = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)

    def both(x):
        p = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return p.data, pad_packed_sequence(p, batch_first=True, total_length=5)[0]

    data, padded = both(x)  # torch's C++ path
    torch.testing.assert_close(data, ref.data)
    (data_t, padded_t), _ = torch.func.vjp(both, x)  # the transform path (index ops)
    torch.testing.assert_close(data_t, ref.data)
    torch.testing.assert_close(padded_t, nn.utils.rnn.pad_packed_sequence(ref, batch_first=True, total_length=5)[0])
    torch.testing.assert_close(padded_t, padded)


class WithStates(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.gru = nn.GRU(4, 4, batch_first=True)

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))
        z, g = self.gru(y, h[1:])  # a state computed by the model
        return z.sum(1) + g[0] + c[0]


@pytest.mark.parametrize("states_need_grad", [False, True])
def test_initial_states_as_inputs(states_need_grad):
    torch.manual_seed(6)
    model = WithStates()
    x = torch.randn(3, 2, 3)
    h0 = torch.randn(2, 3, 4, requires_grad=states_need_grad)
    c0 = torch.randn(2, 3, 4, requires_grad=states_need_grad)
    dp = check(model, [x, h0, c0], dims=[0, 1, 1], input_batch_dims=[0, 1, 1])
    fast_path(dp)


class CellLoop(nn.Module):
    def __init__(self, T=3):
        super().__init__()
        self.T = T
        self.rnn = nn.RNNCell(3, 4)
        self.gru = nn.GRUCell(4, 4)
        self.lstm = nn.LSTMCell(4, 4)

    def forward(self, x):
        h = g = hc = None
        for t in range(self.T):
            h = self.rnn(x[:, t], h)
            g = self.gru(h, g)
            hc = self.lstm(g, hc)
        return hc[0] + hc[1]


def test_cells_in_a_loop():
    torch.manual_seed(7)
    dp = check(CellLoop(), [torch.randn(3, 3, 3)], dims=[0])
    assert {r.replacement for r in dp.rewrites} == {"DPRNNCell", "DPGRUCell", "DPLSTMCell"}
    assert {c["rule"] for c in dp.capture_table()} == {"linear"}


def test_frozen_input_projection_runs_bptt_in_the_rule():
    """With W_ih frozen and inputs not requiring grad, no input of the scan needs a
    gradient, so the rule computes the gate gradients itself."""
    torch.manual_seed(8)
    model = SeqClassifier(nn.GRU(3, 4, batch_first=True), 4)
    model.rnn.weight_ih_l0.requires_grad_(False)
    model.rnn.bias_ih_l0.requires_grad_(False)
    check(model, [torch.randn(3, 4, 3)], dims=[0])


def test_dropout_between_layers():
    torch.manual_seed(9)
    model = SeqClassifier(nn.LSTM(3, 4, num_layers=3, dropout=0.5, batch_first=True), 4)
    x = torch.randn(5, 3, 3)
    dp = privatize(model)
    assert isinstance(dp.rnn.inter_layer_dropout, nn.Dropout)
    out = dp(x)  # training: random masks, per-sample rows still sum to the gradient
    (out.sum() / 5).backward()
    for p in dp.parameters():
        torch.testing.assert_close(p.grad_sample.sum(0) / 5, p.grad, rtol=1e-8, atol=1e-12)
    dp.eval()
    model.eval()
    torch.testing.assert_close(dp(x), model(x), rtol=0, atol=1e-10)


def test_empty_batch():
    torch.manual_seed(10)
    dp = privatize(SeqClassifier(nn.LSTM(3, 4, batch_first=True), 4))
    dp(torch.randn(0, 3, 3)).sum().backward()
    for p in dp.parameters():
        assert p.grad_sample.shape == (0,) + p.shape


# -- layers built directly ----------------------------------------------------------------

def test_layers_construct_like_torch():
    torch.manual_seed(14)
    dp = DPRNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True)
    torch.manual_seed(14)
    ref = nn.RNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True)
    assert list(dp.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(dp.state_dict()[k], v)
    back = dp.to_torch()
    assert type(back) is nn.RNN and back.weight_hh_l1 is dp.weight_hh_l1
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(back(x)[0], dp(x)[0], rtol=0, atol=1e-10)
    assert type(DPLSTMCell(2, 3).to_torch()) is nn.LSTMCell


# -- end to end -----------------------------------------------------------------------------

def test_lstm_classifier_trains_with_clipped_per_sample_gradients():
    """A few SGD steps on per-sample-clipped, averaged gradients reduce the loss."""
    torch.manual_seed(15)
    B, T, C = 32, 6, 1.0
    x = torch.randn(B, T, 3)
    y = (x[:, :, 0].sum(1) > 0).long()

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 8, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.fc(h[-1])

    model = Clf()
    dp = privatize(model)
    params = [p for p in model.parameters()]

    def loss_now():
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    start = loss_now()
    for _ in range(25):
        dp.zero_grad()
        F.cross_entropy(dp(x), y).backward()
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)
        factor = (C / (norms + 1e-12)).clamp(max=1.0)
        with torch.no_grad():
            for p in params:
                p -= 1.0 * torch.einsum("b,b...->...", factor, p.grad_sample) / B
    assert loss_now() < 0.8 * start
