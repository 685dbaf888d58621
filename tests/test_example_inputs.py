"""``example_inputs`` as a tensor, a tuple or a dict of keyword inputs (a Hugging Face batch),
the same in ``fxdp.privatize``, ``fxdp.check`` and ``fxdp.verify`` (``fxdp.export``:
tests/test_export.py). A dict was once iterated as a tuple of its key strings: privatize
blamed the model ("cannot capture it with torch.export"), check and verify found no batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdp
from fxdp.example_inputs import call_inputs
from oracle import quiet_privatize


class KeywordNet(nn.Module):
    """``forward(x, mask=None)``: called as ``model(x=..., mask=...)`` like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None):
        h = self.fc(x)
        return h if mask is None else h * mask


class KeywordMixingNet(KeywordNet):
    """Mixes the batch through its keyword input: ``mask - mask.mean(0)``."""

    def forward(self, x, mask=None):
        return self.fc(x) * (mask - mask.mean(0))


class KwargsNet(nn.Module):
    """``forward(**batch)``: symbolic tracing cannot read it, ``torch.export`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, **batch):
        return self.fc(batch["x"]) * batch["mask"]


def _batch(B: int = 5):
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(B, 4, generator=gen), "mask": torch.rand(B, 3, generator=gen)}


def test_call_inputs_forms():
    x = torch.zeros(2, 3)
    assert call_inputs(x) == ((x,), {})
    assert call_inputs((x, None)) == ((x, None), {})
    assert call_inputs([x]) == ((x,), {})
    args, kwargs = call_inputs({"input_ids": x}, {"attention_mask": x})
    assert args == () and list(kwargs) == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("bad, match", [
    ("text", "must be a tensor, a tuple"),
    (3, "must be a tensor, a tuple"),
    ({0: torch.zeros(2)}, "needs str keys"),
])
def test_call_inputs_refuses_what_forward_cannot_take(bad, match):
    with pytest.raises(TypeError, match=match):
        call_inputs(bad)


def test_call_inputs_refuses_an_input_given_twice():
    with pytest.raises(TypeError, match=r"both give \['x'\]"):
        call_inputs({"x": torch.zeros(2)}, {"x": torch.zeros(2)})


def test_privatize_analyzes_a_tensor_as_one_input():
    """A tensor is the one positional input (it was iterated into its rows): the batch
    dimensions analysed up front are those the training call uses."""
    torch.manual_seed(0)
    x = _batch()["x"]
    dp = quiet_privatize(nn.Sequential(nn.Linear(4, 3)), example_inputs=x)
    assert len(dp._batch_dims_cache) == 1
    dp(x).sum().backward()
    assert len(dp._batch_dims_cache) == 1  # the training call found the analysis made up front


def test_privatize_symbolic_takes_keyword_inputs():
    torch.manual_seed(0)
    batch = _batch()
    dp = quiet_privatize(KeywordNet(), example_inputs=batch)
    assert len(dp._batch_dims_cache) == 1
    dp(**batch).sum().backward()
    assert len(dp._batch_dims_cache) == 1
    assert dp.fc.weight.grad_sample.shape == (5, 3, 4)


def test_privatize_exported_takes_keyword_inputs():
    torch.manual_seed(0)
    batch = _batch()
    dp = quiet_privatize(KwargsNet(), example_inputs=batch, capture="export", loss_reduction="sum")
    assert len(dp.graphs) == 1  # captured at privatize, from the dict
    out = dp(**batch)
    assert len(dp.graphs) == 1  # the training call reused it
    out.sum().backward()
    for i in range(5):  # each sample's gradient is its own
        ref = nn.Linear(4, 3)
        ref.load_state_dict({"weight": dp.fc.weight.detach(), "bias": dp.fc.bias.detach()})
        (ref(batch["x"][i:i + 1]) * batch["mask"][i:i + 1]).sum().backward()
        torch.testing.assert_close(dp.fc.weight.grad_sample[i], ref.weight.grad)


def test_check_takes_a_dict_as_keyword_inputs():
    batch = _batch()
    report = fxdp.check(KeywordNet(), batch)
    assert report.ok
    assert [l.name for l in report.layers] == [l.name for l in fxdp.check(KeywordNet(), (), example_kwargs=batch).layers]
    assert not fxdp.check(KeywordMixingNet(), batch).ok  # the keyword input is analysed, batched


def test_verify_perturbs_keyword_inputs():
    torch.manual_seed(0)
    assert fxdp.verify(KeywordNet().double(), {k: v.double() for k, v in _batch().items()}).ok
    torch.manual_seed(0)
    res = fxdp.verify(KeywordMixingNet().double(), {k: v.double() for k, v in _batch().items()})
    assert not res.ok and any("changed output" in f for f in res.failures)


def test_a_hugging_face_batch_is_keyword_inputs():
    transformers = pytest.importorskip("transformers")
    x = torch.zeros(2, 3, dtype=torch.long)
    batch = transformers.BatchEncoding({"input_ids": x, "attention_mask": x})  # what a tokenizer returns
    args, kwargs = call_inputs(batch)
    assert args == () and list(kwargs) == ["input_ids", "attention_mask"] and kwargs["input_ids"] is x


def test_a_forward_taking_kwargs_is_captured_with_torch_export():
    """``forward(**batch)`` traced symbolically gives one placeholder for every keyword, so
    ``model(x=...)`` had no argument ``x`` to bind: ``capture="auto"`` takes torch.export."""
    from fxdp.exported_module import ExportedDPModule
    from fxdp.passes.export_graph import symbolic_tracing_drops

    assert symbolic_tracing_drops(KwargsNet()) == "forward(**batch)"
    assert symbolic_tracing_drops(KeywordNet()) is None  # named keywords: symbolic tracing serves them
    torch.manual_seed(0)
    batch = _batch()
    dp = quiet_privatize(KwargsNet(), loss_reduction="sum")
    assert isinstance(dp, ExportedDPModule)
    dp(**batch).sum().backward()
    g = batch["mask"][:, :, None] * batch["x"][:, None, :]  # d/dW of sum(W x * mask), per sample
    torch.testing.assert_close(dp.fc.weight.grad_sample, g)
    assert fxdp.check(KwargsNet(), batch).ok
