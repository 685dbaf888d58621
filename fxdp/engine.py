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

import inspect
import math
import os
import warnings
import weakref
from numbers import Real
from typing import IO, Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader

from .data import DPDataLoader, default_num_steps
from .errors import PrivacyBudgetExceeded
from .module import DPModule
from .optim import DPOptimizer
from .optim.noise import secure_generator
from .privatize import privatize

__all__ = ["PrivacyEngine"]

#: Opacus' per-sample gradient modes; fxdp computes them all the same way (materialized).
_OPACUS_GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks", "functorch", "ew", "materialize", "no_op")
_CLIPPINGS = ("flat", "per_layer", "adaptive")
_CHECKPOINT_FORMAT = 1
_SHUFFLE_CAVEAT = (
    "poisson_sampling=False: batches are shuffled fixed-size batches, but the accountant "
    "analyses Poisson subsampling; the reported epsilon is an approximation, not a proven "
    "guarantee for this run"
)

PathLike = Union[str, os.PathLike, BinaryIO, IO[bytes]]


# --- validation ---------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_noise_multiplier(sigma: Any) -> float:
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0, got noise_multiplier={sigma!r}. "
            "Fix: pass the ratio of the noise std to the clip bound, e.g. noise_multiplier=1.0 "
            "(0 disables noise and gives epsilon = inf), or use make_private_with_epsilon to "
            "derive it from a target epsilon"
        )
    return float(sigma)


def _check_max_grad_norm(c: Any, clipping: str) -> Union[float, List[float]]:
    if clipping == "per_layer":
        if _is_real(c) or not isinstance(c, Sequence):
            raise ValueError(
                f"clipping='per_layer' needs max_grad_norm as a list with one bound per trainable "
                f"parameter, got max_grad_norm={c!r}. Fix: e.g. max_grad_norm=[1.0] * "
                "len([p for p in model.parameters() if p.requires_grad])"
            )
        return [_check_max_grad_norm(v, "flat") for v in c]  # type: ignore[misc]
    if not _is_real(c) or not math.isfinite(c) or c <= 0:
        raise ValueError(
            f"max_grad_norm must be a finite number > 0 (the per-sample clip bound C), got "
            f"max_grad_norm={c!r}. Fix: pass e.g. max_grad_norm=1.0; see clip statistics "
            "(optimizer.clip_stats) to tune it" + (
                "; a list of bounds needs clipping='per_layer'" if isinstance(c, Sequence) else ""
            )
        )
    return float(c)


def _check_budget(target_epsilon: Any, target_delta: Any) -> Optional[Tuple[float, float]]:
    if target_epsilon is None and target_delta is None:
        return None
    if target_epsilon is None or target_delta is None:
        raise ValueError(
            "a privacy budget needs both target_epsilon and target_delta, got "
            f"target_epsilon={target_epsilon!r}, target_delta={target_delta!r}"
        )
    if not _is_real(target_epsilon) or not target_epsilon > 0 or math.isnan(target_epsilon):
        raise ValueError(f"target_epsilon must be a number > 0, got target_epsilon={target_epsilon!r}")
    return float(target_epsilon), _check_delta(target_delta, "target_delta")


def _check_delta(delta: Any, name: str = "delta") -> float:
    if not _is_real(delta) or not 0 < delta < 1:
        raise ValueError(
            f"{name} must be in the open interval (0, 1), got {name}={delta!r}. Fix: use a delta "
            "well below 1/N for N training examples, e.g. 1e-5"
        )
    return float(delta)


def _check_sample_rate(q: Any) -> float:
    if not _is_real(q) or not 0 < q <= 1:
        raise ValueError(
            f"sample_rate must be in (0, 1], got sample_rate={q!r}. Fix: the sample rate is the "
            "expected batch size divided by the dataset size, e.g. 256 / len(dataset)"
        )
    return float(q)


def _warn_replaced_sampler(data_loader: DataLoader) -> None:
    """Poisson sampling replaces the loader's sampler: say so when it was not a plain
    sequential or shuffling one (a WeightedRandomSampler's weights, a class-balancing
    batch sampler or a subset sampler are dropped)."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    if isinstance(data_loader, DPDataLoader) or _find_poisson_sampler(data_loader) is not None:
        return
    sampler = data_loader.sampler
    batch_sampler = data_loader.batch_sampler
    custom = not isinstance(sampler, (SequentialSampler, RandomSampler)) or (
        batch_sampler is not None and type(batch_sampler) is not BatchSampler)
    if custom:
        what = type(batch_sampler if type(batch_sampler) is not BatchSampler else sampler).__name__
        warnings.warn(
            f"PrivacyEngine: the data loader's {what} is replaced by Poisson sampling of the whole dataset (each "
            "example with probability q, as the accountant assumes): its weights, subset or batching are dropped. "
            "Fix: if you need a subset, pass a torch.utils.data.Subset as the dataset; re-weighting examples "
            "changes the privacy analysis and is not supported",
            stacklevel=4,
        )


#: models make_private was called on (weak references: a model freed is forgotten)
_MADE_PRIVATE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _check_optimizer_params(module: nn.Module, optimizer: optim.Optimizer) -> None:
    """Every parameter the optimizer updates must be one of the model's: the DP
    optimizer clips per-sample gradients that only the model computes."""
    own = {id(p) for p in module.parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not parameters of the module "
            f"(shapes {shapes}{', ...' if len(foreign) > 3 else ''}). Fix: build the optimizer from "
            "module.parameters() of the model passed as module= (create it after any change to the "
            "model, e.g. after replacing layers or moving it with .to())"
        )


def _find_poisson_sampler(data_loader: DataLoader) -> Any:
    bs = getattr(data_loader, "batch_sampler", None)
    while bs is not None and not hasattr(bs, "sample_rate") and hasattr(bs, "sampler"):
        bs = bs.sampler  # BatchMemoryManager's splitter wraps the Poisson sampler
    return bs if hasattr(bs, "sample_rate") else None


# --- accumulation check ---------------------------------------------------------------


def _accumulated_backward(module: nn.Module) -> bool:
    """Whether some ``p.grad_sample`` holds more than one backward pass (a list with
    one entry per pass, Opacus' convention for gradient accumulation), or, in
    book-keeping mode, the recorder formed clipped sums for several passes."""
    recorder = getattr(module, "recorder", None)
    if recorder is not None and recorder.mode == "bk":
        return recorder.passes > 1
    return any(isinstance(getattr(p, "grad_sample", None), list) and len(p.grad_sample) > 1 for p in module.parameters())


class _Binding:
    """What one ``make_private`` call tied together, and its accounting hooks."""

    def __init__(
        self,
        engine: PrivacyEngine,
        module: DPModule,
        optimizer: DPOptimizer,
        data_loader: DataLoader,
        sample_rate: float,
        poisson: bool,
    ) -> None:
        self.engine = engine
        self.module = module
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.sample_rate = sample_rate
        self.poisson = poisson
        sampler = _find_poisson_sampler(data_loader)
        # the units q samples: records, or users for UserPoissonSampler
        self.num_samples = sampler.num_samples if sampler is not None else len(data_loader.dataset)  # type: ignore
        self.cross_check: Any = None  # fxdp.verify.FirstStepCrossCheck, if enabled

    def step_sample_rate(self, optimizer: DPOptimizer) -> float:
        """q of this step: k accumulated fixed batches form one batch k times larger
        (Opacus' rule; with Poisson sampling accumulation is refused)."""
        return min(1.0, self.sample_rate * max(1, optimizer.accumulated_iterations))

    def on_step(self, optimizer: DPOptimizer) -> None:
        """Accountant hook: one subsampled Gaussian step at the sigma and q used."""
        self.engine.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.step_sample_rate(optimizer))

    def forbid_accumulation(self, optimizer: DPOptimizer) -> None:
        if self.poisson and _accumulated_backward(self.module):
            raise ValueError(
                "gradient accumulation detected: the per-sample gradients hold several backward "
                "passes but optimizer.step() ran once. With Poisson sampling each batch must be one "
                "step of the accountant, so this is refused (the step was not applied). Fix: call "
                "optimizer.step() and optimizer.zero_grad() after every backward pass, and use "
                "fxdp.BatchMemoryManager(data_loader=..., max_physical_batch_size=..., optimizer=...) "
                "to split large logical batches into physical ones"
            )

    def budget_guard(self, optimizer: DPOptimizer) -> None:
        self.engine._check_budget_before_step(optimizer.noise_multiplier, self.step_sample_rate(optimizer))


# --- the engine -------------------------------------------------------------------------


def _example_from_loader(data_loader: DataLoader,
                         module: nn.Module) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
    """Model inputs ``(args, kwargs)`` for the static check, built from two dataset
    samples through the loader's collate function without touching any sampler (no
    randomness used). A tuple batch ``(x1, ..., xk, y)`` gives the leading elements
    ``forward`` requires (``for x, y in loader: model(x)``: just ``x``); a dict batch
    (Hugging Face) gives the keys ``forward`` names, as keywords."""
    dataset = data_loader.dataset
    try:
        n = len(dataset)  # type: ignore[arg-type]
        batch = data_loader.collate_fn([dataset[i] for i in range(min(2, n))])
    except Exception:
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    if isinstance(batch, dict):
        names = {p.name for p in params}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        kwargs = {k: v for k, v in batch.items() if k in names or takes_any}
        kwargs.pop("labels", None)  # the loss is computed outside the model in DP training
        return ((), kwargs) if kwargs else None
    if isinstance(batch, (tuple, list)) and batch:
        required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    and p.default is p.empty]
        k = len(required) if required and len(required) < len(batch) else 1
        return tuple(batch[:k]), {}
    return ((batch,), {}) if isinstance(batch, Tensor) else None


def _static_check(module: nn.Module, data_loader: DataLoader, example_inputs: Union[Sequence[Any], Mapping[str, Any], None], *,
                  batch_first: bool, rewrite_options: Optional[Dict[str, Any]], allow_unsafe_model: bool) -> Any:
    """Run ``fxdp.check`` on the model; refuse it when an op breaks DP, unless overridden."""
    from .check import check

    if isinstance(example_inputs, Mapping):  # keyword inputs (a Hugging Face batch)
        example: Any = ((), dict(example_inputs))
    else:
        example = ((tuple(example_inputs), {}) if example_inputs is not None
                   else _example_from_loader(data_loader, module))
    if example is None:
        warnings.warn(
            "PrivacyEngine: could not build example inputs from the data loader, so the static "
            "compatibility check (fxdp.check) did not run. Fix: pass example_inputs=(x,) to make_private.",
            stacklevel=3,
        )
        return None
    try:
        inputs, kwargs = example
        report = check(module, inputs, batch_first=batch_first, rewrite_options=rewrite_options,
                       example_kwargs=kwargs)
    except Exception as e:  # inputs that do not fit the model's forward: the check cannot run
        warnings.warn(
            f"PrivacyEngine: the static compatibility check (fxdp.check) could not run on example inputs "
            f"taken from the data loader ({type(e).__name__}: {e}). Fix: pass example_inputs=(x,) to "
            "make_private.",
            stacklevel=3,
        )
        return None
    if example_inputs is None and any(f.code == "export" for f in report.errors):
        # the loader's batch as positional inputs may not be how the model is called (keyword
        # inputs of a Hugging Face model); the DP model captures and checks the graph of the real
        # call on its first training step instead, refusing the same problems there
        warnings.warn(
            "PrivacyEngine: torch.export could not capture the model with the data loader's batch as positional "
            f"inputs ({report.errors[0].problem[:200]}); the DP model checks its graph at the first training "
            "call instead. Fix: pass example_inputs=(...) to make_private to check it now.",
            stacklevel=3,
        )
        return None
    if not report.ok:
        if not allow_unsafe_model:
            report.raise_if_errors()
        warnings.warn(
            "PrivacyEngine: allow_unsafe_model=True: training a model with ops that break DP; the privacy "
            f"guarantee does not hold:\n{report}",
            stacklevel=3,
        )
    return report


def _materializing(dp_module: DPModule, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (the first-step cross-check, which compares ``p.grad_sample``) with the
    model materializing per-sample gradients, whatever its mode."""
    rec = dp_module.recorder
    mode, rec.mode = rec.mode, "materialize"
    try:
        return fn()
    finally:
        rec.mode = mode


def _check_ghost_criterion(criterion: Any, loss_reduction: str) -> Any:
    """The criterion of ``grad_sample_mode="ghost"`` (Opacus' default: cross-entropy),
    which must reduce the loss as ``loss_reduction`` says (the clip factors' scale)."""
    if criterion is None:
        criterion = nn.CrossEntropyLoss(reduction=loss_reduction)
    reduction = getattr(criterion, "reduction", loss_reduction)
    if reduction != loss_reduction:
        raise ValueError(
            f"grad_sample_mode='ghost': the criterion reduces with reduction={reduction!r} but "
            f"loss_reduction={loss_reduction!r}. Fix: pass loss_reduction={reduction!r} (or a criterion "
            f"with reduction={loss_reduction!r})"
        )
    return criterion


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
        self._bindings: List[_Binding] = []
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
        delta = _check_delta(delta)
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
        example_inputs: Union[Sequence[Any], Mapping[str, Any], None] = None,
        allow_unsafe_model: bool = False,
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
                a tuple of positional inputs or a dict of keyword inputs; by default
                built from two dataset samples.
            allow_unsafe_model: explicit override: train even when ``fxdp.check``
                finds ops that break DP (they are listed in a warning instead of an
                error). The privacy guarantee does not hold for such a model.

        Returns:
            ``(model, optimizer, data_loader)``: a ``DPModule`` with the model's
            ``state_dict`` keys, a ``DPOptimizer`` and the (Poisson) data loader.
        """
        sigma = _check_noise_multiplier(noise_multiplier)
        if sigma > 1e6:  # failure handling: an absurd sigma is a unit or argument-order mistake
            raise ValueError(
                f"noise_multiplier={noise_multiplier!r} is absurdly large (> 1e6): the update would be pure "
                "noise. Fix: noise_multiplier is the noise std divided by max_grad_norm, typically 0.5-10"
            )
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got nonfinite={nonfinite!r}")
        if clipping not in _CLIPPINGS:
            raise ValueError(f"unknown clipping={clipping!r}; expected one of {list(_CLIPPINGS)}")
        max_grad_norm = _check_max_grad_norm(max_grad_norm, clipping)
        budget = _check_budget(target_epsilon, target_delta)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got loss_reduction={loss_reduction!r}")
        self._check_modes(grad_sample_mode, wrap_model)
        if noise_generator is not None and self.secure_mode:
            raise ValueError("secure_mode=True draws noise from a secure generator; do not pass noise_generator")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        # distributed (fxdp/distributed.py): DDP's gradient hooks are not used; the inner
        # model is privatized and the distributed optimizer all-reduces clipped sums.
        from .distributed import _require_process_group, is_distributed_model, unwrap

        distributed = bool(distributed) or is_distributed_model(module)
        if distributed:
            _require_process_group()
            if not poisson_sampling:
                raise ValueError("distributed training needs poisson_sampling=True (sharded Poisson batches)")
        module = unwrap(module)
        if not isinstance(module, DPModule) and module in _MADE_PRIVATE:
            warnings.warn(
                "PrivacyEngine: make_private was already called on this model. Its parameters are now trained "
                "by two DP setups; if both train, the privacy cost adds up and each engine accounts only its own "
                "steps. Fix: call make_private once per model and training run (reuse the returned model and "
                "optimizer), or pass a fresh copy of the model",
                stacklevel=2,
            )
        if not module.training:
            raise ValueError(
                "the module is in eval mode: a model in eval mode computes no per-sample gradients, "
                "and eval-mode layers (dropout, batch statistics) would differ from training. "
                "Fix: call model.train() before make_private"
            )
        if not isinstance(optimizer, optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        _check_optimizer_params(module, optimizer)
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        if len(data_loader) == 0:
            raise ValueError("data_loader yields no batches (empty dataset?); cannot derive a sample rate")

        bk = grad_sample_mode in ("auto", "bk", "ghost")
        if grad_sample_mode == "ghost":
            criterion = _check_ghost_criterion(criterion, loss_reduction)
        if not isinstance(module, DPModule):
            self.compatibility_report = _static_check(
                module, data_loader, example_inputs, batch_first=batch_first,
                rewrite_options=rewrite_options, allow_unsafe_model=allow_unsafe_model,
            )
        dp_module = self._prepare_model(module, batch_first=batch_first, loss_reduction=loss_reduction,
                                        rewrite_options=rewrite_options, bk=bk)
        if not isinstance(module, DPModule):
            _MADE_PRIVATE.add(module)
        sampler = _find_poisson_sampler(data_loader) if poisson_sampling and not distributed else None
        if sampler is not None:
            # already Poisson (a DPDataLoader, or users drawn by UserPoissonSampler): kept as it is,
            # with its own q and q * N (N counts users for user-level sampling)
            sample_rate = _check_sample_rate(sampler.sample_rate)
            loader = self._prepare_data_loader(data_loader, poisson_sampling=False, batch_first=batch_first,
                                               keep=True)
            expected_batch_size = float(sampler.expected_batch_size)
        else:
            sample_rate = _check_sample_rate(1 / len(data_loader))
            loader = self._prepare_data_loader(data_loader, poisson_sampling=poisson_sampling,
                                               batch_first=batch_first)
            if distributed:  # this rank's shard of the global Poisson batch (same q, same q*N)
                loader = DPDataLoader.from_data_loader(data_loader, generator=self.secure_rng, distributed=True,
                                                       batch_first=batch_first)
            expected_batch_size = self._expected_batch_size(loader, sample_rate, poisson_sampling)
        from .optim import get_optimizer_class

        dp_optimizer = (get_optimizer_class(clipping, distributed=True) if distributed else DPOptimizer)(
            optimizer,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=self.secure_rng if self.secure_mode else noise_generator,
            secure_mode=self.secure_mode,
            clipping=clipping,
            **kwargs,
        )
        if bk:
            dp_optimizer.attach_bookkeeping(dp_module.recorder)
        dp_optimizer.nonfinite = dp_module.recorder.nonfinite = nonfinite  # read by bookkeeping / clipping
        binding = _Binding(self, dp_module, dp_optimizer, loader, sample_rate, poisson_sampling)
        dp_optimizer.attach_step_hook(binding.on_step)
        # Several backward passes before one step merge Poisson draws into a batch that
        # is not Poisson-sampled at rate q, which no accountant here analyses: refused.
        dp_optimizer.register_step_guard(binding.forbid_accumulation)
        if verify_first_step:
            from .verify import FirstStepCrossCheck

            binding.cross_check = FirstStepCrossCheck(dp_module)
            dp_optimizer.register_step_guard(lambda _: _materializing(dp_module, binding.cross_check.run))
        dp_optimizer.register_step_guard(binding.budget_guard)
        self._bindings.append(binding)
        if budget is not None:
            self.set_privacy_budget(*budget)
        if grad_sample_mode == "ghost":  # Opacus' ghost mode returns the criterion too
            return dp_module, dp_optimizer, criterion, loader  # type: ignore[return-value]
        return dp_module, dp_optimizer, loader

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

        budget = _check_budget(target_epsilon, target_delta)
        assert budget is not None
        if isinstance(epochs, bool) or not _is_real(epochs) or epochs <= 0:
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
                       rewrite_options: Optional[Dict[str, Any]] = None, bk: bool = False) -> DPModule:
        if isinstance(module, DPModule):
            if bk != (module.recorder.mode == "bk"):
                module.recorder.mode = "bk" if bk else "materialize"  # same graph, other mode
            if module.recorder.loss_reduction != loss_reduction or module.batch_first != batch_first:
                raise ValueError(
                    "the module is already privatized with "
                    f"loss_reduction={module.recorder.loss_reduction!r}, batch_first={module.batch_first}, "
                    f"but make_private got loss_reduction={loss_reduction!r}, batch_first={batch_first}. "
                    "Fix: pass matching arguments, or pass the original model"
                )
            return module
        return privatize(module, loss_reduction=loss_reduction, batch_first=batch_first,
                         rewrite_options=rewrite_options, grad_sample_mode="bk" if bk else "materialize")

    def _prepare_data_loader(self, data_loader: DataLoader, *, poisson_sampling: bool, batch_first: bool,
                             keep: bool = False) -> DataLoader:
        if self.dataset is None:
            self.dataset = data_loader.dataset
        elif self.dataset is not data_loader.dataset:
            warnings.warn(
                "PrivacyEngine: make_private got a different dataset object than before. Accounting "
                "is per dataset; use a new PrivacyEngine for a different dataset (ignore this warning "
                "if both objects are the same logical dataset)",
                stacklevel=3,
            )
        if keep:  # a loader that already draws Poisson batches
            return data_loader
        if poisson_sampling:
            _warn_replaced_sampler(data_loader)
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

    def _binding(self, optimizer: Any = None, module: Any = None) -> Optional[_Binding]:
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
        q = _check_sample_rate(sample_rate)
        sampler = _find_poisson_sampler(binding.data_loader)
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
        self.privacy_budget = _check_budget(target_epsilon, target_delta)
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

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(
        self,
        *,
        path: PathLike,
        module: nn.Module,
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler: Any = None,
        grad_clip_scheduler: Any = None,
        checkpoint_dict: Optional[Dict[str, Any]] = None,
        module_state_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_save_kwargs: Optional[Dict[str, Any]] = None,
        data_loader: Optional[DataLoader] = None,
    ) -> None:
        """Save everything a run needs to continue exactly (Opacus' keys plus ``"fxdp"``).

        Model weights (the plain model's keys), optimizer state (with DP state such as
        the adaptive clip bound), accountant history, scheduler states, and under
        ``"fxdp"`` the engine configuration (sigma, C, q, accountant, budget), the noise
        generator state, the Poisson sampler state (position in the epoch) of
        ``data_loader`` (default: the loader ``make_private`` returned for
        ``optimizer``) and torch's global RNG state. Only tensors and plain containers
        are stored, so :meth:`load_checkpoint` reads it with ``weights_only=True``.
        Save between logical batches (after ``optimizer.step()``).
        """
        ckpt: Dict[str, Any] = dict(checkpoint_dict or {})
        ckpt["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        ckpt["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            ckpt["optimizer_state_dict"] = optimizer.state_dict()
        if noise_scheduler is not None:
            ckpt["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            ckpt["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        binding = self._binding(optimizer=optimizer, module=module if optimizer is None else None)
        ckpt["fxdp"] = self._fxdp_state(optimizer, binding, data_loader)
        torch.save(ckpt, path, **(torch_save_kwargs or {}))

    def _fxdp_state(self, optimizer: Any, binding: Optional[_Binding], data_loader: Optional[DataLoader]) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "format": _CHECKPOINT_FORMAT,
            "accountant": self.accountant_name,
            "secure_mode": self.secure_mode,
            "steps": self.steps,
            "privacy_budget": list(self.privacy_budget) if self.privacy_budget else None,
            "caveats": list(self.caveats),
            "torch_rng_state": torch.get_rng_state(),
        }
        if isinstance(optimizer, DPOptimizer):
            state["optimizer"] = {
                "clipping": optimizer.clipping,
                "loss_reduction": optimizer.loss_reduction,
                "noise_multiplier": float(optimizer.noise_multiplier),
                "max_grad_norm": float(optimizer.max_grad_norm),
                "max_grad_norms": [float(c) for c in getattr(optimizer, "max_grad_norms", [])],
                "expected_batch_size": None if optimizer.expected_batch_size is None else float(optimizer.expected_batch_size),
                "noise_generator_state": optimizer.noise_generator_state(),
            }
        if binding is not None:
            state["sample_rate"] = float(binding.sample_rate)
            state["poisson_sampling"] = binding.poisson
        loader = data_loader if data_loader is not None else (binding.data_loader if binding else None)
        state["data_loader_state"] = _loader_state(loader) if loader is not None else None
        return state

    def load_checkpoint(
        self,
        *,
        path: PathLike,
        module: nn.Module,
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler: Any = None,
        grad_clip_scheduler: Any = None,
        module_load_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_load_kwargs: Optional[Dict[str, Any]] = None,
        data_loader: Optional[DataLoader] = None,
        restore_rng_state: bool = True,
    ) -> Dict[str, Any]:
        """Restore a :meth:`save_checkpoint` into this engine and the given objects.

        Reads with ``torch.load(weights_only=True)`` (no arbitrary unpickling). Call it
        after ``make_private`` built the model, optimizer and loader of the new run; the
        next batches, noise draws and steps are then those of the saved run.
        ``restore_rng_state`` also restores torch's global RNG. Returns the checkpoint
        dict (user entries of ``checkpoint_dict`` included).
        """
        load_kwargs = dict(torch_load_kwargs or {})
        if load_kwargs.pop("weights_only", True) is not True:
            raise ValueError("load_checkpoint always uses weights_only=True: it never unpickles arbitrary objects")
        ckpt = torch.load(path, weights_only=True, **load_kwargs)
        fx = ckpt.get("fxdp", {})
        if fx.get("accountant", self.accountant_name) != self.accountant_name:
            raise ValueError(
                f"the checkpoint was saved with accountant={fx['accountant']!r} but this engine uses "
                f"accountant={self.accountant_name!r}. Fix: PrivacyEngine(accountant={fx['accountant']!r})"
            )
        module.load_state_dict(_unwrap_opacus_keys(ckpt["module_state_dict"], module),
                               **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(ckpt["privacy_accountant_state_dict"])
        opt_state = ckpt.get("optimizer_state_dict")
        if optimizer is not None and opt_state:
            optimizer.load_state_dict(opt_state)
        elif (optimizer is not None) != bool(opt_state):
            warnings.warn(
                "load_checkpoint: the checkpoint has "
                f"{'an' if opt_state else 'no'} optimizer state but optimizer was "
                f"{'not ' if optimizer is None else ''}given",
                stacklevel=2,
            )
        binding = self._binding(optimizer=optimizer, module=module if optimizer is None else None)
        if isinstance(optimizer, DPOptimizer) and fx.get("optimizer"):
            _restore_optimizer(optimizer, fx["optimizer"])
        if binding is not None and fx.get("sample_rate") is not None and fx["sample_rate"] != binding.sample_rate:
            self.set_sample_rate(fx["sample_rate"], optimizer=binding.optimizer)
        loader = data_loader if data_loader is not None else (binding.data_loader if binding else None)
        if fx.get("data_loader_state") is not None and loader is not None:
            _load_loader_state(loader, fx["data_loader_state"])
        if noise_scheduler is not None and ckpt.get("noise_scheduler_state_dict"):
            noise_scheduler.load_state_dict(ckpt["noise_scheduler_state_dict"])
        if grad_clip_scheduler is not None and ckpt.get("grad_clip_scheduler_state_dict"):
            grad_clip_scheduler.load_state_dict(ckpt["grad_clip_scheduler_state_dict"])
        if "privacy_budget" in fx:
            budget = fx["privacy_budget"]
            self.set_privacy_budget(*(budget if budget else (None, None)))
        self.caveats = list(dict.fromkeys(self.caveats + list(fx.get("caveats", []))))
        if restore_rng_state and fx.get("torch_rng_state") is not None:
            torch.set_rng_state(fx["torch_rng_state"])
        return ckpt

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


def _unwrap_opacus_keys(state: Dict[str, Any], module: nn.Module) -> Dict[str, Any]:
    """Drop the ``_module.`` prefix of a checkpoint written by Opacus' GradSampleModule."""
    prefix = "_module."
    if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in module.state_dict()):
        return type(state)((k[len(prefix):], v) for k, v in state.items())
    return state


def _restore_optimizer(optimizer: DPOptimizer, state: Dict[str, Any]) -> None:
    for key in ("clipping", "loss_reduction"):
        if state.get(key) is not None and state[key] != getattr(optimizer, key):
            raise ValueError(
                f"the checkpoint was saved with {key}={state[key]!r} but the optimizer uses "
                f"{key}={getattr(optimizer, key)!r}. Fix: make_private(..., {key}={state[key]!r})"
            )
    optimizer.noise_multiplier = float(state["noise_multiplier"])
    if state.get("max_grad_norms"):
        optimizer.max_grad_norms = [float(c) for c in state["max_grad_norms"]]  # type: ignore[attr-defined]
    optimizer.max_grad_norm = float(state["max_grad_norm"])
    if state.get("expected_batch_size") is not None:
        optimizer.expected_batch_size = state["expected_batch_size"]
    gen_state = state.get("noise_generator_state")
    if gen_state is not None:
        if optimizer.generator is None:
            warnings.warn(
                "load_checkpoint: the checkpoint has a noise generator state but the optimizer draws "
                "noise from the global RNG; pass noise_generator= to make_private to resume it",
                stacklevel=3,
            )
        elif not optimizer.secure_mode:
            optimizer.set_noise_generator_state(gen_state)


def _loader_state(loader: DataLoader) -> Optional[Dict[str, Any]]:
    """Sampling state of a loader: the Poisson sampler's (exact mid-epoch), else the
    shuffling generator's (exact at epoch boundaries)."""
    sampler = _find_poisson_sampler(loader)
    if sampler is not None and hasattr(sampler, "state_dict"):
        return {"poisson_sampler": sampler.state_dict()}
    gen = getattr(getattr(loader, "sampler", None), "generator", None) or getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        return {"generator_state": gen.get_state()}
    return None


def _load_loader_state(loader: DataLoader, state: Dict[str, Any]) -> None:
    sampler = _find_poisson_sampler(loader)
    if "poisson_sampler" in state:
        if sampler is None or not hasattr(sampler, "load_state_dict"):
            raise ValueError(
                "the checkpoint has a Poisson sampler state but the data loader does not sample by "
                "Poisson; pass the loader returned by make_private(poisson_sampling=True)"
            )
        sampler.load_state_dict(state["poisson_sampler"])
        return
    gen = getattr(getattr(loader, "sampler", None), "generator", None) or getattr(loader, "generator", None)
    if "generator_state" in state and isinstance(gen, torch.Generator):
        gen.set_state(state["generator_state"])
