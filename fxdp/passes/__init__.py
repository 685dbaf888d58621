"""Graph passes, one job per file: batch_dims (analysis), attention_masks (masks that
attend everywhere dropped from an exported graph), capture (insertion of capture ops),
rewrite (shared substitution machinery) and the rewrite passes, which register
themselves in ``fxdp.passes.rewrite`` on import."""

from . import batchnorm, attention  # noqa: F401
from . import recurrent  # noqa: F401,E402
