"""spec -> plan: the planner and its named passes."""

from .plan import PASSES, AttendOp, Plan, PlanError, build_plan

__all__ = ["PASSES", "AttendOp", "Plan", "PlanError", "build_plan"]
