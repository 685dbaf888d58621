"""Name -> accountant lookup (Opacus' ``create_accountant``)."""

from __future__ import annotations

from .base import IAccountant
from .gdp import GDPAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
    "gdp": GDPAccountant,
}
_ACCOUNTANTS = ACCOUNTANTS  # Opacus' name of the registry


def register_accountant(mechanism: str, accountant: type[IAccountant], force: bool = False) -> None:
    """Register ``accountant`` under ``mechanism`` for :func:`create_accountant` (Opacus'
    ``register_accountant``; ``force=True`` replaces an existing one)."""
    if mechanism in ACCOUNTANTS and not force:
        raise ValueError(f"an accountant is already registered for {mechanism!r}; pass force=True to replace it")
    ACCOUNTANTS[mechanism] = accountant


def create_accountant(
    name: str | None = None, *, mechanism: str | None = None
) -> IAccountant:
    """Returns a new accountant by name: ``"rdp"``, ``"prv"`` or ``"gdp"``.

    ``mechanism=`` is accepted as an alias so Opacus call sites keep working.
    """
    if name is not None and mechanism is not None and name != mechanism:
        raise ValueError(
            f"got both name={name!r} and mechanism={mechanism!r}; pass only one"
        )
    key = name if name is not None else mechanism
    if isinstance(key, str) and key not in ACCOUNTANTS:
        key = key.lower()
    if not isinstance(key, str) or key not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {key!r}; valid names are {sorted(ACCOUNTANTS)}"
        )
    return ACCOUNTANTS[key]()
