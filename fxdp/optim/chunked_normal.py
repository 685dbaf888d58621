"""Gaussian noise for a large CPU buffer, drawn on PyTorch's intra-op threads.

PyTorch's CPU ``normal_`` runs on one thread whatever ``torch.get_num_threads()`` is:
its Mersenne Twister (MT19937) is one sequence. ResNet18's 11.2M noise numbers take
38 ms at 1 thread and at 2 on this project's CPU, while the rest of a DP step gets
faster with threads, so the draw's share of a step grows with the threads a user gives.

Here a buffer of more than ``CHUNK`` elements is cut into chunks of ``CHUNK``, and each
chunk is drawn from its own MT19937 whose whole 624-word state is filled, each draw,
with SplitMix64 (Steele, Lea & Flood 2014) of a counter under a 126-bit key taken from
the caller's generator. Chunk ``k``'s numbers depend only on that generator's state
and on ``k``, never on the thread count; a checkpoint of the caller's generator
resumes them; each draw's key is fresh, so streams do not repeat across steps
(``manual_seed`` keeps 32 bits of a seed: over 10^5 chunk-draws two would likely get the
same noise). The chunks
are drawn on up to ``torch.get_num_threads()`` threads (``normal_`` releases the GIL):
ResNet18's draw 22 against 38 ms at 2 threads. Each chunk is ``N(0, std^2)`` with
its own stream, as one ``normal_`` over the buffer would be; the bits differ.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["CHUNK", "ChunkStreams", "chunked", "chunked_size"]

#: elements per chunk (a multiple of 16, so a chunk drawn in aligned pieces, in order, has
#: the numbers of one ``normal_`` over it): 2 MiB of float32, about 1.7 ms to draw here
CHUNK = 1 << 19

_MT_WORDS = 624
_STATE_AT = 24  # byte offset of the MT19937 state words (as uint64) in a CPU generator's state
_LEFT_AT, _NEXT_AT = 8, 16  # int32 ``left`` (1: the next draw regenerates) and uint64 ``next``
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@lru_cache(maxsize=1)
def _state_template() -> np.ndarray | None:
    """A CPU generator's state bytes with the layout checked (``None`` if PyTorch's layout
    is not the one known here: then buffers are drawn by one ``normal_``, as before). The
    check: ``manual_seed(s)`` writes MT19937's initialisation sequence of ``s`` at
    ``_STATE_AT``."""
    seed = 0x5EED1234
    state = torch.Generator().manual_seed(seed).get_state().numpy().copy()
    words = np.empty(_MT_WORDS, dtype=np.uint64)
    words[0] = seed
    for i in range(1, _MT_WORDS):
        prev = int(words[i - 1])
        words[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    end = _STATE_AT + 8 * _MT_WORDS
    if state.size < end or not np.array_equal(state[_STATE_AT:end].view(np.uint64), words):
        return None
    if state[_LEFT_AT:_LEFT_AT + 4].view(np.int32)[0] != 1 or state[_NEXT_AT:_NEXT_AT + 8].view(np.uint64)[0] != 0:
        return None
    return state


def chunked(buf: Tensor) -> bool:
    """Whether ``buf`` is drawn by chunk streams: a contiguous CPU float buffer of more than
    ``CHUNK`` elements, where PyTorch's generator state has the layout known here."""
    return buf.is_contiguous() and chunked_size(buf.numel(), buf.dtype, buf.device)


def chunked_size(numel: int, dtype: torch.dtype, device: torch.device) -> bool:
    """:func:`chunked` for a contiguous buffer of ``numel`` elements of ``dtype`` on ``device``."""
    return device.type == "cpu" and dtype.is_floating_point and numel > CHUNK and _state_template() is not None


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mt_states(n_chunks: int, key: tuple[int, int]) -> np.ndarray:
    """``[n_chunks, state bytes]``: chunk ``k``'s MT19937 state, 624 words of
    ``splitmix(splitmix(key0 + (i+1)·γ) ^ key1)`` over counters ``i`` of chunk ``k``."""
    template = _state_template()
    assert template is not None
    counters = np.arange(1, n_chunks * _MT_WORDS // 2 + 1, dtype=np.uint64)
    z = _splitmix64(np.uint64(key[0]) + counters * _GOLDEN)
    z = _splitmix64(z ^ np.uint64(key[1]))
    states = np.repeat(template[None, :], n_chunks, axis=0)
    words = states[:, _STATE_AT:_STATE_AT + 8 * _MT_WORDS].view(np.uint64)
    words[:] = z.view(np.uint32).reshape(n_chunks, _MT_WORDS)
    return states


def _thread_local_state() -> bool:
    """Whether the caller runs under state a worker thread does not inherit: inference
    mode (its tensors refuse in-place writes outside it), or a Python dispatch or
    function mode (a profiler, a tracer: it should see every draw). Then one thread."""
    if torch.is_inference_mode_enabled() or torch._C._is_torch_function_mode_enabled():
        return True
    return _get_current_dispatch_mode() is not None


class _Pool:
    """The worker threads (one fewer than the draw's threads: the caller draws a share too),
    made again after a fork or a change of thread count."""

    _lock = threading.Lock()
    _executor: ThreadPoolExecutor | None = None
    _key: tuple[int, int] = (0, 0)

    @classmethod
    def get(cls, workers: int) -> ThreadPoolExecutor:
        with cls._lock:
            if cls._executor is None or cls._key != (os.getpid(), workers):
                if cls._executor is not None and cls._key[0] == os.getpid():
                    cls._executor.shutdown(wait=False)
                cls._executor = ThreadPoolExecutor(workers, thread_name_prefix="fxdp-noise")
                cls._key = (os.getpid(), workers)
            return cls._executor


class ChunkStreams:
    """One draw's chunk streams over a buffer of ``numel`` elements (:func:`chunked`): made
    from two 63-bit numbers of ``generator`` (the global CPU generator if ``None``), then
    :meth:`fill_` draws any aligned range, in order, on up to ``threads`` threads."""

    def __init__(self, numel: int, generator: torch.Generator | None) -> None:
        key = torch.empty(2, dtype=torch.int64).random_(generator=generator).tolist()
        self.numel, self.chunk = numel, CHUNK
        n_chunks = -(-numel // CHUNK)
        self._gens = []
        for state in _mt_states(n_chunks, (key[0], key[1])):
            g = torch.Generator()
            g.set_state(torch.from_numpy(state))
            self._gens.append(g)

    def fill_(self, buf: Tensor, std: float, start: int = 0, end: int | None = None,
              threads: int | None = None, base: int = 0) -> None:
        """Draw elements ``start:end`` of the buffer as ``N(0, std^2)`` from the chunks' streams
        into ``buf``, which holds the buffer's elements from ``base`` on (``buf[k - base]`` is
        element ``k``: a piece of it). Ranges cut at multiples of 16 and drawn in increasing
        order give the numbers of one whole draw (``SliceDraw``); the end of a buffer may be
        anywhere."""
        end = self.numel if end is None else end
        pieces = []  # (start, end, chunk) cut at chunk boundaries
        while start < end:
            k = start // self.chunk
            stop = min(end, (k + 1) * self.chunk)
            pieces.append((start, stop, k))
            start = stop
        threads = min(torch.get_num_threads() if threads is None else threads, len(pieces))
        if threads > 1 and _thread_local_state():
            threads = 1

        queue = iter(pieces)  # each thread takes the next piece: a worker slowed (by OpenMP's
        # threads spinning after the backward's parallel regions, a few ms) takes fewer

        def draw() -> None:
            for a, b, k in queue:
                buf[a - base:b - base].normal_(0.0, std, generator=self._gens[k])

        if threads <= 1:
            draw()
            return
        futures = [_Pool.get(threads - 1).submit(draw) for _ in range(threads - 1)]
        draw()
        for f in futures:
            f.result()
