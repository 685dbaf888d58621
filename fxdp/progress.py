"""A training loop's progress and privacy, in one line of code.

    log = fxdp.PrivacyLog(engine, optimizer, delta=1e-5)
    for epoch in range(epochs):
        for x, y in log(train_loader):      # a tqdm bar showing ε when tqdm is installed
            ...                             # the usual zero_grad / backward / step
    log.history                             # one dict per epoch
    log.plot("privacy.png")                 # ε and the clipped fraction per epoch (matplotlib)

At the end of each epoch it prints ``epoch 3 | step 120 | ε = 1.52 (δ = 1e-05) |
σ = 1.10, C = 1 | clipped 64% | noise std 0.0043 on the mean gradient``. The clipped
fraction is the share of per-sample gradients whose norm exceeded C (averaged over
the epoch's steps): a statistic of the private data, for tuning C, not for publishing.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

__all__ = ["PrivacyLog"]


class PrivacyLog:
    """Progress and privacy of a DP training loop (see the module docstring).

    Args:
        engine: the :class:`fxdp.PrivacyEngine` that made the optimizer private.
        optimizer: the ``DPOptimizer`` ``make_private`` returned.
        delta: δ at which ε is reported.
        progress_bar: ``"auto"`` (tqdm when installed), ``True`` or ``False``.
        print_fn: where the per-epoch line goes (``None``: nowhere).
    """

    def __init__(self, engine: Any, optimizer: Any, *, delta: float, progress_bar: Any = "auto",
                 print_fn: Optional[Callable[[str], Any]] = print) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not hasattr(optimizer, "noise_multiplier") or not hasattr(optimizer, "clip_stats"):
            raise TypeError("PrivacyLog needs the DPOptimizer returned by make_private")
        self.engine, self.optimizer, self.delta = engine, optimizer, float(delta)
        self.progress_bar, self.print_fn = progress_bar, print_fn
        self.history: List[Dict[str, float]] = []
        self._clipped: List[float] = []

    # -- the loop --------------------------------------------------------------------
    def __call__(self, loader: Iterable[Any]) -> Iterator[Any]:
        bar = self._bar(loader)
        steps = self.engine.steps
        self._clipped = []
        for batch in bar if bar is not None else loader:
            yield batch
            if self.engine.steps != steps:  # the user stepped on this batch
                steps = self.engine.steps
                self.record_step()
                if bar is not None:
                    bar.set_postfix(eps=f"{self.epsilon():.2f}", refresh=False)
        if bar is not None:
            bar.close()
        self.end_epoch()

    def _bar(self, loader: Iterable[Any]) -> Any:
        if self.progress_bar is False:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if self.progress_bar is True:
                raise ImportError("progress_bar=True needs tqdm: pip install tqdm (or fxdp[examples])") from None
            return None
        return tqdm(loader, desc=f"epoch {len(self.history) + 1}", leave=False)

    # -- what is logged --------------------------------------------------------------
    def record_step(self) -> None:
        """Record the last step's clipped fraction (done by the loop; call it after
        ``optimizer.step()`` in loops that do not iterate through ``log(loader)``)."""
        stats = self.optimizer.clip_stats
        if stats is not None:
            self._clipped.append(stats.fraction_clipped)

    def epsilon(self) -> float:
        return float(self.engine.get_epsilon(self.delta))

    def end_epoch(self) -> Dict[str, float]:
        """Record (and print) one epoch; called by the loop, or by hand without it."""
        opt = self.optimizer
        sigma = float(opt.noise_multiplier)
        C = opt.max_grad_norm if isinstance(opt.max_grad_norm, (int, float)) else float(
            sum(c * c for c in opt.max_grad_norm) ** 0.5)
        expected = float(getattr(opt, "expected_batch_size", 0) or 0)
        row = {
            "epoch": len(self.history) + 1,
            "step": int(self.engine.steps),
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": sigma,
            "max_grad_norm": float(C),
            "clip_fraction": sum(self._clipped) / len(self._clipped) if self._clipped else float("nan"),
            "noise_std_mean_grad": sigma * C / expected if expected else float("nan"),
        }
        self.history.append(row)
        self._clipped = []
        if self.print_fn is not None:
            self.print_fn(self.line(row))
        return row

    @staticmethod
    def line(row: Dict[str, float]) -> str:
        clipped = "" if row["clip_fraction"] != row["clip_fraction"] else f" | clipped {row['clip_fraction']:.0%}"
        noise = "" if row["noise_std_mean_grad"] != row["noise_std_mean_grad"] else \
            f" | noise std {row['noise_std_mean_grad']:.2g} on the mean gradient"
        return (f"epoch {row['epoch']} | step {row['step']} | ε = {row['epsilon']:.2f} (δ = {row['delta']:g}) | "
                f"σ = {row['noise_multiplier']:.2f}, C = {row['max_grad_norm']:g}{clipped}{noise}")

    def plot(self, path: Optional[str] = None) -> Any:
        """ε and the clipped fraction per epoch (matplotlib, ``pip install fxdp[examples]``);
        saved to ``path`` if given. Returns the figure."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("PrivacyLog.plot needs matplotlib: pip install matplotlib (or fxdp[examples])") from None
        epochs = [r["epoch"] for r in self.history]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(epochs, [r["epsilon"] for r in self.history], marker="o", color="C0")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"ε (δ = {self.delta:g})", color="C0")
        ax2 = ax.twinx()
        ax2.plot(epochs, [r["clip_fraction"] for r in self.history], marker="s", color="C1")
        ax2.set_ylabel("fraction of samples clipped", color="C1")
        ax2.set_ylim(0, 1.05)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
