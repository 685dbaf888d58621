"""Numerical composition of privacy loss distributions for DP-SGD.

A privacy-random-variable (PRV) / privacy-loss-distribution (PLD) accountant
in the style of Gopi, Lee, Wutschitz 2021 ("Numerical Composition of
Differential Privacy") and Koskela, Jalko, Honkela 2020 ("Computing Tight
Differential Privacy Guarantees Using FFT"), using the "connect the dots"
discretisation of Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022 ("Connect
the Dots: Tighter Discrete Approximations of Privacy Loss Distributions").

Pipeline, for each adjacency direction (remove and add are both computed and
the larger epsilon is reported, as ``dp_accounting`` does):

1. Privacy loss of one Poisson-subsampled Gaussian step (sensitivity 1):
   ``l(x) = log((1 - q) + q exp((2x - 1) / (2 sigma^2)))`` is the log
   likelihood ratio of ``P = (1-q) N(0, s^2) + q N(1, s^2)`` against
   ``Q = N(0, s^2)`` (remove); the add direction swaps P and Q.
2. Discretise the loss on the grid ``h Z`` (:func:`discretize_sgm_pld`): the
   P-mass of every cell ``(a, a + h]`` is split between its end points so that
   ``E_P[exp(-L)]`` (the cell's Q-mass) is preserved.  This is the PLD of a
   pair that dominates the true pair (Doroshenko et al. 2022), so every
   epsilon computed from it is an upper bound, with a bias of second order in
   ``h``.  Tails beyond a Gaussian quantile are truncated pessimistically: the
   upper tail becomes loss ``+inf`` and the lower tail is moved up to the first
   grid point; both only increase delta.
3. Compose with the real FFT: ``T``-fold self composition is a pointwise
   power of the transform and heterogeneous histories are products.  The
   circular convolution wraps around the mass that leaves the window; a
   Chernoff bound computed on the *discrete* distributions bounds it, and it
   is charged to delta.  When delta is below what float64 resolves next to the
   peak of the distribution, the pmfs are first exponentially tilted by
   ``exp(lam L)`` (saddle point at epsilon), which makes the precision relative
   to delta instead of absolute.
4. Convert with the hockey-stick formula
   ``delta(eps) = E_P[(1 - exp(eps - L))_+] + P(L = inf)``, evaluated with two
   first-order reverse recursions, and solve ``delta(eps) = target`` in closed
   form inside the bracketing grid cell.  Nothing here overflows, so epsilons in
   the hundreds of thousands are fine.

Mesh and window are chosen automatically: a coarse pass locates epsilon, and
the fine mesh is set from a GDP model of the rounding error (the rounding adds
variance <= h^2 / 4 per step to the privacy loss, i.e. acts like composing with
``mu_E``-GDP, ``mu_E^2 <= T h^2 / 4``) so that the bias is at most
``eps_error`` (default ``max(5e-4, 2e-5 * eps)``).

Bounds returned by :func:`prv_epsilon_bounds`:

* ``upper``: an upper bound on the true epsilon: the discretisation dominates,
  and truncated, wrapped and infinite mass is added to delta.  The float64
  round-off of the FFT is not bounded rigorously; it is estimated as
  ``4 (T + log2 N) u max(pmf)`` per entry (measured errors against extended
  precision stay below an eighth of that) and also charged to delta.
* ``estimate``: epsilon of the discrete PLD itself, without the slack for
  wrapped mass and round-off.
* ``lower``: a lower bound.  The split of step 2 is a randomised rounding
  ``L' = L + Y`` with ``Y`` in an interval of length ``h`` and
  ``0 <= E[Y | L] <= d(h) ~ h^2 / 8``, so by Hoeffding's inequality
  ``S' <= S + T d(h) + h sqrt(T log(1/p) / 2)`` except with probability ``p``
  (the argument of Gopi et al. 2021 applied to this rounding), giving
  ``eps_true >= eps'(delta + slack) - shift``.

Exact special case: when ``sample_rate == 1`` for every step there is no
subsampling and the composition is exactly a Gaussian mechanism with
``mu = sqrt(sum_i T_i / sigma_i^2)``, whose epsilon is computed in closed form
(Balle & Wang 2018) for any size of epsilon.

Modules: :mod:`.pld` (privacy loss of one step and its discretisation),
:mod:`.compose` (one discretise-compose-convert pass), :mod:`.bounds` (mesh and
window choice, both directions, :func:`prv_epsilon_bounds`) and :mod:`.accountant`
(:class:`PRVAccountant`).
"""

# DiscretePLD, sgm_loss_range and _direction_bounds (used by the tests) are kept
# importable from here, where they lived before the split.
from .accountant import PRVAccountant
from .bounds import _direction_bounds, prv_epsilon_bounds  # noqa: F401
from .compose import EpsilonBounds
from .pld import (  # noqa: F401
    DiscretePLD,
    discretize_sgm_pld,
    sgm_inverse_privacy_loss,
    sgm_loss_range,
    sgm_privacy_loss,
)

__all__ = [
    "EpsilonBounds",
    "PRVAccountant",
    "discretize_sgm_pld",
    "prv_epsilon_bounds",
    "sgm_inverse_privacy_loss",
    "sgm_privacy_loss",
]
