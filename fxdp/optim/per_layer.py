"""DP-SGD with per-layer clipping (McMahan et al. 2018): one bound per parameter."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..accountants.validation import check_positive, is_real
from .clip import Clipping
from .optimizer import DPOptimizer

__all__ = ["DPPerLayerOptimizer"]


class DPPerLayerOptimizer(DPOptimizer):
    """DP-SGD with per-layer clipping (McMahan et al. 2018; Opacus ``DPPerLayerOptimizer``).

    ``max_grad_norm`` is a list with one bound ``C_k`` per trainable parameter; each
    sample's gradient of parameter ``k`` is clipped to ``C_k``. The clipped per-sample
    gradient then has total norm at most ``C = sqrt(sum_k C_k^2)``, the sensitivity of
    the sum, so every coordinate gets noise of std ``sigma * C`` and the privacy is that
    of flat clipping with bound ``C``. ``max_grad_norm`` holds ``C``, ``max_grad_norms``
    the list.
    """

    _clipping = "per_layer"

    def _init_clipping(self, max_grad_norm: Any) -> None:
        if is_real(max_grad_norm) or not isinstance(max_grad_norm, Sequence):
            raise ValueError(
                "per_layer clipping needs max_grad_norm as a list with one bound per trainable "
                f"parameter, got max_grad_norm={max_grad_norm!r}"
            )
        n = len(self.params)
        if len(max_grad_norm) != n:
            raise ValueError(
                f"per_layer clipping: got {len(max_grad_norm)} bounds in max_grad_norm for "
                f"{n} trainable parameters; pass exactly one bound per parameter"
            )
        self.max_grad_norms = [check_positive(f"max_grad_norm[{k}]", c) for k, c in enumerate(max_grad_norm)]
        self.max_grad_norm = math.sqrt(sum(c * c for c in self.max_grad_norms))

    def current_clipping(self) -> Clipping:
        """One bound per parameter (in ``self.params`` order); the noise uses their total."""
        return Clipping(bound=self.max_grad_norm, per_parameter=tuple(self.max_grad_norms), nonfinite=self.nonfinite)
