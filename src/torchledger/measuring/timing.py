"""Timing GPU work correctly: synchronize, warm up, take medians; CUDA events; an optional L2 flush.

CUDA kernels run asynchronously: a timer that does not synchronize measures the launch, not the work. The suite's
pytest-benchmark timer on CUDA is :func:`synchronized_perf_counter` (the root conftest sets it through
``--benchmark-timer`` unless the user chose another), and every GPU benchmark also records the median of CUDA-event
timings (:func:`cuda_event_times`), which time the stream itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench: larger than any current GPU's L2


def synchronized_perf_counter() -> float:
    """``time.perf_counter()`` after waiting for all queued CUDA work: pytest-benchmark's timer on CUDA."""
    torch.cuda.synchronize()
    return time.perf_counter()


class L2Flush:
    """Evicts the L2 cache between timed calls by overwriting a 256 MB buffer (what ``do_bench`` does)."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def cuda_event_times(fn: Callable[[], object], *, rounds: int = 20, warmup: int = 3,
                     flush: L2Flush | None = None) -> list[float]:
    """Seconds per call of ``fn`` measured with CUDA events on the current stream, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def wall_times(fn: Callable[[], object], *, rounds: int = 5, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn`` by the wall clock (synchronized on CUDA), after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))
