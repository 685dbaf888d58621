"""``python -m fxdp check``: run as a new user would (subprocess), plus the
argument handling in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fxdp.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class Net(nn.Module):
        def __init__(self, hidden=8):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, hidden)
            self.out = nn.Linear(hidden, 10)

        def forward(self, x):
            h = F.relu(self.bn(self.conv(x))).mean((2, 3))
            return self.out(torch.tanh(self.fc(h)))


    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1 * 6 * 6, 10)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            return h - h.mean(0, keepdim=True)  # the batch mean


    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.gru = nn.GRU(8, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, tok):  # [T, B]
            h, _ = self.gru(self.emb(tok))
            return self.fc(h[-1])


    def make_net():
        return Net(hidden=4)
    """
)
MIX_LINE = next(i + 1 for i, line in enumerate(MODELS.splitlines()) if "# the batch mean" in line)


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "models.py"
    p.write_text(MODELS)
    return p


def run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fxdp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# -- as a user runs it -----------------------------------------------------------------------------

def test_subprocess_clean_model_exit_0_and_svg(model_file, tmp_path):
    svg = tmp_path / "net.svg"
    p = run(["check", "models.py:Net", "--input-shape", "1,6,6", "--batch-size", "8", "--svg", str(svg)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "fxdp.check: Net: OK" in p.stdout and "conv.weight" in p.stdout and "BatchNorm2d -> " in p.stdout
    assert svg.read_text().startswith("<svg")


def test_subprocess_mixing_model_exit_1_json(model_file, tmp_path):
    p = run(["check", "models.py:Mixing", "--input-shape", "1,6,6", "--json"], tmp_path)
    assert p.returncode == 1, p.stderr
    d = json.loads(p.stdout)
    assert d["ok"] is False and d["summary"]["errors"] == 1
    f = d["findings"][0]
    assert f["line"] == MIX_LINE and f["file"] == "models.py" and f["location"] == f"models.py:{MIX_LINE}"
    assert f["code"] == "batch-reduction" and "h.mean(0" in f["source"]


def test_subprocess_bad_usage_exit_2(model_file, tmp_path):
    p = run(["check", "models.py:Nope", "--input-shape", "1,6,6"], tmp_path)
    assert p.returncode == 2 and "no attribute 'Nope'" in p.stderr and "Mixing" in p.stderr


# -- arguments (in-process) ---------------------------------------------------------------------------

def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_report_points_at_the_line(model_file, capsys):
    code, out, _ = cli(capsys, "check", f"{model_file}:Mixing", "--input-shape", "1,6,6")
    assert code == 1 and f"models.py:{MIX_LINE}" in out and "NOT COMPATIBLE" in out and "fix:" in out
    code, out, _ = cli(capsys, "check", f"{model_file}:Mixing", "--input-shape", "1,6,6", "--ignore",
                       "batch-reduction")
    assert code == 0 and "ignored error" in out


def test_tokens_seq_first_and_batch_size(model_file, capsys):
    code, out, err = cli(capsys, "check", f"{model_file}:Tokens", "--input-shape", "7", "--dtype", "long",
                         "--vocab", "50", "--seq-first", "--batch-size", "3", "--json")
    assert code == 0, out + err
    d = json.loads(out)
    assert d["batch_dim"] == 1 and d["batch_size"] == 3
    emb = [x for x in d["layers"] if x["name"] == "emb.weight"][0]
    assert emb["grad_sample_bytes"] == 3 * 50 * 8 * 4 and emb["rule"] == "embedding"


def test_factory_init_verify_and_rewrite_options(model_file, capsys):
    code, out, _ = cli(capsys, "check", f"{model_file}:make_net", "--input-shape", "1,6,6", "--json")
    assert code == 0 and [x["shape"] for x in json.loads(out)["layers"] if x["name"] == "fc.weight"] == [[4, 4]]
    code, out, _ = cli(capsys, "check", f"{model_file}:Net", "--input-shape", "1,6,6", "--init", '{"hidden": 5}',
                       "--verify", "--json")
    d = json.loads(out)
    assert code == 0 and any(f["code"] == "verify" for f in d["findings"])
    code, out, _ = cli(capsys, "check", f"{model_file}:Net", "--input-shape", "1,6,6", "--rewrite-option",
                       "batchnorm=off", "--json")
    errors = [f for f in json.loads(out)["findings"] if f["severity"] == "error"]
    assert code == 1 and [(f["code"], f["module"]) for f in errors] == [("batch-norm", "bn")]


def test_module_path_target(tmp_path, capsys, monkeypatch):
    (tmp_path / "mypkg_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = cli(capsys, "check", "mypkg_models:Mixing", "--input-shape", "1,6,6")
    assert code == 1 and f"mypkg_models.py:{MIX_LINE}" in out


@pytest.mark.parametrize("args,msg", [
    (["models.py", "--input-shape", "1,6,6"], "must be MODEL_FILE.py:ClassName"),
    (["missing.py:Net", "--input-shape", "1,6,6"], "does not exist"),
    (["models.py:Net", "--input-shape", "3,6,6"], "fails on example inputs"),
    (["models.py:Net", "--input-shape", "1,a"], "comma-separated integers"),
    (["models.py:Net", "--input-shape", "1,6,6", "--dtype", "complex"], "--dtype 'complex'"),
    (["models.py:Net", "--input-shape", "1,6,6", "--dtype", "float", "--dtype", "long"], "one --dtype"),
    (["models.py:Net", "--input-shape", "1,6,6", "--batch-size", "0"], "--batch-size"),
    (["models.py:Net", "--input-shape", "1,6,6", "--init", "{bad"], "--init is not valid JSON"),
    (["models.py:Net", "--input-shape", "1,6,6", "--init", '{"nope": 1}'], "constructing"),
    (["models.py:Net", "--input-shape", "1,6,6", "--rewrite-option", "batchnorm"], "KEY=VALUE"),
    (["models.py:Net", "--input-shape", "1,6,6", "--svg", "out.png"], "--svg"),
])
def test_usage_errors(model_file, capsys, monkeypatch, args, msg):
    monkeypatch.chdir(model_file.parent)
    code, out, err = cli(capsys, "check", *args)
    assert code == 2 and msg in err and err.startswith("python -m fxdp check: error:"), err


def test_required_arguments(model_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", f"{model_file}:Net"])
    assert e.value.code == 2 and "--input-shape" in capsys.readouterr().err


def test_parser_has_subcommands(capsys):
    parser = build_parser()
    assert "check" in parser.format_help()
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["check", "--help"])
    assert e.value.code == 0 and "--input-shape" in capsys.readouterr().out


def test_docs_example_is_current(capsys, monkeypatch):
    """docs/examples/check_report.json is what the documented command prints."""
    monkeypatch.chdir(ROOT)
    code, out, _ = cli(capsys, "check", "docs/examples/check_model.py:AudioTagger", "--input-shape", "16,50",
                       "--batch-size", "64", "--json")
    with open(os.path.join(ROOT, "docs", "examples", "check_report.json")) as fh:
        saved = json.load(fh)
    d = json.loads(out)
    assert code == 1
    key = lambda r: [(f["code"], f["location"], f["problem"]) for f in r["findings"]]  # noqa: E731
    assert key(d) == key(saved) and [f["line"] for f in d["findings"]] == [24, 26]
    assert [(x["name"], x["rule"]) for x in d["layers"]] == [(x["name"], x["rule"]) for x in saved["layers"]]
