"""Tests of fxdp.data: Poisson sampler, DPDataLoader, empty batches, resumption."""

from __future__ import annotations

import io
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from fxdp.data import (
    DPDataLoader,
    PoissonSampler,
    UniformWithReplacementSampler,
    default_num_steps,
    empty_batch_like,
    switch_generator,
    wrap_collate_with_empty,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- sampler --------------------------------------------------------------------------


def test_batch_sizes_are_binomial():
    N, q, steps = 1000, 0.05, 2000
    sizes = np.array([len(b) for b in PoissonSampler(N, q, generator=gen(0), steps=steps)])
    mean, var = N * q, N * q * (1 - q)
    # Mean of `steps` iid Binomial(N, q): standard error sqrt(var / steps).
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    # Sample variance: Var(s^2) = var^2 * (2 / (n - 1) + kurt / n), with the binomial
    # excess kurtosis kurt = (1 - 6 q (1 - q)) / var.
    kurt = (1 - 6 * q * (1 - q)) / var
    se_var = var * math.sqrt(2 / (steps - 1) + kurt / steps)
    assert abs(sizes.var(ddof=1) - var) < 5 * se_var


def test_each_index_included_with_probability_q():
    N, q, steps = 200, 0.1, 1000
    counts = np.zeros(N)
    for b in PoissonSampler(N, q, generator=gen(1), steps=steps):
        assert b == sorted(set(b)) and all(0 <= i < N for i in b)
        counts[b] += 1
    # counts[j] ~ Binomial(steps, q) independently: the standardised squares sum to ~chi2(N).
    chi2 = (((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, N) > 1e-4 and stats.chi2.cdf(chi2, N) > 1e-4


def test_number_of_batches():
    assert len(PoissonSampler(10, 0.3)) == 3
    assert len(PoissonSampler(10, 1 / 93)) == 93  # int(1 / (1 / 93)) would give 92
    assert all(default_num_steps(1 / n) == n for n in [*range(1, 3000), 10**7 + 1, 10**9 + 7])
    assert default_num_steps(0.3) == 3 and default_num_steps(1.0) == 1
    s = PoissonSampler(10, 0.5, steps=7)
    assert len(s) == 7 and len(list(s)) == 7
    assert UniformWithReplacementSampler is PoissonSampler
    assert len(UniformWithReplacementSampler(num_samples=5, sample_rate=0.5)) == 2


def test_seeded_sampler_is_reproducible():
    a = list(PoissonSampler(100, 0.1, generator=gen(7)))
    b = list(PoissonSampler(100, 0.1, generator=gen(7)))
    c = list(PoissonSampler(100, 0.1, generator=gen(8)))
    assert a == b and a != c
    torch.manual_seed(3)
    d = list(PoissonSampler(100, 0.1))
    torch.manual_seed(3)
    assert d == list(PoissonSampler(100, 0.1))


@pytest.mark.parametrize("consumed", [0, 3, 10])
def test_sampler_resume_reproduces_remaining_batches(consumed):
    ref = PoissonSampler(50, 0.1, generator=gen(2))  # 10 batches per epoch
    it = iter(ref)
    head = [next(it) for _ in range(consumed)]
    state = roundtrip(ref.state_dict())
    rest = list(it) + list(ref)  # rest of this epoch, then the next epoch

    resumed = PoissonSampler(50, 0.1, generator=gen(99))
    resumed.load_state_dict(state)
    got = list(resumed) + (list(resumed) if consumed < 10 else [])
    if consumed == 10:  # saved at the end of the epoch: resumes with the next full epoch
        rest = rest[:10]
    assert len(head) == consumed and got == rest


def test_sampler_validation():
    with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\], got sample_rate=0"):
        PoissonSampler(10, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(10, 1.5)
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got num_samples=0"):
        PoissonSampler(0, 0.1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        PoissonSampler(10, 0.1, steps=0)
    with pytest.raises(ValueError, match="num_consumed"):
        PoissonSampler(10, 0.5).state_dict(num_consumed=5)


# --- loader ---------------------------------------------------------------------------


def tensor_dataset(n: int = 30) -> TensorDataset:
    g = gen(0)
    return TensorDataset(torch.randn(n, 3, 4, generator=g), torch.randint(0, 5, (n,), generator=g))


def test_from_data_loader_keeps_settings_and_sets_rate():
    ds = tensor_dataset()
    calls = []

    def collate(batch):
        calls.append(len(batch))
        return torch.utils.data.default_collate(batch)

    dl = DataLoader(ds, batch_size=6, collate_fn=collate, pin_memory=False, timeout=0)
    dp = DPDataLoader.from_data_loader(dl, generator=gen(0))
    assert isinstance(dp.batch_sampler, PoissonSampler)
    assert dp.sample_rate == pytest.approx(1 / 5) and len(dp) == 5
    assert dp.expected_batch_size == pytest.approx(6)
    assert dp.dataset is ds and dp.num_workers == 0
    x, y = next(iter(dp))
    assert x.shape[1:] == (3, 4) and calls[-1] == len(x)


def test_empty_batches_have_sample_shapes_and_dtypes():
    ds = tensor_dataset()
    dp = DPDataLoader(ds, sample_rate=1e-9, steps=3, generator=gen(0))
    batches = list(dp)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (0, 3, 4) and x.dtype == torch.float32
        assert y.shape == (0,) and y.dtype == torch.int64


Point = namedtuple("Point", ["x", "label"])


class DictDataset(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {
            "img": torch.full((2, 2), float(i), dtype=torch.float64),
            "meta": (torch.tensor(i), Point(torch.ones(3), i)),
        }


def test_empty_batches_for_nested_structures_and_custom_collate():
    def collate(batch):  # custom collate returning a tuple (dict, tensor)
        d = torch.utils.data.default_collate(batch)
        return d, d["img"].sum(dim=(1, 2))

    dp = DPDataLoader(DictDataset(), sample_rate=1e-9, steps=1, collate_fn=collate)
    ((d, s),) = list(dp)
    assert d["img"].shape == (0, 2, 2) and d["img"].dtype == torch.float64
    assert d["meta"][0].shape == (0,)
    assert (
        isinstance(d["meta"][1], Point)
        and d["meta"][1].x.shape == (0, 3)
        and d["meta"][1].label.shape == (0,)
    )
    assert s.shape == (0,)


def test_empty_batch_unsupported_leaf_raises_only_when_drawn():
    class Strings(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2), "text"

    full = DPDataLoader(Strings(), sample_rate=1.0, steps=1)
    x, s = next(iter(full))
    assert x.shape == (4, 2) and list(s) == ["text"] * 4
    empty = DPDataLoader(Strings(), sample_rate=1e-9, steps=1)
    with pytest.raises(TypeError, match="empty batch.*str"):
        next(iter(empty))


def test_batch_second_empty_batch():
    t = empty_batch_like(torch.zeros(7, 1, 3), batch_first=False)
    assert t.shape == (7, 0, 3)
    wrapped = wrap_collate_with_empty(None, sample=(torch.zeros(3), torch.tensor(1)))
    assert wrapped([])[0].shape == (0, 3)
    assert (
        wrap_collate_with_empty(wrapped, sample=torch.zeros(1)).collate_fn is torch.utils.data.default_collate
    )


def test_loader_state_dict_resume():
    ds = tensor_dataset(40)
    dp = DPDataLoader(ds, sample_rate=0.1, generator=gen(3))
    it = iter(dp)
    for _ in range(4):
        next(it)
    state = roundtrip(dp.state_dict())
    rest = [y for _, y in it]
    dp2 = DPDataLoader(ds, sample_rate=0.1, generator=gen(4))
    dp2.load_state_dict(state)
    got = [y for _, y in dp2]
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, rest))


def test_workers_and_empty_batches():
    ds = tensor_dataset(20)
    dp = DPDataLoader(ds, sample_rate=0.05, generator=gen(0), num_workers=2, steps=30)
    sizes = [len(y) for _, y in dp]
    serial = [len(b) for b in PoissonSampler(20, 0.05, generator=gen(0), steps=30)]
    assert sizes == serial and 0 in sizes


def test_loader_validation():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(ValueError, match="map-style"):
        DPDataLoader(Stream(), sample_rate=0.1)
    with pytest.raises(ValueError, match="map-style"):
        DPDataLoader.from_data_loader(DataLoader(Stream(), batch_size=1))
    with pytest.raises(TypeError, match="batch_size"):
        DPDataLoader(tensor_dataset(), sample_rate=0.1, batch_size=3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DPDataLoader.from_data_loader(DataLoader(tensor_dataset(), batch_size=3), distributed=True)
    with pytest.warns(UserWarning, match="drop_last"):
        DPDataLoader(tensor_dataset(), sample_rate=0.1, drop_last=True)


def test_switch_generator():
    ds = tensor_dataset()
    dp = DPDataLoader(ds, sample_rate=0.2, generator=gen(0))
    new = switch_generator(data_loader=dp, generator=gen(1))
    assert isinstance(new, DPDataLoader) and new.batch_sampler.generator is not dp.batch_sampler.generator
    assert [len(y) for _, y in new] == [len(b) for b in PoissonSampler(30, 0.2, generator=gen(1))]
    plain = DataLoader(ds, batch_size=5, shuffle=True)
    switched = switch_generator(data_loader=plain, generator=gen(2))
    assert switched.batch_sampler.sampler.generator is not plain.batch_sampler.sampler.generator
    assert sorted(torch.cat([y for _, y in switched]).tolist()) == sorted(ds.tensors[1].tolist())
