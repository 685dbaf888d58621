"""``fxdp.utils.pytree``: a call's inputs flattened as ``tree_flatten`` does, without the
reference cycle it leaves; and a training step that leaves no garbage for the collector."""
import collections
import gc

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fxdp.optim import DPOptimizer
from fxdp.utils.pytree import input_leaves, input_structure
from oracle import quiet_privatize

_Pair = collections.namedtuple("_Pair", "a b")
_T = torch.ones(2)

TREES = [
    _T,
    (),
    ((_T, None, [1, 2.5, "s"]), {"b": _T, "a": None, "c": (True, _T)}),
    [{"x": [[_T]]}, (None,)],
    ({}, [], ((),)),
]
OTHER_NODES = [
    (_Pair(_T, 1), {"k": _T}),
    collections.OrderedDict(a=_T, b=(1, _T)),
    (torch.float32, _T),  # a leaf kind left to torch's pytree
]


@pytest.mark.parametrize("tree", TREES + OTHER_NODES)
def test_leaves_are_tree_flattens_in_its_order(tree):
    want = tree_flatten(tree)[0]
    got, _ = input_structure(tree)
    assert len(got) == len(want) and all(g is w for g, w in zip(got, want))
    assert all(g is w for g, w in zip(input_leaves(tree), want)) and len(input_leaves(tree)) == len(want)


def test_the_structure_key_tells_structures_apart_and_not_leaf_values():
    key = lambda tree: input_structure(tree)[1]  # noqa: E731
    assert key(((_T, 1), {"a": _T})) == key(((torch.zeros(3), 7.0), {"a": None}))
    assert key((_T, 1)) != key([_T, 1])
    assert key({"a": _T, "b": _T}) != key({"b": _T, "a": _T})  # tree_flatten's specs differ too
    assert key((_T,)) != key((_T, _T))
    assert key(OTHER_NODES[0]) == key((_Pair(None, 2), {"k": 3}))  # torch's spec text, leaves apart
    hash(key(TREES[2]))


def test_flattening_leaves_no_reference_cycle():
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for tree in TREES:
            input_structure(tree)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert garbage == []


class _Tokens(nn.Module):
    """Token embeddings plus, on the export path, position embeddings of ``arange(T)`` (the
    broadcast rule; symbolic tracing refuses them), a LayerNorm and a linear head; a mask."""

    def __init__(self, positions, V=11, T=6, d=8):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, d), (nn.Embedding(T, d) if positions else None)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, ids, mask=None):
        h = self.tok(ids)
        if self.pos is not None:
            h = h + self.pos(torch.arange(ids.shape[1]))
        h = self.norm(h)
        if mask is not None:
            h = h * mask[..., None]
        return self.head(h).mean(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_book_keeping_step_leaves_no_garbage(capture):
    """A step's forward (the inputs' signature; the exported graph's own input check), the
    broadcast rule's subgraph run and the clipped sums free everything by reference counts:
    no garbage collections from training steps (each one promotes what the step holds then,
    and now and then a full one walks the whole heap)."""
    torch.manual_seed(0)
    dp = quiet_privatize(_Tokens(positions=capture == "export"), capture=capture, grad_sample_mode="bk")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4, generator=torch.Generator().manual_seed(1))
    opt.attach_bookkeeping(dp.bookkeeping)
    ids, mask, y = torch.randint(0, 11, (4, 6)), torch.ones(4, 6), torch.randint(0, 3, (4,))

    def step():
        opt.zero_grad()
        out = dp(ids, mask=mask) if capture == "export" else dp(ids, mask)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()

    step()
    step()  # graphs captured, caches filled
    rules = {p for c in dp.capture_table() for p in c["params"] if "broadcast" in c["rule"]}
    assert rules == ({"pos.weight"} if capture == "export" else set())
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        step()
        step()
        gc.collect()
        garbage = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not garbage, f"a step left reference cycles: {dict(garbage)}"
