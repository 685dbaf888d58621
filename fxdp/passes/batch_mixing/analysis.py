"""The batch-mixing interpreter: runs the graph at two batch sizes, walks it node by
node, gets each node's tags from the transfer table, and reports the first op whose
clean inputs give an unclean output (see the package docstring)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..batch_dims import SIZES, BatchDims, classify, per_arg
from .dispatch import resolve
from ...utils.host_rng import fork_rng
from .execution import _Run, resize_batch, small_model_threads
from .fast import fast_tag
from .ops import _Unknown, op_name
from .ragged import Segmentation, segmentation, resize_ragged
from .report import MixingFinding, MixingResult, demote_loss_reductions, describe_mixing
from .tags import NO, NT, _is_fold, _is_int, combine, const, fit, fmt_hint, ideal, ideal_dim, is_clean, reduce_all, \
    uniform
from .transfer import TRANSFER
from .transfer.generic import assume
from .transfer.inplace import inplace, module_snapshot, module_state
from .transfer.matmul import einsum_tags


class BatchMixingAnalysis:
    """See the package docstring. ``run()`` returns a ``MixingResult``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        args: Sequence[Any],
        *,
        batch_dim: BatchDims = 0,
        sizes: Tuple[int, int] = SIZES,
        untraceable: Optional[Dict[str, str]] = None,
        root: Optional[nn.Module] = None,
    ) -> None:
        self.gm = gm
        #: the traced module tree (GraphModule keeps only the modules its graph calls)
        self.root_modules = dict((root or gm).named_modules())
        self.args = list(args)
        self.batch_dim = batch_dim
        #: the batch dimension of each positional input (None: it has none)
        self.input_dims: List[Optional[int]] = per_arg(self.args, batch_dim)
        #: how inputs without a batch dimension are cut into samples (``ragged.py``): a
        #: Segmentation, None (no such inputs), or why they cannot be (reported at the input)
        self.segments = segmentation(self.args, self.input_dims, prefer=_offsets_inputs(gm))
        self.b1, self.b2 = sizes
        self.untraceable = dict(untraceable or {})
        self.tags: Dict[fx.Node, Any] = {}
        self.hints: Dict[str, List[Any]] = {}
        self.findings: List[MixingFinding] = []
        self.fold_origin: Dict[str, str] = {}
        self._dep: Dict[str, bool] = {}
        self._shapes2: Dict[str, List[Any]] = {}
        self._modules = dict(gm.named_modules())
        #: verdicts of ops proven by lowering them to ATen (``lowering.py``), per op and input signature
        self.lowered: Dict[Any, Tuple[str, str]] = {}

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> MixingResult:
        gen = torch.Generator().manual_seed(0)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        try:
            with torch.no_grad(), fork_rng(self.args):
                torch.manual_seed(seed)
                r2 = _Run(self.gm)
                r2.run(*self._resized(self.b2))
                self._shapes2 = r2.shapes
                torch.manual_seed(seed)
                r1 = _Run(self.gm, on_node=self._visit, pre=self._pre)
                r1.run(*self._resized(self.b1))
        except Exception as e:  # the model does not run at these batch sizes
            where = getattr(locals().get("r1", None) or locals().get("r2", None), "current", None)
            return MixingResult(self.findings, self.hints, {}, self.b1, self.fold_origin,
                                failed=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                + (f" (at node {where.name})" if where else ""),
                                failed_at=where.name if where else None)
        demote_loss_reductions(self.findings, self.hints)
        return MixingResult(self.findings, self.hints, r1.shapes, self.b1, self.fold_origin)

    def _resized(self, b: int) -> List[Any]:
        """The example inputs at batch size ``b`` (flat inputs rebuilt bag by bag)."""
        if isinstance(self.segments, Segmentation):
            return resize_ragged(self.args, self.input_dims, self.segments, b, resize_batch)
        return resize_batch(self.args, self.input_dims, b)

    # -- state, for the transfer functions -------------------------------------------------
    def tag(self, a: Any) -> Any:
        """Tag pytree of an argument (node, literal, or container of them)."""
        if isinstance(a, fx.Node):
            return self.tags.get(a, NT)
        if isinstance(a, Tensor):
            return const(a.shape)
        if isinstance(a, (list, tuple)):
            return type(a)(self.tag(x) for x in a) if not hasattr(a, "_fields") else [self.tag(x) for x in a]
        if isinstance(a, dict):
            return {k: self.tag(v) for k, v in a.items()}
        return NT

    def hint(self, a: Any, i: int = 0) -> Any:
        if isinstance(a, fx.Node):
            hs = self.hints.get(a.name, [])
            return hs[i] if i < len(hs) else None
        return None

    def flat_tags(self, *objs: Any) -> List[Tensor]:
        """The tensor tags in ``objs`` (arguments, or tags), flattened."""
        out: List[Tensor] = []
        for o in objs:
            flat, _ = tree_flatten(self.tag(o) if not isinstance(o, Tensor) else o)
            out += [t for t in flat if isinstance(t, Tensor)]
        return out

    def V(self, a: Any) -> Any:
        """Real value of an argument."""
        return fx.node.map_aggregate(a, lambda x: self.env[x] if isinstance(x, fx.Node) else x)

    def I(self, a: Any) -> Any:  # noqa: E743
        """Real value of an index argument, on the CPU (where the tags live)."""
        return fx.node.map_aggregate(self.V(a), lambda x: x.cpu() if isinstance(x, Tensor) else x)

    def data_dep(self, n: fx.Node) -> bool:
        """Whether ``n`` is computed from the model's inputs (not just parameters)."""
        if n.name not in self._dep:
            stack, seen, found = [n], set(), False
            while stack and not found:
                x = stack.pop()
                if x in seen:
                    continue
                seen.add(x)
                found = x.op == "placeholder" or self._dep.get(x.name, False)
                stack.extend(x.all_input_nodes)
            self._dep[n.name] = found
        return self._dep[n.name]

    def submodule(self, n: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self._modules[str(n.target)]

    def add(self, n: fx.Node, code: str, severity: str, problem: str, fix: str, **details: Any) -> None:
        self.findings.append(MixingFinding(n, code, severity, problem, fix, details))

    @staticmethod
    def _einsum_tags(eq: str, ops: List[Tensor], out_shape: Sequence[int]) -> Tensor:
        return einsum_tags(eq, ops, out_shape)

    # -- per node ----------------------------------------------------------------------------
    def _pre(self, n: fx.Node, run: _Run) -> Any:
        return module_snapshot(self, n)

    def _visit(self, n: fx.Node, out: Any, run: _Run, state: Any) -> None:
        try:
            self._visit_node(n, out, run, state)
        except Exception as e:  # a bug or gap of the analysis must not look like a model failure
            self.env = run.env
            try:
                self.tags[n] = assume(self, n, out)
            except Exception:
                self.tags[n] = tree_map(lambda v: const(v.shape) if isinstance(v, Tensor) else NT, out)
            self._analysis_error(n, e)

    def _analysis_error(self, n: fx.Node, e: Exception) -> None:
        """Fail closed: what the analysis cannot process is not proven safe, so it is an error."""
        self.add(n, "analysis-error", "error",
                 f"the analysis could not process {op_name(n)} ({type(e).__name__}: {e}), so it could not "
                 "prove that samples stay apart",
                 "rewrite this line with ops that keep each sample in its own row (or run "
                 "fxdp.verify(model, example_inputs) to test it dynamically, then ignore=[this finding] if "
                 "you accept it)")

    def _visit_node(self, n: fx.Node, out: Any, run: _Run, state: Any) -> None:
        s1 = run.shapes[n.name]
        s2 = self._shapes2.get(n.name, [])
        self.hints[n.name] = (
            [classify(a, b, self.b1, self.b2) for a, b in zip(s1, s2)] if len(s1) == len(s2)
            else ["ambiguous"] * len(s1)
        )
        env = run.env
        if n.op == "output":
            self._output(n)
            return
        try:
            tag = self._transfer(n, out, env)
        except _Unknown as u:
            tag = assume(self, n, out, unknown=u.reason)
        except Exception as e:  # a transfer function that does not fit this call: not proven, an error
            tag = assume(self, n, out)
            self._analysis_error(n, e)
        tag = self._conform(out, tag)
        self.check(n, out, tag)
        if n.op == "call_module" and state is not None:
            module_state(self, n, state)
        hs = self.hints[n.name]
        if any(_is_fold(h) for h in hs):
            origin = next((self.fold_origin[a.name] for a in n.all_input_nodes if a.name in self.fold_origin), n.name)
            self.fold_origin[n.name] = origin

    def _transfer(self, n: fx.Node, out: Any, env: Dict[fx.Node, Any]) -> Any:
        """The node's tags: the fast path, else the transfer function of its family."""
        self.env = env
        fast = fast_tag(self, n, out)
        if fast is not None:
            return fast
        family, name, in_place = resolve(self, n)
        tag = TRANSFER[family](self, n, out, name)
        return inplace(self, n, out, tag) if in_place else tag

    def _conform(self, out: Any, tag: Any) -> Any:
        """Make the tag pytree match the value's (robust to ops returning lists/tuples)."""
        flat_v, spec = tree_flatten(out)
        flat_t, _ = tree_flatten(tag)
        if len(flat_t) != len(flat_v):
            tensors = [t for t in flat_t if isinstance(t, Tensor)]
            g = combine(*[reduce_all(t) for t in tensors]) if tensors else const(())
            flat_t = [fit(g, v.shape) if isinstance(v, Tensor) else NT for v in flat_v]
        else:
            flat_t = [
                (fit(t, v.shape) if isinstance(t, Tensor) else const(v.shape)) if isinstance(v, Tensor) else NT
                for t, v in zip(flat_t, flat_v)
            ]
        return tree_unflatten(flat_t, spec)

    # -- checks and findings -------------------------------------------------------------------
    def check(self, n: fx.Node, out: Any, tag: Any, target: Optional[fx.Node] = None) -> None:
        """Report ``n`` if its (clean) inputs give an unclean output; store repaired tags."""
        target = target or n
        flat_v, spec = tree_flatten(out)
        flat_t, _ = tree_flatten(tag)
        hs = self.hints.get(target.name, [])
        bad: List[Tuple[int, Any, Tensor]] = []
        fixed = list(flat_t)
        for i, (v, t) in enumerate(zip(flat_v, flat_t)):
            if not isinstance(v, Tensor) or not isinstance(t, Tensor):
                continue
            h = hs[i] if i < len(hs) else "ambiguous"
            if ideal_dim(t) is not None and ideal_dim(t) == h:
                continue
            if _is_int(h) and t.dim() > h and t.shape[h] == self.b1 and uniform(t) is None:
                exact = t == ideal(t.shape, h, self.b1)
                if bool(exact.all()):  # exactly per-sample: keep the marked (free) form
                    fixed[i] = ideal(t.shape, h, self.b1)
                    continue
                if bool((exact | (t == NO)).all()):
                    continue
                bad.append((i, h, t))
                fixed[i] = self._repair(t, h)
            elif not is_clean(t, h, self.b1):
                bad.append((i, h, t))
                fixed[i] = self._repair(t, h)
        if bad:
            self._explain(n, bad)
        self.tags[target] = tree_unflatten(fixed, spec)

    def _repair(self, t: Tensor, h: Any) -> Tensor:
        if _is_int(h) and t.dim() > h and t.shape[h] == self.b1:
            return ideal(t.shape, h, self.b1)
        if _is_fold(h):
            return t.clamp(min=NO)
        return const(t.shape)

    def _explain(self, n: fx.Node, bad: List[Tuple[int, Any, Tensor]]) -> None:
        res = describe_mixing(self, n, bad)
        code, problem, fix = res[:3]
        details = dict(res[3]) if len(res) > 3 else {}
        self.add(n, code, "error", problem, fix, hints=[fmt_hint(h) for _, h, _ in bad], **details)

    def _output(self, n: fx.Node) -> None:
        """A batch folded at the output (``[B*k, ...]``) is reported where it was folded."""
        flat, _ = tree_flatten((n.args, n.kwargs))
        seen = set()
        for a in flat:
            if not isinstance(a, fx.Node):
                continue
            for h in self.hints.get(a.name, []):
                if _is_fold(h) and a.name in self.fold_origin and self.fold_origin[a.name] not in seen:
                    origin_name = self.fold_origin[a.name]
                    seen.add(origin_name)
                    origin = next(x for x in self.gm.graph.nodes if x.name == origin_name)
                    self.add(
                        origin, "batch-fold", "warning",
                        f"folds the batch into dimension {h[1]} (size B*{h[2]}) and the model's output keeps it "
                        "folded: per-sample outputs cannot be read off the output, and a loss that is not a plain "
                        "sum/mean over its rows would mix samples",
                        "unfold it before returning (e.g. `y.view(B, T, -1)`), or reduce the folded rows per "
                        "sample in the loss",
                        dim=h[1], k=h[2],
                    )


def _offsets_inputs(gm: fx.GraphModule) -> List[int]:
    """Positional inputs the graph passes as ``offsets`` to ``nn.EmbeddingBag`` or
    ``F.embedding_bag``."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mods = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods.get(str(n.target)), nn.EmbeddingBag):
            off = n.args[1] if len(n.args) > 1 else n.kwargs.get("offsets")
        elif n.op == "call_function" and n.target is torch.nn.functional.embedding_bag:
            off = n.args[2] if len(n.args) > 2 else n.kwargs.get("offsets")
        else:
            continue
        if isinstance(off, fx.Node) and off in phs:
            out.append(phs.index(off))
    return out


def analyze_batch_mixing(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    batch_dim: BatchDims = 0,
    sizes: Tuple[int, int] = SIZES,
    untraceable: Optional[Dict[str, str]] = None,
    root: Optional[nn.Module] = None,
) -> MixingResult:
    """Run the analysis on a traced graph (see the package docstring); ``root`` is
    the module the graph was traced from (for messages about its submodules)."""
    an = BatchMixingAnalysis(gm, example_inputs, batch_dim=batch_dim, sizes=sizes, untraceable=untraceable,
                             root=root)
    with small_model_threads(gm):
        return an.run()
