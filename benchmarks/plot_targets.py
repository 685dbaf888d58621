"""Every benchmarked model against issue 13's targets in one figure: ``results/targets.png``.

One bar per cell (model, batch size or input side): left, fxdp book-keeping's step time over
the non-private step (median of per-round ratios); right, its step peak memory over
non-private's. Each bar's target is the tick on its row (CNNs 1.5x, transformers 1.3x, the
embedding net 1.2x, the LSTM 3x; memory 1.3x); green bars meet it, red ones miss it. Read
from the saved tables: ``models.json`` (``bench_models.py``), ``zoo_t128.json``
(``bench_zoo.py --seq-len 128``), ``vision_steps.md`` and ``vision_steps_224.md``
(``bench_vision.py``). Needs matplotlib (``pip install fxdp[plot]``).

Usage::

    python benchmarks/plot_targets.py [--out benchmarks/results/targets.png]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MEMORY_TARGET = 1.3
MEMORY_SLACK_MIB = 0.3  # the memory children's repeatability: a cell within it of the target meets it
MODEL_TARGETS = {"mnist": ("MNIST CNN", 1.5), "cifar10": ("CIFAR-10 CNN", 1.5), "embedding": ("IMDb embedding", 1.2),
                 "lstm": ("IMDb LSTM", 3.0)}
ZOO_NAMES = {"bert": "BERT", "roberta": "RoBERTa", "distilbert": "DistilBERT", "gpt2": "GPT-2", "llama": "Llama",
             "vit": "HF ViT (64x64, T=65)", "lora-gpt2": "LoRA GPT-2"}
TRANSFORMER_TARGET, CNN_TARGET = 1.3, 1.5


class Cell(NamedTuple):
    label: str
    time: Optional[float]
    time_target: Optional[float]  # None: no target for this cell (the embedding net below B = 128)
    memory: Optional[float]  # bk peak / non-private peak
    memory_met: Optional[bool]


def _memory(np_mib: Optional[float], bk_mib: Optional[float]) -> tuple:
    if not np_mib or bk_mib is None:
        return None, None
    return bk_mib / np_mib, bk_mib <= MEMORY_TARGET * np_mib + MEMORY_SLACK_MIB


def models_cells(path: str) -> List[Cell]:
    """The Fast-DPSGD four at each batch size (``bench_models.py``)."""
    with open(path) as f:
        data = json.load(f)
    cells = []
    for c in sorted(data["cells"].values(), key=lambda c: (list(MODEL_TARGETS).index(c["model"]), c["batch_size"])):
        name, target = MODEL_TARGETS[c["model"]]
        if c["model"] == "embedding" and c["batch_size"] < 128:
            target = None  # "<= 1.2x from B = 128"
        v = c["variants"]
        mem, met = _memory(v.get("nonprivate", {}).get("peak_mib"), v.get("fxdp_bk", {}).get("peak_mib"))
        cells.append(Cell(f"{name}, B={c['batch_size']}", v.get("fxdp_bk", {}).get("x_nonprivate"), target, mem, met))
    return cells


def zoo_cells(path: str) -> List[Cell]:
    """The Hugging Face zoo (``bench_zoo.py``): transformers, target 1.3x."""
    with open(path) as f:
        data = json.load(f)
    cells = []
    for c in data:
        v = c["variants"]
        mem, met = _memory(v.get("nonprivate", {}).get("peak_mib"), v.get("fxdp_bk", {}).get("peak_mib"))
        T = f", T={c['seq_len']}" if c.get("seq_len") and c["model"] != "vit" else ""
        cells.append(Cell(f"{ZOO_NAMES.get(c['model'], c['model'])}{T}, B={c['batch_size']}",
                          v.get("fxdp_bk", {}).get("vs_nonprivate"), TRANSFORMER_TARGET, mem, met))
    return cells


_ROW = re.compile(r"^\| (?P<model>(?:torchvision|timm) \S+) \| (?P<side>\d+x\d+) \| (?P<time>[\d.]+)x \|"
                  r"(?:[^|]*\|){2} (?P<np>[\d.]+) \| (?P<bk>[\d.]+) \(")


def vision_cells(path: str) -> List[Cell]:
    """The torchvision / timm rows of a ``bench_vision.py`` table (its markdown: the script
    writes no JSON); the ViT is a transformer (1.3x), the rest CNNs (1.5x)."""
    cells = []
    with open(path) as f:
        for line in f:
            m = _ROW.match(line)
            if m is None:
                continue
            mem, met = _memory(float(m["np"]), float(m["bk"]))
            target = TRANSFORMER_TARGET if "vit" in m["model"] else CNN_TARGET
            cells.append(Cell(f"{m['model']} {m['side']}", float(m["time"]), target, mem, met))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(RESULTS, "targets.png"))
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("benchmarks/plot_targets.py needs matplotlib: pip install matplotlib (or fxdp[plot])")
    groups = [("Fast-DPSGD models (torch 2.13)", models_cells(os.path.join(RESULTS, "models.json"))),
              ("Hugging Face, T = 128 (torch 2.13)", zoo_cells(os.path.join(RESULTS, "zoo_t128.json"))),
              ("torchvision / timm, B = 16 (torch 2.14.1)",
               vision_cells(os.path.join(RESULTS, "vision_steps.md"))
               + vision_cells(os.path.join(RESULTS, "vision_steps_224.md")))]
    rows: List[Optional[Cell]] = []  # None: a group's heading
    headings = {}
    for name, g in groups:
        headings[len(rows)] = name
        rows += [None] + g
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 0.27 * len(rows) + 1.4), sharey=True)
    y = list(range(len(rows)))[::-1]
    for ax, value, target, met, title in (
            (ax_t, lambda c: c.time, lambda c: c.time_target,
             lambda c: None if c.time_target is None else c.time <= c.time_target, "step time / non-private"),
            (ax_m, lambda c: c.memory, lambda c: MEMORY_TARGET, lambda c: c.memory_met,
             f"step peak memory / non-private (within {MEMORY_SLACK_MIB} MiB of the target: met)")):
        for yi, c in zip(y, rows):
            v = None if c is None else value(c)
            if v is None:
                continue
            ok = met(c)
            ax.barh(yi, v, color="tab:grey" if ok is None else "tab:green" if ok else "tab:red", alpha=0.8)
            if target(c) is not None:
                ax.plot([target(c)] * 2, [yi - 0.45, yi + 0.45], color="k", lw=1.5)
            ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=7)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    ax_t.set_yticks(y)
    ax_t.set_yticklabels([headings[i] if c is None else c.label for i, c in enumerate(rows)], fontsize=7)
    for i, tick in enumerate(ax_t.get_yticklabels()):
        if rows[i] is None:
            tick.set_fontweight("bold")
    fig.suptitle("fxdp book-keeping against issue 13's targets (black ticks), every benchmarked cell; 2-core CPU, "
                 "1 thread; green: met, red: missed, grey: no target", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
