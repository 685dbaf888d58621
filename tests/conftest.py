"""Shared fixtures."""
import pytest

from oracle import use_float64

#: float64 default dtype for one test (per-sample gradients compared to batch-of-one at 1e-6)
f64 = pytest.fixture(use_float64)
