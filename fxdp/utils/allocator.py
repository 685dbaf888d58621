"""Keep freed memory in the process between training steps (CPU, glibc's malloc).

glibc gives large freed blocks back to the kernel: a block above the mmap threshold is
unmapped when freed, and free space above the trim threshold at the top of the heap is
trimmed. The next step allocates the same tensors again and takes a page fault (a
zeroed 4 KiB page) at the first touch of each page. Book-keeping holds every layer's
input and output gradient until the optimizer step and frees them there, so more of a
DP step's memory makes this round trip than a non-private step's: BERT (2 layers of
width 128, T = 128, B = 16) took 4,500-6,300 faults (17-25 MiB) in each book-keeping
backward pass, and none after :func:`keep_freed_memory`, its step 1.25-1.30x -> 1.17-1.19x
non-private (``benchmarks/README.md``, Round 9).

The cost: freed memory stays in the process (its resident set keeps the step's peak, as
CUDA's caching allocator does) instead of going back to the system between steps.

:func:`adapt_malloc_thresholds` is the mild form that book-keeping applies by itself on CPU:
glibc's thresholds are dynamic (``mallopt(3)``): the first free of a block above the mmap
threshold raises it to that block's size, and the trim threshold to twice it, up to 32 and
64 MiB, which a program reaches once it frees its first 32 MiB tensor. A process whose
largest freed block is still small trims each step's freed records, and the next backward
pass faults them in again (Hugging Face's BERT at T = 128, ViT at T = 65: 1,400-6,500 page
faults a step). Thresholds a user set (``mallopt``, ``MALLOC_*_`` variables) are fixed and
stay as set.
"""
from __future__ import annotations

import ctypes

__all__ = ["adapt_malloc_thresholds", "keep_freed_memory"]

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)
MAX_MMAP_THRESHOLD = 32 << 20
_INT_MAX = (1 << 31) - 1


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (not musl, macOS or Windows)
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def keep_freed_memory(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc keep freed memory for the next step: blocks up to ``mmap_threshold``
    bytes come from the heap, and the heap's top is given back to the system only when
    more than ``trim_threshold`` bytes of it are free. Call it once, before training
    (``mallopt(3)``; the same as starting Python with ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set). Process-wide. Returns ``False``, changing nothing,
    where the C library is not glibc."""
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"mmap_threshold must be in (0, {MAX_MMAP_THRESHOLD}] bytes (glibc's maximum on 64-bit systems), "
            f"got {mmap_threshold}"
        )
    if not 0 < trim_threshold <= _INT_MAX:  # mallopt takes a C int: a larger value would wrap
        raise ValueError(
            f"trim_threshold must be in (0, {_INT_MAX}] bytes (mallopt takes a C int), got {trim_threshold}"
        )
    libc = _glibc()
    if libc is None:
        return False
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise OSError(
                f"mallopt({param}, {value}) was refused by the C library. Fix: start Python with "
                f"MALLOC_MMAP_THRESHOLD_={mmap_threshold} MALLOC_TRIM_THRESHOLD_={trim_threshold} set instead"
            )
    return True


_adapted = False
#: the largest block whose mapping (with glibc's header, rounded to pages) stays within the ceiling
_MAX_ADAPT_BYTES = MAX_MMAP_THRESHOLD - (64 << 10)


def adapt_malloc_thresholds(nbytes: int = _MAX_ADAPT_BYTES) -> bool:
    """Move glibc's *dynamic* mmap and trim thresholds to where freeing one ``nbytes`` block
    puts them (``nbytes`` and twice it; at most glibc's 32 MiB ceiling), as any program that
    frees a large tensor does: one ``malloc`` and ``free`` of a block no page of which is
    touched (mapped and unmapped). Blocks below it then come from the heap and are reused, and
    a step's freed top of the heap is kept up to twice it, instead of being faulted in again
    at the next step. Once per process; where the thresholds were set (``mallopt``,
    ``MALLOC_MMAP_THRESHOLD_`` and the like) glibc keeps them and this changes nothing.
    Returns ``False`` where the C library is not glibc."""
    global _adapted
    if not 0 < nbytes <= _MAX_ADAPT_BYTES:
        raise ValueError(f"nbytes must be in (0, {_MAX_ADAPT_BYTES}] (below glibc's 32 MiB dynamic ceiling with its "
                         f"header and page rounding), got {nbytes}. Fix: call it without nbytes (its default is the largest)")
    libc = _glibc()
    if libc is None:
        return False
    if not _adapted:
        libc.malloc.restype = ctypes.c_void_p
        ptr = libc.malloc(ctypes.c_size_t(nbytes))
        if ptr:
            libc.free(ctypes.c_void_p(ptr))
        _adapted = True
    return True
