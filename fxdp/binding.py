"""What one ``make_private`` call ties together (model, optimizer, loader, q) and the
hooks it puts on the optimizer: the accountant's step, the refusal of gradient
accumulation under Poisson sampling, the privacy-budget guard."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader

from .data.loader import find_poisson_sampler
from .module import DPModule
from .optim import DPOptimizer

if TYPE_CHECKING:
    from .engine import PrivacyEngine

__all__ = ["Binding"]


def _accumulated_backward(module: nn.Module) -> bool:
    """Whether some ``p.grad_sample`` holds more than one backward pass (a list with
    one entry per pass, Opacus' convention for gradient accumulation), or, in
    book-keeping mode, the recorder formed clipped sums for several passes."""
    bookkeeping = getattr(getattr(module, "recorder", None), "bookkeeping", None)
    if bookkeeping is not None:
        return len(bookkeeping.pending) > 1
    return any(isinstance(getattr(p, "grad_sample", None), list) and len(p.grad_sample) > 1 for p in module.parameters())


class Binding:
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
        sampler = find_poisson_sampler(data_loader)
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

    def cross_check_guard(self, optimizer: DPOptimizer) -> None:
        """The first-step cross-check (it compares ``p.grad_sample``), run with the model
        materializing per-sample gradients whatever its mode."""
        with self.module.recorder.materializing():
            self.cross_check.run()

    def budget_guard(self, optimizer: DPOptimizer) -> None:
        self.engine._check_budget_before_step(optimizer.noise_multiplier, self.step_sample_rate(optimizer))
