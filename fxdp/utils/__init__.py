"""Opacus-compatible import paths (``opacus.utils.batch_memory_manager``), and
:func:`keep_freed_memory` (CPU training without a page fault per reused page)."""
from .allocator import keep_freed_memory
from .batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager", "keep_freed_memory"]
