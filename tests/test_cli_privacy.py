"""``python -m fxdp epsilon | noise | card | plot-budget``: every command run as a
subprocess (all launched at once), plus help and argument errors in-process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fxdp
from fxdp.accountants import create_accountant
from fxdp.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(path):
    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    engine = fxdp.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=torch.utils.data.DataLoader(
                                             torch.utils.data.TensorDataset(x, y), batch_size=4),
                                         noise_multiplier=1.3, max_grad_norm=0.5)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(dp(x[:4]), y[:4]).backward()
            opt.step()
    return fxdp.export(dp, path, engine=engine, example_inputs=(x,), delta=1e-5, torch_export=False,
                       check_report=False), engine


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess at once (each pays torch's import): name -> CompletedProcess-like."""
    base = tmp_path_factory.mktemp("cli")
    good, engine = _export(base / "good")
    bad = shutil.copytree(good, base / "bad")
    card = json.loads((bad / "privacy.json").read_text())
    card["training"]["noise_multiplier_history"][0][0] = 5.0  # claims more noise than was used
    (bad / "privacy.json").write_text(json.dumps(card))
    cmds = {
        "epsilon": ["epsilon", "--noise", "1.1", "--sample-rate", "0.004", "--steps", "1000", "--delta", "1e-5",
                    "--accountant", "all", "--json"],
        "noise": ["noise", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--epochs", "2",
                  "--accountant", "rdp"],
        "card": ["card", str(good), "--verify"],
        "card_bad": ["card", str(bad), "--verify"],
        "plot": ["plot-budget", "--noise", "1.1", "--sample-rate", "0.01", "--epochs", "2", "--delta", "1e-5",
                 "--accountant", "rdp", "--points", "3", "-o", str(base / "budget.png")],
        "bad_rate": ["epsilon", "--noise", "1.1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"],
    }
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {k: subprocess.Popen([sys.executable, "-m", "fxdp", *v], cwd=str(base), env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, v in cmds.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = subprocess.CompletedProcess(cmds[k], p.returncode, stdout, stderr)
    out["_base"] = base
    out["_engine"] = engine
    return out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("check", "epsilon", "noise", "card", "plot-budget"):
        assert cmd in out
    assert main([]) == 2  # no command: help on stderr, usage error


def test_epsilon_matches_accountants(runs):
    r = runs["epsilon"]
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == 1000 and [row["accountant"] for row in res["results"]] == ["prv", "rdp", "gdp"]
    for row in res["results"]:
        acc = create_accountant(row["accountant"])
        acc.history = [(1.1, 0.004, 1000)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert row["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    prv = res["results"][0]
    assert prv["bounds"][0] <= prv["epsilon"] <= prv["bounds"][1] + 1e-12


def test_noise_meets_target(runs):
    r = runs["noise"]
    assert r.returncode == 0, r.stderr
    assert "200 steps" in r.stdout
    sigma = float(r.stdout.split("noise multiplier = ")[1].split()[0])
    acc = create_accountant("rdp")
    acc.history = [(sigma, 0.01, 200)]
    assert 2.9 <= acc.get_epsilon(1e-5) <= 3.0 + 1e-3  # printed sigma is rounded to 4 digits


def test_card_verify(runs):
    r = runs["card"]
    assert r.returncode == 0, r.stderr
    eps = runs["_engine"].get_epsilon(1e-5)
    assert "fxdp privacy card" in r.stdout and f"{eps:.6g}" in r.stdout and "example-level" in r.stdout
    assert "verified: epsilon" in r.stdout
    bad = runs["card_bad"]
    assert bad.returncode == 1
    assert "VERIFICATION FAILED" in bad.stdout and "card was edited" in bad.stdout
    assert "but the history gives" in bad.stdout


def test_plot_budget(runs):
    r = runs["plot"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 2 and "needs matplotlib" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert (runs["_base"] / "budget.png").stat().st_size > 1000


def test_bad_argument_subprocess(runs):
    r = runs["bad_rate"]
    assert r.returncode == 2 and "--sample-rate must be in (0, 1]" in r.stderr and not r.stdout


# --- in-process: help and argument errors of every command --------------------------------------


@pytest.mark.parametrize("cmd", ["epsilon", "noise", "card", "plot-budget"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["epsilon", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"], "required: --noise"),
    (["epsilon", "--noise", "1", "--sample-rate", "0.01", "--delta", "1e-5"], "exactly one of --steps and --epochs"),
    (["epsilon", "--noise", "1", "--sample-rate", "0.01", "--steps", "10", "--epochs", "1", "--delta", "1e-5"],
     "exactly one of --steps and --epochs"),
    (["epsilon", "--noise", "1", "--sample-rate", "0.01", "--steps", "10", "--delta", "1.5"], "--delta must be in (0, 1)"),
    (["epsilon", "--noise", "x", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"], "invalid float value"),
    (["epsilon", "--noise", "1", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5", "--accountant", "foo"],
     "invalid choice"),
    (["noise", "--target-epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.01", "--epochs", "1"],
     "--target-epsilon must be a finite number > 0"),
    (["noise", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "0"],
     "--steps must be at least 1"),
    (["card", "/nonexistent/export"], "is not a directory"),
    (["plot-budget", "--noise", "1", "--sample-rate", "0.01", "--delta", "1e-5", "-o", "x.png"], "required: --epochs"),
    (["plot-budget", "--noise", "1", "--sample-rate", "0.01", "--epochs", "1", "--delta", "1e-5", "--points", "1",
      "-o", "x.png"], "--points must be at least 2"),
])
def test_bad_arguments(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_card_of_non_export(tmp_path, capsys):
    (tmp_path / "privacy.json").write_text("{not json")
    assert main(["card", str(tmp_path)]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_plot_budget_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["plot-budget", "--noise", "1", "--sample-rate", "0.01", "--epochs", "1", "--delta", "1e-5",
                 "-o", str(tmp_path / "b.png")])
    assert code == 2 and "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_console_script_entry():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["fxdp"] == "fxdp.cli:main"


def test_the_command_line_starts_without_importing_scipy():
    """scipy's submodules cost about a second at start-up; fxdp imports them when an
    accountant first needs them (checked structurally, not timed)."""
    import subprocess
    import sys

    code = "import sys, fxdp.cli; print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
