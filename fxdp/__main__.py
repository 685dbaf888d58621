"""``python -m fxdp``: see :mod:`fxdp.cli`."""
import sys

from .cli import main

sys.exit(main())
