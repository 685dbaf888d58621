"""Plot ``results/models.json`` (from ``bench_models.py``) as ``results/models.png``:
one column per model; top, the slowdown against non-private PyTorch (median of
per-round ratios, log scale) per batch size for every variant; bottom, the step's
peak memory against non-private's (issue 13's target 1.3x). Needs matplotlib
(``pip install fxdp[plot]``).

Usage::

    python benchmarks/plot.py [--json benchmarks/results/models.json] [--out benchmarks/results/models.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = {
    "fxdp_materialize": "fxdp materialize",
    "fxdp_bk": "fxdp bk",
    "opacus_hooks": "Opacus hooks",
    "opacus_ghost": "Opacus ghost",
}
TITLES = {"mnist": "MNIST CNN", "cifar10": "CIFAR-10 CNN", "embedding": "IMDb embedding", "lstm": "IMDb LSTM"}
TARGETS = {"mnist": 1.5, "cifar10": 1.5, "embedding": 1.2, "lstm": 3.0}


MEMORY_TARGET = 1.3


def _time_ratio(cell: dict, name: str):
    return cell["variants"].get(name, {}).get("x_nonprivate")


def _memory_ratio(cell: dict, name: str):
    base = cell["variants"].get("nonprivate", {}).get("peak_mib")
    peak = cell["variants"].get(name, {}).get("peak_mib")
    return peak / base if base and peak is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "models.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "models.png"))
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("benchmarks/plot.py needs matplotlib: pip install matplotlib (or fxdp[plot])")
    with open(args.json) as f:
        data = json.load(f)
    models = [m for m in TITLES if any(c["model"] == m for c in data["cells"].values())]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7.2), squeeze=False)
    for col, m in enumerate(models):
        cells = sorted((c for c in data["cells"].values() if c["model"] == m), key=lambda c: c["batch_size"])
        for row, (value, target) in enumerate(((_time_ratio, TARGETS[m]), (_memory_ratio, MEMORY_TARGET))):
            ax = axes[row][col]
            for name, label in LABELS.items():
                pts = [(c["batch_size"], value(c, name)) for c in cells if value(c, name) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    style = "-o" if name.startswith("fxdp") else "--s"
                    ax.plot(xs, ys, style, label=label, lw=2.2 if name == "fxdp_bk" else 1.2)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(target, color="g", lw=0.8, ls=":", label=f"bk target {target}x")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(TITLES[m] + ("" if row == 0 else ": peak memory"))
            ax.set_xlabel("batch size")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("step time / non-private (median of ratios)")
    axes[1][0].set_ylabel("step peak memory / non-private")
    axes[0][-1].legend(fontsize=8)
    meta = data.get("meta", {})
    fig.suptitle(f"DP-SGD step time and peak memory vs non-private PyTorch ({meta.get('machine', '')}, "
                 f"{meta.get('threads', '?')} thread(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
