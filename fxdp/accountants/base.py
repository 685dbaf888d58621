"""Accountant interface and argument validation shared by all accountants.

The interface mirrors ``opacus.accountants.IAccountant`` so that code written
against Opacus keeps working after swapping the import.  Accountants only hold
the history of ``(noise_multiplier, sample_rate, num_steps)`` triples; all of
the mathematics lives in pure functions in the sibling modules.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from .validation import (  # noqa: F401 - re-exported for the accountant modules
    as_float,
    check_delta,
    check_noise_multiplier,
    check_positive,
    check_sample_rate,
    check_steps,
)

HistoryEntry = tuple[float, float, int]


class LazyModule:
    """A module imported on first attribute access: scipy's submodules take about a
    second to import, which every ``fxdp`` command line call would otherwise pay."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = __import__(self._name, fromlist=["_"])  # the submodule itself
        return getattr(self._module, attr)


_as_float = as_float  # the validators live in fxdp.validation (imported above for the accountants)


def normalize_history(history: Sequence[Sequence[Any]]) -> tuple[HistoryEntry, ...]:
    """Validates a history and returns it as a tuple of ``(sigma, q, steps)``."""
    out = []
    for i, entry in enumerate(history):
        try:
            sigma, q, steps = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"history[{i}] must be a (noise_multiplier, sample_rate, num_steps) "
                f"triple, got {entry!r}"
            ) from None
        out.append(
            (
                check_noise_multiplier(sigma),
                check_sample_rate(q),
                check_steps(steps, "num_steps"),
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------
# Interface.
# ---------------------------------------------------------------------------


class IAccountant(abc.ABC):
    """Tracks the privacy spent by a sequence of Poisson-subsampled Gaussian steps.

    ``history`` is a list of ``(noise_multiplier, sample_rate, num_steps)``
    tuples; consecutive steps with equal parameters are run-length compressed
    into one entry, exactly as Opacus does.
    """

    def __init__(self) -> None:
        self.history: list[HistoryEntry] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Records one step of the subsampled Gaussian mechanism."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        if self.history:
            last_sigma, last_q, count = self.history[-1]
            if last_sigma == sigma and last_q == q:
                self.history[-1] = (last_sigma, last_q, count + 1)
                return
        self.history.append((sigma, q, 1))

    @abc.abstractmethod
    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """Returns the epsilon spent so far at the given ``delta``."""

    def __len__(self) -> int:
        """Number of history entries (runs of steps with the same sigma and q), as in Opacus."""
        return len(self.history)

    @property
    def steps(self) -> int:
        """Number of steps recorded so far."""
        return int(sum(n for _, _, n in self.history))

    def get_optimizer_hook_fn(self, sample_rate: float) -> Callable[[Any], None]:
        """A step hook for a DP optimizer (``optimizer.attach_step_hook``): records each
        step with the optimizer's noise multiplier, at ``sample_rate`` times the number of
        accumulated Poisson draws (Opacus' convention)."""

        def hook_fn(optim: Any) -> None:
            self.step(noise_multiplier=optim.noise_multiplier,
                      sample_rate=sample_rate * getattr(optim, "accumulated_iterations", 1))

        return hook_fn

    @classmethod
    @abc.abstractmethod
    def mechanism(cls) -> str:
        """Short name of the accounting method, e.g. ``"rdp"``."""

    def _validated_history(self) -> tuple[HistoryEntry, ...]:
        # ``history`` is a public attribute (Opacus code assigns it directly),
        # so validate it each time it is used.
        return normalize_history(self.history)

    def state_dict(self, destination: dict[str, Any] | None = None) -> dict[str, Any]:
        """Returns the state as plain Python containers.

        The result only contains ``str``, ``float``, ``int``, ``list`` and ``tuple``
        (Opacus' format: one ``(sigma, q, steps)`` tuple per entry), so it can be
        read back with ``torch.load(..., weights_only=True)``.
        """
        if destination is None:
            destination = {}
        destination["history"] = [
            (float(s), float(q), int(n)) for s, q, n in self.history
        ]
        destination["mechanism"] = self.mechanism()
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the state saved by :meth:`state_dict` (Opacus format accepted)."""
        if not state_dict:
            raise ValueError(
                "state_dict is None or empty; expected a mapping with keys "
                "'history' and 'mechanism' as produced by state_dict()"
            )
        for key in ("history", "mechanism"):
            if key not in state_dict:
                raise ValueError(
                    f"state_dict has no key {key!r}; expected keys 'history' and "
                    "'mechanism' as produced by state_dict()"
                )
        if state_dict["mechanism"] != self.mechanism():
            raise ValueError(
                f"state_dict was saved by a {state_dict['mechanism']!r} accountant and "
                f"cannot be loaded into a {self.mechanism()!r} accountant; use "
                f"create_accountant({state_dict['mechanism']!r}) instead"
            )
        self.history = list(normalize_history(state_dict["history"]))
