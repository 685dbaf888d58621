"""Book-keeping (grad_sample_mode="bk"): clipped sums equal materialized clipped sums."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.optim import DPOptimizer
from models import ExpandParams, Nested, RawParams, TiedLM
from oracle import assert_check_plans_as_run, bk_clipped_sums, clipped_sums_materialized, quiet_privatize

pytestmark = pytest.mark.usefixtures("f64")
privatize = quiet_privatize


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")
        self.n1 = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.n1(self.c1(x))))).flatten(1))


class ResBlockNet(nn.Module):
    """A ResNet basic block on a 6x6 map, wide enough that its 3x3 layers take ghost norms
    with the patches' Gram matrix from the pixels' (``conv_grads.gram_from_pixels``)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(32, 32, 3, padding=1)
        self.n1 = nn.GroupNorm(4, 32)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(F.relu(x + self.c2(F.relu(self.n1(self.c1(x))))).mean((2, 3)))


class StridedNet(nn.Module):
    """MNIST's CNN in small: a one-channel 8x8 stride-2 layer, then a 4x4 stride-2 layer that
    takes ghost norms by the patches and keeps their rows for its clipped sum
    (``_ConvMath.keeps_patch_rows``)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 8, stride=2, padding=3)
        self.c2 = nn.Conv2d(4, 8, 4, stride=2)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2, 1)
        return self.fc(F.relu(self.c2(x)).flatten(1))


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 13)
        self.out.weight = self.emb.weight  # tied

    def forward(self, t):
        return self.out(torch.tanh(self.fc(self.ln(self.emb(t)))))


MODELS = {
    "nested": (Nested, lambda: torch.randn(6, 5)),
    "raw_params": (RawParams, lambda: torch.randn(4, 5, 4)),
    "expand_params": (ExpandParams, lambda: torch.randn(4, 5, 4)),
    "tied": (TiedLM, lambda: torch.randn(5, 4, 11)),
    "conv": (ConvNet, lambda: torch.randn(5, 2, 7, 7)),
    "resblock": (ResBlockNet, lambda: torch.randn(3, 32, 6, 6)),
    "strided": (StridedNet, lambda: torch.randn(4, 1, 16, 16)),
    "seq": (SeqNet, lambda: torch.randint(0, 13, (4, 7))),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("per_layer", [False, True])
def test_bk_clipped_sums_equal_materialized(name, per_layer, monkeypatch):
    from fxdp.rules import conv, conv_grads

    pixels, rows = [], []
    inner = conv_grads._patch_gram_from_pixels
    monkeypatch.setattr(conv_grads, "_patch_gram_from_pixels", lambda geo, out: pixels.append(1) or inner(geo, out))
    by_rows = conv.sum_patch_rows
    monkeypatch.setattr(conv, "sum_patch_rows", lambda *a, **k: rows.append(1) or by_rows(*a, **k))
    torch.manual_seed(0)
    cls, make_x = MODELS[name]
    model = cls()
    x = make_x()
    dpm = privatize(model)
    dpb = privatize(copy.deepcopy(model), grad_sample_mode="bk")
    w = torch.randn_like(dpm(x))
    nparams = len([p for p in dpb.parameters() if p.requires_grad])
    bounds = [0.05 * (j + 1) for j in range(nparams)] if per_layer else 0.3
    expected = clipped_sums_materialized(dpm, x, w, bounds, per_layer)
    pb = [p for p in dpb.parameters() if p.requires_grad]
    # (bk_clipped_sums asserts the activations are freed once the sums are formed); a second
    # pass on the same model gives the same sums (its records, methods and marks reused)
    for _ in range(2):
        sums = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), bounds, per_layer)
        for j, (p, e) in enumerate(zip(pb, expected)):
            assert p.grad is None, "bk must not compute the non-private gradient"
            torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)
    assert bool(pixels) == (name == "resblock")  # its two 3x3 layers' ghost norms, from the pixels
    assert len(rows) == (2 if name == "strided" else 0)  # its 4x4 layer's sum from the kept rows, each pass


@pytest.mark.parametrize("cin,cout,H,on_arrival", [
    (2, 3, 8, True),  # per-sample gradients 0.11x the record: formed and kept as it arrives
    (8, 8, 5, False),  # 1.44x the record: formed at the end of the backward pass
])
def test_bk_records_keep_only_per_sample_gradients_once_materialized(cin, cout, H, on_arrival, monkeypatch):
    """A layer whose norms materialized its per-sample gradients keeps those and drops its
    activations and output gradients: as its record arrives, so the backward pass does not
    hold every layer's output gradient until the step, or, where the kept gradients are
    larger than the record, at the end of the pass (formed as it arrives they would add to
    the activations the pass still holds); its clipped sum stays exact."""
    from fxdp.bookkeeping import BookKeeping

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(cout * H * H, 2)).double()
    x = torch.randn(4, cin, H, H, dtype=torch.float64)
    w = torch.randn(4, 2, dtype=torch.float64)
    dpm = privatize(model)
    dpb = privatize(copy.deepcopy(model), grad_sample_mode="bk")
    expected = clipped_sums_materialized(dpm, x, w, 0.3, False)

    def conv_of(records):
        return next(r for r in records if any(p.dim() == 4 for p in r.params.values()))

    at_close, close = [], BookKeeping._close_pass
    monkeypatch.setattr(BookKeeping, "_close_pass",
                        lambda self: at_close.append((bool(conv_of(self.records).sq), conv_of(self.records).released))
                        or close(self))
    dpb.bookkeeping.attached = True
    dpb(x).mul(w).sum().div(4).backward()
    assert at_close == [(on_arrival, on_arrival)]  # norms formed and the record dropped as the pass ended
    (records,) = [ps.records for ps in dpb.bookkeeping.pending]
    conv = conv_of(records)
    fc = next(r for r in records if r is not conv)
    assert conv.released and conv.inputs == [] and conv.grads == [] and set(conv.kept) == set(conv.params)
    kept = conv.kept[min(i for i, p in conv.params.items() if p.dim() == 4)]
    assert (kept.numel() > x.numel() + 4 * cout * H * H) != on_arrival  # larger than its record
    assert not fc.released and fc.grads  # T = 1: rank-one norm, the clipped sum needs a and g
    dpb.bookkeeping.pending = []  # clip the same batch again through the oracle
    sums = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(4).backward(), 0.3)
    for p, e in zip([p for p in dpb.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_bk_training_equals_materialize(clipping):
    """Same seeds, same batches: bk and materialize give the same weights."""
    torch.manual_seed(1)
    model = ConvNet()
    runs = []
    for mode in ("materialize", "bk"):
        m = copy.deepcopy(model)
        dp = privatize(m, grad_sample_mode=mode)
        n = len(list(dp.parameters()))
        opt = DPOptimizer(
            torch.optim.SGD(dp.parameters(), lr=0.1, momentum=0.9),
            noise_multiplier=0.7,
            max_grad_norm=[0.2] * n if clipping == "per_layer" else 0.5,
            expected_batch_size=6,
            generator=torch.Generator().manual_seed(7),
            clipping=clipping,
        )
        if mode == "bk":
            opt.attach_bookkeeping(dp.bookkeeping)
        data = torch.Generator().manual_seed(3)
        for step in range(4):
            B = 4 + step
            x = torch.randn(B, 2, 7, 7, generator=data)
            y = torch.randint(0, 3, (B,), generator=data)
            opt.zero_grad()
            F.cross_entropy(dp(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in dp.parameters()])
        if mode == "bk":
            assert opt.clip_stats is not None
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bk_without_clip_bound_is_a_clear_error():
    dp = privatize(nn.Linear(3, 2), grad_sample_mode="bk")
    with pytest.raises(fxdp.PerSampleGradientError, match="clip bound"):
        dp(torch.randn(4, 3)).sum().backward()


def test_bk_empty_batch_and_step():
    torch.manual_seed(2)
    dp = privatize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), grad_sample_mode="bk")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    opt.attach_bookkeeping(dp.bookkeeping)
    before = [p.detach().clone() for p in dp.parameters()]
    dp(torch.randn(0, 3)).sum().backward()
    opt.step()  # an empty batch is still a step; with sigma = 0 nothing moves
    for a, p in zip(before, dp.parameters()):
        torch.testing.assert_close(a, p.detach())


def test_compatibility_report_records_the_bk_method_per_layer(monkeypatch):
    """fxdp.check states, per parameter, how book-keeping computes its norm: chosen
    from the traced shapes with the same rule code as at run time (tunable threshold)."""
    import warnings

    from fxdp.rules.linear import LinearRule

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.conv = nn.Conv1d(8, 16, 3)  # T = 10: T(d+p) = 400 > pd = 384: materialized
            self.seq = nn.Linear(16, 4)  # on [B, 10, 16]: kept, T²(d+p) = 2000 > 4pd = 256: materialized
            self.head = nn.Linear(4, 2)  # rank 2: rank-one norm

        def forward(self, x):
            h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
            return self.head(self.seq(h).mean(1))

    x = torch.randint(0, 50, (3, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = {lay.name: lay.bookkeeping for lay in fxdp.check(Net(), (x,)).layers}
    assert layers["emb.weight"].startswith("norms from repeated tokens")
    assert layers["conv.weight"].startswith("materialized by")
    assert layers["seq.weight"].startswith("materialized [B, 4, 16] (T=10")
    assert layers["head.weight"].startswith("rank-one norm")
    assert layers["head.bias"].startswith("per-sample")
    monkeypatch.setattr(LinearRule, "ghost_ratio", 10.0)  # the documented knob moves seq to ghost norms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fxdp.check(Net(), (x,))
    assert {lay.name: lay.bookkeeping for lay in report.layers}["seq.weight"].startswith("ghost norm (T=10")
    assert "Book-keeping (grad_sample_mode='bk'" in report.to_text()
    assert report.to_dict()["layers"][0]["bookkeeping"]
    with warnings.catch_warnings():  # a tied parameter (SeqNet's embedding and head) is materialized at each use
        warnings.simplefilter("ignore")
        tied = {lay.name: lay.bookkeeping for lay in fxdp.check(SeqNet(), (torch.randint(0, 13, (3, 7)),)).layers}
    assert tied["emb.weight"].startswith("tied (used by 2 ops)") and "(T=7" in tied["fc.weight"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_check_plans_what_book_keeping_runs(name):
    """On symbolically traced models (raw parameters, tied weights, grouped, strided and
    circular convolutions, a ResNet block, a layer fed by another captured layer): every
    layer's fxdp.check plan equals the rule's plan at the shapes its record arrives with."""
    torch.manual_seed(0)
    cls, make_x = MODELS[name]
    x = make_x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = fxdp.check(cls(), (x,)).layers
        dp = privatize(cls(), grad_sample_mode="bk")
    assert_check_plans_as_run({lay.name: lay.bookkeeping for lay in layers}, dp, lambda: dp(x).sum().backward())


def test_fallback_layer_per_sample_gradients_are_computed_once_per_step(monkeypatch):
    """Book-keeping needs a fallback layer's per-sample gradients twice (norms, then the
    clipped sum): they are kept on the record, not recomputed; the sums stay exact."""
    from fxdp.capture import FuncCapture

    class Branchy(nn.Module):  # data-dependent control flow: symbolic tracing keeps it whole
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > -1e9:
                x = torch.tanh(self.lin(x))
            return x

    model = nn.Sequential(nn.Linear(4, 3), Branchy(), nn.Linear(3, 2)).double()
    torch.manual_seed(0)
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    dpm = quiet_privatize(model, capture="fx")
    assert [c.kind for c in dpm.captures].count("functorch") == 1
    want = clipped_sums_materialized(dpm, x, w, 0.7, per_layer=False)
    calls = []
    real = FuncCapture.per_sample_grads
    monkeypatch.setattr(FuncCapture, "per_sample_grads", lambda self, rec: calls.append(1) or real(self, rec))
    for p in model.parameters():
        p.grad_sample = None
    dpb = quiet_privatize(model, capture="fx", grad_sample_mode="bk")
    sums = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), 0.7)
    assert len(calls) == 1
    for p, s in zip([p for p in dpb.parameters() if p.requires_grad], want):
        torch.testing.assert_close(sums[id(p)], s, rtol=1e-9, atol=1e-12)


# --- bk_methods="measure": the faster exact method per layer, timed on the first batch ---------------


class Mixed(nn.Module):
    """A sequence linear layer (ghost or materialized), a conv (ghost or materialized), a T = 1 head."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Linear(6, 5)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(5 + 3, 4)

    def forward(self, s, x):
        return self.head(torch.cat([self.seq(s).mean(1), self.conv(x).mean((2, 3))], 1))


def _mixed_batch(B: int, g: torch.Generator):
    return torch.randn(B, 7, 6, generator=g), torch.randn(B, 2, 5, 5, generator=g)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_every_bk_candidate_gives_the_materialized_clipped_sums(method, monkeypatch):
    torch.manual_seed(3)
    model = Mixed()
    s, x = _mixed_batch(5, torch.Generator().manual_seed(4))
    dpm = privatize(copy.deepcopy(model))
    w = torch.randn_like(dpm(s, x))
    dpm(s, x).mul(w).sum().div(5).backward()
    params_m = [p for p in dpm.parameters() if p.requires_grad]
    gs = [p.grad_sample for p in params_m]
    tot = torch.stack([g.flatten(1).norm(dim=1) for g in gs], 1).norm(dim=1)
    fac = (0.3 / (tot + 1e-6)).clamp(max=1)
    expected = [torch.einsum("b,b...->...", fac, g) for g in gs]

    from fxdp.rules import rule_for_op
    for op in (F.linear, F.conv2d):  # force one method in both rules
        rule = rule_for_op(op)
        real = type(rule).norm_sample_sq_keep
        monkeypatch.setattr(type(rule), "norm_sample_sq_keep",
                            lambda self, a, g, n, m=None, real=real: real(self, a, g, n, method if m is None else m))
    dpb = privatize(copy.deepcopy(model), grad_sample_mode="bk")
    sums = bk_clipped_sums(dpb, lambda: dpb(s, x).mul(w).sum().div(5).backward(), 0.3)
    for p, e in zip([p for p in dpb.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)


def test_measured_methods_keep_patch_rows_exactly(monkeypatch):
    """``bk_methods="measure"`` on a layer whose ghost norm keeps its patch rows: timing the
    candidates (each one's norms and clipped sum) leaves no rows behind, and the steps
    after sum from the rows of their own batch (float64, bk = materialized clipped sums)."""
    from fxdp.rules import conv

    rows = []
    by_rows = conv.sum_patch_rows
    monkeypatch.setattr(conv, "sum_patch_rows", lambda *a, **k: rows.append(1) or by_rows(*a, **k))
    torch.manual_seed(7)
    (c2,) = _measured_sums_exact(StridedNet(), torch.randn(6, 1, 16, 16))["c2"]
    assert "ghost" in c2["ms"] and rows


def _measured_sums_exact(model: nn.Module, x: torch.Tensor) -> dict:
    """``bk_methods="measure"``: bk = materialized clipped sums over two passes (the first
    times the candidates); the measured methods."""
    dpm = privatize(model)
    dpb = privatize(copy.deepcopy(model), grad_sample_mode="bk")
    dpb.bookkeeping.measure = True
    w = torch.randn_like(dpm(x))
    expected = clipped_sums_materialized(dpm, x, w, 0.3, False)
    for _ in range(2):
        sums = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), 0.3)
        for p, e in zip([p for p in dpb.parameters() if p.requires_grad], expected):
            torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)
    return dpb.bookkeeping_methods()


def test_measured_methods_on_a_layer_kept_at_the_end_of_the_pass():
    """``bk_methods="measure"`` on a convolution whose kept per-sample gradients are larger
    than its record (formed at the end of the backward pass): each candidate timed there,
    the record released once its gradients are kept, bk = materialized clipped sums over two
    passes (float64)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 2)).double()
    (conv,) = _measured_sums_exact(model, torch.randn(4, 8, 5, 5, dtype=torch.float64))["_0"]
    assert {"ghost", "groups", "unfold"} <= set(conv["ms"])


def test_measured_methods_are_timed_once_per_shape_reported_and_exact():
    torch.manual_seed(5)
    model = Mixed()
    ref = copy.deepcopy(model)
    data = torch.Generator().manual_seed(6)
    batches = [_mixed_batch(B, data) + (torch.randint(0, 4, (B,), generator=data),) for B in (6, 4, 6)]
    runs = {}
    for mode, m in (("model", ref), ("measure", model)):
        dp = privatize(m, grad_sample_mode="bk")
        opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.4,
                          expected_batch_size=5)
        opt.attach_bookkeeping(dp.bookkeeping)
        dp.bookkeeping.measure = mode == "measure"
        calls = []
        for cap in dp.captures:  # count the timing runs
            if hasattr(cap, "_time_method"):
                real = cap._time_method
                cap._time_method = lambda *a, real=real, name=cap.capture_name: calls.append((name, a[-1])) or real(*a)
        for s, x, y in batches:
            opt.zero_grad()
            F.cross_entropy(dp(s, x), y).backward()
            opt.step()
        runs[mode] = ([p.detach().clone() for p in dp.parameters()], dp.bookkeeping_methods(), calls)
    # the same weights whichever exact method each layer used
    for a, b in zip(runs["model"][0], runs["measure"][0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    report, timed = runs["measure"][1], runs["measure"][2]
    assert runs["model"][1] == {} and runs["model"][2] == []  # the cost model times nothing
    assert set(report) == {"seq", "conv"}  # the T = 1 head has one method (rank one)
    # the linear layer: ghost or materialized norms; the conv: ghost, or per-sample gradients by
    # each exact method (two input channels: not correlate, not pointwise)
    candidates = {"seq": {"ghost", "materialize"}, "conv": {"ghost", "groups", "unfold"}}
    for name, rows in report.items():
        assert len(rows) == 1  # one input shape each (the batch size is not part of the key)
        row = rows[0]
        assert set(row["ms"]) == candidates[name] and row["method"] == min(row["ms"], key=row["ms"].get)
        assert row["model"] in row["ms"]
    assert len(timed) == (2 + 3) * 3  # the layers' 2 and 3 candidates x best of 3, on the first batch only
    for name in report:  # the candidates in turn, three rounds (none timed cold three times over)
        order = [m for n, m in timed if n == name]
        assert order == order[:len(candidates[name])] * 3 and set(order) == candidates[name]


def test_make_private_bk_methods_option():
    model = Mixed()
    ds = torch.utils.data.TensorDataset(*_mixed_batch(8, torch.Generator().manual_seed(1)), torch.zeros(8).long())
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    with pytest.raises(ValueError, match="bk_methods must be 'model' or 'measure'"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                          bk_methods="fastest")
    dp, opt, _ = fxdp.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, bk_methods="measure", example_inputs=_mixed_batch(2, torch.Generator()))
    assert dp.bookkeeping.measure


_KEEP_CASES = [  # (op, input shape, weight shape, kwargs)
    (F.linear, (4, 6), (5, 6), {}),  # T = 1: rank-one norm, nothing kept
    (F.linear, (4, 7, 6), (5, 6), {}),  # materialized and kept
    (F.linear, (4, 2, 64), (64, 64), {}),  # ghost
    (F.linear, (4, 40, 3), (300, 3), {}),  # materialized, smaller than its record: kept
    (F.conv2d, (3, 2, 5, 5), (3, 2, 3, 3), dict(padding=1)),  # materialized and kept
    (F.conv2d, (3, 8, 5, 5), (8, 8, 3, 3), dict(padding=1)),  # kept, 1.44x its record: formed at the pass's end
    (F.conv2d, (3, 256, 4, 4), (10, 256, 3, 3), dict(padding=1)),  # materialized, over 2x its record: not kept
    (F.conv2d, (3, 8, 1, 1), (8, 8, 3, 3), dict(padding=1)),  # one position: ghost (rank one)
    (F.conv2d, (3, 4, 6, 6), (4, 1, 5, 5), dict(padding=2, groups=4)),  # depthwise by correlation
    (torch.ops.aten.addmm.default, (4, 6), (6, 5), {}),  # GPT-2's Conv1D: as linear on [B, d]
]


def _keep_case(case):
    """The rule, bound arguments and an output gradient of ``_KEEP_CASES[case]``."""
    from fxdp.rules import rule_for_op

    op, xs, ws, kw = _KEEP_CASES[case]
    torch.manual_seed(case)
    rule = rule_for_op(op)
    addmm = op is torch.ops.aten.addmm.default
    x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[1] if addmm else ws[0])
    args = rule.bind((b, x, w) if addmm else (x, w, b), kw)
    return rule, args, torch.randn_like(rule.forward(op, args))


@pytest.mark.parametrize("case", range(len(_KEEP_CASES)))
def test_bk_plan_reports_what_is_kept(case):
    """fxdp.check's book-keeping plan says a layer's per-sample gradients are kept for the
    clipped sum exactly when book-keeping keeps them, and (convolutions) whether they are
    formed as the record arrives or at the end of the backward pass."""
    rule, args, g = _keep_case(case)
    name = "mat2" if "mat2" in rule.param_args else "weight"  # the weight (addmm: GPT-2's Conv1D)
    needs = frozenset({name})
    plan = rule.bk_plan(args, g, needs)[name]
    _, kept = rule.norm_sample_sq_keep(args, g, needs)
    assert ("kept for the clipped sum" in plan) == (name in kept), plan
    if "formed" in plan:
        assert ("end of the backward pass" in plan) == (not rule.bk_keeps(args, g, needs)) == (case == 5), plan


def test_linear_cost_model():
    """Ghost norms where they beat materializing: against a second weight-gradient pass
    when materialized gradients are larger than the record (not kept), against a few
    passes over them when kept (BERT's MLP at T = 128 materializes)."""
    from fxdp.rules.linear import LinearRule

    rule = LinearRule()
    assert not rule.use_ghost(1, 512, 512)  # rank one
    assert rule.use_ghost(4, 512, 512) and not rule.keeps(4, 512, 512)  # short and wide
    assert rule.use_ghost(65, 128, 512) and not rule.keeps(65, 128, 512)  # ViT's MLP: [p, d] > T (d + p)
    assert not rule.use_ghost(128, 128, 512) and rule.keeps(128, 128, 512)  # BERT's MLP at T = 128
    assert not rule.use_ghost(128, 128, 128)  # BERT's attention projections
    assert rule.use_ghost(4, 8, 8) and rule.keeps(4, 8, 8)  # would be kept, but T² (d + p) is small


@pytest.mark.parametrize("T, d, p", [(65, 128, 512), (65, 128, 128), (64, 128, 128), (128, 128, 512), (3, 16, 16),
                                     (2, 8, 8), (40, 96, 300)])
def test_linear_keeps_at_most_the_record(T, d, p):
    """Book-keeping holds at most what the clipped sum needs: a linear layer's kept
    per-sample gradients are never larger than the record (activations and output
    gradients) they replace, whichever norm method ran."""
    from fxdp.rules.linear import LinearRule

    rule = LinearRule()
    torch.manual_seed(T)
    a, g = torch.randn(3, T, d), torch.randn(3, T, p)
    args = {"input": a, "weight": torch.randn(p, d), "bias": None}
    for method in (None, "materialize", "ghost"):
        _, kept = rule.norm_sample_sq_keep(args, g, frozenset({"weight"}), method)
        if "weight" in kept:
            assert kept["weight"].numel() <= a.numel() + g.numel()
        assert ("weight" in kept) == (method != "ghost" and (method == "materialize" or not rule.use_ghost(T, d, p))
                                      and p * d <= T * (d + p))


@pytest.mark.parametrize("case", range(len(_KEEP_CASES)))
def test_bk_keeps_predicts_what_the_norms_keep(case):
    """Book-keeping releases a record as it arrives only where the rule says its norms keep
    every per-sample gradient; the prediction must match what the norms then keep (but for
    kept gradients larger than the record, case 5, formed and the record released at the end
    of the backward pass)."""
    rule, args, g = _keep_case(case)
    for needs in (frozenset(rule.param_args), frozenset(rule.param_args[:1])):
        _, kept = rule.norm_sample_sq_keep(args, g, needs)
        every = set(kept) == set(needs)
        assert rule.bk_keeps(args, g, needs) == (every and case != 5), (needs, set(kept))
        assert every or case != 5


def test_an_error_in_a_per_record_norm_abandons_the_pass_cleanly(monkeypatch):
    """A norm that raises while its record arrives surfaces in backward(), and the next
    backward pass starts clean (its records are closed and clipped as usual)."""
    from fxdp.rules.conv import ConvNdRule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    dpm = privatize(model)
    dpb = privatize(copy.deepcopy(model), grad_sample_mode="bk")
    expected = clipped_sums_materialized(dpm, x, torch.ones(4, 2, dtype=torch.float64), 0.3, False)
    dpb.bookkeeping.attached = True
    real = ConvNdRule.norm_sample_sq_keep

    def failing(self, *a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(ConvNdRule, "norm_sample_sq_keep", failing)
    with pytest.raises(RuntimeError, match="injected"):
        dpb(x).sum().div(4).backward()
    assert dpb.bookkeeping.records == [] and dpb.bookkeeping.pending == []
    monkeypatch.setattr(ConvNdRule, "norm_sample_sq_keep", real)
    sums = bk_clipped_sums(dpb, lambda: dpb(x).sum().div(4).backward(), 0.3)
    for p, e in zip([p for p in dpb.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)


def _tied_bk(**kw):
    torch.manual_seed(4)
    dp = privatize(TiedLM().double(), grad_sample_mode="bk")
    kw = {"max_grad_norm": 0.3, "generator": torch.Generator().manual_seed(9), **kw}
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=0.8, expected_batch_size=5, **kw)
    opt.attach_bookkeeping(dp.bookkeeping)
    return dp, opt


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_noise_first_step_equals_add_noise_then_scale(passes, clipping, monkeypatch):
    """A book-keeping step draws N(0, (sigma C / n)^2) first and adds each layer's sum
    scaled by 1/n into it: the gradients of add_noise + scale_grad (same generator seed),
    with tied parameters and accumulated backward passes; p.summed_grad is not set."""
    grads = {}
    for first in (True, False):
        dp, opt = _tied_bk(**({"clipping": "per_layer", "max_grad_norm": [0.2] * 4} if clipping == "per_layer" else {}))
        if not first:
            monkeypatch.setattr(opt, "_noise_first", lambda: False)
        data = torch.Generator().manual_seed(2)
        for _ in range(passes):
            F.cross_entropy(dp(torch.randn(5, 11, generator=data, dtype=torch.float64)),
                            torch.randint(0, 11, (5,), generator=data)).backward()
        assert opt._noise_first() is first
        opt.step()
        grads[first] = [p.grad.clone() for p in dp.parameters()]
        assert all((p.summed_grad is None) is first for p in dp.parameters())
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_released_noise_is_drawn_layer_by_layer_as_records_are_freed(monkeypatch):
    """With the noise buffer released (``flat_noise.keep = False``) a book-keeping step
    draws each layer's slice of the noise as it adds that layer's sums (in the order of
    the parameters), into pieces allocated as it goes, and frees each record once its sums
    are formed, so each piece can take memory a record gave back. The step is the same as with the
    buffer kept (one draw); ``held_bytes`` is what the records held at the draw."""
    from fxdp.optim.noise import SliceDraw

    import fxdp.bookkeeping as bk

    grads, reads = {}, []
    for keep in (True, False):
        dp, opt = _tied_bk()
        opt.flat_noise.keep = keep
        seen = []
        real = bk.BookKeeping._clipped_sums

        def spy(ps, params, position, scaled, ok, out=None):
            seen.append((ps.records, out, dp.bookkeeping.held_bytes()))
            return real(ps, params, position, scaled, ok, out)

        monkeypatch.setattr(bk.BookKeeping, "_clipped_sums", staticmethod(spy))
        data = torch.Generator().manual_seed(2)
        for _ in range(2):  # two accumulated passes
            F.cross_entropy(dp(torch.randn(5, 11, generator=data, dtype=torch.float64)),
                            torch.randint(0, 11, (5,), generator=data)).backward()
        records = [r for ps in dp.bookkeeping.pending for r in ps.records]
        expected = sum(t.untyped_storage().nbytes() for t in {
            t.untyped_storage().data_ptr(): t for r in records
            for t in [x for i, x in enumerate(r.inputs) if i not in r.params and torch.is_tensor(x)]
            + [g for g in r.grads if g is not None] + list(r.kept.values())}.values())
        opt.step()
        assert seen[0][2] == expected > 0 and dp.bookkeeping.held_bytes() == 0  # while clipping only
        assert all(r.inputs == [] and r.grads == [] and not r.kept for r in records)  # freed
        assert all(isinstance(out, SliceDraw) is (not keep) for _, out, _ in seen)
        if not keep:
            reads = [out._drawn for _, out, _ in seen]
        grads[keep] = [p.grad.clone() for p in dp.parameters()]
        monkeypatch.undo()
    assert reads and all(n == seen[0][1]._numel for n in reads)  # drawn whole by the step's end
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)


def test_noise_first_only_where_the_plain_step_is_equivalent():
    dp, opt = _tied_bk()
    F.cross_entropy(dp(torch.randn(5, 11, dtype=torch.float64)), torch.randint(0, 11, (5,))).backward()
    assert opt._noise_first()
    opt.signal_skip_step(True)  # a virtual step accumulates p.summed_grad: noise comes later
    assert not opt._noise_first()
    opt.step()
    assert all(p.summed_grad is not None for p in dp.parameters())
    F.cross_entropy(dp(torch.randn(5, 11, dtype=torch.float64)), torch.randint(0, 11, (5,))).backward()
    assert not opt._noise_first()  # something accumulated
    opt.step()
    opt.zero_grad()
    _, secure_opt = _tied_bk(secure_mode=True, generator=None)
    assert not secure_opt._noise_first()  # CSPRNG noise and snapped sums per parameter
    ada = fxdp.optim.AdaClipDPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=0.8,
                                        max_grad_norm=0.3, expected_batch_size=5, target_unclipped_quantile=0.5,
                                        clipbound_learning_rate=0.2, max_clipbound=1.0, min_clipbound=0.01,
                                        unclipped_num_std=1.0)
    ada.attach_bookkeeping(dp.bookkeeping)
    F.cross_entropy(dp(torch.randn(5, 11, dtype=torch.float64)), torch.randint(0, 11, (5,))).backward()
    assert not ada._noise_first()  # its own add_noise (the noisy clip count)


def test_noise_first_draws_nothing_before_a_non_finite_gradient_raises():
    dp, opt = _tied_bk()
    x = torch.randn(5, 11, dtype=torch.float64)
    x[3, 0] = float("inf")
    F.cross_entropy(dp(x), torch.randint(0, 11, (5,))).backward()
    state = opt.generator.get_state()
    before = [p.detach().clone() for p in dp.parameters()]
    with pytest.raises(FloatingPointError, match="sample index 3"):
        opt.step()
    assert torch.equal(opt.generator.get_state(), state)
    assert all(torch.equal(a, p) for a, p in zip(before, dp.parameters()))


def test_each_record_is_prepared_once_per_step(monkeypatch):
    """Book-keeping reads a record's batch-first arguments for its keep test, its norms,
    and its clipped sum: they are formed once per record, and dropped with the record's
    activations when it keeps its per-sample gradients."""
    import fxdp.capture.rule as capture_rule

    calls = []
    prepare = capture_rule.RuleCapture._prepare
    monkeypatch.setattr(capture_rule.RuleCapture, "_prepare", lambda self, rec: calls.append(rec) or prepare(self, rec))
    torch.manual_seed(0)
    dp = privatize(ConvNet(), grad_sample_mode="bk")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    opt.attach_bookkeeping(dp.bookkeeping)
    x, y = torch.randn(4, 2, 7, 7), torch.randint(0, 3, (4,))
    F.cross_entropy(dp(x), y).backward()
    records = dp.bookkeeping.pending[0].records
    assert len(calls) == len(records) and {id(r) for r in calls} == {id(r) for r in records}
    assert all(r.memo == {} for r in records if r.released) and any(r.released for r in records)
    opt.step()
    assert len(calls) == len(records)


class _DropNet(nn.Module):
    """An embedding tied to its head, a LayerNorm (its forward's saved statistics) and a
    convolution over the sequence; ``s`` scales each sample (a NaN scale: a non-finite sample)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 32, padding_idx=0)  # 32 wide: the head takes ghost norms (sums from a, g)
        self.ln = nn.LayerNorm(32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 13, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, s):
        h = self.ln(self.emb(ids) * s[:, None, None])
        return self.head(torch.tanh(self.conv(h.transpose(1, 2)).transpose(1, 2)))


@pytest.mark.parametrize("masked_sum_finite", [True, False])
def test_dropped_samples_are_left_out_without_per_sample_gradients(masked_sum_finite, monkeypatch):
    """nonfinite="drop": each record's clipped sum is formed on copies with the dropped
    sample's rows zeroed (saved statistics and scratch recomputed), equal to clipping the
    other samples alone, and no per-sample gradient is formed; where such a sum is still not
    finite, that record's per-sample gradients are materialized and their rows zeroed."""
    from fxdp import bookkeeping
    from fxdp.capture.rule import RuleCapture
    from fxdp.optim.clip import Clipping
    from fxdp.rules.linear import LinearRule

    formed = []
    real = bookkeeping._per_sample_grads
    monkeypatch.setattr(bookkeeping, "_per_sample_grads", lambda r: formed.append(r) or real(r))
    if not masked_sum_finite:  # the linear rule's sums on the zeroed copies come out NaN
        dropping = RuleCapture.clipped_sum_dropping

        def nan_linear(self, rec, factors, ok):
            with pytest.MonkeyPatch.context() as mp:
                if isinstance(self.rule, LinearRule):
                    mp.setattr(LinearRule, "clipped_sum", lambda *a, **k: {"weight": torch.tensor(float("nan"))})
                return dropping(self, rec, factors, ok)

        monkeypatch.setattr(RuleCapture, "clipped_sum_dropping", nan_linear)
    torch.manual_seed(0)
    model = _DropNet().double()
    g = torch.Generator().manual_seed(7)
    ids, s = torch.randint(0, 13, (5, 6), generator=g), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    ids[1, :2] = 0
    s[2] = float("nan")
    keep = torch.tensor([0, 1, 3, 4])
    w = torch.randn(5, 6, 13, generator=g, dtype=torch.float64)
    ref = privatize(copy.deepcopy(model), loss_reduction="sum")
    (ref(ids[keep], s[keep]) * w[keep]).sum().backward()
    gs = [p.grad_sample for p in ref.parameters() if p.requires_grad]
    norms = torch.stack([q.flatten(1).norm(dim=1) for q in gs], 1).norm(dim=1)
    C = float(norms.median())
    factors = (C / (norms + 1e-6)).clamp(max=1)
    dp = privatize(copy.deepcopy(model), grad_sample_mode="bk", loss_reduction="sum")
    dp.bookkeeping.attached = True
    (dp(ids, s) * w).sum().backward()
    params = [p for p in dp.parameters() if p.requires_grad]
    with pytest.warns(RuntimeWarning, match=r"sample indices \[2\]"):
        sums = dp.bookkeeping.clip_and_sum(params, Clipping(bound=C, nonfinite="drop")).sums
    for got, q in zip(sums, gs):
        torch.testing.assert_close(got, torch.einsum("b,b...->...", factors, q), rtol=1e-9, atol=1e-12)
    assert [r.op.rule_name() for r in formed] == ([] if masked_sum_finite else ["linear"])


class ReluChain(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear on [B, T, d] (T = 5: ghost norms, formed at the
    pass's end), then a conv -> ReLU -> conv pair: each earlier layer's output gradient is the next
    layer's input gradient through a ReLU (``fxdp.passes.relu_grads``)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 12)
        self.c1, self.c2 = nn.Conv2d(12, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):  # [B, 5, 8]
        h = self.l3(F.relu(self.l2(F.relu(self.l1(x)))))  # [B, 5, 12]
        img = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 5)  # [B, 12, 5, 5]
        return self.c2(F.relu(self.c1(img))).mean((2, 3))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_output_gradients_formed_again_through_a_relu_give_the_same_clipped_sums(capture, monkeypatch):
    """Where a layer's output reaches the next captured layer only through a ReLU, book-keeping drops
    its output gradient as its record arrives (the backward pass goes on without it) and forms it
    again from the next layer's record when the pass ends: ``threshold_backward(dL/dx, x, 0)``. The
    clipped sums equal the materialized ones (float64), a chain included (l1's from l2's record,
    itself formed again from l3's), and equal book-keeping's without the recomputation."""
    from fxdp.bookkeeping import BookKeeping

    monkeypatch.setattr(BookKeeping, "recompute_min_bytes", 0)
    torch.manual_seed(0)
    model = ReluChain()
    x = torch.randn(6, 5, 8)
    dpm = privatize(model)
    w = torch.randn_like(dpm(x))
    expected = clipped_sums_materialized(dpm, x, w, 0.3, False)
    held = []  # at the first layer's input gradient: which records hold their output gradient (or a view)

    def run(dpb):
        def go():
            xx = x.clone().requires_grad_(True)
            xx.register_hook(lambda g: held.append({r.op.module_path: (r.grads[0] is not None or "prepared" in r.memo,
                                                                       r.grad_source is not None)
                                                    for r in dpb.bookkeeping.records}))
            dpb(xx).mul(w).sum().div(x.shape[0]).backward()
        return go

    sums = {}
    for on in (True, False):
        monkeypatch.setattr(BookKeeping, "recompute_relu_grads", on)
        dpb = privatize(copy.deepcopy(model), grad_sample_mode="bk", capture=capture)
        got = bk_clipped_sums(dpb, run(dpb), 0.3)
        sums[on] = [got[id(p)] for p in dpb.parameters() if p.requires_grad]
        for s, e in zip(sums[on], expected):
            torch.testing.assert_close(s, e, rtol=1e-9, atol=1e-12)
    for a, b in zip(sums[True], sums[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    dropped = {k for k, (has, _) in held[0].items() if not has}
    assert dropped == {"l1", "l2", "c1"}, held[0]  # each formed again at the pass's end
    assert all(src for k, (_, src) in held[0].items() if k in dropped)
    assert all(has for k, (has, _) in held[1].items())  # without: every output gradient held


def test_output_gradients_through_a_relu_stay_exact_when_training():
    """The same DP-SGD steps (noise, per-layer clipping, two forwards in one backward pass, whose
    records pair by forward, and two backward passes in one step) with and without the
    recomputation, and against materialize mode."""
    from fxdp.bookkeeping import BookKeeping

    torch.manual_seed(1)
    model = ReluChain()
    runs = []
    for mode, on in (("materialize", False), ("bk", True), ("bk", False)):
        dp = privatize(copy.deepcopy(model), grad_sample_mode=mode)
        n = len(list(dp.parameters()))
        opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=0.7, max_grad_norm=[0.2] * n,
                          expected_batch_size=4, generator=torch.Generator().manual_seed(7), clipping="per_layer")
        if mode == "bk":
            opt.attach_bookkeeping(dp.bookkeeping)
            dp.bookkeeping.recompute_relu_grads, dp.bookkeeping.recompute_min_bytes = on, 0
        data = torch.Generator().manual_seed(3)
        for step in range(3):
            opt.zero_grad()
            x1, x2 = torch.randn(4, 5, 8, generator=data), torch.randn(4, 5, 8, generator=data)
            if step == 1:
                (dp(x1).pow(2).sum() + dp(x2).sum()).div(8).backward()
            elif step == 2:  # two backward passes in one step: each forms its own gradients again
                dp(x1).pow(2).mean().backward()
                dp(x2).sum(1).mean().backward()
            else:
                dp(x1).pow(2).mean().backward()
            opt.step()
        runs.append([p.detach().clone() for p in dp.parameters()])
    assert BookKeeping.recompute_relu_grads is True  # an instance's switch, not the class's
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_output_gradients_small_beside_the_parameters_are_held(monkeypatch):
    """A gradient under ``recompute_min_param_fraction`` of the trainable parameters' bytes (known
    from the last step) is held, not formed again: parameter-sized buffers set the step's peak there."""
    from fxdp.bookkeeping import BookKeeping

    monkeypatch.setattr(BookKeeping, "recompute_min_bytes", 0)
    deferred, restore = [], BookKeeping._restore_grads
    monkeypatch.setattr(BookKeeping, "_restore_grads", staticmethod(
        lambda records: deferred.append(sorted(r.op.module_path for r in records if r.grad_source)) or restore(records)))
    torch.manual_seed(2)
    dp = privatize(ReluChain(), grad_sample_mode="bk")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.5,
                      expected_batch_size=4)
    opt.attach_bookkeeping(dp.bookkeeping)
    x = torch.randn(4, 5, 8)
    param_bytes = sum(p.numel() * p.element_size() for p in dp.parameters())
    g_bytes = {"l1": 4 * 5 * 16 * 8, "l2": 4 * 5 * 16 * 8, "c1": 4 * 16 * 5 * 5 * 8}
    assert g_bytes["l1"] < param_bytes / 8 < g_bytes["c1"]
    for _ in range(2):
        opt.zero_grad()
        dp(x).pow(2).mean().backward()
        opt.step()
    assert deferred == [["c1", "l1", "l2"], ["c1"]]  # the first pass, before any step knew the parameters


@pytest.mark.parametrize("mode", ["bk", "materialize"])
def test_bfloat16_clip_factors_stay_within_the_bound(mode, monkeypatch):
    """A bfloat16 model's clipped sums are formed in float32 (``sum_dtype``), so its clip
    factors are applied in float32, not rounded to bfloat16 (to nearest, a factor was up to
    0.4% above ``C / ||g_i||``, and that sample's clipped gradient exceeded the bound the
    noise is calibrated to). Every sample here is clipped (T = 17: ghost norms in
    book-keeping); the factors the clipped sums apply are compared with ``C / (||g_i|| +
    1e-6)`` of the same bfloat16 gradients in float64."""
    import fxdp.optim.clip as clip
    from fxdp.rules.linear import LinearRule

    torch.manual_seed(17)
    model = nn.Linear(96, 80, bias=False).bfloat16()
    x, r = torch.randn(16, 17, 96).bfloat16(), torch.randn(16, 17, 80).bfloat16()
    C = 1e-3
    applied = []
    if mode == "bk":
        real = LinearRule.clipped_sum

        def spy(self, args, grad_output, factors, needs, into=None):
            applied.append(factors)
            return real(self, args, grad_output, factors, needs, into)

        monkeypatch.setattr(LinearRule, "clipped_sum", spy)
    else:
        real_einsum = clip.torch.einsum

        def spy(eq, f, g):
            applied.append(f)
            return real_einsum(eq, f, g)

        monkeypatch.setattr(clip.torch, "einsum", spy)
    dp = privatize(model, grad_sample_mode=mode, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=16, loss_reduction="sum")
    if mode == "bk":
        opt.attach_bookkeeping(dp.bookkeeping)
    (dp(x) * r).sum().backward()
    opt.step()
    monkeypatch.undo()
    if mode == "bk":  # each sample's gradient from the record's values (exact in float32)
        norms = torch.einsum("btp,btd->bpd", r.double(), x.double()).flatten(1).norm(dim=1)
    else:  # the per-sample gradients summed: the rule's bfloat16 ones
        norms = model.weight.grad_sample.double().flatten(1).norm(dim=1)
    want = C / (norms + 1e-6)
    (f,) = applied
    assert f.dtype == torch.float32 and f.shape == (16,)
    assert bool((f.double() <= want * (1 + 1e-5)).all()), (f.double() / want).max()
    assert bool((f.double() >= want * (1 - 2 ** -7)).all())


class _TiedBF16LM(nn.Module):
    """A token embedding, an MLP on 17 positions (ghost norms) and a head tied to the
    embedding (the tied cross terms), for a bfloat16 end-to-end check."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.up, self.down = nn.Linear(32, 96), nn.Linear(96, 32)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.down(F.gelu(self.up(h)))
        return F.linear(h, self.emb.weight)


def test_bfloat16_book_keeping_norms_equal_the_materialized_ones():
    """End to end in bfloat16: the per-sample norms book-keeping clips by (ghost norms,
    repeated tokens, a tied head's cross terms) equal those of the same model's
    materialized per-sample gradients to 1e-4 (with norms formed in bfloat16 they were
    7e-4 apart here)."""
    torch.manual_seed(36)
    base = _TiedBF16LM().bfloat16()
    idx = torch.randint(0, 50, (6, 17))
    y = torch.randint(0, 50, (6, 17))
    norms = {}
    for mode in ("bk", "materialize"):
        dp = privatize(copy.deepcopy(base), grad_sample_mode=mode, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1e-3,
                          expected_batch_size=6, loss_reduction="sum")
        if mode == "bk":
            opt.attach_bookkeeping(dp.bookkeeping)
        F.cross_entropy(dp(idx).float().flatten(0, 1), y.flatten(), reduction="sum").backward()
        opt.step()
        norms[mode] = opt._last_clip[0].double()
    torch.testing.assert_close(norms["bk"], norms["materialize"], rtol=1e-4, atol=0)


def _bf16_sums(mode: str, x: torch.Tensor, r: torch.Tensor, C: float) -> torch.Tensor:
    """``p.summed_grad`` of a bfloat16 ``Linear`` whose per-sample gradients are ``r_i^T x_i``
    (loss ``sum(out * r)``, no noise), clipped to ``C`` in ``mode``."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[-1], r.shape[-1], bias=False).bfloat16()
    dp = fxdp.privatize(model, grad_sample_mode=mode, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=x.shape[0], loss_reduction="sum")
    if mode == "bk":
        opt.attach_bookkeeping(dp.bookkeeping)
    (dp(x) * r).sum().backward()
    opt.clip_and_accumulate()
    return model.weight.summed_grad


@pytest.mark.parametrize("mode", ["bk", "materialize"])
@pytest.mark.parametrize("T", [1, 17])
def test_bfloat16_clipped_sum_is_float32_and_exact(mode, T):
    """A bfloat16 model's clipped sum is formed in float32 (``sum_dtype``) from the values its
    norms read: equal to ``sum_i c_i r_i^T x_i`` in float64 to float32 accuracy (book-keeping: of
    the record's exact bfloat16 values; materialize: of the rule's bfloat16 per-sample gradients).
    Rounded to bfloat16 before the noise, as it was, it is off by ~2^-9 of itself."""
    g = torch.Generator().manual_seed(T)
    shape = (64, 48) if T == 1 else (64, T, 48)
    common = torch.randn(shape[1:], generator=g)  # aligned samples: a sum far larger than C
    x = (common + 0.3 * torch.randn(shape, generator=g)).bfloat16()
    r = (torch.randn(shape[:-1] + (40,), generator=g) * 0.1 + 1.0).bfloat16()
    C = 1e-2
    got = _bf16_sums(mode, x, r, C)
    assert got.dtype == torch.float32
    eq = "bp,bd->bpd" if T == 1 else "btp,btd->bpd"
    ps = torch.einsum(eq, r.double(), x.double())
    if mode == "materialize":  # the rule's per-sample gradients, rounded to bfloat16 once
        ps = torch.einsum(eq, r, x).double() if T == 1 else torch.bmm(r.transpose(1, 2), x).double()
    c = (C / (ps.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1)
    want = torch.einsum("b,bpd->pd", c, ps)
    assert (got.double() - want).norm() <= 1e-5 * want.norm(), ((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("mode", ["bk", "materialize"])
def test_bfloat16_neighbouring_batches_clipped_sums_differ_by_at_most_C(mode):
    """The sensitivity the noise is calibrated to: the clipped sums of two batches that differ
    in one sample lie at most ``C`` apart. With 1024 aligned samples a bfloat16 sum is ~1000 C
    long, and rounded to bfloat16 (half an ulp per coordinate, data-dependent) the two sums lay
    2.24 C (book-keeping) and 2.28 C (materialized) apart here; formed in float32 they lie C
    apart to ~1e-7 of the sum."""
    g = torch.Generator().manual_seed(11)
    B, d, p = 1024, 64, 64
    x = (torch.randn(d, generator=g) + 0.2 * torch.randn(B, d, generator=g)).bfloat16()
    r = (torch.randn(p, generator=g) + 0.2 * torch.randn(B, p, generator=g)).bfloat16()
    C = 1.0
    both = _bf16_sums(mode, x, r, C).double()
    without = _bf16_sums(mode, x[1:], r[1:], C).double()
    assert both.norm() > 900 * C  # the regime where half-precision rounding of the sum is coarse
    assert (both - without).norm() <= C * (1 + 1e-3), (both - without).norm()


def test_half_precision_record_is_widened_once_per_use():
    """``LayerRecord.widened``: a bfloat16 record's float32 copy shares what its norms leave
    for its sum (``kept``, ``sq``, the scratch) and forms its own batch-first arguments; a
    float32 record, and one whose op checks its outputs, is used as it is."""
    from fxdp.capture.record import LayerRecord

    class Op:
        checks_outputs = False

    x, gr, w = torch.randn(4, 3).bfloat16(), torch.randn(4, 2).bfloat16(), torch.randn(2, 3).bfloat16()
    rec = LayerRecord(op=Op(), inputs=[x, w], grads=[gr], params={1: nn.Parameter(w.float())}, batch_size=4,
                      generation=1, batch_dims=((0, None), (0,)), memo={"prepared": "bf16 args"})
    wide = rec.widened()
    assert wide is not rec and rec.half and not wide.half
    assert [t.dtype for t in wide.inputs + wide.grads] == [torch.float32] * 3
    assert torch.equal(wide.inputs[0], x.float()) and torch.equal(wide.grads[0], gr.float())
    assert wide.kept is rec.kept and wide.sq is rec.sq and wide.memo["scratch"] is rec.memo["scratch"]
    assert "prepared" not in wide.memo and rec.memo["prepared"] == "bf16 args"
    assert wide.widened() is wide
    f32 = LayerRecord(op=Op(), inputs=[x.float()], grads=[gr.float()], params={}, batch_size=4, generation=1,
                      batch_dims=((0,), (0,)))
    assert f32.widened() is f32
    Op.checks_outputs = True
    assert LayerRecord(op=Op(), inputs=[x], grads=[gr], params={}, batch_size=4, generation=1,
                       batch_dims=((0,), (0,))).widened().inputs[0] is x
