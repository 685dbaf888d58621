"""The privacy card: what an exported model's DP guarantee is, and its verification.

A card (``privacy.json``) states the (epsilon, delta) example-level guarantee of a
DP-SGD run and everything needed to recompute it: the accountant and the
run-length history ``[(noise_multiplier, sample_rate, steps), ...]`` it composed.
It also records clipping, sampling, rewrites, the compatibility summary, versions,
SHA-256 hashes of the exported files and ``card_sha256``, the hash of the card's
own canonical JSON, so that an edited card or swapped weights are detected.
A hash detects accidents and naive tampering, not a forger who rewrites the hashes
too (there is no signature).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ._version import __version__
from .errors import ExportError

__all__ = ["build_card", "read_card", "verify_files", "verify_card", "recompute_epsilon", "format_card",
           "privacy_statement", "card_hash", "CARD_FORMAT"]

CARD_FORMAT = "fxdp-privacy-card/1"
_EPS_RTOL = 1e-6  # recomputed epsilon must match to this relative tolerance


#: the card's file name in an export directory
CARD_FILE = "privacy.json"


def sha256(path: Any) -> str:
    """SHA-256 of a file's bytes (the hashes a card lists)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_delta(engine: Any, binding: Any) -> float:
    """The budget's delta, else ``min(1e-5, 0.1/N)`` rounded down to a power of ten."""
    if engine.privacy_budget is not None:
        return float(engine.privacy_budget[1])
    n = max(1, int(getattr(binding, "num_samples", 1) or 1)) if binding is not None else 1
    return min(1e-5, 10.0 ** math.floor(math.log10(0.1 / n)))


def card_hash(card: Dict[str, Any]) -> str:
    """SHA-256 of the card's canonical JSON without its own ``card_sha256``."""
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dumps(card: Dict[str, Any]) -> str:
    return json.dumps(card, indent=2) + "\n"


def _epsilon_bounds(accountant: Any, delta: float) -> Optional[Dict[str, float]]:
    if not hasattr(accountant, "get_epsilon_bounds"):
        return None
    lower, estimate, upper = accountant.get_epsilon_bounds(delta)
    return {"lower": float(lower), "estimate": float(estimate), "upper": float(upper)}


_ACCOUNTANT_NOTES = {
    "prv": "PRV accountant (Gopi, Lee, Wutschitz 2021): epsilon is a proven upper bound; the true epsilon "
           "of the analysed mechanism lies in [lower, upper]",
    "rdp": "RDP accountant (Mironov 2017): epsilon is a proven upper bound (looser than PRV)",
    "gdp": "GDP accountant (Dong, Roth, Su 2019): a central-limit approximation, NOT a proven bound",
}


def privacy_statement(engine: Any, delta: Optional[float] = None) -> str:
    """Plain-language statement of what the engine's training protects, and what not."""
    binding = engine._binding()
    delta = default_delta(engine, binding) if delta is None else float(delta)
    name = engine.accountant_name
    if engine.steps == 0:
        return ("No DP training step has been taken: the model has not seen the data through this engine, "
                "and no privacy guarantee is stated yet.")
    eps = engine.get_epsilon(delta)
    n = getattr(binding, "num_samples", None)
    lines = [
        f"Example-level differential privacy: ({eps:.3g}, {delta:.3g})-DP after {engine.steps} DP-SGD steps"
        + (f" over a dataset of {n} examples" if n else "") + ".",
        "Protected: adding or removing any ONE training example changes the probability of any outcome of "
        f"training (the weights, and anything computed from them) by at most a factor e^{eps:.3g}, except with "
        f"probability {delta:.3g}. What the model reveals about any single example is bounded accordingly.",
        "Not protected: a person or source contributing k examples is covered only at about "
        f"(k*{eps:.3g}, k*e^((k-1)*{eps:.3g})*{delta:.3g}) (group privacy); statistics of the population that the model is meant to "
        "learn; data used outside this engine (pre-training, hyper-parameter tuning, evaluation); the "
        "architecture, the dataset size and the training configuration, which are public.",
        f"Accounting: {_ACCOUNTANT_NOTES.get(name, name)}.",
    ]
    if not engine.secure_mode:
        lines.append("Noise came from torch's pseudo-random generator, not a cryptographically secure one "
                     "(secure_mode=False): fine for research, use secure_mode=True for deployment.")
    for c in engine.caveats:
        lines.append(f"Caveat: {c}.")
    return "\n".join(lines)


def build_card(engine: Any, binding: Any, dp: Any, plain: Any, *, delta: float, report: Optional[Dict[str, Any]],
               files: Dict[str, str], torch_export: Dict[str, Any], example_inputs: Sequence[Any],
               example_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The privacy card (a JSON-ready dict) of an export, ``card_sha256`` included."""
    acc = engine.accountant
    history = [[float(s), float(q), int(n)] for s, q, n in acc.history]
    opt = binding.optimizer
    clip: Dict[str, Any] = {
        "mode": opt.clipping,
        "max_grad_norm": float(opt.max_grad_norm),
        "loss_reduction": opt.loss_reduction,
        "expected_batch_size": None if opt.expected_batch_size is None else float(opt.expected_batch_size),
    }
    if getattr(opt, "max_grad_norms", None):
        clip["max_grad_norms"] = [float(c) for c in opt.max_grad_norms]
    if opt.clipping == "adaptive":
        clip["note"] = "adaptive clipping (Andrew et al. 2021): max_grad_norm is the final bound"
    rewrites = []
    for r in dp.rewrites:
        d = r.to_dict()
        d["in_export"] = d["original"] if r.reversible else d["replacement"]
        rewrites.append(d)
    def described(t: Any) -> Dict[str, Any]:
        if isinstance(t, torch.Tensor):
            return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        return {"type": type(t).__name__}

    inputs = [described(t) for t in example_inputs]
    inputs += [{"name": k, **described(t)} for k, t in (example_kwargs or {}).items()]
    card: Dict[str, Any] = {
        "format": CARD_FORMAT,
        "guarantee": {
            "epsilon": engine.get_epsilon(delta),
            "delta": float(delta),
            "privacy_unit": "example-level",
            "neighbouring": "add/remove one example",
            "accountant": engine.accountant_name,
            "epsilon_bounds": _epsilon_bounds(acc, delta),
            "accountant_note": _ACCOUNTANT_NOTES.get(engine.accountant_name, ""),
        },
        "training": {
            "steps": engine.steps,
            "epochs": sum(q * n for _, q, n in history),
            "dataset_size": int(binding.num_samples),
            "sampling": "poisson" if binding.poisson else "shuffled fixed-size batches",
            "sample_rate": float(binding.sample_rate),
            "noise_multiplier_history": history,
            "clipping": clip,
            "secure_mode": bool(engine.secure_mode),
            "privacy_budget": list(engine.privacy_budget) if engine.privacy_budget else None,
            "caveats": list(engine.caveats),
        },
        "model": {
            "class": type(plain).__name__,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "example_inputs": inputs,
            "rewrites": rewrites,
            "compatibility": None if report is None else {"ok": report.get("ok"), **report.get("summary", {})},
            "torch_export": torch_export,
        },
        "statement": privacy_statement(engine, delta),
        "environment": {
            "fxdp": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "files": {name: {"sha256": h} for name, h in sorted(files.items())},
    }
    card["card_sha256"] = card_hash(card)
    return card


def read_card(directory: Any) -> Dict[str, Any]:
    """The card of an export directory (parsed, not verified)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ExportError(f"{path} does not exist. Fix: pass a directory written by fxdp.export")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is corrupted (not valid JSON: {e}); re-export the model") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ExportError(f"{path} is not an fxdp privacy card (format {card.get('format') if isinstance(card, dict) else None!r}, "
                          f"expected {CARD_FORMAT!r})")
    return card


def verify_files(directory: Any, card: Dict[str, Any]) -> List[str]:
    """Problems with the card's own hash and the hashes of the files it lists ([] if none)."""
    problems = []
    if card.get("card_sha256") != card_hash(card):
        problems.append("privacy.json: the card's content does not match its card_sha256 (the card was edited)")
    files = card.get("files")
    if not isinstance(files, dict) or not files:
        problems.append("privacy.json lists no file hashes")
        return problems
    for name, entry in files.items():
        path = Path(directory) / name
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != want:
            problems.append(f"{name}: SHA-256 differs from the card (the file was replaced or modified)")
    return problems


def recompute_epsilon(card: Dict[str, Any], accountant: Optional[str] = None) -> float:
    """Epsilon of the card's own noise history at its delta, by ``accountant``
    (default: the card's)."""
    from .accountants import create_accountant

    g, t = card["guarantee"], card["training"]
    acc = create_accountant(accountant or g["accountant"])
    acc.history = [(float(s), float(q), int(n)) for s, q, n in t["noise_multiplier_history"]]
    return float(acc.get_epsilon(float(g["delta"])))


def verify_card(directory: Any, card: Optional[Dict[str, Any]] = None) -> Tuple[List[str], float]:
    """(problems, recomputed epsilon): hashes checked and epsilon recomputed from the
    history with the card's accountant."""
    card = read_card(directory) if card is None else card
    problems = verify_files(directory, card)
    try:
        eps = recompute_epsilon(card)
    except Exception as e:  # a malformed history is a verification failure, not a crash
        return problems + [f"cannot recompute epsilon from the card's history: {type(e).__name__}: {e}"], math.nan
    stated = card["guarantee"].get("epsilon")
    if not isinstance(stated, (int, float)) or not math.isclose(eps, stated, rel_tol=_EPS_RTOL, abs_tol=1e-12):
        problems.append(f"epsilon: the card states {stated!r} but the history gives {eps!r} "
                        f"({card['guarantee']['accountant']} accountant)")
    steps = sum(int(n) for _, _, n in card["training"]["noise_multiplier_history"])
    if steps != card["training"].get("steps"):
        problems.append(f"steps: the card states {card['training'].get('steps')!r} but the history has {steps}")
    return problems, eps


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if v is None:
        return "-"
    return str(v)


def format_card(card: Dict[str, Any]) -> str:
    """The card as a readable two-column table."""
    g, t, m, env = card["guarantee"], card["training"], card["model"], card["environment"]
    rows: List[Tuple[str, str]] = [
        ("epsilon", _fmt(g["epsilon"]) + (f"  (PRV bounds [{g['epsilon_bounds']['lower']:.6g}, "
                                           f"{g['epsilon_bounds']['upper']:.6g}])" if g.get("epsilon_bounds") else "")),
        ("delta", _fmt(g["delta"])),
        ("privacy unit", f"{g['privacy_unit']} ({g.get('neighbouring', '')})"),
        ("accountant", g["accountant"]),
        ("steps / epochs", f"{t['steps']} / {t['epochs']:.4g}"),
        ("dataset size", _fmt(t["dataset_size"])),
        ("sampling", f"{t['sampling']}, rate {t['sample_rate']:.6g}"),
        ("noise multiplier", ", ".join(f"{s:.6g} x {n} steps (q={q:.4g})" for s, q, n in t["noise_multiplier_history"])),
        ("clipping", f"{t['clipping']['mode']}, max_grad_norm {t['clipping']['max_grad_norm']:.6g}"),
        ("secure mode", _fmt(t["secure_mode"])),
        ("model", f"{m['class']}, {m['parameters']} parameters"),
        ("rewrites", "; ".join(f"{r['path']}: {r['original']} -> {r['replacement']} (exported as {r['in_export']})"
                               for r in m["rewrites"]) or "none"),
        ("compatibility", "-" if not m.get("compatibility") else
         ("OK" if m["compatibility"]["ok"] else "NOT OK") + f", {m['compatibility'].get('errors', 0)} errors, "
         f"{m['compatibility'].get('warnings', 0)} warnings"),
        ("torch.export", m["torch_export"].get("file") or m["torch_export"].get("note", "-")),
        ("caveats", "; ".join(t["caveats"]) or "none"),
        ("versions", f"fxdp {env['fxdp']}, torch {env['torch']}, python {env['python']}"),
        ("created", env["created"]),
    ]
    for name, entry in card.get("files", {}).items():
        rows.append((f"sha256 {name}", entry.get("sha256", "-")[:16] + "..."))
    width = max(len(k) for k, _ in rows)
    out = ["fxdp privacy card", "=" * 17] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(out + ["", card.get("statement", "")])
