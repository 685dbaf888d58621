"""DP-SGD step time on Hugging Face models as users have them (captured with torch.export).

Models built from configs with random weights (no download), default dropout,
called with keyword inputs (``input_ids``, ``attention_mask``; ``pixel_values``
for ViT), the loss computed outside the model. Variants, interleaved round-robin
in one process (the harness of ``bench_lstm.py``/``bench_attention.py``), each a
full step (zero_grad, forward, loss, backward, optimizer step with clip + noise):

* ``nonprivate``: plain PyTorch + SGD;
* ``fxdp_bk`` / ``fxdp_materialize``: ``fxdp.privatize`` + ``DPOptimizer``;
* ``fxdp_bk_measure``: book-keeping with ``bk_methods="measure"`` (each layer's ghost or
  materialized norm timed on the first batch, the faster kept); the cell records, per
  layer, the measured winner against the cost model's choice (``bk_methods``);
* ``fxdp_bk_compile``: book-keeping with ``dp.compile()`` (``torch.compile`` of the code
  between capture ops; compile time excluded, it happens in the warm-up steps);
* ``opacus_hooks`` / ``opacus_ghost``: Opacus' ``make_private`` (when it accepts the
  model; ghost clipping only for classification heads, where its loss wrapper applies).

Reports the median of per-round ratios to ``nonprivate``, and the peak memory a step adds
(non-private, fxdp and Opacus, each in a child process: ``_memory.py``); a variant that fails is
reported with its error. Results: ``results/zoo.json`` and ``results/zoo.md``.

Usage::

    python benchmarks/bench_zoo.py                     # every model, B=16, T=64
    python benchmarks/bench_zoo.py --models bert gpt2 --batch-size 16 --seq-len 128
    python benchmarks/bench_zoo.py --seq-len 128 --variants nonprivate fxdp_bk fxdp_bk_measure opacus_hooks \
        --out results/zoo_t128
    python benchmarks/bench_zoo.py --width base --layers 1 --seq-len 512 --batch-size 2 \
        --models bert gpt2 llama --out results/zoo_base_t512     # real layer widths, long sequences
    python benchmarks/bench_zoo.py --models gpt2 --vocab 50257 --seq-len 128 --out results/zoo_gpt2_vocab
                                                               # GPT-2's vocabulary: its tied embedding and head
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

import fxdp  # noqa: E402
from fxdp.optim import DPOptimizer  # noqa: E402
from fxdp.utils import keep_freed_memory  # noqa: E402

sys.path.insert(0, HERE)
from _memory import MEM_SLACK_MIB, WARMUP_STEPS, in_child, noise_held, peak_step_memory  # noqa: E402

import transformers  # noqa: E402

V, HID, LAYERS, HEADS, FF = 1000, 128, 2, 4, 512
LR, SIGMA, CLIP = 1e-3, 1.0, 1.0
#: ``--width``: hidden size, heads and MLP width ("tiny": the default above; "base": BERT-base /
#: GPT-2-small layers, whose [768, 3072] MLP takes ghost norms at T = 512)
WIDTHS = {"tiny": (128, 4, 512), "base": (768, 12, 3072)}
#: ViT's input: image side and patch side (``--image-size``, ``--patch-size``; 64 / 8: 65 tokens,
#: 224 / 16: ViT-B/16's 197)
IMAGE, PATCH = 64, 8


def set_size(width: str, layers: int, image: int = 64, patch: int = 8, vocab: int = 1000) -> None:
    """Every model's hidden size, heads, MLP width (``WIDTHS[width]``), layer count and
    vocabulary, and ViT's image and patch sides."""
    global HID, HEADS, FF, LAYERS, IMAGE, PATCH, V
    HID, HEADS, FF = WIDTHS[width]
    LAYERS = layers
    IMAGE, PATCH = image, patch
    V = vocab


def _lora(model: nn.Module) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return peft.get_peft_model(model, cfg)


def build(name: str, T: int) -> tuple:
    """(model, kind): kind is "cls", "lm" or "image"."""
    t = transformers
    if name == "bert":
        return t.BertForSequenceClassification(t.BertConfig(
            vocab_size=V, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FF, max_position_embeddings=max(512, T), num_labels=2)), "cls"
    if name == "roberta":
        return t.RobertaForSequenceClassification(t.RobertaConfig(
            vocab_size=V, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FF, max_position_embeddings=max(514, T + 2), num_labels=2)), "cls"
    if name == "distilbert":
        return t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=V, dim=HID, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FF,
            max_position_embeddings=max(512, T), num_labels=2)), "cls"
    if name in ("gpt2", "lora-gpt2"):
        m = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=HID, n_layer=LAYERS, n_head=HEADS,
                                           n_positions=max(1024, T), use_cache=False))
        return (_lora(m) if name == "lora-gpt2" else m), "lm"
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=V, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=HEADS, intermediate_size=FF, max_position_embeddings=max(512, T),
            use_cache=False)), "lm"
    if name == "deberta":  # DeBERTa-v3's layer: shared attention keys, relative positions only
        return t.DebertaV2ForSequenceClassification(t.DebertaV2Config(
            vocab_size=V, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FF, max_position_embeddings=max(512, T), num_labels=2, relative_attention=True,
            pos_att_type=["p2c", "c2p"], position_buckets=256, max_relative_positions=-1, share_att_key=True,
            norm_rel_ebd="layer_norm", position_biased_input=False)), "cls"
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(
            image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HID, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=FF, num_labels=10)), "image"
    raise ValueError(name)


MODELS = ["bert", "roberta", "distilbert", "gpt2", "llama", "vit", "lora-gpt2"]
#: ``--models deberta`` too (not in the saved zoo tables, which predate it)
EXTRA_MODELS = ["deberta"]


def batch(kind: str, B: int, T: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        return {"pixel_values": torch.randn(B, 3, IMAGE, IMAGE, generator=g)}, torch.randint(0, 10, (B,), generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
    return x, (ids if kind == "lm" else torch.randint(0, 2, (B,), generator=g))


def loss_of(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "lm":  # per-sample mean over tokens, mean over the batch
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1).mean()
    return F.cross_entropy(logits, y)


def variant(name: str, base: nn.Module, kind: str, x: Dict[str, torch.Tensor], y: torch.Tensor) -> Callable[[], None]:
    model = copy.deepcopy(base).train()
    B = y.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "nonprivate":
        opt = torch.optim.SGD(params, lr=LR)

        def step() -> None:
            opt.zero_grad()
            loss_of(kind, model(**x).logits, y).backward()
            opt.step()

        step.zero = opt.zero_grad  # type: ignore[attr-defined]  # read by the memory measurement
        return step
    if name.startswith("fxdp_"):
        mode = "bk" if name.startswith("fxdp_bk") else name[5:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = fxdp.privatize(model, grad_sample_mode=mode)
        opt = DPOptimizer(torch.optim.SGD(params, lr=LR), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                          expected_batch_size=B, generator=torch.Generator().manual_seed(1))
        if mode == "bk":
            opt.attach_bookkeeping(dp.bookkeeping)
            dp.bookkeeping.measure = name == "fxdp_bk_measure"
        if name == "fxdp_bk_compile":
            dp.compile()

        def step() -> None:
            opt.zero_grad()
            loss_of(kind, dp(**x).logits, y).backward()
            opt.step()

        step.dp = dp  # type: ignore[attr-defined]  # read back for the measured methods
        step.zero = opt.zero_grad  # type: ignore[attr-defined]
        step.held = noise_held(opt)  # type: ignore[attr-defined]  # the step's, kept between steps
        return step
    if name.startswith("opacus_"):
        from opacus import PrivacyEngine

        mode = name[7:]
        if kind != "image":  # as dp-transformers does: per-sample position (and segment) ids, or Opacus'
            B, T = x["input_ids"].shape  # embedding hook fails on the [1, T] ids broadcast over the batch
            x = dict(x, position_ids=torch.arange(T).expand(B, T).contiguous())
            if "token_type_ids" in inspect.signature(model.forward).parameters:
                x["token_type_ids"] = torch.zeros(B, T, dtype=torch.long)
            if isinstance(model, transformers.RobertaPreTrainedModel):
                x["position_ids"] = x["position_ids"] + 2  # RoBERTa's ids start after the padding index
        if mode == "ghost" and kind == "lm":
            raise RuntimeError("not run: Opacus' ghost loss wrapper takes [B, C] logits, not per-token LM logits")
        opt = torch.optim.SGD(params, lr=LR)
        leaves = list(x.values())
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*leaves, y), batch_size=B)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False,
                                               grad_sample_mode=mode, criterion=nn.CrossEntropyLoss(),
                                               noise_generator=torch.Generator().manual_seed(1))
        if mode == "ghost":
            gsm, dpopt, crit, _ = out

            def step() -> None:
                dpopt.zero_grad()
                crit(gsm(**x).logits, y).backward()
                dpopt.step()

            step.zero = dpopt.zero_grad  # type: ignore[attr-defined]
        else:
            gsm, dpopt, _ = out

            def step() -> None:
                dpopt.zero_grad()
                loss_of(kind, gsm(**x).logits, y).backward()
                dpopt.step()

            step.zero = dpopt.zero_grad  # type: ignore[attr-defined]
        return step
    raise ValueError(name)


VARIANTS = ["nonprivate", "fxdp_bk", "fxdp_bk_measure", "fxdp_bk_compile", "fxdp_materialize", "opacus_hooks",
            "opacus_ghost"]


def _methods(dp: Any) -> Dict[str, Any]:
    """Per layer: the measured book-keeping method against the cost model's choice."""
    rows = [r for rs in dp.bookkeeping_methods().values() for r in rs]
    return {"layers": len(rows), "cost_model_agrees": sum(r["method"] == r["model"] for r in rows),
            "measured_ms": round(sum(r["ms"][r["method"]] for r in rows), 2),
            "cost_model_ms": round(sum(r["ms"][r["model"]] for r in rows), 2),
            "disagreements": [{"layer": k, "shape": r["output_shape"], "model": r["model"], "measured": r["method"],
                               "ms": {m: round(t, 2) for m, t in r["ms"].items()}}
                              for k, rs in dp.bookkeeping_methods().items() for r in rs if r["method"] != r["model"]]}


def run(name: str, B: int, T: int, rounds: int, warmup: int, seconds: float,
        names: List[str] = VARIANTS, memory: bool = True) -> Dict[str, Any]:
    torch.manual_seed(0)
    base, kind = build(name, T)
    x, y = batch(kind, B, T)
    live: Dict[str, Callable[[], None]] = {}
    cell: Dict[str, Any] = {"model": name, "batch_size": B, "seq_len": T if kind != "image" else None,
                            "hidden": HID, "layers": LAYERS, "vocab": V,
                            **({"image": IMAGE, "patch": PATCH} if kind == "image" else {}),
                            "params": sum(p.numel() for p in base.parameters()), "variants": {}}
    for v in names:
        try:
            step = variant(v, base, kind, x, y)
            for _ in range(warmup):
                step()
            live[v] = step
            cell["variants"][v] = {}
        except Exception as e:  # a miss is a result
            cell["variants"][v] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            traceback.print_exc(limit=1)
    times: Dict[str, List[float]] = {k: [] for k in live}
    order = list(live)
    t0 = time.perf_counter()
    r = 0
    while r < rounds:
        for k in order[r % len(order):] + order[: r % len(order)]:
            t = time.perf_counter()
            live[k]()
            times[k].append(time.perf_counter() - t)
        r += 1
        if r >= 5 and time.perf_counter() - t0 > seconds:
            break
    base_t = times.get("nonprivate")
    opacus = [k for k in ("opacus_hooks", "opacus_ghost") if k in times]
    fastest = min(opacus, key=lambda k: statistics.median(times[k])) if opacus else None
    for k, ts in times.items():
        e = cell["variants"][k]
        e["ms"] = 1000 * statistics.median(ts)
        if base_t:
            e["vs_nonprivate"] = statistics.median(a / b for a, b in zip(ts, base_t))
        if fastest and k.startswith("fxdp"):
            e["vs_opacus_fastest"] = statistics.median(a / b for a, b in zip(ts, times[fastest]))
    cell["rounds"] = r
    cell["opacus_fastest"] = fastest
    if "fxdp_bk_measure" in live:
        cell["bk_methods"] = _methods(live["fxdp_bk_measure"].dp)  # type: ignore[attr-defined]
    if memory:
        for v in (k for k in MEMORY_VARIANTS if k in live):
            try:
                size = ["--width", next(w for w, d in WIDTHS.items() if d[0] == HID), "--layers", str(LAYERS),
                        "--image-size", str(IMAGE), "--patch-size", str(PATCH), "--vocab", str(V)]
                cell["variants"][v]["peak_mib"] = in_child(__file__, ["--memory-child", name, str(B), str(T), v] + size)[v]
            except Exception as e:  # a miss is reported, not hidden
                print(f"memory measurement failed for {name} {v}: {e}", file=sys.stderr)
    return cell


#: peak memory is measured for these (the timed-only variants measure or compile on top of fxdp_bk)
MEMORY_VARIANTS = ["nonprivate", "fxdp_bk", "fxdp_materialize", "opacus_hooks", "opacus_ghost"]


def memory_child(name: str, B: int, T: int, v: str) -> None:
    """One variant's peak step memory (``_memory.py``), alone in this process."""
    torch.manual_seed(0)
    base, kind = build(name, T)
    x, y = batch(kind, B, T)
    step = variant(v, base, kind, x, y)
    for _ in range(WARMUP_STEPS):
        step()
    print(json.dumps({v: peak_step_memory(step, step.zero, getattr(step, "held", lambda: 0))}))


def _label(c: Dict[str, Any]) -> str:
    """The model's name, with its width and depth where not the default (tiny, 2 layers)."""
    hid, layers = c.get("hidden", 128), c.get("layers", 2)
    notes = [] if (hid, layers) == (128, 2) else [f"{hid} wide, {layers} layer{'s' * (layers > 1)}"]
    if c.get("vocab", 1000) != 1000 and c.get("seq_len"):
        notes.append(f"vocabulary {c['vocab']:,}")
    if c.get("image", 64) != 64 or c.get("patch", 8) != 8:
        notes.append(f"{c['image']}x{c['image']} images, {c['patch']}x{c['patch']} patches")
    return f"{c['model']} ({'; '.join(notes)})" if notes else c["model"]


def write_md(cells: List[Dict[str, Any]], path: str, kept_freed: bool = False) -> None:
    kept = (" glibc keeps freed memory in the process (`--keep-freed-memory`: `fxdp.utils.keep_freed_memory()`,"
            " for every variant).") if kept_freed else ""
    lines = [
        "# Hugging Face zoo: DP-SGD step time (benchmarks/bench_zoo.py)",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s). Median of per-round ratios, variants interleaved in one process.{kept}",
        "",
        "| model | params | B | T | non-private ms | fxdp bk | fxdp bk, measured methods | fxdp bk, compiled | "
        "fxdp materialize | Opacus hooks | Opacus ghost | fxdp bk / Opacus fastest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(c: Dict[str, Any], k: str) -> str:
        e = c["variants"].get(k, {})
        if "error" in e:
            return "fails" if not e["error"].startswith("RuntimeError: not run") else "not run"
        return f"{e['vs_nonprivate']:.2f}x" if "vs_nonprivate" in e else "-"

    for c in cells:
        np_ms = c["variants"].get("nonprivate", {}).get("ms")
        bk = c["variants"].get("fxdp_bk", {})
        lines.append(
            f"| {_label(c)} | {c['params'] / 1e6:.2f}M | {c['batch_size']} | {c['seq_len'] or '-'} | "
            f"{np_ms:.1f} | {fmt(c, 'fxdp_bk')} | {fmt(c, 'fxdp_bk_measure')} | {fmt(c, 'fxdp_bk_compile')} | "
            f"{fmt(c, 'fxdp_materialize')} | "
            f"{fmt(c, 'opacus_hooks')} | "
            f"{fmt(c, 'opacus_ghost')} | "
            + (f"{bk['vs_opacus_fastest']:.2f}x |" if "vs_opacus_fastest" in bk else "- |")
        )
    with_mem = [c for c in cells if "peak_mib" in c["variants"].get("fxdp_bk", {})]
    if with_mem:
        lines += ["", "Peak memory one step adds above the model, optimizer state and data (MiB; a child process per "
                  "variant, `benchmarks/_memory.py`; fxdp's flat noise buffer counted as the step's). Target of "
                  f"issue 13: fxdp bk <= 1.3x non-private (met within {MEM_SLACK_MIB} MiB).", "",
                  "| model | non-private | fxdp bk | fxdp materialize | Opacus hooks | Opacus ghost | bk target |",
                  "|---|---|---|---|---|---|---|"]
        for c in with_mem:
            v = c["variants"]
            base = v.get("nonprivate", {}).get("peak_mib")

            def mib(k: str) -> str:
                p = v.get(k, {}).get("peak_mib")
                if p is None:
                    return "-"
                return f"{p:.1f}" + (f" ({p / base:.2f}x)" if base and k != "nonprivate" else "")

            bk = v["fxdp_bk"]["peak_mib"]
            met = base is not None and bk <= 1.3 * base + MEM_SLACK_MIB
            lines.append(f"| {_label(c)} | {mib('nonprivate')} | {mib('fxdp_bk')} | {mib('fxdp_materialize')} | "
                         f"{mib('opacus_hooks')} | {mib('opacus_ghost')} | {'met' if met else 'MISSED'} |")
    measured = [c for c in cells if "bk_methods" in c]
    if measured:
        lines += ["", "Book-keeping cost model checked against measurement (`bk_methods=\"measure\"`: each layer "
                  "with several exact methods timed on the first batch: ghost or materialized norms, and a "
                  "convolution's per-sample methods):", "",
                  "| model | layers timed | cost model picks the faster | their time, cost model's picks | "
                  "their time, measured picks |", "|---|---|---|---|---|"]
        for c in measured:
            b = c["bk_methods"]
            lines.append(f"| {_label(c)} | {b['layers']} | {b['cost_model_agrees']} | {b['cost_model_ms']:.1f} ms | "
                         f"{b['measured_ms']:.1f} ms |")
    errors = [(c["model"], k, e["error"]) for c in cells for k, e in c["variants"].items() if "error" in e]
    if errors:
        lines += ["", "Failures and variants not run:", ""]
        lines += [f"- {m}, {k}: `{err}`" for m, k, err in errors]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                    help="steps of each variant before the timed rounds (past fxdp's noise-buffer decision)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget per model (after 5 rounds)")
    ap.add_argument("--width", choices=list(WIDTHS), default="tiny",
                    help="hidden size / heads / MLP width: tiny 128/4/512, base 768/12/3072 (BERT-base, GPT-2-small)")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers of every model")
    ap.add_argument("--image-size", type=int, default=64, help="ViT's image side")
    ap.add_argument("--patch-size", type=int, default=8, help="ViT's patch side (224 / 16: ViT-B/16's 197 tokens)")
    ap.add_argument("--vocab", type=int, default=1000,
                    help="vocabulary of the text models (50257: GPT-2's, whose head is tied to its embedding)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "zoo"), help="writes OUT.json and OUT.md")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="fxdp.utils.keep_freed_memory() in the timing process (all variants; not the memory children)")
    ap.add_argument("--memory-child", nargs=4, metavar=("MODEL", "B", "T", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    set_size(a.width, a.layers, a.image_size, a.patch_size, a.vocab)
    if a.memory_child:
        m, B, T, v = a.memory_child
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memory_child(m, int(B), int(T), v)
        return
    if a.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: the C library is not glibc")
    cells = []
    for m in a.models:
        cell = run(m, a.batch_size, a.seq_len, a.rounds, a.warmup, a.seconds, a.variants, not a.no_memory)
        print(json.dumps({k: v for k, v in cell.items()}, indent=None, default=str))
        cells.append(cell)
    if not a.no_save:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(cells, f, indent=1)
        write_md(cells, a.out + ".md", a.keep_freed_memory)


if __name__ == "__main__":
    main()
