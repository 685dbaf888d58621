"""Where in the user's code a call comes from, for messages and ``node.meta["fxdp_source"]``."""
from __future__ import annotations

import linecache
import os
import sys
from typing import Optional

import torch

__all__ = ["user_frame", "TORCH_DIR", "FXDP_DIR"]

TORCH_DIR = os.path.dirname(torch.__file__)
FXDP_DIR = os.path.dirname(os.path.dirname(__file__))


def user_frame() -> Optional[str]:
    """``file:line: code`` of the innermost calling frame outside torch and fxdp."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith(TORCH_DIR) or fn.startswith(FXDP_DIR) or fn.startswith("<")):
            line = linecache.getline(fn, f.f_lineno).strip()
            return f"{fn}:{f.f_lineno}" + (f": {line}" if line else "")
        f = f.f_back
    return None
