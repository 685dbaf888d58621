"""End-to-end DP-SGD step benchmark on the Fast-DPSGD models (see ``models.py``).

For each model and batch size, every variant trains on the same synthetic batch
in the same process:

* ``nonprivate``: plain PyTorch (``loss.backward()`` + ``SGD.step()``), the floor;
* ``fxdp_materialize``: ``fxdp.privatize(model)`` + ``fxdp.optim.DPOptimizer``
  (per-sample gradients ``p.grad_sample``, then clip + noise);
* ``fxdp_bk``: ``fxdp.privatize(model, grad_sample_mode="bk")`` + ``DPOptimizer``
  with ``attach_bookkeeping`` (book-keeping, Bu et al. 2023);
* ``opacus_hooks`` / ``opacus_ghost`` (when opacus is installed): what
  ``PrivacyEngine.make_private`` builds with ``grad_sample_mode="hooks"`` (the
  default) and ``"ghost"`` (ghost clipping, two backward passes, with the loss
  wrapper it returns). Opacus needs ``opacus.layers.DPLSTM`` for an LSTM; it gets
  one with the same weights.

A step is ``zero_grad``, forward, cross-entropy, backward, ``optimizer.step()``
(clip, noise, update), all DP work included. Method (the machines are noisy):

* variants run interleaved round-robin, the starting variant rotating from round
  to round, after ``--warmup`` steps each (fxdp's: at least ``WARMUP_STEPS``, past
  the noise buffer's keep decision, so no probe step is timed); in a round each
  variant runs ``n`` consecutive steps (its time: their mean), ``n`` set per cell
  so that the non-private steps last about ``--burst-ms`` (25 ms; ``n`` = 1 from
  there on, at most 20), after one untimed step when ``n`` > 1, so that a short step is timed
  after its own previous step, as in a training loop, and not with caches another
  variant emptied;
* per round the ratio of each variant to ``nonprivate`` and to Opacus' fastest
  mode (the Opacus variant with the lower median in that cell) is formed, and the
  report gives the *median of per-round ratios* (robust to load drifting over
  minutes) beside the median ms per step;
* each cell is timed in a fresh process, and a cell of short steps (``n`` > 1) in
  ``--processes`` (3) fresh processes: its ratios differ from process to process by
  more than from round to round; the figures are the medians over the processes, and
  the table gives the processes' range of ``xNP``;
* peak memory: the peak resident memory one step adds above the model, optimizer
  state and data, each cell and variant measured alone in a child process (method in
  ``_memory.py``); fxdp's flat noise buffer, kept between steps, counts as the step's.

Results are merged into ``results/models.json`` (one entry per model and batch
size, so models can be run separately) and ``results/models.md`` is regenerated.

Usage::

    python benchmarks/bench_models.py --model mnist            # 32, 128, 512
    python benchmarks/bench_models.py --model lstm --batch-sizes 32 128
    python benchmarks/bench_models.py --model mnist --large    # adds 1024, 2048
    python benchmarks/bench_models.py --quick                  # smoke run, not saved
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: import fxdp from the checkout

import fxdp  # noqa: E402
from fxdp.optim import DPOptimizer  # noqa: E402


def load_models():
    """``benchmarks/models.py`` by path (a site-packages ``benchmarks`` may shadow the folder)."""
    spec = importlib.util.spec_from_file_location("fxdp_bench_models", os.path.join(HERE, "models.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


M = load_models()

VARIANTS = ["nonprivate", "fxdp_materialize", "fxdp_bk", "fxdp_bk_compile", "opacus_hooks", "opacus_ghost"]
#: run by default (fxdp_bk_compile: dp.compile(), torch.compile between capture ops, on request)
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "fxdp_bk_compile"]
LR = 1e-3
SIGMA = 1.0
CLIP = 1.0

try:
    import opacus  # noqa: F401

    HAVE_OPACUS = True
except ImportError:  # pragma: no cover - optional
    HAVE_OPACUS = False


# ------------------------------------------------------------------------------ memory
sys.path.insert(0, HERE)
from _memory import (  # noqa: E402
    MEM_SLACK_MIB, WARMUP_STEPS, in_child, noise_held, peak_step_memory, run_child,
)


# ------------------------------------------------------------------------------ variants
class Variant:
    """``held()``: bytes kept between steps for the steps' own use (fxdp's flat noise
    buffer, which holds the gradients non-private training allocates in each step),
    counted in the step's peak."""

    def __init__(self, name: str, step: Callable[[], None], zero: Callable[[], None], info: str = "",
                 held: Callable[[], int] = lambda: 0, min_warmup: int = 0) -> None:
        self.name, self.step, self.zero, self.info, self.held = name, step, zero, info, held
        self.min_warmup = min_warmup  # fxdp: past the noise buffer's keep decision (its first steps)


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def build_variant(name: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant:
    B = x.shape[0]
    model = copy.deepcopy(base)
    if name == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return Variant(name, step, opt.zero_grad)

    if name.startswith("fxdp_"):
        mode = "bk" if name.startswith("fxdp_bk") else name[len("fxdp_"):]
        dp = _quiet(lambda: fxdp.privatize(model, grad_sample_mode=mode))
        if name == "fxdp_bk_compile":
            dp.compile()
        opt = DPOptimizer(
            torch.optim.SGD(dp.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=B,
            generator=torch.Generator().manual_seed(1),
        )
        if mode == "bk":
            opt.attach_bookkeeping(dp.bookkeeping)
        rules = ", ".join(sorted({r["rule"] for r in dp.capture_table()}))

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(dp(x), y).backward()
            opt.step()

        return Variant(name, step, opt.zero_grad, info=rules, held=noise_held(opt), min_warmup=WARMUP_STEPS)

    if name.startswith("opacus_"):
        if not HAVE_OPACUS:
            raise RuntimeError("opacus is not installed")
        from opacus import PrivacyEngine

        mode = name[len("opacus_"):]
        if isinstance(getattr(model, "lstm", None), nn.LSTM):
            from opacus.layers import DPLSTM

            old = model.lstm
            model.lstm = DPLSTM(old.input_size, old.hidden_size, batch_first=old.batch_first)
            model.lstm.load_state_dict(old.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B)

        def make() -> Tuple[Any, ...]:
            return PrivacyEngine().make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=SIGMA,
                max_grad_norm=CLIP,
                poisson_sampling=False,  # fixed batches, expected batch size B, as fxdp here
                grad_sample_mode=mode,
                criterion=nn.CrossEntropyLoss(),
                noise_generator=torch.Generator().manual_seed(1),
            )

        out = _quiet(make)
        if mode == "ghost":
            gsm, dpopt, crit, _ = out
        else:
            (gsm, dpopt, _), crit = out, nn.CrossEntropyLoss()

        def step() -> None:
            dpopt.zero_grad()
            crit(gsm(x), y).backward()
            dpopt.step()

        return Variant(name, step, dpopt.zero_grad)
    raise ValueError(f"unknown variant {name!r}")


# ------------------------------------------------------------------------------ one cell
def steps_per_round(live: List[Variant], burst_ms: float) -> int:
    """Consecutive timed steps each variant runs in a round: enough for the non-private
    ones to last ``burst_ms`` (at most 20), so that a short step is timed as in a training
    loop, after its own previous step, not cold after another variant's (a 3 ms embedding
    step after a 100 ms one that swept 160 MB ran 1.3x (non-private) to 1.6x (book-keeping)
    slower). With ``n > 1`` each turn also starts with one untimed step."""
    base = next((v for v in live if v.name == "nonprivate"), live[0] if live else None)
    if base is None or burst_ms <= 0:
        return 1
    t = time.perf_counter()
    base.step()
    ms = 1e3 * (time.perf_counter() - t)
    return max(1, min(20, round(burst_ms / max(ms, 1e-3))))


def time_cell(model_name: str, B: int, variants: List[str], rounds: int, warmup: int, cell_seconds: float,
              burst_ms: float = 0.0) -> Dict[str, Any]:
    """One process's timing of a cell: every variant built, warmed up and run interleaved;
    per variant its step times (s), or the error that kept it from running."""
    spec = M.MODELS[model_name]
    torch.manual_seed(0)
    base = spec.build()
    x, y = spec.batch(B, torch.Generator().manual_seed(0))
    out: Dict[str, Any] = {"times": {}, "errors": {}, "rules": {}}
    live: List[Variant] = []
    for name in variants:
        try:
            v = build_variant(name, base, x, y)
            for _ in range(max(warmup, v.min_warmup)):  # timed steps are the steady state's
                v.step()
            live.append(v)
            if v.info:
                out["rules"][name] = v.info
        except Exception as e:  # a miss is a result: report it
            out["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc(limit=2)
    times: Dict[str, List[float]] = {v.name: [] for v in live}
    n = steps_per_round(live, burst_ms)
    t0 = time.perf_counter()
    r = 0
    while r < rounds and live:
        order = live[r % len(live):] + live[: r % len(live)]
        for v in order:
            gc.collect()
            if n > 1:  # short steps: the turn's first step refills what the last variant's turn evicted
                v.step()
            t = time.perf_counter()
            for _ in range(n):
                v.step()
            times[v.name].append((time.perf_counter() - t) / n)
        r += 1
        if r >= 3 and time.perf_counter() - t0 > cell_seconds:
            break
    out.update(times=times, rounds=r, steps_per_round=n)
    return out


def _ratios(times: Dict[str, List[float]], of: str) -> Dict[str, float]:
    """Each variant's median of per-round ratios to variant ``of``."""
    return {k: statistics.median(a / b for a, b in zip(ts, times[of])) for k, ts in times.items()}


def run_cell(
    model_name: str, B: int, variants: List[str], rounds: int, warmup: int, cell_seconds: float, memory: bool,
    burst_ms: float = 0.0, processes: int = 1,
) -> Dict[str, Any]:
    """A cell timed in fresh processes: one, and ``processes`` in all when the steps are
    short (bursts of several steps), whose ratios differ from process to process by more
    than a round's spread (the embedding net at B = 128: 1.23-1.41x over six processes;
    glibc's heap, and the page faults it costs, differ); the figures are the medians over
    the processes, each process's ratios reported too."""
    args = ["--timing-child", model_name, str(B), "--variants", *variants, "--rounds", str(rounds),
            "--warmup", str(warmup), "--cell-seconds", str(cell_seconds), "--burst-ms", str(burst_ms),
            "--threads", str(torch.get_num_threads())]
    runs = [run_child(__file__, args)]
    if runs[0]["steps_per_round"] > 1:
        runs += [run_child(__file__, args) for _ in range(processes - 1)]
    first = runs[0]
    cell: Dict[str, Any] = {"model": model_name, "batch_size": B, "variants": {}, "processes": len(runs),
                            "rounds": first["rounds"], "steps_per_round": first["steps_per_round"]}
    for name in variants:
        e: Dict[str, Any] = {}
        cell["variants"][name] = e
        errors = [r["errors"][name] for r in runs if name in r["errors"]]
        if errors:  # failed in any process: reported, not timed
            e["error"] = errors[0]
        if name in first["rules"]:
            e["rules"] = first["rules"][name]
    live = [n for n in variants if all(n in r["times"] and r["times"][n] for r in runs)]
    modes = [n for n in ("opacus_hooks", "opacus_ghost") if n in live]
    best = min(modes, key=lambda n: statistics.median(
        statistics.median(r["times"][n]) for r in runs)) if modes else None
    cell["opacus_fastest"] = best
    per_run = [(_ratios(r["times"], "nonprivate") if "nonprivate" in live else {},
                _ratios(r["times"], best) if best else {}) for r in runs]
    for name in live:
        e = cell["variants"][name]
        ms = [1e3 * statistics.median(r["times"][name]) for r in runs]
        e["ms"] = statistics.median(ms)
        e["ms_min"] = 1e3 * min(min(r["times"][name]) for r in runs)
        e["times_ms"] = [[round(1e3 * t, 3) for t in r["times"][name]] for r in runs]  # per process
        if per_run[0][0]:
            e["x_nonprivate_runs"] = [x[name] for x, _ in per_run]
            e["x_nonprivate"] = statistics.median(e["x_nonprivate_runs"])
        if best is not None:
            e["x_opacus_fastest_runs"] = [x[name] for _, x in per_run]
            e["x_opacus_fastest"] = statistics.median(e["x_opacus_fastest_runs"])
    if memory:
        peaks = memory_cell(model_name, B, live, threads=torch.get_num_threads())
        for name, peak in peaks.items():
            cell["variants"][name]["peak_mib"] = peak
    return cell


def memory_cell(model_name: str, B: int, variants: List[str], threads: int) -> Dict[str, Optional[float]]:
    """Peak step memory of each variant, each measured alone in a child process
    (variants sharing a process disturbed each other's figures by up to 2x)."""
    res: Dict[str, Optional[float]] = {}
    for v in variants:
        try:
            res.update(in_child(__file__, ["--memory-child", model_name, str(B), "--threads", str(threads),
                                           "--variants", v]))
        except Exception as e:  # a miss is reported, not hidden
            print(f"memory measurement failed for {model_name} B={B} {v}: {e}", file=sys.stderr)
            res[v] = None
    return res


def _memory_child(model_name: str, B: int, variants: List[str]) -> None:
    spec = M.MODELS[model_name]
    torch.manual_seed(0)
    base = spec.build()
    x, y = spec.batch(B, torch.Generator().manual_seed(0))
    built = []
    for name in variants:
        v = build_variant(name, base, x, y)
        v.step()
        built.append(v)
    out: Dict[str, Optional[float]] = {}
    for v in built:
        for _ in range(WARMUP_STEPS - 1):
            v.step()
        out[v.name] = peak_step_memory(v.step, v.zero, v.held)
    print(json.dumps(out))


# ------------------------------------------------------------------------------ report
def _fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


TARGETS = {"mnist": 1.5, "cifar10": 1.5, "embedding": 1.2, "lstm": 3.0}
_TITLES = {"nonprivate": "non-private", "fxdp_materialize": "fxdp materialize", "fxdp_bk": "fxdp bk",
           "fxdp_bk_compile": "fxdp bk, compiled", "opacus_hooks": "Opacus hooks", "opacus_ghost": "Opacus ghost"}


def markdown(data: Dict[str, Any]) -> str:
    meta = data.get("meta", {})
    lines = [
        "# fxdp vs non-private PyTorch vs Opacus: ms per DP-SGD step",
        "",
        f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}, opacus {meta.get('opacus', '—')}, "
        f"{meta.get('threads', '?')} intra-op thread(s). Generated by `benchmarks/bench_models.py` "
        "(method in `benchmarks/README.md`).",
        "",
        "Each cell: median ms per step / median of per-round ratios to non-private (`xNP`) and to Opacus' "
        "fastest mode in that row (`xOp`) / peak MiB the step adds above the model and optimizer state "
        "(fxdp's flat noise buffer, kept between steps, counted as the step's). `rounds × n`: n consecutive steps "
        "of each variant per round (short steps); `p × rounds × n`: short steps timed in p fresh processes, "
        "the figures their medians, `(lo-hi)` the processes' range of xNP. "
        "`fxdp bk` targets (issue 13): ≤ 1.5x NP (CNNs), ≤ 1.2x (embedding), ≤ 3x (LSTM) from B = 128; "
        "≤ 0.67x Opacus' fastest (1.5x faster); peak memory ≤ 1.3x NP, and ≤ Opacus'.",
        "",
    ]
    order = {k: i for i, k in enumerate(M.MODELS)}
    cells = sorted(data["cells"].values(), key=lambda c: (order.get(c["model"], 99), c["batch_size"]))
    shown = [v for v in VARIANTS if any(v in c["variants"] for c in cells)]  # columns some cell has
    lines += ["| model | B | rounds | " + " | ".join(_TITLES[v] for v in shown) + " | bk target |",
              "|---|---|---|" + "---|" * len(shown) + "---|"]
    for c in cells:
        n, procs = c.get("steps_per_round", 1), c.get("processes", 1)
        rounds = (f"{procs} × " if procs > 1 else "") + str(c.get("rounds", "—")) + (f" × {n}" if n > 1 else "")
        row = [M.MODELS[c["model"]].title, str(c["batch_size"]), rounds]
        for name in shown:
            e = c["variants"].get(name)
            if e is None:
                row.append("not run")
            elif "error" in e:
                row.append(f"**miss**: {e['error'][:80]}")
            else:
                s = f"{_fmt(e.get('ms'), '.1f')} ms"
                if name != "nonprivate":
                    s += f" / {_fmt(e.get('x_nonprivate'), '.2f')}xNP"
                    runs = e.get("x_nonprivate_runs") or []
                    if len(runs) > 1:  # the spread over the processes
                        s += f" ({min(runs):.2f}-{max(runs):.2f})"
                if e.get("x_opacus_fastest") is not None and not name.startswith("opacus"):
                    s += f" / {_fmt(e.get('x_opacus_fastest'), '.2f')}xOp"
                s += f" / {_fmt(e.get('peak_mib'), '.1f')} MiB"
                if c.get("opacus_fastest") == name:
                    s = f"*{s}*"
                row.append(s)
        row.append(_verdict(c))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "*italic*: Opacus' fastest mode in that row. `—`: not measured."]
    return "\n".join(lines) + "\n"


def _verdict(c: Dict[str, Any]) -> str:
    e = c["variants"].get("fxdp_bk")
    if e is None or "ms" not in e:
        return "miss (no bk result)"
    parts = []
    t = TARGETS[c["model"]]
    r = e.get("x_nonprivate")
    parts.append(("met" if r is not None and r <= t else "MISSED") + f" ≤{t}xNP")
    op = e.get("x_opacus_fastest")
    if op is not None:  # issue 13: faster than Opacus' fastest mode by at least 1.5x
        parts.append(("met" if op <= 1 / 1.5 else "MISSED") + " ≤0.67xOp")
    base = c["variants"].get("nonprivate", {}).get("peak_mib")
    if base and e.get("peak_mib") is not None:  # issue 13: peak memory <= 1.3x non-private
        parts.append(("met" if e["peak_mib"] <= 1.3 * base + MEM_SLACK_MIB else "MISSED") + f" mem ≤1.3xNP "
                     f"({e['peak_mib'] / base:.2f}x)")
    best = c.get("opacus_fastest")
    if best and e.get("peak_mib") is not None and c["variants"][best].get("peak_mib") is not None:
        ok = e["peak_mib"] <= c["variants"][best]["peak_mib"] + MEM_SLACK_MIB
        parts.append(("met" if ok else "MISSED") + " mem")
    return ", ".join(parts)


def _write(data: Dict[str, Any], out: str) -> None:
    """``out`` (JSON) and ``models.md`` beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(os.path.dirname(os.path.abspath(out)), "models.md"), "w") as f:
        f.write(markdown(data))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", choices=list(M.MODELS), default=list(M.MODELS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 32 128 512")
    ap.add_argument("--large", action="store_true", help="also batch sizes 1024 and 2048")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS)
    ap.add_argument("--rounds", type=int, default=15, help="max interleaved rounds per cell")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--burst-ms", type=float, default=25.0,
                    help="each round, each variant runs consecutive steps lasting about this long in the "
                    "non-private variant (at most 20 steps; 0: one step)")
    ap.add_argument("--cell-seconds", type=float, default=90.0,
                    help="stop a process's timing of a cell after this long (>= 3 rounds)")
    ap.add_argument("--processes", type=int, default=3,
                    help="fresh processes timing each cell of short steps (bursts; see run_cell); 1 otherwise")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see README: why 1)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: B=8, 3 rounds, not saved")
    ap.add_argument("--out", default=os.path.join(RESULTS, "models.json"))
    ap.add_argument("--memory-only", action="store_true",
                    help="re-measure the peak memory of the cells in --out (of --model, --variants)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the cells of these result files into --out "
                    "(rewriting models.md) and exit")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "B"), help=argparse.SUPPRESS)
    ap.add_argument("--timing-child", nargs=2, metavar=("MODEL", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus ghost, harmless
    if args.memory_child:
        _memory_child(args.memory_child[0], int(args.memory_child[1]), args.variants)
        return
    if args.timing_child:
        print(json.dumps(time_cell(args.timing_child[0], int(args.timing_child[1]), args.variants, args.rounds,
                                   args.warmup, args.cell_seconds, args.burst_ms)))
        return
    if args.memory_only:  # re-measure peak memory of the cells already in --out
        with open(args.out) as f:
            data = json.load(f)
        for key, cell in data["cells"].items():
            if cell["model"] not in args.model:
                continue
            names = [n for n, e in cell["variants"].items() if "ms" in e and n in args.variants]
            for name, peak in memory_cell(cell["model"], cell["batch_size"], names, args.threads).items():
                cell["variants"][name]["peak_mib"] = peak
            print(key, {n: cell["variants"][n].get("peak_mib") for n in names}, flush=True)
            _write(data, args.out)
        return
    if args.merge:
        with open(args.out) as f:
            data = json.load(f)
        for path in args.merge:
            with open(path) as f:
                data["cells"].update(json.load(f)["cells"])
        _write(data, args.out)
        return
    sizes = args.batch_sizes or ([8] if args.quick else [32, 128, 512])
    if args.large:
        sizes = sorted(set(sizes) | {1024, 2048})
    variants = [v for v in args.variants if HAVE_OPACUS or not v.startswith("opacus")]
    rounds, warmup, processes = (3, 1, 1) if args.quick else (args.rounds, args.warmup, args.processes)

    data: Dict[str, Any] = {"cells": {}}
    if not args.quick and os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
    data["meta"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__ if HAVE_OPACUS else None,
        "threads": args.threads,
    }
    for name in args.model:
        for B in sizes:
            t = time.perf_counter()
            cell = run_cell(name, B, variants, rounds, warmup, args.cell_seconds, not args.no_memory,
                            args.burst_ms, processes)
            cell["load_avg"] = os.getloadavg()[0]
            cell["date"] = time.strftime("%Y-%m-%d %H:%M")
            data["cells"][f"{name}/{B}"] = cell
            brief = ", ".join(
                f"{k}={v['ms']:.1f}ms x{v.get('x_nonprivate', float('nan')):.2f}" if "ms" in v else f"{k}=miss"
                for k, v in cell["variants"].items()
            )
            print(f"{name} B={B} ({cell['processes']} x {cell['rounds']} rounds, {time.perf_counter() - t:.0f}s): "
                  f"{brief}", flush=True)
            if not args.quick:
                _write(data, args.out)
    if args.quick:
        print(markdown(data))


if __name__ == "__main__":
    main()
