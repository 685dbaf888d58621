"""PyTorch Lightning integration: DP-SGD (Abadi et al. 2016) for a ``LightningModule``.

::

    from fxdp.lightning import DPCallback

    dp = DPCallback(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=3.0)
    trainer = lightning.Trainer(max_epochs=10, callbacks=[dp])
    trainer.fit(lit_module, train_loader)      # the LightningModule is left unchanged
    dp.engine.get_epsilon(1e-5)

At fit start (after ``configure_optimizers``, before the first training batch) the
callback hands the LightningModule's model, its optimizer and the train loader to
:meth:`fxdp.PrivacyEngine.make_private`, then puts the results in their place: the
``DPModule`` replaces the model attribute (it shares the model's Parameters and has its
``state_dict`` keys, so checkpoints keep their keys), the ``DPOptimizer`` replaces the
trainer's optimizer (Lightning's zero_grad, backward-in-closure and ``step(closure)`` all
go through it), and the Poisson-sampled loader replaces the train loader. At fit end the
original model is put back (it holds the trained weights: the Parameters are shared).

Refused, because each would break the DP guarantee or the accounting: gradient
accumulation (``accumulate_grad_batches > 1``), Lightning's gradient clipping (DP clips
per sample, with ``max_grad_norm``), mixed precision (a loss scaler would scale the
per-sample gradients before clipping), several optimizers, and multi-process strategies.

Needs ``lightning`` (``pip install lightning``), an optional dependency of fxdp.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fxdp.lightning needs PyTorch Lightning, which is not installed. Fix: pip install lightning"
    ) from e

from .engine import PrivacyEngine

__all__ = ["DPCallback", "DPLightningDataModule"]


class DPLightningDataModule(pl.LightningDataModule):
    """Opacus' ``DPLightningDataModule(datamodule, generator=None)``: the wrapped data
    module with its training loader Poisson-sampled (:class:`fxdp.data.DPDataLoader`);
    validation, test and predict loaders unchanged."""

    def __init__(self, datamodule: "pl.LightningDataModule", generator: Any = None) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.generator = generator

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.datamodule.setup(stage)

    def train_dataloader(self) -> Any:
        from .data import DPDataLoader

        return DPDataLoader.from_data_loader(self.datamodule.train_dataloader(), generator=self.generator)

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)


class DPCallback(pl.Callback):
    """Make a LightningModule's training differentially private with fxdp.

    Args:
        noise_multiplier: sigma, noise std over the clip bound.
        max_grad_norm: per-sample clip bound C.
        delta: the delta at which epsilon is logged (and the budget is enforced).
        target_epsilon: optional budget: training stops (``trainer.should_stop``) after
            the last step that keeps epsilon <= target_epsilon; should Lightning keep
            going (``min_epochs``/``min_steps``), the next step raises
            :class:`fxdp.PrivacyBudgetExceeded` and is not applied.
        module: name of the LightningModule attribute holding the model to privatize.
            Default: its only child module with trainable parameters.
        accountant: ``"prv"``, ``"rdp"`` or ``"gdp"`` (see :class:`fxdp.PrivacyEngine`).
        engine: an existing engine (its accountant keeps counting); overrides ``accountant``.
        log_name: the metric name epsilon is logged under, once per training epoch.
        **make_private_kwargs: passed on to ``make_private`` (e.g. ``poisson_sampling``,
            ``clipping``, ``noise_generator``, ``loss_reduction``, ``rewrite_options``).

    Attributes:
        engine: the :class:`fxdp.PrivacyEngine` doing the accounting.
        history: ``(epoch, steps, epsilon)`` after each training epoch.
        dp_module, dp_optimizer, dp_data_loader: what ``make_private`` returned (last fit).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        target_epsilon: Optional[float] = None,
        module: Optional[str] = None,
        accountant: str = "prv",
        engine: Optional[PrivacyEngine] = None,
        log_name: str = "epsilon",
        **make_private_kwargs: Any,
    ) -> None:
        super().__init__()
        for key in ("module", "optimizer", "data_loader", "target_delta"):
            if key in make_private_kwargs:
                raise TypeError(f"DPCallback sets make_private's {key!r} itself; do not pass it")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.module_name = module
        self.engine = engine if engine is not None else PrivacyEngine(accountant=accountant)
        self.log_name = log_name
        self.make_private_kwargs: Dict[str, Any] = make_private_kwargs
        self.history: List[Tuple[int, int, float]] = []
        self.dp_module: Any = None
        self.dp_optimizer: Any = None
        self.dp_data_loader: Any = None
        self._original: Optional[Tuple[str, nn.Module]] = None

    # -- checks ------------------------------------------------------------------------

    @staticmethod
    def _check_trainer(trainer: "pl.Trainer") -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"DPCallback: accumulate_grad_batches={trainer.accumulate_grad_batches} is refused: several "
                "Poisson batches summed into one step are not Poisson-sampled at the accounted rate. "
                "Fix: use Trainer(accumulate_grad_batches=1) and a larger batch size, or "
                "fxdp.BatchMemoryManager to split a large logical batch into physical ones"
            )
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                f"DPCallback: gradient_clip_val={trainer.gradient_clip_val} is refused: Lightning would clip "
                "the summed gradient, while DP-SGD clips each sample's gradient. Fix: drop gradient_clip_val "
                "and set DPCallback(max_grad_norm=...)"
            )
        if "mixed" in str(trainer.precision):
            raise ValueError(
                f"DPCallback: precision={trainer.precision!r} is refused: mixed precision scales or casts "
                "the per-sample gradients before they are clipped, which the clip bound does not account "
                "for. Fix: use Trainer(precision='32-true') or '64-true'"
            )
        if trainer.world_size > 1:
            raise NotImplementedError(
                f"DPCallback: world_size={trainer.world_size}: multi-process Lightning strategies are not "
                "supported (DP needs sharded Poisson sampling and noise added once). Fix: train on one "
                "device, or use fxdp's own data-parallel training (docs/distributed.md)"
            )

    def _find_module(self, pl_module: "pl.LightningModule") -> str:
        if self.module_name is not None:
            child = getattr(pl_module, self.module_name, None)
            if not isinstance(child, nn.Module):
                raise AttributeError(
                    f"DPCallback(module={self.module_name!r}): the LightningModule has no nn.Module attribute "
                    f"{self.module_name!r}. Fix: pass the name of the attribute holding the model"
                )
            return self.module_name
        names = [n for n, c in pl_module.named_children() if any(p.requires_grad for p in c.parameters())]
        if len(names) != 1:
            raise ValueError(
                f"DPCallback: cannot tell which child of the LightningModule is the model (children with "
                f"trainable parameters: {names}). Fix: pass DPCallback(module='<attribute name>')"
            )
        return names[0]

    # -- hooks -------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._check_trainer(trainer)  # before any work: fail fast

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Here configure_optimizers has run and the train loader has not been requested yet.
        self._check_trainer(trainer)
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DPCallback: configure_optimizers returned {len(trainer.optimizers)} optimizers; DP-SGD "
                "accounts one optimizer over one model. Fix: return a single optimizer"
            )
        name = self._find_module(pl_module)
        model = getattr(pl_module, name)
        # the same loader Lightning would use: the fit() argument, the datamodule's or the module's hook
        source = trainer.fit_loop._data_source
        loader = source.dataloader()
        if self.target_epsilon is not None:
            self.make_private_kwargs.setdefault("target_epsilon", self.target_epsilon)
        dp_module, dp_optimizer, dp_loader = self.engine.make_private(
            module=model,
            optimizer=trainer.optimizers[0],
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            target_delta=self.delta if self.target_epsilon is not None else None,
            **self.make_private_kwargs,
        )
        self._original = (name, model)
        setattr(pl_module, name, dp_module)  # same Parameters: the optimizer's references stay valid
        trainer.optimizers = [dp_optimizer]  # LR schedulers share param_groups with it
        source.instance = dp_loader  # fit_loop.setup_data() will request this loader
        self.dp_module, self.dp_optimizer, self.dp_data_loader = dp_module, dp_optimizer, dp_loader

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_trainer(trainer)  # a GradientAccumulationScheduler may change it per epoch

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Stop gracefully after the last step within budget (the engine's guard would raise
        # before the next one). _steps_allowed is the guard's own, cached, predicate.
        if self.target_epsilon is None or self.engine.privacy_budget is None or self.dp_optimizer is None:
            return
        q = self.engine._bindings[-1].step_sample_rate(self.dp_optimizer)
        if self.engine._steps_allowed(self.dp_optimizer.noise_multiplier, q) < 1:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        steps = self.engine.steps
        epsilon = self.engine.get_epsilon(self.delta) if steps else 0.0
        self.history.append((trainer.current_epoch, steps, epsilon))
        pl_module.log(self.log_name, epsilon, prog_bar=True, on_step=False, on_epoch=True)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Put the plain model back (it holds the trained weights): the LightningModule is
        # then usable, picklable and exportable as before fit.
        if stage == "fit" and self._original is not None:
            name, model = self._original
            setattr(pl_module, name, model)
            self._original = None
