"""Training-step time of fxdp's DP attention relative to a non-private ``nn.MultiheadAttention`` (CPU).

One step = forward + cross-entropy loss + backward (+ per-sample gradients for
the private models; no clipping or noise, as in ``bench_lstm.py``). Model:
self-attention ``MultiheadAttention(E, 8, batch_first=True)``, mean over the
sequence, ``Linear(E, 10)`` head; float32. Three variants run round-robin (the
order rotates every round) so that machine load hits all of them alike; the
table reports medians over rounds of the per-round ratios:

* ``nn.MHA``: the plain model (``need_weights=False``: PyTorch's
  ``scaled_dot_product_attention`` path; training mode, so no fused inference path);
* ``fxdp``: ``fxdp.privatize(model)`` (the rewrite to ``DPMultiheadAttention``;
  ``p.grad_sample`` for the packed in-projection, the out-projection and the head);
* ``opacus``: ``opacus.GradSampleModule`` around the same model built with
  ``opacus.layers.DPMultiheadAttention`` (only when opacus is installed; skipped
  for a configuration whose first step exceeds ``--opacus-cap`` seconds).

Usage::

    python benchmarks/bench_attention.py            # B in {32,64,256} x T in {20,100} x E in {128,512}
    python benchmarks/bench_attention.py --quick    # a small subset
    python benchmarks/bench_attention.py --threads 2 --budget 900

Configurations run from the cheapest up; those left when ``--budget`` seconds are
spent are listed as not run. The table is printed and written to
``benchmarks/results/attention.md``.
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

HEADS = 8
FULL = [(B, T, E) for E, T, B in itertools.product((128, 512), (20, 100), (32, 64, 256))]
QUICK = [(32, 20, 128), (64, 100, 128), (32, 20, 512)]
TARGET = 1.5  # fxdp / nn.MultiheadAttention


class Classifier(nn.Module):
    def __init__(self, E: int, attn_cls=nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn_cls(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, 10)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(1))


def opacus_model(E: int) -> Optional[nn.Module]:
    try:
        from opacus import GradSampleModule
        from opacus.layers import DPMultiheadAttention
    except ImportError:
        return None
    return GradSampleModule(Classifier(E, DPMultiheadAttention))


def bench(B: int, T: int, E: int, rounds: int, use_opacus: bool, opacus_cap: float) -> Dict[str, object]:
    torch.manual_seed(0)
    model = Classifier(E)
    x, y = torch.randn(B, T, E), torch.randint(0, 10, (B,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = fxdp.privatize(copy.deepcopy(model))
    assert type(dp.attn).__name__ == "DPMultiheadAttention"
    steps = {"nn.MHA": make_step(model, x, y), "fxdp": make_step(dp, x, y)}
    note = ""
    if use_opacus:
        om = opacus_model(E)
        if om is None:
            note = "opacus not installed"
        else:
            steps["opacus"] = make_step(om, x, y)
    first = {k: s() for k, s in steps.items()}  # warm-up (fxdp: batch-dimension analysis)
    if "opacus" in steps and first["opacus"] > opacus_cap:
        note = f"opacus skipped: first step {first['opacus']:.0f}s > --opacus-cap {opacus_cap:.0f}s"
        del steps["opacus"]
    row: Dict[str, object] = {"B": B, "T": T, "E": E, "rounds": rounds, "note": note}
    row.update(interleaved(steps, rounds, base="nn.MHA"))
    return row


def table(rows: List[Dict[str, object]], skipped: List[tuple]) -> str:
    lines = [
        ("| B | T | E | nn.MHA step (s) | fxdp step (s) | fxdp / nn.MHA | opacus step (s) | opacus / nn.MHA "
         "| rounds | note |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op = (f"{r['opacus']:.4f}", f"{r['opacus_ratio']:.2f}x") if "opacus" in r else ("-", "-")
        miss = "" if r["fxdp_ratio"] <= TARGET else f" (misses {TARGET}x)"
        lines.append(f"| {r['B']} | {r['T']} | {r['E']} | {r['nn.MHA']:.4f} | {r['fxdp']:.4f} | "
                     f"**{r['fxdp_ratio']:.2f}x**{miss} | {op[0]} | {op[1]} | {r['rounds']} | {r['note']} |")
    for B, T, E in skipped:
        lines.append(f"| {B} | {T} | {E} | - | - | - | - | - | 0 | not run: --budget spent |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset of configurations")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per configuration (fewer for big ones)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds; later configurations are skipped")
    ap.add_argument("--opacus-cap", type=float, default=30.0, help="skip opacus where its first step is slower")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "attention.md"))
    args = ap.parse_args(argv)
    # opacus' GradSampleModule hooks warn on every step when the input needs no gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = sorted(QUICK if args.quick else FULL, key=lambda c: c[0] * c[1] * c[2] * (c[1] + c[2]))
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows: List[Dict[str, object]] = []
    skipped: List[tuple] = []
    for B, T, E in configs:
        if time.perf_counter() - start > args.budget:
            skipped.append((B, T, E))
            continue
        work = B * T * E * (T + E)
        rounds = max(3, args.rounds if work < 2e9 else args.rounds // 2)
        row = bench(B, T, E, rounds, not args.no_opacus, args.opacus_cap)
        rows.append(row)
        print(f"B={B} T={T} E={E}: fxdp {row['fxdp_ratio']:.2f}x"
              + (f", opacus {row['opacus_ratio']:.2f}x" if "opacus_ratio" in row else ""), flush=True)
    text = table(rows, skipped)
    ratios = [r["fxdp_ratio"] for r in rows]
    hits = sum(1 for q in ratios if q <= TARGET)
    header = (
        f"# Attention training step: fxdp vs nn.MultiheadAttention (CPU)\n\n"
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads ({os.cpu_count()} CPUs, load average {load:.1f} at start), float32, "
        f"{HEADS} heads, self-attention, batch_first. "
        f"Step = forward + loss + backward (+ per-sample gradients). Medians over rounds of per-round ratios "
        f"(variants interleaved round-robin). Target: fxdp <= {TARGET}x nn.MultiheadAttention; met in "
        f"{hits} of {len(ratios)} configurations. Command: `python benchmarks/bench_attention.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
    )
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(header + text + "\n")


if __name__ == "__main__":
    main()
