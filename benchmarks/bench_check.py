"""Time of ``fxdp.check`` on 100-layer models (target: under 2 s on CPU).

    python benchmarks/bench_check.py [--repeats 5] [--json]

Models (each has 100 layers with weights):
  mlp100   100 x (Linear + GELU) with residual connections and a LayerNorm every 10 layers
  cnn100   ResNet-style: 100 conv layers, each followed by BatchNorm (rewritten by privatize)
  tfm100   transformer encoder: 25 blocks x (attention in/out projection + 2 MLP linears) = 100
           linears (plus LayerNorms), with a causal mask and a padding mask

Reports the median wall time of the whole check (rewrites, tracing, the
batch-mixing analysis at two batch sizes, the capture pass for the layer table)
and, for the analysis alone, the median of ``analyze_batch_mixing`` on the traced
graph. The first call (imports, caches) is timed separately.
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxdp  # noqa: E402
from fxdp.passes.batch_mixing import analyze_batch_mixing  # noqa: E402
from fxdp.privatize import apply_rewrites  # noqa: E402
from fxdp.tracer import DPTracer, trace  # noqa: E402


class MLP100(nn.Module):
    def __init__(self, d: int = 64, depth: int = 100):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth // 10))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = x + F.gelu(layer(x))
            if i % 10 == 9:
                x = self.norms[i // 10](x)
        return x


class CNN100(nn.Module):
    def __init__(self, c: int = 16, depth: int = 100):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(depth - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(depth - 1))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv, bn in zip(self.convs, self.bns):
            x = x + F.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TFM100(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, blocks: int = 25, vocab: int = 100):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))

    def forward(self, tok, pad):
        T = tok.shape[1]
        causal = torch.ones((T, T), dtype=torch.bool).tril()
        mask = causal & ~pad[:, None, None, :]
        x = self.emb(tok)
        for b in self.blocks:
            x = b(x, mask)
        return x.mean(1)


def models():
    pad = torch.zeros(4, 16, dtype=torch.bool)
    pad[0, -3:] = True
    return {
        "mlp100": (MLP100, (torch.randn(4, 64),)),
        "cnn100": (CNN100, (torch.randn(4, 3, 16, 16),)),
        "tfm100": (TFM100, (torch.randint(0, 100, (4, 16)), pad)),
    }


def weighted_layers(m: nn.Module) -> int:
    return sum(1 for x in m.modules() if isinstance(x, (nn.Linear, nn.Conv2d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    for name, (cls, inputs) in models().items():
        model = cls()
        t = time.perf_counter()
        report = fxdp.check(model, inputs)
        first = time.perf_counter() - t
        assert report.ok and not report.warnings, str(report)
        full = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fxdp.check(model, inputs)
            full.append(time.perf_counter() - t)
        root, _ = apply_rewrites(model, {})
        gm = trace(root, DPTracer())
        analysis = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            analyze_batch_mixing(gm, inputs)
            analysis.append(time.perf_counter() - t)
        rows.append({
            "model": name, "layers": weighted_layers(model), "nodes": len(gm.graph.nodes),
            "first_s": round(first, 3), "check_s": round(statistics.median(full), 3),
            "analysis_s": round(statistics.median(analysis), 3),
        })
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    print(f"fxdp.check on CPU (torch {torch.__version__}, {torch.get_num_threads()} threads), median of "
          f"{args.repeats} runs")
    print(f"{'model':8} {'layers':>6} {'nodes':>6} {'first call':>11} {'check':>8} {'analysis':>9}")
    for r in rows:
        print(f"{r['model']:8} {r['layers']:>6} {r['nodes']:>6} {r['first_s']:>10.3f}s {r['check_s']:>7.3f}s "
              f"{r['analysis_s']:>8.3f}s")


if __name__ == "__main__":
    main()
