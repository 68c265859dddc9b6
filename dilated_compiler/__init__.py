"""dilated-compiler: a declarative compiler for long-context dilated attention.

spec (YAML or Python) -> plan (networkx DAG with sympy costs) -> lowering (torch ops or generated Triton)
-> runtime (cached, registered torch custom op, torch.compile friendly).
"""

from .spec import AttentionSpec, Branch, SpecError, load_spec
from . import reference
from .planner import Plan, PlanError, build_plan

__version__ = "0.1.0"

__all__ = ["AttentionSpec", "Branch", "SpecError", "load_spec", "reference", "Plan", "PlanError", "build_plan",
           "compile_attention"]


def __getattr__(name):
    # The runtime imports torch.library registrations; load it on first use.
    if name == "compile_attention":
        from .runtime import compile_attention
        return compile_attention
    if name == "runtime":
        import importlib
        return importlib.import_module(".runtime", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
