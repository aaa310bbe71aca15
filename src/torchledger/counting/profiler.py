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
        self.by_op, self.forward_by_op = {}, {}
        backward_ranges: list[tuple[int, int]] = []
        flop_events: list[tuple[int, int, int, str, int]] = []  # (thread, start, end, name, flops)
        for name, thread, start, end, flops in _raw_events(self._prof):
            if name == _BACKWARD_RANGE:
                backward_ranges.append((start, end))
            elif flops:
                flop_events.append((thread, start, end, name, flops))
        # Keep only the outermost op with FLOPs on each thread: a nested one is the same work recorded twice.
        flop_events.sort(key=lambda e: (e[0], e[1], -e[2]))
        open_until: dict[int, int] = {}
        for thread, start, end, name, flops in flop_events:
            if start < open_until.get(thread, -1):
                continue
            open_until[thread] = end
            self.by_op[name] = self.by_op.get(name, 0) + flops
            if not any(lo <= start <= hi for lo, hi in backward_ranges):
                self.forward_by_op[name] = self.forward_by_op.get(name, 0) + flops

    @staticmethod
    def matmul(by_op: dict[str, int]) -> int:
        """FLOPs of the matmul-like ops only (the project's convention)."""
        return sum(n for op, n in by_op.items() if op in MATMUL_OPS)


def _raw_events(prof: profile) -> Iterator[tuple[str, int, int, int, int]]:
    """(name, thread, start_ns, end_ns, flops) of every recorded event.

    Reads the profiler's raw event list: building its FunctionEvent tree (``prof.events()``) costs seconds for a
    model of thousands of ops and is not needed here.
    """
    raw = getattr(prof.profiler, "kineto_results", None) if prof.profiler is not None else None
    if raw is None:  # pragma: no cover - older builds
        for e in prof.events():
            yield e.name, e.thread, e.time_range.start * 1000, e.time_range.end * 1000, int(e.flops or 0)
        return
    for e in raw.events():
        start = e.start_ns()
        yield e.name(), e.start_thread_id(), start, start + e.duration_ns(), int(e.flops())


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

