"""Poisson subsampling: the batch sampler that DP-SGD's privacy amplification assumes.

Each example joins each batch independently with probability ``q`` (Abadi et al. 2016;
Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism"), so batch sizes are Binomial(N, q) and may be 0. ``secure=True`` draws the
inclusions from the CSPRNG of :mod:`fxdp.optim.secure`.
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Integral
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from ..optim.secure import is_secure, secure_bernoulli
from ..accountants.validation import check_sample_rate

__all__ = [
    "PoissonSampler",
    "UniformWithReplacementSampler",
    "DistributedPoissonSampler",
    "UserPoissonSampler",
    "default_num_steps",
]


def default_num_steps(sample_rate: float) -> int:
    """``floor(1/q)`` batches per epoch (Opacus), robust to rounding in ``q = 1/n``."""
    # 1/(1/n) can land a few ulps below n (n = 93 gives 92.99999999999999)
    return max(1, int(1.0 / sample_rate * (1 + 1e-12)))


class PoissonSampler(Sampler[list[int]]):
    """Batch sampler drawing each of ``num_samples`` indices with probability ``sample_rate``.

    Yields ``steps`` (default ``floor(1/q)``) sorted index lists per epoch, possibly
    empty. Drop-in for Opacus' ``UniformWithReplacementSampler``.

    Randomness comes from ``generator``; without one a private generator is seeded from
    the global RNG, so ``torch.manual_seed`` still makes runs reproducible while the
    sampler's state stays capturable by :meth:`state_dict`.

    Secure mode (``secure=True``, or a :class:`fxdp.optim.secure.SecureGenerator` as
    ``generator``): each inclusion is a CSPRNG draw (:func:`fxdp.optim.secure.secure_bernoulli`),
    batches cannot be predicted or replayed, and a resumed epoch continues with fresh
    draws for its remaining batches.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        *,
        secure: bool = False,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, Integral) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got num_samples={num_samples!r}")
        check_sample_rate(sample_rate)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, Integral) or steps <= 0):
            raise ValueError(f"steps must be a positive integer or None, got steps={steps!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps) if steps is not None else default_num_steps(self.sample_rate)
        self.secure = bool(secure) or is_secure(generator)
        if generator is None and self.secure:
            from ..optim.noise import secure_generator

            generator = secure_generator()
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        self.generator = generator
        # Resume bookkeeping: generator state at the start of the current epoch and the
        # number of batches drawn since; a loaded state replays from there.
        self._epoch_start_state: Tensor | None = None
        self._drawn = 0
        self._resume: tuple[Tensor | None, int] | None = None

    @property
    def expected_batch_size(self) -> float:
        """``q * N``, the denominator DP-SGD uses for a mean loss."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def _draw(self) -> list[int]:
        if self.secure:
            mask = secure_bernoulli(self.num_samples, self.sample_rate)
        else:
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
        return mask.nonzero().reshape(-1).tolist()

    def _iter_secure(self) -> Iterator[list[int]]:
        # Nothing to replay: a resumed epoch draws its remaining batches afresh.
        skip = 0
        if self._resume is not None:
            _, skip = self._resume
            self._resume = None
            if skip >= self.steps:
                skip = 0
        self._epoch_start_state = None
        self._drawn = skip
        for _ in range(skip, self.steps):
            batch = self._draw()
            self._drawn += 1
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.secure:
            yield from self._iter_secure()
            return
        skip = 0
        if self._resume is not None:
            # Restored here rather than in load_state_dict: a DataLoader may draw its
            # worker base seed from the same generator in between.
            state, skip = self._resume
            self._resume = None
            assert state is not None  # secure states are handled by _iter_secure
            self.generator.set_state(state)
            if skip >= self.steps:  # saved at the end of an epoch: start the next one
                for _ in range(skip):
                    self._draw()
                skip = 0
        self._epoch_start_state = self.generator.get_state()
        self._drawn = 0
        for i in range(self.steps):
            batch = self._draw()
            self._drawn += 1
            if i >= skip:
                yield batch

    def state_dict(self, num_consumed: int | None = None) -> dict[str, Any]:
        """State to resume sampling exactly: the epoch's starting generator state and the
        number of batches consumed (tensors and ints only, ``weights_only``-loadable).

        ``num_consumed`` defaults to the batches drawn so far in this epoch. A
        ``DataLoader`` with ``num_workers > 0`` draws index lists ahead of training, so
        pass the number of batches actually trained on in that case.
        """
        drawn = self._drawn if num_consumed is None else int(num_consumed)
        if not 0 <= drawn <= self.steps:
            raise ValueError(f"num_consumed must be in [0, {self.steps}], got {num_consumed!r}")
        if self.secure:  # no generator state: secure batches are never replayed
            return {"secure": True, "num_consumed": drawn}
        if self._epoch_start_state is None:  # no epoch started yet
            return {"epoch_start_generator_state": self.generator.get_state(), "num_consumed": 0}
        return {"epoch_start_generator_state": self._epoch_start_state.clone(), "num_consumed": drawn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next ``iter()`` yield the rest of the saved epoch (then full epochs).

        A state saved at the end of an epoch (all batches consumed) resumes with the next
        full epoch. A secure sampler takes only the position (the rest of the epoch is
        drawn afresh); a non-secure one refuses a secure state, which has nothing to replay.
        """
        if self.secure:
            consumed = int(state_dict["num_consumed"])
            if consumed < 0:
                raise ValueError("invalid PoissonSampler state_dict")
            self._resume = (None, consumed)
            return
        if state_dict.get("secure", False):
            raise ValueError(
                "this state was saved by a secure PoissonSampler and holds no generator state to "
                "replay; load it into a sampler built with secure=True (or a SecureGenerator)"
            )
        state = state_dict["epoch_start_generator_state"]
        consumed = int(state_dict["num_consumed"])
        if not isinstance(state, Tensor) or consumed < 0:
            raise ValueError("invalid PoissonSampler state_dict")
        self._resume = (state.clone(), consumed)


#: Opacus' name for the same sampler (same keyword arguments).
UniformWithReplacementSampler = PoissonSampler


class UserPoissonSampler(PoissonSampler):
    """User-level Poisson sampling: each *user* joins a batch with probability ``q``,
    bringing their records (all of them, or ``max_records_per_user`` drawn at random).

    With per-user clipping (:meth:`fxdp.DPModule.set_groups`) the unit of privacy is
    the user: adding or removing one user's whole data changes one clipped term, so
    the accountants' analysis of Poisson sampling at rate ``q`` holds with users in
    place of records (McMahan et al. 2018). ``expected_batch_size`` counts users.

    Args:
        user_ids: the user of each record (any hashable values), ``len = N`` records.
        sample_rate: probability ``q`` that a user joins a batch.
        generator, steps, secure: as :class:`PoissonSampler` (``steps`` defaults to ``floor(1/q)``).
        max_records_per_user: cap on a sampled user's records per batch (a random subset),
            bounding batch sizes when some users have many records.
    """

    def __init__(
        self,
        user_ids: Any,
        sample_rate: float,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        *,
        secure: bool = False,
        max_records_per_user: int | None = None,
    ) -> None:
        ids = user_ids.tolist() if isinstance(user_ids, Tensor) else list(user_ids)
        if not ids:
            raise ValueError("user_ids is empty: no records to sample")
        if max_records_per_user is not None and (
                isinstance(max_records_per_user, bool) or not isinstance(max_records_per_user, Integral)
                or max_records_per_user <= 0):
            raise ValueError(f"max_records_per_user must be a positive integer or None, got {max_records_per_user!r}")
        records: dict[Any, list[int]] = {}
        for i, u in enumerate(ids):
            records.setdefault(u, []).append(i)
        self.users = list(records)
        self.user_records = [records[u] for u in self.users]
        self.max_records_per_user = max_records_per_user
        super().__init__(len(self.users), sample_rate, generator, steps, secure=secure)

    @property
    def num_users(self) -> int:
        return self.num_samples

    def _draw(self) -> list[int]:
        out: list[int] = []
        k = self.max_records_per_user
        for u in super()._draw():
            rows = self.user_records[u]
            if k is not None and len(rows) > k:  # a uniform subset; which rows never affects privacy
                pick = torch.randperm(len(rows), generator=None if self.secure else self.generator)[:k]
                rows = [rows[j] for j in sorted(pick.tolist())]
            out.extend(rows)
        return sorted(out)


class DistributedPoissonSampler(PoissonSampler):
    """Poisson sampling over the whole dataset, split across ``world_size`` ranks.

    Rank ``r`` owns the disjoint shard ``{i : i % world_size == r}`` and yields the
    indices of its shard that joined the batch, so the union over ranks of one step's
    batches is one Poisson batch at rate ``q`` over all ``num_samples`` examples (each
    index joins independently with probability ``q``), which is what the accountant
    analyses. Every rank yields ``steps`` batches per epoch (possibly empty), so ranks
    stay in lockstep.

    Non-secure: every rank draws the same ``num_samples`` uniforms from a generator in
    the same state (it must be seeded identically on all ranks; ``fxdp`` broadcasts the
    seed from rank 0 when building it from a loader) and keeps its shard, so the global
    batch equals the one a single :class:`PoissonSampler` with that generator draws.
    Secure: each rank draws its own shard's inclusions from the CSPRNG.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        *,
        rank: int,
        world_size: int,
        secure: bool = False,
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, Integral) or world_size <= 0:
            raise ValueError(f"world_size must be a positive integer, got world_size={world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, Integral) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got rank={rank!r}")
        super().__init__(num_samples, sample_rate, generator, steps, secure=secure)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shard = torch.arange(self.rank, self.num_samples, self.world_size)

    @property
    def expected_batch_size(self) -> float:
        """``q * N`` of the global batch (the denominator of the all-reduced mean)."""
        return self.sample_rate * self.num_samples

    def _draw(self) -> list[int]:
        if self.secure:
            mask = secure_bernoulli(len(self.shard), self.sample_rate)
            return self.shard[mask].tolist()
        mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
        return self.shard[mask[self.shard]].tolist()
