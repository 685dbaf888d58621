"""Capture ops: what ``fxdp.privatize`` inserts at every use of trainable parameters.

A capture op runs the original op forward; in the backward pass it hands a record
(activations, output gradients) to the model's :class:`Recorder`, which turns it into
per-sample gradients (``p.grad_sample``) or keeps it for book-keeping. This is the
observer of torch.ao.quantization's flow: ``DPModule.strip()`` removes them.

* :mod:`.op`: :class:`CaptureOp`, the autograd function and batch-dimension handling;
* :mod:`.record`: :class:`LayerRecord`, :class:`Recorder`;
* :mod:`.rule`: :class:`RuleCapture`, served by a registered rule (``fxdp.rules``);
* :mod:`.functorch`: :class:`FuncCapture`, the ``torch.func`` fallback that proves
  independence on every step;
* :mod:`.params`: :class:`ParamCapture`, raw ``nn.Parameter`` uses.
"""
from .functorch import FuncCapture
from .op import CaptureOp
from .params import BroadcastRuleCapture, ParamCapture
from .record import LayerRecord, Recorder
from .rule import RuleCapture

__all__ = ["CaptureOp", "Recorder", "LayerRecord", "RuleCapture", "FuncCapture", "ParamCapture",
           "BroadcastRuleCapture"]
