"""Graph ops of the DP recurrent layers: ``_graph_op`` records a function as one fx node
when called on proxies, and swaps in its ``torch.export`` form while exporting."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import torch
import torch.fx
from torch import Tensor

from ...errors import UnsupportedModelError


def _find_proxy(x: Any) -> Optional[torch.fx.Proxy]:
    """The first fx Proxy in nested tuples/lists/dicts (without rebuilding them:
    PackedSequence is a namedtuple that cannot be rebuilt from mapped fields)."""
    if isinstance(x, torch.fx.Proxy):
        return x
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for a in items:
        p = _find_proxy(a)
        if p is not None:
            return p
    return None


def _graph_op(fn: Callable) -> Callable:
    """Record ``fn`` as one ``call_function`` node when called on fx proxies (like
    ``torch.fx.wrap``, but independent of how the caller imported it)."""

    @functools.wraps(fn)
    def op(*args: Any, **kwargs: Any) -> Any:
        proxy = _find_proxy((args, kwargs))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", op, args, kwargs)
        if torch.compiler.is_exporting():
            # torch.export records ATen ops: the scan becomes the custom op fxdp::rnn_scan (one
            # node, served by its rule), the plumbing runs as ordinary tensor ops, and what has
            # no exportable form yet (packed sequences) fails closed
            return _exportable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return op


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and is_fake(t)


def _transforms_active() -> bool:
    return torch._C._are_functorch_transforms_active()


#: graph op name -> what runs in its place while ``torch.export`` traces it (filled in
#: by the modules that define the ops: ``scan``, ``packed``)
_EXPORT_FORMS: Dict[str, Callable] = {}


def _exportable(fn: Callable) -> Callable:
    """What a graph op runs while ``torch.export`` traces it."""
    if fn.__name__ in _EXPORT_FORMS:
        return _EXPORT_FORMS[fn.__name__]
    if fn.__name__ in ("pack_padded_sequence", "pad_packed_sequence"):
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise UnsupportedModelError(
                f"{fn.__name__} on the torch.export path is not supported yet. Fix: privatize(model, "
                "capture='fx'), or pass padded [B, T, d] tensors to the recurrent layer"
            )
        return refuse
    return fn
