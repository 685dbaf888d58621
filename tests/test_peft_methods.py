"""PEFT methods besides LoRA (the zoo's LoRA GPT-2): each sample's gradient equals its gradient
alone, with the model's own labels= loss (padding in the batch, float64). Prompt learning
expands a constant over the batch and cuts it to one row (prompt tuning, P-tuning): served
as parameter subgraphs; adapters that rescale or rotate the frozen weights (IA3, DoRA, OFT)
and those that add factored updates (AdaLoRA, VeRA) by their captured ops."""
from __future__ import annotations

import pytest
import torch

import fxdp
from oracle import train_hf_epoch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("f64", "quiet")

V, B, L = 97, 4, 9
CAUSAL = peft.TaskType.CAUSAL_LM
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=48))


METHODS = {
    "prompt-tuning": (_gpt2, lambda: peft.PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=3)),
    "p-tuning": (_gpt2, lambda: peft.PromptEncoderConfig(task_type=CAUSAL, num_virtual_tokens=3,
                                                         encoder_hidden_size=16)),
    "prefix-tuning": (_gpt2, lambda: peft.PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=3)),
    "ia3": (_llama, lambda: peft.IA3Config(task_type=CAUSAL, target_modules=LLAMA_TARGETS,
                                           feedforward_modules=["down_proj"])),
    "dora": (_llama, lambda: peft.LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                             lora_dropout=0.0, use_dora=True)),
    # AdaLoRA adds its orthogonality penalty (parameters alone) to the labels= loss, in place
    "adalora": (_llama, lambda: peft.AdaLoraConfig(task_type=CAUSAL, init_r=4, target_r=2, orth_reg_weight=0.5,
                                                   target_modules=LLAMA_TARGETS, total_step=10)),
    "vera": (_llama, lambda: peft.VeraConfig(task_type=CAUSAL, r=4, target_modules=["q_proj", "o_proj"])),
    "oft": (_llama, lambda: peft.OFTConfig(task_type=CAUSAL, r=0, oft_block_size=4, target_modules=LLAMA_TARGETS)),
}


def _case(name: str):
    base, config = METHODS[name]
    torch.manual_seed(0)
    model = peft.get_peft_model(base(), config()).double().train()
    with torch.no_grad():  # adapters start as the identity (zeros): move them off it
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in one sample
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_per_sample_gradients_equal_each_sample_alone(name):
    model, x = _case(name)
    dp = fxdp.privatize(model)  # loss_reduction="mean", as the model's loss
    dp(**x).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad_sample for n, p in trainable.items()}
    assert all(v is not None and v.shape == (B,) + p.shape for (n, p), v in zip(trainable.items(), got.values()))
    for i in range(B):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in x.items()}).loss.backward()
        for n, p in trainable.items():
            # HF computes the LM loss on float32 logits: float32 tolerance
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-5, atol=1e-7, msg=f"{name}: {n}, sample {i}")
        assert any(p.grad.abs().max() > 1e-4 for p in trainable.values())


def test_prompt_tuning_trains_with_book_keeping_and_poisson_sampling():
    model, x = _case("prompt-tuning")
    engine, before = train_hf_epoch(model, x)
    assert all(not torch.equal(p, b) for p, b in before) and engine.get_epsilon(1e-5) > 0
    assert fxdp.check(model, x).ok
