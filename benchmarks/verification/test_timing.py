"""The timing harness: rounds sized for sustained load, agreement with do_bench, the GPU state sampler (against a
fake NVML), the work and comparable records of every benchmark, the lazy CPU ceiling, and the suite's options."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import benchmarks.performance.conftest as perf
from torchledger import pytest_plugin
from torchledger.formulas.hardware import lookup_device
from torchledger.measuring import gpu_state
from torchledger.measuring import timing as perf_timing
from torchledger.measuring.gpu_state import GpuStateSampler, decode_throttle_reasons, summarize
from torchledger.measuring.timing import agrees_with_do_bench, cuda_event_times, cuda_graph, iterations_for

ROOT = Path(__file__).resolve().parents[2]


# --- iterations_for ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("estimate", "min_round", "cap", "expected"), [
    (0.001, 0.1, 1000, 100),  # 1 ms calls: 100 of them fill 100 ms
    (0.03, 0.1, 1000, 4),  # 3 x 30 ms = 90 ms is short of 100 ms: 4
    (0.025, 0.1, 1000, 4),  # exactly 4 x 25 ms
    (0.2, 0.1, 1000, 1),  # one call already lasts longer than a round
    (1e-6, 0.1, 1000, 1000),  # 100,000 would be needed: capped
    (0.0, 0.1, 50, 50),  # a call too short for the clock: the cap
    (0.0, 0.0, 50, 1),  # no least round time: one call
])
def test_iterations_for(estimate: float, min_round: float, cap: int, expected: int) -> None:
    assert iterations_for(estimate, min_round, cap) == expected


@settings(derandomize=True, database=None, deadline=None)
@given(st.floats(0.0, 10.0).filter(lambda e: e > 0), st.floats(0.0, 1.0), st.integers(1, 10_000))
@example(1e-7, 3e-6, 10_000)  # 3e-6 / 1e-7 rounds to 30.000000000000004: 30 calls fill the round, not 31
@example(5e-324, 1.0, 10_000)  # the quotient overflows to inf: the cap
def test_iterations_for_is_the_fewest_calls_that_fill_a_round(estimate: float, min_round: float, cap: int) -> None:
    k = iterations_for(estimate, min_round, cap)
    assert 1 <= k <= cap
    if k < cap:
        assert k * estimate >= min_round  # the round lasts long enough
    if k > 1:
        assert (k - 1) * estimate < min_round  # and one call fewer would not


@pytest.mark.parametrize(("args", "named"), [
    ((-1.0, 0.1, 10), "first_estimate_s"), ((math.nan, 0.1, 10), "first_estimate_s"),
    ((0.1, -0.1, 10), "min_round_s"), ((0.1, math.inf, 10), "min_round_s"),
    ((0.1, 0.1, 0), "max_iterations"), ((0.1, 0.1, 2.5), "max_iterations"), ((0.1, 0.1, True), "max_iterations"),
])
def test_iterations_for_refuses_bad_input(args: tuple[Any, ...], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        iterations_for(*args)


# --- agreement with do_bench --------------------------------------------------------------------------------------

def test_agreement_within_5_percent() -> None:
    result = agrees_with_do_bench(1.04e-3, 1.0e-3)
    assert result["agrees"] is True and result["ratio"] == pytest.approx(1.04) and result["cycle_ratio"] is None
    assert agrees_with_do_bench(1.06e-3, 1.0e-3)["agrees"] is False


def test_agreement_after_normalizing_by_the_sm_clock() -> None:
    # a burst at 1980 MHz takes 0.9 ms; do_bench, under sustained load at 1782 MHz, 1.0 ms: 10% apart in time, the
    # same 1782 x 1e3 x 1e-3 cycles (0.9e-3 s x 1980e6 Hz = 1.0e-3 s x 1782e6 Hz)
    result = agrees_with_do_bench(0.9e-3, 1.0e-3, 1980.0, 1782.0)
    assert result["ratio"] == pytest.approx(0.9)
    assert result["cycle_ratio"] == pytest.approx(1.0)
    assert result["agrees"] is True
    # do_bench at 1856.25 MHz: 0.9e-3 x 1980 / (1.0e-3 x 1856.25) = 0.96, 4% apart in cycles, more than 3%
    slower = agrees_with_do_bench(0.9e-3, 1.0e-3, 1980.0, 1856.25)
    assert slower["cycle_ratio"] == pytest.approx(0.96) and slower["agrees"] is False
    assert agrees_with_do_bench(0.9e-3, 1.0e-3, None, 1782.0)["agrees"] is False


def test_agreement_refuses_bad_times() -> None:
    with pytest.raises(ValueError, match="do_bench_s"):
        agrees_with_do_bench(1.0, 0.0)


# --- the GPU state sampler ------------------------------------------------------------------------------------------

def test_throttle_reason_bits_are_nvml_s() -> None:
    """Each name's bit is the one pynvml defines (nvmlClocksThrottleReason<Name>)."""
    pynvml = pytest.importorskip("pynvml")
    for bit, name in gpu_state.THROTTLE_REASONS.items():
        camel = "".join(part.capitalize() for part in name.split("_"))
        assert getattr(pynvml, f"nvmlClocksThrottleReason{camel}") == bit, name


def test_decode_throttle_reasons() -> None:
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x1 | 0x800) == ["gpu_idle", "unknown_0x800"]
    with pytest.raises(ValueError, match="mask"):
        decode_throttle_reasons(-1)


def test_summarize_min_and_median() -> None:
    samples = [{"sm_clock_mhz": 1980, "power_w": 650.0, "throttle_mask": 0x0},
               {"sm_clock_mhz": 1755, "power_w": 700.0, "throttle_mask": 0x4},
               {"sm_clock_mhz": 1830, "power_w": None, "throttle_mask": 0x4 | 0x20}]
    summary = summarize(samples)
    assert summary == {"sm_clock_mhz": {"min": 1755.0, "median": 1830.0},
                       "power_w": {"min": 650.0, "median": 675.0},
                       "throttle_reasons": ["sw_power_cap", "sw_thermal_slowdown"], "samples": 3}
    assert summarize([]) is None
    assert summarize([{"sm_clock_mhz": None, "throttle_mask": None}]) is None


class FakeNVMLError(Exception):
    pass


def fake_nvml(*, fail: frozenset[str] = frozenset(), sm_clocks: tuple[int, ...] = (1980,)) -> types.SimpleNamespace:
    """A stand-in for pynvml with the functions the sampler calls; ``fail`` names those that raise."""
    calls: dict[str, int] = {}
    clocks = iter(sm_clocks)
    last = {"sm": sm_clocks[0]}

    def fn(name: str, result: Any) -> Any:
        def call(*args: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            if name in fail:
                raise FakeNVMLError(name)
            return result(*args) if callable(result) else result
        return call

    def clock(handle: Any, kind: int) -> int:
        if kind == 1:  # NVML_CLOCK_SM
            last["sm"] = next(clocks, last["sm"])
            return last["sm"]
        return 2619  # memory clock

    return types.SimpleNamespace(
        calls=calls, NVMLError=FakeNVMLError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlInit=fn("nvmlInit", None), nvmlShutdown=fn("nvmlShutdown", None),
        nvmlDeviceGetHandleByIndex=fn("nvmlDeviceGetHandleByIndex", lambda i: f"gpu{i}"),
        nvmlDeviceGetHandleByUUID=fn("nvmlDeviceGetHandleByUUID", lambda u: f"uuid:{u}"),
        nvmlDeviceGetClockInfo=fn("nvmlDeviceGetClockInfo", clock),
        nvmlDeviceGetPowerUsage=fn("nvmlDeviceGetPowerUsage", 690_000),  # mW
        nvmlDeviceGetEnforcedPowerLimit=fn("nvmlDeviceGetEnforcedPowerLimit", 700_000),
        nvmlDeviceGetTemperature=fn("nvmlDeviceGetTemperature", 61),
        nvmlDeviceGetCurrentClocksEventReasons=fn("nvmlDeviceGetCurrentClocksEventReasons", 0x4),
    )


def test_sampler_reads_every_quantity(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(sm_clocks=(1980, 1755, 1830))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuStateSampler(0)
    assert sampler._open()
    sampler.samples = [sampler.sample() for _ in range(3)]
    assert sampler.summary() == {
        "sm_clock_mhz": {"min": 1755.0, "median": 1830.0}, "memory_clock_mhz": {"min": 2619.0, "median": 2619.0},
        "power_w": {"min": 690.0, "median": 690.0}, "power_limit_w": {"min": 700.0, "median": 700.0},
        "temperature_c": {"min": 61.0, "median": 61.0}, "throttle_reasons": ["sw_power_cap"], "samples": 3}


def test_sampler_thread_samples_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuStateSampler(0, uuid="1234-abcd", interval_s=0.001) as sampler:
        pass
    summary = sampler.summary()
    assert summary is not None and summary["samples"] >= 2  # one at the start, one at the end
    assert summary["sm_clock_mhz"] == {"min": 1980.0, "median": 1980.0}
    assert nvml.calls["nvmlInit"] == 1 and nvml.calls["nvmlShutdown"] == 1
    assert nvml.calls["nvmlDeviceGetHandleByUUID"] == 1 and "nvmlDeviceGetHandleByIndex" not in nvml.calls


def test_sampler_falls_back_to_the_index_when_the_uuid_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(fail=frozenset({"nvmlDeviceGetHandleByUUID"}))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert GpuStateSampler(3, uuid="GPU-1234").start().stop() is not None
    assert nvml.calls["nvmlDeviceGetHandleByIndex"] == 1


def test_sampler_uses_the_older_throttle_reasons_call(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml()
    del nvml.nvmlDeviceGetCurrentClocksEventReasons
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x40
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    summary = GpuStateSampler(0).start().stop()
    assert summary is not None and summary["throttle_reasons"] == ["hw_thermal_slowdown"]


def test_sampler_without_nvml_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    sampler = GpuStateSampler(0).start()
    assert sampler._thread is None
    assert sampler.stop() is None


@pytest.mark.parametrize("failing", [
    {"nvmlInit"}, {"nvmlDeviceGetHandleByIndex"},
    {"nvmlDeviceGetClockInfo", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
     "nvmlDeviceGetTemperature", "nvmlDeviceGetCurrentClocksEventReasons"},
], ids=["init", "handle", "every query"])
def test_sampler_when_nvml_raises_records_nothing(monkeypatch: pytest.MonkeyPatch, failing: set[str]) -> None:
    nvml = fake_nvml(fail=frozenset(failing))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert GpuStateSampler(0, interval_s=0.001).start().stop() is None
    if "nvmlInit" not in failing:
        assert nvml.calls["nvmlShutdown"] == 1  # what was opened is closed


def test_sampler_keeps_the_quantities_that_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(fail=frozenset({"nvmlDeviceGetPowerUsage", "nvmlDeviceGetCurrentClocksEventReasons"}))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    summary = GpuStateSampler(0).start().stop()
    assert summary is not None and "power_w" not in summary and summary["throttle_reasons"] == []
    assert summary["power_limit_w"] == {"min": 700.0, "median": 700.0}


def test_sampler_refuses_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        GpuStateSampler(0, interval_s=0)


# --- work, comparable, the CPU ceiling -------------------------------------------------------------------------------

def test_comparable_figure() -> None:
    # 2 TFLOP in 0.5 s is 4 TFLOP/s; against an 8 TFLOP/s peak, half of it
    assert perf.comparable_figure(0.5, flops=2 * 10**12, peak=lambda name: 8e12) == {
        "name": "tflops", "value": 4.0, "fraction_of_peak": 0.5}
    # 1 GB in 0.25 s is 4 GB/s; flops win over bytes when both are given
    assert perf.comparable_figure(0.25, bytes_moved=10**9) == {"name": "gbps", "value": 4.0, "fraction_of_peak": None}
    assert perf.comparable_figure(2.0, samples=16)["value"] == 8.0  # type: ignore[index]
    assert perf.comparable_figure(3.0, batches=24)["name"] == "batches_per_s"  # type: ignore[index]
    assert perf.comparable_figure(None, flops=10) == {"name": "tflops", "value": None, "fraction_of_peak": None}
    assert perf.comparable_figure(1.0) is None


def test_work_problems() -> None:
    good = {"work": {"profile": "full", "shape": [8192, 8192, 8192]},
            "comparable": {"name": "tflops", "value": 700.0, "fraction_of_peak": 0.7}}
    assert perf.work_problems(good, timed=True) == []
    assert len(perf.work_problems({}, timed=False)) == 2
    assert perf.work_problems({**good, "work": {"profile": "full"}}, timed=True)  # no size
    assert perf.work_problems({**good, "comparable": {"name": "flops", "value": 1.0}}, timed=True)
    untimed = {**good, "comparable": {"name": "gbps", "value": None, "fraction_of_peak": None}}
    assert perf.work_problems(untimed, timed=False) == []
    assert perf.work_problems(untimed, timed=True)


def test_cpu_peaks_are_measured_only_when_asked() -> None:
    peaks = perf.CpuPeaks(64)
    assert not peaks.measured
    fp32 = peaks.peak("fp32")
    assert peaks.measured and fp32 > 0
    assert peaks.peak("tf32") == fp32 and peaks.peak("no such dtype") == fp32 and peaks.peak("int8") > 0


class FakeBenchmark:
    disabled = True
    extra_info: dict[str, Any]

    def __init__(self) -> None:
        self.extra_info = {}

    def pedantic(self, fn: Any, **kwargs: Any) -> None:
        fn()


def test_a_cuda_ledger_never_measures_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchledger.measuring import machine

    monkeypatch.setattr(machine, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    peaks = perf.CpuPeaks(64)
    ledger = perf.Ledger(FakeBenchmark(), "cuda", peaks, profile="full")
    spec = lookup_device("NVIDIA H100 80GB HBM3")
    assert spec is not None and ledger.peak_flops("bf16") == spec.peak("bf16")
    assert not peaks.measured


@pytest.mark.parametrize("threads", [None, 3])
def test_the_ledger_records_work_and_comparable_when_disabled(monkeypatch: pytest.MonkeyPatch,
                                                              threads: int | None) -> None:
    from torchledger import pytest_plugin

    monkeypatch.setitem(pytest_plugin._THREADS, "threads", threads)  # the session's --ledger-threads
    calls = []
    ledger = perf.Ledger(FakeBenchmark(), "cpu", perf.CpuPeaks(64), timing="sustained", profile="small")
    assert ledger.time(lambda: calls.append(1), rounds=5, work={"shape": [2, 2, 2]}, flops=16) is None
    extra = ledger.benchmark.extra_info
    # the thread count is part of the work where the session set one (torch's default: nothing to add)
    assert extra["work"] == ({"profile": "small", "shape": [2, 2, 2]} if threads is None
                             else {"profile": "small", "shape": [2, 2, 2], "threads": 3})
    assert extra["comparable"] == {"name": "tflops", "value": None, "fraction_of_peak": None}
    assert extra["iterations"] == 1 and len(calls) == 1  # disabled: one call, no sizing
    assert perf.work_problems(extra, timed=False) == []
    with pytest.raises(ValueError, match="timing"):
        perf.Ledger(FakeBenchmark(), "cpu", perf.CpuPeaks(64), timing="steady")


class TimedBenchmark:
    """Runs ``pedantic`` as pytest-benchmark does: ``setup`` before every warmup and timed round, one call a round;
    the median is fixed (nothing here reads it but the ledger)."""

    disabled = False
    extra_info: dict[str, Any]

    def __init__(self) -> None:
        self.extra_info, self.setups = {}, 0
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=1e-3))

    def pedantic(self, fn: Any, *, rounds: int, warmup_rounds: int, iterations: int, setup: Any) -> None:
        assert iterations == 1 or setup is None  # pytest-benchmark refuses a setup with several iterations
        for _ in range(warmup_rounds + rounds):
            if setup is not None:
                setup()
                self.setups += 1
            fn()


def test_the_cpu_ledger_probes_the_machine_speed_in_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # no limit on the refill's time at first: a pause of the process in the first refill must not stop the refills
    monkeypatch.setattr(pytest_plugin, "REFILL_LIMIT_S", math.inf)
    calls: list[str] = []
    bench = TimedBenchmark()
    ledger = perf.Ledger(bench, "cpu", perf.CpuPeaks(64), profile="small")
    ledger.time(lambda: calls.append("fn"), rounds=4, warmup=1, work={}, refill=lambda: calls.append("refill"))
    # before each of the 5 rounds the probe, then the refill, then the timed call
    assert bench.setups == 5 and calls == ["refill", "fn"] * 5
    speed = bench.extra_info["machine_speed"]
    assert speed["samples"] == 4  # the timed rounds' probes, not the warmup's
    m, k, n = perf_timing.SpeedProbe.MATMUL
    assert 1e8 < speed["matmul_flops_per_s"] < 1e14 and 1e8 < speed["copy_bytes_per_s"] < 1e13
    assert 1e-9 < speed["host_op_s"] < 1e-3 and (m, k, n) == (256, 512, 512)
    # a refill that lasts longer than REFILL_LIMIT_S (a training step) is not repeated: the probe still is
    monkeypatch.undo()
    slow: list[None] = []

    def long_refill() -> None:
        slow.append(time.sleep(pytest_plugin.REFILL_LIMIT_S * 1.5))
    bench = TimedBenchmark()
    perf.Ledger(bench, "cpu", perf.CpuPeaks(64), profile="small").time(lambda: None, rounds=4, warmup=1, work={},
                                                                        refill=long_refill)
    assert bench.setups == 5 and len(slow) == 1 and bench.extra_info["machine_speed"]["samples"] == 4
    # no probe where a round is not repeated (an epoch timed once), or the benchmark asks for none
    for kwargs in ({"rounds": 2}, {"rounds": 5, "machine_speed": False}):
        bench = TimedBenchmark()
        perf.Ledger(bench, "cpu", perf.CpuPeaks(64), profile="small").time(lambda: None, work={}, **kwargs)
        assert bench.setups == 0 and "machine_speed" not in bench.extra_info


def test_the_speed_probe_keeps_the_last_samples() -> None:
    probe = perf_timing.SpeedProbe("cpu")
    with pytest.raises(ValueError, match="last=3"):
        probe.summary(3)
    for _ in range(3):
        probe.measure()
    probe.samples[0] = (1.0, 1.0, 1.0, 1.0)  # the oldest sample is not among the last two
    summary = probe.summary(2)
    assert summary["samples"] == 2 and summary["matmul_flops_per_s"] > 1.0 and summary["host_op_s"] != 1.0
    assert 1e-8 < summary["small_op_s"] < 1e-2  # one copy of 256 KiB: under 10 ms at 26 MB/s or more


def test_phase_times_sum_each_phase_over_the_micro_batches() -> None:
    from torchledger.formulas.specs import MLPSpec
    from torchledger.workloads.models import MLP
    from torchledger.workloads.train_step import TrainConfig, TrainStep

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(batch[0])
        return out, torch.nn.functional.cross_entropy(out, batch[1])

    torch.manual_seed(0)
    model = MLP(MLPSpec((8, 16, 4)))
    step = TrainStep(model, TrainConfig(grad_accum=2), loss_fn)
    batches = [(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))] * 2
    marks: list[str] = []
    step.step(batches, marks.append)
    assert marks == ["forward", "backward", "forward", "backward", "optimizer", "end"]
    phases = perf.PhaseTimes(step, "cpu")
    for _ in range(3):
        phases.step(batches)
    phases.untimed(batches)  # the refill keeps nothing
    assert len(phases.calls) == 3 and all(set(c) == {"forward", "backward", "optimizer"} for c in phases.calls)
    phases.calls[0] = {"forward": 1.0, "backward": 1.0, "optimizer": 1.0}  # not among the last two
    last_two = phases.median(2)
    assert last_two is not None and all(0 < v < 1.0 for v in last_two.values())
    assert phases.median(None) is None  # benchmarking disabled
    on_cuda = perf.PhaseTimes(step, "cuda")  # no marks: a phase's end is unknown without a synchronize
    on_cuda.step(batches)
    assert on_cuda.calls == [] and on_cuda.median(5) is None
    syncs: list[None] = []  # given a synchronize, every phase's end calls it: 2 x 2 phases, the optimizer's, the end
    synced = perf.PhaseTimes(step, "cuda", sync=lambda: syncs.append(None))
    synced.step(batches)
    assert len(syncs) == 6 and len(synced.calls) == 1


# --- the suite's options ------------------------------------------------------------------------------------------

def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    # a session of its own: not a worker of the xdist run this test may be part of (pytest-xdist's variables would
    # make the child's plugins behave as a worker's, which leaves writing the JSON to a controller it does not have)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False, env=env)


def test_benchmark_groups_are_the_suite_s() -> None:
    named = set()
    for path in (ROOT / "benchmarks" / "performance").glob("test_*.py"):
        named.update(re.findall(r'group="([^"]+)"', path.read_text()))
    from conftest import BENCHMARK_GROUPS  # the root conftest, which pytest has imported

    assert named == set(BENCHMARK_GROUPS)


def test_a_bad_group_is_a_usage_error() -> None:
    done = _pytest("benchmarks/performance/test_formulas_speed.py", "--collect-only", "-q",
                   "--ledger-groups=formulas,bogus")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--ledger-groups='formulas,bogus'" in done.stderr and "'bogus' is not a benchmark group" in done.stderr
    assert _pytest("--collect-only", "-q", "--ledger-groups=", "benchmarks/performance/test_formulas_speed.py"
                   ).returncode == 4
    assert _pytest("--collect-only", "-q", "--ledger-timing=steady", "benchmarks/performance/test_formulas_speed.py"
                   ).returncode == 4


def test_groups_select_and_wall_times_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    done = _pytest("benchmarks/performance/test_formulas_speed.py", "benchmarks/performance/test_roofline.py",
                   "--ledger-groups=formulas", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
                   f"--benchmark-json={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"4 passed, \d+ deselected", done.stdout), done.stdout[-2000:]
    assert "wall time per benchmark group" in done.stdout
    assert re.search(r"^formulas +\d+\.\d s$", done.stdout, re.M) and not re.search(r"^roofline ", done.stdout, re.M)
    run = json.loads(out.read_text())
    assert set(run["group_wall_s"]) == {"formulas"} and run["group_wall_s"]["formulas"] > 0
    for bench in run["benchmarks"]:
        assert perf.work_problems(bench["extra_info"], timed=True) == [], bench["name"]


# --- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_graph_replays_the_work() -> None:
    a = torch.randn(256, 256, device="cuda")
    out = torch.empty_like(a)
    replay = cuda_graph(lambda: torch.mm(a, a, out=out))
    out.zero_()
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, a @ a)
    assert len(cuda_event_times(replay, rounds=3, warmup=1, iterations=4)) == 3


@pytest.mark.cuda
def test_gpu_state_of_this_gpu() -> None:
    pytest.importorskip("pynvml")
    a = torch.randn(4096, 4096, device="cuda")
    with GpuStateSampler(torch.cuda.current_device(), uuid=gpu_state.cuda_uuid("cuda")) as sampler:
        for _ in range(50):
            a @ a
        torch.cuda.synchronize()
    summary = sampler.summary()
    assert summary is not None and summary["sm_clock_mhz"]["min"] > 0 and summary["power_limit_w"]["min"] > 0
