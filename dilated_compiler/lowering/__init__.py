"""plan -> executable: lowerings by backend name ("torch" here; "triton" in lowering/triton)."""

from .base import BackendError, LoweredPlan, get_lowering, lowerings, register_lowering
from . import torch_lowering  # noqa: F401  (registers "torch")

__all__ = ["BackendError", "LoweredPlan", "get_lowering", "lowerings", "register_lowering"]

_TRITON_ERROR: str | None = None
try:  # the Triton lowering registers "triton" when triton imports
    from .triton import lowering as _triton_lowering  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    _TRITON_ERROR = f"{type(e).__name__}: {e}"


def triton_available() -> bool:
    return "triton" in lowerings()


def triton_unavailable_reason() -> str:
    return _TRITON_ERROR or "the Triton lowering is not registered"
