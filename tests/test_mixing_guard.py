"""fxdp.privatize fails closed: on the symbolic-tracing path the batch-mixing analysis
(``fxdp/passes/batch_mixing/guard.py``) runs once per input signature, at the first
training call, and refuses a model in which samples influence each other (flat inputs
beside their offsets included; ops without known semantics lowered to ATen and read by
the batch rules, and probed); on the torch.export
path every op that reads batch data is probed too (``fxdp/passes/probe_batch.py``).
Before the guard, ``privatize(model)`` served these with wrong ``grad_sample`` (only
``fxdp.check`` and ``make_private``'s check refused them)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxdp
from models import Centered, FlatBags


class CenteredAccepted(Centered):
    def forward(self, x):
        return self.fc(x - x.mean(0))  # fxdp: ignore


class SeqFirstView(nn.Module):
    """A [T, B, d] tensor read as [B, T, d]."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.l(x.transpose(0, 1))
        return self.head(h.reshape(x.shape))


class UnfoldWrongOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        B, k, d = x.shape
        return self.l(x.transpose(0, 1).reshape(k * B, d).reshape(B, k, d))


class Counter(nn.Module):
    """A clean model with a buffer its forward updates."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return self.fc(x)


def _assert_each_sample_alone(model, weight, x, got, loss=lambda out: out.pow(2).sum()):
    """``got`` (``weight``'s grad_sample) is ``weight``'s gradient on each sample alone."""
    for i in range(x.shape[0]):
        model.zero_grad()
        loss(model(x[i:i + 1])).backward()
        torch.testing.assert_close(got[i], weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model, shape, match", [
    (Centered, (6, 4), r"x - x\.mean\(0\)"),
    (SeqFirstView, (6, 5, 4), r"h\.reshape\(x\.shape\)"),
    (UnfoldWrongOrder, (6, 5, 4), r"reshape"),
])
def test_privatize_refuses_mixing_at_the_first_training_call(model, shape, match):
    dp = fxdp.privatize(model(), capture="fx")
    with pytest.raises(fxdp.UnsupportedOpError, match=match):
        dp(torch.randn(*shape)).sum().backward()
    with pytest.raises(fxdp.UnsupportedOpError, match="influence each other"):  # and on every later call
        dp(torch.randn(*shape))


def test_example_inputs_refuse_at_privatize():
    with pytest.raises(fxdp.UnsupportedOpError, match="batch-reduction"):
        fxdp.privatize(Centered(), capture="fx", example_inputs=(torch.randn(6, 4),))


def test_an_empty_batch_does_not_prove_the_signature():
    dp = fxdp.privatize(Centered(), capture="fx")
    dp(torch.randn(0, 4)).sum().backward()  # nothing to analyse
    with pytest.raises(fxdp.UnsupportedOpError, match="mean"):
        dp(torch.randn(6, 4))


def test_eval_mode_and_no_grad_run_the_model():
    dp = fxdp.privatize(Centered(), capture="fx").eval()
    dp(torch.randn(6, 4))
    dp.train()
    with torch.no_grad():
        dp(torch.randn(6, 4))


def test_accepted_lines_and_the_explicit_override_are_served():
    dp = fxdp.privatize(CenteredAccepted(), capture="fx")
    dp(torch.randn(6, 4)).sum().backward()  # "# fxdp: ignore" on the line, as in fxdp.check
    assert dp.fc.weight.grad_sample.shape == (6, 2, 4)
    for capture in ("fx", "export"):  # the same override on both capture paths
        dp = fxdp.privatize(Centered(), capture=capture, allow_unsafe_model=True)
        with pytest.warns(UserWarning, match=r"(?s)allow_unsafe_model=True.*x - x\.mean\(0\)"):
            dp(torch.randn(6, 4)).sum().backward()


def test_the_analysis_leaves_buffers_and_clean_models_alone(f64):
    """The analysis runs the model (at two batch sizes) without a trace: the buffer the
    forward updates counts the training call only, and the per-sample gradients are exact."""
    torch.manual_seed(0)
    model = Counter().double()
    dp = fxdp.privatize(model, capture="fx", loss_reduction="sum")
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp(x).sum().backward()
    assert model.seen.item() == 1
    _assert_each_sample_alone(model, model.fc.weight, x, dp.fc.weight.grad_sample.clone(), lambda out: out.sum())


def test_check_reads_multihead_attention_masks_as_per_sample():
    """fxdp.check (and the guard) read DPMultiheadAttention's mask op: its queries and keys give it
    shapes only. A 2-D attn_mask with batch_first=False was reported as mixing samples."""
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=7, batch_first=False)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn
            self.register_buffer("mask", torch.rand(5, 3) < 0.3)

        def forward(self, q, k, v):
            return self.attn(q, k, v, attn_mask=self.mask, need_weights=False)[0]

    q, k, v = torch.randn(5, 4, 8), torch.randn(3, 4, 6), torch.randn(3, 4, 7)
    report = fxdp.check(M(), (q, k, v), batch_first=False)
    assert report.ok, report
    dp = fxdp.privatize(M(), batch_first=False, capture="fx")
    dp(q, k, v).sum().backward()


def test_a_view_of_a_permuted_copy_is_analysed(f64):
    """``x.view(...).permute(...).contiguous().view(...)`` (timm's window partition and reverse): the
    analysis' tags are views of the permuted tags, so it read .view() as an op it could not
    process and refused the model (timm's Swin)."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):  # [B, H, W, C]: timm's window partition, then its reverse
            B, H, W, C = x.shape
            w = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, 2, 2, C)
            w = torch.tanh(w)
            x = w.view(B, H // 2, W // 2, 2, 2, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)
            return self.l(x)

    torch.manual_seed(1)
    model = Tokens().double()
    dp = fxdp.privatize(model, capture="fx", loss_reduction="sum")
    x = torch.randn(4, 4, 6, 3)
    dp(x).pow(2).sum().backward()
    _assert_each_sample_alone(model, model.l.weight, x, model.l.weight.grad_sample.clone())


class Bags(nn.Module):
    """A text classifier on flat token ids and their offsets (nn.EmbeddingBag, as in
    PyTorch's text-classification tutorial), with an optional op after the bags."""

    def __init__(self, after=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 6, mode="sum" if after == "weights" else "mean")
        self.fc = nn.Linear(6, 2)
        self.after = after

    def forward(self, text, offsets, weights=None):
        if self.after == "weights":
            h = self.bag(text, offsets, per_sample_weights=weights)
        else:
            h = self.bag(text, offsets)
        if self.after == "centered":
            h = h - h.mean(0)
        elif self.after == "token-mean":  # every bag scaled by a statistic of the whole batch's tokens
            h = h * text.float().mean()
        elif self.after == "tanh":
            h = torch.tanh(h)
        return self.fc(h)


_TEXT, _OFFSETS = torch.tensor([3, 7, 1, 9, 9, 4, 0, 2, 8, 5, 11]), torch.tensor([0, 3, 3, 7])


@pytest.mark.parametrize("after, match", [
    ("centered", r"h - h\.mean\(0\)"),
    ("token-mean", r"text\.float\(\)\.mean\(\)"),
])
def test_flat_inputs_are_analysed_with_their_offsets(after, match):
    """Inputs without a batch dimension (flat token ids beside offsets) skipped the guard:
    ``h - h.mean(0)`` after the bags, or a statistic of the whole batch's tokens, was
    served with wrong grad_sample (the export path refused both)."""
    dp = fxdp.privatize(Bags(after), capture="fx", input_batch_dims=(None, 0))
    with pytest.raises(fxdp.UnsupportedOpError, match=match):
        dp(_TEXT, _OFFSETS)


@pytest.mark.parametrize("after", [None, "weights", "tanh"])
def test_flat_inputs_that_keep_samples_apart_are_served_exactly(after, f64):
    """Each bag's rows are its sample's (an empty bag included): served, and every
    per-sample gradient is that bag's alone (float64), on a second batch of another
    length too (flat lengths are not part of the input signature)."""
    torch.manual_seed(3)
    model = Bags(after).double()
    dp = fxdp.privatize(model, capture="fx", input_batch_dims=(None, 0, None), loss_reduction="sum")
    for text, offsets in [(_TEXT, _OFFSETS), (_TEXT[:6], torch.tensor([0, 1, 4]))]:
        weights = torch.rand(len(text), dtype=torch.float64)
        for p in model.parameters():
            p.grad_sample = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dp(text, offsets, weights).pow(2).sum().backward()
        got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
        bounds = offsets.tolist() + [len(text)]
        for i in range(len(offsets)):
            s, e = bounds[i], bounds[i + 1]
            model.zero_grad()
            model(text[s:e], torch.tensor([0]), weights[s:e]).pow(2).sum().backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(got[n][i], p.grad, rtol=1e-10, atol=1e-12, msg=f"{n}, bag {i}")


def test_flat_inputs_without_offsets_are_refused():
    """A flat input that no offsets input cuts into samples cannot be attributed to them."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, table):
            return self.fc(x * table.mean())

    dp = fxdp.privatize(Shared(), capture="fx", input_batch_dims=(0, None))
    with pytest.raises(fxdp.UnsupportedOpError, match=r"(?s)cannot prove.*input `table` has no batch dimension.*"
                                                      r"register_buffer"):
        dp(torch.randn(5, 4), torch.randn(3))


def test_a_hard_coded_batch_size_is_refused():
    """A model the analysis cannot run at other batch sizes is not proven: before, it was
    served (``h - h.mean(0)`` included) whenever the batch had the hard-coded size;
    ``fxdp.check`` reported it and ``privatize`` did not."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            h = x.view(8, -1)
            return self.fc(h - h.mean(0))

    dp = fxdp.privatize(Fixed(), capture="fx")
    with pytest.raises(fxdp.UnsupportedOpError, match=r"(?s)cannot prove.*hard-codes the batch size.*x\.shape\[0\]"):
        dp(torch.randn(8, 3, 4))
    dp = fxdp.privatize(Fixed(), capture="fx", allow_unsafe_model=True)
    with pytest.warns(UserWarning, match="allow_unsafe_model=True"):
        dp(torch.randn(8, 3, 4))


def test_check_reads_flat_inputs_with_their_offsets():
    """fxdp.check takes privatize's input_batch_dims: flat token ids beside offsets. Read
    along dimension 0 as a batch, the 11 token ids were reported as a model that
    hard-codes its batch size."""
    report = fxdp.check(Bags(), (_TEXT, _OFFSETS), input_batch_dims=[None, 0])
    assert report.ok, report
    assert report.example_batch_size == 4 and "batch dimension of each input none, 0" in str(report)
    report = fxdp.check(Bags("centered"), (_TEXT, _OFFSETS), input_batch_dims=[None, 0])
    assert [(f.code, f.source) for f in report.errors] == [("batch-reduction", "h = h - h.mean(0)")]
    unread = fxdp.check(Bags(), (_TEXT, _OFFSETS)).errors  # without them, the flat ids read as a batch
    assert len(unread) == 1 and "input_batch_dims" in unread[0].fix, unread
    unread = fxdp.check(FlatBags(), (torch.randint(0, 20, (9,)), torch.tensor([0, 2, 5]))).errors
    assert [f.code for f in unread] == ["batch-mixing"] and "input_batch_dims=[None, 0]" in unread[0].fix
    with pytest.raises(ValueError, match="dynamic=True.*input_batch_dims"):
        fxdp.check(Bags(), (_TEXT, _OFFSETS), input_batch_dims=[None, 0], dynamic=True)


class _Along(nn.Module):
    """An op that keeps the batch dimension's shape and combines samples along it (or not)."""

    def __init__(self, op):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.op = op

    def forward(self, x):
        if self.op == "cummax":
            x = torch.cummax(x, 0).values
        elif self.op == "renorm":
            x = torch.renorm(x, 2, 1, 1.0)  # each column over the batch renormalized
        elif self.op == "einsum":
            x = torch.einsum("bi,ci->bi", x, x)  # sums over every sample c
        elif self.op == "index_add":
            x = torch.zeros_like(x).index_add(0, torch.zeros(x.shape[0], dtype=torch.long), x)
        elif self.op == "take":
            x = torch.take(x, torch.arange(x.numel()).flip(0)).view_as(x)
        elif self.op == "own-einsum":
            x = torch.einsum("bi,bi->bi", x, x)
        elif self.op == "own-renorm":
            x = torch.renorm(x, 2, 0, 1.0)  # each sample renormalized
        elif self.op == "own-in-place":  # aten.hardswish_ writes its input (MobileNetV3's activation)
            x = nn.functional.hardswish(x * 1.0, inplace=True)
        elif self.op in ("fft-batch", "fft-features"):  # not in the symbolic path's op table
            x = torch.fft.fft(x, dim=0 if self.op == "fft-batch" else 1).real
        return self.fc(x)


def test_an_unknown_op_is_proven_by_its_aten_graph_or_refused(f64):
    """An op not in the symbolic path's table was probed (each sample's inputs perturbed in
    turn) and, when only that sample's outputs moved, served with a warning: evidence on one
    batch, not a proof. It is now lowered to ATen alone (``batch_mixing/lowering.py``) and read
    by the export path's batch rules: ``fft(x, dim=1)`` is proven and served exactly, without
    a warning; ``fft(x, dim=0)`` is refused."""
    x = torch.randn(6, 4)
    dp = fxdp.privatize(_Along("fft-batch"), capture="fx")
    with pytest.raises(fxdp.UnsupportedOpError, match="fft.*perturbing sample 0's inputs changed sample 1's output"):
        dp(x)
    assert [f.code for f in fxdp.check(_Along("fft-batch"), x).errors] == ["unknown-op"]
    torch.manual_seed(0)
    model = _Along("fft-features").double()
    dp = fxdp.privatize(model, capture="fx", loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp(x).pow(2).sum().backward()
    _assert_each_sample_alone(model, model.fc.weight, x, model.fc.weight.grad_sample.clone())
    assert not fxdp.check(_Along("fft-features"), x).warnings


def _mixes_beyond_a_threshold(x):
    return x + x.flip(0) * (x.flip(0).abs() > 1e3)  # another sample's row, where its values are large


def _taken(x):
    return torch.take(x, torch.arange(x.numel())).view_as(x)  # aten.take: flat indices, no batch rule


torch.fx.wrap("_mixes_beyond_a_threshold")
torch.fx.wrap("_taken")


class _Wrapped(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.f = f

    def forward(self, x):
        if self.f == "threshold":
            return self.fc(_mixes_beyond_a_threshold(x))
        if self.f == "take-accepted":
            return self.fc(_taken(x))  # fxdp: ignore
        return self.fc(_taken(x))


def test_an_op_the_probe_cannot_see_mixing_is_refused_by_its_batch_rules():
    """A helper that adds another sample's row only where its values are large: the probe's
    perturbations do not reach the threshold, so it was served (with a warning) and samples
    could influence each other. Its ATen graph flips the batch: refused."""
    x = torch.randn(6, 4)
    with pytest.raises(fxdp.UnsupportedOpError, match="(?s)_mixes_beyond_a_threshold.*aten.flip"):
        fxdp.privatize(_Wrapped("threshold"), capture="fx")(x)
    assert [f.code for f in fxdp.check(_Wrapped("threshold"), x).errors] == ["unknown-op"]


def test_an_op_without_batch_rules_is_refused_unless_accepted():
    """Lowered to ``aten.take`` (flat indices: no batch rule), an op cannot be proven: it is
    refused with the ways out, though its probe is clean; ``# fxdp: ignore`` on its line
    accepts it."""
    x = torch.randn(6, 4)
    with pytest.raises(fxdp.UnsupportedOpError, match="(?s)cannot prove.*_taken.*aten.take.*register_semantics"):
        fxdp.privatize(_Wrapped("take"), capture="fx")(x)
    assert [f.code for f in fxdp.check(_Wrapped("take"), x).errors] == ["unproven-op"]
    fxdp.privatize(_Wrapped("take-accepted"), capture="fx")(x).sum().backward()


def _noisy(x):
    return x + torch.rand_like(x)


def _shifted(x, idx):
    return x + idx.float().unsqueeze(1)


def _shifted_by_another(x, idx):
    return x + idx.flip(0).float().unsqueeze(1)


torch.fx.wrap("_noisy")
torch.fx.wrap("_shifted")
torch.fx.wrap("_shifted_by_another")


class _Noisy(nn.Module):
    def __init__(self, f=None):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.f = f

    def forward(self, x):
        return self.fc(_noisy(x))


class _Shifted(_Noisy):
    def forward(self, x, idx):
        return self.fc(_shifted(x, idx))


class _ShiftedByAnother(_Noisy):
    def forward(self, x, idx):
        return self.fc(_shifted_by_another(x, idx))


def _spectrum(h):
    return torch.fft.rfft(h, dim=-1).abs()  # per row


def _rows_rolled(h):
    return h + h.roll(1, 0)  # each row with the row before it: across samples at their first rows


torch.fx.wrap("_spectrum")
torch.fx.wrap("_rows_rolled")


class _OnFoldedRows(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.f = f

    def forward(self, x):  # [B, T, 4]
        h = _spectrum(x.flatten(0, 1)) if self.f == "spectrum" else _rows_rolled(x.flatten(0, 1))[:, :3]
        return self.fc(h.view(x.shape[0], x.shape[1], 3))


def test_an_unknown_op_on_a_batch_major_fold_is_lowered_with_its_rows(f64):
    """An unknown op on ``x.flatten(0, 1)`` (``[B*T, d]``, each sample's rows together) is
    lowered with the batch a dimension of its own and flattened in the captured call:
    per row, it is proven and served exactly; rolling the rows (a sample's first row
    gets the previous sample's last), refused."""
    torch.manual_seed(0)
    model = _OnFoldedRows("spectrum").double()
    x = torch.randn(4, 5, 4)
    dp = fxdp.privatize(model, capture="fx", loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp(x).pow(2).sum().backward()
    _assert_each_sample_alone(model, model.fc.weight, x, model.fc.weight.grad_sample.clone())
    with pytest.raises(fxdp.UnsupportedOpError, match="(?s)_rows_rolled.*aten.roll"):
        fxdp.privatize(_OnFoldedRows("roll"), capture="fx")(x)


class _RowScale(nn.Module):
    """A leaf module without weights fxdp has no semantics for: each row scaled by a fixed
    vector, or by the batch's column maxima (samples combined)."""

    def __init__(self, pooled=False):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4))
        self.pooled = pooled

    def forward(self, x):
        return x * self.scale * (x.amax(0) if self.pooled else 1.0)


class _UsesRowScale(nn.Module):
    def __init__(self, pooled=False):
        super().__init__()
        self.leaf = _RowScale(pooled)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.leaf(x))


def test_a_leaf_module_without_semantics_is_lowered_and_read():
    """A module kept whole (``leaf_modules=``) without known semantics is lowered with its
    buffers: per-sample, it is served without a warning; pooling over the batch, refused."""
    x = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxdp.privatize(_UsesRowScale(), capture="fx", leaf_modules=[_RowScale])(x).sum().backward()
    with pytest.raises(fxdp.UnsupportedOpError, match="(?s)_RowScale.*amax"):
        fxdp.privatize(_UsesRowScale(pooled=True), capture="fx", leaf_modules=[_RowScale])(x)


def test_an_unknown_op_with_integer_inputs_or_random_draws():
    """Integer inputs (token ids, positions) are perturbed to other valid values by the
    probe: an op that reads another sample's ids is refused; one that reads its own, and a
    random op, are proven by their ATen graphs and served without a warning."""
    x, idx = torch.randn(5, 4), torch.arange(5)
    with pytest.raises(fxdp.UnsupportedOpError, match="perturbing sample 0's inputs changed sample 4's output"):
        fxdp.privatize(_ShiftedByAnother(), capture="fx")(x, idx)
    for model, inputs in [(_Shifted(), (x, idx)), (_Noisy(), (x,))]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fxdp.privatize(model, capture="fx")(*inputs).sum().backward()


@pytest.mark.parametrize("op", ["cummax", "renorm", "einsum", "index_add", "take"])
def test_the_export_path_refuses_ops_that_combine_samples_along_the_batch(op):
    """On the torch.export path (every Hugging Face model) the analysis read shapes: an op
    that keeps the batch dimension and combines samples along it was served. Each op is
    now read by its batch rule (``passes/batch_rules.py``; ``take``, on flat indices, has
    none, so it is refused too), or as the reshape it is (``view_as`` of a fold of
    unknown order)."""
    x = torch.randn(6, 4)
    dp = fxdp.privatize(_Along(op), capture="export")
    with pytest.raises(fxdp.UnsupportedOpError, match="batch-op|batch-rule|batch-fold"):
        dp(x)
    assert not fxdp.check(_Along(op), x).ok


@pytest.mark.parametrize("op", ["own-einsum", "own-renorm", "own-in-place"])
def test_the_export_path_serves_the_same_ops_within_each_sample_exactly(op, f64):
    torch.manual_seed(0)
    model = _Along(op).double()
    x = torch.randn(6, 4)
    dp = fxdp.privatize(model, capture="export", loss_reduction="sum")
    dp(x).pow(2).sum().backward()
    _assert_each_sample_alone(model, model.fc.weight, x, model.fc.weight.grad_sample.clone())
