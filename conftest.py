"""Suite-wide pytest configuration: device and size-profile options, CUDA skipping, where runs are stored.

Options share the ``--ledger-`` prefix. A test that should also run on CUDA takes the ``device`` fixture: it is
the CPU test parametrized by device, and the CUDA case is skipped with the reason when no GPU is present.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_DEFAULT_STORAGE = "file://./.benchmarks"

# The benchmark groups of benchmarks/performance, which --ledger-groups selects from.
BENCHMARK_GROUPS = ("precision", "accumulation", "checkpointing", "fusion", "dataloader", "roofline", "collectives",
                    "formulas", "count")
NO_GROUP = "(not a benchmark)"
_GROUP_WALL: dict[str, float] = {}  # seconds of setup, call and teardown per benchmark group, this session


def parse_groups(value: str | None) -> tuple[str, ...] | None:
    """The groups ``--ledger-groups`` names (comma-separated), or None when it is not given; a name that is not a
    benchmark group, or an empty list, is a usage error naming the value."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",")))
    unknown = [name for name in names if name not in BENCHMARK_GROUPS]
    if not names or unknown or "" in names:
        bad = ", ".join(repr(n) for n in unknown) or "an empty name"
        raise pytest.UsageError(f"--ledger-groups={value!r}: {bad} is not a benchmark group; "
                                f"choose from {', '.join(BENCHMARK_GROUPS)}")
    return names


def _item_group(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("benchmark")
    group = None if marker is None else marker.kwargs.get("group")
    return None if group is None else str(group)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
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
        choices=("burst", "sustained"),
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
        "--ledger-groups",
        metavar="G1,G2",
        default=None,
        help="run only these benchmark groups (comma-separated; everything else is deselected): "
        + ", ".join(BENCHMARK_GROUPS),
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # File benchmark runs under results/<device>/ instead of pytest-benchmark's .benchmarks/, unless the user
    # chose a storage. Runs before pytest-benchmark's own pytest_configure reads the option.
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{config.rootpath / 'results' / _device_tag()}"
    parse_groups(config.getoption("--ledger-groups"))  # a bad name stops the run before anything is collected
    if config.getoption("--ledger-device") == "cuda" and not _cuda_available():
        raise pytest.UsageError("--ledger-device=cuda: no CUDA GPU is available here (torch.cuda.is_available())")
    uses_cuda = config.getoption("--ledger-device") != "cpu" and _cuda_available()
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
    groups = parse_groups(config.getoption("--ledger-groups"))
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


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    """File the per-group wall times with the run: ``group_wall_s`` at the top of the saved JSON."""
    output_json["group_wall_s"] = group_wall_times()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Add what pytest-benchmark leaves out: the GPU (NVML), CUDA/cuDNN/torch versions, CPU model, cores, RAM."""
    from torchledger.measuring.machine import describe_machine

    machine_info["torchledger"] = describe_machine()


def _gpu_names(machine_info: dict[str, Any]) -> list[str]:
    return [str(g.get("name")) for g in machine_info.get("torchledger", {}).get("gpus", [])]


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


SNAPSHOT_THRESHOLD = 0.01


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

        from torchledger.measuring.training import device_record

        error = abs(predicted.peak - measured.peak) / measured.peak if measured.peak else 0.0
        entry: dict[str, Any] = {
            "source": request.node.nodeid, "device": device_record(measured.device), "case": case.to_record(kind),
            "baseline": "after both cuBLAS workspaces, before the model is built",
            "measured": {"peak": measured.peak, "by_category": measured.by_category,
                         "library_workspaces": measured.library_workspaces, "reserved_peak": measured.reserved_peak},
            "predicted": {"peak": predicted.peak, "by_category": predicted.breakdown(),
                          "moment": getattr(predicted, "moment", None)},
        }
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
