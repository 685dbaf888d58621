"""Opacus' public import paths resolve under fxdp with Opacus' semantics."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn


def test_every_opacus_path_resolves():
    from fxdp import GradSampleModule, PrivacyEngine  # noqa: F401
    from fxdp.accountants import GaussianAccountant, RDPAccountant  # noqa: F401
    from fxdp.accountants.utils import get_noise_multiplier  # noqa: F401
    from fxdp.data_loader import DPDataLoader  # noqa: F401
    from fxdp.distributed import DifferentiallyPrivateDistributedDataParallel  # noqa: F401
    from fxdp.grad_sample import GradSampleModule as G2, register_grad_sampler  # noqa: F401
    from fxdp.optimizers import DPOptimizer, DPPerLayerOptimizer, get_optimizer_class  # noqa: F401
    from fxdp.utils.batch_memory_manager import BatchMemoryManager  # noqa: F401
    from fxdp.utils.module_utils import are_state_dict_equal, clone_module, trainable_parameters  # noqa: F401
    from fxdp.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: F401
    from fxdp.validators import ModuleValidator  # noqa: F401

    assert G2 is GradSampleModule and GaussianAccountant.mechanism() == "gdp"


def test_optimizer_hook_fn_accounts_like_opacus():
    from fxdp.accountants import RDPAccountant

    ours = RDPAccountant()
    hook = ours.get_optimizer_hook_fn(sample_rate=0.01)
    hook(SimpleNamespace(noise_multiplier=1.3, accumulated_iterations=1))  # what a DP optimizer's step passes
    hook(SimpleNamespace(noise_multiplier=1.3, accumulated_iterations=1))
    hook(SimpleNamespace(noise_multiplier=1.3, accumulated_iterations=2))  # two Poisson draws merged
    assert ours.history == [(1.3, 0.01, 2), (1.3, 0.02, 1)]
    opacus = pytest.importorskip("opacus.accountants")
    theirs = opacus.RDPAccountant()
    theirs_hook = theirs.get_optimizer_hook_fn(sample_rate=0.01)
    for k in (1, 1, 2):
        theirs_hook(SimpleNamespace(noise_multiplier=1.3, accumulated_iterations=k))
    assert theirs.history == ours.history
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-6)


def test_uniform_sampler_and_module_utils():
    from fxdp.utils.module_utils import are_state_dict_equal, clone_module, trainable_modules
    from fxdp.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=100, sample_rate=0.1,
                                            generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == 10 and all(all(0 <= i < 100 for i in b) for b in batches)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1).requires_grad_(False))
    assert [n for n, _ in trainable_modules(model)] == ["0"]
    clone = clone_module(model)
    assert clone[0].weight is not model[0].weight and are_state_dict_equal(clone.state_dict(), model.state_dict())


#: Opacus names fxdp deliberately does not provide (docs/migrating_from_opacus.md, "Not provided")
NOT_PROVIDED = {
    "opacus.accountants.analysis.prv", "opacus.utils.adaptive_clipping",
    "opacus.grad_sample.AbstractGradSampleHooks", "opacus.grad_sample.GradSampleHooks",
    "opacus.grad_sample.GradSampleHooksFastGradientClipping", "opacus.grad_sample.GradSampleHooksNoOp",
    "opacus.grad_sample.GradSampleHooksFastGradientClippingFSDP",
    "opacus.grad_sample.GradSampleModuleFastGradientClippingFSDP",
    "opacus.grad_sample.GradSampleHooksFastGradientClippingTP", "opacus.grad_sample.GradSampleModuleFastGradientClippingTP",
    "opacus.grad_sample.prepare_module", "opacus.layers.RenameParamsMixin", "opacus.layers.SequenceBias",
    "opacus.optimizers.DistributedDPOptimizerFastGradientlipping", "opacus.optimizers.FSDPOptimizerFastGradientClipping",
}


def test_every_public_opacus_name_resolves_under_fxdp_or_is_listed():
    """Walk the installed opacus package: every module with an __all__ has an fxdp module
    at the same path holding the same names, except the documented NOT_PROVIDED."""
    import importlib
    import pkgutil
    import warnings

    opacus = pytest.importorskip("opacus")
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in pkgutil.walk_packages(opacus.__path__, "opacus."):
            if ".tests" in info.name:
                continue
            try:
                om = importlib.import_module(info.name)
            except Exception:  # optional dependencies of opacus itself
                continue
            names = getattr(om, "__all__", None)
            if names is None:
                continue
            try:
                fm = importlib.import_module("fxdp" + info.name[len("opacus"):])
            except ImportError:
                missing.append(info.name)
                continue
            missing += [f"{info.name}.{n}" for n in names if not hasattr(fm, n)]
    assert set(missing) <= NOT_PROVIDED, sorted(set(missing) - NOT_PROVIDED)
