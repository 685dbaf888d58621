"""DP data pipeline: Poisson sampling, empty-batch-safe loaders, virtual batches."""

from .batch_memory_manager import BatchMemoryManager, BatchSplittingSampler, split_indices, wrap_data_loader
from .loader import (
    DPDataLoader,
    EmptyBatchCollate,
    empty_batch_like,
    switch_generator,
    wrap_collate_with_empty,
)
from .sampler import PoissonSampler, UniformWithReplacementSampler, UserPoissonSampler, default_num_steps

__all__ = [
    "PoissonSampler",
    "UniformWithReplacementSampler",
    "UserPoissonSampler",
    "default_num_steps",
    "DPDataLoader",
    "EmptyBatchCollate",
    "empty_batch_like",
    "wrap_collate_with_empty",
    "switch_generator",
    "BatchMemoryManager",
    "BatchSplittingSampler",
    "wrap_data_loader",
    "split_indices",
]
