"""fxdp's version (a module of its own: imported by the package and by what writes it into cards)."""
__version__ = "0.1.0"
