"""Peak step memory, shared by the benchmarks (``bench_models.py``, ``bench_zoo.py``,
``bench_vision.py``, ``bench_layers.py``).

Each figure comes from a child process started with glibc's mmap threshold pinned
at 64 KiB (``MALLOC_MMAP_THRESHOLD_``: every tensor is its own mapping, so a freed
one leaves the resident set at once), so the timing process keeps glibc's default
allocator. fxdp's noise buffer is kept or released as the variant's first steps decide
under the allocator they run with (``FlatNoise``), and the pinned allocator faults in every
released buffer: so a child measuring a variant with a ``DPOptimizer`` (``noise_held``) is
preceded by one under the default allocator, as a user's process runs, that warms up to
the decision and reports it, and the measuring child keeps or releases its buffer so.
The child builds and warms up one variant, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``) and runs one more step: the figure is ``VmHWM``
after the step minus ``VmRSS`` before it, the peak resident memory the step adds
above the model, optimizer state and data. fxdp's flat noise buffer, kept between
steps, counts as the step's: it holds the gradients non-private training allocates
in each step. Linux only (``None`` elsewhere).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

#: a peak within this of a memory target counts as met: the measurement repeats to ~0.3 MiB
#: (a slack of 1 MiB had passed the embedding net's 3.5 MiB against 2.3 non-private, 1.48x)
MEM_SLACK_MIB = 0.3
#: steps each variant runs before the measured one: past fxdp's noise-buffer decision
#: (``FlatNoise``, keep or release, measured on the first nine draws), so the figure is
#: the steady state's and not the probe's
WARMUP_STEPS = 9
#: set in a child that reports its noise-buffer decision instead of measuring; the decision
#: handed to the measuring child ("1" keep, "0" release)
_PROBE_ENV, _KEEP_ENV = "FXDP_BENCH_NOISE_PROBE", "FXDP_BENCH_NOISE_KEEP"
_optimizers: List[Any] = []  # this child's DPOptimizers (noise_held)


def _pin_mmap_threshold() -> None:
    """glibc: serve every allocation >= 64 KiB by mmap and never raise the threshold,
    so a freed tensor leaves the resident set at once (RSS tracks live tensors)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:  # pragma: no cover - not glibc
        pass


def _proc_status() -> Dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def peak_step_memory(step: Callable[[], None], before: Callable[[], None],
                     held: Callable[[], int] = lambda: 0) -> Optional[float]:
    """Peak resident memory (MiB) one ``step()`` adds above the state before it; the
    ``held()`` bytes a variant keeps between steps for its steps only count as the step's."""
    if os.environ.get(_PROBE_ENV):  # the decision child: warmed up under the default allocator
        import torch

        return float(_optimizers[-1].flat_noise.keeps(torch.device("cpu"))) if _optimizers else None
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    before()
    gc.collect()
    base = _proc_status()["VmRSS"] - held() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (Linux >= 4.0)
    except OSError:
        return None
    step()
    return max(0.0, _proc_status()["VmHWM"] - base)


def noise_held(opt: Any) -> Callable[[], int]:
    """``held`` for a ``DPOptimizer``'s step: its noise buffer's bytes. In a measuring child
    the buffer is kept or released as the decision child found (``in_child``)."""
    keep = os.environ.get(_KEEP_ENV)
    if keep is not None:
        opt.flat_noise.keep = keep == "1"
    if os.environ.get(_PROBE_ENV):
        _optimizers.append(opt)
    return lambda: noise_buffer_bytes(opt)


def noise_buffer_bytes(opt: Any) -> int:
    """Bytes of a ``DPOptimizer``'s flat noise buffer (0 before its first step)."""
    noise = opt._flat_noise.buffer
    return 0 if noise is None else noise.numel() * noise.element_size()


def run_child(script: str, args: List[str], timeout: Optional[float] = None,
              env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run ``python script args`` in a fresh process (``env`` added to this one's); the
    JSON object its last stdout line prints."""
    out = subprocess.run([sys.executable, os.path.abspath(script)] + args, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, **(env or {})))
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {' '.join(args[:3])} failed ({out.returncode}): "
                           f"{out.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def in_child(script: str, args: List[str], timeout: float = 1800,
             decisions: Optional[List[bool]] = None) -> Dict[str, Any]:
    """Run ``python script args`` with the mmap threshold pinned from the first
    allocation (freed heap chunks of earlier steps would otherwise be reused without
    touching the resident set); return the JSON object its last stdout line prints.
    A child with one ``DPOptimizer`` first runs unpinned to its noise-buffer decision
    (appended to ``decisions``: kept or not)."""
    decided = [v for v in run_child(script, args, timeout, {_PROBE_ENV: "1"}).values() if v is not None]
    env = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    if len(decided) == 1:
        env[_KEEP_ENV] = str(int(decided[0]))
        if decisions is not None:
            decisions.append(bool(decided[0]))
    return run_child(script, args, timeout, env)
