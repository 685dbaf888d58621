"""The package's shape (issue: one place per concept): module sizes, function sizes on
the training hot path, rules registered only under ``fxdp/rules/``, capture ops only
under ``fxdp/capture/``, clip factors computed only in ``fxdp/optim/clip.py``."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fxdp"
MAX_MODULE_LINES = 800
#: what runs every training step: capture ops, book-keeping, the optimizers, the rules, the DP layers
HOT_PATH = ("capture", "bookkeeping.py", "optim", "rules", "layers")
MAX_HOT_FUNCTION_LINES = 90  # body lines after the docstring ("about 80")


def _files():
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _body_lines(fn: ast.AST) -> int:
    body = fn.body
    first = body[0]
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    start = body[1].lineno if doc and len(body) > 1 else first.lineno
    return fn.end_lineno - start + 1


def test_no_module_over_800_lines():
    big = {_rel(p): n for p in _files() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_long_function_on_the_training_hot_path():
    long = []
    for p in _files():
        if not _rel(p).startswith(HOT_PATH):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_HOT_FUNCTION_LINES:
                long.append(f"{_rel(p)}:{node.name} ({_body_lines(node)} lines)")
    assert not long, long


def _decorator_names(node: ast.AST) -> list:
    names = []
    for d in getattr(node, "decorator_list", []):
        f = d.func if isinstance(d, ast.Call) else d
        names.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def test_rules_are_registered_only_under_rules():
    outside = []
    for p in _files():
        if _rel(p).startswith("rules/"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if {"register_rule", "register_module"} & set(_decorator_names(node)):
                outside.append(f"{_rel(p)}:{node.name}")
    assert not outside, f"rules registered outside fxdp/rules/: {outside}"


def test_capture_ops_live_in_the_capture_package():
    import fxdp  # noqa: F401 - every module that defines a capture op is imported
    from fxdp.capture import CaptureOp

    def subclasses(cls):
        for c in cls.__subclasses__():
            yield c
            yield from subclasses(c)

    outside = [f"{c.__module__}.{c.__name__}" for c in subclasses(CaptureOp)
               if c.__module__.startswith("fxdp.") and not c.__module__.startswith("fxdp.capture")]
    assert not outside, f"capture ops outside fxdp/capture/: {outside}"


def test_clip_factors_are_computed_only_in_optim_clip():
    """``min(1, C / (norm + eps))`` is written once: every other module calls ``fxdp.optim.clip``."""
    writers = []
    for p in _files():
        if _rel(p) == "optim/clip.py":
            continue
        src = p.read_text()
        if "clamp(max=1" in src.replace(" ", "") or "1e-6)).clamp" in src:
            writers.append(_rel(p))
    assert not writers, f"clip-factor formula outside fxdp/optim/clip.py: {writers}"
