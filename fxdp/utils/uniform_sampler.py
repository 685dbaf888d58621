"""Opacus' path ``opacus.utils.uniform_sampler``: Poisson (uniform with replacement) samplers."""
from ..data.sampler import DistributedPoissonSampler, PoissonSampler, UniformWithReplacementSampler

#: Opacus' name of the per-rank Poisson sampler
DistributedUniformWithReplacementSampler = DistributedPoissonSampler

__all__ = ["UniformWithReplacementSampler", "DistributedUniformWithReplacementSampler", "PoissonSampler"]
