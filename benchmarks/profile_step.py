"""Profile one DP-SGD step of fxdp (book-keeping and materialize) against the
non-private step, to find per-step Python overhead, copies and extra kernels.

Sections (all single-process, ``--threads`` intra-op threads, fixed seeds):

1. phase breakdown, median ms over ``--steps`` steps: forward, backward (for
   ``bk`` split into autograd and the end-of-backward book-keeping,
   ``fxdp.bookkeeping.finish_backward``), optimizer step;
2. fixed per-step cost: the same breakdown at batch size 1, where kernels are
   negligible and the time is framework overhead;
3. ``torch.profiler``: the aten ops of one step by self CPU time, and the number
   of ops per step (each op costs ~5-20 us of dispatch on CPU);
4. ``cProfile``: the Python functions with the most own time per step;
5. A/B of the proposed changes (README, "Profile"): ``bk`` with the
   current rules against ``bk`` with the proposed ones, interleaved, after
   checking that both give the same clipped sums.

Usage::

    python benchmarks/profile_step.py --model embedding --batch-size 128
    python benchmarks/profile_step.py --model mnist --modes bk --sections 3 4
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
from typing import Callable, Dict, List

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
_orig_finish = bookkeeping.finish_backward


def _timed_finish(recorder, records) -> None:
    t = time.perf_counter()
    _orig_finish(recorder, records)
    _T["finish"] += time.perf_counter() - t


bookkeeping.finish_backward = _timed_finish  # Recorder imports it at call time


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
                self.opt.attach_bookkeeping(self.model.recorder)

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
    print(f"\n## phases, {model} B={B}: ms over {steps} interleaved steps, median (min)")
    print("| mode | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for m in modes:
        med = {k: 1e3 * statistics.median(r[k] for r in rows[m]) for k in keys}
        low = {k: 1e3 * min(r[k] for r in rows[m]) for k in keys}
        print(f"| {m} | " + " | ".join(f"{med[k]:.2f} ({low[k]:.2f})" for k in keys) + " |")


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


# ---------------------------------------------------------------------- proposals
from fxdp.rules.embedding import EmbeddingRule  # noqa: E402
from fxdp.rules.linear import LinearRule, _flat  # noqa: E402


class ProposedLinearRule(LinearRule):
    """Proposal 1: for T = 1 the per-sample weight gradient g a^T has rank one, so
    ||g a^T||_F^2 = ||g||^2 ||a||^2: O(B (d + p)) instead of materializing [B, p, d]."""

    def norm_sample_sq(self, args, grad_output, needs):
        a, g = _flat(args["input"]), _flat(grad_output)
        if a.shape[1] != 1:
            return super().norm_sample_sq(args, grad_output, needs)
        out = {}
        g2 = g.pow(2).sum((1, 2))
        if "weight" in needs:
            out["weight"] = a.pow(2).sum((1, 2)) * g2
        if "bias" in needs:
            out["bias"] = g2
        return out


class ProposedEmbeddingRule(EmbeddingRule):
    """Proposal 2: clipped sum = PyTorch's own embedding backward of the scaled
    output gradient: scale g per sample by broadcasting, one index_add with the raw
    token ids (no i*V+x keys, no floor division, no gather of the factors)."""

    def clipped_sum(self, args, grad_output, factors, needs):
        if "weight" not in needs:
            return {}
        V, D = args["weight"].shape
        idx = self._indices(args)
        B = idx.shape[0]
        gc = grad_output * factors.to(grad_output.dtype).view((B,) + (1,) * (grad_output.dim() - 1))
        idx, rows = idx.reshape(-1), gc.reshape(-1, D)
        pad = self._padding_idx(args, V)
        if pad is not None:
            keep = idx != pad
            idx, rows = idx[keep], rows[keep]
        return {"weight": rows.new_zeros(V, D).index_add_(0, idx, rows)}


from fxdp.layers.recurrent import ScanTape, _prev_states  # noqa: E402
from fxdp.rules.recurrent import RecurrentScanRule  # noqa: E402


class ProposedRecurrentScanRule(RecurrentScanRule):
    """Proposal 4: book-keeping hooks for ``rnn_scan``. Today the rule has only
    ``grad_sample``; the default ``norm_sample_sq`` calls it (which clears the
    scan's tape) and the default ``clipped_sum`` calls it again per parameter,
    finding the tape empty and re-running the whole scan forward + BPTT in Python
    (T steps) each time. Here the norms keep the tape and the clipped sum, the
    last user, forms ``sum_i c_i grad_i`` from ``dG`` with one matmul and clears it."""

    def _grads_keep(self, args, grad_output):
        tape = args.get("tape")
        if isinstance(tape, ScanTape) and tape.grads is not None and tape.saved is not None:
            return tape.saved, tape.grads
        sv, gr = self._grads(args, grad_output)  # BPTT here (clears nothing useful)
        if isinstance(tape, ScanTape):
            tape.saved, tape.grads = sv, gr
        return sv, gr

    def norm_sample_sq(self, args, grad_output, needs):
        sv, gr = self._grads_keep(args, grad_output)
        dG = gr["dG"]
        out = {}
        if "weight_hh" in needs:
            out["weight_hh"] = torch.bmm(dG.transpose(1, 2), _prev_states(sv)).flatten(1).pow(2).sum(1)
        if "bias_hh" in needs:
            out["bias_hh"] = dG.sum(1).pow(2).sum(1)
        if "weight_hr" in needs:
            out["weight_hr"] = torch.bmm(gr["dHt"].transpose(1, 2), sv["U"]).flatten(1).pow(2).sum(1)
        return out

    def clipped_sum(self, args, grad_output, factors, needs):
        sv, gr = self._grads_keep(args, grad_output)
        f = factors.to(gr["dG"].dtype).view(-1, 1, 1)
        dG = gr["dG"] * f
        out = {}
        if "weight_hh" in needs:
            H = _prev_states(sv)
            out["weight_hh"] = dG.reshape(-1, dG.shape[-1]).t() @ H.reshape(-1, H.shape[-1])
        if "bias_hh" in needs:
            out["bias_hh"] = dG.sum((0, 1))
        if "weight_hr" in needs:
            dH, U = gr["dHt"] * f, sv["U"]
            out["weight_hr"] = dH.reshape(-1, dH.shape[-1]).t() @ U.reshape(-1, U.shape[-1])
        if needs >= {n for n in ("weight_hh", "bias_hh", "weight_hr") if args.get(n) is not None}:
            tape = args.get("tape")
            if isinstance(tape, ScanTape):
                tape.clear()
        return out


def _shared_factors(capture):
    """Proposal 3 (emulated here from outside; the fix belongs in
    ``fxdp.bookkeeping.finish_backward``): pass one scaled factor tensor to every
    parameter of a layer, so ``RuleCapture.clipped_sum`` groups them and the rule
    runs once per layer (today ``per_param[...] * scale`` makes a new tensor per
    parameter and the rule runs once per parameter, scaling g twice)."""
    orig = capture.clipped_sum

    def clipped_sum(rec, factors):
        vals = list(factors.values())
        if len(vals) > 1 and all(v is vals[0] or torch.equal(v, vals[0]) for v in vals[1:]):
            factors = {i: vals[0] for i in factors}
        return orig(rec, factors)

    return clipped_sum


def _apply_proposals(model) -> int:
    n = 0
    for c in model.captures:
        if hasattr(c, "rule"):
            c.clipped_sum = _shared_factors(c)
        rule = getattr(c, "rule", None)
        if type(rule) is LinearRule:
            c.rule = ProposedLinearRule()
            n += 1
        elif type(rule) is EmbeddingRule:
            c.rule = ProposedEmbeddingRule()
            n += 1
        elif type(rule) is RecurrentScanRule:
            c.rule = ProposedRecurrentScanRule()
            n += 1
    return n


def ab_proposals(model: str, B: int, steps: int) -> None:
    cur, new = Stepper(model, "bk", B), Stepper(model, "bk", B)
    n = _apply_proposals(new.model)
    # same weights, same batch: the clipped sums must agree before anything is timed
    for s in (cur, new):
        s.opt.zero_grad()
        F.cross_entropy(s.model(s.x), s.y).backward()
    for p, q in zip(cur.model.parameters(), new.model.parameters()):
        a, b = cur.model.recorder.clipped[id(p)], new.model.recorder.clipped[id(q)]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for s in (cur, new):
        s.opt.zero_grad()
        s.step()
    tc, tn = [], []
    for i in range(steps):
        for s, ts in ((cur, tc), (new, tn)) if i % 2 == 0 else ((new, tn), (cur, tc)):
            t = time.perf_counter()
            s.step()
            ts.append(time.perf_counter() - t)
    ratio = statistics.median(b / a for a, b in zip(tc, tn))
    print(f"\n## proposals A/B, {model} B={B} ({n} captures changed, clipped sums equal): "
          f"current {1e3 * statistics.median(tc):.2f} ms, proposed {1e3 * statistics.median(tn):.2f} ms "
          f"per step (medians), median per-step ratio proposed/current {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(M.MODELS), default="embedding")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["nonprivate", "materialize", "bk"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--sections", nargs="+", type=int, default=[1, 2, 3, 4, 5])
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
        ab_proposals(args.model, args.batch_size, args.steps)


if __name__ == "__main__":
    main()
