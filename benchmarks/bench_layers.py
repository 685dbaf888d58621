"""Per-layer micro-benchmark (as Figure 3 of the Opacus paper, Yousefpour et al.
2021): runtime and peak-memory factor of each fxdp DP layer, in ``materialize``
and book-keeping (``bk``) mode, against the plain ``torch.nn`` layer.

One "step" is forward, a fixed random linear loss, backward and the optimizer
step (``SGD`` for the plain layer; ``fxdp.optim.DPOptimizer`` with clipping and
noise for the DP layer), so per-sample work done at clip time is counted. Timing
and memory follow ``bench_models.py``: the three variants run interleaved
round-robin in one process and the factor is the median of per-round ratios;
peak memory is measured in one child process (mmap threshold pinned at start, peak RSS
reset before the step), and its factor is only given where the plain layer's
step peak is at least 1 MiB (below that, page granularity dominates).

Usage::

    python benchmarks/bench_layers.py                      # B = 16, 64, 256
    python benchmarks/bench_layers.py --layers linear lstm --batch-sizes 32
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_models  # noqa: E402,F401  (puts the repo on sys.path)
from _memory import WARMUP_STEPS, _pin_mmap_threshold, peak_step_memory, run_child  # noqa: E402

import fxdp  # noqa: E402
from fxdp.optim import DPOptimizer  # noqa: E402

RESULTS = os.path.join(HERE, "results")


class _MHA(nn.Module):
    """Self-attention: ``nn.MultiheadAttention`` returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 64, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]


def _randn(*shape: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda B, g: torch.randn((B,) + shape, generator=g)


#: name -> (layer constructor, input maker, description)
LAYERS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], Tensor], str]] = {
    "linear": (lambda: nn.Linear(512, 512), _randn(512), "Linear(512, 512), x [B, 512]"),
    "linear_seq": (lambda: nn.Linear(256, 256), _randn(32, 256), "Linear(256, 256), x [B, 32, 256]"),
    "conv2d": (lambda: nn.Conv2d(16, 32, 3, padding=1), _randn(16, 32, 32), "Conv2d(16, 32, 3, p=1), x [B, 16, 32, 32]"),
    "embedding": (
        lambda: nn.Embedding(10_004, 64),
        lambda B, g: torch.randint(0, 10_004, (B, 64), generator=g),
        "Embedding(10004, 64), tokens [B, 64]",
    ),
    "layernorm": (lambda: nn.LayerNorm(256), _randn(32, 256), "LayerNorm(256), x [B, 32, 256]"),
    "groupnorm": (lambda: nn.GroupNorm(4, 32), _randn(32, 16, 16), "GroupNorm(4, 32), x [B, 32, 16, 16]"),
    "instancenorm": (
        lambda: nn.InstanceNorm2d(32, affine=True),
        _randn(32, 16, 16),
        "InstanceNorm2d(32, affine), x [B, 32, 16, 16]",
    ),
    "lstm": (_LSTM, _randn(32, 64), "LSTM(64, 64), x [B, 32, 64]"),
    "mha": (_MHA, _randn(32, 64), "MultiheadAttention(64, 4 heads), x [B, 32, 64]"),
}
VARIANTS = ["nn", "materialize", "bk"]


def build(layer: str, variant: str, B: int) -> Tuple[Callable[[], None], Callable[[], None], str]:
    """(step, zero_grad, rule description) for one layer variant."""
    make, make_x, _ = LAYERS[layer]
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(0)
    x = make_x(B, g)
    with torch.no_grad():
        w = torch.randn(model(x).shape, generator=g)
    if variant == "nn":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        net = model
        info = ""
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = fxdp.privatize(copy.deepcopy(model), grad_sample_mode=variant)
        opt = DPOptimizer(
            torch.optim.SGD(net.parameters(), lr=1e-3),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=B,
            generator=torch.Generator().manual_seed(1),
        )
        if variant == "bk":
            opt.attach_bookkeeping(net.bookkeeping)
        info = ", ".join(sorted({r["rule"] for r in net.capture_table()}))

    def step() -> None:
        opt.zero_grad()
        (net(x) * w).sum().div(B).backward()
        opt.step()

    return step, opt.zero_grad, info


def time_cell(layer: str, B: int, rounds: int, warmup: int) -> Dict[str, object]:
    built = {}
    cell: Dict[str, object] = {"layer": layer, "batch_size": B}
    for v in VARIANTS:
        try:
            step, _, info = build(layer, v, B)
            for _ in range(warmup):
                step()
            built[v] = step
            cell[f"{v}_rules"] = info
        except Exception as e:  # reported as a miss
            cell[f"{v}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    names = list(built)
    times: Dict[str, List[float]] = {v: [] for v in names}
    for r in range(rounds):
        for v in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            t = time.perf_counter()
            built[v]()
            times[v].append(time.perf_counter() - t)
    for v in names:
        cell[f"{v}_ms"] = 1e3 * statistics.median(times[v])
        if "nn" in times and v != "nn":
            cell[f"{v}_x"] = statistics.median(a / b for a, b in zip(times[v], times["nn"]))
    return cell


def _memory_child(cells: List[Tuple[str, int]]) -> None:
    _pin_mmap_threshold()
    out = {}
    for layer, B in cells:
        for v in VARIANTS:
            try:
                step, zero, _ = build(layer, v, B)
                for _ in range(WARMUP_STEPS):
                    step()
                out[f"{layer}/{B}/{v}"] = peak_step_memory(step, zero)
            except Exception:
                out[f"{layer}/{B}/{v}"] = None
            gc.collect()
    print(json.dumps(out))


def markdown(cells: List[Dict[str, object]], meta: Dict[str, object]) -> str:
    lines = [
        "# Per-layer cost of fxdp DP layers vs torch.nn",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} intra-op thread(s); "
        f"{meta['rounds']} interleaved rounds per cell. Generated by `benchmarks/bench_layers.py`.",
        "",
        "Runtime factor: median of per-round ratios of a full step (forward, backward, optimizer step incl. "
        "clipping and noise) to the plain layer's step. Memory: peak MiB the step adds (factor where the plain "
        "layer's peak is ≥ 1 MiB).",
        "",
        "| layer | B | nn ms | materialize ms (x) | bk ms (x) | nn MiB | materialize MiB (x) | bk MiB (x) | bk rules |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(c: Dict[str, object], k: str, spec: str) -> str:
        v = c.get(k)
        return "—" if v is None else format(v, spec)

    for c in cells:
        row = [LAYERS[str(c["layer"])][2], str(c["batch_size"]), f(c, "nn_ms", ".2f")]
        for v in ("materialize", "bk"):
            if f"{v}_error" in c:
                row.append(f"**miss**: {c[f'{v}_error']}")
            else:
                row.append(f"{f(c, f'{v}_ms', '.2f')} ({f(c, f'{v}_x', '.2f')}x)")
        nn_mem = c.get("nn_mib")
        row.append(f(c, "nn_mib", ".1f"))
        for v in ("materialize", "bk"):
            m = c.get(f"{v}_mib")
            fac = f" ({m / nn_mem:.1f}x)" if m is not None and nn_mem is not None and nn_mem >= 1.0 else ""
            row.append(("—" if m is None else f"{m:.1f}") + fac)
        row.append(str(c.get("bk_rules", "")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="B=8, 3 rounds, print only")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child([(l, int(b)) for l, b in json.loads(args.memory_child)])
        return
    sizes = [8] if args.quick else args.batch_sizes
    rounds = 3 if args.quick else args.rounds
    todo = [(l, B) for l in args.layers for B in sizes]
    cells = []
    for layer, B in todo:
        c = time_cell(layer, B, rounds, args.warmup)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()}), flush=True)
        cells.append(c)
    if not args.no_memory:
        try:
            mem = run_child(__file__, ["--threads", str(args.threads), "--memory-child", json.dumps(todo)],
                            env={"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})  # pinned from the first allocation
        except Exception as e:
            print(f"memory measurement failed: {e}", file=sys.stderr)
            mem = {}
        for c in cells:
            for v in VARIANTS:
                c[f"{v}_mib"] = mem.get(f"{c['layer']}/{c['batch_size']}/{v}")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": args.threads, "rounds": rounds}
    md = markdown(cells, meta)
    print(md)
    if not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "layers.md"), "w") as f:
            f.write(md)
        with open(os.path.join(RESULTS, "layers.json"), "w") as f:
            json.dump({"meta": meta, "cells": cells}, f, indent=1)


if __name__ == "__main__":
    main()
