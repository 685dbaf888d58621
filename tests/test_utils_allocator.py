"""fxdp.utils.keep_freed_memory: freed blocks are reused without page faults (glibc)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fxdp.utils import allocator, keep_freed_memory

#: a child's last lines: four warm-up cycles, then the page faults of four more
_MEASURE = textwrap.dedent(
    """
    for _ in range(4):
        cycle()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """
)
_CYCLES = textwrap.dedent(
    """
    import ctypes, resource, sys, torch
    from fxdp.utils import keep_freed_memory
    # start from glibc's behaviour at its most eager, fixed (no dynamic thresholds): blocks
    # above 256 KiB mapped afresh and unmapped when freed, so every cycle below faults its
    # pages in again unless keep_freed_memory() takes effect
    libc = ctypes.CDLL(None)
    libc.mallopt(ctypes.c_int(-3), ctypes.c_int(256 << 10))  # M_MMAP_THRESHOLD
    libc.mallopt(ctypes.c_int(-1), ctypes.c_int(128 << 10))  # M_TRIM_THRESHOLD
    print(keep_freed_memory() if sys.argv[1] == "keep" else "default")
    def cycle():  # a step's temporaries: 8 x 2 MiB, touched, all freed at its end
        ts = [torch.empty(1 << 19).fill_(1.0) for _ in range(8)]
        del ts
    """
) + _MEASURE
#: 4 cycles x 16 MiB of 4 KiB pages
_PAGES = 4 * 16 * 256


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, check=True)
    flag, faults = out.stdout.split()
    return flag, int(faults)


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    # in child processes: the setting is process-wide, and the heap starts fresh. Without
    # keep_freed_memory() the cycles fault every page they touch; with it, none of them
    # (measured: 0 in 108 of 108 children after four warm-up cycles; after two, 3 of 24 had
    # one block's 512 pages fault, the heap still growing). Allowed: a few pages of the
    # interpreter's own (CI once saw 1), never a block's.
    flag, faults = _faults("default")
    assert flag == "default" and faults >= _PAGES, f"the control faulted only {faults} of {_PAGES} pages"
    flag, faults = _faults("keep")
    assert flag == "True"
    assert faults <= 8, f"{faults} page faults in 4 cycles of reused blocks ({_PAGES} pages)"


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=0)
    with pytest.raises(ValueError, match="C int"):
        keep_freed_memory(trim_threshold=1 << 31)


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert keep_freed_memory() is False


_ADAPT = textwrap.dedent(
    """
    import ctypes, importlib.util, resource, sys
    # the module alone, without torch: importing torch may free a large block and move glibc's
    # dynamic thresholds by itself (one hash seed in eight did), which the control must not see
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    if sys.argv[1] == "pinned":  # a threshold the user set: glibc keeps it fixed
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(256 << 10))  # M_MMAP_THRESHOLD
    print(allocator.adapt_malloc_thresholds() if sys.argv[1] != "default" else "default")
    def cycle():  # a step's records: 8 x 6 MiB, touched, all freed at its end (the heap's top)
        ps = [libc.malloc(ctypes.c_size_t(6 << 20)) for _ in range(8)]
        for p in ps:
            ctypes.memset(p, 1, 6 << 20)
        for p in ps:
            libc.free(ctypes.c_void_p(p))
    """
) + _MEASURE


def _adapt_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _ADAPT, mode, allocator.__file__], capture_output=True, text=True,
                         check=True)
    flag, faults = out.stdout.split()
    return flag, int(faults)


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's dynamic thresholds")
def test_adapted_thresholds_keep_a_steps_freed_top_of_the_heap():
    # glibc's dynamic thresholds at their start (a fresh child): each cycle's 48 MiB, freed at
    # the heap's top, is trimmed and faulted in again (measured: 49,024 of 49,152 pages in each
    # of 8 children, hash seeds 0-7); after adapt_malloc_thresholds() (trim threshold 64 MiB) none is; a threshold
    # the user set stays set (the same faults as the control)
    flag, faults = _adapt_faults("default")
    assert flag == "default" and faults >= 4 * 48 * 256 * 0.9, f"the control faulted only {faults} pages"
    flag, faults = _adapt_faults("adapt")
    assert flag == "True" and faults <= 8, f"{faults} page faults in 4 cycles of kept memory"
    flag, faults = _adapt_faults("pinned")
    assert flag == "True" and faults >= 4 * 48 * 256 * 0.9, f"a pinned threshold was moved ({faults} faults)"


def test_adapt_checks_its_size_and_needs_glibc(monkeypatch):
    with pytest.raises(ValueError, match="nbytes"):
        allocator.adapt_malloc_thresholds(32 << 20)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.adapt_malloc_thresholds() is False


def test_book_keeping_on_cpu_adapts_the_thresholds(monkeypatch):
    """Attaching book-keeping to an optimizer of CPU parameters adapts glibc's thresholds (its
    steps free their records at once); the call itself is the one tested above."""
    import torch
    from torch import nn

    import fxdp.optim.optimizer as optimizer_module
    from fxdp import privatize
    from fxdp.optim import DPOptimizer

    calls = []
    monkeypatch.setattr(optimizer_module, "adapt_malloc_thresholds", lambda: calls.append(1) or True)
    dp = privatize(nn.Linear(3, 2), grad_sample_mode="bk")
    opt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    assert not calls
    opt.attach_bookkeeping(dp.bookkeeping)
    assert calls == [1]
