"""QLoRA: LoRA adapters on a base model quantized by bitsandbytes (4-bit NF4, 8-bit), whose
frozen quantized layers ``torch.export`` cannot trace (``fxdp/layers/quantized.py`` calls each
as one row-wise op). On CPU, float32 compute: each sample's gradient equals its gradient alone,
and make_private trains the adapters."""
from __future__ import annotations

import pytest
import torch

import fxdp
from oracle import train_hf_epoch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("quiet")

V, B, L = 97, 4, 9


def _qlora(tmp_path, bits: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32) if bits == 4 else \
        transformers.BitsAndBytesConfig(load_in_8bit=True)
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                           task_type=peft.TaskType.CAUSAL_LM)
    model = peft.get_peft_model(base.train(), lora)  # train mode: bitsandbytes packs 4-bit weights in eval mode
    with torch.no_grad():  # LoRA's B starts at zero: move it off so every adapter gets a gradient
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("bits", [4, 8])
def test_per_sample_gradients_equal_each_sample_alone(tmp_path, bits):
    model, x = _qlora(tmp_path, bits)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in kinds
    dp = fxdp.privatize(model)
    dp(**x).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad_sample.clone() for n, p in trainable.items()}
    for i in range(B):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in x.items()}).loss.backward()
        for n, p in trainable.items():
            assert p.grad.abs().max() > 0, n
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{n}, sample {i}")


def test_make_private_trains_the_adapters(tmp_path):
    model, x = _qlora(tmp_path, 4)
    engine, before = train_hf_epoch(model, x)
    assert all(not torch.equal(p, b) for p, b in before) and engine.get_epsilon(1e-5) > 0
    assert fxdp.check(model, x).ok


def test_a_copy_of_the_model_calls_its_own_layers(tmp_path):
    """copy.deepcopy keeps a layer's handle in its __dict__: the copy's graph must still call the
    copy's layers (here the original's are changed after the copy)."""
    import copy

    model, x = _qlora(tmp_path, 4)
    fxdp.privatize(model)(**x).loss.backward()  # the original's layers get handles
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Linear4bit":
                m.weight.data.zero_()  # the original's 4-bit codes: every weight the same value now
    got = fxdp.privatize(twin)(**x).logits
    torch.testing.assert_close(got, twin(**x).logits)
