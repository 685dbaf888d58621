"""fxdp.loss_check: a loss reduced otherwise than loss_reduction says is warned about."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxdp


def _warnings(loss_reduction, reduction, loss="ce"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    dp = fxdp.privatize(m, loss_reduction=loss_reduction)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dp(x)
        if loss == "ce":
            nn.functional.cross_entropy(out, y, reduction=reduction).backward()
        else:
            nn.functional.mse_loss(out, torch.randn(16, 3), reduction=reduction).backward()
        dp(x).sum().backward()  # later steps are not checked again
    return [str(w.message) for w in caught if "looks reduced" in str(w.message)]


@pytest.mark.parametrize("loss_reduction, reduction", [("mean", "sum"), ("sum", "mean")])
def test_mismatched_reduction_of_cross_entropy_is_warned_with_the_fix(loss_reduction, reduction):
    msgs = _warnings(loss_reduction, reduction)
    assert len(msgs) == 1 and f"loss_reduction={loss_reduction!r}" in msgs[0] and f"reduction={reduction!r}" in msgs[0]


def test_mismatched_reduction_of_nll_loss_on_log_probabilities_is_warned():
    torch.manual_seed(0)
    dp = fxdp.privatize(nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(-1)))
    with pytest.warns(UserWarning, match="looks reduced with 'sum'"):
        nn.functional.nll_loss(dp(torch.randn(16, 5)), torch.randint(0, 3, (16,)), reduction="sum").backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matching_reduction_and_other_losses_are_silent(reduction):
    assert _warnings(reduction, reduction) == []
    assert _warnings("mean" if reduction == "sum" else "sum", reduction, loss="mse") == []  # not judged


# --- a normalizer the batch shares: class weights, a batch's token count -------------------------

W = torch.tensor([1.0, 1.0, 50.0], dtype=torch.float64)


def _classifier(mode="materialize", log_softmax=False, **kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), *([nn.LogSoftmax(-1)] if log_softmax else [])).double()
    dp = fxdp.privatize(m, grad_sample_mode=mode, **kw)
    if mode == "bk":
        fxdp.optim.DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                               expected_batch_size=16).attach_bookkeeping(dp.bookkeeping)
    return m, dp


def _batch(seed, heavy):
    """16 samples, ``heavy`` of them of the class weighted 50."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=g)
    y[:heavy] = 2
    return x, y


def _clipped_sum(m, x, y, loss, C=1.0):
    """Each sample's gradient, clipped to C, summed (fxdp's per-sample gradients of ``loss``)."""
    dp = fxdp.privatize(m, grad_sample_mode="materialize", allow_unsafe_model=True)
    for p in m.parameters():
        p.grad, p.grad_sample = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss(dp(x), y).backward()
    gs = torch.cat([p.grad_sample.flatten(1) for p in m.parameters()], 1)
    return (gs * (C / gs.norm(dim=1)).clamp(max=1)[:, None]).sum(0)


def test_class_weights_with_a_mean_break_the_clip_bound_a_per_sample_mean_keeps_it():
    """Why the refusals below: with weight= and reduction='mean' the loss divides by the batch's
    sum of weights, so removing one sample rescales every other gradient: the clipped sums of two
    neighbouring batches lie 3.8 C apart (the noise is calibrated to C); reduced per sample, C."""
    m, _ = _classifier()
    x, y = _batch(1, heavy=1)
    mixed = lambda z, t: nn.functional.cross_entropy(z, t, weight=W)  # noqa: E731
    own = lambda z, t: nn.functional.cross_entropy(z, t, weight=W, reduction="none").mean()  # noqa: E731
    apart = float((_clipped_sum(m, x, y, mixed) - _clipped_sum(m, x[1:], y[1:], mixed)).norm())
    assert apart > 3.5  # 3.76 C
    assert float((_clipped_sum(m, x, y, own) - _clipped_sum(m, x[1:], y[1:], own)).norm()) <= 1.0 + 1e-9


@pytest.mark.parametrize("mode, kind", [("materialize", "ce"), ("bk", "ce"), ("materialize", "nll")])
def test_class_weights_normalized_by_the_batch_are_refused_when_batches_show_it(mode, kind):
    """Cross-entropy on logits, and nll_loss on log-probabilities (a model ending in LogSoftmax)."""
    m, dp = _classifier(mode, log_softmax=kind == "nll")
    loss = {"ce": lambda z, t: nn.functional.cross_entropy(z, t, weight=W),
            "nll": lambda z, t: nn.functional.nll_loss(z, t, weight=W)}[kind]
    x, y = _batch(1, heavy=1)
    loss(dp(x), y).backward()  # one batch cannot tell a batch's denominator from a fixed one
    dp.zero_grad()
    x, y = _batch(2, heavy=4)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(fxdp.PerSampleGradientError, match=r"weighs class 0's samples by .* in an earlier one.*"
                                                          r"Fix: reduce per sample.*reduction='none'\)\.mean\(\).*"
                                                          r"The 1 training step\(s\) before it used this loss too"):
        loss(dp(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("reduction, loss_reduction", [("mean", "mean"), ("sum", "sum")])
def test_class_weights_reduced_per_sample_are_served(reduction, loss_reduction):
    m, dp = _classifier(loss_reduction=loss_reduction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed, heavy, n in [(1, 1, 16), (2, 4, 11), (3, 9, 13), (4, 0, 16)]:  # Poisson batches vary in size
            x, y = _batch(seed, heavy)
            x, y = x[:n], y[:n]
            dp.zero_grad()
            getattr(nn.functional.cross_entropy(dp(x), y, weight=W, reduction="none"), reduction)().backward()


def test_ignore_index_with_a_mean_is_refused_and_allow_unsafe_model_only_warns():
    """reduction='mean' with ignore_index divides by the batch's count of labelled samples."""
    for allow in (False, True):
        m, dp = _classifier(allow_unsafe_model=allow)
        for step, ignored in enumerate([1, 5]):
            x, y = _batch(step, heavy=0)
            y[:ignored] = -100
            dp.zero_grad()
            if step == 0 or allow:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    nn.functional.cross_entropy(dp(x), y, ignore_index=-100).backward()
                assert any("allow_unsafe_model=True: served" in str(w.message) for w in caught) == (step == 1)
            else:
                with pytest.raises(fxdp.PerSampleGradientError, match="labelled samples"):
                    nn.functional.cross_entropy(dp(x), y, ignore_index=-100).backward()


class _TinyLM(nn.Module):
    def __init__(self, V=11, d=6):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, d), nn.Linear(d, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _lm_batch(lengths, T=7, V=11):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)
    labels = ids.clone()
    for i, n in enumerate(lengths):
        labels[i, n:] = -100  # padding
    return ids, labels


def _token_losses(logits, labels):
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="none").view(labels.shape)


@pytest.mark.parametrize("mode", ["materialize", "bk"])
def test_a_token_mean_over_the_batch_is_refused_at_the_first_step_and_training_goes_on(mode):
    torch.manual_seed(0)
    m = _TinyLM().double()
    engine = fxdp.PrivacyEngine()
    ids, labels = _lm_batch([7, 3, 5, 2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4)
    dp, opt, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                     grad_sample_mode=mode, poisson_sampling=False)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(fxdp.PerSampleGradientError, match=r"divides by the batch's count of tokens.*"
                                                          r"Fix: average each sample's own tokens"):
        nn.functional.cross_entropy(dp(ids).flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())) and engine.accountant.history == []
    opt.zero_grad()  # the fix: each sample's own token mean, then the batch's mean
    mask = labels != -100
    ((_token_losses(dp(ids), labels) * mask).sum(1) / mask.sum(1)).mean().backward()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("lengths, reduce, loss_reduction", [
    ([7, 3, 5, 2], "mean of sample means", "mean"),
    ([7, 3, 5, 2], "mean of sample sums", "mean"),
    ([7, 3, 5, 2], "sum", "sum"),
    ([5, 5, 5, 5], "token mean", "mean"),  # equal lengths: the mean of the samples' means
])
def test_per_sample_token_losses_are_served(lengths, reduce, loss_reduction):
    torch.manual_seed(0)
    dp = fxdp.privatize(_TinyLM().double(), loss_reduction=loss_reduction)
    ids, labels = _lm_batch(lengths)
    mask = labels != -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _token_losses(dp(ids), labels)
        loss = {"mean of sample means": lambda: ((t * mask).sum(1) / mask.sum(1)).mean(),
                "mean of sample sums": lambda: (t * mask).sum(1).mean(),
                "sum": lambda: (t * mask).sum(),
                "token mean": lambda: t[mask].mean()}[reduce]()
        loss.backward()


def test_a_pixel_mean_over_the_batch_with_ignored_pixels_is_refused():
    """Segmentation: cross_entropy on [B, C, H, W] logits with ignore_index and reduction='mean'
    divides by the batch's count of labelled pixels; each image's own mean is served."""
    torch.manual_seed(0)
    m = nn.Conv2d(2, 3, 1).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 5, 5))
    y[0, :3] = 255  # unlabelled pixels, a different count per image
    y[2, :, :1] = 255
    dp = fxdp.privatize(m)
    with pytest.raises(fxdp.PerSampleGradientError, match="count of tokens or pixels"):
        nn.functional.cross_entropy(dp(x), y, ignore_index=255).backward()
    dp = fxdp.privatize(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_pixel = nn.functional.cross_entropy(dp(x), y, ignore_index=255, reduction="none")
        mask = y != 255
        ((per_pixel * mask).sum((1, 2)) / mask.sum((1, 2))).mean().backward()
