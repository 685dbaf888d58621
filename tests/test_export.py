"""fxdp.export / fxdp.load: round trips (in process, in a fresh process, and model.py
imported without fxdp), the privacy card, and the refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fxdp
from fxdp.card import read_card, recompute_epsilon, verify_card
from fxdp.export import ExportError, generate_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELTA = 1e-5


class BNNet(nn.Module):  # BatchNorm -> DPGroupNorm (kept in the export)
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 2)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Sequential(nn.Linear(4, 3), nn.Tanh())

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(2))


class LSTMNet(nn.Module):  # LSTM -> DPLSTM (exported as nn.LSTM)
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.lstm(x.transpose(1, 2))
        return self.fc(out[:, -1])


class AttnNet(nn.Module):  # MultiheadAttention -> DPMultiheadAttention (exported as nn.MultiheadAttention)
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.proj(x.transpose(1, 2))
        a, _ = self.attn(h, h, h)
        return self.fc(a.mean(1))


class Scale(nn.Module):  # a custom (traced-through) module holding raw parameters
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))
        self.register_buffer("offset", torch.zeros(3))

    def forward(self, x):
        return x * self.gain + self.offset


class RawNet(nn.Module):  # raw parameters used directly in forward
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3) / 3)
        self.b = nn.Parameter(torch.zeros(3))
        self.scale = Scale()

    def forward(self, x):
        return self.scale(torch.tanh(x.mean(2) @ self.w + self.b))


MODELS = {"bn": BNNet, "lstm": LSTMNet, "attn": AttnNet, "raw": RawNet}


def _train(model: nn.Module, steps: int = 2, accountant: str = "prv"):
    """A few DP-SGD steps (float64) on a tiny fixed dataset; returns (dp, engine, x)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    model = model.double().train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    engine = fxdp.PrivacyEngine(accountant=accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                         noise_generator=torch.Generator().manual_seed(1))
        for i in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(dp(x[4 * (i % 2):4 * (i % 2) + 4]), y[4 * (i % 2):4 * (i % 2) + 4]).backward()
            opt.step()
    return dp, engine, x


def _eval_out(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return module(x)
    finally:
        for m, t in saved:
            m.training = t


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (export dir, dp, engine, x, expected eval output)."""
    out = {}
    base = tmp_path_factory.mktemp("exports")
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        dp, engine, x = _train(cls())
        d = fxdp.export(dp, base / name, engine=engine, example_inputs=(x,), delta=DELTA,
                        torch_export=(name == "raw"), check_report=(name == "bn"))
        out[name] = (d, dp, engine, x, _eval_out(dp.strip(), x))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_in_process(exports, name):
    d, dp, engine, x, expected = exports[name]
    assert set(os.listdir(d)) >= {"model.py", "privacy.json", "report.json", "weights.pt"}
    m = fxdp.load(d)
    assert not m.training and isinstance(m.privacy_card, dict)
    with torch.no_grad():
        got = m(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # the exported weights are the trained ones (not a re-initialization)
    state = torch.load(d / "weights.pt", weights_only=True)
    assert state.keys() == dp.state_dict().keys()
    for k, v in dp.state_dict().items():
        assert torch.equal(state[k], v), k


def test_source_uses_standard_modules(exports):
    src = {n: (exports[n][0] / "model.py").read_text() for n in MODELS}
    assert "nn.LSTM(3, 5, batch_first=True)" in src["lstm"]
    assert "nn.MultiheadAttention(4, 2," in src["attn"]
    assert "group_norm" in src["bn"]
    assert all("fxdp" not in line for s in src.values() for line in s.splitlines() if "import" in line)


def test_fresh_process_and_without_fxdp(exports, tmp_path):
    """model.py imported with fxdp unimportable (python -I, cwd outside the repo, a
    sys.modules guard), then fxdp.load in the same fresh process; both match."""
    cases = {}
    for name, (d, _, _, x, expected) in exports.items():
        torch.save({"x": x, "expected": expected}, tmp_path / f"{name}.pt")
        cases[name] = str(d)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.modules["fxdp"] = None  # any 'import fxdp' in model.py fails
        import torch
        cases = {cases!r}
        outs = {{}}
        for name, d in cases.items():
            spec = importlib.util.spec_from_file_location("exported_" + name, d + "/model.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            data = torch.load({str(tmp_path)!r} + "/" + name + ".pt", weights_only=True)
            with torch.no_grad():
                got = mod.load()(data["x"])
            torch.testing.assert_close(got, data["expected"], rtol=0, atol=1e-10)
            outs[name] = data
        assert not [k for k in sys.modules if k.startswith("fxdp.")], "model.py imported fxdp"
        del sys.modules["fxdp"]
        sys.path.insert(0, {ROOT!r})
        import fxdp
        for name, d in cases.items():
            with torch.no_grad():
                got = fxdp.load(d)(outs[name]["x"])
            torch.testing.assert_close(got, outs[name]["expected"], rtol=0, atol=1e-10)
        print("ROUND TRIPS OK", len(cases))
    """)
    r = subprocess.run([sys.executable, "-I", "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ROUND TRIPS OK 4" in r.stdout


def test_card_states_engine_epsilon(exports):
    d, dp, engine, x, _ = exports["bn"]
    card = read_card(d)
    g, t, m = card["guarantee"], card["training"], card["model"]
    assert g["epsilon"] == engine.get_epsilon(DELTA) and g["delta"] == DELTA
    assert g["accountant"] == "prv" and g["privacy_unit"] == "example-level"
    lo, hi = g["epsilon_bounds"]["lower"], g["epsilon_bounds"]["upper"]
    assert lo <= g["epsilon"] <= hi
    assert t["steps"] == engine.steps == 2 and t["dataset_size"] == 8
    assert t["noise_multiplier_history"] == [[1.0, 0.5, 2]] and t["epochs"] == 1.0
    assert t["sampling"] == "poisson" and t["sample_rate"] == 0.5
    assert t["clipping"]["mode"] == "flat" and t["clipping"]["max_grad_norm"] == 1.0
    assert t["secure_mode"] is False
    assert [(r["original"], r["in_export"]) for r in m["rewrites"]] == [("BatchNorm1d", "DPGroupNorm")]
    assert m["compatibility"]["ok"] is True
    assert json.loads((d / "report.json").read_text())["ok"] is True
    assert set(card["files"]) >= {"model.py", "weights.pt", "report.json"}
    assert card["environment"]["torch"] == torch.__version__
    assert recompute_epsilon(card) == g["epsilon"]
    assert verify_card(d) == ([], g["epsilon"])
    lstm_card = read_card(exports["lstm"][0])
    assert [(r["original"], r["in_export"]) for r in lstm_card["model"]["rewrites"]] == [("LSTM", "LSTM")]


def test_torch_export_file_or_note(exports):
    card = read_card(exports["raw"][0])
    te = card["model"]["torch_export"]
    if te["file"]:
        assert (exports["raw"][0] / "model.pt2").is_file() and "model.pt2" in card["files"]
        program = torch.export.load(str(exports["raw"][0] / "model.pt2"))
        x, expected = exports["raw"][3], exports["raw"][4]
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-10)
    else:
        assert te["note"].startswith("torch.export failed")
    assert read_card(exports["lstm"][0])["model"]["torch_export"] == {"file": None, "note": "not requested"}


def test_keyword_example_inputs(tmp_path):
    """A dict of keyword inputs (a Hugging Face batch) checks the round trip, the report and
    ``torch.export`` as a tuple does; the card names each input."""
    torch.manual_seed(0)
    dp, engine, x = _train(RawNet())
    d = fxdp.export(dp, tmp_path / "kw", engine=engine, example_inputs={"x": x}, delta=DELTA)
    card = read_card(d)
    assert card["model"]["example_inputs"] == [{"name": "x", "shape": [8, 3, 6], "dtype": "float64"}]
    assert card["model"]["compatibility"]["ok"] is True
    assert card["model"]["torch_export"]["file"] == "model.pt2"
    with torch.no_grad():
        torch.testing.assert_close(fxdp.load(d)(x=x), _eval_out(dp.strip(), x), rtol=0, atol=1e-10)


def test_refuses_a_model_captured_with_torch_export(tmp_path):
    """A forward taking ``**kwargs`` (as Hugging Face models) is captured with torch.export:
    there is no module-level graph to write as model.py, and the error says what to do."""

    class KwargsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, **batch):
            return self.fc(batch["x"])

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    model = KwargsNet()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    engine = fxdp.PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                         example_inputs={"x": x[:4]})
        opt.zero_grad()
        nn.functional.cross_entropy(dp(x=x[:4]), y[:4]).backward()
        opt.step()
    with pytest.raises(ExportError, match=r"captured with torch\.export.*save_pretrained.*privacy_statement"):
        fxdp.export(dp, tmp_path / "out", engine=engine, example_inputs={"x": x[:4]})
    assert not (tmp_path / "out").exists()


def test_privacy_statement(exports):
    _, _, engine, _, _ = exports["lstm"]
    s = engine.privacy_statement(DELTA)
    eps = engine.get_epsilon(DELTA)
    assert f"({eps:.3g}, {DELTA:.3g})-DP" in s
    assert "ONE training example" in s and "Not protected" in s and "secure_mode" in s
    assert fxdp.PrivacyEngine().privacy_statement().startswith("No DP training step")


# --- refusals ---------------------------------------------------------------------------------


def test_refuses_plain_model_and_untrained(tmp_path):
    x = torch.randn(4, 3, 6)
    with pytest.raises(ExportError, match="needs the PrivacyEngine"):
        fxdp.export(LSTMNet(), tmp_path / "a", engine=None, example_inputs=(x,))
    model = LSTMNet().train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=2)
    engine = fxdp.PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp, _, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ExportError, match="0 DP steps"):
        fxdp.export(dp, tmp_path / "b", engine=engine, example_inputs=(x,))
    with pytest.raises(ExportError, match="not made private by this engine"):
        fxdp.export(LSTMNet(), tmp_path / "c", engine=engine, example_inputs=(x,))
    assert not any((tmp_path / n).exists() for n in "abc")


def test_refuses_nonempty_directory(exports, tmp_path):
    d, dp, engine, x, _ = exports["raw"]
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        fxdp.export(dp, tmp_path, engine=engine, example_inputs=(x,), torch_export=False, check_report=False)
    (tmp_path / "model.pt2").write_text("stale")  # from an earlier export: must not survive
    fxdp.export(dp, tmp_path, engine=engine, example_inputs=(x,), torch_export=False, check_report=False,
                overwrite=True)
    assert not (tmp_path / "model.pt2").exists() and (tmp_path / "keep.txt").exists()
    assert verify_card(tmp_path)[0] == []


def test_load_missing_directory(tmp_path):
    with pytest.raises(ExportError, match="is not a directory"):
        fxdp.load(tmp_path / "nope")
    with pytest.raises(ExportError, match="missing model.py, weights.pt, privacy.json"):
        fxdp.load(tmp_path)


def _copy(d, tmp_path):
    import shutil

    return shutil.copytree(d, tmp_path / "copy")


def test_tampered_card_is_detected(exports, tmp_path):
    d = _copy(exports["raw"][0], tmp_path)
    card = json.loads((d / "privacy.json").read_text())
    card["guarantee"]["epsilon"] = 0.1  # a better-looking guarantee
    (d / "privacy.json").write_text(json.dumps(card))
    with pytest.raises(ExportError, match="card was edited"):
        fxdp.load(d)
    # a forger who also rewrites card_sha256 is caught by recomputing epsilon from the history
    from fxdp.card import card_hash

    card["card_sha256"] = card_hash(card)
    (d / "privacy.json").write_text(json.dumps(card))
    fxdp.load(d)  # hashes consistent again
    problems, eps = verify_card(d)
    assert len(problems) == 1 and "states 0.1 but the history gives" in problems[0]


def test_corrupted_card_and_replaced_weights(exports, tmp_path):
    d = _copy(exports["raw"][0], tmp_path)
    good = (d / "privacy.json").read_text()
    (d / "privacy.json").write_text(good[: len(good) // 2])
    with pytest.raises(ExportError, match="corrupted"):
        fxdp.load(d)
    (d / "privacy.json").write_text(good)
    state = torch.load(d / "weights.pt", weights_only=True)
    state["w"] = state["w"] * 0
    torch.save(state, d / "weights.pt")
    with pytest.raises(ExportError, match="weights.pt: SHA-256 differs"):
        fxdp.load(d)
    assert fxdp.load(d, verify=False).w.abs().sum() == 0


def test_unexportable_leaf_is_named():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: kept whole as a leaf
                return self.fc(x)
            return -self.fc(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Untraceable()

        def forward(self, x):
            return self.block(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = fxdp.privatize(Outer(), capture="fx")
    with pytest.raises(ExportError, match=r"'block' \(.*Untraceable\)"):
        generate_source(dp.strip())
