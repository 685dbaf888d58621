"""Tests of secure mode: CSPRNG noise and Poisson sampling, floating-point hardening.

Secure draws are unseeded by design, so the statistical tests are fixed-size tests with
a p-value threshold of 1e-5 (or a 5-sigma z-score, 6e-7). Under the null hypothesis a
p-value is uniform on [0, 1], so each assertion fails by chance with probability 1e-5
whatever the sample size (about a dozen of them: < 2e-4 per run of this file); the
sample size only sets the power, stated per test.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fxdp.data import DPDataLoader, PoissonSampler, switch_generator
from fxdp.optim import DPOptimizer, secure
from fxdp.optim.noise import gaussian_noise, noisy_sum, secure_generator
from fxdp.optim.secure import (
    is_secure,
    secure_bernoulli,
    secure_gaussian_mechanism,
    secure_standard_normal,
    secure_uniform,
    snap_grid,
)

P_MIN = 1e-5


def ks_normal(x: torch.Tensor, std: float) -> float:
    return float(stats.kstest(x.double().numpy().ravel() / std, "norm").pvalue)


# --- CSPRNG bytes and uniforms ------------------------------------------------------------


@pytest.mark.parametrize("name", ["urandom", "chacha20"])
def test_backends_give_uniform_bytes(name, monkeypatch):
    if name == "chacha20" and not secure._HAVE_CHACHA:
        pytest.skip("the chacha20 backend needs the optional 'cryptography' package")
    monkeypatch.setattr(secure, "_backend", name)
    calls = []
    real = secure._chacha20_keystream
    monkeypatch.setattr(secure, "_chacha20_keystream", lambda n: calls.append(n) or real(n))
    n = 1 << 20  # above the 64 KiB that always come straight from os.urandom
    b = secure.random_bytes(n)
    assert b.dtype == np.uint8 and b.shape == (n,)
    assert calls == ([n] if name == "chacha20" else [])
    # byte histogram vs uniform: chi2 with 255 degrees of freedom
    counts = np.bincount(b, minlength=256)
    assert stats.chisquare(counts).pvalue > P_MIN
    assert not np.array_equal(b, secure.random_bytes(n))


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        secure.set_backend("mersenne")
    secure.set_backend("auto")
    assert secure.backend() in ("chacha20", "urandom")


def test_uniforms_are_exact_53_bit_values():
    u = secure_uniform(100_000)
    assert u.dtype == torch.float64 and bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u * 2.0**53, torch.round(u * 2.0**53))  # on the 2^-53 grid
    v = secure_uniform(100_000, open_low=True)
    assert bool((v > 0).all()) and bool((v <= 1).all())
    assert stats.kstest(u.numpy(), "uniform").pvalue > P_MIN


# --- Gaussian noise ----------------------------------------------------------------------------


def test_secure_noise_is_gaussian_ks():
    # n = 200k: the test detects a KS distance above sqrt(ln(2/1e-5) / 2n) = 0.0055,
    # e.g. a std off by 2.5% (D ~ 0.24 * 0.025) or a wrong sum-of-4 scaling.
    std = 0.37
    x = gaussian_noise(std, (200_000,), dtype=torch.float64, generator=secure_generator())
    assert ks_normal(x, std) > P_MIN
    # moments: z-scores of the mean and of the variance (Var(s^2) = 2 sigma^4 / n)
    n = x.numel()
    assert abs(float(x.mean())) / (std / math.sqrt(n)) < 5
    assert abs(float(x.var()) - std**2) / (std**2 * math.sqrt(2 / n)) < 5


def test_standard_normal_edge_sizes_and_dtypes():
    assert secure_standard_normal(0).shape == (0,)
    assert secure_standard_normal(1).shape == (1,)
    g = secure_generator()
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z = gaussian_noise(2.0, (3, 4), dtype=dt, generator=g)
        assert z.dtype == dt and z.shape == (3, 4) and bool(torch.isfinite(z).all())
    assert torch.equal(gaussian_noise(0.0, (3,), generator=g), torch.zeros(3))


def test_two_runs_differ_even_with_the_same_global_seed():
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(gaussian_noise(1.0, (64,), generator=secure_generator()))
    assert not torch.equal(draws[0], draws[1])


def test_dp_optimizer_secure_mode_draws_from_the_csprng(monkeypatch):
    sigma, C, d = 1.3, 0.7, 50_000
    p = nn.Parameter(torch.zeros(d))
    opt = DPOptimizer(
        torch.optim.SGD([p], lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=1,
        loss_reduction="sum",
        secure_mode=True,
    )
    assert is_secure(opt.generator)
    requested = []
    real = secure.random_bytes
    monkeypatch.setattr(secure, "random_bytes", lambda n: requested.append(n) or real(n))
    engine_state, global_state = opt.generator.get_state(), torch.get_rng_state()
    p.grad_sample = torch.zeros(1, d)
    opt.step()
    # 4 normals per coordinate = 2 Box-Muller pairs = 4 uniform words of 8 bytes
    assert sum(requested) == 32 * d
    # nothing came from PyTorch's generators
    assert torch.equal(opt.generator.get_state(), engine_state)
    assert torch.equal(torch.get_rng_state(), global_state)
    # the released noise is N(0, (sigma C)^2); n = 50k detects a 5% std error
    assert ks_normal(p.grad, sigma * C) > P_MIN


def test_secure_state_cannot_be_replayed():
    p = nn.Parameter(torch.zeros(3))
    opt = DPOptimizer(
        torch.optim.SGD([p], lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1, secure_mode=True
    )
    assert opt.noise_generator_state() is None
    with pytest.raises(ValueError, match="cannot be restored"):
        opt.set_noise_generator_state(torch.Generator().get_state())
    g = opt.generator
    with pytest.raises(TypeError, match="cannot be seeded"):
        g.manual_seed(0)
    with pytest.raises(TypeError, match="cannot be restored"):
        g.set_state(g.get_state())
    # copies (deepcopy of an optimizer, pickling) stay secure and are fresh
    clone = copy.deepcopy(opt)
    assert is_secure(clone.generator) and clone.generator is not g
    assert is_secure(pickle.loads(pickle.dumps(g)))


# --- snapping (Mironov 2012) --------------------------------------------------------------------


def low_bit_leak(y: torch.Tensor) -> int:
    """Outputs in (0, 1/8] off the 2^-24 grid: impossible for fl32(1 + n), see below."""
    small = y[(y > 0) & (y <= 0.125)].double()
    return int((small * 2.0**24 != torch.round(small * 2.0**24)).sum())


def test_float32_addition_leaks_the_input_and_snapping_fixes_it():
    # Mironov's attack on fl(x + n), with perfect noise: for x = 1 an output in (0, 1/8]
    # needs n in [-1, -7/8], where float32 has spacing 2^-24, and 1 + n is exact
    # (Sterbenz), so the output is a multiple of 2^-24. For x' = 1/4 it needs
    # n in [-1/4, -1/8): spacing 2^-26, so 3/4 of those outputs are off the 2^-24 grid.
    # An output off the grid proves x' (infinite privacy loss, probability ~3.7% here).
    g = secure_generator()
    n = gaussian_noise(1.0, (20_000,), dtype=torch.float32, generator=g)
    one, quarter = torch.tensor(1.0), torch.tensor(0.25)
    assert low_bit_leak(one + n) == 0
    assert low_bit_leak(quarter + n) > 300  # ~Binomial(20000, 0.037): mean 730
    # snapping: every output is a multiple of Lambda = 2^-8 whatever the input
    lam = snap_grid(1.0)
    assert lam == 2.0**-8
    for x in (one, quarter):
        y = secure_gaussian_mechanism(x.expand(20_000), 1.0)
        assert y.dtype == torch.float32 and torch.equal(y / lam, torch.round(y / lam))
        assert low_bit_leak(y) == 0


def test_snapped_mechanism_is_gaussian_around_the_input():
    std, d = 0.8, 100_000
    x = torch.linspace(-3, 3, d, dtype=torch.float64)
    y = secure_gaussian_mechanism(x, std)
    lam = snap_grid(std)
    assert std / 512 < lam <= std / 256
    assert torch.equal(y / lam, torch.round(y / lam))
    # undo the rounding's discreteness with uniform jitter over the cell before the KS test
    jitter = (torch.rand(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * lam
    assert ks_normal(y + jitter - x, std) > P_MIN
    assert torch.equal(secure_gaussian_mechanism(x, 0.0), x)


def test_snapped_mechanism_refuses_out_of_range_inputs():
    with pytest.raises(ValueError, match="2\\^20 times the noise"):
        secure_gaussian_mechanism(torch.tensor([2.0**21]), 1.0)
    with pytest.raises(FloatingPointError):
        secure_gaussian_mechanism(torch.tensor([math.nan]), 1.0)
    with pytest.raises(ValueError):
        snap_grid(0.0)


def test_noisy_sum_routes_by_generator():
    x = torch.ones(1000)
    g = torch.Generator().manual_seed(3)
    expected = x + gaussian_noise(0.5, x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy_sum(x, 0.5, generator=g), expected)  # non-secure: unchanged arithmetic
    y = noisy_sum(x, 0.5, generator=secure_generator())
    lam = snap_grid(0.5)
    assert torch.equal(y / lam, torch.round(y / lam))


# --- secure Poisson sampling ------------------------------------------------------------------


def test_secure_bernoulli_threshold_is_exact_and_never_above_p():
    assert bool(secure_bernoulli(100, 1.0).all()) and not bool(secure_bernoulli(100, 0.0).any())
    n, p = 1_000_000, 0.3
    k = int(secure_bernoulli(n, p).sum())
    assert stats.binomtest(k, n, p).pvalue > P_MIN
    # the integer threshold floor(p 2^64) gives probability in (p - 2^-64, p]
    for q in (0.3, 1e-9, 1 - 1e-16, 2.0**-70):
        t = math.floor(secure.Fraction(q) * (1 << 64))
        assert 0 <= q - t / 2**64 < 2.0**-64


def test_secure_poisson_batch_sizes_are_binomial():
    N, q, steps = 1000, 0.05, 2000
    sampler = PoissonSampler(N, q, steps=steps, secure=True)
    assert sampler.secure and is_secure(sampler.generator)
    counts = np.zeros(N)
    sizes = []
    for b in sampler:
        assert b == sorted(set(b)) and all(0 <= i < N for i in b)
        counts[b] += 1
        sizes.append(len(b))
    sizes = np.array(sizes)
    # the total is Binomial(N * steps, q): exact two-sided binomial test
    assert stats.binomtest(int(sizes.sum()), N * steps, q).pvalue > P_MIN
    # sample variance of Binomial(N, q) sizes: Var(s^2) = var^2 (2/(n-1) + kurt/n)
    var = N * q * (1 - q)
    kurt = (1 - 6 * q * (1 - q)) / var
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (steps - 1) + kurt / steps)
    # each index ~ Binomial(steps, q) independently: chi2(N) of the standardised counts
    chi2 = (((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, N) > P_MIN and stats.chi2.cdf(chi2, N) > P_MIN


def test_secure_generator_makes_sampler_and_loader_secure():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    a = [len(b) for b in PoissonSampler(500, 0.1, generator=secure_generator(), steps=20)]
    torch.manual_seed(0)
    b = [len(b) for b in PoissonSampler(500, 0.1, generator=secure_generator(), steps=20)]
    assert a != b  # not driven by the global seed (equal with probability ~1e-20)
    ds = TensorDataset(torch.randn(40, 3))
    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=4), generator=secure_generator())
    assert dl.batch_sampler.secure
    plain = DPDataLoader(ds, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    assert not plain.batch_sampler.secure
    assert switch_generator(data_loader=plain, generator=secure_generator()).batch_sampler.secure
    assert PoissonSampler(10, 0.5, generator=torch.Generator()).secure is False


def test_secure_sampler_state_resumes_without_replay():
    s = PoissonSampler(100, 0.2, steps=10, secure=True)
    it = iter(s)
    for _ in range(4):
        next(it)
    state = s.state_dict()
    assert state == {"secure": True, "num_consumed": 4}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = PoissonSampler(100, 0.2, steps=10, secure=True)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 6  # the rest of the epoch, freshly drawn
    assert len(list(resumed)) == 10  # then full epochs
    plain = PoissonSampler(100, 0.2, steps=10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="secure"):
        plain.load_state_dict(state)
    # a secure sampler ignores a non-secure generator state: it never replays
    other = PoissonSampler(100, 0.2, steps=10, secure=True)
    other.load_state_dict(plain.state_dict())
    assert len(list(other)) == 10


def test_privacy_engine_secure_mode_end_to_end(monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset

    import fxdp

    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = nn.Linear(4, 2)
    engine = fxdp.PrivacyEngine(secure_mode=True)
    dm, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert is_secure(opt.generator) and dl.batch_sampler.secure
    requested = []
    real = secure.random_bytes
    monkeypatch.setattr(secure, "random_bytes", lambda n: requested.append(n) or real(n))
    for x, y in dl:
        nn.functional.cross_entropy(dm(x), y).backward()
        opt.step()
        opt.zero_grad()
    # per step: 64 sampling words, then 4 words per coordinate for weight (8) and bias (2)
    assert requested == [64 * 8, 8 * 32, 2 * 32] * len(dl)
    assert opt.noise_generator_state() is None
