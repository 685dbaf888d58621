"""DP-compatible layers: drop-in replacements the rewrite passes substitute."""
from .attention import DPMultiheadAttention  # noqa: F401
from .transformer import (  # noqa: F401
    DPTransformer,
    DPTransformerDecoder,
    DPTransformerDecoderLayer,
    DPTransformerEncoder,
    DPTransformerEncoderLayer,
)
from .recurrent import *  # noqa: F401,F403 - DPRNN/DPGRU/DPLSTM, cells, packing, rnn_scan
