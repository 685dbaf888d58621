"""Argument validators shared by the accountants, the engine, the optimizers and the data samplers.

They live in the accountants package, which imports nothing from the rest of fxdp (it
can be used alone); everything else imports them from here.

Every message names the parameter, the offending value, what is allowed and the fix,
so that a typo in a training script is diagnosed at once. Each returns the value as a
plain ``float``/``int`` (numpy and one-element torch scalars are accepted; ``bool`` is not).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = [
    "as_float",
    "is_real",
    "check_nonneg",
    "check_positive",
    "check_noise_multiplier",
    "check_max_grad_norm",
    "check_sample_rate",
    "check_delta",
    "check_steps",
]


def is_real(x: Any) -> bool:
    """A real number that is not a ``bool``."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def as_float(name: str, value: Any) -> float:
    """``value`` as a float; nan and inf are left to the callers' range checks."""
    if isinstance(value, bool):  # True/False are almost surely a mistake here
        raise ValueError(f"{name} must be a real number, got the bool {value!r}")  # noqa: TRY004
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    try:  # also accepts numpy and one-element torch scalars
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}") from None


def check_nonneg(name: str, value: Any) -> float:
    v = as_float(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    return v


def check_positive(name: str, value: Any, allow_inf: bool = False) -> float:
    v = as_float(name, value)
    if not (v > 0 and (allow_inf or math.isfinite(v))):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
    return v


def check_noise_multiplier(sigma: Any) -> float:
    """``sigma``, the noise std divided by the clip bound: finite and >= 0."""
    v = as_float("noise_multiplier", sigma)
    if not math.isfinite(v) or v < 0:
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0, got noise_multiplier={sigma!r}. "
            "Fix: pass the ratio of the noise std to the clip bound, e.g. noise_multiplier=1.0 "
            "(0 disables noise and gives epsilon = inf), or use make_private_with_epsilon to "
            "derive it from a target epsilon"
        )
    return v


def check_max_grad_norm(c: Any, clipping: str = "flat") -> float | list[float]:
    """The clip bound ``C`` (finite, > 0), or one per trainable parameter for ``"per_layer"``."""
    if clipping == "per_layer":
        if is_real(c) or not isinstance(c, Sequence):
            raise ValueError(
                f"clipping='per_layer' needs max_grad_norm as a list with one bound per trainable "
                f"parameter, got max_grad_norm={c!r}. Fix: e.g. max_grad_norm=[1.0] * "
                "len([p for p in model.parameters() if p.requires_grad])"
            )
        return [check_max_grad_norm(v) for v in c]  # type: ignore[misc]
    if not is_real(c) or not math.isfinite(c) or c <= 0:
        raise ValueError(
            f"max_grad_norm must be a finite number > 0 (the per-sample clip bound C), got "
            f"max_grad_norm={c!r}. Fix: pass e.g. max_grad_norm=1.0; see clip statistics "
            "(optimizer.clip_stats) to tune it" + (
                "; a list of bounds needs clipping='per_layer'" if isinstance(c, Sequence) else ""
            )
        )
    return float(c)


def check_sample_rate(q: Any, name: str = "sample_rate") -> float:
    """The Poisson sampling rate ``q`` in (0, 1]."""
    v = as_float(name, q)
    if not 0.0 < v <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1], got {name}={q!r}. Fix: the sample rate is the "
            "expected batch size divided by the dataset size, e.g. 256 / len(dataset)"
        )
    return v


def check_delta(delta: Any, name: str = "delta") -> float:
    """``delta`` in the open interval (0, 1)."""
    v = as_float(name, delta)
    if not 0.0 < v < 1.0:
        raise ValueError(
            f"{name} must be in the open interval (0, 1), got {name}={delta!r}. Fix: use a delta "
            "well below 1/N for N training examples, e.g. 1e-5"
        )
    return v


def check_steps(steps: Any, name: str = "steps") -> int:
    """A non-negative integer number of steps."""
    if isinstance(steps, bool):  # all bad arguments are reported as ValueError
        raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")  # noqa: TRY004
    if isinstance(steps, numbers.Integral):
        n = int(steps)
    else:
        s = as_float(name, steps)
        if not math.isfinite(s) or s != int(s):
            raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")
        n = int(s)
    if n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n}")
    return n
