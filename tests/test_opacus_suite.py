"""Opacus' own public-API test files, run against fxdp through an import alias.

The files are read from the installed opacus package at test time (copied to a
temporary folder, never into this repository) and run in a subprocess in which
``import opacus.X`` imports ``fxdp.X``. Every test passes except those asserting
Opacus' exact numbers where fxdp's are deliberately different; each is listed
below and in docs/migrating_from_opacus.md with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from opacus_alias import ALIAS

pytestmark = pytest.mark.slow

opacus = pytest.importorskip("opacus")

FILES = ["accountants_test.py", "batch_memory_manager_test.py"]

#: test -> why fxdp's number differs (all within Opacus' own tolerance of the target)
DIFFERENT = {
    # get_noise_multiplier: a safeguarded secant search returns another sigma of the same
    # [target - tolerance, target] epsilon interval than Opacus' bisection grid point
    "accountants_test.py::AccountingTest::test_get_noise_multiplier_gdp": "calibration point",
    "accountants_test.py::AccountingTest::test_get_noise_multiplier_prv_epochs": "calibration point",
    "accountants_test.py::AccountingTest::test_get_noise_multiplier_prv_steps": "calibration point",
    "accountants_test.py::AccountingTest::test_get_noise_multiplier_rdp_epochs": "calibration point",
    "accountants_test.py::AccountingTest::test_get_noise_multiplier_rdp_steps": "calibration point",
    # PRV: fxdp's upper bound 6.7675 vs Opacus' 6.7774 (its padded estimate); PLD checks ours
    "accountants_test.py::AccountingTest::test_prv_accountant": "tighter PRV bound",
}

BOOT = ALIAS + textwrap.dedent('''
    sys.meta_path.insert(0, OpacusIsFxdp())
    import pytest
    sys.exit(pytest.main(sys.argv[1:]))
''')


def test_opacus_public_api_test_files_pass_against_fxdp(tmp_path):
    src = os.path.join(os.path.dirname(opacus.__file__), "tests")
    for name in FILES:
        shutil.copy(os.path.join(src, name), tmp_path / name)
    (tmp_path / "boot.py").write_text(BOOT)
    runs = {}
    for name in FILES:  # one process per file, at once (CI has two cores)
        deselect = [a for t in DIFFERENT if t.startswith(name + "::") for a in ("--deselect", t)]
        runs[name] = subprocess.Popen(
            [sys.executable, "boot.py", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore", name,
             *deselect],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        tail = stdout[-3000:] + stderr[-2000:]
        assert run.returncode == 0, tail
        different = sum(t.startswith(name + "::") for t in DIFFERENT)
        assert not different or f"{different} deselected" in stdout, tail
