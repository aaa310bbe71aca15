"""The pytest plugin of torchledger: what a repository needs to time PyTorch work the way this suite does.

Installing torchledger registers it (the ``pytest11`` entry point ``torchledger.pytest_plugin``); a checkout that
runs without installing loads it from its root conftest with ``pytest_plugins = ["torchledger.pytest_plugin"]``,
which pytest skips when the entry point has registered it already. It brings:

* the ``--ledger-*`` options (device, size profile, timing, L2 flush, CUDA graphs, benchmark groups, memory logs,
  glibc's malloc thresholds);
* the ``device`` fixture (each test on the CPU and, marked ``cuda``, on CUDA), ``ledger_device``, ``ledger_size``
  and ``ledger_timing``; tests marked ``cuda`` are skipped, with the reason, when no GPU is present;
* on CUDA the synchronized timer and warm-up rounds as pytest-benchmark's defaults, runs filed under
  ``results/<device tag>/`` of the root directory, the GPU and library versions in the machine info, and a warning
  when a run is compared with one from other hardware;
* the wall time of each benchmark group, printed at the end and saved as ``group_wall_s``;
* the ``ledger`` fixture, a :class:`Ledger`: ``ledger.time(fn, rounds=5, work={...}, flops=...)`` times ``fn``
  through pytest-benchmark and records ``device``, ``work``, ``comparable`` (and on CUDA the CUDA-event median and
  the GPU's state) in ``extra_info``;
* the ``memory_record`` fixture, which files measured memory cases (``--ledger-memory-log``).

A repository names its benchmark groups, for ``--ledger-groups`` to check names against before collection, by
implementing the hook ``pytest_ledger_benchmark_groups(config)``; without it any name is accepted.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from torchledger.formulas.vocabulary import TIMING_MODES

# torch and the meters are imported where they are used: this module is a pytest11 entry point, loaded by every
# pytest session of an environment that has torchledger installed, whether it times anything or not.

_DEFAULT_STORAGE = "file://./.benchmarks"
NO_GROUP = "(not a benchmark)"
COMPARABLE_NAMES = ("tflops", "gbps", "samples_per_s", "batches_per_s")
# The square matmul the CPU's ceiling is measured with, per size profile.
CPU_PEAK_N = {"small": 512, "full": 8192}
SNAPSHOT_THRESHOLD = 0.01
_GROUP_WALL: dict[str, float] = {}  # seconds of setup, call and teardown per benchmark group, this session


class LedgerHooks:
    """The hooks this plugin adds."""

    @pytest.hookspec(firstresult=True)
    def pytest_ledger_benchmark_groups(self, config: pytest.Config) -> tuple[str, ...] | None:
        """The benchmark groups ``--ledger-groups`` chooses from; None (no implementation) accepts any name."""
        return None


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(LedgerHooks)


def parse_groups(value: str | None, known: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The groups ``--ledger-groups`` names (comma-separated), or None when it is not given; an empty list, or a
    name not in ``known`` (when given), is a usage error naming the value."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",")))
    unknown = [name for name in names if known is not None and name not in known]
    if not names or unknown or "" in names:
        bad = ", ".join(repr(n) for n in unknown) or "an empty name"
        choose = f"; choose from {', '.join(known)}" if known is not None else ""
        raise pytest.UsageError(f"--ledger-groups={value!r}: {bad} is not a benchmark group{choose}")
    return names


def _known_groups(config: pytest.Config) -> tuple[str, ...] | None:
    known = config.hook.pytest_ledger_benchmark_groups(config=config)
    return None if known is None else tuple(known)


def _item_group(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("benchmark")
    group = None if marker is None else marker.kwargs.get("group")
    return None if group is None else str(group)


def _cuda_available() -> bool:
    import torch
    return bool(torch.cuda.is_available())


def _device_tag() -> str:
    from torchledger.measuring.machine import device_tag

    return device_tag()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("torchledger")
    group.addoption(
        "--ledger-size",
        choices=("small", "full"),
        default=None,
        help="size profile of the benchmarks: small (minutes on a 2-core CPU) or full (fills an H100); "
        "default: full on CUDA, small on CPU",
    )
    group.addoption(
        "--ledger-flush-l2",
        action="store_true",
        help="on CUDA, evict the L2 cache (a 256 MB write) before every timed round, as triton's do_bench does: "
        "for small kernels whose inputs would otherwise stay cached between rounds",
    )
    group.addoption(
        "--ledger-device",
        choices=("cpu", "cuda"),
        default=None,
        help="device the benchmarks run on; default: cuda when available, else cpu",
    )
    group.addoption(
        "--ledger-memory-log",
        metavar="PATH",
        default=None,
        help="append one JSON line per measured memory case (configuration, device, measured and predicted peaks "
        "and categories) to PATH: the records results/<device>/memory-cases.jsonl keeps for replay",
    )
    group.addoption(
        "--ledger-snapshot-dir",
        metavar="DIR",
        default=None,
        help="for every memory case more than 1%% off its prediction, measure it again and write its memory "
        "snapshot (memory_viz's format) into DIR",
    )
    group.addoption(
        "--ledger-timing",
        choices=TIMING_MODES,
        default=None,
        help="burst: one call per timed round; sustained: back-to-back calls filling at least 100 ms per round, "
        "the GPU kept busy as under do_bench or training; default: sustained on CUDA, burst on CPU",
    )
    group.addoption(
        "--ledger-cuda-graphs",
        action="store_true",
        help="on CUDA, also capture each timed callable in a CUDA graph and record its replay's time per call "
        "(cuda_graph_median_s in extra_info) beside the eager figure",
    )
    group.addoption(
        "--ledger-malloc",
        choices=("fixed", "default"),
        default="fixed",
        help="fixed: set glibc's malloc mmap and trim thresholds to 32 and 64 MiB for the session, so CPU timings "
        "do not depend on what ran before in the process (recorded in the machine info); default: leave glibc's "
        "dynamic thresholds",
    )
    group.addoption(
        "--ledger-threads",
        metavar="N",
        default=None,
        help="CPU threads (torch.set_num_threads) while a benchmark runs: a whole number, or 'all' for torch's "
        "default; default: 1 when the benchmarks run on the CPU, as torch.utils.benchmark.Timer does (on a machine "
        "shared with other work a parallel op waits for its slowest thread), torch's default on CUDA; recorded in "
        "each benchmark's work and the machine info",
    )
    group.addoption(
        "--ledger-groups",
        metavar="G1,G2",
        default=None,
        help="run only these benchmark groups (comma-separated; everything else is deselected)",
    )


# glibc's malloc thresholds this session fixed (--ledger-malloc fixed, on glibc), else empty
_MALLOC: dict[str, int] = {}
# the CPU threads a benchmark of this session runs with (--ledger-threads), under "threads"; None: torch's default
_THREADS: dict[str, int | None] = {}


def parse_threads(value: str | None, *, cuda: bool) -> int | None:
    """The CPU threads ``--ledger-threads`` asks for: a whole number >= 1; None for torch's default (``all``, or
    the option not given on CUDA); 1 when it is not given on the CPU. A usage error naming the value otherwise."""
    if value is None:
        return None if cuda else 1
    if value.strip() == "all":
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise pytest.UsageError(f"--ledger-threads={value!r}: give a whole number of threads >= 1, or 'all' for "
                                "torch's default")
    return threads


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # File benchmark runs under results/<device>/ instead of pytest-benchmark's .benchmarks/, unless the user
    # chose a storage. Runs before pytest-benchmark's own pytest_configure reads the option.
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{config.rootpath / 'results' / _device_tag()}"
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with the reason when none is present")
    _GROUP_WALL.clear()
    _MALLOC.clear()
    if config.getoption("--ledger-malloc") == "fixed":
        from torchledger.measuring.machine import fix_malloc_thresholds

        _MALLOC.update(fix_malloc_thresholds() or {})
    # a bad name stops the run before anything is collected
    parse_groups(config.getoption("--ledger-groups"), _known_groups(config))
    if config.getoption("--ledger-device") == "cuda" and not _cuda_available():
        raise pytest.UsageError("--ledger-device=cuda: no CUDA GPU is available here (torch.cuda.is_available())")
    uses_cuda = config.getoption("--ledger-device") != "cpu" and _cuda_available()
    _THREADS.clear()
    _THREADS["threads"] = parse_threads(config.getoption("--ledger-threads"), cuda=uses_cuda)
    given = " ".join(config.invocation_params.args)
    # GPU work is asynchronous: time it with a timer that synchronizes first, unless the user chose a timer.
    if uses_cuda and "--benchmark-timer" not in given and hasattr(config.option, "benchmark_timer"):
        config.option.benchmark_timer = "torchledger.measuring.timing.synchronized_perf_counter"
    # Warm-up rounds on (first calls pay for allocation, autotuning and lazy initialization), unless chosen.
    if "--benchmark-warmup" not in given and hasattr(config.option, "benchmark_warmup"):
        config.option.benchmark_warmup = True


@pytest.fixture(scope="session")
def ledger_device(pytestconfig: pytest.Config) -> str:
    """The device the benchmarks run on."""
    chosen = pytestconfig.getoption("--ledger-device")
    return str(chosen) if chosen else ("cuda" if _cuda_available() else "cpu")


@pytest.fixture(scope="session")
def ledger_size(pytestconfig: pytest.Config, ledger_device: str) -> str:
    """The size profile: ``small`` or ``full``."""
    chosen = pytestconfig.getoption("--ledger-size")
    return str(chosen) if chosen else ("full" if ledger_device == "cuda" else "small")


@pytest.fixture(scope="session")
def ledger_timing(pytestconfig: pytest.Config, ledger_device: str) -> str:
    """How rounds are timed: ``sustained`` (default on CUDA) or ``burst`` (default on CPU)."""
    chosen = pytestconfig.getoption("--ledger-timing")
    return str(chosen) if chosen else ("sustained" if ledger_device == "cuda" else "burst")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Run a test on the CPU and, when a GPU is present, again on CUDA."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = parse_groups(config.getoption("--ledger-groups"), _known_groups(config))
    if groups is not None:
        keep = [item for item in items if _item_group(item) in groups]
        deselected = [item for item in items if _item_group(item) not in groups]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = keep
    for item in items:  # the group travels with the reports (to the controller under xdist) for the wall times
        item.user_properties.append(("ledger_group", _item_group(item) or NO_GROUP))
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> list[str]:
    storage = Path(str(config.rootpath)) / "results" / _device_tag()
    lines = [f"torchledger: runs of this machine are filed under {storage}"]
    if getattr(config.option, "benchmark_compare", False) and not any(storage.glob("*/*.json")):
        lines.append(f"torchledger: no saved run of this machine yet in {storage}: nothing to compare with; "
                     "run once with --benchmark-autosave")
    return lines


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each phase's duration (setup, call, teardown) to its benchmark group's wall time."""
    group = dict(report.user_properties).get("ledger_group")
    if group is not None:
        _GROUP_WALL[str(group)] = _GROUP_WALL.get(str(group), 0.0) + float(report.duration)


def group_wall_times() -> dict[str, float]:
    """Seconds spent per benchmark group so far this session (setup, call and teardown of its tests)."""
    return dict(_GROUP_WALL)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _GROUP_WALL:
        return
    terminalreporter.section("torchledger: wall time per benchmark group")
    for group, seconds in sorted(_GROUP_WALL.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{group:<20} {seconds:9.1f} s")
    terminalreporter.write_line(f"{'total':<20} {sum(_GROUP_WALL.values()):9.1f} s")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    """File the per-group wall times with the run: ``group_wall_s`` at the top of the saved JSON."""
    output_json["group_wall_s"] = group_wall_times()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Add what pytest-benchmark leaves out: the GPU (NVML), CUDA/cuDNN/torch versions, CPU model, cores, RAM."""
    from torchledger.measuring.machine import describe_machine

    machine_info["torchledger"] = {**describe_machine(),
                                   "malloc": dict(_MALLOC) if _MALLOC else "the C library's own thresholds",
                                   "cpu_threads": benchmark_threads() or "torch's default"}


def benchmark_threads() -> int | None:
    """The CPU threads this session's benchmarks run with (``--ledger-threads``); None: torch's default."""
    return _THREADS.get("threads")


@pytest.fixture(autouse=True)
def _benchmark_threads(request: pytest.FixtureRequest) -> Any:
    """A benchmark runs with the CPU threads ``--ledger-threads`` chose (its setup and teardown included), and the
    count is restored after it; a test that is not a benchmark is left alone."""
    threads = benchmark_threads()
    if threads is None or "benchmark" not in request.fixturenames:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _gpu_names(machine_info: dict[str, Any]) -> list[str]:
    return [str(g.get("name")) for g in machine_info.get("torchledger", {}).get("gpus", [])]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_compare_machine_info(config: pytest.Config, benchmarksession: Any, machine_info: dict[str, Any],
                                          compared_benchmark: dict[str, Any]) -> None:
    """Warn, loudly, when a run is compared with one from other hardware: the comparison means little."""
    ours = machine_info.get("torchledger", {}).get("device_tag")
    theirs = compared_benchmark.get("machine_info", {}).get("torchledger", {}).get("device_tag")
    if ours != theirs or _gpu_names(machine_info) != _gpu_names(compared_benchmark.get("machine_info", {})):
        benchmarksession.logger.warning(
            f"comparing runs from different hardware: this run is {ours!r}, the saved one {theirs!r}; "
            "differences measure the machines, not the change"
        )


@pytest.fixture
def memory_record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``memory_record(case, measured, predicted, kind="train", snapshot=None)`` files one measured memory case:
    a JSON line in ``--ledger-memory-log``, and, when it is more than 1% off and ``--ledger-snapshot-dir`` is given,
    a snapshot written by ``snapshot(path)`` (a callable that measures the case again with ``snapshot=path``)."""
    log = request.config.getoption("--ledger-memory-log")
    snapshots = request.config.getoption("--ledger-snapshot-dir")

    def record(case: Any, measured: Any, predicted: Any, *, kind: str = "train",
               snapshot: Callable[[Path], object] | None = None) -> None:
        if not log and not snapshots:
            return
        import json
        import os
        import re

        from torchledger.measuring.training import device_record, relative_error

        error = relative_error(predicted.peak, measured.peak) if measured.peak else 0.0
        entry: dict[str, Any] = {
            "source": request.node.nodeid, "device": device_record(measured.device), "case": case.to_record(kind),
            "baseline": "after both cuBLAS workspaces, before the model is built",
            "measured": {"peak": measured.peak, "by_category": measured.by_category,
                         "library_workspaces": measured.library_workspaces, "reserved_peak": measured.reserved_peak},
            "predicted": {"peak": predicted.peak, "by_category": predicted.breakdown(),
                          "moment": getattr(predicted, "moment", None)},
        }
        if getattr(measured, "routing", None) is not None:  # a Mixture of Experts: what the replay predicts from
            entry["measured"]["routing"] = measured.routing
        if snapshots and snapshot is not None and error > SNAPSHOT_THRESHOLD:
            folder = Path(snapshots)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name) + ".pickle")
            snapshot(path)
            entry["snapshot"] = path.name
        if log:
            line = (json.dumps(entry) + "\n").encode()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)  # one write per record: workers appending at once do not interleave lines
            finally:
                os.close(fd)

    return record


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
        import torch

        from torchledger.measuring.timing import median, wall_times
        n = self.n
        peaks = {}

        def seconds(fn: Callable[[], object]) -> float:
            return median(wall_times(fn, rounds=3, warmup=1))

        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            a = torch.randn(n, n, dtype=dtype)
            peaks[name] = 2 * n**3 / seconds(partial(torch.matmul, a, a))
        a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        b8 = a8.t().contiguous().t()  # the faster of the two layouts of the second operand is the ceiling
        peaks["int8"] = 2 * n**3 / min(seconds(partial(torch._int_mm, a8, b)) for b in (a8, b8))
        peaks["tf32"] = peaks["fp32"]  # CPUs have no tf32 path: "high" precision runs fp32
        return peaks

    def peak(self, dtype: str) -> float:
        if self._peaks is None:
            self._peaks = self._measure()
        return self._peaks.get(dtype, self._peaks["fp32"])


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


def work_record(profile: str, work: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's ``work``: the profile, the size of the work, and the CPU threads it ran with where
    ``--ledger-threads`` set them (a run at another thread count is other work, never a regression)."""
    threads = benchmark_threads()
    return {"profile": profile, **work, **({"threads": threads} if threads is not None else {})}


def record_work(benchmark: Any, profile: str, work: dict[str, Any], comparable: dict[str, Any] | None) -> None:
    """``work`` and ``comparable`` for a benchmark timed without :class:`Ledger`."""
    benchmark.extra_info.update({"work": work_record(profile, work), "comparable": comparable})


class Ledger:
    """Times one callable per benchmark and records what was measured beside what was predicted."""

    def __init__(self, benchmark: Any, device: str, cpu_peaks: CpuPeaks, flush_l2: bool = False, *,
                 timing: str = "burst", cuda_graphs: bool = False, profile: str = "small") -> None:
        from torchledger.measuring.timing import L2Flush
        if timing not in TIMING_MODES:
            raise ValueError(f"timing must be 'burst' or 'sustained', got {timing!r}")
        self.benchmark, self.device, self.cpu_peaks = benchmark, device, cpu_peaks
        self.timing, self.cuda_graphs, self.profile = timing, cuda_graphs, profile
        self.name = self.describe_device(device)
        self.flush = L2Flush(device) if flush_l2 and self.cuda else None

    def describe_device(self, device: str) -> str:
        """The device's name as the hardware table knows it: the GPU's name on CUDA."""
        from torchledger.measuring.machine import device_name
        return device_name(device)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def table_entry(self) -> Any:
        from torchledger.formulas.hardware import lookup_device
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
        from torchledger.measuring.timing import MAX_ITERATIONS, SUSTAINED_ROUND_S, iterations_for, median, wall_times
        if self.timing == "burst" or self.flush is not None or not events or self.benchmark.disabled:
            return 1
        estimate = median(wall_times(fn, rounds=3, warmup=1, device=self.device))
        return iterations_for(estimate, SUSTAINED_ROUND_S, MAX_ITERATIONS)

    def time(self, fn: Callable[[], object], *, rounds: int, work: dict[str, Any], warmup: int = 1,
             flops: int | None = None, bytes_moved: int | None = None, samples: int | None = None,
             batches: int | None = None, link: str = "memory", mfu_dtype: str = "fp32", events: bool = True,
             cuda_events: bool = True, refill: Callable[[], object] | None = None, machine_speed: bool = True,
             **info: Any) -> float | None:
        """Benchmark ``fn``; returns the median seconds per call (None when benchmarking is disabled).

        ``work`` names the size of the work (the profile is added); ``flops``, ``bytes_moved`` (against the
        ``memory`` or ``host`` link's bandwidth), ``samples`` or ``batches`` per call give the ``comparable``
        figure, the first of them given. On CUDA the median of CUDA-event timings is recorded too, unless
        ``events=False`` (host-bound work such as a DataLoader epoch, where the stream is idle most of the time)
        or ``cuda_events=False`` (sustained rounds kept, the second timing skipped: the many short calibration
        benchmarks), with the GPU's clocks, power and temperature during the timed rounds (``gpu_state``). On the
        CPU the machine's speed is probed before every round (:meth:`probes_speed`), then ``refill`` (default:
        ``fn``) is called once, untimed, to bring back into the caches what the probe displaced (no longer once a
        refill has lasted over :data:`REFILL_LIMIT_S`);
        ``machine_speed=False`` leaves the probe out (work that keeps each of its calls' figures, and measures its
        own ceilings in the same rounds)."""
        import torch

        from torchledger.measuring.gpu_state import GpuStateSampler, cuda_uuid
        from torchledger.measuring.timing import cuda_event_times, median
        iterations = self.iterations(fn, events)
        sampler = GpuStateSampler(torch.device(self.device).index or 0, uuid=cuda_uuid(self.device)) \
            if self.cuda and not self.benchmark.disabled else None
        probe = speed_probe() if machine_speed and self.probes_speed(rounds, iterations) else None
        setup: Callable[[], object] | None = self.flush
        if probe is not None:
            setup = _ProbeThenRefill(probe, refill or fn)
        if sampler is not None:
            sampler.start()
        try:
            self.benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=iterations, setup=setup)
        finally:
            state = sampler.stop() if sampler is not None else None
        extra: dict[str, Any] = {"device": self.name, "l2_flushed": self.flush is not None, "timing": self.timing,
                                 "iterations": iterations, **info}
        if state is not None:
            extra["gpu_state"] = state
        if probe is not None:
            extra["machine_speed"] = probe.summary(rounds)
        seconds = None
        if not self.benchmark.disabled:
            seconds = self.benchmark.stats.stats.median
            if self.cuda and events and cuda_events:
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
        extra["work"] = work_record(self.profile, work)
        extra["comparable"] = comparable_figure(seconds, flops=flops, bytes_moved=bytes_moved, samples=samples,
                                                batches=batches, peak=lambda name: self._ceiling(name, mfu_dtype,
                                                                                                 link))
        self.benchmark.extra_info.update(extra)
        return seconds

    def probes_speed(self, rounds: int, iterations: int) -> bool:
        """Whether a benchmark records the machine's speed (``machine_speed``, see
        :class:`~torchledger.measuring.timing.SpeedProbe`): on the CPU, where the speed drifts and no clock is read,
        for work timed one call a round over at least 3 rounds (not an epoch or a sweep timed once). On CUDA the
        GPU's clocks are recorded instead (``gpu_state``)."""
        return not self.cuda and not self.benchmark.disabled and iterations == 1 and rounds >= 3 \
            and self.flush is None

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
        import torch

        from torchledger.measuring.timing import cuda_event_times, cuda_graph, median
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


_PROBE: list[Any] = []


# A refill that takes longer than this is not repeated: the work streams the whole 32 MiB L3 of the 2-core EPYC
# through many times in that time (about 1 ms at its 31 GB/s), so what the probe displaced does not change its time.
REFILL_LIMIT_S = 0.02


class _ProbeThenRefill:
    """Between two rounds: the machine's speed now, then the work once more to refill the caches, until one refill
    lasts longer than :data:`REFILL_LIMIT_S` (a training step: the refill would double the benchmark's time)."""

    def __init__(self, probe: Any, refill: Callable[[], object]) -> None:
        self.probe, self.refill, self.refills = probe, refill, True

    def __call__(self) -> None:
        self.probe.measure()
        if self.refills:
            start = time.perf_counter()
            self.refill()
            self.refills = time.perf_counter() - start <= REFILL_LIMIT_S


def speed_probe() -> Any:
    """The session's :class:`~torchledger.measuring.timing.SpeedProbe` on the CPU, made on first use."""
    if not _PROBE:
        from torchledger.measuring.timing import SpeedProbe
        _PROBE.append(SpeedProbe("cpu"))
    return _PROBE[0]


@pytest.fixture(scope="session")
def cpu_matmul_peaks(ledger_size: str) -> CpuPeaks:
    """This CPU's matmul peaks, measured lazily (see :class:`CpuPeaks`)."""
    return CpuPeaks(CPU_PEAK_N[ledger_size])


@pytest.fixture
def ledger(benchmark: Any, ledger_device: str, cpu_matmul_peaks: CpuPeaks, ledger_timing: str, ledger_size: str,
           pytestconfig: pytest.Config) -> Ledger:
    return Ledger(benchmark, ledger_device, cpu_matmul_peaks, bool(pytestconfig.getoption("--ledger-flush-l2")),
                  timing=ledger_timing, cuda_graphs=bool(pytestconfig.getoption("--ledger-cuda-graphs")),
                  profile=ledger_size)
