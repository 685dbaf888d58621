"""Opacus' path ``opacus.grad_sample``: ``GradSampleModule`` and ``register_grad_sampler``.

``GradSampleModule(model)`` is ``fxdp.privatize(model)`` materializing ``p.grad_sample``
(a ``DPModule``; ``isinstance(dp, GradSampleModule)`` holds for every DPModule).
``register_grad_sampler`` takes an Opacus grad sampler ``f(layer, activations,
backprops) -> {parameter: [B, *shape]}`` for a module class and serves that class with
it: the module becomes a leaf of the graph whose capture op calls ``f``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Sequence, Union

from torch import Tensor, nn

from ..module import DPModule
from ..privatize import privatize
from ..rules import ModuleCall, PerSampleRule, register_module, register_rule

__all__ = ["GradSampleModule", "register_grad_sampler"]


class _GradSampleModuleMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, DPModule)


class GradSampleModule(metaclass=_GradSampleModuleMeta):
    """``GradSampleModule(m, batch_first=True, loss_reduction="mean")``: Opacus'
    constructor, returning ``fxdp.privatize(m, ...)`` (per-sample gradients in
    ``p.grad_sample``; ``dp._module`` is the trained model, as in Opacus)."""

    def __new__(cls, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                strict: bool = True, force_functorch: bool = False) -> DPModule:  # type: ignore[misc]
        return privatize(m, batch_first=batch_first, loss_reduction=loss_reduction)


GradSampler = Callable[[nn.Module, List[Tensor], Tensor], Dict[nn.Parameter, Tensor]]


class _OpacusSamplerRule(PerSampleRule):
    """A rule from an Opacus grad sampler: ``args["module"]`` is the layer; the
    sampler gets its (batch-first) input and output gradient."""

    name = "opacus grad sampler"
    param_args = ()
    sampler: GradSampler

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        return dict(kwargs)

    def forward(self, op: Callable, args: Mapping[str, Any]) -> Any:
        return args["module"].forward(args["input"])

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        module = args["module"]
        got = type(self).sampler(module, [args["input"]], grad_output)
        by_id = {id(p): g for p, g in got.items()}
        return {n: by_id[id(getattr(module, n))] for n in needs}

    def describe(self) -> str:
        return f"opacus grad sampler ({type(self).sampler.__name__})"


def register_grad_sampler(target_class_or_classes: Union[type, Sequence[type]]) -> Callable[[GradSampler], GradSampler]:
    """Opacus' decorator: serve these module classes (their own parameters) with
    ``f(layer, activations, backprops) -> {parameter: per-sample gradient}``. Test it
    as every rule is tested: against each sample's gradient alone."""
    targets = list(target_class_or_classes) if isinstance(target_class_or_classes, Sequence) \
        else [target_class_or_classes]

    def deco(f: GradSampler) -> GradSampler:
        for cls in targets:
            def op(*a: Any, **k: Any) -> Any:  # pragma: no cover - an identity key for the registry
                raise RuntimeError("called through its rule only")

            op.__name__ = f"{cls.__name__}.forward"
            register_rule(op)(type(f"OpacusSampler_{cls.__name__}", (_OpacusSamplerRule,),
                                   {"sampler": staticmethod(f)}))

            def adapter(m: nn.Module, op: Callable = op) -> ModuleCall:
                params = {n: n for n, p in m.named_parameters(recurse=False)}
                return ModuleCall(op, inputs=("input",), params=params, kwargs={"module": m})

            register_module(cls)(adapter)
        return f

    return deco


# -- the rest of Opacus' ``opacus.grad_sample`` names --------------------------------------
# Opacus has one GradSampleModule class per way of computing per-sample gradients (hooks,
# expanded weights, no-op, ghost clipping); fxdp has one: the compiled graph. Each name
# builds it, materializing ``p.grad_sample`` (book-keeping needs the optimizer's clip bound,
# so make_private chooses it).
GradSampleModuleFastGradientClipping = GradSampleModule
GradSampleModuleExpandedWeights = GradSampleModule
GradSampleModuleNoOp = GradSampleModule
AbstractGradSampleModule = GradSampleModule


def get_gsm_class(grad_sample_mode: str) -> type:
    """Opacus' factory lookup: every mode is served by :class:`GradSampleModule`."""
    if grad_sample_mode in ("ghost_fsdp", "ghost_tp"):
        raise NotImplementedError(f"grad_sample_mode={grad_sample_mode!r} (FSDP / tensor parallel) is not implemented")
    return GradSampleModule


def wrap_model(model: nn.Module, grad_sample_mode: str = "hooks", batch_first: bool = True,
               loss_reduction: str = "mean", **kwargs: Any) -> DPModule:
    """Opacus' ``wrap_model``: ``privatize(model)`` (``grad_sample`` materialized)."""
    get_gsm_class(grad_sample_mode)
    return privatize(model, batch_first=batch_first, loss_reduction=loss_reduction)


def register_norm_sampler(target_class_or_classes: Union[type, Sequence[type]]) -> Callable[[Any], Any]:
    """Opacus' norm samplers (ghost clipping of a custom layer) are not used by fxdp: its
    book-keeping derives norms and clipped sums from the layer's per-sample rule."""
    def deco(f: Any) -> Any:
        raise NotImplementedError(
            "fxdp does not take norm samplers: book-keeping computes a layer's norms from its per-sample rule. "
            "Fix: register the layer's grad sampler with fxdp.grad_sample.register_grad_sampler (or an fxdp "
            "PerSampleRule, docs/custom_rules.md); ghost norms then come with it"
        )
    return deco


def create_or_accumulate_grad_sample(*, param: Tensor, grad_sample: Tensor, max_batch_len: int = 0) -> None:
    """Opacus' helper for custom grad samplers: set ``param.grad_sample`` or add to it."""
    if not param.requires_grad:
        return
    if getattr(param, "grad_sample", None) is not None:
        param.grad_sample[: grad_sample.shape[0]] += grad_sample
    else:
        param.grad_sample = grad_sample


__all__ += ["GradSampleModuleFastGradientClipping", "GradSampleModuleExpandedWeights", "GradSampleModuleNoOp",
            "AbstractGradSampleModule", "get_gsm_class", "wrap_model", "register_norm_sampler",
            "create_or_accumulate_grad_sample"]
