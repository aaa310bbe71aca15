"""Counting FLOPs with ``torch.profiler`` (``with_flops=True``), summed per op.

The profiler computes FLOPs for a fixed list of ops only: ``aten::mm``, ``addmm``, ``bmm``, ``baddbmm`` and
``conv2d`` (2 per multiply-accumulate) and the elementwise ``aten::mul`` and ``aten::add`` (1 per element).
Everything else counts 0, among it ``scaled_dot_product_attention`` and its kernels, ``conv1d``, ``conv3d``,
transposed convolutions, ``convolution_backward`` and ``_int_mm``. ``matmul`` (the matmul-like ops) is what compares
with the formulas; the elementwise counts are reported beside it, outside the project's convention.

An op recorded inside another op that has FLOPs is not counted again: decompositions (``addmm`` into ``mm`` and
``add`` on the meta device) and the re-dispatch of a TorchDispatchMode (FlopCounterMode active at the same time)
would otherwise count the same work twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

from torchledger.counting.result import FlopCount

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::conv2d")
_BACKWARD_RANGE = "torchledger::backward"


class ProfilerCounter:
    """Context manager around ``torch.profiler.profile(with_flops=True)``; wrap the backward in :meth:`backward`.

    Results (``by_op``, ``forward``/``backward`` split) are available after the block exits.
    """

    def __init__(self) -> None:
        self._prof: profile | None = None
        self.by_op: dict[str, int] = {}
        self.forward_by_op: dict[str, int] = {}

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Mark the backward pass so that its ops are told apart from the forward's."""
        with record_function(_BACKWARD_RANGE):
            yield

    def __enter__(self) -> ProfilerCounter:
        self._prof = profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._prof is not None
        self._prof.__exit__(*exc)
        events = self._prof.events()
        ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == _BACKWARD_RANGE]
        self.by_op, self.forward_by_op = {}, {}
        for e in events:
            if not e.flops or _has_counted_ancestor(e):
                continue
            self.by_op[e.name] = self.by_op.get(e.name, 0) + int(e.flops)
            start = e.time_range.start
            if not any(lo <= start <= hi for lo, hi in ranges):
                self.forward_by_op[e.name] = self.forward_by_op.get(e.name, 0) + int(e.flops)

    @staticmethod
    def matmul(by_op: dict[str, int]) -> int:
        """FLOPs of the matmul-like ops only (the project's convention)."""
        return sum(n for op, n in by_op.items() if op in MATMUL_OPS)


def _has_counted_ancestor(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.flops:
            return True
        parent = parent.cpu_parent
    return False


def count_with_profiler(model: nn.Module, step: Callable[[], Tensor], *, backward: bool = True) -> FlopCount:
    """Run ``step()`` and, if ``backward``, its backward under the profiler; the matmul-like ops' FLOPs by phase."""
    with ProfilerCounter() as counter:
        loss = step()
        if backward:
            with counter.backward():
                loss.backward()
    forward = ProfilerCounter.matmul(counter.forward_by_op)
    return FlopCount(
        "profiler", forward=forward, backward=ProfilerCounter.matmul(counter.by_op) - forward, by_op=counter.by_op
    )

