"""Real architectures as users have them: Hugging Face transformers and a peft LoRA
model, built from small configs with random weights (no download), handed to fxdp
as they are (keyword inputs, ``ModelOutput`` results, default dropout).

Each model: ``privatize`` captures it with ``torch.export`` (symbolic tracing
cannot read these models), no parameter is served by the ``torch.func``
fallback, per-sample gradients equal each sample's gradient computed alone
(float64, rtol 1e-6), and ``make_private`` trains three Poisson steps.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxdp
from fxdp.exported_module import ExportedDPModule
from oracle import assert_check_plans_as_run

transformers = pytest.importorskip("transformers")

V, B, T = 97, 4, 7


def _bert(p=0.1):
    cfg = transformers.BertConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=p, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), "cls"


def _roberta(p=0.1):
    cfg = transformers.RobertaConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=p, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=40, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg), "cls"


def _distilbert(p=0.1):
    cfg = transformers.DistilBertConfig(dropout=p, attention_dropout=p, seq_classif_dropout=p, vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=48,
                                        max_position_embeddings=32, num_labels=3)
    return transformers.DistilBertForSequenceClassification(cfg), "cls"


def _gpt2(p=0.1):
    cfg = transformers.GPT2Config(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg), "lm"


def _llama(p=0.0):
    cfg = transformers.LlamaConfig(attention_dropout=p, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg), "lm"


def _gemma(p=0.0):
    """Gemma's RMSNorm scales by ``1 + weight``: a value computed from a parameter, multiplied in."""
    cfg = transformers.GemmaConfig(attention_dropout=p, vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=48,
                                   max_position_embeddings=32, use_cache=False)
    return transformers.GemmaForCausalLM(cfg), "lm"


def _t5(p=0.1):
    cfg = transformers.T5Config(dropout_rate=p, vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                                use_cache=False, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg), "seq2seq"


def _vit(p=0.1):
    cfg = transformers.ViTConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=p, image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=48, num_labels=3)
    return transformers.ViTForImageClassification(cfg), "image"


def _swin(p=0.1):
    # 2x2 windows over 8x8 then 4x4 patches: every other block shifts its windows (roll, masked attention).
    # Swin's defaults: stochastic depth on, attention dropout off (its relative-position bias enters the
    # attention as its mask, so the attention is that parameter's use and a dropout there is refused)
    cfg = transformers.SwinConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=0.0, drop_path_rate=p, image_size=16,
                                  patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                  window_size=2, mlp_ratio=1.5, num_labels=3)
    return transformers.SwinForImageClassification(cfg), "image"


def _swinv2(p=0.1):
    # Swin-v2: cosine attention (F.normalize over each window's rows), a continuous position bias (an MLP)
    cfg = transformers.Swinv2Config(hidden_dropout_prob=p, attention_probs_dropout_prob=0.0, drop_path_rate=p,
                                    image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
                                    num_heads=[2, 2], window_size=2, mlp_ratio=1.5, num_labels=3)
    return transformers.Swinv2ForImageClassification(cfg), "image"


def _beit(p=0.1):
    # relative-position bias per layer: its index is built in forward by slice assignments (in place)
    cfg = transformers.BeitConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=0.0, drop_path_rate=p,
                                  image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48, num_labels=3,
                                  use_relative_position_bias=True)
    return transformers.BeitForImageClassification(cfg), "image"


def _bit(p=0.1):
    """Big Transfer (BiT): weight-standardized convolutions (``WeightStandardizedConv2d``) and
    GroupNorm, the ResNet family of DP image classification (De et al. 2022); no dropout."""
    cfg = transformers.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2, num_labels=3)
    return transformers.BitForImageClassification(cfg), "image"


def _lora_gpt2(p=0.1):
    peft = pytest.importorskip("peft")
    model, _ = _gpt2(p)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=p,
                          fan_in_fan_out=True)
    return peft.get_peft_model(model, cfg), "lm"


def _deberta(p=0.1, v3=True):
    kw = dict(hidden_dropout_prob=p, attention_probs_dropout_prob=p, vocab_size=V, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=48, max_position_embeddings=32, num_labels=3,
              relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16)
    if v3:  # DeBERTa-v3's: shared attention keys, normalized relative embeddings, no absolute positions
        kw.update(share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False)
    return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**kw)), "cls"


def _funnel(p=0.1):
    """Funnel Transformer: pools the sequence between blocks, and casts its mask with
    ``attention_mask.type_as(inputs_embeds)`` (the cast reads only ``inputs_embeds``' dtype:
    refused as mixing samples before the rule ``values_of_self``)."""
    cfg = transformers.FunnelConfig(hidden_dropout=p, attention_dropout=p, activation_dropout=p, vocab_size=V,
                                    d_model=32, n_head=2, d_head=16, d_inner=48, block_sizes=[1, 1],
                                    num_decoder_layers=1, num_labels=3)
    return transformers.FunnelForSequenceClassification(cfg), "cls"


def _mamba(p=0.1):
    """Mamba: a selective state-space model (Transformers' sequential scan on CPU), its mixer's
    projections cut by ``torch.split`` (``tensor_split`` in ATen, refused for want of a batch
    rule before); no dropout."""
    cfg = transformers.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, state_size=4, expand=2,
                                   conv_kernel=3, use_cache=False)
    return transformers.MambaForCausalLM(cfg), "lm"


ZOO = {"bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "gpt2": _gpt2, "llama": _llama,
       "gemma": _gemma, "t5": _t5, "vit": _vit, "swin": _swin, "swinv2": _swinv2, "beit": _beit,
       "bit": _bit, "funnel": _funnel, "mamba": _mamba,
       "lora-gpt2": _lora_gpt2}
#: served with raw-parameter captures (torch.func) where a parameter subgraph is repeated over
#: the batch (DeBERTa's relative position keys and queries, ``w.repeat(B, 1, 1)``), the dropout
#: on the relative embeddings replayed per sample
ZOO_REPEAT = {"deberta-v2": lambda p=0.1: _deberta(p, v3=False), "deberta-v3": _deberta}
ALL = {**ZOO, **ZOO_REPEAT}


def _inputs(kind: str, n: int, g: torch.Generator):
    if kind == "image":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.get_default_dtype())}
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1 % n, T - 2:] = 0  # padding in one sample
    x = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        x["decoder_input_ids"] = torch.randint(3, V, (n, 5), generator=g)
    return x


def _loss(kind: str, out, x, y):
    """A per-sample-sum loss computed outside the model (the model's own labels= loss
    averages over the whole batch's tokens)."""
    logits = out.logits
    if kind in ("lm", "seq2seq"):
        return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")
    return nn.functional.cross_entropy(logits, y, reduction="sum")


def _targets(kind: str, x, g):
    if kind == "lm":
        return x["input_ids"]
    if kind == "seq2seq":
        return x["decoder_input_ids"]
    return torch.randint(0, 3, (next(iter(x.values())).shape[0],), generator=g)


def _float64_case(name: str, seed: int):
    """``(model, kind, inputs, targets)``: the zoo model without dropout (a batch and each
    sample alone would draw different masks), in float64, train mode."""
    torch.manual_seed(0)
    model, kind = ALL[name](0.0)
    g = torch.Generator().manual_seed(seed)
    x = _inputs(kind, B, g)
    return model.double().train(), kind, x, _targets(kind, x, g)


@pytest.mark.parametrize("name", sorted(ALL))
def test_per_sample_gradients_equal_batch_of_one(name, f64):
    model, kind, x, y = _float64_case(name, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp = fxdp.privatize(model, loss_reduction="sum")
        assert isinstance(dp, ExportedDPModule)
        _loss(kind, dp(**x), x, y).backward()
    assert not [w for w in caught if "fxdp" in str(w.message)], [str(w.message) for w in caught]
    assert not [c for c in dp.captures if c.kind == "functorch"] or name in ZOO_REPEAT, dp.capture_table()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad_sample for n, p in trainable.items()}
    assert all(v is not None and v.shape == (B,) + p.shape for (n, p), v in zip(trainable.items(), got.values()))
    _assert_each_sample_alone(name, model, kind, x, y, got)


def _assert_each_sample_alone(name, model, kind, x, y, got):
    """``got[n][i]`` (per-sample gradients) equal each sample's gradient computed alone."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(B):
        model.zero_grad()
        xi = {k: v[i:i + 1] for k, v in x.items()}
        _loss(kind, model(**xi), xi, y[i:i + 1]).backward()
        for n, p in trainable.items():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n][i], want, rtol=1e-6, atol=1e-9, msg=f"{name}: {n}, sample {i}")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradient_checkpointing_is_named_as_not_applied_and_gradients_stay_exact(name, f64):
    """``gradient_checkpointing_enable()`` (Hugging Face): the captured graph runs each op once,
    without recomputation, so the flag would change nothing silently (GPT-2, 4 layers, T = 256:
    the step's memory 551 MiB with it, 178 MiB non-private with it): privatize warns, and
    the per-sample gradients stay each sample's own."""
    model, kind, x, y = _float64_case(name, 2)
    model.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match=r"gradient checkpointing is enabled on .* but the DP model does not apply "
                                         r"it.*Per-sample gradients are exact.*BatchMemoryManager"):
        dp = fxdp.privatize(model, loss_reduction="sum")
    _loss(kind, dp(**x), x, y).backward()
    _assert_each_sample_alone(name, model, kind, x, y, {n: p.grad_sample for n, p in model.named_parameters()})
    report = fxdp.check(model, x)
    assert report.ok and [f.code for f in report.findings if f.severity == "info"].count("checkpointing") == 1
    model.gradient_checkpointing_disable()
    assert "checkpointing" not in [f.code for f in fxdp.check(model, x).findings]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxdp.privatize(model, loss_reduction="sum")  # no flag: no warning


@pytest.mark.parametrize("name", sorted(ALL))
def test_make_private_trains_three_poisson_steps_with_default_dropout(name):
    torch.manual_seed(0)
    model, kind = ALL[name]()
    model.train()
    g = torch.Generator().manual_seed(2)
    N = 24
    x = _inputs(kind, N, g)
    y = _targets(kind, x, g)
    keys = sorted(x)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return tuple(x[k][i] for k in keys) + (y[i],)

    loader = torch.utils.data.DataLoader(DS(), batch_size=8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = fxdp.PrivacyEngine(accountant="rdp")
    dp, opt, dl = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                      max_grad_norm=1.0, poisson_sampling=True,
                                      example_inputs=None)  # the first-step cross-check runs too
    steps = 0
    for batch in dl:
        xb = dict(zip(keys, batch[:-1]))
        opt.zero_grad()
        out = dp(**xb)
        loss = _loss(kind, out, xb, batch[-1]) / max(1, batch[-1].shape[0])
        loss.backward()
        opt.step()
        steps += 1
    assert steps == 3
    assert engine.get_epsilon(1e-5) > 0
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_labels_loss_inside_forward_becomes_a_mean_of_per_sample_losses(name, f64):
    """HF's labels= loss averages over every token of the batch (its denominator counts the
    other samples' labels); the capture rewrites it as a mean of per-sample losses, so
    row i of grad_sample is the gradient of the model's own loss on sample i alone.
    LM heads compute their loss on float32 logits (HF upcasts), hence the f32 tolerance."""
    model, kind, x, y = _float64_case(name, 5)
    dp = fxdp.privatize(model)  # loss_reduction="mean", as the model's loss
    dp(**x, labels=y).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad_sample for n, p in trainable.items()}
    tol = dict(rtol=1e-5, atol=1e-7) if kind in ("lm", "seq2seq") else dict(rtol=1e-6, atol=1e-9)
    for i in range(B):
        model.zero_grad()
        xi = {k: v[i:i + 1] for k, v in x.items()}
        model(**xi, labels=y[i:i + 1]).loss.backward()
        for n, p in trainable.items():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n][i], want, **tol, msg=f"{name}: {n}, sample {i}")


def test_loss_normalized_by_the_batch_token_count_is_refused_with_the_fix():
    """num_items_in_batch= (the Trainer's gradient-accumulation fix) divides a summed loss by
    the batch's token count: each sample's gradient depends on the others. Refused."""
    torch.manual_seed(0)
    model, kind = _gpt2()
    x = _inputs(kind, B, torch.Generator().manual_seed(3))
    dp = fxdp.privatize(model)
    with pytest.raises(fxdp.UnsupportedModelError, match="loss"):
        dp(**x, labels=x["input_ids"], num_items_in_batch=torch.tensor(B * T)).loss.backward()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_check_analyses_the_exported_graph(name):
    """fxdp.check reads the graph privatize runs: ok with every parameter on a rule and its
    book-keeping plan, a sequence's layers planned at its length (GPT-2's Conv1D folds the
    batch into [B*T, d]: served, and planned, as [B, T, d]); the labels= loss is a mean of
    per-sample losses (ok); divided by the batch's token count (num_items_in_batch=) it is
    an error."""
    torch.manual_seed(0)
    model, kind = ZOO[name]()
    model.train()
    x = _inputs(kind, B, torch.Generator().manual_seed(4))
    report = fxdp.check(model, (), example_kwargs=x)
    assert report.ok, str(report)
    trainable = [lay for lay in report.layers if lay.trainable]
    assert trainable and not [lay for lay in trainable if "fallback" in lay.rule or "unused" in lay.rule], \
        [(lay.name, lay.rule) for lay in trainable]
    assert all(lay.bookkeeping for lay in trainable), [lay.name for lay in trainable if not lay.bookkeeping]
    folded = [lay for lay in trainable if lay.rule == "addmm" and lay.name.endswith(".weight")]  # GPT-2's Conv1D
    assert bool(folded) == (name == "gpt2")
    assert all(f"T={T}" in lay.bookkeeping for lay in folded), [(lay.name, lay.bookkeeping) for lay in folded]
    if kind == "lm":
        assert fxdp.check(model, (), example_kwargs={**x, "labels": x["input_ids"]}).ok  # per-sample mean
        bad = fxdp.check(model, (), example_kwargs={**x, "labels": x["input_ids"],
                                                     "num_items_in_batch": torch.tensor(B * T)})
        assert not bad.ok and {e.code for e in bad.errors} == {"batch-reduction"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_check_plans_what_book_keeping_runs(name):
    """fxdp.check's book-keeping plan of every layer equals the rule's plan at the shapes the
    layer's record arrives with (the report's shapes rebuilt from the export's, the batch at
    the report's batch size); a tied parameter (GPT-2's, Gemma's, T5's and Mamba's embeddings and heads)
    is planned as tied."""
    torch.manual_seed(0)
    model, kind = ZOO[name](0.0)
    model.train()
    g = torch.Generator().manual_seed(4)
    x = _inputs(kind, B, g)
    layers = fxdp.check(model, (), example_kwargs=x).layers
    dp = fxdp.privatize(model, grad_sample_mode="bk", loss_reduction="sum")
    assert_check_plans_as_run({lay.name: lay.bookkeeping for lay in layers}, dp,
                              lambda: _loss(kind, dp(**x), x, _targets(kind, x, g)).backward())
    tied = [lay.name for lay in layers if (lay.bookkeeping or "").startswith("tied")]
    assert bool(tied) == (name in ("gpt2", "gemma", "t5", "mamba"))  # LoRA freezes the embedding its head shares


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_tied_embeddings_are_clipped_exactly_without_per_sample_gradients(name, f64, monkeypatch):
    """GPT-2's embedding is its LM head; T5's is also its decoder's embedding (three uses).
    Book-keeping norms the tied weight from its uses' factored gradients (no ``[B, V, d]``
    per-sample gradients, which at GPT-2's vocabulary take 2.5 GB a use at B = 16) and every
    clipped sum equals materialize mode's (float64)."""
    from fxdp import bookkeeping

    formed = []
    real = bookkeeping._per_sample_grads
    monkeypatch.setattr(bookkeeping, "_per_sample_grads", lambda r: formed.append(r) or real(r))
    params = _assert_bk_sums_are_materialized(*_float64_case(name, 6))
    emb = max(params, key=lambda p: p.numel())  # [V, d]
    assert not [r for r in formed if any(p is emb for p in r.params.values())]
    # (T5's relative-position bias, a small raw parameter used by several ops, is materialized)


def _assert_bk_sums_are_materialized(model, kind, x, y):
    """Book-keeping's clipped sums equal those of materialized per-sample gradients (float64,
    a bound that clips some samples and not others); returns the book-keeping model's
    trainable parameters."""
    import copy

    from oracle import bk_clipped_sums

    dpm = fxdp.privatize(copy.deepcopy(model), loss_reduction="sum")
    _loss(kind, dpm(**x), x, y).backward()
    gs = [p.grad_sample for p in dpm.parameters() if p.requires_grad]
    norms = torch.stack([s.flatten(1).norm(dim=1) for s in gs], 1).norm(dim=1)
    C = float(norms.sort().values[1:3].mean())  # some samples clipped, some not
    factors = (C / (norms + 1e-6)).clamp(max=1)
    dpb = fxdp.privatize(copy.deepcopy(model), grad_sample_mode="bk", loss_reduction="sum")
    sums = bk_clipped_sums(dpb, lambda: _loss(kind, dpb(**x), x, y).backward(), C)
    params = [p for p in dpb.parameters() if p.requires_grad]
    for p, s in zip(params, gs):
        torch.testing.assert_close(sums[id(p)], torch.einsum("b,b...->...", factors, s), rtol=1e-9, atol=1e-12)
    return params


@pytest.mark.parametrize("name", sorted(ZOO_REPEAT))
def test_book_keeping_serves_deberta_exactly(name, f64):
    """DeBERTa's repeated relative-position subgraphs (torch.func captures, their weights tied
    to the content path's query and key projections in v3) clip as materialize mode does."""
    _assert_bk_sums_are_materialized(*_float64_case(name, 6))


def test_book_keeping_serves_weight_standardized_convolutions_in_closed_form(f64, monkeypatch):
    """BiT's weight-standardized convolutions: book-keeping takes the closed form (every probe
    finds the centered form, no per-sample gradient of them is formed) and clips as materialize
    mode does (float64)."""
    from fxdp.capture import params as P

    forms, formed = [], []
    probe, real = P.probe_normalized, P.ComputedArgsRuleCapture.per_sample_grads
    monkeypatch.setattr(P, "probe_normalized", lambda *a, **k: forms.append(probe(*a, **k)) or forms[-1])
    _assert_bk_sums_are_materialized(*_float64_case("bit", 6))  # (its materialize mode runs first)
    monkeypatch.setattr(P.ComputedArgsRuleCapture, "per_sample_grads", lambda self, r: formed.append(r) or real(self, r))
    model, kind, x, y = _float64_case("bit", 7)
    dpb = fxdp.privatize(model, grad_sample_mode="bk", loss_reduction="sum")
    from oracle import bk_clipped_sums

    bk_clipped_sums(dpb, lambda: _loss(kind, dpb(**x), x, y).backward(), 1.0)
    assert len(forms) >= 10 and all(f is not None and f.centered for f in forms) and not formed


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("mode", ["bk", "materialize"])
def test_poisson_batch_sizes_0_and_1_train(name, mode):
    """An empty batch cannot run through an attention's reshape(-1); the DP model runs
    a placeholder sample, returns zero-row outputs and contributes no gradient, so the
    step adds noise only."""
    from fxdp.optim import DPOptimizer

    torch.manual_seed(0)
    model, kind = ZOO[name]()
    dp = fxdp.privatize(model, grad_sample_mode=mode, loss_reduction="sum")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=4, loss_reduction="sum")
    if mode == "bk":
        opt.attach_bookkeeping(dp.bookkeeping)
    g = torch.Generator().manual_seed(5)
    for n in (4, 0, 1):
        x = _inputs(kind, max(n, 2), g)
        x = {k: v[:n] for k, v in x.items()}
        y = _targets(kind, x, g)
        opt.zero_grad()
        out = dp(**x)
        assert out.logits.shape[0] == n
        before = [p.detach().clone() for p in params]
        _loss(kind, out, x, y).backward()
        if mode == "materialize":
            assert all(p.grad_sample.shape == (n,) + p.shape for p in params)
        opt.step()
        moved = any(not torch.equal(p, b) for p, b in zip(params, before))
        assert moved == (n > 0)  # sigma = 0: an empty batch leaves the weights as they are


def test_a_cache_in_the_output_is_refused_with_the_use_cache_fix():
    """BART returns an ``EncoderDecoderCache`` (``use_cache`` on by default) that torch.export
    cannot flatten: the error names the fix, and with ``use_cache=False`` the capture goes on
    (its classification head's end-of-sequence pooling: tests/passes/test_pass_masked_rows.py)."""
    cfg = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                  decoder_ffn_dim=16, max_position_embeddings=32, num_labels=3)
    ids = torch.randint(3, V, (B, T))
    ids[:, -1] = cfg.eos_token_id
    with pytest.raises(fxdp.UnsupportedModelError, match=r"use_cache = False"):
        fxdp.privatize(transformers.BartForSequenceClassification(cfg))(input_ids=ids)
    cfg.use_cache = False
    model = transformers.BartForSequenceClassification(cfg)
    fxdp.privatize(model)(input_ids=ids).logits.sum().backward()
    assert model.classification_head.out_proj.weight.grad_sample.shape[0] == B



def _wav2vec2(p=0.0):
    """wav2vec2 for audio classification, with SpecAugment on (its default ``mask_time_prob``
    0.05); LayerDrop off (a branch on a random draw, refused with its own fix)."""
    cfg = transformers.Wav2Vec2Config(
        vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, layerdrop=0.0, num_labels=3, mask_time_length=2, attention_dropout=p,
        hidden_dropout=p, activation_dropout=p, feat_proj_dropout=p, final_dropout=p)
    assert cfg.mask_time_prob > 0 and cfg.apply_spec_augment
    return transformers.Wav2Vec2ForSequenceClassification(cfg)


def test_spec_augment_drawn_inside_is_refused_and_masks_from_the_collator_are_exact(f64):
    """wav2vec2's SpecAugment draws its masks with NumPy inside ``forward``: a capture would run
    that draw once and mask the same frames every step (before: refused as "torch.export cannot
    capture it", no reason given). Refused, naming ``mask_time_prob``; masks drawn in the data
    collator and passed as ``mask_time_indices=`` (a masked write, ``x[mask] = v``) are served,
    exact for each sample, ``masked_spec_embed`` included."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    torch.manual_seed(0)
    model = _wav2vec2().double().train()
    x = torch.randn(B, 400)
    with pytest.raises(fxdp.UnsupportedModelError, match=r"(?s)NumPy.*SpecAugment.*mask_time_prob = 0"):
        fxdp.privatize(model)(input_values=x)
    (error,) = fxdp.check(model, {"input_values": x}).errors  # at the model's line, not inside NumPy
    assert error.file.endswith("modeling_wav2vec2.py") and "mask" in error.source
    frames = int(model._get_feat_extract_output_lengths(400))
    np.random.seed(0)  # the collator's draw (transformers draws with NumPy's global generator)
    mask = torch.from_numpy(_compute_mask_indices((B, frames), 0.3, 2, min_masks=2))
    y = torch.randint(0, 3, (B,))
    dp = fxdp.privatize(model, loss_reduction="sum")
    nn.functional.cross_entropy(dp(input_values=x, mask_time_indices=mask).logits, y, reduction="sum").backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    assert got["wav2vec2.masked_spec_embed"].norm(dim=1).min() > 0
    for i in range(B):
        model.zero_grad()
        out = model(input_values=x[i:i + 1], mask_time_indices=mask[i:i + 1]).logits
        nn.functional.cross_entropy(out, y[i:i + 1], reduction="sum").backward()
        for n, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n][i], want, rtol=1e-6, atol=1e-9, msg=f"{n}, sample {i}")
