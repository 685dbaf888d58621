"""Opacus tutorial building_text_classifier: a BERT classifier with frozen layers, the
model's own labels= loss (outputs[0]), make_private_with_epsilon, BatchMemoryManager,
then ghost clipping (make_private_with_epsilon(criterion=..., grad_sample_mode="ghost"))
and a peft LoRA model. bert-base-cased is replaced by a small BERT built from a config."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: F401

BATCH_SIZE, MAX_PHYSICAL_BATCH_SIZE, EPOCHS, EPSILON, MAX_GRAD_NORM = 16, 8, 1, 7.5, 0.1


def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    trainable_layers = [model.bert.encoder.layer[-1], model.bert.pooler, model.classifier]
    for p in model.parameters():
        p.requires_grad = False
    for layer in trainable_layers:
        for p in layer.parameters():
            p.requires_grad = True
    return model


def dataset(n, g):
    ids = torch.randint(1, 64, (n, 16), generator=g)
    mask = torch.ones(n, 16, dtype=torch.long)
    mask[::3, 12:] = 0
    return TensorDataset(ids, mask, torch.zeros(n, 16, dtype=torch.long), torch.randint(0, 3, (n,), generator=g))


def inputs_of(batch):
    return {"input_ids": batch[0], "attention_mask": batch[1], "token_type_ids": batch[2], "labels": batch[3]}


def main():
    g = torch.Generator().manual_seed(0)
    train_dataset, test_dataset = dataset(64, g), dataset(16, g)
    train_dataloader = DataLoader(train_dataset, batch_size=BATCH_SIZE)
    test_dataloader = DataLoader(test_dataset, sampler=SequentialSampler(test_dataset), batch_size=BATCH_SIZE)
    DELTA = 1 / len(train_dataloader)
    out = {}

    model = bert().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, eps=1e-8)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_dataloader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_dataloader, target_delta=DELTA,
        target_epsilon=EPSILON, epochs=EPOCHS, max_grad_norm=MAX_GRAD_NORM,
    )
    for _ in range(EPOCHS):
        with BatchMemoryManager(data_loader=train_dataloader, max_physical_batch_size=MAX_PHYSICAL_BATCH_SIZE,
                                optimizer=optimizer) as memory_safe_data_loader:
            for batch in memory_safe_data_loader:
                optimizer.zero_grad()
                outputs = model(**inputs_of(batch))
                loss = outputs[0]
                loss.backward()
                optimizer.step()
    out["epsilon"] = privacy_engine.get_epsilon(DELTA)
    model.eval()
    with torch.no_grad():
        for batch in test_dataloader:
            loss, logits = model(**inputs_of(batch))[:2]

    # ghost clipping: the criterion is returned with the model, optimizer and loader
    model = bert().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, eps=1e-8)
    privacy_engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss(reduction="mean")
    model_gc, optimizer_gc, criterion_gc, train_dataloader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_dataloader, criterion=criterion, target_delta=DELTA,
        target_epsilon=EPSILON, epochs=EPOCHS, max_grad_norm=MAX_GRAD_NORM, grad_sample_mode="ghost",
    )
    model_gc = model_gc.train()
    for _ in range(EPOCHS):
        for batch in train_dataloader:
            optimizer_gc.zero_grad()
            outputs = model_gc(**inputs_of(batch))
            loss = criterion_gc(outputs[1], batch[3])
            loss.backward()
            optimizer_gc.step()
    out["epsilon_ghost"] = privacy_engine.get_epsilon(DELTA)

    # LoRA
    from peft import LoraConfig, TaskType, get_peft_model

    model = bert()
    lora_config = LoraConfig(task_type=TaskType.SEQ_CLS, inference_mode=False, r=4, lora_alpha=4, lora_dropout=0.05)
    model_with_lora = get_peft_model(model, lora_config)
    for param in model_with_lora.base_model.bert.encoder.layer[:-1].parameters():
        param.requires_grad = False
    optimizer = torch.optim.AdamW(model_with_lora.parameters(), lr=5e-4, eps=1e-8)
    model_with_lora = model_with_lora.train()
    privacy_engine = PrivacyEngine()
    model_lora, optimizer_lora, criterion_lora, train_dataloader = privacy_engine.make_private_with_epsilon(
        module=model_with_lora, optimizer=optimizer, data_loader=train_dataloader, criterion=criterion,
        target_delta=DELTA, target_epsilon=EPSILON, epochs=EPOCHS, max_grad_norm=MAX_GRAD_NORM,
        grad_sample_mode="ghost",
    )
    model_lora = model_lora.train()
    for _ in range(EPOCHS):
        for batch in train_dataloader:
            optimizer_lora.zero_grad()
            outputs = model_lora(**inputs_of(batch))
            loss = criterion_lora(outputs[1], batch[3])
            loss.backward()
            optimizer_lora.step()
    out["epsilon_lora"] = privacy_engine.get_epsilon(DELTA)
    return out
