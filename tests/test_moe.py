"""Mixture-of-experts language models (Mixtral, Qwen2-MoE): with Hugging Face's
``experts_implementation="batched_mm"`` each token's chosen experts are applied to it alone
(its rows repeated once per expert, the experts' weights gathered per row): served, each
sample's gradient (routers and experts) its gradient alone. The default implementation sorts
the whole batch's tokens by expert: refused, naming the fix."""
from __future__ import annotations

import pytest
import torch

import fxdp

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("f64", "quiet")

V, B, L = 50, 3, 6


def _mixtral(**kw):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=24, num_local_experts=4,
                                     num_experts_per_tok=2)
    return transformers.AutoModelForCausalLM.from_config(cfg, **kw).train()


def test_batched_mm_experts_are_exact_per_sample():
    model = _mixtral(experts_implementation="batched_mm")
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    dp = fxdp.privatize(model, loss_reduction="sum")
    dp(input_ids=ids).logits.pow(2).sum().backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    assert any("experts" in n for n in got) and any("gate" in n for n in got)
    for i in range(B):
        model.zero_grad()
        model(input_ids=ids[i:i + 1]).logits.pow(2).sum().backward()
        for n, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n][i], want, rtol=1e-6, atol=1e-9, msg=n)


def test_experts_sorted_over_the_batch_are_refused_with_the_fix():
    model = _mixtral().float()
    with pytest.raises(fxdp.UnsupportedOpError, match='experts_implementation="batched_mm"'):
        fxdp.privatize(model)(input_ids=torch.randint(0, V, (B, L))).logits.sum().backward()
