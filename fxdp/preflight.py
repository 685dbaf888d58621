"""The checks ``PrivacyEngine.make_private`` runs before it changes anything: the
arguments, the optimizer's parameters, the loader's sampler, and the static
compatibility check (``fxdp.check``) on example inputs taken from the loader."""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn, optim
from torch.utils.data import DataLoader

from .accountants.validation import check_delta, is_real
from .data import DPDataLoader
from .data.loader import find_poisson_sampler
from .example_inputs import call_inputs

__all__ = ["MADE_PRIVATE", "check_budget", "check_ghost_criterion", "check_optimizer_params", "static_check", "warn_replaced_sampler"]


def check_budget(target_epsilon: Any, target_delta: Any) -> Optional[Tuple[float, float]]:
    if target_epsilon is None and target_delta is None:
        return None
    if target_epsilon is None or target_delta is None:
        raise ValueError(
            "a privacy budget needs both target_epsilon and target_delta, got "
            f"target_epsilon={target_epsilon!r}, target_delta={target_delta!r}"
        )
    if not is_real(target_epsilon) or not target_epsilon > 0 or math.isnan(target_epsilon):
        raise ValueError(f"target_epsilon must be a number > 0, got target_epsilon={target_epsilon!r}")
    return float(target_epsilon), check_delta(target_delta, "target_delta")


def warn_replaced_sampler(data_loader: DataLoader) -> None:
    """Poisson sampling replaces the loader's sampler: say so when it was not a plain
    sequential or shuffling one (a WeightedRandomSampler's weights, a class-balancing
    batch sampler or a subset sampler are dropped)."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    if isinstance(data_loader, DPDataLoader) or find_poisson_sampler(data_loader) is not None:
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
            stacklevel=5,  # the caller of make_private
        )


#: models make_private was called on (weak references: a model freed is forgotten)
MADE_PRIVATE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def check_optimizer_params(module: nn.Module, optimizer: optim.Optimizer) -> None:
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


def example_from_loader(data_loader: DataLoader,
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


def static_check(module: nn.Module, data_loader: DataLoader, example_inputs: Union[Sequence[Any], Mapping[str, Any], None], *,
                  batch_first: bool, rewrite_options: Optional[Dict[str, Any]], allow_unsafe_model: bool,
                  input_batch_dims: Optional[Sequence[Optional[int]]] = None) -> Tuple[Any, Any]:
    """Run ``fxdp.check`` on the model; refuse it when an op breaks DP, unless overridden.
    Returns the report and the inputs it analysed, as ``privatize``'s ``example_inputs``
    (``None`` where the check did not run on them), so privatize captures the graph the
    check read."""
    from .check import check

    example: Any = (call_inputs(example_inputs) if example_inputs is not None
                    else example_from_loader(data_loader, module))
    if example is None:
        warnings.warn(
            "PrivacyEngine: could not build example inputs from the data loader, so the static "
            "compatibility check (fxdp.check) did not run. Fix: pass example_inputs=(x,) to make_private.",
            stacklevel=3,
        )
        return None, None
    try:
        inputs, kwargs = example
        report = check(module, inputs, batch_first=batch_first, rewrite_options=rewrite_options,
                       example_kwargs=kwargs, input_batch_dims=input_batch_dims)
    except Exception as e:  # inputs that do not fit the model's forward: the check cannot run
        warnings.warn(
            f"PrivacyEngine: the static compatibility check (fxdp.check) could not run on example inputs "
            f"taken from the data loader ({type(e).__name__}: {e}). Fix: pass example_inputs=(x,) to "
            "make_private.",
            stacklevel=3,
        )
        return None, None
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
        return None, None
    if not report.ok:
        if not allow_unsafe_model:
            report.raise_if_errors()
        warnings.warn(
            "PrivacyEngine: allow_unsafe_model=True: training a model with ops that break DP; the privacy "
            f"guarantee does not hold:\n{report}",
            stacklevel=3,
        )
    return report, (inputs if not kwargs else dict(kwargs) if not inputs else None)


def check_ghost_criterion(criterion: Any, loss_reduction: str) -> Any:
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
