"""A snapshot of a user's model that analyses restore afterwards (``fxdp.check``, ``fxdp.verify``)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.fx as fx
from torch import nn

__all__ = ["ModelState"]


class ModelState:
    """Everything analysis may touch on the user's model, restored afterwards:
    buffers and parameters (values), module attributes (tracing can assign
    proxies), and the RNG."""

    #: parameters are snapshotted too (forward code may update them in place) up to this size
    PARAM_BYTES = 1 << 30

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.dicts = [dict(vars(m)) for m in self.modules]
        named = list(model.named_buffers())
        params = list(model.named_parameters())
        if sum(p.numel() * p.element_size() for _, p in params) <= self.PARAM_BYTES:
            named += params
        self.names = [k for k, _ in named]
        self.tensors = [(t, t.detach().clone()) for _, t in named]

    def changed(self) -> List[str]:
        """Buffers/parameters whose values differ from the snapshot."""
        return [k for k, (t, saved) in zip(self.names, self.tensors)
                if t.shape != saved.shape or not torch.equal(t, saved)]

    @staticmethod
    def proxies(*models: nn.Module) -> List[Tuple[nn.Module, str, fx.Proxy]]:
        out, seen = [], set()
        for model in models:
            for m in model.modules():
                for k, v in list(vars(m).items()):
                    if isinstance(v, fx.Proxy) and id(v) not in seen:
                        seen.add(id(v))
                        out.append((m, k, v))
        return out

    def restore(self) -> None:
        for m, d in zip(self.modules, self.dicts):
            cur = vars(m)
            for k in list(cur):
                if k not in d:
                    del cur[k]
            for k, v in d.items():
                if cur.get(k) is not v:
                    cur[k] = v
        with torch.no_grad():
            for t, saved in self.tensors:
                if t.shape == saved.shape and not torch.equal(t, saved):
                    t.copy_(saved)
