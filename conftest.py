"""Suite-wide pytest configuration: device and size-profile options, CUDA skipping, where runs are stored.

Options share the ``--ledger-`` prefix. A test that should also run on CUDA takes the ``device`` fixture: it is
the CPU test parametrized by device, and the CUDA case is skipped with the reason when no GPU is present.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

_DEFAULT_STORAGE = "file://./.benchmarks"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _device_tag() -> str:
    """A folder-safe name for this machine's accelerator: the GPU name, or ``cpu``."""
    if _cuda_available():
        import torch

        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"
    return "cpu"


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


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # File benchmark runs under results/<device>/ instead of pytest-benchmark's .benchmarks/, unless the user
    # chose a storage. Runs before pytest-benchmark's own pytest_configure reads the option.
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{config.rootpath / 'results' / _device_tag()}"
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


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Run a test on the CPU and, when a GPU is present, again on CUDA."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> list[str]:
    root = Path(str(config.rootpath))
    return [f"torchledger: device tag {_device_tag()!r}, results under {root / 'results'}"]
