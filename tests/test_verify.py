"""fxdp.verify: the dynamic check catches mixing that static analysis was told to
ignore, and the per-sample gradient cross-check (for the engine's first step)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.verify import FirstStepCrossCheck, cross_check
from models import FlatBags

pytestmark = pytest.mark.usefixtures("quiet")


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0)


class Accepted(nn.Module):
    """The same mixing, suppressed by a comment."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))  # fxdp: ignore


class Clean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class GradMix(torch.autograd.Function):
    """Identity forward; the backward averages gradients over the batch."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.mean(0, keepdim=True).expand_as(g)


class BackwardOnlyMixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(GradMix.apply(self.fc1(x)))


def test_verify_catches_mixing_that_check_ignores():
    x = torch.randn(5, 4)
    assert not fxdp.check(Centered(), x).ok
    assert fxdp.check(Centered(), x, ignore=["batch-reduction"]).ok  # static analysis told to accept it
    res = fxdp.verify(Centered(), x)
    assert not res.ok and res.max_output_change > 0.01
    assert any("changed output 0 of sample" in f for f in res.failures)
    with pytest.raises(fxdp.PerSampleGradientError, match="samples influence each other"):
        res.raise_if_failed()
    assert fxdp.check(Accepted(), x).ok and not fxdp.verify(Accepted(), x).ok


def test_verify_sees_mixing_in_the_backward_only():
    x = torch.randn(5, 4)
    r = fxdp.check(BackwardOnlyMixing(), x)  # its backward is not the forward's derivative: refused
    assert not r.ok and [(e.code, e.line) for e in r.errors] == [("autograd-function", 68)]
    assert "GradMix" in r.errors[0].problem
    res = fxdp.verify(BackwardOnlyMixing(), x)
    assert not res.ok and res.max_output_change < 1e-6  # outputs are unchanged ...
    assert any("per-sample gradients of fc1" in f for f in res.failures)  # ... gradients are not


def test_clean_model_passes_with_dropout_and_leaves_it_untouched():
    torch.manual_seed(0)
    m = Clean()
    x = torch.randn(6, 4)
    m.fc1.weight.grad = torch.ones_like(m.fc1.weight)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    res = fxdp.verify(m, x)
    assert res.ok and res.perturbed == [0, 5] and res.max_output_change == 0.0, str(res)
    assert "OK" in str(res)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(m.fc1.weight.grad, torch.ones_like(m.fc1.weight)) and m.fc2.weight.grad is None


def test_batchnorm_fails_and_running_stats_are_restored():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    stats = m[1].running_mean.clone()
    assert not fxdp.verify(m, torch.randn(5, 4)).ok
    assert torch.equal(m[1].running_mean, stats) and int(m[1].num_batches_tracked) == 0
    assert fxdp.verify(fxdp.privatize(m), torch.randn(5, 4)).ok  # after privatize's rewrite


def test_integer_inputs_and_seq_first():
    class Tokens(nn.Module):
        def __init__(self, mix):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.mix = mix

        def forward(self, tok):  # [T, B]
            h = self.emb(tok)
            return h - h.mean(1, keepdim=True) if self.mix else h - h.mean(0, keepdim=True)

    tok = torch.randint(0, 11, (6, 4))
    assert fxdp.verify(Tokens(False), tok, batch_first=False, vocab=11).ok
    assert not fxdp.verify(Tokens(True), tok, batch_first=False, vocab=11).ok
    with pytest.raises(ValueError, match="at least 2"):
        fxdp.verify(Clean(), torch.randn(1, 4))


def test_verify_a_privatized_model_keeps_its_grad_samples():
    dp = fxdp.privatize(Clean())
    x = torch.randn(4, 4)
    dp(x).sum().backward()
    gs = dp.fc1.weight.grad_sample.clone()
    assert fxdp.verify(dp, x).ok
    assert torch.equal(dp.fc1.weight.grad_sample, gs)


# -- cross-check ----------------------------------------------------------------------------------

def test_cross_check_agrees_with_batch_of_one():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    dp = fxdp.privatize(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    res = cross_check(dp, x)
    assert res.ok and res.samples[0] == 0 and res.samples[-1] == 5 and max(res.max_rel_error.values()) < 1e-10
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res = cross_check(dp, x, targets=(y,), loss_fn=F.cross_entropy)
    assert res.ok, str(res)


def test_cross_check_takes_a_batch_dimension_per_input(f64):
    """A model privatized with input_batch_dims (an LSTM's [L, B, H] states beside [B, T, d]
    inputs; flat token ids beside their offsets) is cross-checked sample by sample; before,
    the check (and so make_private's first step) raised TypeError on the list of dims."""

    class StatefulLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 5, batch_first=True)
            self.fc = nn.Linear(5, 2)

        def forward(self, x, h0, c0):
            return self.fc(self.rnn(x, (h0, c0))[0][:, -1])

    torch.manual_seed(0)
    dp = fxdp.privatize(StatefulLSTM().double(), input_batch_dims=[0, 1, 1])
    res = cross_check(dp, (torch.randn(3, 6, 4), torch.randn(1, 3, 5), torch.randn(1, 3, 5)))
    assert res.ok and res.samples == [0, 1, 2] and max(res.max_rel_error.values()) < 1e-10, str(res)
    dp = fxdp.privatize(FlatBags(30, 4).double(), input_batch_dims=[None, 0])
    res = cross_check(dp, (torch.randint(0, 30, (9,)), torch.tensor([0, 2, 2, 6])))
    assert res.ok and res.samples == [0, 1, 2, 3] and max(res.max_rel_error.values()) < 1e-10, str(res)


def test_cross_check_catches_a_wrong_rule(monkeypatch):
    from fxdp.rules.linear import LinearRule

    dp = fxdp.privatize(nn.Sequential(nn.Linear(4, 3)))
    real = LinearRule.grad_sample

    def doubled(self, args, g, needs):
        return {k: 2 * v for k, v in real(self, args, g, needs).items()}

    monkeypatch.setattr(LinearRule, "grad_sample", doubled)
    res = cross_check(dp, torch.randn(5, 4))
    assert not res.ok and any("0.weight" in f for f in res.failures)
    with pytest.raises(fxdp.PerSampleGradientError, match="batch-of-one"):
        res.raise_if_failed()


def test_cross_check_restores_the_step_state_and_skips_random_models():
    dp = fxdp.privatize(Clean())
    x = torch.randn(4, 4)
    dp(x).pow(2).sum().backward()
    g, gs = dp.fc1.weight.grad.clone(), dp.fc1.weight.grad_sample.clone()
    gen = dp.recorder.generation
    assert cross_check(dp, x).ok
    assert torch.equal(dp.fc1.weight.grad, g) and torch.equal(dp.fc1.weight.grad_sample, gs)
    assert dp.recorder.generation == gen and dp.drop.training

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.dropout(x, 0.5, True))

    res = cross_check(fxdp.privatize(Noisy()), x)
    assert res.ok and res.skipped and "random" in str(res)
    with pytest.raises(TypeError, match="privatized"):
        cross_check(Clean(), x)


def test_first_step_cross_check():
    dp = fxdp.privatize(Clean())
    guard = FirstStepCrossCheck(dp)
    assert guard.run() is None  # nothing recorded yet
    with torch.no_grad():
        dp(torch.randn(3, 4))  # not a training forward
    assert guard.inputs is None
    x = torch.randn(5, 4)
    dp(x).sum().backward()
    gs = dp.fc2.weight.grad_sample.clone()
    res = guard.run()
    assert res is not None and res.ok and guard.result is res
    assert torch.equal(dp.fc2.weight.grad_sample, gs)
    assert guard.run() is None  # once
    dp.zero_grad()
    dp(torch.randn(2, 4)).sum().backward()  # the hook is gone: later batches are not recorded
    assert guard.inputs is None


def test_first_step_cross_check_raises_on_mismatch(monkeypatch):
    from fxdp.rules.linear import LinearRule

    dp = fxdp.privatize(nn.Sequential(nn.Linear(4, 3)))
    guard = FirstStepCrossCheck(dp)
    real = LinearRule.grad_sample
    monkeypatch.setattr(LinearRule, "grad_sample",
                        lambda self, a, g, n: {k: v + 1 for k, v in real(self, a, g, n).items()})
    dp(torch.randn(4, 4)).sum().backward()
    with pytest.raises(fxdp.PerSampleGradientError):
        guard.run()
    g2 = FirstStepCrossCheck(dp, raise_on_failure=False)
    dp(torch.randn(4, 4)).sum().backward()
    assert g2.run().ok is False
    g2.close()


class _KeywordModel(nn.Module):
    """Keyword inputs, as a Hugging Face model takes its batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return {"logits": self.fc(h).sum(1)}


def test_first_step_cross_check_runs_on_the_export_path_with_keyword_inputs(monkeypatch):
    """The exported DP model's call skipped nn.Module's, so the check's forward pre-hook never
    recorded a batch: make_private's first-step cross-check (on by default) never ran on a
    model captured with torch.export (every Hugging Face model). It runs now, on the keyword
    inputs, and catches a wrong per-sample gradient there."""
    from fxdp.rules.embedding import EmbeddingRule

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 10, (5, 6)), "attention_mask": torch.ones(5, 6)}
    batch["attention_mask"][1, 4:] = 0
    dp = fxdp.privatize(_KeywordModel(), capture="export")
    guard = FirstStepCrossCheck(dp)
    dp(**batch)["logits"].sum().backward()
    res = guard.run()
    assert res is not None and res.ok and set(res.max_rel_error) == {"emb.weight", "fc.weight", "fc.bias"}
    real = EmbeddingRule.grad_sample
    monkeypatch.setattr(EmbeddingRule, "grad_sample",
                        lambda self, a, g, n: {k: v * 2 for k, v in real(self, a, g, n).items()})
    dp = fxdp.privatize(_KeywordModel(), capture="export")
    guard = FirstStepCrossCheck(dp)
    dp(**batch)["logits"].sum().backward()
    with pytest.raises(fxdp.PerSampleGradientError, match="emb.weight"):
        guard.run()


def test_output_batch_dim_is_found_when_sizes_coincide():
    """[T, B, D] inputs, a [B, 3] output with B == 3 == T: the output's batch dim is
    the one that shrinks to 1 for one sample, not the first of size B."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # [T, B, 4] -> [B, 3]
            return self.head(torch.tanh(self.proj(x)).sum(0))

    torch.manual_seed(5)
    model = Seq().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    dp = fxdp.privatize(model, batch_first=False)
    res = cross_check(dp, x)
    assert res.ok and max(res.max_rel_error.values()) < 1e-10, str(res)
    assert fxdp.verify(model, x, batch_first=False).ok


def test_bfloat16_model_passes_the_first_step_check_and_a_mixing_one_fails():
    """A bfloat16 model's per-sample gradients differ from each sample run alone by its
    rounding (a few ``eps`` = 2^-7 of the scale: the batch and a sample sum in different
    orders), not by the float32 tolerance (0.1%): ``make_private``'s first-step check refused
    every bfloat16 model before. A rule off by 5% still fails at bfloat16's tolerance."""
    from fxdp.rules.linear import LinearRule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32),
                          nn.Linear(32, 5)).bfloat16()
    dp = fxdp.privatize(model)
    idx, y = torch.randint(0, 100, (32, 9)), torch.randint(0, 5, (32,))
    res = cross_check(dp, idx, targets=(y,), loss_fn=lambda out, t: F.cross_entropy(out.mean(1).float(), t),
                      samples=8)
    assert res.ok, str(res)
    assert max(res.max_rel_error.values()) > 1e-3  # the float32 tolerance would have refused it
    real = LinearRule.grad_sample

    def off(self, args, g, needs):
        return {k: 1.05 * v for k, v in real(self, args, g, needs).items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LinearRule, "grad_sample", off)
        res = cross_check(dp, idx, targets=(y,), loss_fn=lambda out, t: F.cross_entropy(out.mean(1).float(), t),
                          samples=8)
    assert not res.ok
