"""``DataLoader`` with Poisson sampling and well-shaped empty batches (Opacus API)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from .sampler import DistributedPoissonSampler, PoissonSampler

__all__ = [
    "DPDataLoader",
    "EmptyBatchCollate",
    "empty_batch_like",
    "wrap_collate_with_empty",
    "switch_generator",
]

CollateFn = Callable[[list], Any]


def empty_batch_like(batch: Any, batch_first: bool = True) -> Any:
    """Same structure as a collated ``batch`` with every tensor's batch dimension 0.

    Tensors keep dtype, device and per-sample shape; mappings, lists, tuples and named
    tuples are rebuilt with the same type. Any other leaf raises ``TypeError``: there
    is no safe empty value for it, and inventing data would break the DP guarantee.
    """
    if isinstance(batch, Tensor):
        dim = 0 if batch_first else 1
        if batch.dim() <= dim:
            raise TypeError(f"a collated tensor of shape {tuple(batch.shape)} has no batch dimension {dim}")
        shape = list(batch.shape)
        shape[dim] = 0
        return batch.new_empty(shape)
    if isinstance(batch, Mapping):
        items = {k: empty_batch_like(v, batch_first) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(empty_batch_like(v, batch_first) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(empty_batch_like(v, batch_first) for v in batch)
    raise TypeError(
        f"cannot build an empty batch containing a {type(batch).__name__}: the collate "
        "function must return tensors, or mappings/lists/tuples of tensors"
    )


def _clone_empty(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.clone()
    if isinstance(batch, Mapping):
        items = {k: _clone_empty(v) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_clone_empty(v) for v in batch))
    return type(batch)(_clone_empty(v) for v in batch)


class EmptyBatchCollate:
    """Collate function that maps an empty index list to a zero-row batch.

    Poisson sampling yields empty batches; most collate functions fail on ``[]``, but
    models run fine on zero-row tensors, and the optimizer still takes its noisy step.
    The empty structure is derived once from one real sample passed through
    ``collate_fn``, so it is known even when the very first batch is empty.
    """

    def __init__(self, collate_fn: CollateFn, sample: Any, batch_first: bool = True) -> None:
        self.collate_fn = collate_fn
        self.batch_first = batch_first
        try:
            self.empty_batch: Any = empty_batch_like(collate_fn([sample]), batch_first)
            self.error: str | None = None
        except TypeError as e:  # only fatal if an empty batch is actually drawn
            self.empty_batch, self.error = None, str(e)

    def __call__(self, batch: list) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self.error is not None:
            raise TypeError(f"Poisson sampling drew an empty batch, but {self.error}")
        return _clone_empty(self.empty_batch)


def wrap_collate_with_empty(
    collate_fn: CollateFn | None, *, sample: Any, batch_first: bool = True
) -> EmptyBatchCollate:
    """Wrap ``collate_fn`` (default: ``default_collate``) to support empty batches, taking
    the batch structure from ``sample`` (one dataset element)."""
    if isinstance(collate_fn, EmptyBatchCollate):
        collate_fn = collate_fn.collate_fn
    return EmptyBatchCollate(collate_fn or default_collate, sample, batch_first)


def _loader_kwargs(data_loader: DataLoader) -> dict[str, Any]:
    """Constructor arguments that a derived loader keeps from ``data_loader``."""
    kwargs = dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        generator=data_loader.generator,
        prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers,
    )
    for name in ("pin_memory_device", "in_order"):  # newer torch versions only
        if hasattr(data_loader, name):
            kwargs[name] = getattr(data_loader, name)
    return kwargs


def _distributed_sampler(
    num_samples: int, sample_rate: float, generator: torch.Generator | None, steps: int | None
) -> DistributedPoissonSampler:
    """A :class:`DistributedPoissonSampler` for this rank whose generator state is rank 0's
    (broadcast), so all ranks draw the same global batch and keep their shards."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group. Fix: call "
            "torch.distributed.init_process_group(...) first (e.g. launch with torchrun)"
        )
    from ..optim.secure import is_secure

    if generator is None or not is_secure(generator):
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        state = generator.get_state()
        dist.broadcast(state, src=0)  # uint8 state tensor: every rank continues rank 0's stream
        generator.set_state(state)
    return DistributedPoissonSampler(
        num_samples, sample_rate, generator, steps, rank=dist.get_rank(), world_size=dist.get_world_size()
    )


class DPDataLoader(DataLoader):
    """``DataLoader`` that draws Poisson batches (:class:`PoissonSampler`) and turns empty
    ones into zero-row batches of the right structure.

    Usually built with :meth:`from_data_loader`, which keeps everything of the original
    loader but the sampling; ``sample_rate = 1 / len(data_loader)`` keeps the expected
    batch size. ``len(self)`` is the number of batches per epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        collate_fn: CollateFn | None = None,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        distributed: bool = False,
        steps: int | None = None,
        batch_first: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            dataset: a map-style dataset.
            sample_rate: probability ``q`` that an example joins a batch.
            collate_fn: as ``DataLoader`` (default ``default_collate``).
            drop_last: ignored (Poisson batches have no "last" batch); warns if set.
            generator: randomness of the sampler (see :class:`PoissonSampler`).
            distributed: shard Poisson sampling over the ranks of the initialized
                ``torch.distributed`` process group (:class:`DistributedPoissonSampler`);
                ``sample_rate`` and ``expected_batch_size`` stay those of the global batch.
            steps: batches per epoch, default ``floor(1/q)``.
            batch_first: whether the batch dimension of collated tensors is 0 (else 1).
            **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``...).
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "Poisson sampling needs a map-style dataset (with __len__ and __getitem__), "
                "got an IterableDataset"
            )
        for name in ("batch_size", "shuffle", "sampler", "batch_sampler"):
            if name in kwargs:
                raise TypeError(f"DPDataLoader chooses batches by Poisson sampling; do not pass {name}=")
        if drop_last:
            warnings.warn(
                "DPDataLoader ignores drop_last=True: Poisson batches have no incomplete last batch",
                stacklevel=2,
            )
        if distributed:  # each rank samples its shard; the union is Poisson over the dataset
            batch_sampler: PoissonSampler = _distributed_sampler(len(dataset), sample_rate, generator, steps)
        else:
            batch_sampler = PoissonSampler(len(dataset), sample_rate, generator=generator, steps=steps)
        collate = wrap_collate_with_empty(collate_fn, sample=dataset[0], batch_first=batch_first)
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate, **kwargs)
        self.sample_rate = batch_sampler.sample_rate
        self.batch_first = batch_first
        self.distributed = bool(distributed)

    @property
    def expected_batch_size(self) -> float:
        """``q * N``."""
        return self.batch_sampler.expected_batch_size

    def state_dict(self, num_consumed: int | None = None) -> dict[str, Any]:
        """Sampler state for exact resumption (see :meth:`PoissonSampler.state_dict`)."""
        return self.batch_sampler.state_dict(num_consumed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state_dict)

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        generator: torch.Generator | None = None,
        distributed: bool = False,
        *,
        batch_first: bool = True,
        steps: int | None = None,
    ) -> DPDataLoader:
        """A ``DPDataLoader`` with ``data_loader``'s dataset, collate function and worker
        settings, and ``sample_rate = 1 / len(data_loader)``.

        ``generator`` defaults to ``data_loader.generator``.
        """
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError("Poisson sampling needs a map-style dataset, got an IterableDataset")
        if len(data_loader) == 0:
            raise ValueError("data_loader has no batches; cannot derive a sample rate")
        kwargs = _loader_kwargs(data_loader)
        kwargs.pop("generator")  # it drives sampling here, not the workers' seeds
        return cls(
            data_loader.dataset,
            sample_rate=1 / len(data_loader),
            collate_fn=data_loader.collate_fn,
            generator=generator if generator is not None else data_loader.generator,
            distributed=distributed,
            steps=steps,
            batch_first=batch_first,
            **kwargs,
        )


def switch_generator(*, data_loader: DataLoader, generator: torch.Generator) -> DataLoader:
    """A loader identical to ``data_loader`` except that sampling uses ``generator``.

    Typically used to swap in a secure generator. ``data_loader`` itself is unchanged.
    """
    bs = data_loader.batch_sampler
    if isinstance(data_loader, DPDataLoader):
        kwargs = _loader_kwargs(data_loader)
        kwargs.pop("generator")
        return DPDataLoader(
            data_loader.dataset,
            sample_rate=data_loader.sample_rate,
            collate_fn=data_loader.collate_fn,
            generator=generator,
            steps=bs.steps,
            batch_first=data_loader.batch_first,
            **kwargs,
        )
    if isinstance(bs, PoissonSampler):
        new_bs: Any = PoissonSampler(bs.num_samples, bs.sample_rate, generator=generator, steps=bs.steps)
    elif isinstance(bs, BatchSampler):
        if not hasattr(bs.sampler, "generator"):
            raise ValueError("the loader's sampler has no generator attribute: nothing to switch")
        sampler = copy.copy(bs.sampler)
        sampler.generator = generator
        new_bs = BatchSampler(sampler, bs.batch_size, bs.drop_last)
    else:
        raise ValueError(
            "switch_generator supports loaders batched by a PoissonSampler or a BatchSampler, "
            f"got batch_sampler={type(bs).__name__}"
        )
    kwargs = _loader_kwargs(data_loader)
    kwargs["generator"] = generator
    return DataLoader(data_loader.dataset, batch_sampler=new_bs, collate_fn=data_loader.collate_fn, **kwargs)


def find_poisson_sampler(data_loader: DataLoader) -> Any:
    """The Poisson batch sampler of ``data_loader`` (through BatchMemoryManager's splitter), or None."""
    bs = getattr(data_loader, "batch_sampler", None)
    while bs is not None and not hasattr(bs, "sample_rate") and hasattr(bs, "sampler"):
        bs = bs.sampler  # BatchMemoryManager's splitter wraps the Poisson sampler
    return bs if hasattr(bs, "sample_rate") else None
