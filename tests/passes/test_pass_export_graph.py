"""The torch.export front end (``fxdp/passes/export_graph.py``, batch dimensions from
symbolic shapes in ``fxdp/passes/symbolic_batch.py``) on models symbolic tracing
cannot read: exact where it captures, and fail closed where samples could influence
each other."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxdp
from fxdp.exported_module import ExportedDPModule
from oracle import assert_grad_samples_match, batch_of_one_grads, bk_clipped_sums, clipped_sums_materialized


def _per_sample_ok(model, x, **call):
    """privatize on the export path; grad_sample == each sample alone (float64, rtol 1e-6)."""
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    assert isinstance(dp, ExportedDPModule)
    dp(x, **call).pow(2).sum().backward()
    assert not [c for c in dp.captures if c.kind == "functorch"], dp.capture_table()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))
    return dp


class KwargsAndOptional(nn.Module):
    """Optional argument, **kwargs, a tensor made in forward, a keyword call of a
    submodule, a learned position table sliced to the length and a forward hook."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 4))
        self.head = nn.Linear(4, 2)
        self.head.register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x, hidden=None, **kwargs):
        scale = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=x.dtype)
        h = self.l(input=x) * scale + self.pos[:, : x.shape[1]]
        if hidden is not None:
            h = h + hidden
        return self.head(torch.tanh(h))


def test_real_python_forward_is_captured_and_exact(f64):
    torch.manual_seed(0)
    dp = _per_sample_ok(KwargsAndOptional().double(), torch.randn(5, 6, 4))
    # the hook ran in the DP model too (outputs equal the model's)
    x = torch.randn(3, 6, 4)
    torch.testing.assert_close(dp(x), dp._source_root(x))


def test_batch_of_one_and_empty_batches_run_on_the_same_graph(f64):
    torch.manual_seed(1)
    model = KwargsAndOptional().double()
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    for B in (4, 1, 0, 3):
        dp.zero_grad()
        dp(torch.randn(B, 5 + B, 4)).sum().backward()
        assert model.l.weight.grad_sample.shape == (B, 4, 4)
    assert len(dp.graphs) == 1  # one symbolic graph for every batch size and length


class BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, **kw):
        return self.l(x) if x.mean() > 0 else -self.l(x)


class BranchOnBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, **kw):
        return self.l(x) * (2.0 if x.shape[0] > 4 else 1.0)


class CenterOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, **kw):
        return self.l(x - x.mean(0))


class ShiftBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, **kw):
        return self.l(torch.roll(x, 1, 0))


class SeqFirstView(nn.Module):
    """The classic layout bug: a [T, B, d] tensor read as [B, T, d] (no transpose back)."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, **kw):
        h = self.l(x.transpose(0, 1))  # [T, B, d]
        return self.head(h.reshape(x.shape))


class FoldOrders(nn.Module):
    """Adds a batch-major fold [B*k, d] to a batch-minor one [k*B, d]: row r holds two samples."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x, **kw):
        B, k, d = x.shape
        return self.l((x.reshape(B * k, d) + x.transpose(0, 1).reshape(k * B, d)).reshape(B, k, d))


class UnfoldWrongOrder(nn.Module):
    """Folds [k, B, d] into [k*B, d] and unfolds it as [B, k, d]."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x, **kw):
        B, k, d = x.shape
        return self.l(x.transpose(0, 1).reshape(k * B, d).reshape(B, k, d))


@pytest.mark.parametrize("model, match, shape", [
    (BranchOnData, r"branches on tensor values .*\(at .*test_pass_export_graph.py:\d+: return self.l\(x\) if", (6, 4)),
    (BranchOnBatchSize, "depends on the batch size", (6, 4)),
    (CenterOverBatch, "batch-reduction", (6, 4)),
    (ShiftBatch, "along the batch dimension", (6, 4)),
    (SeqFirstView, "aten.reshape.default, at .*batch-fold: this reshape moves elements of one sample", (6, 5, 4)),
    (FoldOrders, "aten.add.Tensor, at .*batch-fold: this op combines two tensors", (6, 5, 4)),
    (UnfoldWrongOrder, "batch-fold: this reshape unfolds a folded batch whose order is not known|batch-fold: "
                       "this reshape moves", (6, 5, 4)),
])
def test_samples_mixing_is_refused_with_its_location(model, match, shape):
    """On the export path, where samples can influence each other, the DP model
    refuses at capture (the first call), naming the op. The last three were served
    with wrong per-sample gradients before reshapes were followed element by element."""
    torch.manual_seed(2)
    dp = fxdp.privatize(model(), capture="export")
    with pytest.raises(fxdp.FxdpError, match=match):
        dp(torch.randn(*shape))


class LayerDrop(nn.Module):
    """Hugging Face's LayerDrop (wav2vec2, HuBERT, WavLM: on by default, 0.1): a layer
    skipped for the whole batch when one draw is below ``config.layerdrop``."""

    def __init__(self, layerdrop):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.layerdrop = layerdrop

    def forward(self, x):
        skip_the_layer = False
        if self.training and self.layerdrop > 0.0:
            dropout_probability = torch.rand([])
            skip_the_layer = dropout_probability < self.layerdrop
        if not skip_the_layer:
            x = x + self.l(x)
        return x


def test_layerdrop_is_refused_with_the_layerdrop_fix(f64):
    """A branch on a random draw is no sample's data, but torch.export cannot capture a
    Python branch on a tensor: the error names the line and the fix (layerdrop = 0)."""
    with pytest.raises(fxdp.UnsupportedModelError,
                       match=r"(?s)branches on a random number \(at .*test_pass_export_graph.py:\d+: if not skip_the_"
                             r"layer:\).*layerdrop = 0.0"):
        fxdp.privatize(LayerDrop(0.1), capture="export")(torch.randn(5, 4))
    _per_sample_ok(LayerDrop(0.0).double(), torch.randn(5, 4))


@pytest.mark.parametrize("seed", [0, 1])
def test_layerdrop_is_not_decided_once_at_tracing(seed):
    """Symbolic tracing runs ``torch.rand([])`` once and follows one branch: before, the default
    capture served LayerDrop with that outcome for every step (the layer always kept, or
    always skipped and never trained), silently. A draw while tracing now sends capture="auto"
    to torch.export, which refuses the branch with its fix."""
    torch.manual_seed(seed)
    with pytest.raises(fxdp.UnsupportedModelError, match="layerdrop = 0.0"):
        fxdp.privatize(LayerDrop(0.5))(torch.randn(5, 4))


def test_check_reports_a_scattering_reshape_with_its_fix():
    """fxdp.check reads the same graph: the reshape is an error (code batch-fold) with a fix."""
    report = fxdp.check(SeqFirstView(), {"x": torch.randn(6, 5, 4)})
    assert not report.ok
    (f,) = [f for f in report.errors if f.code == "batch-fold"]
    assert "transpose" in f.fix and f.line is not None


def test_folded_batch_linear_is_exact(f64):
    """GPT-2's Conv1D: x.view(-1, d) then addmm with a [d, p] weight."""

    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))
            self.bias = nn.Parameter(torch.randn(3))

        def forward(self, x, **kw):
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return out.view(x.shape[:-1] + (3,))

    torch.manual_seed(3)
    dp = _per_sample_ok(Conv1D().double(), torch.randn(5, 7, 4))
    assert [c.rule_name() for c in dp.captures] == ["addmm"]


def test_windows_and_transposed_folds_are_exact(f64):
    """Folds the batch-major way through views and transposes, and unfolds them back:
    Swin's window partition / reverse ([B, H, W, C] -> [B*nW, ws, ws, C] and back) and
    MobileViT's patches (a fold transposed, unfolded, transposed and folded again, then
    the way back). Every unfold is checked against the fold's layout (it was assumed);
    served exactly."""

    class Windows(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x, **kw):
            B, H, W, C = x.shape
            w = x.view(B, H // 4, 4, W // 4, 4, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, 4, 4, C)
            w = self.l(w)
            return w.view(B, H // 4, W // 4, 4, 4, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)

    class Patches(nn.Module):  # MobileViT's unfolding / folding, a linear layer on the patches
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x, **kw):  # [B, C, H, W], 2x2 patches
            B, C, H, W = x.shape
            p = x.reshape(B * C * (H // 2), 2, W // 2, 2).transpose(1, 2)  # a fold, then a transpose of it
            p = p.reshape(B, C, (H // 2) * (W // 2), 4).transpose(1, 3).reshape(B * 4, (H // 2) * (W // 2), C)
            p = self.l(p)
            f = p.contiguous().view(B, 4, (H // 2) * (W // 2), C).transpose(1, 3)
            f = f.reshape(B * C * (H // 2), W // 2, 2, 2).transpose(1, 2)
            return f.reshape(B, C, H, W)

    torch.manual_seed(5)
    _per_sample_ok(Windows().double(), torch.randn(3, 8, 8, 3))
    _per_sample_ok(Patches().double(), torch.randn(3, 3, 4, 6))


def test_images_keep_their_sizes_and_another_size_is_another_graph(f64):
    """An image's height and width are fixed in its graph (symbolic sizes cost ``torch.export``
    minutes on models that pad to their windows): padded to whole 4x4 windows as Swin does,
    a 16x16 and an 11x13 batch take a graph each, both exact; token ids of another length
    reuse their graph."""
    import torch.nn.functional as F

    class PaddedWindows(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):  # [B, C, H, W]
            B, C, H, W = x.shape
            x = F.pad(x, (0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))
            h, w = x.shape[2] // 4, x.shape[3] // 4
            win = x.view(B, C, h, 4, w, 4).permute(0, 2, 4, 3, 5, 1).reshape(-1, 16, C)
            return self.l(win).view(B, h * w * 16, C).tanh()

    torch.manual_seed(6)
    model = PaddedWindows().double()
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    for k, x in enumerate((torch.randn(3, 3, 16, 16), torch.randn(2, 3, 11, 13), torch.randn(4, 3, 16, 16)), 1):
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        dp(x).pow(2).sum().backward()
        assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))
        assert len(dp.graphs) == min(k, 2)

    emb = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 2)).double()
    dp = fxdp.privatize(emb, loss_reduction="sum", capture="export")
    for T in (5, 9):
        dp(torch.randint(0, 11, (3, T))).sum().backward()
    assert len(dp.graphs) == 1


def test_a_size_undefined_at_a_sample_point_still_matches_the_batch():
    """``_equals_batch`` compares a size with the batch symbol at sample points; a padding
    size such as ``s0 + (s1 - 4) // (s1*(s1 - 4))`` divides by zero at one of them (a crash
    on Swin before): that point is skipped, the others decide."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from fxdp.passes.symbolic_batch import _equals_batch

    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    assert _equals_batch(s0 + FloorDiv(s1 - 4, s1 * (s1 - 4)), s0)
    assert not _equals_batch(s0 + FloorDiv(s1 - 4, s1 * (s1 - 4)) + 1, s0)


def test_a_reduction_within_each_folded_row_keeps_the_fold_order(f64):
    """Swin-v2's cosine attention normalizes each window's rows (``F.normalize``: a norm over
    the last dimension of a ``[B*nW, ...]`` fold, expanded back): the fold keeps its order,
    so unfolding it afterwards is served exactly (it was refused as an unfold of unknown
    order); a norm over the folded dimension itself still mixes the windows of samples."""
    import torch.nn.functional as F

    class CosineWindows(nn.Module):
        def __init__(self, over_fold=False):
            super().__init__()
            self.l = nn.Linear(3, 3)
            self.over_fold = over_fold

        def forward(self, x):  # [B, 8, 8, C] -> windows [B*4, 16, C]
            B, H, W, C = x.shape
            w = x.view(B, 2, 4, 2, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, C)
            w = F.normalize(self.l(w), dim=0 if self.over_fold else -1)
            return w.view(B, 2, 2, 4, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)

    torch.manual_seed(8)
    _per_sample_ok(CosineWindows().double(), torch.randn(3, 8, 8, 3))
    with pytest.raises(fxdp.UnsupportedOpError, match="samples can influence each other"):
        fxdp.privatize(CosineWindows(True).double(), capture="export")(torch.randn(3, 8, 8, 3))


def test_a_factory_that_reads_only_a_dtype_holds_no_sample(f64):
    """Funnel's ``inputs_embeds.new_ones([T - 1, T - 1])`` reads its input's dtype and device,
    not its data: no batch reduction (it was refused as one); served exactly."""
    import torch.nn.functional as F

    class ClsMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):  # [B, T, 4]
            T = x.shape[1]
            cls = F.pad(x.new_ones([T - 1, T - 1]), (1, 0, 1, 0))
            h = self.l(x)
            return (h @ h.transpose(1, 2) * cls).softmax(-1)

    torch.manual_seed(9)
    _per_sample_ok(ClsMask().double(), torch.randn(3, 5, 4))


@pytest.mark.parametrize("factory", ["zeros", "new_zeros"])
def test_a_value_written_into_a_buffer_carries_its_data(factory):
    """``buf = zeros(x.shape); buf[:, 1:] = x[:, 1:]; buf.mean(0)``: the write is into a view,
    so the later read is of ``zeros`` itself; the analysis counts what is written into a
    value (a batch reduction found on the graph; before, only the first call's probe saw it)."""
    from fxdp.exported_module import exported_graph
    from fxdp.passes.symbolic_batch import mixing_findings

    class WrittenBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            buf = torch.zeros(x.shape, dtype=x.dtype) if factory == "zeros" else x.new_zeros(x.shape)
            buf[:, 1:] = x[:, 1:]
            return self.l(x) + buf.mean(0)

    gm = exported_graph(WrittenBuffer(), (torch.randn(4, 3),), {}, [0])
    assert [(n.name, code) for n, code, _ in mixing_findings(gm)] == [("mean", "batch-reduction")]


class UnbindWindows(nn.Module):
    """timm's Swin attention: windows folded batch-major, ``qkv(x).reshape(..).permute(2, 0, ..)
    .unbind(0)``, a relative-position bias (a parameter) added to the folded scores; stochastic
    depth drawn as timm does (``x.new_empty((B, 1, 1)).bernoulli_(keep)``)."""

    def __init__(self, keep=1.0):
        super().__init__()
        self.qkv = nn.Linear(3, 12)
        self.bias = nn.Parameter(torch.randn(2, 4, 4))
        self.keep = keep

    def forward(self, x):  # [B, 4, 4, 3] -> 4 windows of 2x2
        B = x.shape[0]
        w = x.view(B, 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 3)
        q, k, v = self.qkv(w).reshape(w.shape[0], 4, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q * 0.5) @ k.transpose(-2, -1) + self.bias.unsqueeze(0)).softmax(-1)
        out = (a @ v).transpose(1, 2).reshape(B, 16, 4)
        return out * out.new_empty((B, 1, 1)).bernoulli_(self.keep)


def test_one_output_of_a_multi_output_op_keeps_its_fold_order(f64):
    """An output of ``unbind``/``split`` (a ``getitem`` of a list) has the fold order of that
    output; it was marked as holding no sample (``free``), so the bias added to it was refused
    (timm's Swin) and a fold of another order combined with it would have passed the check.
    Served exactly; timm's stochastic depth is served (not refused as a probe mismatch)."""
    torch.manual_seed(10)
    _per_sample_ok(UnbindWindows().double(), torch.randn(3, 4, 4, 3))
    # the module-level graph (symbolic tracing reads this model) cannot serve the fold: it says where to go
    with pytest.raises(fxdp.BatchDimensionError, match=r"folds the batch.*capture='export'"):
        fxdp.privatize(UnbindWindows(), capture="fx")(torch.randn(3, 4, 4, 3)).sum().backward()
    model = UnbindWindows(keep=0.5).double()
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    torch.manual_seed(3)
    out = dp(torch.randn(6, 4, 4, 3))
    out.pow(2).sum().backward()
    dropped = out.flatten(1).abs().amax(1) == 0  # this draw: 0 and 1 both occur at seed 3
    assert 0 < int(dropped.sum()) < 6
    for p in model.parameters():  # a dropped sample's gradient is zero; they sum to the draw's gradient
        per = p.grad_sample.flatten(1).abs().amax(1)
        assert torch.equal(per == 0, dropped), (per, dropped)
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-10, atol=1e-12)

    class SplitOrders(nn.Module):  # a batch-major fold plus a piece of a batch-minor one
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):  # [B, T, 3]
            B, T, _ = x.shape
            major = x.reshape(B * T, 3)
            minor = torch.cat([x.transpose(0, 1).reshape(T * B, 3), x.reshape(B * T, 3)], 1).split(3, 1)[0]
            return self.l(major + minor).view(B, T, 3)

    with pytest.raises(fxdp.UnsupportedOpError, match="samples can influence each other"):
        fxdp.privatize(SplitOrders(), capture="export")(torch.randn(3, 5, 3))


def test_a_fold_into_a_rule_without_folds_names_no_capture_path():
    """A convolution over ``x.flatten(0, 1)``: the convolution's rule does not serve a
    folded batch on either path, so the error says so instead of pointing at
    ``capture='export'``, which was this path. (LeViT's group norm over such a fold is
    served: ``tests/rules/test_rule_norms.py``.)"""
    class FoldedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x):  # [B, T, 4]
            h = self.l(x)
            return self.conv(h.flatten(0, 1).unsqueeze(-1)).reshape_as(h)

    dp = fxdp.privatize(FoldedConv(), capture="export")
    with pytest.raises(fxdp.BatchDimensionError, match="does not serve a folded batch on either") as err:
        dp(torch.randn(3, 5, 4)).sum().backward()
    assert "capture='export'" not in str(err.value)

    class FoldedConvKw(FoldedConv):  # **kwargs: fxdp.check reads the exported graph, as privatize does
        def forward(self, x, **kw):
            return super().forward(x)

    report = fxdp.check(FoldedConvKw(), torch.randn(3, 5, 4))
    assert [e.code for e in report.errors] == ["batch-fold"]
    assert "does not serve" in report.errors[0].problem


def test_a_weight_standardized_with_batch_norm_is_not_a_batch_statistic(f64):
    """NF-ResNet's ``ScaledStdConv2d`` standardizes its weight with ``F.batch_norm(w.reshape(1,
    out, -1), None, None, training=True)``: statistics of a parameter, not of the batch (the
    export path refused it as batch normalization); served exactly. Batch statistics of the
    data stay refused."""
    import torch.nn.functional as F

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class DataBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return F.batch_norm(self.l(x), None, None, training=True)

    torch.manual_seed(11)
    _per_sample_ok(StdConv(2, 3, 3, padding=1).double(), torch.randn(3, 2, 5, 5))
    with pytest.raises(fxdp.UnsupportedOpError, match="batch statistics"):
        fxdp.privatize(DataBatchNorm(), capture="export")(torch.randn(4, 3))


class RelativeBias(nn.Module):
    """BEiT's relative-position bias: an index built by slice assignments into ``zeros``
    (in place: the writes are users of ``zeros``, not ancestors of its read) picks rows of a
    parameter table, added to batched attention scores."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.randn(7, 2))

    def forward(self, x):  # [B, 4, 4]
        B, T = x.shape[0], 4
        idx = torch.zeros(T, T, dtype=torch.long)
        pos = torch.arange(T)
        idx[1:, 1:] = pos[1:, None] - pos[None, 1:] + 3
        idx[0, :] = 6
        idx[1:, 0] += 5
        bias = self.table[idx.view(-1)].view(T, T, 2).permute(2, 0, 1)
        q = self.q(x).view(B, T, 2, 2).transpose(1, 2)
        return (q @ q.transpose(-1, -2) + bias).softmax(-1)


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_constant_written_in_place_keeps_its_writes_in_the_capture(capture, f64):
    """The capture op of ``scores + table[idx]`` copies the parameter's subgraph with the
    in-place writes that build ``idx`` (before: all-zero indices, every per-sample gradient
    of BEiT's and of this table wrong, silently)."""
    torch.manual_seed(7)
    model = RelativeBias().double()
    x = torch.randn(3, 4, 4)
    dp = fxdp.privatize(model, loss_reduction="sum", capture=capture)
    dp(x).pow(2).sum().backward()
    assert not [c for c in dp.captures if c.kind == "functorch"], dp.capture_table()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))


def test_a_table_repeated_over_the_batch_lines_up_with_any_fold(f64):
    """DeBERTa's relative positions: a batch-free table ``repeat``ed to ``[B*H, ...]`` and added
    to (or gathered with) a batch-major fold. It holds no sample's data, so it takes the other
    operand's layout (it was an unfold of unknown order: refused as mixing)."""

    class RepeatedTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)
            self.register_buffer("table", torch.randn(2, 5, 5))
            self.register_buffer("idx", torch.randint(0, 5, (2, 5, 5)))

        def forward(self, x, **kw):  # [B, 5, 4], two heads of width 2
            B = x.shape[0]
            q = self.l(x).view(B, 5, 2, 2).transpose(1, 2).reshape(B * 2, 5, 2)
            scores = torch.bmm(q, q.transpose(1, 2))
            scores = scores + self.table.repeat(B, 1, 1)
            scores = scores + torch.gather(scores, -1, self.idx.repeat(B, 1, 1))
            return scores.view(B, 2, 5, 5)

    torch.manual_seed(6)
    _per_sample_ok(RepeatedTable().double(), torch.randn(3, 5, 4))


def test_batch_minor_fold_is_refused():
    class SeqFirstFold(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x, **kw):  # [B, T, d] -> [T, B, d] -> [T*B, d]: rows of one sample are apart
            return self.l(x.transpose(0, 1).reshape(-1, 4))

    dp = fxdp.privatize(SeqFirstFold(), capture="export")
    with pytest.raises(fxdp.BatchDimensionError, match="folds the batch"):
        dp(torch.randn(5, 7, 4)).sum().backward()


# -- every ATen rule on the export path: batch-of-one exactness and book-keeping ---------------------


class ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding="same")
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2, bias=False)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2, output_padding=1)
        self.c3 = nn.Conv1d(2, 3, 2)

    def forward(self, x, **kw):
        h = self.up(torch.relu(self.inorm(self.c2(torch.relu(self.gn(self.c1(x)))))))
        return self.c3(h.flatten(2)[..., :20])


class SeqStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.rms = nn.RMSNorm(6)
        self.w = nn.Parameter(torch.randn(6, 5))
        self.b = nn.Parameter(torch.randn(5))
        self.scale = nn.Parameter(torch.randn(5))

    def forward(self, t, **kw):
        h = self.rms(self.ln(self.emb(t)))
        h2 = torch.addmm(self.b, h.reshape(-1, 6), self.w, beta=0.5, alpha=2.0).view(t.shape + (5,))
        return (h2 * self.scale) @ self.w.t()


class AttentionStack(nn.Module):
    """nn.MultiheadAttention (bias_k/bias_v) and a Transformer layer, after privatize's rewrite."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
        self.enc = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)

    def forward(self, x, **kw):
        return self.enc(self.att(x, x, x)[0]).sum(1)


class LearnedPositions(nn.Module):
    """BERT/GPT-2 style: token embeddings plus position embeddings of arange(T),
    broadcast over the batch (served by the embedding rule, not torch.func)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(16, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, t, **kw):
        return self.out(torch.tanh(self.tok(t) + self.pos(torch.arange(t.shape[1])[None])))  # ids [1, T]


EXPORT_MODELS = {
    "positions": (LearnedPositions, lambda: torch.randint(0, 11, (4, 5))),
    "attention": (AttentionStack, lambda: torch.randn(3, 5, 6)),
    "conv": (ConvStack, lambda: torch.randn(4, 2, 7, 7)),
    "seq": (SeqStack, lambda: torch.randint(0, 11, (5, 6))),
    "kwargs": (KwargsAndOptional, lambda: torch.randn(4, 6, 4)),
}


@pytest.mark.parametrize("name", sorted(EXPORT_MODELS))
def test_aten_rules_equal_batch_of_one(name, f64):
    torch.manual_seed(4)
    cls, make_x = EXPORT_MODELS[name]
    dp = _per_sample_ok(cls(), make_x())
    if name == "positions":
        assert "torch.embedding (broadcast over the batch)" in [c.rule_name() for c in dp.captures]


@pytest.mark.parametrize("name", sorted(EXPORT_MODELS))
@pytest.mark.parametrize("per_layer", [False, True])
def test_bk_clipped_sums_equal_materialized_on_the_export_path(name, per_layer, f64):
    torch.manual_seed(5)
    cls, make_x = EXPORT_MODELS[name]
    model, x = cls(), make_x()
    dpm = fxdp.privatize(model, capture="export")
    w = torch.randn_like(dpm(x))
    trainable = [p for p in model.parameters() if p.requires_grad]
    bounds = [0.05 * (j + 1) for j in range(len(trainable))] if per_layer else 0.3
    expected = clipped_sums_materialized(dpm, x, w, bounds, per_layer)
    dpb = fxdp.privatize(model, capture="export", grad_sample_mode="bk")
    for p in trainable:
        p.grad = None
    sums = bk_clipped_sums(dpb, lambda: dpb(x).mul(w).sum().div(x.shape[0]).backward(), bounds, per_layer)
    for p, e in zip(trainable, expected):
        torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)


class _RecurrentNet(nn.Module):
    """A recurrent classifier, captured here with torch.export."""

    def __init__(self, kind="LSTM", batch_first=True, **rnn):
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.rnn = getattr(nn, kind)(6, 5, batch_first=batch_first, **rnn)
        self.head = nn.Linear(5 * (2 if rnn.get("bidirectional") else 1), 2)
        self.batch_first = batch_first

    def forward(self, x, h=None, **kw):
        e = self.emb(x)
        y, _ = self.rnn(e if self.batch_first else e.transpose(0, 1), h)
        return self.head(y[:, -1] if self.batch_first else y[-1])


@pytest.mark.parametrize("kind, options", [
    ("LSTM", dict(num_layers=2, bidirectional=True)), ("GRU", dict(num_layers=2)), ("RNN", dict(nonlinearity="relu")),
    ("LSTM", dict(proj_size=3, batch_first=False)),
])
def test_dp_recurrent_layers_on_the_export_path_are_exact(kind, options, f64):
    """The DP layers' scan is the custom op fxdp::rnn_scan in the ATen graph, served by
    its rule (BPTT rerun from the record): exact per-sample gradients, no fallback."""
    options = dict(options)
    bf = options.pop("batch_first", True)
    torch.manual_seed(0)
    model = _RecurrentNet(kind, bf, **options)
    if options.get("proj_size"):
        model.head = nn.Linear(3, 2)
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    assert isinstance(dp, ExportedDPModule)
    x = torch.randint(0, 30, (4, 7))
    out = dp(x)
    torch.testing.assert_close(out, model(x))
    out.pow(2).sum().backward()
    assert "recurrent_scan" in {c.rule_name() for c in dp.captures}
    assert not [c for c in dp.captures if c.kind == "functorch"]
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        model(x[i:i + 1]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-9, atol=1e-12, msg=f"{kind} {n} sample {i}")


def test_dp_recurrent_layer_on_the_export_path_with_a_state_and_book_keeping(f64):
    """An initial state given (its own graph), book-keeping's clipped sums equal the
    materialized ones, and make_private trains it."""
    torch.manual_seed(1)
    model = _RecurrentNet("GRU", num_layers=1)
    x, h = torch.randint(0, 30, (5, 6)), torch.randn(1, 5, 5)
    dpm = fxdp.privatize(model, loss_reduction="sum", capture="export", input_batch_dims=[0, 1])  # h: [L, B, H]
    dpm(x, h).pow(2).sum().backward()
    gs = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        model(x[i:i + 1], h[:, i:i + 1]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(gs[n][i], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    for p in model.parameters():
        p.grad_sample = None
    dpb = fxdp.privatize(model, loss_reduction="sum", grad_sample_mode="bk", capture="export",
                         input_batch_dims=[0, 1])
    sums = bk_clipped_sums(dpb, lambda: dpb(x, h).pow(2).sum().backward(), 0.5)
    total = torch.cat([g.flatten(1) for g in gs.values()], 1).norm(dim=1)
    factors = (0.5 / (total + 1e-6)).clamp(max=1.0)  # optim/clip.py's formula
    for n, p in model.named_parameters():
        want = (gs[n] * factors.view(-1, *[1] * (gs[n].dim() - 1))).sum(0)
        torch.testing.assert_close(sums[id(p)], want, rtol=1e-9, atol=1e-12, msg=n)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.randint(0, 30, (6,)), torch.randint(0, 2, ())

    engine = fxdp.PrivacyEngine(accountant="rdp")
    net = _RecurrentNet("LSTM").float()
    net = fxdp.privatize(net, capture="export")  # make_private takes a privatized model too
    dp, opt, dl = engine.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                      data_loader=torch.utils.data.DataLoader(DS(), batch_size=4),
                                      noise_multiplier=1.0, max_grad_norm=1.0)
    for xb, yb in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(dp(xb), yb).backward()
        opt.step()
    assert engine.steps == 4


def test_packed_sequences_are_refused_on_the_export_path_with_the_fix():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 5, batch_first=True)

        def forward(self, x, lengths, **kw):
            p = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            return nn.utils.rnn.pad_packed_sequence(self.rnn(p)[0], batch_first=True)[0].sum(1)

    dp = fxdp.privatize(Packed(), capture="export")
    with pytest.raises(fxdp.FxdpError, match="capture='fx'"):
        dp(torch.randn(3, 6, 4), torch.tensor([6, 4, 2]))


class HookedAndParametrized(nn.Module):
    """Symbolic tracing would drop the hooks and give the parametrized weights no
    per-sample gradient; privatize(auto) captures such a model with torch.export."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.b = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
        self.c = nn.Linear(4, 2)
        self.a.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
        self.c.register_forward_hook(lambda m, i, o: o + 1.0)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_hooks_and_parametrizations_take_the_export_path_and_are_exact(f64):
    torch.manual_seed(7)
    model = HookedAndParametrized()
    dp = fxdp.privatize(model, loss_reduction="sum")
    assert isinstance(dp, ExportedDPModule)
    x = torch.randn(5, 4)
    torch.testing.assert_close(dp(x), model(x))  # the hooks run
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))


class ConstantsAndLearnedQueries(nn.Module):
    """A normalization constant made in forward, position embeddings of
    ``torch.arange(T)``, and DETR-style learned queries through an MLP, broadcast
    over the batch: the layers applied to parameter-only values still get exact
    per-sample gradients (at the op that meets the batch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pos = nn.Embedding(16, 4)
        self.queries = nn.Parameter(torch.randn(5, 4))
        self.query_mlp = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, t):
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / 0.2
        h = self.conv(x).mean((2, 3))[:, None, :] + self.pos(torch.arange(t.shape[1]))
        attn = torch.softmax(h @ self.query_mlp(self.queries).t(), -1)  # [B, T, 5]
        return self.head(attn @ self.queries).sum(1)


def test_constants_positions_and_learned_queries_are_exact(f64):
    torch.manual_seed(8)
    model = ConstantsAndLearnedQueries()
    x, t = torch.randn(4, 3, 6, 6), torch.randn(4, 5)
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(x, t).pow(2).sum().backward()
    assert not [c for c in dp.captures if c.kind == "functorch"]
    assert_grad_samples_match(model, batch_of_one_grads(model, [x, t], lambda out, i: out.pow(2).sum()))
    with pytest.raises(fxdp.UnsupportedOpError, match="pos.weight.*capture='export'"):
        fxdp.privatize(model, capture="fx")  # the module-level graph cannot serve the query MLP


def test_embedding_bag_with_offsets_on_the_export_path_is_exact(f64):
    """A 1-D input with offsets (input_batch_dims=[None, 0]): the bags are the samples
    (2-D inputs: tests/rules/test_rule_embedding.py)."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.EmbeddingBag(20, 4, mode="sum")
            self.l = nn.Linear(4, 2)

        def forward(self, x, offsets, **kw):
            return self.l(self.e(x, offsets))

    torch.manual_seed(0)
    model = Bag()
    x, offsets, bounds = torch.randint(0, 20, (11,)), torch.tensor([0, 3, 7]), [0, 3, 7, 11]
    dp = fxdp.privatize(model, capture="export", input_batch_dims=[None, 0], loss_reduction="sum")
    dp(x, offsets).pow(2).sum().backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        model(x[bounds[i]:bounds[i + 1]], torch.tensor([0])).pow(2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-10, atol=1e-12, msg=f"{n}, bag {i}")


class RepeatedPositions(nn.Module):
    """A parameter-only value, with dropout, repeated over the batch along dimension 0
    (``w.repeat(B, 1)``: DeBERTa's relative position keys) and met by a batch-major fold."""

    def __init__(self, p):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 3))
        self.fc = nn.Linear(3, 2)
        self.p = p

    def forward(self, x):
        B, T, d = x.shape
        pos = nn.functional.dropout(self.pos * 2.0, self.p, self.training).repeat(B, 1)  # copy b: rows b*T..
        return self.fc(torch.tanh((x.reshape(B * T, d) * pos).reshape(B, T, d)))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_a_parameter_subgraph_repeated_over_the_batch_is_exact(p, f64):
    """``repeat(B, 1)`` of a batch-free value is a batch-major fold (copy b is sample b's), so
    the raw-parameter capture serves it; its dropout, drawn once for every sample, is replayed
    for each (and drawn once a step: the absorbed node is not left in the graph to draw again,
    so the DP model draws the same numbers as the model). Before: refused as a folded batch."""
    torch.manual_seed(0)
    model = RepeatedPositions(p).train()
    _assert_draws_once_and_exact(model, fxdp.privatize(model, capture="export", loss_reduction="sum"),
                                 torch.randn(4, 5, 3))


def _assert_draws_once_and_exact(model, dp, x):
    """The DP model draws the model's numbers (the same outputs from the same seed), and each
    sample's gradient equals its gradient alone with the batch's dropout masks (seed replayed)."""
    dp(x)  # captured on this call
    torch.manual_seed(7)
    out = dp(x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.pow(2).sum().backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout mask as the batch's
        model(x[i:i + 1]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-10, atol=1e-12, msg=n)


class DroppedSinusoidPositions(nn.Module):
    """Funnel Transformer's relative attention: sinusoid positions (no parameter, no sample)
    with dropout, projected by a parameter (``r_head = r @ W``) and met by the batch in an
    einsum (``bnd,td->bnt``)."""

    def __init__(self, p):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.fc = nn.Linear(5, 2)
        self.p = p

    def forward(self, x):
        T = x.shape[1]
        r = torch.sin(torch.arange(5.0)[:, None] * torch.arange(1.0, 5.0))
        r = nn.functional.dropout(r, self.p, self.training)
        return self.fc(torch.tanh(torch.einsum("btd,sd->bts", x, r @ self.w)).sum(1) / T)


@pytest.mark.parametrize("capture", ["auto", "export"])
def test_a_draw_from_neither_parameters_nor_samples_is_read_not_redrawn(capture, f64):
    """The dropout on a parameter-free value that a parameter subgraph reads (Funnel's
    positions) is made once in the model's graph and passed to the capture, which recomputes
    the subgraph per sample from those numbers. Before: drawn again inside the capture, so
    refused as "draws random numbers inside a fallback layer" (any Funnel model with dropout);
    and symbolic tracing (capture="auto" chose it) froze the mask it drew while tracing into
    the graph, one mask for every step."""
    torch.manual_seed(0)
    model = DroppedSinusoidPositions(0.5).train()
    dp = fxdp.privatize(model, capture=capture, loss_reduction="sum")
    assert isinstance(dp, ExportedDPModule)
    _assert_draws_once_and_exact(model, dp, torch.randn(4, 6, 3))
    assert model.w.grad_sample.abs().sum() > 0


def test_symbolic_tracing_does_not_freeze_a_draw_into_the_graph():
    """capture="fx" on the model above: its trace drew the dropout mask once and would reuse it
    every step; the trace is refused (the model kept whole, whose dropout is then refused)
    and the generator is left where it was."""
    torch.manual_seed(3)
    model = DroppedSinusoidPositions(0.5).train()
    before = torch.random.get_rng_state()
    with pytest.warns(UserWarning):
        dp = fxdp.privatize(model, capture="fx")
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(fxdp.UnsupportedOpError, match="draws random numbers"):
        dp(torch.randn(4, 6, 3))


class HostLayerDrop(nn.Module):
    """LayerDrop drawn from NumPy's or Python's generator (wav2vec2's adapter: ``np.random.random()``)."""

    def __init__(self, draw):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.draw = draw

    def forward(self, x):
        if self.training and self.draw() < 0.5:
            return x
        return x + self.l(x)


@pytest.mark.parametrize("capture", ["auto", "export", "fx"])
@pytest.mark.parametrize("draw", [np.random.random, random.random], ids=["numpy", "python"])
def test_a_draw_from_numpy_or_python_while_capturing_is_refused(capture, draw):
    """Neither capture sees these draws: each ran once while capturing, and before, the graph
    served its branch for every step, silently (the layer always kept, or never trained). Now
    refused, naming the generator and SpecAugment's fix; the generators are left as they were.
    Kept whole (capture="fx"), the fallback refuses the draw: recomputed per sample, it would
    draw other numbers."""
    np.random.seed(0)
    random.seed(0)
    states = np.random.get_state()[1].copy(), random.getstate()
    model = HostLayerDrop(draw).train()
    # capture="fx" keeps the model whole (warned), whose fallback refuses the draw at the first call
    with pytest.raises(fxdp.UnsupportedOpError if capture == "fx" else fxdp.UnsupportedModelError,
                       match=r"(?s)draws random numbers (with|outside).*mask_time_prob"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fxdp.privatize(model, capture=capture)(torch.randn(3, 4))
    if capture != "fx":  # a capture's draws are undone (the whole model's own call draws as it runs)
        assert np.array_equal(np.random.get_state()[1], states[0]) and random.getstate() == states[1]


class NoiseMeetsTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.sigma = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.normal(x, self.sigma.abs()))  # draws one number per sample and feature


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_random_op_that_meets_the_batch_in_a_parameter_use_is_refused(capture):
    """Only a draw from no sample's data is replayed per sample (the test above): a random op
    that takes batched data and a parameter draws per sample, and replaying the generator for
    one sample cannot give each sample its own numbers, so it stays refused."""
    dp = fxdp.privatize(NoiseMeetsTheBatch(), capture=capture)
    with pytest.raises(fxdp.UnsupportedOpError, match="draws random numbers"):
        dp(torch.randn(5, 4))


class AddsBiasInPlace(nn.Module):
    """``h += self.bias`` (ConvBERT's separable convolution), optionally through a view of ``h``
    taken before the write (which sees the write)."""

    def __init__(self, read_again=False):
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)
        self.b = nn.Parameter(torch.randn(3))
        self.fc = nn.Linear(3, 2)
        self.read_again = read_again

    def forward(self, x):
        h = self.lin(x)
        v = h[:, :1] if self.read_again else None
        h += self.b
        out = self.fc(torch.tanh(h))
        return out + v if self.read_again else out


def test_a_parameter_added_in_place_is_exact_on_the_export_path(f64):
    """The capture at ``aten.add_`` ran the in-place op on its detached input, a leaf that
    requires grad: RuntimeError, so ConvBERT could not be privatized. It runs the out-of-place
    op now, and a write the graph reads again elsewhere is refused with the fix."""
    torch.manual_seed(0)
    model = AddsBiasInPlace()
    x = torch.randn(5, 4)
    dp = fxdp.privatize(model, capture="export", loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))
    with pytest.raises(fxdp.UnsupportedOpError, match=r"in place .*h = h \+ self.bias"):
        fxdp.privatize(AddsBiasInPlace(read_again=True), capture="export")(x)


def test_the_dp_model_runs_its_own_hooks_and_forward():
    """The exported DP model's call skipped nn.Module's: hooks registered on it never ran
    (in training or eval), and ``dp.forward(x)`` ran the empty placeholder graph (TypeError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    dp = fxdp.privatize(model, capture="export")
    seen = []
    dp.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    dp.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(5, 4)
    dp(x).sum().backward()
    assert model[0].weight.grad_sample.shape == (5, 3, 4)
    dp.eval()
    torch.testing.assert_close(dp.forward(x), model(x))
    dp(x)
    assert seen == ["pre", (5, 2), "pre", (5, 2)]


class _StringPadding(nn.Module):
    """Convolutions with ``padding="valid"`` and ``"same"`` (Hugging Face EfficientNet): the
    exported graph calls ``aten.conv2d.padding`` and leaves out its default, ``"valid"``."""

    def __init__(self):
        super().__init__()
        self.valid = nn.Conv2d(3, 4, 3, padding="valid")
        self.same = nn.Conv2d(4, 2, 3, padding="same")

    def forward(self, x):
        return self.same(self.valid(x)).flatten(1)


def test_string_padded_convolutions_are_exact_on_the_export_path(f64):
    """The rule filled the left-out padding with its own default, 0, and called the string
    overload with ``[0, 0]``: a TypeError at the first call, so HF EfficientNet was refused."""
    torch.manual_seed(0)
    model = _StringPadding().double()
    x = torch.randn(3, 3, 6, 6)
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    dp(x).pow(2).sum().backward()
    assert_grad_samples_match(dp, batch_of_one_grads(model, [x], lambda o, i: o.pow(2).sum()))


def test_a_length_of_one_fixed_by_the_first_capture_gets_a_graph_for_other_lengths(f64):
    """Export fixes a size of 1 it was asked to keep symbolic (a first batch of one-token
    sequences, or an example input of one): that graph's guards refuse other lengths. The
    next length is captured too, and its symbolic graph serves every length after, 1 included;
    per-sample gradients stay each sample's alone throughout."""
    torch.manual_seed(3)
    model = KwargsAndOptional().double()
    dp = fxdp.privatize(model, loss_reduction="sum", capture="export")
    for T in (1, 5, 1, 3):
        for p in model.parameters():
            p.grad = p.grad_sample = None
        x = torch.randn(4, T, 4)
        dp(x).pow(2).sum().backward()
        assert_grad_samples_match(model, batch_of_one_grads(model, [x], lambda out, i: out.pow(2).sum()))
        if T == 1 and len(dp.graphs) == 1:
            assert dp.graphs[0].meta["fxdp_pinned"] == [(0, 1, 1)]  # leaf 0 (x), dimension 1, size 1
    assert len(dp.graphs) == 2 and [g.meta["fxdp_pinned"] for g in dp.graphs].count([]) == 1


class Choices(nn.Module):
    """Multiple-choice inputs ``[B, k, T]`` read as ``B*k`` rows, each row also embedding a
    constant (BERT's token types, expanded to the folded batch: rows that hold no sample);
    ``minor``: the rows taken choice-major (``[k*B]``: row r is sample r % B's)."""

    def __init__(self, minor=False, flipped=False):
        super().__init__()
        self.tok = nn.Embedding(20, 6)
        self.typ = nn.Embedding(2, 6)
        self.flipped = flipped
        self.head = nn.Linear(6, 1)
        self.minor = minor
        self.register_buffer("types", torch.zeros(1, 16, dtype=torch.long))

    def forward(self, ids, **kwargs):
        B, k, T = ids.shape
        flat = ids.transpose(0, 1).reshape(-1, T) if self.minor else ids.reshape(-1, T)
        typ = self.typ(self.types[:, :T].expand(flat.shape[0], T))
        h = self.tok(flat) + (typ.flip(0) if self.flipped else typ)
        out = self.head(torch.tanh(h)).sum((1, 2))
        return out.view(k, B).t() if self.minor else out.view(B, k)


def test_rows_of_a_constant_follow_the_batch_major_fold_they_join(f64):
    """The constant's rows take the layout of the rows they are added to: batch-major, so the
    token-type embedding is served as [B, k, ...], exact; choice-major rows, and rows moved before
    they join, stay refused."""
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 3, 5))
    _per_sample_ok(Choices(), ids)
    with pytest.raises(fxdp.errors.BatchDimensionError, match="folds the batch"):
        fxdp.privatize(Choices(minor=True), capture="export")(ids).sum().backward()
    # rows moved before they join (a flip keeps no fold): which sample each is for is not followed
    with pytest.raises(fxdp.errors.FxdpError, match="order is not known"):
        fxdp.privatize(Choices(flipped=True), capture="export")(ids).sum().backward()


def test_bert_for_multiple_choice(f64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMultipleChoice(cfg).double().train()
    ids = torch.randint(1, 30, (4, 3, 6), generator=torch.Generator().manual_seed(1))
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(input_ids=ids).logits.pow(2).sum().backward()
    want = batch_of_one_grads(model, [ids], lambda out, i: out.logits.pow(2).sum())
    assert_grad_samples_match(model, want)
