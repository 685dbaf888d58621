"""Privacy commands of ``python -m fxdp`` (registered by :mod:`fxdp.cli`).

::

    fxdp epsilon --noise 1.1 --sample-rate 0.004 --steps 10000 --delta 1e-5 [--accountant prv|rdp|gdp|all]
    fxdp noise --target-epsilon 3 --delta 1e-5 --sample-rate 0.004 --epochs 30 [--accountant ...]
    fxdp card out/digits-dp [--verify] [--json]
    fxdp plot-budget --noise 1.1 --sample-rate 0.004 --epochs 30 --delta 1e-5 -o budget.png

Exit codes: 0 success, 1 ``card --verify`` found a mismatch, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from typing import Any, Callable, Dict, List, Optional

__all__ = ["SUBCOMMANDS"]

_DEFAULT = "prv"
#: what each built-in accountant's epsilon is (the names come from the registry, see _names)
_NOTES = {"prv": "upper bound", "rdp": "upper bound", "gdp": "approximation (not a bound)"}
_NO_NOTE = "added with register_accountant"


def _usage(message: str) -> Exception:
    """fxdp.cli.UsageError (imported late: fxdp.cli imports this module to register it)."""
    from .cli import UsageError

    return UsageError(message)


def _names() -> List[str]:
    """The accountant names, from the one list: the registry ``fxdp.accountants.registry``
    (built-ins and those added with ``register_accountant``), the default first. Imported
    here, not at start-up; ``import fxdp`` has loaded it already, and scipy stays lazy."""
    from .accountants.registry import ACCOUNTANTS

    return sorted(ACCOUNTANTS, key=lambda n: n != _DEFAULT)  # stable: then the registry's order


def _accountants(name: str) -> List[str]:
    return _names() if name == "all" else [name]


def _steps(args: argparse.Namespace) -> int:
    """Steps from ``--steps`` or ``--epochs`` (``ceil(epochs / q)``)."""
    if (args.steps is None) == (args.epochs is None):
        raise _usage("give exactly one of --steps and --epochs")
    if args.steps is not None:
        if args.steps < 1:
            raise _usage(f"--steps must be at least 1, got {args.steps}")
        return args.steps
    if not args.epochs > 0 or not math.isfinite(args.epochs):
        raise _usage(f"--epochs must be > 0, got {args.epochs}")
    return max(1, math.ceil(args.epochs / args.sample_rate))


def _check_rate_delta(args: argparse.Namespace) -> None:
    if not 0 < args.sample_rate <= 1:
        raise _usage(f"--sample-rate must be in (0, 1] (expected batch size / dataset size), got {args.sample_rate}")
    if not 0 < args.delta < 1:
        raise _usage(f"--delta must be in (0, 1), e.g. 1e-5, got {args.delta}")


def _epsilon(name: str, sigma: float, q: float, steps: int, delta: float) -> Dict[str, Any]:
    from .accountants import create_accountant

    acc = create_accountant(name)
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():  # gdp warns it is an approximation: the output says so
        warnings.simplefilter("ignore")
        eps = float(acc.get_epsilon(delta))
    row: Dict[str, Any] = {"accountant": name, "epsilon": eps, "kind": _NOTES.get(name, _NO_NOTE)}
    if hasattr(acc, "get_epsilon_bounds"):
        lo, _, hi = acc.get_epsilon_bounds(delta)
        row["bounds"] = [float(lo), float(hi)]
    return row


def _add_schedule(p: argparse.ArgumentParser, epochs_required: bool = False) -> None:
    p.add_argument("--sample-rate", "-q", type=float, required=True, metavar="Q",
                   help="Poisson sample rate: expected batch size / dataset size, e.g. 0.004")
    p.add_argument("--delta", type=float, required=True, help="delta of the guarantee, e.g. 1e-5 (below 1/N)")
    if not epochs_required:
        p.add_argument("--steps", type=int, default=None, help="number of DP-SGD steps")
    p.add_argument("--epochs", type=float, required=epochs_required, default=None,
                   help="number of epochs (steps = ceil(epochs / sample rate))")
    names = _names()
    p.add_argument("--accountant", choices=names + ["all"], default=_DEFAULT,
                   help="; ".join(f"{n}{' (default)' if n == _DEFAULT else ''}: {_NOTES.get(n, _NO_NOTE)}"
                                  for n in names) + "; or all")
    p.add_argument("--json", action="store_true", help="print JSON")


# --- epsilon ---------------------------------------------------------------------------------

def add_epsilon(sub: Any) -> None:
    p = sub.add_parser("epsilon", help="epsilon spent by DP-SGD at a noise multiplier, sample rate and length",
                       description="Epsilon of DP-SGD (Poisson-subsampled Gaussian mechanism) after a number of "
                                   "steps, by one or all accountants.",
                       epilog="example: fxdp epsilon --noise 1.1 --sample-rate 0.004 --steps 10000 --delta 1e-5")
    p.add_argument("--noise", "--noise-multiplier", dest="noise", type=float, required=True, metavar="SIGMA",
                   help="noise multiplier sigma (noise std / clip bound)")
    _add_schedule(p)
    p.set_defaults(run=run_epsilon)


def run_epsilon(args: argparse.Namespace) -> int:
    _check_rate_delta(args)
    if not args.noise > 0 or not math.isfinite(args.noise):
        raise _usage(f"--noise must be a finite number > 0, got {args.noise}")
    steps = _steps(args)
    rows = []
    for name in _accountants(args.accountant):
        try:
            rows.append(_epsilon(name, args.noise, args.sample_rate, steps, args.delta))
        except ValueError as e:
            raise _usage(str(e)) from None
    if args.json:
        print(json.dumps({"noise_multiplier": args.noise, "sample_rate": args.sample_rate, "steps": steps,
                          "epochs": steps * args.sample_rate, "delta": args.delta, "results": rows}, indent=2))
        return 0
    print(f"noise {args.noise:g}, sample rate {args.sample_rate:g}, {steps} steps "
          f"({steps * args.sample_rate:.4g} epochs), delta {args.delta:g}")
    for r in rows:
        bounds = f"  [{r['bounds'][0]:.4f}, {r['bounds'][1]:.4f}]" if "bounds" in r else ""
        print(f"  {r['accountant']:<4} epsilon = {r['epsilon']:.4f}  ({r['kind']}){bounds}")
    return 0


# --- noise -----------------------------------------------------------------------------------

def add_noise(sub: Any) -> None:
    p = sub.add_parser("noise", help="smallest noise multiplier that meets a target epsilon",
                       description="Noise multiplier sigma such that DP-SGD at the given sample rate and length "
                                   "stays within (target epsilon, delta).",
                       epilog="example: fxdp noise --target-epsilon 3 --delta 1e-5 --sample-rate 0.004 --epochs 30")
    p.add_argument("--target-epsilon", type=float, required=True, metavar="EPS", help="epsilon to reach")
    _add_schedule(p)
    p.set_defaults(run=run_noise)


def run_noise(args: argparse.Namespace) -> int:
    from .accountants import get_noise_multiplier

    _check_rate_delta(args)
    if not args.target_epsilon > 0 or not math.isfinite(args.target_epsilon):
        raise _usage(f"--target-epsilon must be a finite number > 0, got {args.target_epsilon}")
    steps = _steps(args)
    rows = []
    for name in _accountants(args.accountant):
        try:
            with warnings.catch_warnings():  # gdp warns it is an approximation: the output says so
                warnings.simplefilter("ignore")
                sigma = get_noise_multiplier(target_epsilon=args.target_epsilon, target_delta=args.delta,
                                             sample_rate=args.sample_rate, steps=steps, accountant=name)
        except ValueError as e:
            raise _usage(str(e)) from None
        rows.append({"accountant": name, "noise_multiplier": float(sigma),
                     "epsilon": _epsilon(name, sigma, args.sample_rate, steps, args.delta)["epsilon"]})
    if args.json:
        print(json.dumps({"target_epsilon": args.target_epsilon, "delta": args.delta, "sample_rate": args.sample_rate,
                          "steps": steps, "results": rows}, indent=2))
        return 0
    print(f"target epsilon {args.target_epsilon:g}, delta {args.delta:g}, sample rate {args.sample_rate:g}, "
          f"{steps} steps ({steps * args.sample_rate:.4g} epochs)")
    for r in rows:
        print(f"  {r['accountant']:<4} noise multiplier = {r['noise_multiplier']:.4f}  (epsilon {r['epsilon']:.4f})")
    return 0


# --- card ------------------------------------------------------------------------------------

def add_card(sub: Any) -> None:
    p = sub.add_parser("card", help="show (and verify) the privacy card of an fxdp.export directory",
                       description="Print the privacy card (privacy.json) of a directory written by fxdp.export. "
                                   "--verify recomputes epsilon from the card's noise history with its accountant "
                                   "and checks the SHA-256 hashes of the card and the files; exit 1 on a mismatch.",
                       epilog="example: fxdp card out/digits-dp --verify")
    p.add_argument("directory", help="export directory (holds privacy.json)")
    p.add_argument("--verify", action="store_true", help="recompute epsilon and check hashes (exit 1 on mismatch)")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(run=run_card)


def run_card(args: argparse.Namespace) -> int:
    import os

    from .card import format_card, read_card, verify_card
    from .errors import ExportError

    if not os.path.isdir(args.directory):
        raise _usage(f"{args.directory!r} is not a directory; pass the directory written by fxdp.export")
    try:
        card = read_card(args.directory)
    except ExportError as e:
        raise _usage(str(e)) from None
    problems: List[str] = []
    eps: Optional[float] = None
    if args.verify:
        problems, eps = verify_card(args.directory, card)
    if args.json:
        out: Dict[str, Any] = dict(card)
        if args.verify:
            out["verification"] = {"ok": not problems, "problems": problems, "recomputed_epsilon": eps}
        print(json.dumps(out, indent=2))
    else:
        try:
            print(format_card(card))
        except (KeyError, TypeError, AttributeError) as e:
            problems.append(f"privacy.json is missing or malforms field {e}")
        if args.verify:
            print()
            if problems:
                print("VERIFICATION FAILED:")
                for p in problems:
                    print(f"  - {p}")
            else:
                print(f"verified: epsilon {eps:.6g} recomputed from the history ({card['guarantee']['accountant']}); "
                      f"hashes of the card and {len(card['files'])} files match")
    return 1 if problems else 0


# --- plot-budget -----------------------------------------------------------------------------

def add_plot_budget(sub: Any) -> None:
    p = sub.add_parser("plot-budget", help="plot epsilon against epochs (needs matplotlib)",
                       description="Draw epsilon of DP-SGD against the number of epochs trained.",
                       epilog="example: fxdp plot-budget --noise 1.1 --sample-rate 0.004 --epochs 30 --delta 1e-5 "
                              "-o budget.png")
    p.add_argument("--noise", "--noise-multiplier", dest="noise", type=float, required=True, metavar="SIGMA",
                   help="noise multiplier sigma")
    _add_schedule(p, epochs_required=True)
    p.add_argument("--points", type=int, default=20, help="number of points on the curve (default 20)")
    p.add_argument("-o", "--output", required=True, help="image file to write (png, svg, pdf)")
    p.set_defaults(run=run_plot_budget)


def run_plot_budget(args: argparse.Namespace) -> int:
    _check_rate_delta(args)
    if not args.noise > 0:
        raise _usage(f"--noise must be > 0, got {args.noise}")
    if not args.epochs > 0:
        raise _usage(f"--epochs must be > 0, got {args.epochs}")
    if args.points < 2:
        raise _usage(f"--points must be at least 2, got {args.points}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _usage("plot-budget needs matplotlib: pip install matplotlib (or fxdp[plot])") from None
    total = max(1, math.ceil(args.epochs / args.sample_rate))
    steps = sorted({max(1, round(total * (i + 1) / args.points)) for i in range(args.points)})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in _accountants(args.accountant):
        try:
            eps = [_epsilon(name, args.noise, args.sample_rate, s, args.delta)["epsilon"] for s in steps]
        except ValueError as e:
            raise _usage(str(e)) from None
        ax.plot([s * args.sample_rate for s in steps], eps, marker=".", label=f"{name} ({_NOTES.get(name, _NO_NOTE)})")
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"epsilon at delta={args.delta:g}")
    ax.set_title(f"DP-SGD budget: noise {args.noise:g}, sample rate {args.sample_rate:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(args.output)
    except (OSError, ValueError) as e:
        raise _usage(f"cannot write {args.output!r}: {e}") from None
    print(f"wrote {args.output}")
    return 0


#: registered by fxdp.cli
SUBCOMMANDS: List[Callable[[Any], None]] = [add_epsilon, add_noise, add_card, add_plot_budget]
