"""Private fine-tuning with the Hugging Face ``Trainer`` (the optional ``transformers`` extra).

:class:`DPTrainer` is a ``transformers.Trainer`` whose training steps are DP-SGD steps,
in the style of Microsoft's dp-transformers:

- batches are Poisson samples of the training set (:class:`fxdp.data.PoissonSampler`),
  or of its *users* with ``PrivacyArguments(user_column=...)``: each sampled user brings
  their records and per-sample gradients are summed per user before clipping
  (user-level DP, McMahan et al. 2018; :class:`fxdp.data.UserPoissonSampler`);
- the model is made private by :meth:`fxdp.PrivacyEngine.make_private` (captured with
  ``torch.export``, per-sample gradients or book-keeping, the first-step cross-check);
- the loss is a mean of *per-sample* losses (:func:`per_sample_loss`): a model's own
  ``labels=`` loss averages over every token of the batch, so one sample's gradient
  would depend on how many tokens the others have. Causal-LM labels are shifted,
  ``-100`` and padding are ignored, and each sample's loss is its own token mean;
- ε is logged with every log line and at each epoch end; with ``target_epsilon`` and no
  ``noise_multiplier``, σ is calibrated to spend the budget over the planned steps, and
  with both, training stops before the step that would exceed it.

Evaluation and prediction run the model as the ``Trainer`` does (no privacy cost is
counted for them: evaluate on data you may look at).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - the module is only imported by users of transformers
    raise ImportError(
        "fxdp.huggingface needs the transformers package: pip install 'transformers>=4.45'"
    ) from e

from .accountants.calibrate import get_noise_multiplier
from .data.loader import wrap_collate_with_empty
from .data.sampler import PoissonSampler, UserPoissonSampler
from .engine import PrivacyEngine

__all__ = ["PrivacyArguments", "DPTrainer", "per_sample_loss", "IGNORE_INDEX"]

logger = logging.getLogger(__name__)

#: label value that contributes no loss (the transformers convention)
IGNORE_INDEX = -100


@dataclasses.dataclass
class PrivacyArguments:
    """What :class:`DPTrainer` needs on top of ``TrainingArguments``.

    Attributes:
        target_epsilon: the ε budget. Without ``noise_multiplier``, σ is calibrated so
            that the planned training (``num_train_epochs`` or ``max_steps``) spends it;
            with one, training stops before the step that would exceed it.
        target_delta: δ; default ``1 / (10 N)`` with N the number of records (users).
        noise_multiplier: σ (noise std over the clip bound); needs ``target_epsilon`` or
            is used as is (ε is then only reported).
        per_sample_max_grad_norm: the clip bound C of each sample's (user's) gradient.
        accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp"``.
        user_column: a dataset column naming each record's user: user-level DP.
        max_records_per_user: cap on a sampled user's records per batch (random subset).
        grad_sample_mode: ``"auto"`` (book-keeping) or ``"materialize"``; user-level DP
            always materializes (per-user sums of per-sample gradients).
        loss: ``"auto"`` or one of ``"causal_lm"``, ``"token"``, ``"sequence"``,
            ``"regression"``, ``"multi_label"`` (see :func:`per_sample_loss`).
    """

    target_epsilon: Optional[float] = None
    target_delta: Optional[float] = None
    noise_multiplier: Optional[float] = None
    per_sample_max_grad_norm: float = 1.0
    accountant: str = "prv"
    user_column: Optional[str] = None
    max_records_per_user: Optional[int] = None
    grad_sample_mode: str = "auto"
    loss: str = "auto"

    def __post_init__(self) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("PrivacyArguments needs target_epsilon (σ is then calibrated) or noise_multiplier")
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon must be a positive finite number, got {self.target_epsilon!r}")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta!r}")
        if not self.per_sample_max_grad_norm > 0:
            raise ValueError(f"per_sample_max_grad_norm must be > 0, got {self.per_sample_max_grad_norm!r}")
        if self.loss not in _TASKS + ("auto",):
            raise ValueError(f"loss must be 'auto' or one of {list(_TASKS)}, got {self.loss!r}")


_TASKS = ("causal_lm", "token", "sequence", "regression", "multi_label")


def _task(model: nn.Module, logits: Tensor, labels: Tensor) -> str:
    """The loss a Hugging Face head trains with, read from the model and the shapes."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if logits.dim() == 2:
        if labels.is_floating_point():
            return "regression" if logits.shape[-1] == 1 and labels.dim() == 1 else "multi_label"
        return "sequence"
    if name.endswith(("ForCausalLM", "LMHeadModel")) or (
            config is not None and getattr(config, "is_decoder", False)
            and not getattr(config, "is_encoder_decoder", False)):
        return "causal_lm"
    return "token"  # masked LM, token classification, encoder-decoder (labels align with the decoder)


def per_sample_loss(logits: Tensor, labels: Tensor, task: str, label_smoothing: float = 0.0) -> Tensor:
    """One loss per sample, ``[B]``, computed from that sample's logits and labels only.

    - ``"sequence"``: cross-entropy of ``[B, C]`` logits with ``[B]`` class labels;
    - ``"regression"``: squared error of ``[B, 1]`` logits with ``[B]`` targets;
    - ``"multi_label"``: binary cross-entropy averaged over the ``C`` labels;
    - ``"token"``: token cross-entropy averaged over the sample's labels that are not
      ``-100`` (padding), 0 for a sample without any;
    - ``"causal_lm"``: the same after shifting (token ``t`` predicts label ``t + 1``).

    Token logits longer than the labels (prompt tuning and P-tuning prepend virtual tokens) are
    read at the labels' positions, the last ones.

    ``label_smoothing`` (the cross-entropy tasks): ``(1 - eps) * nll + eps * mean_c(-log p_c)``,
    the ``Trainer``'s ``LabelSmoother`` of a batch of one sample.
    """
    if label_smoothing and task not in ("sequence", "token", "causal_lm"):
        raise ValueError(f"label smoothing applies to the cross-entropy tasks, not to {task!r}. "
                         "Fix: set label_smoothing_factor=0")
    if task == "sequence":
        return F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)
    if task == "regression":
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    if task == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
    if task not in ("token", "causal_lm"):
        raise ValueError(f"unknown task {task!r}; expected one of {list(_TASKS)}")
    extra = logits.shape[1] - labels.shape[1]
    if extra > 0:  # prompt tuning / P-tuning prepend virtual tokens: the labels are the last positions'
        logits = logits[:, extra:]
    elif extra < 0:
        raise ValueError(f"the logits cover {logits.shape[1]} positions but the labels {labels.shape[1]}. Fix: "
                         "pass labels of the inputs' length")
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="none", label_smoothing=label_smoothing).view(labels.shape)
    counted = (labels != IGNORE_INDEX).sum(1)
    return token.sum(1) / counted.clamp(min=1).to(token.dtype)


class _PrivacyCallback(TrainerCallback):
    """ε at each epoch end, and the stop before a step that would exceed the budget."""

    def __init__(self, trainer: "DPTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        t = self.trainer
        if t.privacy_engine.privacy_budget is not None and t.dp_optimizer is not None:
            nxt = t.privacy_engine._epsilon_after(1, t.dp_optimizer.noise_multiplier, t.sample_rate)
            if nxt > t.privacy_args.target_epsilon:
                logger.info("fxdp: stopping: one more step would spend ε = %.3f > target %.3f",
                            nxt, t.privacy_args.target_epsilon)
                control.should_training_stop = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        t = self.trainer
        if t.dp_optimizer is not None:
            eps = t.get_epsilon()
            t.epsilon_per_epoch.append((state.epoch, eps))
            logger.info("fxdp: epoch %.2f: ε = %.3f (δ = %g)", state.epoch, eps, t.delta)
        return control


class DPTrainer(Trainer):
    """``transformers.Trainer`` with DP-SGD training steps (see the module docstring).

    Use it as the ``Trainer``, with one more argument::

        trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                            data_collator=collator,
                            privacy_args=PrivacyArguments(target_epsilon=8.0))
        trainer.train()
        trainer.get_epsilon()

    ``per_device_train_batch_size`` is the *expected* batch size: each record (user)
    joins a batch with probability ``q = batch_size / N``. Gradient accumulation
    (which would merge Poisson batches) and multi-process training are refused;
    ``TrainingArguments.max_grad_norm`` (clipping of the batch gradient) is turned
    off, per-sample clipping replaces it.
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, *,
                 privacy_args: PrivacyArguments, **kwargs: Any) -> None:
        if not isinstance(privacy_args, PrivacyArguments):
            raise TypeError("privacy_args must be a fxdp.huggingface.PrivacyArguments")
        if args is not None:
            if args.gradient_accumulation_steps != 1:
                raise ValueError(
                    "DPTrainer: gradient_accumulation_steps > 1 merges several Poisson batches into one step, "
                    "which the accountant does not analyse. Fix: set gradient_accumulation_steps=1 and raise "
                    "per_device_train_batch_size (the expected Poisson batch size)"
                )
            if getattr(args, "fp16", False) or getattr(args, "bf16", False):
                raise ValueError(
                    "DPTrainer: fp16=True / bf16=True ask for mixed precision, which DP training does not run "
                    "(the DP step runs the model in its own dtype, so the flag would be ignored: per-sample rules "
                    "cannot serve autocast's lower-precision ops, and fp16's loss scaler would scale each "
                    "per-sample gradient before clipping). Fix: set fp16=False and bf16=False; to train in "
                    "bfloat16, load the model in it (from_pretrained(..., dtype=torch.bfloat16) or model.to(torch.bfloat16))"
                )
            if args.max_grad_norm:
                args.max_grad_norm = 0.0  # per-sample clipping replaces it (clipping the noisy sum adds nothing)
        self.privacy_args = privacy_args
        self.privacy_engine = PrivacyEngine(accountant=privacy_args.accountant)
        self.dp_model: Optional[nn.Module] = None
        self.dp_optimizer: Any = None
        self.sample_rate: Optional[float] = None
        self.delta: Optional[float] = privacy_args.target_delta
        self.epsilon_per_epoch: List[Tuple[float, float]] = []
        self._dp_loader: Optional[DataLoader] = None
        super().__init__(model=model, args=args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError("DPTrainer trains on one process; for data-parallel DP training see docs/distributed.md")
        self.add_callback(_PrivacyCallback(self))

    # -- data: Poisson batches of records or of users -------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        col = self.privacy_args.user_column
        if col is not None and col not in self._signature_columns:
            self._signature_columns.append(col)  # kept through column removal, popped before the forward

    def get_train_dataloader(self) -> DataLoader:
        if self._dp_loader is not None:
            return self._dp_loader
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset")
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets  # noqa: F401

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError("DPTrainer needs a map-style train_dataset (Poisson sampling draws from all of it)")
        n = len(dataset)
        batch = self.args.per_device_train_batch_size
        gen = torch.Generator().manual_seed(int(self.args.seed))
        col = self.privacy_args.user_column
        if col is not None:
            users = dataset[col] if is_hf else [_field(dataset[i], col) for i in range(n)]
            users = [u.item() if isinstance(u, Tensor) else u for u in users]
            n_users = len(set(users))
            q = min(1.0, batch / n_users)
            sampler: PoissonSampler = UserPoissonSampler(
                users, q, generator=gen, max_records_per_user=self.privacy_args.max_records_per_user)
        else:
            q = min(1.0, batch / n)
            sampler = PoissonSampler(n, q, generator=gen)
        self.sample_rate = q
        units = sampler.num_samples
        if self.delta is None:
            self.delta = 1.0 / (10 * units)
        self._dp_loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=wrap_collate_with_empty(collate, sample=dataset[0]),
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self._dp_loader

    # -- model and optimizer: make_private ------------------------------------------------
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        if self.dp_optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        loader = self.get_train_dataloader()
        pa = self.privacy_args
        sigma = pa.noise_multiplier
        if sigma is None:
            steps = self.args.max_steps if self.args.max_steps > 0 else math.ceil(
                self.args.num_train_epochs * len(loader))
            sigma = get_noise_multiplier(target_epsilon=pa.target_epsilon, target_delta=self.delta,
                                         sample_rate=self.sample_rate, steps=steps, accountant=pa.accountant)
            logger.info("fxdp: σ = %.4f spends ε = %g at δ = %g over %d steps", sigma, pa.target_epsilon,
                        self.delta, steps)
        mode = "materialize" if pa.user_column is not None else pa.grad_sample_mode
        example = self._example(loader)
        self.dp_model, self.dp_optimizer, _ = self.privacy_engine.make_private(
            module=self.model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=pa.per_sample_max_grad_norm, poisson_sampling=True, grad_sample_mode=mode,
            loss_reduction="mean", example_inputs=example,
            target_epsilon=pa.target_epsilon, target_delta=self.delta if pa.target_epsilon is not None else None,
        )
        self.optimizer = self.dp_optimizer
        return self.optimizer

    def _example(self, loader: DataLoader) -> Optional[Dict[str, Any]]:
        """Keyword inputs of two records for make_private's static check (no labels, no user)."""
        try:
            batch = loader.collate_fn([loader.dataset[i] for i in range(min(2, len(loader.dataset)))])
        except Exception:
            return None
        if not isinstance(batch, Mapping):
            return None
        drop = {"labels", "label", "label_ids", self.privacy_args.user_column}
        return {k: v for k, v in batch.items() if k not in drop}

    # -- the per-sample loss ------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # num_items_in_batch (the batch's token count) is ignored on purpose: a normalizer
        # that depends on the other samples would let them change each sample's gradient
        if self.dp_model is None or not (model.training and torch.is_grad_enabled()):
            inputs = {k: v for k, v in inputs.items() if k != self.privacy_args.user_column}
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        inputs = dict(inputs)
        labels = None
        for key in ("labels", "label", "label_ids"):
            if key in inputs:
                labels = inputs.pop(key)
                break
        if labels is None:
            raise ValueError(
                "DPTrainer: the training batch has no 'labels': the per-sample loss needs them. Fix: use a data "
                "collator that sets labels (DataCollatorWithPadding with a 'label' column, or "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LM)"
            )
        col = self.privacy_args.user_column
        if col is not None:
            users = torch.as_tensor(inputs.pop(col))
            self.dp_model.set_groups(torch.unique(users, return_inverse=True)[1])
        unwrapped = self.model
        if getattr(getattr(unwrapped, "config", None), "is_encoder_decoder", False) and \
                "decoder_input_ids" not in inputs and hasattr(unwrapped, "prepare_decoder_input_ids_from_labels"):
            inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
        self.dp_model.train()
        outputs = self.dp_model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        task = self.privacy_args.loss if self.privacy_args.loss != "auto" else _task(unwrapped, logits, labels)
        # the Trainer's LabelSmoother would average over the batch's tokens: each sample's own here
        losses = per_sample_loss(logits, labels, task, label_smoothing=float(self.args.label_smoothing_factor or 0.0))
        loss = losses.sum() / max(1, losses.shape[0])  # loss_reduction="mean"
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        if self.dp_optimizer is not None:
            self.dp_optimizer.zero_grad()  # per-sample gradients of one Poisson batch per step
        return super().training_step(model, inputs, num_items_in_batch)

    # -- privacy reporting --------------------------------------------------------------
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (default: the trainer's δ)."""
        d = delta if delta is not None else self.delta
        if d is None:
            raise ValueError("no δ yet: pass delta= or start training")
        return self.privacy_engine.get_epsilon(d)

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.dp_optimizer is not None and self.delta is not None:
            logs = dict(logs)
            logs["epsilon"] = round(self.get_epsilon(), 4)
            stats = self.dp_optimizer.clip_stats
            if stats is not None:
                logs["clip_fraction"] = round(stats.fraction_clipped, 4)
            # the Trainer's norm of the batch gradient, never computed (max_grad_norm is 0 here): it would read 0
            logs.pop("grad_norm", None)
        super().log(logs, *args, **kwargs)


def _field(record: Any, key: str) -> Any:
    if isinstance(record, Mapping):
        return record[key]
    raise TypeError(f"DPTrainer: user_column={key!r} needs records that are mappings (dicts), got {type(record).__name__}")
