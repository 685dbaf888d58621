"""torchvision / timm CNNs and timm's ViT-tiny: step time of fxdp book-keeping against non-private PyTorch.

Needs torch 2.14.1 + torchvision + timm in their own venv (see ``zoo_vision.py``)::

    venv-vision/bin/python benchmarks/bench_vision.py [--rounds 7] [--batch-size 16] [--image-size 224]

One thread (``--threads``); each round runs one non-private step and one full
book-keeping DP step (forward, backward, norms, clipped sums, noise, SGD update) back to
back, and the table reports the median of the per-round ratios; "of which the noise draw"
times fxdp's draw of the model's parameter count alone (``fill_normal``: the sampler, a
floor no DP step on this CPU avoids) in the same rounds, as a share of the non-private
step; then the peak memory of one step of each (``_memory.py``, 1 thread). Random
weights, train mode.
Results: ``results/vision_steps.md`` (each model at its own small input, 32x32 or 64x64, as
issue 13's table), ``results/vision_steps_b64.md`` (B = 64) and ``results/vision_steps_224.md``
(``--image-size 224``: every model at ImageNet's input side, as such models are trained).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

import fxdp
from fxdp.optim import DPOptimizer
from fxdp.optim.noise import fill_normal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import MEM_SLACK_MIB, WARMUP_STEPS, in_child, noise_held, peak_step_memory  # noqa: E402


def _models(image_size: int | None = None):
    """``{name: (build, input side)}``: each model at its own input side, or all at ``image_size``."""
    import timm
    import torchvision

    tv = torchvision.models
    models = {
        "torchvision resnet18": (lambda: tv.resnet18(weights=None, num_classes=10), 32),
        "torchvision mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(weights=None, num_classes=10), 64),
        "torchvision efficientnet_b0": (lambda: tv.efficientnet_b0(weights=None, num_classes=10), 64),
        "timm resnet10t": (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10), 64),
        "timm convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), 64),
        # issue 13's own transformer row: 16 patches + the class token, 12 blocks 192 wide
        "timm vit_tiny_patch16": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                                              img_size=image_size or 64), 64),
    }
    return {k: (b, image_size or size) for k, (b, size) in models.items()}


def steps(build, size: int, batch: int) -> tuple:
    """The non-private and the book-keeping step (each with its ``zero`` and ``held``)."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    plain = build().train()
    opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    # the batch as example inputs, as make_private privatizes (windowed models take the export path)
    dp = fxdp.privatize(build().train(), grad_sample_mode="bk", example_inputs=(x,))
    dp_opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=batch)
    dp_opt.attach_bookkeeping(dp.bookkeeping)

    def plain_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()

    def bk_step():  # the whole DP step: norms, clipped sums, noise, update
        dp_opt.zero_grad()
        torch.nn.functional.cross_entropy(dp(x), y).backward()
        dp_opt.step()

    plain_step.zero, plain_step.held = opt.zero_grad, lambda: 0
    bk_step.zero, bk_step.held = dp_opt.zero_grad, noise_held(dp_opt)
    return plain_step, bk_step, dp


def ratio(build, size: int, batch: int, rounds: int) -> tuple:
    """(bk / non-private, noise draw / non-private): medians of per-round ratios, whether
    the step's noise buffer is kept between steps (``FlatNoise``'s decision), and the
    non-private step's median ms."""
    plain_step, bk_step, dp = steps(build, size, batch)
    noise = torch.empty(sum(p.numel() for p in dp.parameters() if p.requires_grad))

    def noise_draw():  # the floor of the step's noise: fxdp's draw into a kept buffer (FlatNoise)
        fill_normal(noise, 1.0, None)

    for _ in range(WARMUP_STEPS):  # warm-up, past the noise buffer's keep decision
        for f in (plain_step, bk_step, noise_draw):
            f()
    ratios, noise_share, plain_ms = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain_step()
        t1 = time.perf_counter()
        bk_step()
        t2 = time.perf_counter()
        noise_draw()
        ratios.append((t2 - t1) / (t1 - t0))
        noise_share.append((time.perf_counter() - t2) / (t1 - t0))
        plain_ms.append((t1 - t0) * 1e3)
    kept = bk_step.zero.__self__.flat_noise.keeps(torch.device("cpu"))
    return statistics.median(ratios), statistics.median(noise_share), kept, statistics.median(plain_ms)


def memory_child(name: str, batch: int, which: str, image_size: int | None) -> None:
    """Peak memory one step of ``which`` (``plain`` or ``bk``) adds (``_memory.py``)."""
    build, size = _models(image_size)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_step, bk_step, _ = steps(build, size, batch)
    step = plain_step if which == "plain" else bk_step
    for _ in range(WARMUP_STEPS):
        step()
    print(json.dumps({which: peak_step_memory(step, step.zero, step.held)}))


def peaks(name: str, batch: int, image_size: int | None) -> dict:
    out, kept = {}, []
    side = ["--image-size", str(image_size)] if image_size else []
    for which in ("plain", "bk"):
        try:
            out.update(in_child(__file__, ["--memory-child", name, str(batch), which] + side,
                                decisions=kept if which == "bk" else None))
        except Exception as e:  # a miss is reported, not hidden
            print(f"memory measurement failed for {name} {which}: {e}", file=sys.stderr)
    if kept:
        out["noise_kept"] = kept[0]
    return out


def _kept(flag) -> str:
    return "-" if flag is None else ("kept" if flag else "released")


def _mem_cells(m: dict) -> str:
    plain, bk = m.get("plain"), m.get("bk")
    if plain is None or bk is None:
        return "- | - | - | - |"
    met = "met" if bk <= 1.3 * plain + MEM_SLACK_MIB else "MISSED"
    return f"{plain:.1f} | {bk:.1f} ({bk / plain:.2f}x) | {_kept(m.get('noise_kept'))} | {met} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the timed steps")
    ap.add_argument("--models", nargs="*", help="only the models whose name contains one of these")
    ap.add_argument("--image-size", type=int, help="every model at this input side (default: each its own, 32 or 64)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--out", help="the table (default: results/vision_steps[_b<B>][_<side>].md, batch 16 and "
                    "each model's own side left out of the name)")
    ap.add_argument("--memory-child", nargs=3, metavar=("MODEL", "B", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1 if args.memory_child else args.threads)
    if args.memory_child:
        name, batch, which = args.memory_child
        memory_child(name, int(batch), which, args.image_size)
        return
    if args.out is None:
        tag = (f"_b{args.batch_size}" if args.batch_size != 16 else "") + (f"_{args.image_size}" if args.image_size else "")
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"vision_steps{tag}.md")
    lines = ["# torchvision / timm: fxdp book-keeping step time / non-private (benchmarks/bench_vision.py)", "",
             f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, median of {args.rounds} interleaved "
             "rounds; targets of issue 13: CNNs <= 1.5x, transformers (the ViT) <= 1.3x. Peak memory one step "
             "adds above the model, optimizer state and data (MiB, a child process each, `benchmarks/_memory.py`; fxdp's flat noise buffer "
             f"counted as the step's); target <= 1.3x non-private (within {MEM_SLACK_MIB} MiB). Noise buffer: kept "
             "between steps or released, as fxdp decided (`FlatNoise`) in the timing process and in the memory "
             "child's unpinned run.", "",
             "| model | input | bk / non-private | of which the noise draw | noise buffer | non-private MiB | bk MiB | "
             "noise buffer | memory target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (build, size) in _models(args.image_size).items():
        if args.models and not any(m in name for m in args.models):
            continue
        r, n, kept, _ = ratio(build, size, args.batch_size, args.rounds)
        mem = {} if args.no_memory else peaks(name, args.batch_size, args.image_size)
        lines.append(f"| {name} | {size}x{size} | {r:.2f}x | {n:.2f}x | {_kept(kept)} | {_mem_cells(mem)}")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
