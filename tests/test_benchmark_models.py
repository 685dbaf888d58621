"""The benchmark models (benchmarks/models.py): published sizes, and book-keeping
clipped sums equal materialized clipped sums on each of them (no timings here)."""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch

import fxdp
from oracle import bk_clipped_sums

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "models.py")
_spec = importlib.util.spec_from_file_location("fxdp_bench_models", _PATH)
M = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, M)
_spec.loader.exec_module(M)

# Fast-DPSGD suite (Subramani et al. 2021) as used by the Opacus paper
EXPECTED = {"mnist": 26_010, "cifar10": 605_226, "embedding": 160_098, "lstm": 1_081_402}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts(name):
    model = M.MODELS[name].build()
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name] == M.MODELS[name].num_params


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_shapes(name):
    torch.manual_seed(0)
    x, _ = _batch(name, 3, torch.Generator().manual_seed(0))
    out = M.MODELS[name].build()(x)
    assert out.shape == (3, 2 if name in ("embedding", "lstm") else 10)


def _batch(name, B, g):
    if name in ("embedding", "lstm"):  # short sequences keep the float64 check fast
        return torch.randint(0, M.VOCAB, (B, 7), generator=g), torch.randint(0, 2, (B,), generator=g)
    if name == "cifar10":  # same layers on 16x16 maps (the net ends in a spatial mean)
        return torch.randn(B, 3, 16, 16, generator=g), torch.randint(0, 10, (B,), generator=g)
    return M.MODELS[name].batch(B, g)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bk_clipped_sums_equal_materialized(name):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = M.MODELS[name].build()
        x, y = _batch(name, 3, torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dpm = fxdp.privatize(model)
            dpb = fxdp.privatize(copy.deepcopy(model), grad_sample_mode="bk")
        C = 0.05  # small enough that every sample is clipped
        torch.nn.functional.cross_entropy(dpm(x), y).backward()
        params = [p for p in dpm.parameters() if p.requires_grad]
        gs = [p.grad_sample for p in params]
        total = torch.stack([g.flatten(1).norm(dim=1) for g in gs], 1).norm(dim=1)
        fac = (C / (total + 1e-6)).clamp(max=1)
        assert (fac < 1).all()
        expected = [torch.einsum("b,b...->...", fac, g) for g in gs]

        sums = bk_clipped_sums(dpb, lambda: torch.nn.functional.cross_entropy(dpb(x), y).backward(), C)
        pb = [p for p in dpb.parameters() if p.requires_grad]
        assert len(pb) == len(expected)
        for p, e in zip(pb, expected):
            assert p.grad is None
            torch.testing.assert_close(sums[id(p)], e, rtol=1e-9, atol=1e-12)
    finally:
        torch.set_default_dtype(prev)


def _bench_models():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_models.py")
    spec = importlib.util.spec_from_file_location("fxdp_bench_models_runner", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_memory_counts_the_noise_buffer_fxdp_keeps_between_steps():
    """The flat noise buffer holds the gradients non-private training allocates in each
    step, so the benchmark counts it in fxdp's step peak, not in the state before it."""
    bench = _bench_models()
    torch.manual_seed(0)
    x, y = _batch("mnist", 4, torch.Generator().manual_seed(0))
    v = bench.build_variant("fxdp_bk", M.MODELS["mnist"].build(), x, y)
    assert v.held() == 0  # nothing drawn yet
    v.step()
    n = len(list(M.MODELS["mnist"].build().parameters()))  # float32 noise for every parameter, each
    assert 4 * EXPECTED["mnist"] <= v.held() < 4 * (EXPECTED["mnist"] + 16 * n)  # slice aligned to 16
    assert bench.build_variant("nonprivate", M.MODELS["mnist"].build(), x, y).held() == 0
    if os.path.exists("/proc/self/clear_refs"):  # a step that allocates nothing still adds what is held
        peak = bench.peak_step_memory(lambda: None, lambda: None, lambda: 64 << 20)
        assert peak is None or peak >= 64.0


def test_short_step_cells_are_timed_in_several_processes_and_their_medians_reported(monkeypatch):
    """Short steps differ from process to process by more than a round's spread, so such a
    cell is timed in several fresh processes and reports the medians over them, and each
    process's ratio; a cell of long steps (one step a round) is timed once."""
    bench = _bench_models()
    runs = iter([
        {"times": {"nonprivate": [1.0, 1.0, 1.0], "fxdp_bk": [1.2, 1.4, 1.3], "opacus_hooks": [2.0, 2.0, 2.0]},
         "errors": {"opacus_ghost": "RuntimeError: x"}, "rules": {"fxdp_bk": "conv"}, "rounds": 3,
         "steps_per_round": 7},
        {"times": {"nonprivate": [2.0, 2.0, 2.0], "fxdp_bk": [3.2, 3.0, 3.2], "opacus_hooks": [4.4, 4.4, 4.4]},
         "errors": {"opacus_ghost": "RuntimeError: x"}, "rules": {}, "rounds": 3, "steps_per_round": 7},
        {"times": {"nonprivate": [1.0, 1.0, 1.0], "fxdp_bk": [1.1, 1.1, 1.1], "opacus_hooks": [3.0, 3.0, 3.0]},
         "errors": {"opacus_ghost": "RuntimeError: x", "fxdp_materialize": "MemoryError: y"}, "rules": {},
         "rounds": 3, "steps_per_round": 7},
    ])
    monkeypatch.setattr(bench, "run_child", lambda script, args: next(runs))
    variants = ["nonprivate", "fxdp_bk", "opacus_hooks", "opacus_ghost", "fxdp_materialize"]
    cell = bench.run_cell("mnist", 8, variants, 3, 1, 1.0, memory=False, burst_ms=25.0, processes=3)
    bk = cell["variants"]["fxdp_bk"]
    assert cell["processes"] == 3 and cell["opacus_fastest"] == "opacus_hooks"
    assert bk["x_nonprivate_runs"] == pytest.approx([1.3, 1.6, 1.1])
    assert bk["x_nonprivate"] == pytest.approx(1.3) and bk["ms"] == pytest.approx(1300.0)
    assert bk["x_opacus_fastest"] == pytest.approx(1.3 / 2.0) and bk["rules"] == "conv"  # runs: .65, .73, .37
    assert cell["variants"]["opacus_ghost"] == {"error": "RuntimeError: x"}
    assert cell["variants"]["fxdp_materialize"] == {"error": "MemoryError: y"}  # failed in one process only
    assert "1.30xNP (1.10-1.60)" in bench.markdown({"cells": {"mnist/8": cell}})

    long_steps = {"times": {"nonprivate": [1.0] * 3, "fxdp_bk": [1.2] * 3}, "errors": {}, "rules": {},
                  "rounds": 3, "steps_per_round": 1}
    calls = []
    monkeypatch.setattr(bench, "run_child", lambda script, args: calls.append(args) or long_steps)
    cell = bench.run_cell("mnist", 8, ["nonprivate", "fxdp_bk"], 3, 1, 1.0, memory=False, processes=3)
    assert len(calls) == 1 and cell["processes"] == 1 and cell["variants"]["fxdp_bk"]["x_nonprivate"] == 1.2


def _load_script(name):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", name)
    spec = importlib.util.spec_from_file_location(f"fxdp_bench_{name[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_step_applies_each_variants_overrides_to_its_own_steps_only():
    """``benchmarks/ab_step.py``: a variant's overrides hold while its copy is privatized and
    while its steps run (an override that raises fails the run), never for the other
    variants, and are undone after, also after an error; a misspelt attribute is refused."""
    from fxdp.rules import conv

    ab = _load_script("ab_step.py")
    base = ["--model", "mnist", "--batch-size", "4", "--rounds", "2", "--warmup", "1"]
    out = ab.main(base + ["--variant", "a", "--variant", "b", "fxdp.rules.conv:_ConvMath.keep_ratio=3.0"])
    assert set(out["variants"]) == {"non-private", "a", "b"} and out["variants"]["a"]["vs_first"] == 1.0
    assert vars(conv._ConvMath)["keep_ratio"] == 2.0
    model, loss_of = ab.build("mnist", 4, 0, 0)
    plain = ab.stepper(model, loss_of, 4, [])
    raising = ab.stepper(model, loss_of, 4, [ab.parse_override(
        "fxdp.rules.conv:_ConvMath.keeps_patch_rows=lambda self, geo, gout: 1 / 0")])
    plain()
    with pytest.raises(ZeroDivisionError):  # MNIST's second layer asks it at every step
        raising()
    plain()  # undone after the error
    assert conv._ConvMath.keeps_patch_rows.__name__ == "keeps_patch_rows"
    with pytest.raises(AttributeError, match="no attribute 'keep_ratoi'"):
        ab.parse_override("fxdp.rules.conv:_ConvMath.keep_ratoi=3.0")


def test_the_targets_figure_reads_every_saved_cell():
    """``plot_targets.py`` finds every row of the saved tables it plots (its reader of
    ``bench_vision.py``'s markdown included) and judges each against its target."""
    spec = importlib.util.spec_from_file_location(
        "fxdp_plot_targets", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "plot_targets.py"))
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    res = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "results")
    vision = P.vision_cells(os.path.join(res, "vision_steps.md"))
    assert len(vision) == 6 and all(c.time and c.memory for c in vision)
    vit = next(c for c in vision if "vit" in c.label)
    assert vit.time_target == 1.3 and next(c for c in vision if "resnet18" in c.label).time_target == 1.5
    models = P.models_cells(os.path.join(res, "models.json"))
    assert {c.label.split(",")[0] for c in models} == {"MNIST CNN", "CIFAR-10 CNN", "IMDb embedding", "IMDb LSTM"}
    assert [c.time_target for c in models if c.label == "IMDb embedding, B=32"] == [None]  # from B = 128
    assert all(c.time is not None and c.memory_met is not None for c in models)
    assert len(P.zoo_cells(os.path.join(res, "zoo_t128.json"))) == 7
