"""The Triton lowering: plans -> generated Triton kernels (source in a checked on-disk cache) + launchers.

``lowering`` imports triton and registers backend "triton"; ``generator`` and ``tables`` need no triton.
"""
