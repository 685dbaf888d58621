"""Shared fixtures. A module applies one to all its tests with
``pytestmark = pytest.mark.usefixtures("f64")`` (several: ``usefixtures("one_thread", "f64")``).

The test tree mirrors the package: ``tests/rules/test_rule_<file>.py`` for
``fxdp/rules/<file>.py``, ``tests/passes/test_pass_<file>.py`` for
``fxdp/passes/<file>.py``; the other files test the public API. Helpers shared by
several files live in ``oracle.py`` (batch-of-one references and checks) and
``models.py`` (model classes); test files never import each other. Every test file
name is unique across the tree (pytest's default ``prepend`` import mode, no
``__init__.py``), and this directory is on ``sys.path`` for ``oracle``/``models``.
"""
import os
import warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (addopts' -n 2): no oversubscribed intra-op threads
    torch.set_num_threads(1)


@pytest.fixture
def f64():
    """Float64 as the default dtype for one test (per-sample gradients compared to
    batch-of-one at 1e-6)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: threads only add OpenMP
    hand-off cost (large on a busy 2-core machine); restored after the module."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def quiet():
    """Every warning ignored (tests that assert on reports, not on warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
