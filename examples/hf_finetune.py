"""Private fine-tuning of a Hugging Face model with the Trainer (fxdp.huggingface.DPTrainer).

A small BERT built from a config (random weights: nothing is downloaded) learns to tell
positive from negative reviews, generated here from word lists and tokenized by a
word-level tokenizer built in-process, padded per batch by DataCollatorWithPadding.
Training is (ε, δ)-DP at ε = 8: σ is calibrated for the planned epochs, ε is logged
with every log line and at each epoch end.

    python examples/hf_finetune.py             # ~2-3 minutes on 2 CPU cores
    python examples/hf_finetune.py --users     # user-level DP: 4 reviews per user, clipped per user

Needs the ``transformers`` package (``pip install -e .[hf]``).
"""
from __future__ import annotations

import argparse
import random
from typing import Dict, List

import torch
from torch.utils.data import Dataset

from transformers import (BertConfig, BertForSequenceClassification, DataCollatorWithPadding,
                          PreTrainedTokenizerFast, TrainingArguments)

from fxdp.huggingface import DPTrainer, PrivacyArguments

POSITIVE = "great fun superb moving brilliant charming delightful witty gripping lovely".split()
NEGATIVE = "dull boring awful clumsy tedious bland weak messy painful lifeless".split()
NEUTRAL = ("the a movie film plot actor scene story was and it with this very really quite "
           "director music camera ending script cast").split()


def make_reviews(n: int, seed: int) -> List[Dict]:
    """Reviews of 6-24 words: neutral words and a few words of the review's sentiment
    (and, in one review of four, one word of the other sentiment)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randrange(2)
        own, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 20))]
        words += [rng.choice(own) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.25:
            words.append(rng.choice(other))
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label, "user": i // 4})
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + POSITIVE + NEGATIVE + NEUTRAL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


class Tokenized(Dataset):
    def __init__(self, rows: List[Dict], tokenizer: PreTrainedTokenizerFast, users: bool) -> None:
        self.items = []
        for r in rows:
            item = dict(tokenizer(r["text"]), label=r["label"])
            if users:
                item["user"] = r["user"]
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict:
        return self.items[i]


def main(argv: List[str] | None = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size (records or users)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--users", action="store_true", help="user-level DP (4 reviews per user)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="/tmp/fxdp_hf_finetune")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    train = Tokenized(make_reviews(args.train_size, args.seed), tokenizer, args.users)
    test = Tokenized(make_reviews(1000, args.seed + 1), tokenizer, users=False)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)  # default dropout stays on

    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256, learning_rate=args.lr, weight_decay=0.0, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=20, eval_strategy="epoch", save_strategy="no",
        report_to=[], seed=args.seed, use_cpu=True, disable_tqdm=True,
    )
    privacy = PrivacyArguments(target_epsilon=args.epsilon, per_sample_max_grad_norm=1.0,
                               user_column="user" if args.users else None)

    def accuracy(pred) -> Dict[str, float]:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = DPTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                        privacy_args=privacy)
    trainer.train()
    metrics = trainer.evaluate()
    eps = trainer.get_epsilon()
    unit = "user" if args.users else "example"
    print(f"test accuracy {metrics['eval_accuracy']:.2%} at (ε, δ) = ({eps:.2f}, {trainer.delta:g}) per {unit}")
    return {"accuracy": metrics["eval_accuracy"], "epsilon": eps, "delta": trainer.delta}


if __name__ == "__main__":
    main()
