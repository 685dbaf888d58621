"""PrivacyEngine: DP-SGD training (Abadi et al. 2016, "Deep Learning with Differential
Privacy") with the API of Opacus' ``PrivacyEngine``.

``make_private`` turns a model, an optimizer and a data loader into their private
counterparts: the model is privatized (:func:`fxdp.privatize`, per-sample gradients
from one backward pass), the optimizer clips and noises
(:class:`fxdp.optim.DPOptimizer`), the loader draws Poisson batches
(:class:`fxdp.data.DPDataLoader`, the sampling that the amplification analysis of the
accountants assumes), and every real optimizer step is recorded by the accountant with
the noise multiplier and sample rate actually used.

On top of Opacus: a privacy-budget guard that refuses the step that would exceed
``(target_epsilon, target_delta)`` before anything changes, checkpoints that restore a
run exactly (sampler, noise generator, DP optimizer state, schedulers, configuration)
and load with ``torch.load(weights_only=True)``, and :meth:`PrivacyEngine.set_sample_rate`
to change the batch size mid-training with correct accounting.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn, optim
from torch.utils.data import DataLoader

from . import checkpoint
from .accountants.validation import check_delta, check_max_grad_norm, check_noise_multiplier, check_sample_rate, is_real
from .binding import Binding
from .data import DPDataLoader, default_num_steps
from .data.loader import find_poisson_sampler
from .distributed import is_distributed_model, unwrap
from .errors import PrivacyBudgetExceeded
from .module import DPModule
from .optim import DPOptimizer, get_optimizer_class
from .optim.optimizer import clipping_modes
from .optim.clip import NONFINITE_POLICIES
from .optim.distributed import require_process_group
from .optim.noise import secure_generator
from .preflight import (
    MADE_PRIVATE,
    check_budget,
    check_ghost_criterion,
    check_optimizer_params,
    static_check,
    warn_replaced_sampler,
)
from .privatize import privatize
from .verify import FirstStepCrossCheck

__all__ = ["PrivacyEngine"]

#: Opacus' per-sample gradient modes; fxdp computes them all the same way (materialized).
_OPACUS_GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks", "functorch", "ew", "materialize", "no_op")
_SHUFFLE_CAVEAT = (
    "poisson_sampling=False: batches are shuffled fixed-size batches, but the accountant "
    "analyses Poisson subsampling; the reported epsilon is an approximation, not a proven "
    "guarantee for this run"
)

# --- the engine -------------------------------------------------------------------------


class PrivacyEngine:
    """Entry point for DP-SGD training, a drop-in for ``opacus.PrivacyEngine``.

    ::

        engine = PrivacyEngine(accountant="prv")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.1, max_grad_norm=1.0)
        ...  # ordinary training loop
        engine.get_epsilon(delta=1e-5)

    Attributes:
        accountant: the privacy accountant (``"prv"``: Gopi, Lee, Wutschitz 2021;
            ``"rdp"``: Mironov 2017; ``"gdp"``: Dong, Roth, Su 2019).
        secure_mode: draw noise and Poisson batches from a cryptographically secure
            generator (``fxdp.optim.secure``, see ``docs/secure_mode.md``); runs are then
            not reproducible and ``noise_generator`` is refused.
        caveats: notes on where the reported epsilon is not a proven guarantee
            (e.g. shuffled batches instead of Poisson sampling).
        privacy_budget: ``(target_epsilon, target_delta)`` enforced before each step, or ``None``.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        from .accountants import create_accountant
        from .accountants.registry import ACCOUNTANTS  # the one list: built-ins and register_accountant's

        if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant={accountant!r}; expected one of {sorted(ACCOUNTANTS)} "
                             "(or register one with fxdp.accountants.register_accountant)")
        self.accountant = create_accountant(mechanism=accountant)
        self.accountant_name = accountant
        self.secure_mode = bool(secure_mode)
        self.secure_rng: Optional[torch.Generator] = secure_generator() if self.secure_mode else None
        self.dataset: Any = None  # only used to detect switching to a different dataset
        self.caveats: List[str] = []
        self.privacy_budget: Optional[Tuple[float, float]] = None
        self._bindings: List[Binding] = []
        #: the last ``fxdp.check`` report of a model given to make_private (None if not run)
        self.compatibility_report: Any = None
        self._budget_plan: Optional[Tuple[Any, ...]] = None

    # -- accounting --------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Number of DP steps taken (accounted) so far."""
        return self.accountant.steps

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (by the accountant, over the recorded history)."""
        delta = check_delta(delta)
        self._warn_large_delta(delta)
        return float(self.accountant.get_epsilon(delta))

    def _warn_large_delta(self, delta: float, dataset: Any = None) -> None:
        """delta >= 1/N promises almost nothing: publishing one random record in full is
        (0, 1/N)-DP. Warned once per value."""
        n: Optional[int] = None
        if dataset is None and self._bindings:  # the units sampled: records, or users (UserPoissonSampler)
            n = self._bindings[-1].num_samples
        else:
            dataset = dataset if dataset is not None else self.dataset
            try:
                n = len(dataset) if dataset is not None else None  # type: ignore[arg-type]
            except TypeError:
                n = None
        warned = self.__dict__.setdefault("_delta_warned", set())
        if n and delta >= 1.0 / n and delta not in warned:
            warned.add(delta)
            warnings.warn(
                f"PrivacyEngine: delta={delta:g} is at least 1/N = 1/{n}: releasing one randomly chosen training "
                "example in full satisfies (0, 1/N)-DP, so this guarantee protects little. Fix: use delta well "
                f"below 1/N (e.g. {10 ** math.floor(math.log10(1.0 / n) - 1):g})",
                stacklevel=3,
            )

    # -- make_private --------------------------------------------------------------------

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion: Any = None,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Optional[torch.Generator] = None,
        grad_sample_mode: str = "auto",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        target_epsilon: Optional[float] = None,
        target_delta: Optional[float] = None,
        rewrite_options: Optional[Dict[str, Any]] = None,
        verify_first_step: bool = True,
        distributed: bool = False,
        nonfinite: str = "raise",
        example_inputs: Union[torch.Tensor, Sequence[Any], Mapping[str, Any], None] = None,
        allow_unsafe_model: bool = False,
        bk_methods: str = "model",
        input_batch_dims: Optional[Sequence[Optional[int]]] = None,
        **kwargs: Any,
    ) -> Tuple[DPModule, DPOptimizer, DataLoader]:
        """Make ``module``, ``optimizer`` and ``data_loader`` private (Opacus' signature).

        Args:
            module: the model (or an already privatized ``DPModule``), in train mode.
            optimizer: an optimizer over ``module``'s parameters.
            criterion: accepted for Opacus compatibility (only used by ghost clipping).
            data_loader: a map-style ``DataLoader``; the sample rate is ``1 / len(data_loader)``.
            noise_multiplier: sigma, noise std over the clip bound.
            max_grad_norm: clip bound C (a list of per-parameter bounds for ``"per_layer"``).
            batch_first: ``False`` for ``[T, B, ...]`` inputs.
            input_batch_dims: the batch dimension of each positional model input,
                ``None`` for one without (``nn.EmbeddingBag``'s flat token ids beside
                their offsets: ``[None, 0]``), as in ``fxdp.privatize``; overrides
                ``batch_first`` for the model and its checks.
            loss_reduction: ``"mean"`` or ``"sum"``, as the training loss.
            poisson_sampling: draw Poisson batches (what the accountants analyse); ``False``
                keeps the loader's shuffled batches, warns, and records a caveat.
            clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"`` (Andrew et al. 2021;
                its options ``target_unclipped_quantile``, ``clipbound_learning_rate``,
                ``max_clipbound``, ``min_clipbound``, ``unclipped_num_std`` go in ``kwargs``).
            noise_generator: ``torch.Generator`` for the noise (seeded runs, checkpoints).
            grad_sample_mode: ``"auto"`` (default) and ``"bk"``: book-keeping (Bu et al.
                2023): clipped sums formed in the backward pass without per-sample
                gradients (``fxdp.bookkeeping``; exact, equal to materializing);
                ``"materialize"`` and Opacus' ``"hooks"``/``"functorch"``/``"ew"``:
                ``p.grad_sample`` for every parameter, then clipping in the optimizer.
                ``"ghost"`` (Opacus' fast gradient clipping) runs book-keeping and, as in
                Opacus, returns ``(module, optimizer, criterion, data_loader)``: the
                criterion is returned as is, since book-keeping needs one ordinary
                ``loss.backward()`` (Opacus' ghost mode needs two and a loss wrapper).
            wrap_model: must be ``True`` (the returned model computes per-sample gradients).
            rand_on_empty: accepted; empty Poisson batches are zero-row batches in fxdp.
            target_epsilon, target_delta: optional privacy budget; ``optimizer.step()``
                raises :class:`fxdp.PrivacyBudgetExceeded` before a step that would exceed it.
            rewrite_options: options of :func:`fxdp.privatize`'s rewrite passes
                (e.g. ``{"batchnorm": "groupnorm"}``, see ``docs/rewrites.md``).
            verify_first_step: before the first step, compare the per-sample gradients
                of the first batch with each sample's gradient computed alone
                (:class:`fxdp.verify.FirstStepCrossCheck`, a few samples; raises
                :class:`fxdp.PerSampleGradientError` on a mismatch).
            distributed: train data-parallel over the initialized ``torch.distributed``
                group (implied by a ``DistributedDataParallel`` or
                :func:`fxdp.distributed.wrap` model): sharded Poisson sampling, clipped
                sums all-reduced, noise added once (``docs/distributed.md``).
            nonfinite: a NaN/inf per-sample gradient ``"raise"``s ``FloatingPointError``
                naming the sample (default), or ``"drop"``: its clip factor is 0, it
                stays counted in the accounting (``docs/failure_handling.md``).
            example_inputs: inputs for the static compatibility check (``fxdp.check``):
                a tensor, a tuple of positional inputs or a dict of keyword inputs; by default
                built from two dataset samples.
            bk_methods: book-keeping's method per layer where a rule has several exact ones
                (ghost or materialized norms): ``"model"`` (default) picks by the rule's cost
                model, deterministically; ``"measure"`` times the candidates on the first
                batch of each shape and keeps the faster (``model.bookkeeping_methods()``
                reports both; results then differ from ``"model"`` in float rounding only).
            allow_unsafe_model: explicit override: train even when ``fxdp.check``
                finds ops that break DP (they are listed in a warning instead of an
                error). The privacy guarantee does not hold for such a model.

        Returns:
            ``(model, optimizer, data_loader)``: a ``DPModule`` with the model's
            ``state_dict`` keys, a ``DPOptimizer`` and the (Poisson) data loader.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        if sigma > 1e6:  # failure handling: an absurd sigma is a unit or argument-order mistake
            raise ValueError(
                f"noise_multiplier={noise_multiplier!r} is absurdly large (> 1e6): the update would be pure "
                "noise. Fix: noise_multiplier is the noise std divided by max_grad_norm, typically 0.5-10"
            )
        if bk_methods not in ("model", "measure"):
            raise ValueError(f"bk_methods must be 'model' or 'measure', got bk_methods={bk_methods!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got nonfinite={nonfinite!r}")
        if clipping not in clipping_modes():
            raise ValueError(f"unknown clipping={clipping!r}; expected one of {clipping_modes()}")
        max_grad_norm = check_max_grad_norm(max_grad_norm, clipping)
        budget = check_budget(target_epsilon, target_delta)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got loss_reduction={loss_reduction!r}")
        self._check_modes(grad_sample_mode, wrap_model)
        if noise_generator is not None and self.secure_mode:
            raise ValueError("secure_mode=True draws noise from a secure generator; do not pass noise_generator")
        module, distributed = self._check_model(module, distributed, poisson_sampling)
        optimizer = self._check_optimizer(module, optimizer)
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        if len(data_loader) == 0:
            raise ValueError("data_loader yields no batches (empty dataset?); cannot derive a sample rate")

        # 1. the model: its graph captured, checked and rewritten (fxdp.privatize)
        bk = grad_sample_mode in ("auto", "bk", "ghost")
        if grad_sample_mode == "ghost":
            criterion = check_ghost_criterion(criterion, loss_reduction)
        checked = None  # the inputs the check analysed: privatize captures the graph the check read
        if not isinstance(module, DPModule):
            self.compatibility_report, checked = static_check(
                module, data_loader, example_inputs, batch_first=batch_first,
                rewrite_options=rewrite_options, allow_unsafe_model=allow_unsafe_model,
                input_batch_dims=input_batch_dims,
            )
        dp_module = self._prepare_model(module, batch_first=batch_first, loss_reduction=loss_reduction,
                                        rewrite_options=rewrite_options, bk=bk,
                                        allow_unsafe_model=allow_unsafe_model, input_batch_dims=input_batch_dims,
                                        example_inputs=checked)
        if not isinstance(module, DPModule):
            MADE_PRIVATE.add(module)
        # 2. the data: Poisson batches at rate q (what the accountant analyses)
        loader, sample_rate, expected_batch_size = self._prepare_sampling(
            data_loader, poisson_sampling=poisson_sampling, batch_first=batch_first, distributed=distributed)
        # 3. the optimizer: clip to max_grad_norm, noise sigma * max_grad_norm, step (fxdp.optim)
        cls = get_optimizer_class(clipping, distributed=True) if distributed else DPOptimizer
        dp_optimizer = cls(
            optimizer,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=self.secure_rng if self.secure_mode else noise_generator,
            secure_mode=self.secure_mode,
            clipping=clipping,
            nonfinite=nonfinite,
            **kwargs,
        )
        if bk:  # clipped sums from the model's book-keeping records instead of p.grad_sample
            dp_optimizer.attach_bookkeeping(dp_module.bookkeeping)
            dp_module.bookkeeping.measure = bk_methods == "measure"
        # 4. the accounting hooks of every step
        self._bind(dp_module, dp_optimizer, loader, sample_rate, poisson_sampling, verify_first_step)
        if budget is not None:
            self.set_privacy_budget(*budget)
        if grad_sample_mode == "ghost":  # Opacus' ghost mode returns the criterion too
            return dp_module, dp_optimizer, criterion, loader  # type: ignore[return-value]
        return dp_module, dp_optimizer, loader

    @staticmethod
    def _check_model(module: nn.Module, distributed: bool, poisson_sampling: bool) -> Tuple[nn.Module, bool]:
        """The model to privatize (DDP unwrapped; distributed implied by a DDP model): in
        train mode; warned when make_private already ran on it."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        # distributed (fxdp/distributed.py): DDP's gradient hooks are not used; the inner
        # model is privatized and the distributed optimizer all-reduces clipped sums.
        distributed = bool(distributed) or is_distributed_model(module)
        if distributed:
            require_process_group()
            if not poisson_sampling:
                raise ValueError("distributed training needs poisson_sampling=True (sharded Poisson batches)")
        module = unwrap(module)
        if not isinstance(module, DPModule) and module in MADE_PRIVATE:
            warnings.warn(
                "PrivacyEngine: make_private was already called on this model. Its parameters are now trained "
                "by two DP setups; if both train, the privacy cost adds up and each engine accounts only its own "
                "steps. Fix: call make_private once per model and training run (reuse the returned model and "
                "optimizer), or pass a fresh copy of the model",
                stacklevel=3,
            )
        if not module.training:
            raise ValueError(
                "the module is in eval mode: a model in eval mode computes no per-sample gradients, "
                "and eval-mode layers (dropout, batch statistics) would differ from training. "
                "Fix: call model.train() before make_private"
            )
        return module, distributed

    @staticmethod
    def _check_optimizer(module: nn.Module, optimizer: Any) -> optim.Optimizer:
        if not isinstance(optimizer, optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        check_optimizer_params(module, optimizer)
        return optimizer

    def _prepare_sampling(self, data_loader: DataLoader, *, poisson_sampling: bool, batch_first: bool,
                          distributed: bool) -> Tuple[DataLoader, float, float]:
        """The loader to train with, its sample rate q and expected batch size q * N."""
        sampler = find_poisson_sampler(data_loader) if poisson_sampling and not distributed else None
        if sampler is not None:
            # already Poisson (a DPDataLoader, or users drawn by UserPoissonSampler): kept as it is,
            # with its own q and q * N (N counts users for user-level sampling)
            loader = self._prepare_data_loader(data_loader, poisson_sampling=False, batch_first=batch_first,
                                               keep=True)
            return loader, check_sample_rate(sampler.sample_rate), float(sampler.expected_batch_size)
        sample_rate = check_sample_rate(1 / len(data_loader))
        loader = self._prepare_data_loader(data_loader, poisson_sampling=poisson_sampling, batch_first=batch_first)
        if distributed:  # this rank's shard of the global Poisson batch (same q, same q*N)
            loader = DPDataLoader.from_data_loader(data_loader, generator=self.secure_rng, distributed=True,
                                                   batch_first=batch_first)
        return loader, sample_rate, self._expected_batch_size(loader, sample_rate, poisson_sampling)

    def _bind(self, dp_module: DPModule, dp_optimizer: DPOptimizer, loader: DataLoader, sample_rate: float,
              poisson_sampling: bool, verify_first_step: bool) -> None:
        """Put the accounting hooks on the optimizer: guards run before a step changes anything."""
        binding = Binding(self, dp_module, dp_optimizer, loader, sample_rate, poisson_sampling)
        dp_optimizer.attach_step_hook(binding.on_step)
        # Several backward passes before one step merge Poisson draws into a batch that
        # is not Poisson-sampled at rate q, which no accountant here analyses: refused.
        dp_optimizer.register_step_guard(binding.forbid_accumulation)
        if verify_first_step:
            binding.cross_check = FirstStepCrossCheck(dp_module)
            dp_optimizer.register_step_guard(binding.cross_check_guard)
        dp_optimizer.register_step_guard(binding.budget_guard)
        self._bindings.append(binding)

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion: Any = None,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Optional[torch.Generator] = None,
        grad_sample_mode: str = "auto",
        wrap_model: bool = True,
        enforce_budget: bool = False,
        epsilon_tolerance: float = 0.01,
        rewrite_options: Optional[Dict[str, Any]] = None,
        verify_first_step: bool = True,
        **kwargs: Any,
    ) -> Tuple[DPModule, DPOptimizer, DataLoader]:
        """:meth:`make_private` with the smallest noise multiplier that keeps training for
        ``epochs`` epochs (``epochs * len(data_loader)`` steps) within
        ``(target_epsilon, target_delta)`` by this engine's accountant.

        ``enforce_budget=True`` also arms the budget guard at that budget, so training
        longer than planned raises :class:`fxdp.PrivacyBudgetExceeded` instead of
        silently exceeding it.
        """
        from .accountants import get_noise_multiplier

        budget = check_budget(target_epsilon, target_delta)
        assert budget is not None
        if isinstance(epochs, bool) or not is_real(epochs) or epochs <= 0:
            raise ValueError(f"epochs must be a number > 0, got epochs={epochs!r}")
        if not isinstance(data_loader, DataLoader) or len(data_loader) == 0:
            raise ValueError("data_loader must be a DataLoader that yields at least one batch")
        sample_rate = 1 / len(data_loader)
        self._warn_large_delta(budget[1], data_loader.dataset)
        if self.accountant.steps > 0:
            warnings.warn(
                "make_private_with_epsilon: this engine already accounted "
                f"{self.accountant.steps} steps; the noise multiplier is computed for the new "
                "training alone, so the total epsilon will exceed target_epsilon",
                stacklevel=2,
            )
        sigma = get_noise_multiplier(
            target_epsilon=budget[0],
            target_delta=budget[1],
            sample_rate=sample_rate,
            steps=math.ceil(epochs * len(data_loader)),
            accountant=self.accountant_name,
            epsilon_tolerance=epsilon_tolerance,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            target_epsilon=budget[0] if enforce_budget else None,
            target_delta=budget[1] if enforce_budget else None,
            rewrite_options=rewrite_options,
            verify_first_step=verify_first_step,
            **kwargs,
        )

    # -- compatibility (Opacus API) ---------------------------------------------------------

    def validate(self, *, module: nn.Module, optimizer: Optional[optim.Optimizer] = None,
                 data_loader: Optional[DataLoader] = None) -> None:
        """Raise if ``module`` cannot be made private (:func:`fxdp.privatize` refuses it)."""
        if not isinstance(module, DPModule):
            privatize(module)  # the result is discarded: the model itself is not modified

    def is_compatible(self, *, module: nn.Module, optimizer: Optional[optim.Optimizer] = None,
                      data_loader: Optional[DataLoader] = None) -> bool:
        """Whether :meth:`validate` passes."""
        try:
            self.validate(module=module, optimizer=optimizer, data_loader=data_loader)
        except Exception:
            return False
        return True

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """``module`` itself after validation: fxdp needs no layer replacement by the user
        (privatize's rewrite passes replace e.g. BatchNorm, sharing the parameters)."""
        cls().validate(module=module)
        return module

    # -- preparation ---------------------------------------------------------------------

    @staticmethod
    def _check_modes(grad_sample_mode: str, wrap_model: bool) -> None:
        if grad_sample_mode == "ghost_fsdp":
            raise NotImplementedError(
                "grad_sample_mode='ghost_fsdp' (FSDP) is not implemented in fxdp. Fix: use "
                "grad_sample_mode='ghost' or 'bk' (book-keeping, one backward pass), with DDP for data parallelism"
            )
        if grad_sample_mode not in _OPACUS_GRAD_SAMPLE_MODES:
            raise ValueError(
                f"unknown grad_sample_mode={grad_sample_mode!r}; expected one of {list(_OPACUS_GRAD_SAMPLE_MODES)}"
            )
        if not wrap_model:
            raise NotImplementedError(
                "wrap_model=False is not supported: fxdp returns a compiled copy of the model's "
                "graph (sharing its parameters) that computes per-sample gradients. Fix: drop "
                "wrap_model=False and train the returned module (its state_dict keys are the model's)"
            )

    def _prepare_model(self, module: nn.Module, *, batch_first: bool, loss_reduction: str,
                       rewrite_options: Optional[Dict[str, Any]] = None, bk: bool = False,
                       allow_unsafe_model: bool = False,
                       input_batch_dims: Optional[Sequence[Optional[int]]] = None,
                       example_inputs: Any = None) -> DPModule:
        if isinstance(module, DPModule):
            module.recorder.set_mode("bk" if bk else "materialize")  # the same graph serves both
            if input_batch_dims is not None and module.batch_dim != list(input_batch_dims):
                raise ValueError(f"the module is already privatized with batch dimensions {module.batch_dim}, but "
                                 f"make_private got input_batch_dims={list(input_batch_dims)}. Fix: pass matching "
                                 "arguments, or pass the original model")
            if module.recorder.loss_reduction != loss_reduction or module.batch_first != batch_first:
                raise ValueError(
                    "the module is already privatized with "
                    f"loss_reduction={module.recorder.loss_reduction!r}, batch_first={module.batch_first}, "
                    f"but make_private got loss_reduction={loss_reduction!r}, batch_first={batch_first}. "
                    "Fix: pass matching arguments, or pass the original model"
                )
            return module
        return privatize(module, loss_reduction=loss_reduction, batch_first=batch_first,
                         rewrite_options=rewrite_options, grad_sample_mode="bk" if bk else "materialize",
                         allow_unsafe_model=allow_unsafe_model, input_batch_dims=input_batch_dims,
                         example_inputs=example_inputs)

    def _prepare_data_loader(self, data_loader: DataLoader, *, poisson_sampling: bool, batch_first: bool,
                             keep: bool = False) -> DataLoader:
        if self.dataset is None:
            self.dataset = data_loader.dataset
        elif self.dataset is not data_loader.dataset:
            warnings.warn(
                "PrivacyEngine: make_private got a different dataset object than before. Accounting "
                "is per dataset; use a new PrivacyEngine for a different dataset (ignore this warning "
                "if both objects are the same logical dataset)",
                stacklevel=4,  # the caller of make_private
            )
        if keep:  # a loader that already draws Poisson batches
            return data_loader
        if poisson_sampling:
            warn_replaced_sampler(data_loader)
            return DPDataLoader.from_data_loader(data_loader, generator=self.secure_rng, batch_first=batch_first)
        warnings.warn(
            "PrivacyEngine: " + _SHUFFLE_CAVEAT + ". Fix: keep poisson_sampling=True "
            "(use BatchMemoryManager if memory limits the batch size)",
            stacklevel=3,
        )
        if _SHUFFLE_CAVEAT not in self.caveats:
            self.caveats.append(_SHUFFLE_CAVEAT)
        return data_loader

    @staticmethod
    def _expected_batch_size(loader: DataLoader, sample_rate: float, poisson: bool) -> float:
        n = len(loader.dataset)  # type: ignore[arg-type]
        if poisson:
            return sample_rate * n  # q * N: the actual Poisson batch size is private
        return float(loader.batch_size) if loader.batch_size else sample_rate * n

    def _binding(self, optimizer: Any = None, module: Any = None) -> Optional[Binding]:
        """The binding of ``optimizer`` (or ``module``), else the latest one."""
        for b in reversed(self._bindings):
            if (optimizer is not None and b.optimizer is optimizer) or (
                optimizer is None and module is not None and _same_model(b.module, module)
            ):
                return b
        if optimizer is None and module is None and self._bindings:
            return self._bindings[-1]
        return None

    # -- sample rate -----------------------------------------------------------------------

    def set_sample_rate(self, sample_rate: float, *, optimizer: DPOptimizer) -> DataLoader:
        """Change the Poisson sample rate (the expected batch size ``q * N``) from now on.

        Updates, in place, the data loader that ``make_private`` returned for
        ``optimizer`` (its sampler; ``floor(1/q)`` batches per epoch), the optimizer's
        ``expected_batch_size`` and the rate the accountant records for the following
        steps. Call it between epochs (a loader with workers samples ahead). Returns the
        loader.
        """
        binding = self._binding(optimizer=optimizer)
        if binding is None:
            raise ValueError("set_sample_rate: this optimizer was not made private by this engine")
        q = check_sample_rate(sample_rate)
        sampler = find_poisson_sampler(binding.data_loader)
        if not binding.poisson or sampler is None:
            raise ValueError(
                "set_sample_rate needs Poisson sampling; with poisson_sampling=False build a new "
                "DataLoader with the new batch size and call make_private again"
            )
        sampler.sample_rate = q
        sampler.steps = default_num_steps(q)
        if hasattr(binding.data_loader, "sample_rate"):
            binding.data_loader.sample_rate = q
        binding.sample_rate = q
        optimizer.expected_batch_size = q * binding.num_samples
        return binding.data_loader

    # -- privacy budget ------------------------------------------------------------------

    def set_privacy_budget(self, target_epsilon: Optional[float], target_delta: Optional[float] = None) -> None:
        """Enforce ``(target_epsilon, target_delta)``: ``optimizer.step()`` raises
        :class:`fxdp.PrivacyBudgetExceeded` before a step that would exceed it
        (``None`` removes the budget)."""
        self.privacy_budget = check_budget(target_epsilon, target_delta)
        self._budget_plan = None

    def _epsilon_after(self, extra: int, sigma: float, q: float) -> float:
        """Epsilon at the budget's delta after ``extra`` more steps at ``(sigma, q)``."""
        acc = type(self.accountant)()
        acc.history = list(self.accountant.history)
        if extra:
            acc.history = _extend(acc.history, sigma, q, extra)
        assert self.privacy_budget is not None
        return float(acc.get_epsilon(self.privacy_budget[1]))

    def _steps_allowed(self, sigma: float, q: float) -> int:
        """Largest n with epsilon(history + n steps at (sigma, q)) <= budget (cached:
        one search per change of sigma, q or budget, not one accountant call per step)."""
        assert self.privacy_budget is not None
        history = [tuple(h) for h in self.accountant.history]
        plan = self._budget_plan
        if plan is not None:
            p_sigma, p_q, p_hist, p_allowed = plan
            done = self.accountant.steps - sum(h[2] for h in p_hist)
            if p_sigma == sigma and p_q == q and done >= 0 and history == _extend(list(p_hist), sigma, q, done):
                return p_allowed - done
        eps = self.privacy_budget[0]
        lo, hi = 0, 1  # eps(lo) <= budget < eps(hi) once found
        while self._epsilon_after(hi, sigma, q) <= eps:
            lo, hi = hi, hi * 2
            if hi > 1 << 40:  # sigma so large that the budget never runs out
                lo = hi
                break
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._epsilon_after(mid, sigma, q) <= eps else (lo, mid)
        self._budget_plan = (sigma, q, history, lo)
        return lo

    def _check_budget_before_step(self, sigma: float, q: float) -> None:
        if self.privacy_budget is None:
            return
        if self._steps_allowed(sigma, q) >= 1:
            return
        eps, delta = self.privacy_budget
        spent = self._epsilon_after(0, sigma, q) if self.accountant.steps else 0.0
        after = self._epsilon_after(1, sigma, q)
        raise PrivacyBudgetExceeded(
            f"privacy budget exhausted: the next step (noise_multiplier={sigma:g}, sample_rate={q:g}) "
            f"would bring epsilon from {spent:.4g} to {after:.4g} > target_epsilon={eps:g} at "
            f"delta={delta:g} after {self.steps} steps. The step was not applied (parameters, "
            "optimizer state and accountant are unchanged). Fix: stop training here, or plan the run "
            "with make_private_with_epsilon / a larger noise_multiplier"
        )

    # -- checkpoints: fxdp/checkpoint.py's functions, with this engine as their first argument --
    save_checkpoint = checkpoint.save_checkpoint
    load_checkpoint = checkpoint.load_checkpoint

    def privacy_statement(self, delta: Optional[float] = None) -> str:
        """Short plain-language statement of what this run's (epsilon, delta) protects and
        what it does not (``delta`` defaults as in :func:`fxdp.export`); see ``fxdp.card``."""
        from .card import privacy_statement

        return privacy_statement(self, delta)


# --- helpers ----------------------------------------------------------------------------


def _extend(history: List[Tuple[float, float, int]], sigma: float, q: float, n: int) -> List[Tuple[float, float, int]]:
    """``history`` followed by ``n`` steps at ``(sigma, q)``, run-length compressed as the
    accountants store it."""
    out = [tuple(h) for h in history]
    if n <= 0:
        return out  # type: ignore[return-value]
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + n)
    else:
        out.append((sigma, q, n))
    return out  # type: ignore[return-value]


def _same_model(dp_module: nn.Module, module: nn.Module) -> bool:
    """``module`` is ``dp_module`` or the plain model it was privatized from (shared parameters)."""
    if dp_module is module:
        return True
    first = next(iter(dp_module.parameters()), None)
    return first is not None and first is next(iter(module.parameters()), None)
