"""LongNet models (arXiv 2307.02486) on dilated attention: :class:`LongNet` (encoder-decoder) and
:class:`LongNetLM` (decoder-only language model), with MAGNETO initialisation (arXiv 2210.06423)."""

from .longnet import LongNet, LongNetLM, longnet_spec, magneto_gamma

__all__ = ["LongNet", "LongNetLM", "longnet_spec", "magneto_gamma"]
