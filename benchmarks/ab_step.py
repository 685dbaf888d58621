"""Interleaved A/B of fxdp book-keeping steps under code variants, in one process.

A variant is a set of overrides ``module:attr.path=expression`` (a class attribute, a
function, a module constant; the expression is evaluated in that module's namespace),
applied while its copy of the model is privatized and around each of its steps, and
undone after. Every round runs the non-private step and then each variant's, so the
machine's drift reaches them alike; reported are the median ms per step and the medians
of per-round ratios, to the non-private step and to the first variant. The A/Bs quoted in
``benchmarks/README.md`` (the Rounds) are runs of this kind.

Usage::

    python benchmarks/ab_step.py --model mnist --batch-size 32 --rounds 40 --repeat 5 \\
        --variant before "fxdp.rules.conv:_ConvMath.keeps_patch_rows=lambda self, geo, gout: False" \\
        --variant after
    python benchmarks/ab_step.py --model vit --variant a --variant b "fxdp.rules.linear:LinearRule.ghost_ratio=2.0"
    python benchmarks/ab_step.py --model tv:resnet18 --image-size 32 --variant a --variant b ...

Models: the Fast-DPSGD four (``models.py``), the Hugging Face zoo of ``bench_zoo.py`` (needs
transformers), ``tv:NAME`` (torchvision) and ``timm:NAME`` (the torch 2.14.1 venv of
``bench_vision.py``).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_models import M  # noqa: E402  (benchmarks/models.py, loaded by path)

import fxdp  # noqa: E402
from fxdp.optim import DPOptimizer  # noqa: E402

_MISSING = object()
Override = Tuple[Any, str, Any]  # (owner, attribute, value)


def parse_override(spec: str) -> Override:
    """``"module:attr.path=expression"`` -> (the attribute's owner, its name, the value)."""
    target, sep, expr = spec.partition("=")
    module, colon, path = target.partition(":")
    if not (sep and colon and path):
        raise ValueError(f"override {spec!r}: expected module:attr.path=expression")
    mod = importlib.import_module(module.strip())
    owner: Any = mod
    *parents, name = path.strip().split(".")
    for p in parents:
        owner = getattr(owner, p)
    if not hasattr(owner, name):
        raise AttributeError(f"override {spec!r}: {owner!r} has no attribute {name!r} (a typo would override nothing)")
    return owner, name, eval(expr, dict(vars(mod)))  # noqa: S307 - a command-line expression, as python -c


@contextmanager
def applied(overrides: Sequence[Override]) -> Iterator[None]:
    """Set each override, and restore the owner's own attribute (or its absence) after."""
    saved = [(o, n, vars(o).get(n, _MISSING)) for o, n, _ in overrides]
    try:
        for o, n, v in overrides:
            setattr(o, n, v)
        yield
    finally:
        for o, n, old in reversed(saved):
            if old is _MISSING:
                delattr(o, n)
            else:
                setattr(o, n, old)


def build(name: str, B: int, seq_len: int, image_size: int) -> Tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """``(model, loss_of_model)`` for the benchmark model ``name`` at batch size ``B``."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in M.MODELS:
        spec = M.MODELS[name]
        x, y = spec.batch(B, g)
        return spec.build(), lambda m: F.cross_entropy(m(x), y)
    if name.startswith(("tv:", "timm:")):
        lib, arch = name.split(":", 1)
        if lib == "tv":
            import torchvision

            model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
        else:
            import timm

            extra = {"img_size": image_size} if "vit" in arch or "deit" in arch else {}
            model = timm.create_model(arch, pretrained=False, num_classes=10, **extra)
        x, y = torch.randn(B, 3, image_size, image_size, generator=g), torch.randint(0, 10, (B,), generator=g)
        return model, lambda m: F.cross_entropy(m(x), y)
    import bench_zoo as Z

    if name not in Z.MODELS:
        raise ValueError(f"unknown model {name!r}: one of {sorted(M.MODELS)}, {Z.MODELS}, tv:NAME or timm:NAME")
    model, kind = Z.build(name, seq_len)
    xs, y = Z.batch(kind, B, seq_len)
    return model, lambda m: Z.loss_of(kind, m(**xs).logits, y)


def stepper(model: torch.nn.Module, loss_of: Callable[[Any], torch.Tensor], B: int,
            overrides: Sequence[Override] | None) -> Callable[[], None]:
    """One training step of ``model``: non-private SGD (``overrides`` None), or fxdp
    book-keeping DP-SGD privatized and run under ``overrides``."""
    model = copy.deepcopy(model).train()
    if overrides is None:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()

        return step
    with applied(overrides), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = fxdp.privatize(model, grad_sample_mode="bk")
    opt = DPOptimizer(torch.optim.SGD([p for p in dp.parameters() if p.requires_grad], lr=1e-3),
                      noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B,
                      generator=torch.Generator().manual_seed(1))
    opt.attach_bookkeeping(dp.bookkeeping)

    def dp_step() -> None:
        with applied(overrides):
            opt.zero_grad()
            loss_of(dp).backward()
            opt.step()

    return dp_step


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    variants = [(v[0], [parse_override(s) for s in v[1:]]) for v in args.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise ValueError("variant names must differ")
    model, loss_of = build(args.model, args.batch_size, args.seq_len, args.image_size)
    steps: Dict[str, Callable[[], None]] = {"non-private": stepper(model, loss_of, args.batch_size, None)}
    for name, ov in variants:
        steps[name] = stepper(model, loss_of, args.batch_size, ov)
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    ms: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            t = time.perf_counter()
            for _ in range(args.repeat):
                s()
            ms[k].append((time.perf_counter() - t) / args.repeat * 1e3)
    first = variants[0][0]
    rows = {k: {"ms": statistics.median(v),
                "vs_nonprivate": statistics.median(a / b for a, b in zip(v, ms["non-private"])),
                "vs_first": statistics.median(a / b for a, b in zip(v, ms[first]))}
            for k, v in ms.items()}
    print(f"\n{args.model}, B = {args.batch_size}, {args.rounds} rounds x {args.repeat} steps, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"| variant | overrides | ms | / non-private | / {first} |\n|---|---|---|---|---|")
    specs = dict((v[0], v[1:]) for v in args.variant)
    for k, r in rows.items():
        over = "; ".join(f"`{s}`" for s in specs.get(k, [])) or "-"
        print(f"| {k} | {over} | {r['ms']:.2f} | {r['vs_nonprivate']:.3f}x | "
              f"{'-' if k == 'non-private' else format(r['vs_first'], '.3f')} |")
    out = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds, "repeat": args.repeat,
           "variants": rows}
    print(json.dumps(out))
    return out


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128, help="the Hugging Face text models' T")
    ap.add_argument("--image-size", type=int, default=64, help="torchvision / timm models' input side")
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"),
                    help="a name, then overrides module:attr.path=expression (none: the code as it is)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="steps of each variant in a row per round (short steps)")
    ap.add_argument("--warmup", type=int, default=9, help="steps of each before timing (past the noise buffer's probe)")
    ap.add_argument("--threads", type=int, default=1)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
