"""fxdp.utils.keep_freed_memory: freed blocks are reused without page faults (glibc)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fxdp.utils import allocator, keep_freed_memory

_CYCLES = textwrap.dedent(
    """
    import resource, sys, torch
    from fxdp.utils import keep_freed_memory
    print(keep_freed_memory() if sys.argv[1] == "keep" else "default")
    torch.empty(1 << 20).fill_(1.0)  # a 4 MiB block: glibc's dynamic thresholds settle
    def cycle():  # a step's temporaries: 8 x 2 MiB, touched, all freed at its end
        ts = [torch.empty(1 << 19).fill_(1.0) for _ in range(8)]
        del ts
    for _ in range(2):
        cycle()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """
)


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, check=True)
    flag, faults = out.stdout.split()
    return flag, int(faults)


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    # in a child process: the setting is process-wide, and the heap starts fresh
    flag, faults = _faults("keep")
    assert flag == "True"
    assert faults == 0, f"{faults} page faults in 4 cycles of reused blocks"


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
