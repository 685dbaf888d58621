"""Errors fxdp raises. Each message names the problem, where it is, and the fix."""
from __future__ import annotations

__all__ = [
    "FxdpError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "BatchDimensionError",
    "SymbolicGraphError",
    "PerSampleGradientError",
    "PrivacyBudgetExceeded",
    "ExportError",
]


class FxdpError(RuntimeError):
    """Base class of fxdp's errors."""


class UnsupportedModelError(FxdpError):
    """The model cannot be made differentially private as written."""


class UnsupportedOpError(UnsupportedModelError):
    """An op (or an op's option) has no exact per-sample gradient rule."""


class SymbolicGraphError(UnsupportedOpError):
    """The module-level (symbolically traced) graph cannot serve a use of a parameter
    that the ``torch.export`` graph can: ``privatize(capture="auto")`` switches to it."""


class BatchDimensionError(FxdpError):
    """The batch dimension of an activation could not be determined safely."""


class PerSampleGradientError(FxdpError):
    """Per-sample gradients were requested or produced in an invalid state."""


class PrivacyBudgetExceeded(FxdpError):
    """The next optimizer step would exceed the privacy budget."""


class ExportError(FxdpError, ValueError):
    """The model cannot be exported (or an export cannot be loaded)."""


def where(module_path: str | None = None, op: str | None = None, source: str | None = None) -> str:
    """A short location string for messages: module path, op and user source line."""
    parts = []
    if module_path:
        parts.append(f"module '{module_path}'")
    if op:
        parts.append(f"op {op}")
    if source:
        parts.append(f"at {source}")
    return ", ".join(parts) if parts else "in the model"
