"""Timing GPU work correctly: synchronize, warm up, take medians; CUDA events; an optional L2 flush.

CUDA kernels run asynchronously: a timer that does not synchronize measures the launch, not the work. The suite's
pytest-benchmark timer on CUDA is :func:`synchronized_perf_counter` (the root conftest sets it through
``--benchmark-timer`` unless the user chose another), and every GPU benchmark also records the median of CUDA-event
timings (:func:`cuda_event_times`), which time the stream itself.

Burst against sustained load: a round that is one kernel, then a synchronize and some Python, leaves the GPU idle
between rounds, and a GPU that is idle part of the time keeps higher clocks than one kept busy (a 700 W part lowers
its SM clock under sustained tensor-core work to stay within its power limit). ``triton.testing.do_bench`` keeps the
GPU busy for about 100 ms. The suite's default on CUDA is therefore *sustained* timing: each timed round is several
back-to-back calls lasting at least :data:`SUSTAINED_ROUND_S`, as many as :func:`iterations_for` sizes from a first
estimate; *burst* timing (one call per round) is the other mode.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench: larger than any current GPU's L2


# The least time one sustained round lasts: do_bench's measuring window (its default ``rep`` is 100 ms), so that
# both timers keep the GPU under the same load and their figures can be compared.
SUSTAINED_ROUND_S = 0.1
# The most calls in one round: a 10 us kernel then fills 10 ms, and the round count stays bounded in wall time.
MAX_ITERATIONS = 1000


def iterations_for(first_estimate_s: float, min_round_s: float, max_iterations: int) -> int:
    """Calls per timed round so that a round lasts at least ``min_round_s``, given one call's estimated seconds:
    ``ceil(min_round_s / first_estimate_s)``, at least 1 and at most ``max_iterations``. A call of zero estimated
    time (a clock too coarse to see it) gets ``max_iterations``."""
    if not math.isfinite(first_estimate_s) or first_estimate_s < 0:
        raise ValueError(f"first_estimate_s must be a finite number >= 0, got {first_estimate_s!r}")
    if not math.isfinite(min_round_s) or min_round_s < 0:
        raise ValueError(f"min_round_s must be a finite number >= 0, got {min_round_s!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}")
    if first_estimate_s == 0:
        return max_iterations if min_round_s > 0 else 1
    quotient = min_round_s / first_estimate_s  # inf for a subnormal estimate
    if quotient >= max_iterations:
        return max_iterations
    calls = math.ceil(quotient)
    # the quotient is rounded: 3e-6 / 1e-7 is 30.000000000000004, whose ceiling (31) is one call more than fills
    # the round; the products decide
    while calls > 1 and (calls - 1) * first_estimate_s >= min_round_s:
        calls -= 1
    while calls * first_estimate_s < min_round_s:
        calls += 1
    return max(1, min(max_iterations, calls))


def agrees_with_do_bench(harness_s: float, do_bench_s: float, harness_sm_mhz: float | None = None,
                         do_bench_sm_mhz: float | None = None, *, tolerance: float = 0.05,
                         clock_tolerance: float = 0.03) -> dict[str, float | bool | None]:
    """Whether the suite's time per call agrees with ``do_bench``'s: within ``tolerance`` (5%) as measured, or
    within ``clock_tolerance`` (3%) once each is normalized by the SM clock it ran at (seconds x MHz: clock cycles,
    the same for the same kernel at any clock while it is compute-bound). Returns ``ratio`` (harness / do_bench),
    ``cycle_ratio`` (None without both clocks) and ``agrees``."""
    for name, value in (("harness_s", harness_s), ("do_bench_s", do_bench_s)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    ratio = harness_s / do_bench_s
    cycle_ratio = None
    if harness_sm_mhz and do_bench_sm_mhz:
        cycle_ratio = (harness_s * harness_sm_mhz) / (do_bench_s * do_bench_sm_mhz)
    agrees = abs(ratio - 1) <= tolerance or (cycle_ratio is not None and abs(cycle_ratio - 1) <= clock_tolerance)
    return {"ratio": ratio, "cycle_ratio": cycle_ratio, "agrees": agrees}


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
                     flush: L2Flush | None = None, iterations: int = 1) -> list[float]:
    """Seconds per call of ``fn`` measured with CUDA events on the current stream, after ``warmup`` calls: each
    round times ``iterations`` back-to-back calls between two events and divides by their number."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0 / iterations)
    return times


def cuda_graph(fn: Callable[[], object], *, warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured once in a ``torch.cuda.CUDAGraph``; the returned callable replays it (one launch for all its
    kernels, no Python per kernel). Warmed up on a side stream first, as capture requires. Raises RuntimeError
    without CUDA, or when ``fn`` cannot be captured (it synchronizes, reads a value on the host, allocates on the
    CPU side...)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA GPU: torch.cuda.is_available() is False")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()

    def replay() -> None:
        graph.replay()

    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its memory pool) alive
    return replay


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


class SpeedProbe:
    """How fast the machine runs right now: a fixed fp32 matmul (256 x 512 x 512), a fixed copy (64 MiB into
    another buffer), a fixed run of one-element adds (100) and of small copies (100 of 256 KiB), each timed once
    per :meth:`measure`.

    A shared CPU changes speed for seconds at a time (:class:`torchledger.formulas.steptime.MachineSpeed`); a figure
    timed with the probe in the same rounds says at which speed it was measured. The probe must read the machine,
    not what ran before it: the matmul and the adds are timed on their second call, their operands and code in the
    caches whatever the benchmark's work left there (timed cold, they ran 14% slower after a training step than
    after a 0.1 ms kernel); the copy moves 128 MiB, four times the EPYC's 32 MiB L3, so it runs from memory
    whatever was cached. About 8 ms a probe on the EPYC; the tensors are made once. The copy displaces the caches:
    a benchmark that probes between rounds calls its work once more, untimed, before the next round
    (:meth:`Ledger.time <torchledger.pytest_plugin.Ledger.time>`).

    Recorded and not yet used by the step-time model: ``small_op_s``, the seconds of one of 100 copies of 256 KiB,
    timed warm. Beside 887 gpt-tiny steps, the slowest quarter of the steps against the fastest took 1.31 times as
    long, this probe 1.38 times, the matmul probe 1.07 times: the machine's slow phases hit small ops, as a step's
    are. Timed on one thread beside two, the slow phases turned out to be the second thread's (the same copies
    1.00 times as long on one thread, 1.36 on two), which is why CPU benchmarks run on one thread by default
    (``--ledger-threads``); there this probe reads alike from round to round."""

    MATMUL = (256, 512, 512)
    COPY_BYTES = 64 * 2**20
    HOST_OPS = 100
    SMALL_OPS, SMALL_BYTES = 100, 256 * 2**10

    def __init__(self, device: str = "cpu") -> None:
        m, k, n = self.MATMUL
        gen = torch.Generator().manual_seed(0)
        self.device = device
        self.a = torch.randn(m, k, generator=gen).to(device)
        self.b = torch.randn(k, n, generator=gen).to(device)
        self.src = torch.ones(self.COPY_BYTES // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.one, self.out = torch.ones(1, device=device), torch.empty(1, device=device)
        self.small_src = torch.ones(self.SMALL_BYTES // 4, device=device)
        self.small_dst = torch.empty_like(self.small_src)
        self.samples: list[tuple[float, float, float, float]] = []

    def _seconds(self, fn: Callable[[], object]) -> float:
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def _adds(self) -> None:
        for _ in range(self.HOST_OPS):
            torch.add(self.one, self.one, out=self.out)

    def _small(self) -> None:
        for _ in range(self.SMALL_OPS):
            self.small_dst.copy_(self.small_src)

    def measure(self) -> None:
        """Time each probe once and keep the sample."""
        m, k, n = self.MATMUL
        mm = lambda: torch.mm(self.a, self.b)  # noqa: E731
        mm()
        matmul = self._seconds(mm)
        copy = self._seconds(lambda: self.dst.copy_(self.src))
        self._adds()
        host = self._seconds(self._adds)
        self._small()
        small = self._seconds(self._small)
        self.samples.append((2 * m * k * n / matmul, 2 * self.COPY_BYTES / copy, host / self.HOST_OPS,
                             small / self.SMALL_OPS))

    def summary(self, last: int) -> dict[str, float | int]:
        """Each probe's median over the ``last`` samples, as a benchmark records it (``machine_speed``)."""
        kept = self.samples[-last:] if last > 0 else []
        if not kept:
            raise ValueError(f"last={last!r}: the probe holds {len(self.samples)} samples, needs at least 1")
        return {"matmul_flops_per_s": median([s[0] for s in kept]), "copy_bytes_per_s": median([s[1] for s in kept]),
                "host_op_s": median([s[2] for s in kept]), "small_op_s": median([s[3] for s in kept]),
                "samples": len(kept)}
