"""Rewrite pass: batch-statistics normalization -> per-sample normalization.

BatchNorm (Ioffe & Szegedy 2015) normalizes each feature with the mean and
variance of the *batch*, so one sample's output depends on every other sample:
per-sample gradients are undefined and the DP guarantee of DP-SGD (Abadi et al.
2016) breaks (a sample influences the others' gradients, so clipping no longer
bounds its contribution). Its running statistics are also computed from the
private batch. Every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` (and
subclasses) in the model is therefore replaced, keeping the affine parameters
(the same ``Parameter`` objects, same ``state_dict`` keys ``<path>.weight`` /
``<path>.bias``), by a normalization over each sample alone,
``rewrite_options={"batchnorm": ...}``:

* ``"groupnorm"`` (default): ``GroupNorm(G, C)`` with ``G = gcd(batchnorm_groups,
  C)``, ``batchnorm_groups=32`` (Wu & He 2018, "Group normalization"; Opacus'
  ``ModuleValidator.fix`` uses ``GroupNorm(min(32, C), C)``);
* ``"instancenorm"``: ``G = C`` (per-channel statistics of the sample, Ulyanov et
  al. 2016);
* ``"layernorm"``: ``G = 1`` (statistics over all of the sample's channels and
  positions, Ba et al. 2016; on ``[B, C]`` input this is ``LayerNorm(C)``);
* ``"freeze"``: ``FrozenBatchNorm``, the BatchNorm's evaluation-mode affine map
  ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` with the
  running statistics as constants that are never updated. **Only valid when the
  statistics were not computed from the private data** (e.g. a model pretrained
  on public data): otherwise they leak it and the DP guarantee does not cover
  them;
* ``"off"``: no replacement: privatize refuses every BatchNorm (an error instead
  of a silent change of the model).

Degenerate groups: a group of ``n`` values normalizes to ``0`` when ``n = 1`` (the
output is the bias: the feature is silently zeroed, as with ``GroupNorm(C, C)`` on
``BatchNorm1d``'s usual ``[B, C]`` input) and to ``+-1`` when ``n = 2``. The group
size ``C / G * prod(spatial)`` depends on the input, which the module alone does
not reveal, so the replacement (``DPGroupNorm``) computes its number of groups in
the graph from the input's shape (``norm_groups``, one node, shape arithmetic
only): when a group would hold at most 2 values it normalizes over the whole
sample instead (``G = 1``: layer norm over channels and positions) and warns
once per input shape; when even the whole sample holds at most 2 values no
per-sample normalization is informative and it raises. The check runs on the
example inputs given to ``fxdp.privatize`` or on the first forward pass.

Also: ``nn.InstanceNorm*d(track_running_stats=True)`` updates running statistics
computed from the private batch; it is replaced by the same layer with
``track_running_stats=False`` (affine parameters kept; its evaluation-mode output
then uses the sample's statistics, as in training). Functional
``F.batch_norm(..., training=True)`` inside traced code cannot be replaced here:
the capture pass refuses it.

None of these rewrites is reversible: the replacement computes different
functions, and the model is trained with them (``strip()`` keeps them).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import UnsupportedModelError, UnsupportedOpError
from ..layers.batchnorm import (  # noqa: F401 - norm_groups: the graph node of DPGroupNorm
    DPGroupNorm,
    DPGroupNormAct,
    FrozenBatchNorm,
    FrozenBatchNormAct,
    norm_groups,
)
from .rewrite import Rewrite, register_rewrite, replace_submodule

__all__ = ["DPGroupNorm", "FrozenBatchNorm", "norm_groups", "rewrite_batchnorm", "MODES"]

MODES = ("groupnorm", "instancenorm", "layernorm", "freeze", "off")
DEFAULT_GROUPS = 32

def _is_norm_act(m: nn.Module) -> bool:
    """timm's norm-act layers: a BatchNorm subclass with ``drop`` and ``act`` submodules
    applied after normalizing."""
    return isinstance(getattr(m, "act", None), nn.Module) and isinstance(getattr(m, "drop", None), nn.Module)


def _keep_tail(new: nn.Module, m: nn.Module) -> nn.Module:
    new.__class__ = {DPGroupNorm: DPGroupNormAct, FrozenBatchNorm: FrozenBatchNormAct}[type(new)]
    new.drop, new.act = m.drop, m.act
    return new


# --------------------------------------------------------------------------- the pass

_REASON = ("{cls} normalizes with batch statistics: one sample's output depends on the others, so per-sample "
           "gradients (and the DP guarantee) break, and its running statistics are computed from private data")


def _options(options: Dict[str, Any]) -> Tuple[str, int]:
    mode = options.get("batchnorm", "groupnorm")
    if mode not in MODES:
        raise ValueError(f"rewrite_options['batchnorm'] must be one of {MODES}, got {mode!r}")
    groups = options.get("batchnorm_groups")
    if groups is not None:
        if mode != "groupnorm":
            raise ValueError(f"rewrite_options['batchnorm_groups'] applies to batchnorm='groupnorm', not {mode!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"rewrite_options['batchnorm_groups'] must be a positive int, got {groups!r}")
    return mode, groups if groups is not None else DEFAULT_GROUPS


def _affine(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` the same affine Parameter objects as ``old``."""
    new.affine = old.affine
    for name in ("weight", "bias"):
        new._parameters[name] = old._parameters.get(name)


def _check_initialized(m: nn.Module, path: str) -> None:
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise UnsupportedModelError(
            f"{type(m).__name__} at '{path}' is not initialized yet. Fix: run one forward pass before privatize."
        )


def _batchnorm(m: _BatchNorm, path: str, mode: str, groups: int) -> Tuple[nn.Module, Dict[str, Any]]:
    C = m.num_features
    details: Dict[str, Any] = {"num_features": C, "mode": mode, "affine": m.affine, "eps": m.eps}
    if m.track_running_stats:
        details["dropped_buffers" if mode != "freeze" else "frozen_buffers"] = [
            "running_mean", "running_var", "num_batches_tracked"]
    if mode == "freeze":
        frozen = FrozenBatchNorm(m)
        frozen.train(m.training)
        return frozen, details
    G = {"groupnorm": math.gcd(groups, C), "instancenorm": C, "layernorm": 1}[mode]
    new = DPGroupNorm(G, C, eps=m.eps, affine=False, where=path)
    _affine(new, m)
    new.train(m.training)
    details.update(num_groups=G, degenerate_fallback="groups=1 when a group holds <= 2 values",
                   degenerate_inputs=new.degenerate_inputs)
    return new, details


def _instancenorm(m: _InstanceNorm) -> nn.Module:
    base = next(c for c in type(m).__mro__ if c in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))
    new = base(m.num_features, eps=m.eps, momentum=m.momentum, affine=False, track_running_stats=False)
    _affine(new, m)
    new.train(m.training)
    return new


def _needs_rewrite(m: nn.Module) -> bool:
    if isinstance(m, _BatchNorm):
        return True
    # instance norm is per-sample; only tracked running statistics leak (a subclass with its
    # own forward is left to the capture pass, which refuses running-statistics updates)
    return isinstance(m, _InstanceNorm) and m.track_running_stats and type(m).forward is _InstanceNorm.forward


def _refuse(m: nn.Module, path: str) -> None:
    raise UnsupportedOpError(
        f"{type(m).__name__} at '{path}' normalizes with batch statistics, so one sample's output depends on "
        "the others and per-sample gradients (and the DP guarantee) break; rewrite_options={'batchnorm': 'off'} "
        "keeps it. Fix: use the default replacement (batchnorm='groupnorm', keeps the affine weights), or "
        "replace it with nn.GroupNorm/nn.LayerNorm yourself."
    )


@register_rewrite(order=10, options=("batchnorm", "batchnorm_groups"))
def rewrite_batchnorm(root: nn.Module, options: Dict[str, Any], copied: set) -> List[Rewrite]:
    """Replace batch-statistics normalizations below ``root`` (see the module docstring)."""
    mode, groups = _options(options)
    targets = [(p, m) for p, m in root.named_modules(remove_duplicate=False) if _needs_rewrite(m)]
    if mode == "off":
        # refused here rather than left to the capture pass, which sees a BatchNorm only where
        # it touches a trainable parameter outside a fallback (a frozen one mixes samples too)
        for p, m in targets:
            if isinstance(m, _BatchNorm):
                _refuse(m, p)
        return []
    if any(p == "" for p, _ in targets):
        raise UnsupportedModelError(
            f"the model itself is a {type(root).__name__}, which cannot be replaced in place. Fix: privatize a "
            "wrapper, e.g. nn.Sequential(model)."
        )
    made: Dict[int, Tuple[nn.Module, Dict[str, Any]]] = {}
    rewrites: List[Rewrite] = []
    if mode == "freeze" and any(isinstance(m, _BatchNorm) for _, m in targets):
        warnings.warn(
            "fxdp: rewrite_options={'batchnorm': 'freeze'} normalizes with the BatchNorm running statistics as "
            "constants; this is only differentially private if those statistics were NOT computed from the "
            "private training data (e.g. they come from public pretraining).",
            stacklevel=3,
        )
    for path, m in targets:
        _check_initialized(m, path)
        if isinstance(m, _InstanceNorm):
            if id(m) not in made:
                made[id(m)] = (_instancenorm(m), {"num_features": m.num_features, "affine": m.affine,
                                                  "dropped_buffers": ["running_mean", "running_var",
                                                                      "num_batches_tracked"]})
            new, details = made[id(m)]
            reason = (f"{type(m).__name__}(track_running_stats=True) updates running statistics computed from "
                      "the private batch; replaced without running statistics (per-sample statistics in "
                      "training and evaluation)")
        else:
            if id(m) not in made:
                custom = type(m).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
                if custom and not _is_norm_act(m):
                    # replacing it would silently drop whatever its forward adds: fail closed
                    raise UnsupportedModelError(
                        f"{type(m).__name__} at '{path}' is a BatchNorm with its own forward; a replacement "
                        "that normalizes per sample would drop whatever that forward adds. Fix: replace it in "
                        "your model with nn.GroupNorm (followed by what its forward does after normalizing)"
                    )
                new, details = _batchnorm(m, path, mode, groups)
                made[id(m)] = (_keep_tail(new, m) if custom else new, details)
            new, details = made[id(m)]
            reason = _REASON.format(cls=type(m).__name__)
            if not any(q.requires_grad for q in m.parameters()) or not m.training:
                reason += " (replaced although frozen or in eval mode: it mixes samples once the model trains)"
        replace_submodule(root, path, new, copied)
        rewrites.append(Rewrite(
            path=path,
            original=type(m).__name__,
            replacement=type(new).__name__,
            reason=reason,
            reversible=False,
            details=dict(details, not_reversible="the replacement computes a different function; the model is "
                                                 "trained with it"),
        ))
    return rewrites
