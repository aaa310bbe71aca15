"""Shared pieces of the timed benchmarks: size profiles, the measured CPU peaks, and :class:`Ledger`, which times a
callable through pytest-benchmark and records the derived figures in ``extra_info`` under the suite's keys:
``device``, ``dtype`` or ``recipe``, ``flops``, ``tflops``, ``mfu``, ``peak_memory``, ``predicted_memory``,
``rel_error`` (and ``cuda_event_median_s`` on CUDA)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from torchledger.formulas.hardware import lookup_device
from torchledger.measuring.machine import device_name
from torchledger.measuring.memory import MemoryMeasurement
from torchledger.measuring.timing import L2Flush, cuda_event_times, median, wall_times
from torchledger.measuring.training import MemoryCase

# What each size profile runs: small for a 2-core CPU (all of benchmarks/performance in minutes), full for an H100.
SIZES: dict[str, dict[str, Any]] = {
    "small": {"matmul": 512, "mlp": (512, 2048, 2048, 512), "mlp_batch": 32, "gpt": "gpt-tiny", "gpt_batch": 8,
              "gpt_seq": 128, "rounds": 5, "copy_bytes": 64 * 2**20, "loader_items": 256, "loader_batch": 32,
              "ln_rows": 4096, "attn": (4, 4, 256, 32)},
    "full": {"matmul": 8192, "mlp": (4096, 16384, 16384, 4096), "mlp_batch": 1024, "gpt": "gpt2-small",
             "gpt_batch": 16, "gpt_seq": 1024, "rounds": 20, "copy_bytes": 2 * 2**30, "loader_items": 4096,
             "loader_batch": 128, "ln_rows": 65536, "attn": (16, 16, 2048, 64)},
}


@pytest.fixture(scope="session")
def sizes(ledger_size: str) -> dict[str, Any]:
    return SIZES[ledger_size]


@pytest.fixture(scope="session")
def cpu_matmul_peaks(sizes: dict[str, Any]) -> dict[str, float]:
    """FLOP/s of this CPU's best square matmul per dtype: the ceiling MFU is measured against on CPU."""
    n = sizes["matmul"]
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, dtype=dtype)
        t = median(wall_times(lambda a=a: a @ a, rounds=3, warmup=1))
        peaks[name] = 2 * n**3 / t
    a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    peaks["int8"] = 2 * n**3 / median(wall_times(lambda: torch._int_mm(a8, a8), rounds=3, warmup=1))
    peaks["tf32"] = peaks["fp32"]  # CPUs have no tf32 path: "high" precision runs fp32
    return peaks


class Ledger:
    """Times one callable per benchmark and records what was measured beside what was predicted."""

    def __init__(self, benchmark: Any, device: str, cpu_peaks: dict[str, float], flush_l2: bool = False) -> None:
        self.benchmark, self.device, self.cpu_peaks = benchmark, device, cpu_peaks
        self.name = device_name(device)
        self.flush = L2Flush(device) if flush_l2 and self.cuda else None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_flops(self, dtype: str) -> float | None:
        """The ceiling for MFU: the hardware table's dense peak on CUDA, the measured matmul peak on CPU."""
        if not self.cuda:
            return self.cpu_peaks.get(dtype, self.cpu_peaks["fp32"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = lookup_device(self.name)
        return None if spec is None else spec.peak(dtype)

    def time(self, fn: Callable[[], object], *, rounds: int, warmup: int = 1, flops: int | None = None,
             mfu_dtype: str = "fp32", events: bool = True, **info: Any) -> float | None:
        """Benchmark ``fn``; returns the median seconds per call (None when benchmarking is disabled).

        On CUDA the median of CUDA-event timings is recorded too, unless ``events=False`` (host-bound work such as
        a DataLoader epoch, where the stream is idle most of the time)."""
        self.benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1, setup=self.flush)
        extra: dict[str, Any] = {"device": self.name, "l2_flushed": self.flush is not None, **info}
        seconds = None
        if not self.benchmark.disabled:
            seconds = self.benchmark.stats.stats.median
            if self.cuda and events:
                times = cuda_event_times(fn, rounds=max(rounds, 5), warmup=1, flush=self.flush)
                extra["cuda_event_median_s"] = median(times)
        if flops is not None:
            extra["flops"] = flops
            if seconds:
                extra["tflops"] = flops / seconds / 1e12
                peak = self.peak_flops(mfu_dtype)
                extra["mfu"] = None if peak is None else flops / seconds / peak
        self.benchmark.extra_info.update(extra)
        return seconds

    def record(self, **info: Any) -> None:
        self.benchmark.extra_info.update(info)


@pytest.fixture
def ledger(benchmark: Any, ledger_device: str, cpu_matmul_peaks: dict[str, float],
           pytestconfig: pytest.Config) -> Ledger:
    return Ledger(benchmark, ledger_device, cpu_matmul_peaks, bool(pytestconfig.getoption("--ledger-flush-l2")))


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
