"""Opacus' examples and tutorials, as user code: the scripts in tests/opacus_usage/ make
the Opacus API calls those examples make, written against ``opacus``. Each runs with
Opacus itself and with ``import opacus.X`` importing ``fxdp.X``; fxdp's ε must be within
0.02 of Opacus' (same σ, q and steps; fxdp's PRV bound is at most that much tighter)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from opacus_alias import ALIAS

pytestmark = pytest.mark.slow

pytest.importorskip("opacus")
pytest.importorskip("transformers")
pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent / "opacus_usage"
SCRIPTS = sorted(p.stem for p in HERE.glob("*.py"))

RUNNER = ALIAS + textwrap.dedent('''
    import json, runpy, traceback, warnings
    warnings.simplefilter("ignore")
    backend, folder, names = sys.argv[1], sys.argv[2], sys.argv[3:]

    if backend == "fxdp":
        sys.meta_path.insert(0, OpacusIsFxdp())
    import torch
    torch.set_num_threads(1)
    for name in names:
        try:
            result = runpy.run_path(f"{folder}/{name}.py", run_name=name)["main"]()
            print("RESULT", json.dumps({"script": name, "ok": True, "result": result}), flush=True)
        except BaseException:
            print("RESULT", json.dumps({"script": name, "ok": False, "error": traceback.format_exc()[-3000:]}),
                  flush=True)
''')


def _start(backend: str, tmp: Path) -> subprocess.Popen:
    runner = tmp / f"run_{backend}.py"
    runner.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(runner), backend, str(HERE), *SCRIPTS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp)


def _results(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=1200)
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["script"]] = r
    assert results, stdout[-2000:] + stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both backends at once (one thread each: the two cores CI has)."""
    tmp = tmp_path_factory.mktemp("opacus_usage")
    procs = {backend: _start(backend, tmp) for backend in ("fxdp", "opacus")}
    return {backend: _results(proc) for backend, proc in procs.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_opacus_example_runs_on_fxdp_with_only_the_import_changed(runs, script):
    got = runs["fxdp"].get(script)
    assert got is not None and got["ok"], (got or {}).get("error")
    assert all(v == v for v in got["result"].values())  # no NaN


@pytest.mark.parametrize("script", SCRIPTS)
def test_epsilon_within_0_02_of_opacus_on_the_same_script(runs, script):
    ref = runs["opacus"].get(script)
    if ref is None or not ref["ok"]:
        pytest.skip(f"Opacus itself fails on this script: {(ref or {}).get('error', '')[-300:]}")
    got = runs["fxdp"][script]
    assert got["ok"], got.get("error")
    for key, want in ref["result"].items():
        if key.startswith("epsilon"):
            assert abs(got["result"][key] - want) <= 0.02, (key, got["result"][key], want)
