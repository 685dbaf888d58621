"""fxdp.huggingface: the Trainer integration (per-sample losses with padding, user-level DP,
the ε budget, the example)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          TrainingArguments)

from fxdp.data import UserPoissonSampler  # noqa: E402
from fxdp.huggingface import DPTrainer, PrivacyArguments, per_sample_loss  # noqa: E402

V, T = 40, 9


def _records(n: int, kind: str, seed: int = 0):
    """Token records of random lengths 3..T (right-padded by the collator)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(3, T + 1, (), generator=g))
        ids = torch.randint(1, V, (L,), generator=g)
        rec = {"input_ids": ids, "attention_mask": torch.ones(L, dtype=torch.long)}
        rec["labels"] = ids.clone() if kind == "lm" else torch.tensor(int(ids.sum()) % 2)
        rec["user"] = torch.tensor(i // 3)
        out.append(rec)
    return out


def _collate(records):
    """Right padding; LM labels of padding are -100."""
    L = max((len(r["input_ids"]) for r in records), default=1)
    out = {"input_ids": torch.zeros(len(records), L, dtype=torch.long),
           "attention_mask": torch.zeros(len(records), L, dtype=torch.long)}
    lm = bool(records) and records[0]["labels"].dim() == 1
    out["labels"] = torch.full((len(records), L), -100) if lm else torch.zeros(len(records), dtype=torch.long)
    out["user"] = torch.zeros(len(records), dtype=torch.long)
    for i, r in enumerate(records):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = r["input_ids"]
        out["attention_mask"][i, :n] = 1
        if lm:
            out["labels"][i, :n] = r["labels"]
        else:
            out["labels"][i] = r["labels"]
        out["user"][i] = r["user"]
    return out


class _List(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _model(kind: str, p: float = 0.1):
    """Tiny models from configs; ``p``: dropout (off where a batch is compared with each
    sample alone, which would draw other masks)."""
    torch.manual_seed(0)
    if kind == "lm":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          resid_pdrop=p, embd_pdrop=p, attn_pdrop=p))
    return BertForSequenceClassification(BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=p, attention_probs_dropout_prob=p))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
                report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                remove_unused_columns=False, logging_steps=1)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, kind, n=12, privacy=None, dropout=0.1, **kw):
    model = _model(kind, dropout).double()
    privacy = privacy or PrivacyArguments(noise_multiplier=1.0, grad_sample_mode="materialize")
    return DPTrainer(model=model, args=_args(tmp_path, **kw), train_dataset=_List(_records(n, kind)),
                     data_collator=_collate, privacy_args=privacy)


@pytest.mark.parametrize("kind", ["classification", "lm"])
def test_per_sample_gradients_with_padding_equal_each_sample_alone(tmp_path, kind, f64):
    """The trainer's loss is a mean of per-sample losses: each row of p.grad_sample is the
    gradient of that sample alone, unpadded (float64)."""
    trainer = _trainer(tmp_path, kind, dropout=0.0)
    trainer.create_optimizer()
    model = trainer.model
    model.train()
    records = _records(5, kind, seed=3)
    batch = _collate(records)
    trainer.dp_optimizer.zero_grad()
    batch.pop("user")
    trainer.compute_loss(model, dict(batch)).backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad_sample.clone() for n, p in params.items()}
    task = "causal_lm" if kind == "lm" else "sequence"
    for i, r in enumerate(records):
        model.zero_grad()
        x = {"input_ids": r["input_ids"][None], "attention_mask": r["attention_mask"][None]}
        logits = model(**x).logits
        per_sample_loss(logits, r["labels"][None] if kind == "lm" else r["labels"].view(1), task).sum().backward()
        for n, p in params.items():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n][i], want, rtol=1e-6, atol=1e-10, msg=f"{kind}: {n}, sample {i}")


def test_per_sample_loss_ignores_padding_and_shifts_causal_labels():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    got = per_sample_loss(logits, labels, "causal_lm")
    want0 = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3])
    torch.testing.assert_close(got[0], want0)
    assert got[1] == 0  # no label after the shift: no loss, no gradient
    tok = per_sample_loss(logits, labels, "token")
    torch.testing.assert_close(tok[1], torch.nn.functional.cross_entropy(logits[1, :1], labels[1, :1]))


def test_token_logits_of_prompt_tuning_are_read_at_the_labels_positions(tmp_path):
    """Prompt tuning prepends virtual tokens: the logits are longer than the labels, whose positions
    are the last ones; the Trainer's DP steps train the prompt."""
    logits = torch.randn(2, 7, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100], [4, 1, -100, -100]])
    torch.testing.assert_close(per_sample_loss(logits, labels, "causal_lm"),
                               per_sample_loss(logits[:, 3:], labels, "causal_lm"))
    with pytest.raises(ValueError, match="the logits cover 3 positions but the labels 4"):
        per_sample_loss(logits[:, :3], labels, "token")
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model("lm", 0.0), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_List(_records(12, "lm")),
                        data_collator=_collate, privacy_args=PrivacyArguments(noise_multiplier=1.0))
    prompt = next(p for p in model.parameters() if p.requires_grad)
    before = prompt.detach().clone()
    trainer.train()
    assert not torch.equal(prompt, before)


@pytest.mark.parametrize("kind", ["lm", "classification"])
def test_label_smoothing_is_each_samples_own_trainer_smoothed_loss(tmp_path, kind, f64):
    """label_smoothing_factor (ignored by the DP steps before): the Trainer's LabelSmoother of each
    sample alone, averaged over the batch."""
    from transformers.trainer_pt_utils import LabelSmoother

    trainer = _trainer(tmp_path, kind, dropout=0.0, label_smoothing_factor=0.2)
    trainer.create_optimizer()
    batch = _collate(_records(3, kind))
    batch.pop("user")
    loss = trainer.compute_loss(trainer.model, dict(batch))
    smoother = LabelSmoother(epsilon=0.2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = trainer.model(**inputs).logits
    want = torch.stack([smoother({"logits": logits[i:i + 1]}, batch["labels"][i:i + 1], shift_labels=kind == "lm")
                        for i in range(3)]).mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)  # the LabelSmoother sums the classes in float32
    with pytest.raises(ValueError, match="label smoothing applies to the cross-entropy tasks"):
        per_sample_loss(torch.zeros(2, 1), torch.zeros(2), "regression", label_smoothing=0.1)


def test_user_level_rows_are_users_and_sum_their_records(tmp_path, f64):
    """With user_column, p.grad_sample has one row per user: the sum of that user's
    records' gradients (clipping then bounds a user's whole contribution)."""
    privacy = PrivacyArguments(noise_multiplier=1.0, user_column="user")
    trainer = _trainer(tmp_path, "classification", privacy=privacy, dropout=0.0)
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.batch_sampler, UserPoissonSampler) and loader.batch_sampler.num_users == 4
    assert trainer.sample_rate == pytest.approx(1.0)  # 4 users per batch of 4 expected users
    trainer.create_optimizer()
    model = trainer.model
    records = _records(6, "classification", seed=5)
    batch = _collate(records)  # users 0, 0, 0, 1, 1, 1
    trainer.dp_optimizer.zero_grad()
    trainer.compute_loss(model, dict(batch)).backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad_sample.clone() for n, p in params.items()}
    assert all(g.shape[0] == 2 for g in got.values())
    for u in range(2):
        model.zero_grad()
        sub = _collate(records[3 * u:3 * u + 3])
        logits = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        per_sample_loss(logits, sub["labels"], "sequence").sum().backward()
        for n, p in params.items():
            torch.testing.assert_close(got[n][u], p.grad, rtol=1e-6, atol=1e-10, msg=f"user {u}: {n}")


def test_user_sampler_draws_whole_users_and_caps_records():
    users = [0, 0, 1, 2, 2, 2, 3]
    s = UserPoissonSampler(users, 0.5, generator=torch.Generator().manual_seed(0), steps=50)
    assert s.num_users == 4 and s.expected_batch_size == 2
    for batch in s:
        drawn = {users[i] for i in batch}
        assert sorted(batch) == sorted(i for i, u in enumerate(users) if u in drawn)
    capped = UserPoissonSampler(users, 1.0, generator=torch.Generator().manual_seed(0), max_records_per_user=1)
    assert sorted(users[i] for i in next(iter(capped))) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_records_per_user"):
        UserPoissonSampler(users, 0.5, max_records_per_user=0)


def test_train_logs_epsilon_per_epoch_and_stops_at_the_budget(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=0.8, target_epsilon=6.0, target_delta=1e-3)
    trainer = _trainer(tmp_path, "classification", n=16, privacy=privacy, num_train_epochs=10,
                       per_device_train_batch_size=8)
    trainer.train()
    eps = trainer.get_epsilon()
    assert eps <= 6.0
    q, sigma = trainer.sample_rate, trainer.dp_optimizer.noise_multiplier
    assert trainer.privacy_engine._epsilon_after(1, sigma, q) > 6.0  # it stopped just before the budget
    assert trainer.state.global_step < 10 * 2  # fewer steps than planned
    epochs = trainer.epsilon_per_epoch
    assert len(epochs) >= 1 and all(a[1] < b[1] for a, b in zip(epochs, epochs[1:]))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("epsilon" in h and "clip_fraction" in h for h in logged)
    assert not any("grad_norm" in h for h in logged)  # the Trainer's batch-gradient norm, not computed: not a 0


def test_sigma_is_calibrated_to_spend_the_target_over_the_planned_steps(tmp_path):
    privacy = PrivacyArguments(target_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    trainer = _trainer(tmp_path, "lm", n=16, privacy=privacy, num_train_epochs=2, per_device_train_batch_size=4)
    trainer.train()
    assert trainer.state.global_step == 2 * 4
    assert 3.0 - 0.05 <= trainer.get_epsilon() <= 3.0


def test_refusals_name_the_fix(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        DPTrainer(model=_model("lm"), args=_args(tmp_path, gradient_accumulation_steps=2),
                  train_dataset=_List(_records(4, "lm")), data_collator=_collate, privacy_args=privacy)
    with pytest.raises(ValueError, match=r"bf16=True ask for mixed precision.*would be ignored.*Fix: set fp16=False"):
        DPTrainer(model=_model("lm"), args=_args(tmp_path, bf16=True),
                  train_dataset=_List(_records(4, "lm")), data_collator=_collate, privacy_args=privacy)
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyArguments()
    trainer = _trainer(tmp_path, "classification")
    trainer.create_optimizer()
    batch = _collate(_records(3, "classification"))
    batch.pop("labels")
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.slow
def test_hf_finetune_example_reaches_its_stated_accuracy_at_epsilon_8():
    """examples/hf_finetune.py (README): >= 90% test accuracy at ε = 8 (about a minute)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import hf_finetune
    finally:
        sys.path.pop(0)
    out = hf_finetune.main([])
    assert out["epsilon"] <= 8.0 and math.isfinite(out["epsilon"])
    assert out["delta"] < 1 / 20000
    assert out["accuracy"] >= 0.90
