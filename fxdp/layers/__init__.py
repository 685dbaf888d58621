"""DP-compatible layers: drop-in replacements the rewrite passes substitute."""
from .attention import DPMultiheadAttention  # noqa: F401
from .transformer import (  # noqa: F401
    DPTransformer,
    DPTransformerDecoder,
    DPTransformerDecoderLayer,
    DPTransformerEncoder,
    DPTransformerEncoderLayer,
)
from .recurrent import (  # noqa: F401
    DPGRU,
    DPLSTM,
    DPRNN,
    DPGRUCell,
    DPLSTMCell,
    DPRNNCell,
    pack_padded_sequence,
    pad_packed_sequence,
    rnn_scan,
)
