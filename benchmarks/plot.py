"""Plot ``results/models.json`` (from ``bench_models.py``) as ``results/models.png``:
one panel per model, slowdown against non-private PyTorch (median of per-round
ratios, log scale) per batch size for every variant. Needs matplotlib
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
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        cells = sorted((c for c in data["cells"].values() if c["model"] == m), key=lambda c: c["batch_size"])
        for name, label in LABELS.items():
            pts = [(c["batch_size"], c["variants"][name]["x_nonprivate"]) for c in cells
                   if name in c["variants"] and "x_nonprivate" in c["variants"][name]]
            if pts:
                xs, ys = zip(*pts)
                style = "-o" if name.startswith("fxdp") else "--s"
                ax.plot(xs, ys, style, label=label, lw=2.2 if name == "fxdp_bk" else 1.2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGETS[m], color="g", lw=0.8, ls=":", label=f"bk target {TARGETS[m]}x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(TITLES[m])
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("step time / non-private (median of ratios)")
    axes[0][-1].legend(fontsize=8)
    meta = data.get("meta", {})
    fig.suptitle(f"DP-SGD step slowdown vs non-private PyTorch ({meta.get('machine', '')}, "
                 f"{meta.get('threads', '?')} thread(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
