"""Counting FLOPs of real modules three ways: module hooks, the dispatcher (FlopCounterMode), the profiler.

Each counter is a context manager plus a one-call function that takes the model and a ``step`` closure returning a
scalar loss, and returns a :class:`FlopCount` in the units of :mod:`torchledger.formulas`. Running all three over
a model (the profiler in a pass of its own) is :func:`torchledger.counting.model_count.count_model`.
"""

from torchledger.counting.dispatch import DispatchCounter, count_with_dispatch
from torchledger.counting.hooks import HookCounter, count_with_hooks, sdpa_is_fused
from torchledger.counting.profiler import MATMUL_OPS, ProfilerCounter, count_with_profiler
from torchledger.counting.result import FlopCount

__all__ = [
    "MATMUL_OPS", "DispatchCounter", "FlopCount", "HookCounter", "ProfilerCounter", "count_with_dispatch",
    "count_with_hooks", "count_with_profiler", "sdpa_is_fused",
]
