"""Privacy accountants for DP-SGD (Poisson-subsampled Gaussian mechanism).

* :class:`PRVAccountant` - numerical composition with upper and lower bounds;
  the recommended default (tight and sound).
* :class:`RDPAccountant` - Renyi DP; sound but looser, matches Opacus.
* :class:`GDPAccountant` - CLT approximation; NOT a bound, for comparison only.

The API mirrors ``opacus.accountants`` (``step``, ``get_epsilon``,
``history``, ``state_dict``, ``create_accountant``, ``get_noise_multiplier``).
This package depends only on numpy and scipy.
"""

from .base import IAccountant
from .calibrate import get_noise_multiplier
from .gdp import GDPAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant
from . import registry
from .registry import create_accountant, register_accountant

#: Opacus' name of the Gaussian DP (CLT) accountant
GaussianAccountant = GDPAccountant

__all__ = [
    "GDPAccountant",
    "GaussianAccountant",
    "IAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "register_accountant",
    "registry",
    "get_noise_multiplier",
]
