"""Export of a DP-trained model with its privacy card, and loading it back.

``export(model, path, engine=engine, example_inputs=(x,))`` writes a directory:

* ``model.py``: self-contained, readable source of the DP-ready model (the graph
  of ``dp.strip()``: capture ops removed, reversible rewrites undone) that imports
  only ``torch``; ``load()`` there builds it with the trained weights.
* ``weights.pt``: the ``state_dict`` (``torch.load(..., weights_only=True)``).
* ``privacy.json``: the privacy card (:mod:`fxdp.card`): the (epsilon, delta)
  guarantee, how it was accounted, and SHA-256 hashes of the files and of the card.
* ``report.json``: the full :func:`fxdp.check` compatibility report.
* ``model.pt2``: ``torch.export`` of the inference graph, when it exports.

Before anything is written, the generated source is imported and run on
``example_inputs``; an export whose outputs differ from the trained model is refused.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import re
import os
import shutil
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ._version import __version__
from .card import CARD_FILE, sha256
from .errors import ExportError
from .example_inputs import call_inputs
from .layers.batchnorm import norm_groups

__all__ = ["export", "load", "generate_source", "ExportError"]

PathLike = Union[str, "os.PathLike[str]"]

MODEL_FILE, WEIGHTS_FILE, REPORT_FILE, PT2_FILE = "model.py", "weights.pt", "report.json", "model.pt2"
_CLASS = "DPReadyModel"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_LITERAL_LIMIT = 4096  # largest constant tensor written into model.py as a literal


# --- source generation -------------------------------------------------------------------


def _plain_attrs(m: nn.Module) -> Dict[str, Any]:
    """The constructor-visible configuration of a module: its public scalar attributes."""
    ok = (int, float, bool, str, tuple, type(None))
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and isinstance(v, ok)}


def _fingerprint(m: nn.Module) -> Tuple[Any, ...]:
    return (type(m), repr(m), _plain_attrs(m), [(k, tuple(v.shape)) for k, v in m.state_dict().items()])


def _literal(v: Any) -> Optional[str]:
    if isinstance(v, (bool, int, str, type(None))):
        return repr(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f"float({str(v)!r})"
    if isinstance(v, tuple):
        items = [_literal(x) for x in v]
        return None if None in items else "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return None


def _candidates(m: nn.Module) -> Iterator[str]:
    """Constructor expressions (``nn.<Class>(...)``) that may rebuild ``m``."""
    name = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):  # its repr shows submodules, not arguments
        yield (f"nn.MultiheadAttention({m.embed_dim}, {m.num_heads}, dropout={m.dropout!r}, "
               f"bias={m.in_proj_bias is not None}, add_bias_kv={m.bias_k is not None}, "
               f"add_zero_attn={m.add_zero_attn}, kdim={m.kdim}, vdim={m.vdim}, batch_first={m.batch_first})")
    r = repr(m)
    if "\n" not in r and r.startswith(name + "("):
        yield "nn." + r
    try:
        sig = inspect.signature(type(m).__init__)
    except (TypeError, ValueError):
        return
    args = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if not hasattr(m, p.name):
            continue
        v = getattr(m, p.name)
        lit = ("True" if v is not None else "False") if isinstance(v, Tensor) or v is None and p.name == "bias" else _literal(v)
        if lit is None:
            return
        args.append(f"{p.name}={lit}")
    yield f"nn.{name}({', '.join(args)})"


def _constructor(path: str, m: nn.Module) -> str:
    """A verified constructor expression for a standard torch.nn module, or ExportError."""
    cls = type(m)
    if not (cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls):
        raise ExportError(
            f"cannot write module {path!r} ({cls.__module__}.{cls.__qualname__}) into a self-contained "
            "model.py: it is not a standard torch.nn module and the graph calls it as a whole (it was "
            "kept as a leaf, e.g. because it is untraceable). Fix: make its forward traceable by "
            "torch.fx so that it is inlined, or replace it by standard torch.nn modules"
        )
    want = _fingerprint(m)
    for expr in _candidates(m):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = eval(expr, {"nn": nn, "torch": torch})  # noqa: S307 - our own generated literal
        except Exception:
            continue
        built.train(m.training)
        if _fingerprint(built) == want:
            return expr
    raise ExportError(
        f"cannot write module {path!r} ({cls.__name__}) into model.py: no constructor call rebuilds it "
        f"with the same configuration (its repr is {repr(m)[:120]!r}). Fix: report this module type "
        "to fxdp, or export the torch.export program (model.pt2) instead"
    )


def _tensor_literal(path: str, t: Tensor) -> str:
    if t.numel() > _LITERAL_LIMIT:
        raise ExportError(
            f"{path!r} is a constant tensor with {t.numel()} elements that is not in the state_dict "
            f"(a non-persistent buffer or a traced constant); model.py holds at most {_LITERAL_LIMIT} "
            "as literals. Fix: register it as a persistent buffer so that it travels in weights.pt"
        )
    return f"torch.tensor({t.detach().cpu().tolist()!r}, dtype={t.dtype})"


#: fxdp graph functions (``torch.fx.wrap``-ped) written into model.py as standalone
#: definitions, so that it needs no fxdp: "module.qualname" -> source of ``def {name}``
_PORTABLE = {
    # DPGroupNorm's group count (fxdp.layers.batchnorm.norm_groups): one group when a
    # group would hold at most 2 values; shape arithmetic only
    f"{norm_groups.__module__}.{norm_groups.__qualname__}": (
        "def {name}(input, num_groups, token):\n"
        "    C = int(input.shape[1]) if input.dim() > 1 else 1\n"
        "    spatial = math.prod(int(s) for s in input.shape[2:])\n"
        "    return num_groups if C // num_groups * spatial > 2 else 1\n"
    ),
}


def _global_imports(globals_: Dict[str, Any], src: str) -> Tuple[List[str], List[str]]:
    """Import lines and standalone definitions for the names the generated forward
    code refers to."""
    from torch.fx.graph import _custom_builtins

    lines: List[str] = []
    defs: List[str] = []
    used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", src))
    for name, obj in sorted(globals_.items()):
        if name not in used or name in ("torch",) or (name in vars(builtins) and getattr(builtins, name) is obj):
            continue
        portable = _PORTABLE.get(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
        if portable is not None:
            lines.append("import math")
            defs.append(portable.format(name=name))
        elif name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif isinstance(obj, types.ModuleType):
            lines.append(f"import {obj.__name__} as {name}" if name != obj.__name__ else f"import {name}")
        else:
            mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
            if not mod or not qual or "." in qual or "<" in qual or mod == "__main__" or mod.split(".")[0] == "fxdp":
                raise ExportError(
                    f"the model's forward calls {name!r} ({obj!r}), which model.py cannot import without "
                    "fxdp or your own code. Fix: use torch functions in forward, or define the function "
                    "in an installed module"
                )
            lines.append(f"from {mod} import {qual} as {name}" if qual != name else f"from {mod} import {qual}")
    return list(dict.fromkeys(lines)), defs


def _attach(path: str, expr: str) -> str:
    if path.isidentifier():
        return f"        self.{path} = {expr}"
    return f"        _attach(self, {path!r}, {expr})"


def generate_source(gm: fx.GraphModule, class_name: str = _CLASS, header: str = "") -> str:
    """Self-contained Python source (imports only torch) of the GraphModule ``gm``: a
    class whose ``__init__`` builds the submodules (standard torch.nn modules by their
    constructor, verified to rebuild the same configuration; containers as plain
    modules) and whose ``forward`` is ``gm``'s generated code."""
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(
            f"{type(gm).__name__} could not be traced by torch.fx as a whole (privatize kept it as one "
            "untraceable module), so there is no graph to write into model.py. Fix: make its forward "
            "traceable (see fxdp.check's report)"
        )
    code = gm.graph.python_code(root_module="self")
    imports, defs = _global_imports(code.globals, code.src)
    body: List[str] = []
    built: Dict[int, str] = {}
    leaves: set = set()  # modules built by a constructor call, with their children
    for path, m in gm.named_modules(remove_duplicate=False):
        if not path or any(path.startswith(leaf + ".") for leaf in leaves):
            continue  # the root, or built by its parent's constructor
        if id(m) in built:
            body.append(_attach(path, "self." + built[id(m)] if built[id(m)].isidentifier()
                                else f"self.get_submodule({built[id(m)]!r})"))
            continue
        if isinstance(m, _CONTAINERS):
            expr = f"nn.{type(m).__name__}()"
        elif type(m).__module__.startswith("torch.nn.") and getattr(nn, type(m).__name__, None) is type(m):
            expr = _constructor(path, m)
            leaves.add(path)
        else:
            called = any(n.op == "call_module" and n.target == path for n in gm.graph.nodes)
            if called:
                _constructor(path, m)  # raises with the module named
            expr = "nn.Module()"
        built[id(m)] = path
        body.append(_attach(path, expr))
    # parameters and buffers held directly by the root or by plain (non-leaf) modules
    owners = [("", gm)] + [(p, m) for p, m in gm.named_modules() if p and p not in leaves
                          and not any(p.startswith(leaf + ".") for leaf in leaves)]
    for owner, m in owners:
        prefix = owner + "." if owner else ""
        for name, p in m._parameters.items():
            if p is not None:
                body.append(f"        _attach(self, {prefix + name!r}, nn.Parameter(torch.empty({list(p.shape)}, "
                            f"dtype={p.dtype}), requires_grad={p.requires_grad}))")
        for name, b in m._buffers.items():
            if b is None:
                continue
            persistent = name not in m._non_persistent_buffers_set
            init = f"torch.empty({list(b.shape)}, dtype={b.dtype})" if persistent else _tensor_literal(prefix + name, b)
            body.append(f"        _attach_buffer(self, {prefix + name!r}, {init}, persistent={persistent})")
    # constants the graph reads that are neither parameters, buffers nor modules (traced tensor constants)
    state = set(dict(gm.named_parameters()).keys()) | set(dict(gm.named_buffers()).keys())
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in state:
            obj = _resolve(gm, n.target)
            if isinstance(obj, Tensor):
                body.append(f"        _attach_buffer(self, {n.target!r}, {_tensor_literal(n.target, obj)}, persistent=False)")
            elif not isinstance(obj, nn.Module):
                raise ExportError(f"the graph reads attribute {n.target!r} of type {type(obj).__name__}, "
                                  "which model.py cannot rebuild. Fix: make it a buffer or a parameter")
    dtypes = {t.dtype for t in list(gm.parameters()) + list(gm.buffers()) if t.is_floating_point()}
    if len(dtypes) == 1 and torch.float32 not in dtypes:
        body.append(f"        self.to({dtypes.pop()})")
    src = [line for line in code.src.strip("\n").splitlines()
           if not line.startswith("torch.fx._symbolic_trace.wrap(")]  # tracing markers, not needed to run
    forward = "\n".join(("    " + line) if line.strip() else "" for line in src)
    return _TEMPLATE.format(header=header, imports="\n".join(imports), defs="\n\n".join(defs), cls=class_name,
                            body="\n".join(body) or "        pass", forward=forward, weights=WEIGHTS_FILE)


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_TEMPLATE = '''"""{header}Generated by fxdp.export: the DP-trained model as plain PyTorch (needs only torch).

    from model import load
    model = load()          # trained weights from weights.pt next to this file, eval mode
"""
import os

import torch
from torch import nn
{imports}


def _attach(root, path, value):
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p)
    if isinstance(value, nn.Module):
        root.add_module(name, value)
    else:
        root.register_parameter(name, value)


def _attach_buffer(root, path, value, persistent):
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p)
    root.register_buffer(name, value, persistent=persistent)


{defs}

class {cls}(nn.Module):
    def __init__(self):
        super().__init__()
{body}

{forward}


def load(weights=None, map_location="cpu"):
    """The model with its trained weights (default: {weights} next to this file), in eval mode."""
    if weights is None:
        weights = os.path.join(os.path.dirname(os.path.abspath(__file__)), "{weights}")
    model = {cls}()
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state, assign=True)  # keeps the saved dtypes
    return model.eval()
'''


# --- export ------------------------------------------------------------------------------


@contextlib.contextmanager
def _modes(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily set train/eval on every submodule (shared with the user's model)."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, t in saved:
            m.training = t


def _import_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_outputs(a: Any, b: Any) -> Optional[str]:
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb:
        return f"output structure {sa} != {sb}"
    for x, y in zip(fa, fb):
        if isinstance(x, Tensor):
            if not isinstance(y, Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return "output shapes or dtypes differ"
            if not torch.allclose(x, y, rtol=1e-6, atol=1e-10, equal_nan=True):
                return f"outputs differ by up to {(x - y).abs().max().item():.3g}"
    return None


def _resolve_model(model: nn.Module, engine: Any) -> Tuple[Any, Any]:
    """(DPModule, engine binding) of what the engine trained."""
    from .engine import PrivacyEngine
    from .module import DPModule

    if engine is None:
        raise ExportError(
            "fxdp.export needs the PrivacyEngine that trained the model (engine=...): the privacy card "
            "states the guarantee the engine accounted, and a model without one has none. Fix: "
            "fxdp.export(model, path, engine=engine, example_inputs=(x,)) after training with "
            "engine.make_private(...)"
        )
    if not isinstance(engine, PrivacyEngine):
        raise TypeError(f"engine must be a fxdp.PrivacyEngine, got {type(engine).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    binding = engine._binding(module=model)
    if binding is None:
        raise ExportError(
            f"this {type(model).__name__} was not made private by this engine, so its privacy cannot be "
            "stated. Fix: export the model returned by engine.make_private(...) with that engine"
        )
    if engine.steps == 0:
        raise ExportError(
            "the engine has taken 0 DP steps: the model is untrained, and its weights are the "
            "initialization (epsilon = 0 says nothing about training). Fix: train with "
            "optimizer.step() before exporting"
        )
    dp = model if isinstance(model, DPModule) else binding.module
    from .exported_module import ExportedDPModule

    if isinstance(dp, ExportedDPModule):
        raise ExportError(
            f"model.py is written from the torch.fx graph of a model's modules, and this "
            f"{dp._class_name} was captured with torch.export (an ATen graph, as Hugging Face models and "
            "forwards taking **kwargs are), which has no module-level source to write. Fix: save the trained "
            "weights in the model's own format (model.save_pretrained(path) for a transformers model) and "
            "state the guarantee with engine.privacy_statement(delta)"
        )
    return dp, binding


def export(
    model: nn.Module,
    path: PathLike,
    *,
    engine: Any = None,
    example_inputs: Union[Tensor, Sequence[Any], Mapping[str, Any]],
    delta: Optional[float] = None,
    overwrite: bool = False,
    torch_export: bool = True,
    check_report: bool = True,
) -> Path:
    """Write the DP-trained ``model`` with its privacy card into the directory ``path``.

    Args:
        model: the ``DPModule`` returned by ``engine.make_private`` (or the model it was made from).
        path: output directory (created; must be empty or absent unless ``overwrite``).
        engine: the :class:`fxdp.PrivacyEngine` that trained it (at least one step).
        example_inputs: forward inputs (a tensor, a tuple, or a dict of keyword inputs)
            used to check that the exported source reproduces the model's outputs, and
            for ``torch.export``.
        delta: delta of the stated guarantee (default: the engine's budget delta, else
            ``min(1e-5, 0.1 / N)`` for N training examples, rounded down to a power of ten).
        torch_export: also try ``torch.export`` into ``model.pt2`` (skipped with a note on failure).
        check_report: run :func:`fxdp.check` for ``report.json``.

    Returns:
        The directory path. Raises :class:`ExportError` when the model cannot be
        exported faithfully.
    """
    from . import card as card_mod

    dp, binding = _resolve_model(model, engine)
    args, kwargs = call_inputs(example_inputs)
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"{out} exists and is not an empty directory. Fix: pass overwrite=True or a new path")
    delta = card_mod.default_delta(engine, binding) if delta is None else delta

    plain = dp.strip()
    header = f"{type(plain).__name__} exported by fxdp {_fxdp_version()}.\n\n"
    source = generate_source(plain, header=header)
    with _modes(plain, False), torch.no_grad():
        expected = plain(*args, **kwargs)
        report_dict: Optional[Dict[str, Any]] = None
        if check_report:
            from .check import check

            with _modes(plain, True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    report_dict = check(plain, args, batch_first=dp.batch_first, example_kwargs=kwargs).to_dict()
                except Exception as e:  # the report is documentation: its failure must not block the export
                    report_dict = {"ok": None, "error": f"fxdp.check failed: {type(e).__name__}: {e}"}

        with tempfile.TemporaryDirectory() as tmp:  # verify the round trip before writing anything
            t = Path(tmp)
            (t / MODEL_FILE).write_text(source)
            torch.save(plain.state_dict(), t / WEIGHTS_FILE)
            mod = _import_file(t / MODEL_FILE, f"_fxdp_export_check_{os.getpid()}")
            rebuilt = mod.load(str(t / WEIGHTS_FILE))
            problem = _same_outputs(expected, rebuilt(*args, **kwargs))
        if problem:
            raise ExportError(f"the generated model.py does not reproduce the model ({problem}); nothing was written")

        out.parent.mkdir(parents=True, exist_ok=True)  # the staging directory must be on the same filesystem
        tmp_out = Path(tempfile.mkdtemp(prefix=".fxdp-export-", dir=str(out.parent)))
        try:
            (tmp_out / MODEL_FILE).write_text(source)
            torch.save(plain.state_dict(), tmp_out / WEIGHTS_FILE)
            (tmp_out / REPORT_FILE).write_text(json.dumps(report_dict, indent=2, default=str) + "\n")
            pt2_note: Dict[str, Any] = {"file": None, "note": "not requested"}
            if torch_export:
                pt2_note = _torch_export(plain, args, kwargs, tmp_out / PT2_FILE)
            card = card_mod.build_card(engine, binding, dp, plain, delta=delta, report=report_dict,
                                       files={f: sha256(tmp_out / f) for f in (MODEL_FILE, WEIGHTS_FILE, REPORT_FILE)
                                              + ((PT2_FILE,) if pt2_note["file"] else ())},
                                       torch_export=pt2_note, example_inputs=args,
                                       example_kwargs=kwargs)
            (tmp_out / CARD_FILE).write_text(card_mod.dumps(card))
            out.mkdir(parents=True, exist_ok=True)
            for stale in (MODEL_FILE, WEIGHTS_FILE, CARD_FILE, REPORT_FILE, PT2_FILE):  # overwrite: no leftovers
                (out / stale).unlink(missing_ok=True)
            for f in tmp_out.iterdir():
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp_out, ignore_errors=True)
    return out


def _torch_export(plain: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], dest: Path) -> Dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(plain, args, kwargs=kwargs or None)
            torch.export.save(program, str(dest))
        return {"file": PT2_FILE, "note": "torch.export of the eval-mode inference graph"}
    except Exception as e:  # exportability is optional: the card says why it is missing
        if dest.exists():
            dest.unlink()
        return {"file": None, "note": f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _fxdp_version() -> str:
    return __version__


def load(path: PathLike, *, verify: bool = True, map_location: Any = "cpu") -> nn.Module:
    """The exported model of directory ``path`` with its trained weights, in eval mode.

    ``model.privacy_card`` holds the card (a dict). With ``verify`` (default) the
    card's own hash and the hashes of ``model.py`` and ``weights.pt`` are checked
    first; a mismatch raises :class:`ExportError`.
    """
    from . import card as card_mod

    d = Path(path)
    if not d.is_dir():
        raise ExportError(f"{d} is not a directory. Fix: pass the directory written by fxdp.export")
    missing = [f for f in (MODEL_FILE, WEIGHTS_FILE, CARD_FILE) if not (d / f).is_file()]
    if missing:
        raise ExportError(f"{d} is not an fxdp export: missing {', '.join(missing)}")
    card = card_mod.read_card(d)
    if verify:
        problems = card_mod.verify_files(d, card)
        if problems:
            raise ExportError(f"{d}: the export was modified after it was written:\n  - " + "\n  - ".join(problems))
    name = f"_fxdp_export_{hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]}"
    mod = _import_file(d / MODEL_FILE, name)
    model = mod.load(str(d / WEIGHTS_FILE), map_location=map_location)
    model.privacy_card = card
    return model
