"""Cost of secure mode: noise for a DP step and Poisson sampling, secure vs standard.

    python benchmarks/bench_secure.py [--sizes 1000000 10000000] [--repeats 5] [--wall]

Times are the best of ``--repeats`` runs, by default as CPU time of one thread
(``torch.set_num_threads(1)``, ``time.thread_time``: user + system time of the thread,
so ``os.urandom``'s kernel time counts), which stays meaningful on a shared, loaded
machine; ``--wall`` measures wall-clock time with PyTorch's default threads instead.
Rows:

* ``noise``: ``gaussian_noise`` for ``d`` float32 parameters, PyTorch's sampler vs the
  secure sampler (CSPRNG bits, 4 Box-Muller values per output in float64) with the
  ChaCha20 backend and with every byte from ``os.urandom``;
* ``snapped sum``: ``noisy_sum`` (sum in float64 and snapping) vs ``x + noise``;
* ``DP step``: a whole ``DPOptimizer.step()`` with ``B`` per-sample gradients,
  ``secure_mode`` off vs on;
* ``Poisson``: one batch of ``PoissonSampler`` over ``N`` examples.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from fxdp.data import PoissonSampler
from fxdp.optim import DPOptimizer, secure
from fxdp.optim.noise import gaussian_noise, noisy_sum, secure_generator

CLOCK = time.thread_time


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return min(times)


def row(name: str, size: str, base: float, sec: float) -> None:
    print(f"| {name} | {size} | {base * 1e3:9.1f} | {sec * 1e3:9.1f} | {sec / base:6.1f}x |")


def dp_step(d: int, batch: int, secure_mode: bool) -> Callable[[], None]:
    p = torch.nn.Parameter(torch.zeros(d))
    opt = DPOptimizer(
        torch.optim.SGD([p], lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch,
        generator=None if secure_mode else torch.Generator().manual_seed(0),
        secure_mode=secure_mode,
    )
    grads = torch.randn(batch, d)

    def step() -> None:
        p.grad_sample = grads.clone()
        opt.step()
        opt.zero_grad()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--batch", type=int, default=4, help="per-sample gradients in the DP step")
    ap.add_argument("--poisson", type=int, nargs="+", default=[60_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wall", action="store_true", help="wall-clock time, default threads")
    args = ap.parse_args()
    r = args.repeats
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    else:
        torch.set_num_threads(1)
    clock = "wall-clock" if args.wall else "CPU time of one thread"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {clock}, best of {r}; "
        f"secure backend: {secure.backend()}\n"
    )
    print("| operation | size | standard (ms) | secure (ms) | cost |")
    print("|---|---|---:|---:|---:|")
    g, sg = torch.Generator().manual_seed(0), secure_generator()
    for d in args.sizes:
        size = f"d = {d:,}"
        base = best_of(lambda d=d: gaussian_noise(1.0, (d,), generator=g), r)
        for name in ("chacha20", "urandom"):
            if name == "chacha20" and not secure._HAVE_CHACHA:
                continue
            secure.set_backend(name)
            row(f"noise ({name})", size, base, best_of(lambda d=d: gaussian_noise(1.0, (d,), generator=sg), r))
        secure.set_backend("auto")
        x = torch.randn(d)
        row(
            "snapped sum",
            size,
            best_of(lambda x=x: noisy_sum(x, 1.0, generator=g), r),
            best_of(lambda x=x: noisy_sum(x, 1.0, generator=sg), r),
        )
        row(
            f"DP step, B = {args.batch}",
            size,
            best_of(dp_step(d, args.batch, False), r),
            best_of(dp_step(d, args.batch, True), r),
        )
    for n in args.poisson:
        plain = PoissonSampler(n, 256 / n, generator=torch.Generator().manual_seed(0))
        sec = PoissonSampler(n, 256 / n, secure=True)
        row("Poisson batch", f"N = {n:,}", best_of(plain._draw, r), best_of(sec._draw, r))


if __name__ == "__main__":
    main()
