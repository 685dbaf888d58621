"""torchvision and timm models as users have them: exact per-sample gradients, no fallback.

Their wheels need a newer torch than CI's (torchvision does not import beside torch
2.13), so this is a script, run in its own environment::

    python -m venv venv-vision && venv-vision/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    venv-vision/bin/pip install --no-deps -e . && venv-vision/bin/python benchmarks/zoo_vision.py

Each model is built with random weights (``weights=None`` / ``pretrained=False``, no
download), in train mode (BatchNorm is replaced by privatize's GroupNorm rewrite),
and privatized twice: ``capture="auto"`` with the batch as ``example_inputs`` (what a
``make_private`` user gets: symbolic tracing when it reads the whole model and serves
its folds) and ``capture="export"`` (``torch.export``). For each,
in float64 on a batch of 3: the largest relative difference between ``grad_sample``
and each sample's gradient computed alone, the capture ops served by the
``torch.func`` fallback (must be none), and the time to privatize and capture.
Results: ``results/zoo_vision.md``.

``--steps`` times the same models' training steps instead (float32, batch 16 at the sizes
above, 1 thread) with ``bench_vision.py``'s harness: the non-private step of the model as
the user has it (BatchNorm kept) and fxdp's book-keeping DP-SGD step, interleaved in one
process; the median of per-round ratios, and the noise draw alone against the non-private
step (a floor no DP step avoids). Results: ``results/zoo_vision_steps.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fxdp  # noqa: E402


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return make


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return make


def _tv_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


#: name -> (builder, input size)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "torchvision resnet18": (_tv("resnet18", num_classes=10), 32),
    "torchvision mobilenet_v3_small": (_tv("mobilenet_v3_small", num_classes=10), 32),
    "torchvision efficientnet_b0": (_tv("efficientnet_b0", num_classes=10), 32),
    "torchvision convnext_tiny": (_tv("convnext_tiny", num_classes=10), 32),
    "torchvision vit (2 layers)": (_tv_vit, 32),
    "timm resnet10t": (_timm("resnet10t", num_classes=10), 32),
    "timm mobilenetv3_small_050": (_timm("mobilenetv3_small_050", num_classes=10), 32),
    "timm efficientnet_b0": (_timm("efficientnet_b0", num_classes=10), 32),
    "timm convnext_atto": (_timm("convnext_atto", num_classes=10), 32),
    "timm vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224", img_size=32, num_classes=10), 32),
    "timm deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224", img_size=32, num_classes=10), 32),
    # small configurations of the other families users fine-tune (windows, relative-position
    # biases, class attention, channel attention, pooling, hybrids, normalizer-free)
    "timm swin (2 stages)": (_timm("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=16,
                                   depths=(2, 2), num_heads=(2, 2), num_classes=10), 32),
    "timm swinv2 (2 stages)": (_timm("swinv2_tiny_window8_256", img_size=32, window_size=2, embed_dim=16,
                                     depths=(2, 2), num_heads=(2, 2), num_classes=10), 32),
    "timm beit (2 layers)": (_timm("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                   num_heads=2, num_classes=10), 32),
    "timm cait_xxs24 (2+1 layers)": (_timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2,
                                           depth_token_only=1, num_classes=10), 32),
    "timm xcit_nano_12_p16 (2 layers)": (_timm("xcit_nano_12_p16_224", img_size=32, depth=2, num_classes=10), 32),
    "timm eva02_tiny (2 layers)": (_timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2,
                                         num_classes=10), 28),
    "timm pit_ti": (_timm("pit_ti_224", img_size=64, num_classes=10), 64),
    "timm twins_pcpvt_small (1 block a stage)": (_timm("twins_pcpvt_small", img_size=32, depths=(1, 1, 1, 1),
                                                       num_classes=10), 32),
    "timm poolformer_s12": (_timm("poolformer_s12", num_classes=10), 32),
    "timm edgenext_xx_small": (_timm("edgenext_xx_small", num_classes=10), 64),
    "timm mobilevit_xxs": (_timm("mobilevit_xxs", num_classes=10), 64),
    "timm maxvit_tiny_rw": (_timm("maxvit_tiny_rw_224", img_size=64, num_classes=10), 64),
    "timm coatnet_0_rw": (_timm("coatnet_0_rw_224", img_size=64, num_classes=10), 64),
    "timm levit_128s": (_timm("levit_128s", img_size=64, num_classes=10), 64),
    "timm nf_resnet26": (_timm("nf_resnet26", num_classes=10), 32),
    "timm fastvit_t8": (_timm("fastvit_t8", num_classes=10), 64),
    "timm repvit_m0_9": (_timm("repvit_m0_9", num_classes=10), 64),
    "timm ghostnet_100": (_timm("ghostnet_100", num_classes=10), 32),
    "timm densenet121": (_timm("densenet121", num_classes=10), 32),
    "timm dla34": (_timm("dla34", num_classes=10), 32),
    "timm hgnetv2_b0": (_timm("hgnetv2_b0", num_classes=10), 64),
}


def no_randomness(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth off (torchvision's StochasticDepth, timm's DropPath, timm's
    ``drop_rate``):
    the batch and each sample alone would draw different masks."""
    for m in model.modules():
        for attr in ("p", "drop_prob"):
            if isinstance(getattr(m, attr, None), float) and ("Drop" in type(m).__name__
                                                               or "Stochastic" in type(m).__name__):
                setattr(m, attr, 0.0)
        if isinstance(getattr(m, "drop_rate", None), float):  # timm's F.dropout in forward (GhostNet's head)
            m.drop_rate = 0.0
    return model


def per_sample_error(model: nn.Module, capture: str, x: torch.Tensor) -> Dict[str, Any]:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # "auto" with the batch as example inputs, as make_private privatizes (its loader's batch)
        example = (x,) if capture == "auto" else None
        dp = fxdp.privatize(model, loss_reduction="sum", capture=capture, example_inputs=example)
        out = dp(x)
    t_capture = time.perf_counter() - t0
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    ref_model = dp._source_root  # the rewritten model (GroupNorm for BatchNorm), same Parameters
    named = [(n, p) for n, p in ref_model.named_parameters() if p.requires_grad]
    got = {n: p.grad_sample for n, p in named}
    worst = 0.0
    missing = [n for n, g in got.items() if g is None]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad((ref_model(x[i:i + 1]) * w[i:i + 1]).sum(), [p for _, p in named],
                                    allow_unused=True)
        # a gradient that is zero in exact arithmetic (a key's bias under softmax, a norm's bias
        # before PoolFormer's pool(x) - x) is rounding noise: measured against the sample's scale
        floor = 1e-9 * max(float(g.abs().max()) for g in grads if g is not None)
        for (n, p), g in zip(named, grads):
            if got[n] is None or g is None:
                continue
            worst = max(worst, float((got[n][i] - g).abs().max() / max(float(g.abs().max()), floor, 1e-30)))
    for _, p in named:
        p.grad_sample = None
        p.grad = None
    fallback = [c.capture_name for c in dp.captures if c.kind == "functorch"]
    return {"path": type(dp).__name__, "captures": len(dp.captures), "fallback": fallback, "missing": missing,
            "max_rel_err": worst, "capture_s": t_capture,
            "fxdp_warnings": [str(m.message)[:120] for m in caught if "fxdp" in str(m.message)]}


def steps_main(a: argparse.Namespace) -> None:
    sys.path.insert(0, HERE)
    from bench_vision import ratio  # the step harness of issue 13's vision table

    torch.set_num_threads(a.threads)
    rows: List[str] = []
    for name in a.models:
        make, size = MODELS[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r, noise, kept, plain_ms = ratio(make, size, a.batch_size, a.rounds)
            params = sum(p.numel() for p in make().parameters() if p.requires_grad)
            rows.append(f"| {name} | {size} | {params / 1e6:.2f}M | {plain_ms:.1f} | **{r:.2f}x** | {noise:.2f}x | "
                        f"{'kept' if kept else 'released'} |")
        except Exception as e:  # a refusal or a failure is a result
            traceback.print_exc(limit=3)
            rows.append(f"| {name} | {size} | - | - | failed: `{type(e).__name__}: {str(e).splitlines()[0][:120]}` | - | - |")
        print(rows[-1], flush=True)
    import torchvision
    import timm

    head = [
        "# torchvision / timm zoo: book-keeping DP-SGD step time (benchmarks/zoo_vision.py --steps)",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"{platform.machine()}, {a.threads} thread(s); float32, batch {a.batch_size}, random weights, train mode. "
        "Non-private: the model as the user has it (BatchNorm kept), SGD. fxdp: `privatize(model, "
        "grad_sample_mode=\"bk\", example_inputs=batch)` (BatchNorm replaced by GroupNorm) and `DPOptimizer`. "
        f"`bench_vision.py`'s harness: interleaved in one process, {a.rounds} rounds after its warm-up; medians of "
        "per-round ratios. `noise alone`: fxdp's draw of the trainable parameters' Gaussian noise into a held "
        "buffer, in the same rounds, against the non-private step (a floor every DP-SGD step pays). `noise buffer`: "
        "held between steps or released, as fxdp decided.",
        "",
        "| model | input | trainable params | non-private ms | bk / non-private | noise alone / non-private | noise buffer |",
        "|---|---|---|---|---|---|---|",
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(head + rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--steps", action="store_true", help="time training steps (float32) instead")
    ap.add_argument("--batch-size", type=int, default=None, help="3 (per-sample check) or 16 (--steps)")
    ap.add_argument("--rounds", type=int, default=7, help="--steps: interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="--steps: intra-op threads")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.steps:
        a.batch_size = a.batch_size or 16
        a.out = a.out or os.path.join(HERE, "results", "zoo_vision_steps.md")
        return steps_main(a)
    a.batch_size = a.batch_size or 3
    a.out = a.out or os.path.join(HERE, "results", "zoo_vision.md")
    torch.set_default_dtype(torch.float64)
    rows: List[str] = []
    for name in a.models:
        make, size = MODELS[name]
        for capture in ("auto", "export"):
            torch.manual_seed(0)
            try:
                model = no_randomness(make().double().train())
                x = torch.randn(a.batch_size, 3, size, size)
                r = per_sample_error(model, capture, x)
                ok = r["max_rel_err"] < 1e-6 and not r["fallback"] and not r["missing"]
                rows.append(f"| {name} | {capture} | {r['path']} | {r['captures']} | {len(r['fallback'])} | "
                            f"{len(r['missing'])} | {r['max_rel_err']:.1e} | {r['capture_s']:.1f} s | "
                            f"{'exact' if ok else 'NOT EXACT'} |")
            except Exception as e:  # a refusal or a failure is a result
                traceback.print_exc(limit=3)
                rows.append(f"| {name} | {capture} | - | - | - | - | - | - | refused/failed: "
                            f"`{type(e).__name__}: {str(e).splitlines()[0][:150]}` |")
            print(rows[-1], flush=True)
    import torchvision
    import timm

    head = [
        "# torchvision / timm zoo: per-sample gradients (benchmarks/zoo_vision.py)",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"{platform.machine()}; float64, batch {a.batch_size}, random weights, train mode, dropout and stochastic depth off (the batch and each sample alone would draw different masks). "
        "`max rel err`: largest |grad_sample[i] - grad of sample i alone| / max |grad| over parameters and samples "
        "(a parameter's max |grad| taken as at least 1e-9 of the sample's largest: a gradient that is zero in exact "
        "arithmetic, such as an attention key's bias, is rounding noise). `auto`: privatize's default capture given "
        "the batch as example inputs, as make_private gives it its loader's batch (a model whose windows symbolic "
        "tracing reads but cannot serve takes the export path).",
        "",
        "| model | capture | module | capture ops | on torch.func fallback | without grad_sample | max rel err | "
        "privatize + first call | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()
