"""Profile one DP-SGD step of fxdp (book-keeping and materialize) against the
non-private step, to find per-step Python overhead, copies and extra kernels.

Sections (all single-process, ``--threads`` intra-op threads, fixed seeds):

1. phase breakdown, median ms over ``--steps`` steps: forward, backward (for
   ``bk`` split into autograd and the end-of-backward book-keeping,
   ``BookKeeping._close_pass``: the per-sample norms), optimizer step; and the
   noise draw alone as a share of the non-private step (a floor no DP step avoids);
2. fixed per-step cost: the same breakdown at batch size 1, where kernels are
   negligible and the time is framework overhead;
3. ``torch.profiler``: the aten ops of one step by self CPU time, and the number
   of ops per step (each op costs ~5-20 us of dispatch on CPU);
4. ``cProfile``: the Python functions with the most own time per step;
5. ATen calls per phase, counted at the dispatcher, against the non-private step's;
6. the fixed cost of one captured layer: stacks of 8 and 48 small ``Linear(32, 32)`` +
   GELU blocks, non-private and book-keeping steps interleaved; the slope between the two
   depths is the time and the ATen calls one more captured layer adds to a step
   (independent of ``--model``).

(The A/B ratios in benchmarks/README.md, "Profile", come from one-off scripts that
switched a change on and off between interleaved steps of one process.)

Usage::

    python benchmarks/profile_step.py --model embedding --batch-size 128
    python benchmarks/profile_step.py --model mnist --modes bk --sections 3 4
    python benchmarks/profile_step.py --sections 6 --batch-size 16     # per captured layer
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import warnings
from collections import Counter
from typing import Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_models import M  # noqa: E402  (benchmarks/models.py, loaded by path)

import fxdp  # noqa: E402
import fxdp.bookkeeping as bookkeeping  # noqa: E402
from fxdp.optim import DPOptimizer  # noqa: E402

_T: Dict[str, float] = {"finish": 0.0}
_orig_finish = bookkeeping.BookKeeping._close_pass


def _timed_finish(self) -> None:
    t = time.perf_counter()
    _orig_finish(self)
    _T["finish"] += time.perf_counter() - t


bookkeeping.BookKeeping._close_pass = _timed_finish  # queued by bound-method lookup at each backward


class Stepper:
    """One model + optimizer in a given mode, with a phase-timed step."""

    def __init__(self, model_name: str, mode: str, B: int) -> None:
        spec = M.MODELS[model_name]
        torch.manual_seed(0)
        model = spec.build()
        self.x, self.y = spec.batch(B, torch.Generator().manual_seed(0))
        if mode == "nonprivate":
            self.model = model
            self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = fxdp.privatize(model, grad_sample_mode=mode)
            self.opt = DPOptimizer(
                torch.optim.SGD(self.model.parameters(), lr=1e-3),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=B,
                generator=torch.Generator().manual_seed(1),
            )
            if mode == "bk":
                self.opt.attach_bookkeeping(self.model.bookkeeping)

    def step(self) -> None:
        self.opt.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()

    def timed(self) -> Dict[str, float]:
        _T["finish"] = 0.0
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        return {
            "forward": t1 - t0,
            "backward": t2 - t1 - _T["finish"],
            "bk_finish": _T["finish"],
            "opt_step": t3 - t2,
            "total": t3 - t0,
        }


def phases(model: str, modes: List[str], B: int, steps: int) -> None:
    steppers = {m: Stepper(model, m, B) for m in modes}
    for s in steppers.values():
        s.step()
        s.step()
    rows: Dict[str, List[Dict[str, float]]] = {m: [] for m in modes}
    for _ in range(steps):  # interleaved, as the benchmark
        for m, s in steppers.items():
            rows[m].append(s.timed())
    keys = ["forward", "backward", "bk_finish", "opt_step", "total"]
    noise = _noise_draw_ms(next(iter(steppers.values())).model, steps)
    print(f"\n## phases, {model} B={B}: ms over {steps} interleaved steps, median (min)")
    print("| mode | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for m in modes:
        med = {k: 1e3 * statistics.median(r[k] for r in rows[m]) for k in keys}
        low = {k: 1e3 * min(r[k] for r in rows[m]) for k in keys}
        print(f"| {m} | " + " | ".join(f"{med[k]:.2f} ({low[k]:.2f})" for k in keys) + " |")
    n, ms = noise
    line = f"\nnoise draw alone ({n:,} numbers, `normal_` into a flat buffer): {ms:.2f} ms"
    if "nonprivate" in rows:
        base = statistics.median(r["total"] for r in rows["nonprivate"]) * 1e3
        line += f" = {ms / base:.2f}x the non-private step (a floor under any DP step of this model)"
    print(line)


def _noise_draw_ms(model: torch.nn.Module, steps: int):
    """Median ms of one Gaussian draw as large as the trainable parameters (the DP step's
    noise, ``fxdp.optim.noise.FlatNoise``: one ``normal_`` into a flat buffer)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buf, g = torch.empty(n), torch.Generator().manual_seed(0)
    times = []
    for _ in range(max(steps, 5)):
        t = time.perf_counter()
        buf.normal_(0.0, 1.0, generator=g)
        times.append(time.perf_counter() - t)
    return n, 1e3 * statistics.median(times)


def op_profile(model: str, mode: str, B: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    s = Stepper(model, mode, B)
    s.step()
    s.step()
    n = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            s.step()
    ka = prof.key_averages()
    total_ops = sum(e.count for e in ka if e.key.startswith("aten::")) / n
    print(f"\n## torch.profiler, {model} {mode} B={B}: {total_ops:.0f} aten op calls per step; top ops by self CPU")
    print("| op | calls/step | self ms/step |\n|---|---|---|")
    for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"| {e.key} | {e.count / n:.0f} | {e.self_cpu_time_total / 1e3 / n:.2f} |")


def py_profile(model: str, mode: str, B: int, rows: int) -> None:
    s = Stepper(model, mode, B)
    s.step()
    s.step()
    n = 20
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        s.step()
    pr.disable()
    st = pstats.Stats(pr)
    calls = st.total_calls / n  # type: ignore[attr-defined]
    print(f"\n## cProfile, {model} {mode} B={B}: {calls:.0f} Python function calls per step; top by own time")
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(rows)
    out = buf.getvalue()
    start = out.find("ncalls")
    print("```\n" + out[start:].rstrip() + "\n```")
    print("(ncalls and times are totals over", n, "steps)")


def aten_calls(model: str, modes: List[str], B: int, rows: int) -> None:
    """ATen calls per phase of one step, counted at the dispatcher (``TorchDispatchMode``:
    each call once, as the kernels see them), against the non-private step's; the fixed
    per-step cost grows with them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    print(f"\n## ATen calls per step, {model} B={B}: forward / backward / optimizer step (zero_grad in forward)")
    print("| mode | forward | backward | opt_step | total | most called in the step |\n|---|---|---|---|---|---|")
    for mode in ["nonprivate"] + [m for m in modes if m != "nonprivate"]:
        s = Stepper(model, mode, B)
        for _ in range(12):  # past the noise buffer's keep decision
            s.step()
        counts = [Count(), Count(), Count()]
        with counts[0]:
            s.opt.zero_grad()
            loss = F.cross_entropy(s.model(s.x), s.y)
        with counts[1]:
            loss.backward()
        with counts[2]:
            s.opt.step()
        total = sum((c.ops for c in counts), Counter())
        top = ", ".join(f"{k.split('.')[1]} {n}" for k, n in total.most_common(rows // 3))
        n = [sum(c.ops.values()) for c in counts]
        print(f"| {mode} | {n[0]} | {n[1]} | {n[2]} | {sum(n)} | {top} |")


class _Stack:
    """``depth`` blocks of ``Linear(32, 32)`` + GELU and a 4-way head: every layer a capture
    op whose kernels cost next to nothing, so a step's time is mostly per-layer overhead."""

    def __init__(self, depth: int, mode: str, B: int) -> None:
        torch.manual_seed(0)
        blocks = [torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(depth)]
        model = torch.nn.Sequential(*blocks, torch.nn.Linear(32, 4))
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(B, 32, generator=g), torch.randint(0, 4, (B,), generator=g)
        self.layers = depth + 1
        if mode == "nonprivate":
            self.model, self.opt = model, torch.optim.SGD(model.parameters(), lr=1e-3)
            return
        self.model = fxdp.privatize(model, grad_sample_mode="bk")
        self.opt = DPOptimizer(torch.optim.SGD(self.model.parameters(), lr=1e-3), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=B, generator=torch.Generator().manual_seed(1))
        self.opt.attach_bookkeeping(self.model.bookkeeping)

    def step(self) -> None:
        self.opt.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()


def capture_cost(B: int, steps: int) -> None:
    """Section 6: what one more captured layer adds to a book-keeping step (time and ATen
    calls), from the slope between stacks of 8 and 48 blocks, interleaved with the
    non-private stacks (median of per-round ms over ``steps`` rounds of 20 steps)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    depths = (8, 48)
    stacks = {(d, m): _Stack(d, m, B) for d in depths for m in ("nonprivate", "bk")}
    for s in stacks.values():
        for _ in range(12):  # past the noise buffer's keep decision
            s.step()
    times: Dict[tuple, List[float]] = {k: [] for k in stacks}
    for _ in range(steps):
        for k, s in stacks.items():
            t0 = time.perf_counter()
            for _ in range(20):
                s.step()
            times[k].append((time.perf_counter() - t0) / 20 * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    calls = {}
    for k, s in stacks.items():
        Count.n = 0
        with Count():
            s.step()
        calls[k] = Count.n
    print(f"\n## per captured layer, Linear(32, 32) + GELU stacks, B={B}: ms per step (median of {steps} rounds)")
    print("| layers | non-private ms | book-keeping ms | ATen calls non-private / bk |\n|---|---|---|---|")
    for d in depths:
        n = stacks[(d, "bk")].layers
        print(f"| {n} | {ms[(d, 'nonprivate')]:.2f} | {ms[(d, 'bk')]:.2f} | "
              f"{calls[(d, 'nonprivate')]} / {calls[(d, 'bk')]} |")
    span = depths[1] - depths[0]
    extra = [(ms[(d, "bk")] - ms[(d, "nonprivate")]) for d in depths]
    per_call = [(calls[(d, "bk")] - calls[(d, "nonprivate")]) for d in depths]
    print(f"\none more captured layer adds {(extra[1] - extra[0]) / span * 1e3:.0f} µs and "
          f"{(per_call[1] - per_call[0]) / span:.1f} ATen calls to a step beyond its non-private cost; "
          f"the per-step rest (clip factors, noise, optimizer) "
          f"{extra[0] - stacks[(depths[0], 'bk')].layers * (extra[1] - extra[0]) / span:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(M.MODELS), default="embedding")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["nonprivate", "materialize", "bk"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--sections", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if 1 in args.sections:
        phases(args.model, args.modes, args.batch_size, args.steps)
    if 2 in args.sections:
        phases(args.model, args.modes, 1, args.steps)
    for mode in [m for m in args.modes if m != "nonprivate"]:
        if 3 in args.sections:
            op_profile(args.model, mode, args.batch_size, args.rows)
        if 4 in args.sections:
            py_profile(args.model, mode, args.batch_size, args.rows)
    if 5 in args.sections:
        aten_calls(args.model, args.modes, args.batch_size, args.rows)
    if 6 in args.sections:
        capture_cost(args.batch_size, args.steps)


if __name__ == "__main__":
    main()
