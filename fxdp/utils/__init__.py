"""Opacus-compatible import paths (``opacus.utils.batch_memory_manager``)."""
from .batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager"]
