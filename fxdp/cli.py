"""Command line: ``python -m fxdp <command> ...``.

Commands are argparse subparsers. To add one, write ``add_<name>(subparsers)``
that creates its parser and sets ``run`` (``args -> exit code``) with
``set_defaults``, and append it to ``SUBCOMMANDS``. Exit codes: 0 success, 1 the
command's check failed, 2 bad usage (argparse's convention).

``check``::

    python -m fxdp check path/to/model.py:ClassName --input-shape 1,28,28 [--json]
        [--batch-size 4] [--dtype long --vocab 1000] [--seq-first] [--svg report.svg]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64", "float16": "float16",
    "half": "float16", "bfloat16": "bfloat16", "long": "int64", "int64": "int64", "int": "int32",
    "int32": "int32", "bool": "bool",
}


class UsageError(Exception):
    """Bad command-line input: reported as ``fxdp <cmd>: error: ...`` with exit code 2."""


# --- check -------------------------------------------------------------------------------------

def add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="static DP-compatibility report of a model (fxdp.check)",
        description="Trace a model, find every op that lets one sample influence another, and list the "
                    "per-sample rule and memory of every parameter. Exit code 1 when the model breaks DP.",
        epilog="example: python -m fxdp check model.py:Net --input-shape 1,28,28 --svg report.svg",
    )
    p.add_argument("target", help="MODEL_FILE.py:ClassName or package.module:ClassName (a class or a function "
                                  "returning an nn.Module, called without arguments unless --init is given)")
    p.add_argument("--input-shape", action="append", required=True, metavar="SHAPE",
                   help="shape of one sample of a forward input, without the batch dimension, e.g. 1,28,28 "
                        "(repeat for several inputs; use '' for a per-sample scalar)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help=f"input dtype ({', '.join(sorted(set(_DTYPES)))}); one for all inputs or one per "
                        "--input-shape (default float32)")
    p.add_argument("--vocab", type=int, default=None, help="integer inputs are drawn from [0, VOCAB) (default 2)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="example batch size, also used for the per-sample gradient memory (default 4)")
    p.add_argument("--seq-first", action="store_true",
                   help="inputs are [T, B, ...] (batch_first=False): the batch dimension is dimension 1")
    p.add_argument("--init", default=None, metavar="JSON", help="keyword arguments for the constructor, as JSON")
    p.add_argument("--ignore", action="append", default=[], metavar="WHAT",
                   help="accept findings at a node, code, module path or file:line (repeatable)")
    p.add_argument("--rewrite-option", action="append", default=[], metavar="KEY=VALUE",
                   help="privatize rewrite option, e.g. batchnorm=freeze (repeatable)")
    p.add_argument("--verify", action="store_true", help="also run the dynamic verifier (fxdp.verify)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--svg", default=None, metavar="PATH", help="write a picture of the graph (SVG)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model and the example inputs")
    p.set_defaults(run=run_check)


def _shape(s: str) -> List[int]:
    s = s.strip().strip("[]()")
    if not s:
        return []
    try:
        dims = [int(x) for x in s.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--input-shape {s!r}: expected comma-separated integers such as 1,28,28") from None
    if any(d < 0 for d in dims):
        raise UsageError(f"--input-shape {s!r}: dimensions must be non-negative")
    return dims


def load_model_factory(target: str) -> Callable[..., Any]:
    """The class or function named by ``file.py:Name`` or ``module:Name``."""
    if ":" not in target:
        raise UsageError(f"target {target!r} must be MODEL_FILE.py:ClassName or module:ClassName")
    where, name = target.rsplit(":", 1)
    if where.endswith(".py") or os.path.sep in where or os.path.exists(where):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise UsageError(f"model file {where!r} does not exist")
        mod_name = "_fxdp_user_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot load {where!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, os.path.dirname(path))  # the file's own imports
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"importing {where!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise UsageError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = sorted(k for k, v in vars(module).items() if isinstance(v, type) and not k.startswith("_"))
            raise UsageError(f"{where!r} has no attribute {name!r}; classes there: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target!r} is not a class or function")
    return obj


def _example_inputs(args: argparse.Namespace) -> tuple:
    import torch

    shapes = [_shape(s) for s in args.input_shape]
    dtypes = args.dtype or ["float32"]
    if len(dtypes) not in (1, len(shapes)):
        raise UsageError(f"give one --dtype for all inputs or one per --input-shape ({len(shapes)}), not {len(dtypes)}")
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for shape, dt in zip(shapes, dtypes):
        if dt not in _DTYPES:
            raise UsageError(f"--dtype {dt!r} is not one of {', '.join(sorted(set(_DTYPES)))}")
        dtype = getattr(torch, _DTYPES[dt])
        full = list(shape)
        if args.seq_first:
            if not full:
                raise UsageError("--seq-first needs inputs with a leading time dimension (e.g. --input-shape 10,8)")
            full.insert(1, args.batch_size)
        else:
            full.insert(0, args.batch_size)
        if dtype.is_floating_point:
            out.append(torch.randn(full, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.rand(full, generator=gen) < 0.5)
        else:
            hi = args.vocab if args.vocab is not None else 2
            if hi < 1:
                raise UsageError(f"--vocab must be at least 1, got {hi}")
            out.append(torch.randint(0, hi, full, generator=gen, dtype=dtype))
    return tuple(out)


def _rewrite_options(items: Sequence[str]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--rewrite-option {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        try:
            opts[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            opts[k.strip()] = v
    return opts


def run_check(args: argparse.Namespace) -> int:
    import warnings

    import torch
    from torch import nn

    from .check import check

    factory = load_model_factory(args.target)
    try:
        kwargs = json.loads(args.init) if args.init else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--init is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--init must be a JSON object of keyword arguments")
    torch.manual_seed(args.seed)
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise UsageError(f"constructing {args.target} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{args.target} returned {type(model).__name__}, not an nn.Module")
    inputs = _example_inputs(args)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        raise UsageError(f"the model fails on example inputs ({shapes}): {type(e).__name__}: {e}. "
                         "Check --input-shape/--dtype/--vocab/--seq-first.") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check(model, inputs, batch_first=not args.seq_first, batch_size=args.batch_size,
                           ignore=args.ignore, rewrite_options=_rewrite_options(args.rewrite_option),
                           dynamic=args.verify)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    cwd = os.getcwd()
    for f in report.findings + report.ignored:  # paths as the user typed them: relative to the current directory
        if f.file and os.path.abspath(f.file).startswith(cwd + os.sep):
            f.file = os.path.relpath(f.file, cwd)
    if args.svg:
        try:
            report.render(args.svg)
        except (OSError, ValueError) as e:
            raise UsageError(f"--svg: {e}") from e
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


# --- entry point -----------------------------------------------------------------------------

#: functions ``add_<name>(subparsers)``; each registers one command
SUBCOMMANDS: List[Callable[[Any], None]] = [add_check]
SUBCOMMANDS += importlib.import_module(".cli_privacy", __package__).SUBCOMMANDS  # epsilon, noise, card, plot-budget


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fxdp", description="fxdp: differentially private training "
                                     "for PyTorch as a torch.fx compilation pass.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
