"""The examples run as scripts: digits trains and reports accuracy and epsilon; the
dataset examples explain missing files and exit nonzero."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_digits_reports_accuracy_and_epsilon():
    pytest.importorskip("sklearn")
    out = run("digits.py", "--epochs", "2", "--target-epsilon", "1", "--accountant", "rdp")
    assert out.returncode == 0, out.stderr
    assert "epoch   2/2" in out.stdout and "test acc" in out.stdout
    m = re.search(r"Test accuracy: ([\d.]+)%  at \(epsilon, delta\) = \(([\d.]+), 1e-05\)", out.stdout)
    assert m, out.stdout
    accuracy, epsilon = float(m.group(1)), float(m.group(2))
    assert 0 <= accuracy <= 100 and 0.9 <= epsilon <= 1.0  # calibrated to the budget, not above it


@pytest.mark.parametrize("script, name", [("mnist.py", "MNIST"), ("cifar10.py", "CIFAR-10")])
def test_missing_dataset_exits_nonzero(tmp_path, script, name):
    out = run(script, "--data-dir", str(tmp_path / "nowhere"), timeout=120)
    assert out.returncode != 0
    assert f"{name} not found in --data-dir" in out.stderr
    assert "Download it from" in out.stderr and "Traceback" not in out.stderr
