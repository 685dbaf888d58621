"""The PRV accountant class: Opacus' ``PRVAccountant`` API over :func:`prv_epsilon_bounds`."""

from __future__ import annotations

from typing import Any

from ..base import IAccountant
from .bounds import prv_epsilon_bounds


class PRVAccountant(IAccountant):
    """Numerical (FFT) accountant for DP-SGD with upper and lower bounds.

    Drop-in replacement for ``opacus.accountants.PRVAccountant``;
    :meth:`get_epsilon` returns the *upper* bound, so it is safe to report.
    The bounds are rigorous except for the float64 round-off of the FFT, which
    is estimated conservatively and charged to delta.  See the docstring of
    :mod:`fxdp.accountants.prv` for the method.
    """

    @classmethod
    def mechanism(cls) -> str:
        return "prv"

    def get_epsilon_bounds(
        self,
        delta: float,
        *,
        eps_error: float | None = None,
        delta_error: float | None = None,
    ) -> tuple[float, float, float]:
        """Returns ``(lower, estimate, upper)`` with lower <= true eps <= upper."""
        return tuple(prv_epsilon_bounds(self.history, delta, eps_error, delta_error))  # type: ignore[return-value]

    def get_epsilon(
        self,
        delta: float,
        *,
        eps_error: float | None = None,
        delta_error: float | None = None,
        **kwargs: Any,
    ) -> float:
        """An upper bound on the epsilon spent so far at ``delta``.

        Args:
            delta: target delta in (0, 1).
            eps_error: target discretisation bias (default: max(5e-4, 2e-5 eps)).
            delta_error: delta slack for truncation (default ``delta / 1000``).
        """
        return prv_epsilon_bounds(self.history, delta, eps_error, delta_error).upper
