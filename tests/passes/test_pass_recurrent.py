"""The recurrent rewrite pass (``fxdp/passes/recurrent.py``): nn.RNN/GRU/LSTM (and
cells) -> DP recurrent layers sharing the user's Parameters; state_dict both ways,
strip() back to torch modules with the trained weights, the option and shared
modules (float64). The layers and their rule: tests/rules/test_rule_recurrent.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.layers import DPGRU, DPLSTM
from models import SeqClassifier
from oracle import check_recurrent as check, quiet_privatize

pytestmark = pytest.mark.usefixtures("one_thread", "f64")
privatize = quiet_privatize


# -- rewrite pass: parameters, state_dict, strip -------------------------------------------

def test_same_parameters_and_state_dict_both_ways():
    torch.manual_seed(11)
    model = SeqClassifier(nn.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True), 4)
    ref = copy.deepcopy(model)
    dp = privatize(model, batch_first=False)  # nn.LSTM's default layout: [T, B, ...]
    assert type(dp.rnn) is DPLSTM and type(model.rnn) is nn.LSTM  # the user's model is untouched
    for name, p in model.rnn.named_parameters():
        assert getattr(dp.rnn, name) is p
    assert list(dp.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(dp.state_dict()[k], v)
    other = SeqClassifier(nn.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True), 4)
    dp.load_state_dict(other.state_dict())  # torch -> privatized
    x = torch.randn(2, 3, 3)
    torch.testing.assert_close(dp(x), other(x), rtol=0, atol=1e-10)
    ref.load_state_dict(dp.state_dict())  # privatized -> torch
    torch.testing.assert_close(ref(x), other(x), rtol=0, atol=1e-10)


class MyGRU(nn.GRU):
    pass


class CustomLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(x * 2, hx)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(MyGRU(3, 4, batch_first=True))
        self.custom = CustomLSTM(4, 4, batch_first=True)
        self.cell = nn.LSTMCell(4, 4)

    def forward(self, x):
        y, _ = self.enc[0](x)
        y, _ = self.custom(y)
        h, c = self.cell(y[:, -1])
        return h + c


def test_strip_gives_back_torch_modules_with_trained_weights():
    torch.manual_seed(12)
    model = Mixed()
    dp = privatize(model, capture="fx")  # the symbolic-tracing fallback on purpose
    assert {r.path: r.replacement for r in dp.rewrites} == {"enc.0": "DPGRU", "cell": "DPLSTMCell"}
    assert all(r.reversible for r in dp.rewrites)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built on the original model
    x = torch.randn(3, 4, 3)
    before = model.cell.weight_ih.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        dp(x).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(before, dp.cell.weight_ih)
    plain = dp.strip()
    assert type(plain.get_submodule("enc.0")) is MyGRU and type(plain.get_submodule("cell")) is nn.LSTMCell
    assert type(plain.get_submodule("custom")) is CustomLSTM
    assert plain.get_submodule("cell").weight_hh is model.cell.weight_hh
    torch.testing.assert_close(plain(x), dp(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-10)
    assert list(plain.state_dict()) == list(model.state_dict())


def test_rewrite_option_and_shared_modules():
    torch.manual_seed(13)
    rnn = nn.GRU(3, 3, batch_first=True)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = rnn
            self.b = rnn

        def forward(self, x):
            return self.b(self.a(x)[0])[0].sum(1)

    model = Twice()
    dp = check(model, [torch.randn(3, 2, 3)], dims=[0])
    assert dp.a is dp.b and type(dp.a) is DPGRU
    with pytest.warns(UserWarning, match="fallback"):
        kept = fxdp.privatize(model, rewrite_options={"recurrent": False}, capture="fx")
    assert kept.rewrites == [] and type(kept.a) is nn.GRU
    with pytest.raises(TypeError, match="recurrent"):
        fxdp.privatize(model, rewrite_options={"recurrent": "yes"})
