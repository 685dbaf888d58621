"""Example inputs as ``forward`` takes them: positional arguments and keyword arguments.

``fxdp.privatize``, ``fxdp.check``, ``fxdp.verify``, ``fxdp.export`` and
``PrivacyEngine.make_private`` take ``example_inputs`` as a tensor, a tuple of
positional inputs, or a mapping of keyword inputs (a Hugging Face batch: a tokenizer's
``BatchEncoding``, a collator's dict). Iterating a mapping yields its keys, so treating
it as a tuple would pass the key strings to ``forward``: :func:`call_inputs` is the one
place that tells them apart.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Dict, Optional, Tuple

from torch import Tensor

__all__ = ["call_inputs"]


def call_inputs(example_inputs: Any, example_kwargs: Optional[Mapping[str, Any]] = None,
                what: str = "example_inputs") -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``(args, kwargs)`` for ``forward(*args, **kwargs)``: a tensor is the one positional
    input, a mapping the keyword inputs (merged with ``example_kwargs``), a tuple (any other
    iterable) the positional inputs. Anything else raises ``TypeError`` naming what is accepted."""
    kwargs: Dict[str, Any] = dict(example_kwargs or {})
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Mapping):
        names = [k for k in example_inputs if not isinstance(k, str)]
        if names:
            raise TypeError(f"{what}: a mapping of keyword inputs needs str keys (forward's argument names), "
                            f"got {names[0]!r}")
        both = sorted(set(example_inputs) & set(kwargs))
        if both:
            raise TypeError(f"{what} and example_kwargs both give {both}: pass each input once")
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, Iterable) and not isinstance(example_inputs, (str, bytes)):
        return tuple(example_inputs), kwargs
    raise TypeError(
        f"{what} must be a tensor, a tuple or list of forward's positional inputs, or a dict of its keyword "
        f"inputs (e.g. a tokenizer's batch), got {type(example_inputs).__name__}"
    )
