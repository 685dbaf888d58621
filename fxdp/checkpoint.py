"""Checkpoints of a DP training run that restore it exactly: Opacus' keys (model,
optimizer, accountant, schedulers) plus ``"fxdp"``: the engine configuration, the noise
generator, the Poisson sampler's position and torch's RNG. Tensors and plain containers
only, read back with ``torch.load(weights_only=True)``. ``PrivacyEngine.save_checkpoint``
and ``load_checkpoint`` are these functions (the engine is their first argument)."""
from __future__ import annotations

import os
import warnings
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Dict, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data.loader import find_poisson_sampler
from .optim import DPOptimizer

if TYPE_CHECKING:
    from .binding import Binding
    from .engine import PrivacyEngine

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = 1
PathLike = Union[str, os.PathLike, BinaryIO, IO[bytes]]


def save_checkpoint(
    engine: PrivacyEngine,
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
    ckpt["privacy_accountant_state_dict"] = engine.accountant.state_dict()
    if optimizer is not None:
        ckpt["optimizer_state_dict"] = optimizer.state_dict()
    if noise_scheduler is not None:
        ckpt["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
    if grad_clip_scheduler is not None:
        ckpt["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
    binding = engine._binding(optimizer=optimizer, module=module if optimizer is None else None)
    ckpt["fxdp"] = _fxdp_state(engine, optimizer, binding, data_loader)
    torch.save(ckpt, path, **(torch_save_kwargs or {}))

def _fxdp_state(engine: PrivacyEngine, optimizer: Any, binding: Optional[Binding],
                data_loader: Optional[DataLoader]) -> Dict[str, Any]:
    state: Dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "accountant": engine.accountant_name,
        "secure_mode": engine.secure_mode,
        "steps": engine.steps,
        "privacy_budget": list(engine.privacy_budget) if engine.privacy_budget else None,
        "caveats": list(engine.caveats),
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
    engine: PrivacyEngine,
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
    if fx.get("accountant", engine.accountant_name) != engine.accountant_name:
        raise ValueError(
            f"the checkpoint was saved with accountant={fx['accountant']!r} but this engine uses "
            f"accountant={engine.accountant_name!r}. Fix: PrivacyEngine(accountant={fx['accountant']!r})"
        )
    module.load_state_dict(_unwrap_opacus_keys(ckpt["module_state_dict"], module),
                           **(module_load_dict_kwargs or {}))
    engine.accountant.load_state_dict(ckpt["privacy_accountant_state_dict"])
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
    binding = engine._binding(optimizer=optimizer, module=module if optimizer is None else None)
    if isinstance(optimizer, DPOptimizer) and fx.get("optimizer"):
        _restore_optimizer(optimizer, fx["optimizer"])
    if binding is not None and fx.get("sample_rate") is not None and fx["sample_rate"] != binding.sample_rate:
        engine.set_sample_rate(fx["sample_rate"], optimizer=binding.optimizer)
    loader = data_loader if data_loader is not None else (binding.data_loader if binding else None)
    if fx.get("data_loader_state") is not None and loader is not None:
        _load_loader_state(loader, fx["data_loader_state"])
    if noise_scheduler is not None and ckpt.get("noise_scheduler_state_dict"):
        noise_scheduler.load_state_dict(ckpt["noise_scheduler_state_dict"])
    if grad_clip_scheduler is not None and ckpt.get("grad_clip_scheduler_state_dict"):
        grad_clip_scheduler.load_state_dict(ckpt["grad_clip_scheduler_state_dict"])
    if "privacy_budget" in fx:
        budget = fx["privacy_budget"]
        engine.set_privacy_budget(*(budget if budget else (None, None)))
    engine.caveats = list(dict.fromkeys(engine.caveats + list(fx.get("caveats", []))))
    if restore_rng_state and fx.get("torch_rng_state") is not None:
        torch.set_rng_state(fx["torch_rng_state"])
    return ckpt


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
    sampler = find_poisson_sampler(loader)
    if sampler is not None and hasattr(sampler, "state_dict"):
        return {"poisson_sampler": sampler.state_dict()}
    gen = getattr(getattr(loader, "sampler", None), "generator", None) or getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        return {"generator_state": gen.get_state()}
    return None


def _load_loader_state(loader: DataLoader, state: Dict[str, Any]) -> None:
    sampler = find_poisson_sampler(loader)
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
