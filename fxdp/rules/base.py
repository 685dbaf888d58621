"""The rule base class and the registry: what every per-sample rule (one op family
per file in this package) subclasses and registers into. See the package docstring."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..optim.clip import sum_dtype

if TYPE_CHECKING:  # rules.tied imports this module; the type only is needed here
    from .tied import GradFactors

__all__ = [
    "PerSampleRule",
    "SAVED",
    "SCRATCH",
    "ModuleCall",
    "register_rule",
    "register_module",
    "rule_for_op",
    "module_call_for",
    "registered_ops",
    "registered_modules",
    "sq_norms",
    "norm_dtype",
    "weighted_sum",
    "into_target",
    "samples_per_slice",
    "gram_bytes",
    "gram_inner",
    "gram_strip_rows",
    "FOLDED",
]


#: the argument under which a rule's :meth:`PerSampleRule.forward_saving` values come back
SAVED = "saved"
#: book-keeping: the argument under which a rule gets one dict per record, where its norms may
#: leave what they formed for its clipped sum to reuse (a convolution's patch rows); freed with
#: the record
SCRATCH = "scratch"
#: set (``True``) when a rule that ``folds`` gets its input as a batch-major fold
#: ``[B*k, ...]`` viewed ``[B, k, ...]``: a rule whose per-sample dimensions are not
#: trailing (a group norm's channels) reads its rows as the forward did
FOLDED = "folded"


class PerSampleRule:
    """Per-sample gradient math for one functional op family.

    Subclasses define ``signature`` (a Python function whose parameters name the
    op's arguments; used only to bind calls), ``forward`` when the op cannot be
    called with keyword arguments, and ``grad_sample``. ``param_args`` lists the
    argument names that may hold trainable parameters; ``input_arg`` names the
    batched activation whose batch dimension is moved to 0 (``None`` when the rule
    handles layouts itself). ``folds``: the rule accepts extra per-sample
    dimensions after the batch (``[B, T, ...]``), so a batch folded into the
    leading dimension (``x.view(-1, d)`` of a ``[B, T, d]`` tensor, batch-major)
    is served exactly by viewing it as ``[B, T, ...]``. ``clipped_sum_into``: the
    rule's :meth:`clipped_sum` also takes ``into`` (parameter name -> a contiguous
    tensor shaped like the parameter) and adds the sums it can into those tensors
    in place, returning only the others (book-keeping then writes each sum straight
    into the optimizer's noise buffer).
    """

    name: str = "rule"
    param_args: Tuple[str, ...] = ("weight", "bias")
    input_arg: Optional[str] = "input"
    folds: bool = False
    #: the rule cuts a flat input (no batch dimension) into samples by its offsets itself
    #: (``F.embedding_bag``'s 1-D ``input``): there a batch folded into dimension 0 is its bags
    segments: bool = False
    clipped_sum_into: bool = False
    #: parameters whose per-sample gradient :meth:`grad_factors` gives in factored form
    factored: FrozenSet[str] = frozenset()

    def signature(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """Bind a call's arguments by name, defaults applied."""
        bound = inspect.signature(self.signature).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def forward(self, op: Callable, args: Mapping[str, Any]) -> Any:
        """Run the op on bound arguments (override when it takes no keywords)."""
        return op(**args)

    def forward_saving(self, op: Callable, args: Mapping[str, Any]) -> Tuple[Any, Any]:
        """``(output, saved)``: run the op and return, beside its output, what its forward
        computes anyway and :meth:`input_grad` and the per-sample gradients can reuse
        (a layer norm's mean and inverse std). The capture op hands ``saved`` back in
        ``args[SAVED]``, batch first like the input (tensors of the input's rank are moved
        with it). Called on the closed-form input-gradient path only."""
        return self.forward(op, args), None

    def has_input_grad(self, args: Mapping[str, Any]) -> bool:
        """Whether :meth:`input_grad` has a closed form for this call. When it does,
        the capture op runs the forward without recording an inner autograd graph
        and its backward calls :meth:`input_grad` instead of ``autograd.grad``."""
        return False

    def input_grad(self, args: Mapping[str, Any], grad_output: Tensor) -> Tensor:
        """Gradient of the (single) output w.r.t. ``args[input_arg]``, any layout."""
        raise NotImplementedError

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        """Raw per-sample gradients ``{name: [B, *shape]}`` for each name in ``needs``."""
        raise NotImplementedError

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        """Per-sample squared gradient norms ``{name: [B]}`` (book-keeping hook)."""
        gs = self.grad_sample(args, grad_output, needs)
        return {k: sq_norms(v) for k, v in gs.items()}

    def bk_candidates(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Tuple[str, ...]:
        """The exact book-keeping methods at these shapes, the cost model's choice first
        (``norm_sample_sq_keep(..., method=m)``); empty when there is one way only.
        ``bk_methods="measure"`` times them on the first step and keeps the faster."""
        return ()

    def bk_keeps(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> bool:
        """Whether book-keeping forms the norms as the record arrives and drops its
        activations and output gradient: :meth:`norm_sample_sq_keep` (with the cost model's
        method) keeps every per-sample gradient of ``needs`` at these shapes, in no more
        memory than the record (larger kept gradients are formed at the end of the backward
        pass, when the activations are gone, and then replace the record)."""
        return type(self).norm_sample_sq is PerSampleRule.norm_sample_sq

    def norm_sample_sq_keep(
        self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str], method: Optional[str] = None
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Book-keeping: ``(norms, kept)``, the per-sample squared norms and the
        per-sample gradients that computing them materialized. Book-keeping forms a
        kept gradient's clipped sum as ``sum_i c_i g_i`` (one small contraction)
        instead of calling :meth:`clipped_sum`, which would redo a weight-gradient
        pass. Rules keep gradients only when they are at most about twice the
        record's size (here: twice the output gradient), bounding the memory."""
        if type(self).norm_sample_sq is not PerSampleRule.norm_sample_sq:
            return self.norm_sample_sq(args, grad_output, needs), {}
        gs = self.grad_sample(args, grad_output, needs)
        norms = {k: sq_norms(v) for k, v in gs.items()}
        return norms, (gs if sum(v.numel() for v in gs.values()) <= 2 * grad_output.numel() else {})

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str]
    ) -> Dict[str, Tensor]:
        """``sum_i factors[i] * grad_i`` for each name in ``needs`` (book-keeping hook)."""
        gs = self.grad_sample(args, grad_output, needs)
        return {k: torch.einsum("b,b...->...", factors.to(v.dtype), v) for k, v in gs.items()}

    def grad_factors(self, args: Mapping[str, Any], grad_output: Tensor, name: str) -> Optional["GradFactors"]:
        """Book-keeping of a tied parameter (one used by several ops): the per-sample gradient
        of ``name`` as a sum of outer products over the sample's positions
        (:class:`~fxdp.rules.tied.GradFactors`), from which its cross terms with the other
        uses are formed without per-sample gradients; ``None``: materialized instead.
        Rules that override it list the names in ``factored``."""
        return None

    def bk_plan(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, str]:
        """How book-keeping computes each parameter's norm and clipped sum at these
        shapes (any device, ``meta`` included), for the compatibility report."""
        if type(self).norm_sample_sq is not PerSampleRule.norm_sample_sq:
            return {n: f"{self.name} book-keeping rule" for n in needs}
        return {n: "materialized per sample (kept for the clipped sum when small)" for n in needs}

    def describe(self) -> str:
        return self.name


@dataclass
class ModuleCall:
    """How a leaf module's call maps onto a functional op served by a rule.

    ``params`` maps the op's argument names to the module's attribute names
    (``{"weight": "weight", "bias": "bias"}``); ``kwargs`` are static arguments
    taken from the module's configuration (stride, padding, eps, ...); the
    activation arguments of the call are bound positionally after ``inputs``.
    """

    op: Callable
    inputs: Tuple[str, ...] = ("input",)
    params: Dict[str, str] = field(default_factory=dict)
    kwargs: Dict[str, Any] = field(default_factory=dict)


_RULES: Dict[Callable, PerSampleRule] = {}
_MODULES: Dict[Type[nn.Module], Callable[[nn.Module], ModuleCall]] = {}


def register_rule(*ops: Callable):
    """Class decorator: serve ``ops`` (functional callables) with this rule."""

    def deco(cls: Type[PerSampleRule]) -> Type[PerSampleRule]:
        inst = cls()
        for op in ops:
            _RULES[op] = inst
        return cls

    return deco


def register_module(*module_types: Type[nn.Module]):
    """Decorator for ``fn(module) -> ModuleCall``: make these module classes (and
    subclasses that keep the base ``forward``) capturable leaves."""

    def deco(fn: Callable[[nn.Module], ModuleCall]) -> Callable[[nn.Module], ModuleCall]:
        for t in module_types:
            _MODULES[t] = fn
        return fn

    return deco


def rule_for_op(op: Callable) -> Optional[PerSampleRule]:
    return _RULES.get(op)


def module_call_for(module: nn.Module) -> Optional[Callable[[nn.Module], ModuleCall]]:
    """The adapter for ``module``: its own class, or the nearest registered base
    class whose ``forward`` it does not override (an overridden ``forward`` may
    compute anything, so it is traced through instead)."""
    for base in type(module).__mro__:
        if base in _MODULES:
            if type(module).forward is base.forward:
                return _MODULES[base]
            return None
    return None


def registered_ops() -> Dict[Callable, PerSampleRule]:
    return dict(_RULES)


def registered_modules() -> Dict[Type[nn.Module], Callable[[nn.Module], ModuleCall]]:
    return dict(_MODULES)


def into_target(into: Optional[Dict[str, Tensor]], name: str, dtype: torch.dtype,
                shape: Tuple[int, ...]) -> Optional[Tensor]:
    """The tensor a rule's :meth:`~PerSampleRule.clipped_sum` may add ``name``'s sum
    into in place: ``into[name]`` when it is contiguous with this dtype and shape."""
    dst = (into or {}).get(name)
    if dst is not None and dst.dtype == dtype and dst.is_contiguous() and tuple(dst.shape) == tuple(shape):
        return dst
    return None


def weighted_sum(f: Tensor, g: Tensor, into: Optional[Tensor] = None) -> Optional[Tensor]:
    """``sum_i f_i g_i`` over the batch dimension of ``g`` (``[B, ...]``), in at least
    float32 (a clipped sum is not rounded to half-precision rows: ``sum_dtype``): a fresh
    tensor, or added into ``into`` (that dtype, the element count, contiguous) and ``None``."""
    wide = sum_dtype(g.dtype)
    g = g if g.dtype == wide else g.to(wide)
    f = f if f.dtype == g.dtype else f.to(g.dtype)
    if into is not None and into.dtype == g.dtype and into.is_contiguous() and into.numel() * g.shape[0] == g.numel():
        rows = g if g.dim() == 2 else g.reshape(g.shape[0], -1)
        (into if into.dim() == 1 else into.view(-1)).addmv_(rows.t(), f)  # fewer ops than a [1, B] addmm
        return None
    return torch.einsum("b,b...->...", f, g)


#: book-keeping's kept per-sample gradients ``[B, p, d]`` give the clipped sum for about this
#: many memory passes over them (norm, contraction, write), against another ``B T p d`` matmul
#: after ghost norms: the linear rule and kept pointwise convolutions take ghost norms only
#: when ``T^2 (d + p) <= ghost_ratio * KEPT_PASSES * p d``
KEPT_PASSES = 4.0


@functools.lru_cache(maxsize=None)
def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample norms are formed in: ``dtype``, at least float32 (a Python
    lookup: ``torch.promote_types`` is a dispatched call, once per layer and step)."""
    return torch.promote_types(dtype, torch.float32)


def sq_norms(g: Tensor) -> Tensor:
    """Per-sample squared L2 norms ``[B]`` of ``g`` (``[B, ...]``), in at least float32,
    by one reduction (no squared copy of ``g``: the per-sample gradients are often the
    largest tensors of a book-keeping step)."""
    flat = g if g.dim() == 2 else g.reshape(g.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=norm_dtype(g.dtype)).square()


#: the ghost norm forms its Gram matrices in strips of at least this many rows (twice
#: this from T = 256, at most ``GRAM_MAX_STRIPS``); at T below twice this, in one piece
#: (see :func:`gram_inner`)
GRAM_STRIP_ROWS = 32
GRAM_MAX_STRIPS = 8
#: a Gram strip's columns come in multiples of this many (16 float32s, one AVX-512
#: register): MKL's batched matmul forms ``[16, T, 768] @ [16, 768, T]`` at 82 GFLOP/s for
#: T = 16, 49 for T = 17; the rows past the last multiple are a strip of their own
GRAM_LANE = 16
#: below this many multiply-adds ``N T^2 (d + p)`` a sequence short enough for one piece
#: stays one piece: the lanes' extra strip costs about 25 µs of calls, more than it saves
#: there (µs, one piece / lanes: ``[32, 25, 16 | 32]`` 46 / 72, ``[16, 17, 192 | 192]``
#: 97 / 109; ``[16, 17, 192 | 576]`` 178 / 167)
GRAM_LANE_MIN_WORK = 4_000_000


def _gram_aligned(T: int) -> int:
    """The rows of ``T`` that :func:`gram_inner` forms in strips of whole lanes (all of
    them up to ``GRAM_LANE``)."""
    return T if T <= GRAM_LANE else T - T % GRAM_LANE


def gram_strip_rows(T: int) -> int:
    """Rows per strip of :func:`gram_inner` at sequence length ``T`` (``T``: one piece):
    strips of equal height over the lane-aligned rows, about 32 rows below T = 256 and 64
    from there (where 32-row strips measured 4-6% slower), at most 8, each a whole number
    of lanes; the rows past them (fewer than a lane) are one more strip, no taller."""
    aligned = _gram_aligned(T)
    rows = GRAM_STRIP_ROWS if aligned < 8 * GRAM_STRIP_ROWS else 2 * GRAM_STRIP_ROWS
    k = min(GRAM_MAX_STRIPS, max(1, aligned // rows))
    h = -(-aligned // k)
    return min(aligned, -(-h // GRAM_LANE) * GRAM_LANE) if aligned >= GRAM_LANE else h


def gram_bytes(T: int, d: int, p: int, dtype: torch.dtype) -> int:
    """Bytes of :func:`gram_inner`'s temporaries per sample for ``a: [T, d]`` and
    ``g: [T, p]`` of ``dtype``: three Gram strips in the norm's dtype and, for a half
    precision, ``a`` and ``g`` in it."""
    wide = norm_dtype(dtype)
    return (3 * gram_strip_rows(T) * T + (T * (d + p) if wide != dtype else 0)) * (torch.finfo(wide).bits // 8)


def gram_inner(a: Tensor, g: Tensor) -> Tensor:
    """``[N]``: ``<a_n a_n^T, g_n g_n^T> = ||a_n^T g_n||_F^2`` for ``a: [N, T, d]`` and
    ``g: [N, T, p]``, the ghost norm (Goodfellow 2015; Li et al. 2021) in ``T^2 (d + p)``,
    in at least float32 (a half-precision Gram matrix and its sum are off by ~0.5%, and a
    norm read low lets a clipped gradient exceed the clip bound).

    Both Gram matrices are symmetric: only their upper triangle is formed, in strips of
    rows ``[s:e, s:]`` whose off-diagonal blocks count twice (``(k + 1) / 2k`` of the
    flops for ``k`` strips, and ``[N, T/k, T]`` temporaries instead of ``[N, T, T]``).
    ms, 1 thread, full / strips: ``[16, 128, 128 | 512]`` 5.2 / 4.1, ``[16, 256, 128 |
    128]`` 8.6 / 7.0, ``[4, 512, 768 | 3072]`` 95 / 69, ``[2, 1024, 768 | 3072]`` 207 /
    102 (``benchmarks/README.md``, Round 27). Strips span whole lanes of columns
    (``GRAM_LANE``) and the rows past the last lane are a strip against every column, µs,
    ``[16, T, 192 | 768]``: T = 17 192 / 150, 33 512 / 406, 65 1316 / 1132, 197 11022 /
    10225 (Round 36). Where the lanes are one strip, every row meets the aligned columns in
    one product and the corner is added (fewer calls: T = 17 159 → 152 µs, T = 26 ``128 |
    512`` 226 → 192)."""
    dtype = norm_dtype(torch.promote_types(a.dtype, g.dtype))
    a, g = a.to(dtype), g.to(dtype)  # no copy where they are already
    N, T = a.shape[:2]
    aligned = _gram_aligned(T)
    h = gram_strip_rows(T)
    if h >= T or (T < 2 * GRAM_STRIP_ROWS and N * T * T * (a.shape[2] + g.shape[2]) < GRAM_LANE_MIN_WORK):
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def strip(s: int, e: int, c: int, cols: int) -> Tensor:  # rows [s:e] of both Grams' columns [c:cols]
        prod = torch.bmm(a[:, s:e], a[:, c:cols].transpose(1, 2))
        return prod.mul_(torch.bmm(g[:, s:e], g[:, c:cols].transpose(1, 2)))

    if h >= aligned:  # one strip of whole lanes: every row against the aligned columns, then the corner
        prod = strip(0, T, 0, aligned)  # [N, T, aligned]: the rows past the lanes stand for their transpose
        return prod.sum((1, 2)) + prod[:, aligned:].sum((1, 2)) + strip(aligned, T, aligned, T).sum((1, 2))
    out = a.new_zeros(N)
    for s in range(0, aligned, h):
        e = min(s + h, aligned)
        prod = strip(s, e, s, aligned)
        out += prod[:, :, :e - s].sum((1, 2))  # the diagonal block, once
        if e < aligned:
            out += 2 * prod[:, :, e - s:].sum((1, 2))  # the block right of it stands for its transpose too
    if aligned < T:  # the rows past the last lane against every column: left of their corner twice
        prod = strip(aligned, T, 0, T)
        out += 2 * prod[:, :, :aligned].sum((1, 2)) + prod[:, :, aligned:].sum((1, 2))
    return out


def samples_per_slice(budget: int, *tensors: Tensor, extra_bytes: int = 0) -> int:
    """How many samples (dim 0) of ``tensors``, plus ``extra_bytes`` of temporaries per
    sample, together take at most ``budget`` bytes (at least one): the rules run
    per-sample work a slice of the batch at a time, so its temporaries add a slice, not
    the batch, to the step's peak memory. Exact, as every sample's quantity is its own."""
    per_sample = sum(t[:1].numel() * t.element_size() for t in tensors) + extra_bytes
    return max(1, budget // max(1, per_sample))


def batch_sum(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` of shape ``[B, *s]`` down to ``[B, *shape]`` along broadcast dims
    (the per-sample form of ``Tensor.sum_to_size``)."""
    B = t.shape[0]
    target = (B,) + tuple(shape)
    extra = t.dim() - len(target)
    if extra > 0:
        t = t.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(i for i in range(1, t.dim()) if target[i] == 1 and t.shape[i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t.reshape(target)
