"""fxdp.check: the report's API (text, JSON, SVG), suppression, warnings for what
cannot be proven, the layer table, and that the model is left untouched. The
batch-mixing analysis itself: tests/passes/test_pass_batch_mixing*.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.passes import batch_mixing as bm
from oracle import line_of

pytestmark = pytest.mark.usefixtures("quiet")


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0)  # batch mean


class Clean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# -- the report -----------------------------------------------------------------------------

def test_report_fields_text_json():
    r = fxdp.check(Centered(), (torch.randn(4, 4),))
    assert not r.ok and len(r.errors) == 1 and r.findings == r.errors
    f = r.errors[0]
    assert f.severity == "error" and f.code == "batch-reduction" and f.op == ".mean()"
    assert f.file == __file__ and f.line == line_of(Centered, "# batch mean")
    assert f.source == "return h - h.mean(0)  # batch mean"
    assert "batch dimension" in f.problem and "LayerNorm" in f.fix
    assert f.location == f"test_check.py:{f.line}"
    text = str(r)
    for part in ("NOT COMPATIBLE", "severity", "op", "module", "location", "fix:", "Layers", "fc.weight", "linear",
                 f"test_check.py:{f.line}"):
        assert part in text, part
    d = json.loads(r.to_json())
    assert d["ok"] is False and d["summary"]["errors"] == 1
    assert d["findings"][0]["line"] == f.line and d["findings"][0]["code"] == "batch-reduction"
    assert [lay["name"] for lay in d["layers"]] == ["fc.weight", "fc.bias"]
    assert "graph" not in d and "graph" in r.to_dict(graph=True)
    assert repr(r).startswith("CompatibilityReport(model='Centered', ok=False")


def test_render_svg_highlights_the_offending_node(tmp_path):
    r = fxdp.check(Centered(), (torch.randn(4, 4),))
    path = tmp_path / "report.svg"
    svg = r.render(path)
    assert path.read_text() == svg and svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    groups = root.findall(f"{ns}g")
    bad = [g for g in groups if "error: batch-reduction" in "".join(t.text or "" for t in g.findall(f"{ns}text"))]
    assert len(bad) == 1 and bad[0].find(f"{ns}rect").get("stroke") == "#c62828"
    assert "mean" in bad[0].find(f"{ns}title").text
    assert len(groups) == len(r.graph["nodes"]) >= 4  # x, fc, mean, sub, output
    with pytest.raises(ValueError, match="svg"):
        r.render(tmp_path / "report.png")


def test_clean_model_report():
    r = fxdp.check(Clean(), torch.randn(5, 4), batch_size=64)
    assert r.ok and not r.findings and r.batch_size == 64 and r.example_batch_size == 5
    sizes = {lay.name: lay.grad_sample_bytes for lay in r.layers}
    assert sizes["fc1.weight"] == 64 * 32 * 4 and r.grad_sample_bytes == 64 * (32 + 8 + 24 + 3) * 4
    assert "OK" in str(r) and r.raise_if_errors() is r
    assert fxdp.check.assert_compatible(Clean(), torch.randn(5, 4)).ok


def test_assert_compatible_raises_with_every_error():
    with pytest.raises(fxdp.UnsupportedModelError, match=r"(?s)Centered.*mean.*batch dimension.*Fix"):
        fxdp.check.assert_compatible(Centered(), (torch.randn(4, 4),))


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        fxdp.check(lambda x: x, (torch.randn(2, 2),))
    with pytest.raises(fxdp.UnsupportedModelError, match="already privatized"):
        fxdp.check(fxdp.privatize(Clean()), (torch.randn(2, 4),))
    with pytest.raises(ValueError, match="batched tensor"):
        fxdp.check(Clean(), (3,))
    with pytest.raises(TypeError, match="batch_first"):
        fxdp.check(Clean(), torch.randn(2, 4), batch_first="yes")
    with pytest.raises(ValueError, match="batch_size"):
        fxdp.check(Clean(), torch.randn(2, 4), batch_size=0)


# -- suppression ---------------------------------------------------------------------------------

class Suppressed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0))  # fxdp: ignore


@pytest.mark.parametrize("how", ["node", "code", "location", "predicate"])
def test_ignore_accepts_a_finding(how):
    x = torch.randn(4, 4)
    f = fxdp.check(Centered(), x).errors[0]
    ig = {"node": f.node, "code": "batch-reduction", "location": f.location,
          "predicate": lambda g: g.op == ".mean()"}[how]
    r = fxdp.check(Centered(), x, ignore=[ig])
    assert r.ok and not r.findings and len(r.ignored) == 1 and r.ignored[0].ignored
    assert "ignored error" in str(r)
    assert fxdp.check(Centered(), x, ignore=["other-code"]).ok is False


def test_inline_comment_suppresses():
    r = fxdp.check(Suppressed(), torch.randn(4, 4))
    assert r.ok and r.ignored and r.ignored[0].line == line_of(Suppressed, "fxdp: ignore")


# -- what cannot be proven -------------------------------------------------------------------------

class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # control flow on a batch statistic
            return x * 2
        return x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(x))


def test_control_flow_on_batch_data_in_a_submodule_is_an_error_at_its_line():
    """Fail closed: privatize captures such a model with torch.export, which cannot
    follow a branch on tensor values (here a batch statistic: it mixes samples)."""
    r = fxdp.check(WithGate(), torch.randn(4, 4))
    assert not r.ok
    (e,) = [e for e in r.errors if e.code == "export"]
    assert e.line == line_of(Gate, "# control flow") and "if x.mean() > 0" in e.source
    assert "branches on tensor values" in e.problem and "torch.where" in e.fix


class WholeUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # root control flow
            x = -x
        return self.fc(x)


def test_control_flow_on_batch_data_in_the_model_is_an_error_at_its_line():
    r = fxdp.check(WholeUntraceable(), torch.randn(4, 4))
    assert not r.ok and [e.code for e in r.errors] == ["export"]
    assert r.errors[0].line == line_of(WholeUntraceable, "# root control flow")
    with pytest.raises(fxdp.FxdpError, match="branches on tensor values"):
        fxdp.privatize(WholeUntraceable())(torch.randn(4, 4))


def mystery(x):
    return x.flip(-1) * 2


torch.fx.wrap("mystery")


class UsesMystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(mystery(x))  # unknown op


def mystery_taken(x):
    return torch.take(x, torch.arange(x.numel())).view_as(x)


torch.fx.wrap("mystery_taken")


class UsesMysteryTaken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(mystery_taken(x))  # unknown op without batch rules


def test_unknown_op_is_proven_from_its_aten_graph_or_an_error_naming_the_ways_out():
    r = fxdp.check(UsesMystery(), torch.randn(4, 4))  # flip(-1) * 2: proven
    assert r.ok and not r.warnings, str(r)
    r = fxdp.check(UsesMysteryTaken(), torch.randn(4, 4))
    assert not r.ok
    e = [e for e in r.errors if e.code == "unproven-op"]
    assert len(e) == 1 and e[0].op == "mystery_taken" and e[0].line == line_of(UsesMysteryTaken, "# unknown op")
    assert "cannot prove" in e[0].problem and "aten.take" in e[0].problem
    assert "fxdp.verify" in e[0].fix and "register_semantics" in e[0].fix
    bm.register_semantics(mystery_taken, "per_sample")
    try:
        assert fxdp.check(UsesMysteryTaken(), torch.randn(4, 4)).ok
    finally:
        bm._SEMANTICS.pop(mystery_taken)
    with pytest.raises(ValueError, match="kind"):
        bm.register_semantics(mystery, "magic")


class LossInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        return F.cross_entropy(self.fc(x), y)  # loss in the model


def test_loss_inside_the_model_is_a_warning():
    r = fxdp.check(LossInside(), (torch.randn(4, 4), torch.tensor([0, 1, 2, 0])))
    assert r.ok and [w.code for w in r.warnings] == ["loss-in-model"]
    assert r.warnings[0].line == line_of(LossInside, "# loss in the model")


class SumThenUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        total = self.fc(x).sum()
        return self.fc(x) * total  # the batch total feeds every sample


def test_batch_sum_used_per_sample_is_an_error():
    r = fxdp.check(SumThenUse(), torch.randn(4, 4))
    assert not r.ok and r.errors[0].code == "batch-reduction" and r.errors[0].op == ".sum()"


class FoldedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        B, T, _ = x.shape
        return self.fc(x).reshape(B * T, 3)  # token logits


def test_fold_reaching_the_output_is_a_warning():
    r = fxdp.check(FoldedOutput(), torch.randn(4, 5, 4))
    assert r.ok and [w.code for w in r.warnings] == ["batch-fold"]
    assert r.warnings[0].line == line_of(FoldedOutput, "# token logits")


class HardCodedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.view(4, 12))


def test_hard_coded_batch_size_is_an_error():
    r = fxdp.check(HardCodedBatch(), torch.randn(4, 3, 4))
    assert not r.ok and r.errors[0].code == "batch-size" and "x.shape[0]" in r.errors[0].fix


def test_eval_mode_warns():
    r = fxdp.check(Clean().eval(), torch.randn(4, 4))
    assert r.ok and [w.code for w in r.warnings] == ["eval-mode"]


# -- sequence-first inputs -------------------------------------------------------------------------

class SeqFirst(nn.Module):
    def __init__(self, over: int):
        super().__init__()
        self.over = over
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # [T, B, D]
        return self.fc(x - x.mean(self.over, keepdim=True))


def test_batch_first_false():
    x = torch.randn(6, 4, 4)
    assert fxdp.check(SeqFirst(0), x, batch_first=False).ok  # mean over time: per sample
    r = fxdp.check(SeqFirst(1), x, batch_first=False)
    assert not r.ok and r.batch_dim == 1 and "(1)" in r.errors[0].problem
    assert not fxdp.check(SeqFirst(0), x).ok  # read as batch-first, dim 0 is the batch


# -- layers ------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.bil = nn.Bilinear(4, 4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(4))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, tok):
        h = self.emb(tok)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.frozen(h) * self.scale
        return self.bil(h, h)


def test_layer_table_rules_memory_and_frozen():
    r = fxdp.check(Mixed(), torch.randint(0, 10, (3, 5)), batch_size=16)
    assert r.ok, str(r)
    rules = {lay.name: lay.rule for lay in r.layers}
    # exactly the rules of privatize's capture table
    table = fxdp.privatize(Mixed()).capture_table()
    for name in ("emb.weight", "conv.weight", "conv.bias", "bil.weight", "bil.bias", "scale"):
        assert rules[name] == " + ".join(c["rule"] for c in table if name in c["params"]), name
    assert rules["emb.weight"] == "embedding" and rules["conv.weight"].startswith("conv")
    assert rules["frozen.weight"].startswith("frozen") and rules["unused"].startswith("unused")
    by = {lay.name: lay for lay in r.layers}
    assert by["frozen.weight"].grad_sample_bytes == 0 and not by["frozen.weight"].trainable
    assert by["bil.weight"].grad_sample_bytes == 16 * 2 * 4 * 4 * 4
    assert by["conv.weight"].shape == [4, 4, 3] and by["conv.weight"].dtype == "float32"


# -- the model is left as it was -------------------------------------------------------------------------

class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        self.cache = x.detach()
        return self.bn(self.fc(torch.dropout(x, 0.5, True)))


def test_model_rng_and_state_are_untouched():
    torch.manual_seed(0)
    m = Stateful()
    x = torch.randn(4, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    r = fxdp.check(m, x)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "cache" not in vars(m)
    assert any(f.code == "state-update" and "cache" in f.problem for f in r.errors)
    assert any(f.code == "state-update" and "count" in f.problem for f in r.warnings)
    assert isinstance(m.bn, nn.BatchNorm1d)  # privatize's rewrite works on a copy


def test_dynamic_option_runs_the_verifier():
    r = fxdp.check(Centered(), torch.randn(4, 4), dynamic=True, ignore=["batch-reduction"])
    assert not r.ok and [f.code for f in r.errors] == ["verify"]
    assert "dynamic check" in r.errors[0].problem and "failed" in r.errors[0].problem
    r = fxdp.check(Clean(), torch.randn(4, 4), dynamic=True)
    assert r.ok and [f.code for f in r.infos] == ["verify"]


def test_refused_rewrite_is_an_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m[1].requires_grad_(False)
    r = fxdp.check(m, torch.randn(4, 4), rewrite_options={"batchnorm": "off"})
    assert not r.ok and [f.code for f in r.errors] == ["batch-norm"] and r.errors[0].module == "1"
    assert [f.code for f in r.infos] == ["privatize"]  # privatize's refusal, about the same module
