"""Per-sample gradient rules: one op family per file, keyed by the functional op.

A rule turns what a capture op recorded in one backward pass -- the op's bound
arguments (activations and parameters) and the gradient of the loss with respect
to the op's output -- into per-sample quantities for the op's trainable
parameters:

* ``grad_sample``: the per-sample gradients ``[B, *p.shape]`` (materialized);
* ``norm_sample_sq``: per-sample squared norms ``[B]`` (book-keeping; defaults to
  the norms of ``grad_sample``);
* ``clipped_sum``: ``sum_i c_i * grad_i`` (book-keeping; defaults to a weighted
  sum of ``grad_sample``).

Rules see batch-first tensors: the capture op moves the batch dimension of the
``input`` activation and of the output gradient to dim 0 before calling them.
Per-sample gradients are *raw*: the gradient of the loss as reduced by the user
(for a mean-reduced loss, each row carries the 1/B factor); the capture op
rescales to Opacus' convention.

Rules are registered for functional ops (``F.linear``) and, through a module
adapter, for module classes (``nn.Linear`` and its subclasses that keep the base
``forward``). To add a rule for a custom op see ``docs/custom_rules.md``::

    @register_rule(my_op)
    class MyOpRule(PerSampleRule):
        def signature(self, input, weight, bias=None): ...
        def grad_sample(self, args, grad_output, needs): ...
"""
from .base import *  # noqa: F401,F403 - the rule base class and the registry
from .base import __all__, batch_sum  # noqa: F401

# the rules register themselves on import
from . import linear, embedding, norms, conv, recurrent, attention  # noqa: E402,F401
