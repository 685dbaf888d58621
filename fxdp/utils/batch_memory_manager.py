"""Alias of :mod:`fxdp.data.batch_memory_manager` at Opacus' path, so
``from opacus.utils.batch_memory_manager import BatchMemoryManager`` becomes
``from fxdp.utils.batch_memory_manager import BatchMemoryManager``."""
from ..data.batch_memory_manager import (
    BatchMemoryManager,
    BatchSplittingSampler,
    wrap_data_loader,
)

__all__ = ["BatchMemoryManager", "BatchSplittingSampler", "wrap_data_loader"]
