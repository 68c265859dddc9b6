"""nn layers built on compiled dilated attention.

* :class:`DilatedMultiheadAttention`: ``nn.MultiheadAttention``-style dilated self-attention from a spec, with
  key padding, grouped-query attention, MAGNETO init and sub-LayerNorm.
* :class:`MultiheadCrossAttention`: the dense counterpart (torch SDPA) for cross attention.
* :class:`DilatedTransformerEncoderLayer`, :class:`DilatedTransformerDecoderLayer`: MAGNETO sub-LN layers.
* :class:`RotaryEmbedding`: rotary / XPOS positions applied to q and k.
"""

from .attention import DilatedMultiheadAttention, MultiheadCrossAttention, is_causal_mask
from .layers import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, FeedForward
from .positions import RotaryEmbedding

__all__ = ["DilatedMultiheadAttention", "MultiheadCrossAttention", "DilatedTransformerEncoderLayer",
           "DilatedTransformerDecoderLayer", "FeedForward", "RotaryEmbedding", "is_causal_mask"]
