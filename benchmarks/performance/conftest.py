"""Shared pieces of the timed benchmarks: size profiles, the suite's check of what every benchmark records, and
the memory helpers. :class:`Ledger` (the ``ledger`` fixture), which times a callable through pytest-benchmark and
records the derived figures in ``extra_info`` under the suite's keys (``device``, ``dtype`` or ``recipe``, ``flops``,
``tflops``, ``mfu``, ``peak_memory``, ``predicted_memory``, ``rel_error``; on CUDA ``cuda_event_median_s`` and
``gpu_state``; and for every benchmark ``work``, the size of the work, and ``comparable``, the one figure that
compares across machines), comes from :mod:`torchledger.pytest_plugin`; here every benchmark's ``work`` and
``comparable`` are checked after each test."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Generator, Iterable
from itertools import pairwise
from typing import Any

import pytest
import torch

from torchledger import pytest_plugin
from torchledger.measuring.memory import MemoryMeasurement
from torchledger.measuring.training import MemoryCase
from torchledger.pytest_plugin import COMPARABLE_NAMES, CpuPeaks, comparable_figure, record_work, work_problems

__all__ = ["COMPARABLE_NAMES", "SIZES", "CpuPeaks", "Ledger", "calibration_timing", "comparable_figure", "memory_base",
           "memory_info", "peak_memory", "record_work", "work_problems"]

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


def calibration_timing(ledger: Ledger, sizes: dict[str, Any], calls: int = 0) -> dict[str, Any]:
    """How a benchmark that calibrates the step-time model is timed (there are over a hundred, each short), as
    keywords of :meth:`Ledger.time`: under sustained timing a round is already at least 100 ms of back-to-back calls,
    so 2 rounds after 1 warmup round and no second timing by CUDA events (the full profile keeps its time budget);
    else the profile's rounds, at least ``calls`` where a round is one call of well under a millisecond on a shared
    machine (a median clear of the odd slow one), after 2 warmup rounds."""
    if ledger.cuda and ledger.timing == "sustained":
        return {"rounds": 2, "warmup": 1, "cuda_events": False}
    return {"rounds": max(sizes["rounds"], calls), "warmup": 2}


@pytest.fixture(scope="session")
def sizes(ledger_size: str) -> dict[str, Any]:
    return {**SIZES[ledger_size], "profile": ledger_size}


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


Ledger = pytest_plugin.Ledger  # the ``ledger`` fixture's class, named here for the benchmarks' annotations


class PhaseTimes:
    """Each phase's seconds in every timed training step, by :meth:`TrainStep.step
    <torchledger.workloads.train_step.TrainStep.step>`'s ``mark``: ``step(batches)`` runs one step and keeps its
    phases (forward and backward summed over the micro-batches); ``untimed(batches)`` one that keeps nothing (the
    refill after the speed probe). On CUDA a phase's end is not known without a synchronize, which would change a
    step being timed: there phases are timed only with ``sync`` given (it is called at every phase's end), else
    :meth:`median` is None."""

    def __init__(self, train_step: Any, device: str, sync: Callable[[], None] | None = None) -> None:
        self.train_step, self.sync = train_step, sync
        self.timed = sync is not None or not device.startswith("cuda")
        self.calls: list[dict[str, float]] = []
        self._marks: list[tuple[str, float]] = []

    def _mark(self, phase: str) -> None:
        if self.sync is not None:
            self.sync()
        self._marks.append((phase, time.perf_counter()))

    def step(self, batches: Any) -> None:
        if not self.timed:
            self.train_step.step(batches)
            return
        self._marks.clear()
        self.train_step.step(batches, self._mark)
        phases: dict[str, float] = {}
        for (phase, start), (_, end) in pairwise(self._marks):
            phases[phase] = phases.get(phase, 0.0) + end - start
        self.calls.append(phases)

    def untimed(self, batches: Any) -> None:
        self.train_step.step(batches)

    def median(self, rounds: int | None) -> dict[str, float] | None:
        """Each phase's median over the last ``rounds`` steps (the timed rounds); None on CUDA, when benchmarking is
        disabled (``rounds`` None) or before any step."""
        kept = self.calls[-rounds:] if rounds else []
        if not kept:
            return None
        return {phase: statistics.median(c.get(phase, 0.0) for c in kept) for phase in kept[-1]}


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
    replay a GPU run's figures against a later prediction. The prediction includes the measured device's terms."""
    predicted = case.predict("cuda" if measured.device.startswith("cuda") else "cpu")
    return {"memory_case": case.to_record(), "peak_memory": measured.peak, "predicted_memory": predicted.peak,
            "measured_by_category": measured.by_category, "predicted_by_category": predicted.breakdown(),
            "predicted_phase": predicted.phase}
