"""Shared pieces of the timed benchmarks: size profiles, the measured CPU peaks, and :class:`Ledger`, which times a
callable through pytest-benchmark and records the derived figures in ``extra_info`` under the suite's keys:
``device``, ``dtype`` or ``recipe``, ``flops``, ``tflops``, ``mfu``, ``peak_memory``, ``predicted_memory``,
``rel_error``; on CUDA ``cuda_event_median_s`` and ``gpu_state``; and for every benchmark ``work`` (the size of the
work) and ``comparable`` (the one figure that compares across machines), checked after each test."""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable, Generator, Iterable
from typing import Any

import pytest
import torch

from torchledger.formulas.hardware import lookup_device
from torchledger.measuring.gpu_state import GpuStateSampler, cuda_uuid
from torchledger.measuring.machine import device_name
from torchledger.measuring.memory import MemoryMeasurement
from torchledger.measuring.timing import (
    MAX_ITERATIONS,
    SUSTAINED_ROUND_S,
    L2Flush,
    cuda_event_times,
    cuda_graph,
    iterations_for,
    median,
    wall_times,
)
from torchledger.measuring.training import MemoryCase

# What each size profile runs: small for a 2-core CPU (all of benchmarks/performance in minutes), full for an H100.
# The compile cases run their own model: max-autotune tunes every matmul shape and fused kernel, which takes minutes
# on the whole of GPT-2 small at 16 x 1024; two of its blocks at 8 x 512 have the same kernel shapes but fewer.
SIZES: dict[str, dict[str, Any]] = {
    "small": {"matmul": 512, "mlp": (512, 2048, 2048, 512), "mlp_batch": 32, "gpt": "gpt-tiny", "gpt_batch": 8,
              "gpt_seq": 128, "rounds": 5, "copy_bytes": 64 * 2**20, "loader_items": 256, "loader_batch": 32,
              "ln_rows": 4096, "attn": (4, 4, 256, 32),
              "compile_gpt": "gpt-tiny", "compile_layers": None, "compile_batch": 8, "compile_seq": 128},
    "full": {"matmul": 8192, "mlp": (4096, 16384, 16384, 4096), "mlp_batch": 1024, "gpt": "gpt2-small",
             "gpt_batch": 16, "gpt_seq": 1024, "rounds": 10, "copy_bytes": 2 * 2**30, "loader_items": 4096,
             "loader_batch": 128, "ln_rows": 65536, "attn": (16, 16, 2048, 64),
             "compile_gpt": "gpt2-small", "compile_layers": 2, "compile_batch": 8, "compile_seq": 512},
}

COMPARABLE_NAMES = ("tflops", "gbps", "samples_per_s", "batches_per_s")


@pytest.fixture(scope="session")
def sizes(ledger_size: str) -> dict[str, Any]:
    return {**SIZES[ledger_size], "profile": ledger_size}


class CpuPeaks:
    """FLOP/s of this CPU's best square matmul per dtype (n x n, fp32, bf16, fp16, int8 with the second operand
    row- or column-major, whichever is faster): the ceiling MFU is
    measured against on the CPU. Measured on the first :meth:`peak` only, so a run that never needs a CPU MFU
    (every CUDA run) never pays for it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._peaks: dict[str, float] | None = None

    @property
    def measured(self) -> bool:
        return self._peaks is not None

    def _measure(self) -> dict[str, float]:
        n = self.n
        peaks = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            a = torch.randn(n, n, dtype=dtype)
            peaks[name] = 2 * n**3 / median(wall_times(lambda a=a: a @ a, rounds=3, warmup=1))
        a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        b8 = a8.t().contiguous().t()  # the faster of the two layouts of the second operand is the ceiling
        peaks["int8"] = 2 * n**3 / min(median(wall_times(lambda b=b: torch._int_mm(a8, b), rounds=3, warmup=1))
                                       for b in (a8, b8))
        peaks["tf32"] = peaks["fp32"]  # CPUs have no tf32 path: "high" precision runs fp32
        return peaks

    def peak(self, dtype: str) -> float:
        if self._peaks is None:
            self._peaks = self._measure()
        return self._peaks.get(dtype, self._peaks["fp32"])


@pytest.fixture(scope="session")
def cpu_matmul_peaks(sizes: dict[str, Any]) -> CpuPeaks:
    """This CPU's matmul peaks, measured lazily (see :class:`CpuPeaks`)."""
    return CpuPeaks(sizes["matmul"])


def comparable_figure(seconds: float | None, *, flops: int | None = None, bytes_moved: int | None = None,
                      samples: int | None = None, batches: int | None = None,
                      peak: Callable[[str], float | None] = lambda name: None) -> dict[str, Any] | None:
    """The figure of one call that compares across machines: TFLOP/s of ``flops``, else GB/s of ``bytes_moved``,
    else samples/s, else batches/s; ``fraction_of_peak`` is the figure over ``peak(name)`` (None when unknown).
    ``value`` is None when ``seconds`` is (benchmarking disabled); None when no work is given."""
    for name, amount, scale in (("tflops", flops, 1e12), ("gbps", bytes_moved, 1e9), ("samples_per_s", samples, 1),
                                ("batches_per_s", batches, 1)):
        if amount is not None:
            if not seconds:
                return {"name": name, "value": None, "fraction_of_peak": None}
            ceiling = peak(name)
            return {"name": name, "value": amount / seconds / scale,
                    "fraction_of_peak": None if not ceiling else amount / seconds / ceiling}
    return None


def work_problems(extra: dict[str, Any], *, timed: bool) -> list[str]:
    """What is wrong with a benchmark's ``work`` and ``comparable`` records ([] when nothing): ``work`` a dict
    with a ``profile`` and at least one size; ``comparable`` a dict naming one of :data:`COMPARABLE_NAMES`, with a
    finite ``value`` > 0 when the benchmark was ``timed`` and a ``fraction_of_peak`` that is None or > 0."""
    problems = []
    work = extra.get("work")
    if not isinstance(work, dict) or work.get("profile") not in ("small", "full") or len(work) < 2:
        problems.append(f"work {work!r} is not a dict with a profile (small or full) and the size of the work")
    comparable = extra.get("comparable")
    if not isinstance(comparable, dict) or comparable.get("name") not in COMPARABLE_NAMES:
        problems.append(f"comparable {comparable!r} is not a dict naming one of {', '.join(COMPARABLE_NAMES)}")
    else:
        value, fraction = comparable.get("value"), comparable.get("fraction_of_peak")
        if timed and not (isinstance(value, float) and math.isfinite(value) and value > 0):
            problems.append(f"comparable value {value!r} is not a finite number > 0")
        if fraction is not None and not (isinstance(fraction, float) and math.isfinite(fraction) and fraction > 0):
            problems.append(f"comparable fraction_of_peak {fraction!r} is neither None nor a finite number > 0")
    return problems


_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_PASSED] = report.passed


@pytest.fixture(autouse=True)
def _work_is_recorded(request: pytest.FixtureRequest) -> Generator[None, None, None]:
    """Every benchmark that ran records ``work`` and ``comparable`` (the contract report code reads)."""
    benchmark = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    yield
    if benchmark is None or not request.node.stash.get(_PASSED, False):
        return
    problems = work_problems(dict(benchmark.extra_info), timed=not benchmark.disabled)
    if problems:
        pytest.fail(f"{request.node.nodeid}: " + "; ".join(problems), pytrace=False)


def record_work(benchmark: Any, profile: str, work: dict[str, Any], comparable: dict[str, Any] | None) -> None:
    """``work`` and ``comparable`` for a benchmark timed without :class:`Ledger`."""
    benchmark.extra_info.update({"work": {"profile": profile, **work}, "comparable": comparable})


class Ledger:
    """Times one callable per benchmark and records what was measured beside what was predicted."""

    def __init__(self, benchmark: Any, device: str, cpu_peaks: CpuPeaks, flush_l2: bool = False, *,
                 timing: str = "burst", cuda_graphs: bool = False, profile: str = "small") -> None:
        if timing not in ("burst", "sustained"):
            raise ValueError(f"timing must be 'burst' or 'sustained', got {timing!r}")
        self.benchmark, self.device, self.cpu_peaks = benchmark, device, cpu_peaks
        self.timing, self.cuda_graphs, self.profile = timing, cuda_graphs, profile
        self.name = device_name(device)
        self.flush = L2Flush(device) if flush_l2 and self.cuda else None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def table_entry(self) -> Any:
        if not self.cuda:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lookup_device(self.name)

    def peak_flops(self, dtype: str) -> float | None:
        """The ceiling for MFU: the hardware table's dense peak on CUDA, the measured matmul peak on CPU."""
        if not self.cuda:
            return self.cpu_peaks.peak(dtype)
        spec = self.table_entry()
        return None if spec is None else spec.peak(dtype)

    def iterations(self, fn: Callable[[], object], events: bool) -> int:
        """Calls per timed round: 1 in burst timing, with the L2 flush (a setup between rounds), for host-bound work
        and when benchmarking is disabled; else enough to fill :data:`SUSTAINED_ROUND_S`."""
        if self.timing == "burst" or self.flush is not None or not events or self.benchmark.disabled:
            return 1
        estimate = median(wall_times(fn, rounds=3, warmup=1, device=self.device))
        return iterations_for(estimate, SUSTAINED_ROUND_S, MAX_ITERATIONS)

    def time(self, fn: Callable[[], object], *, rounds: int, work: dict[str, Any], warmup: int = 1,
             flops: int | None = None, bytes_moved: int | None = None, samples: int | None = None,
             batches: int | None = None, link: str = "memory", mfu_dtype: str = "fp32", events: bool = True,
             **info: Any) -> float | None:
        """Benchmark ``fn``; returns the median seconds per call (None when benchmarking is disabled).

        ``work`` names the size of the work (the profile is added); ``flops``, ``bytes_moved`` (against the
        ``memory`` or ``host`` link's bandwidth), ``samples`` or ``batches`` per call give the ``comparable``
        figure, the first of them given. On CUDA the median of CUDA-event timings is recorded too, unless
        ``events=False`` (host-bound work such as a DataLoader epoch, where the stream is idle most of the time),
        with the GPU's clocks, power and temperature during the timed rounds (``gpu_state``)."""
        iterations = self.iterations(fn, events)
        sampler = GpuStateSampler(torch.device(self.device).index or 0, uuid=cuda_uuid(self.device)) \
            if self.cuda and not self.benchmark.disabled else None
        if sampler is not None:
            sampler.start()
        try:
            self.benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=iterations,
                                    setup=self.flush)
        finally:
            state = sampler.stop() if sampler is not None else None
        extra: dict[str, Any] = {"device": self.name, "l2_flushed": self.flush is not None, "timing": self.timing,
                                 "iterations": iterations, **info}
        if state is not None:
            extra["gpu_state"] = state
        seconds = None
        if not self.benchmark.disabled:
            seconds = self.benchmark.stats.stats.median
            if self.cuda and events:
                times = cuda_event_times(fn, rounds=max(rounds, 5), warmup=1, flush=self.flush, iterations=iterations)
                extra["cuda_event_median_s"] = median(times)
                if self.cuda_graphs:
                    extra.update(self._graph_figures(fn, rounds, iterations, extra["cuda_event_median_s"]))
        if self.cuda_graphs and "cuda_graph_median_s" not in extra and "cuda_graph_error" not in extra:
            extra["cuda_graph_skipped"] = ("needs a CUDA GPU" if not self.cuda else "host-bound work"
                                           if not events else "benchmarking is disabled")
        if flops is not None:
            extra["flops"] = flops
            if seconds:
                extra["tflops"] = flops / seconds / 1e12
                peak = self.peak_flops(mfu_dtype)
                extra["mfu"] = None if peak is None else flops / seconds / peak
        extra["work"] = {"profile": self.profile, **work}
        extra["comparable"] = comparable_figure(seconds, flops=flops, bytes_moved=bytes_moved, samples=samples,
                                                batches=batches, peak=lambda name: self._ceiling(name, mfu_dtype,
                                                                                                 link))
        self.benchmark.extra_info.update(extra)
        return seconds

    def _ceiling(self, name: str, dtype: str, link: str) -> float | None:
        if name == "tflops":
            return self.peak_flops(dtype)
        if name == "gbps":
            spec = self.table_entry()
            return None if spec is None else (spec.host_link_bandwidth if link == "host" else spec.memory_bandwidth)
        return None

    def _graph_figures(self, fn: Callable[[], object], rounds: int, iterations: int,
                       eager_s: float) -> dict[str, Any]:
        """Time per call of ``fn`` replayed from a CUDA graph, by CUDA events, beside the eager events' figure."""
        try:
            replay = cuda_graph(fn)
            graph_s = median(cuda_event_times(replay, rounds=max(rounds, 5), warmup=1, iterations=iterations))
        except Exception as exc:  # not capturable (a host sync, a CPU-side value): recorded, not fatal
            torch.cuda.synchronize()
            return {"cuda_graph_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        return {"cuda_graph_median_s": graph_s, "cuda_graph_speedup": eager_s / graph_s}

    def set_comparable(self, name: str, value: float | None, fraction_of_peak: float | None = None) -> None:
        """The comparable figure of work whose figure is known only after timing (a sweep's best bandwidth)."""
        if name not in COMPARABLE_NAMES:
            raise ValueError(f"comparable name must be one of {', '.join(COMPARABLE_NAMES)}, got {name!r}")
        self.benchmark.extra_info["comparable"] = {"name": name, "value": value, "fraction_of_peak": fraction_of_peak}

    def record(self, **info: Any) -> None:
        self.benchmark.extra_info.update(info)


@pytest.fixture
def ledger(benchmark: Any, ledger_device: str, cpu_matmul_peaks: CpuPeaks, ledger_timing: str, ledger_size: str,
           pytestconfig: pytest.Config) -> Ledger:
    return Ledger(benchmark, ledger_device, cpu_matmul_peaks, bool(pytestconfig.getoption("--ledger-flush-l2")),
                  timing=ledger_timing, cuda_graphs=bool(pytestconfig.getoption("--ledger-cuda-graphs")),
                  profile=ledger_size)


def memory_base(device: str) -> int:
    """Bytes allocated before a benchmark builds its model: the baseline its measured peak is taken above.

    On CUDA, what earlier tests left is collected first and the cuBLAS workspaces (one per thread: the caller's and
    the autograd engine's) are made before the baseline, so that the peak is the step's and nothing else's."""
    if not device.startswith("cuda"):
        return 0
    from torchledger.measuring.memory import cuda_allocated, cuda_warmup

    gc.collect()
    torch.cuda.empty_cache()
    cuda_warmup(device)
    return cuda_allocated(device)


def peak_memory(device: str, fn: Callable[[], object], model: torch.nn.Module | None = None,
                optimizer: torch.optim.Optimizer | None = None, *, base: int,
                inputs: Iterable[torch.Tensor] = ()) -> MemoryMeasurement:
    """Measured peak of one call of ``fn``: the allocator's above ``base`` (see :func:`memory_base`) on CUDA, less
    ``inputs`` (the caller's batches), with the storage tracker's categories beside it; the tracker on CPU."""
    from torchledger.measuring.memory import measure_cpu, measure_cuda

    if device.startswith("cuda"):
        return measure_cuda(fn, base=base, device=device, model=model, optimizer=optimizer, inputs=inputs)
    return measure_cpu(fn, model, optimizer)


def memory_info(case: MemoryCase, measured: MemoryMeasurement) -> dict[str, Any]:
    """The ``extra_info`` of a memory measurement: the full configuration (``memory_case``, which
    ``MemoryCase.from_record`` rebuilds), measured and predicted peaks and their categories, so that a CPU can
    replay a GPU run's figures against a later prediction."""
    predicted = case.predict()
    return {"memory_case": case.to_record(), "peak_memory": measured.peak, "predicted_memory": predicted.peak,
            "measured_by_category": measured.by_category, "predicted_by_category": predicted.breakdown(),
            "predicted_phase": predicted.phase}
