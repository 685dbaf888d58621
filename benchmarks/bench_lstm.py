"""Training-step time of fxdp's DP LSTM relative to a non-private ``nn.LSTM`` (CPU).

One step = forward + cross-entropy loss + backward (+ per-sample gradients for
the private models; no clipping or noise). Model: ``LSTM(H, H, batch_first=True)``
and a ``Linear(H, 10)`` head on ``h_n[-1]``, float32. Three variants run
round-robin (the order rotates every round) so that machine load hits all of
them alike; the table reports medians over rounds of the per-round ratios:

* ``nn.LSTM``: the plain model (oneDNN's fused LSTM on CPU);
* ``fxdp``: ``fxdp.privatize(model)`` (the rewrite to ``DPLSTM``; ``p.grad_sample``);
* ``opacus``: ``opacus.GradSampleModule`` around the same model built with
  ``opacus.layers.DPLSTM`` (only when opacus is installed; skipped for a
  configuration whose first step exceeds ``--opacus-cap`` seconds).

Usage::

    python benchmarks/bench_lstm.py            # B in {32,64,256} x T in {20,100} x H in {128,512}
    python benchmarks/bench_lstm.py --quick    # a small subset
    python benchmarks/bench_lstm.py --threads 1 --budget 600

Configurations run from the cheapest up; those left when ``--budget`` seconds are
spent are listed as not run. The table is printed and written to
``benchmarks/results/lstm.md``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import platform
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fxdp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import interleaved, make_step  # noqa: E402

FULL = [(B, T, H) for H, T, B in itertools.product((128, 512), (20, 100), (32, 64, 256))]
QUICK = [(32, 20, 128), (64, 20, 128), (32, 100, 128)]


class Classifier(nn.Module):
    def __init__(self, H: int, lstm_cls=nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm_cls(H, H, batch_first=True)
        self.head = nn.Linear(H, 10)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def opacus_model(H: int) -> Optional[nn.Module]:
    try:
        from opacus import GradSampleModule
        from opacus.layers import DPLSTM
    except ImportError:
        return None
    return GradSampleModule(Classifier(H, DPLSTM))


def bench(B: int, T: int, H: int, rounds: int, use_opacus: bool, opacus_cap: float,
          opacus_ratio: Optional[float] = None) -> Dict[str, object]:
    torch.manual_seed(0)
    model = Classifier(H)
    x, y = torch.randn(B, T, H), torch.randint(0, 10, (B,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = fxdp.privatize(copy.deepcopy(model))
    steps = {"nn.LSTM": make_step(model, x, y), "fxdp": make_step(dp, x, y)}
    note = ""
    first = {k: s() for k, s in steps.items()}  # warm-up (fxdp: batch-dimension analysis)
    if use_opacus:
        om = opacus_model(H)
        predicted = first["nn.LSTM"] * (opacus_ratio or 0.0)  # from the previous configuration
        if om is None:
            note = "opacus not installed"
        elif predicted > opacus_cap:
            note = f"opacus skipped: predicted step {predicted:.0f}s > --opacus-cap {opacus_cap:.0f}s"
        else:
            steps["opacus"] = make_step(om, x, y)
            first["opacus"] = steps["opacus"]()
            if first["opacus"] > opacus_cap:
                note = f"opacus skipped: first step {first['opacus']:.0f}s > --opacus-cap {opacus_cap:.0f}s"
                del steps["opacus"]
    row: Dict[str, object] = {"B": B, "T": T, "H": H, "rounds": rounds, "note": note}
    row.update(interleaved(steps, rounds, base="nn.LSTM"))
    return row


def table(rows: List[Dict[str, object]], skipped: List[tuple]) -> str:
    lines = [
        "| B | T | H | nn.LSTM step (s) | fxdp step (s) | fxdp / nn.LSTM | opacus step (s) | opacus / nn.LSTM | rounds | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op = (f"{r['opacus']:.3f}", f"**{r['opacus_ratio']:.2f}x**") if "opacus" in r else ("-", "-")
        lines.append(f"| {r['B']} | {r['T']} | {r['H']} | {r['nn.LSTM']:.3f} | {r['fxdp']:.3f} | "
                     f"**{r['fxdp_ratio']:.2f}x** | {op[0]} | {op[1]} | {r['rounds']} | {r['note']} |")
    for B, T, H in skipped:
        lines.append(f"| {B} | {T} | {H} | - | - | - | - | - | 0 | not run: --budget spent |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset of configurations")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration (fewer for big ones)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds; later configurations are skipped")
    ap.add_argument("--opacus-cap", type=float, default=30.0, help="skip opacus where its first step is slower")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lstm.md"))
    args = ap.parse_args(argv)
    # opacus' GradSampleModule hooks warn on every step when the input needs no gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = sorted(QUICK if args.quick else FULL, key=lambda c: c[0] * c[1] * c[2] * c[2])
    start = time.perf_counter()
    rows: List[Dict[str, object]] = []
    skipped: List[tuple] = []
    for B, T, H in configs:
        spent = time.perf_counter() - start
        if spent > args.budget:
            skipped.append((B, T, H))
            continue
        # big configurations get fewer rounds (at least 3)
        rounds = args.rounds if B * T * H * H <= 64 * 100 * 128 * 128 else max(3, args.rounds // 2)
        ratio = next((r["opacus_ratio"] for r in reversed(rows) if "opacus_ratio" in r), None)
        row = bench(B, T, H, rounds, not args.no_opacus, args.opacus_cap, ratio)
        rows.append(row)
        print(table([row], []).splitlines()[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"LSTM training step (forward + backward + per-sample gradients), CPU, float32; median of per-round "
        f"ratios.\n\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), "
        f"{platform.processor() or platform.machine()}, load average {load:.1f} at the end; "
        f"{datetime.date.today()}; `python benchmarks/bench_lstm.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f" ({time.perf_counter() - start:.0f} s)\n"
    )
    text = header + "\n" + table(rows, skipped) + "\n"
    print()
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
