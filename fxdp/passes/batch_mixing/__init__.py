"""Batch-mixing analysis: prove, op by op, that no sample influences another.

DP-SGD needs every per-sample gradient to depend on its own sample only (Abadi et
al. 2016). Opacus' validator checks module *types*; a functional ``x - x.mean(0)``,
``F.batch_norm(..., training=True)`` or a frozen BatchNorm left in train mode pass
it and silently break the guarantee. This pass reads the graph instead.

It is an abstract interpretation with a *sample-provenance* domain. Every value
carries a tag tensor of its own shape (at a small batch size ``b``): entry ``s+1``
says the element is computed from sample ``s`` only, ``0`` from no sample
(parameters, constants), ``-1`` from several samples. Each op has a transfer
function over tags from its semantics and arguments (the dims of a reduction, the
equation of a matmul, the real index values of a gather):

* data movement (view, permute, cat, flip, indexing with known indices) applies
  the op itself to the tags, so a transposed fold ``[T*B] -> [B, T]`` shows up;
* pointwise ops combine broadcast tags;
* reductions, scans and sorts combine over their dims;
* contractions reduce each operand over the contracted letters of an einsum;
* modules and functional ops with known per-sample structure (conv, norms,
  embeddings, RNNs, attention) combine per row of their batch dimension.

Batch dimensions come from running the graph at two batch sizes
(``fxdp.passes.batch_dims``): a value is *clean* when each element's tag is its
own sample (the index along the batch dimension) or 0; a folded value
(``[B*k, ...]``) must not mix; a value without a batch dimension must carry no
sample. The first op whose clean inputs give an unclean output is the one that
mixes samples: it is reported, and its output is repaired so that later mixing
ops are reported too. An op without a transfer function is lowered alone to ATen
and read by the export path's batch rules (``lowering``), and probed (``probe``:
each sample's inputs perturbed in turn): served when the rules prove it, an error
when they or the probe find samples combined, and an error when nothing proves it.

The package, one job per module:

* ``tags``: the tag algebra (``const``, ``combine``, ``reduce``, ``ideal``, ...);
* ``ops``: op names and families, declared semantics (``register_semantics``);
* ``transfer``: one transfer function per op family, in the one table
  ``TRANSFER`` (``dispatch`` picks a node's family, ``fast`` skips the table when
  the batch dims alone decide);
* ``analysis``: the interpreter (traversal, state, checks) and
  ``analyze_batch_mixing``;
* ``execution``: the real runs at two batch sizes;
* ``lowering``: ops without a transfer function, exported alone and read by the batch rules;
* ``probe``: ops without a transfer function, run again on perturbed samples;
* ``ragged``: flat inputs without a batch dimension, cut into samples by their
  offsets (``nn.EmbeddingBag``): their tags and their inputs at the two sizes;
* ``report``: findings, results and the explanation of a mixing op.
"""
from __future__ import annotations

# re-exported: the entry point, the registry of declared semantics, the tag algebra
from .analysis import BatchMixingAnalysis, analyze_batch_mixing  # noqa: F401
from .execution import resize_batch, small_model_threads  # noqa: F401
from .ops import _SEMANTICS, SEMANTIC_KINDS, op_name, register_semantics, semantics_for  # noqa: F401
from .report import MixingFinding, MixingResult, describe_mixing  # noqa: F401
from .tags import (MIX, NO, NT, along, broadcast_shapes, combine, const, fit, fmt_hint, ideal,  # noqa: F401
                   ideal_dim, is_clean, per_index, reduce, reduce_all, uniform, violations)
from .transfer import TRANSFER  # noqa: F401

__all__ = ["analyze_batch_mixing", "register_semantics", "MixingFinding", "MixingResult", "resize_batch", "fmt_hint"]
