"""Opacus-compatible import paths (``opacus.utils.batch_memory_manager``), and
:func:`keep_freed_memory` / :func:`adapt_malloc_thresholds` (CPU training without a page fault
per reused page)."""
from .allocator import adapt_malloc_thresholds, keep_freed_memory
from .batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager", "adapt_malloc_thresholds", "keep_freed_memory"]
