"""The pytest plugin: a repository of its own times a torch function with the ``ledger`` fixture, and this
repository loads the plugin exactly once, installed (the ``pytest11`` entry point) or from a bare checkout (the root
conftest's ``pytest_plugins``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "torchledger.pytest_plugin"
OPTIONS = ("--ledger-size", "--ledger-device", "--ledger-timing", "--ledger-flush-l2", "--ledger-cuda-graphs",
           "--ledger-groups", "--ledger-memory-log", "--ledger-snapshot-dir", "--ledger-malloc", "--ledger-threads")

MY_STEP = """
import pytest
import torch


def test_my_step(ledger):
    a = torch.randn(64, 64)
    seconds = ledger.time(lambda: a @ a, rounds=3, work={"n": 64}, flops=2 * 64**3)
    assert seconds is not None and seconds > 0


def test_on_each_device(device):
    assert torch.ones(2, device=device).sum().item() == 2


@pytest.mark.cuda
def test_needs_a_gpu():
    assert torch.cuda.is_available()
"""


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.value == PLUGIN]


installed = pytest.mark.skipif(not _entry_points(), reason="torchledger is not installed here (a bare checkout)")


@pytest.fixture
def my_repo(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for name in [k for k in os.environ if k.startswith("PYTEST_")]:
        monkeypatch.delenv(name)
    pytester.makepyfile(test_my_step=MY_STEP)
    load = ""
    if not _entry_points():  # a bare checkout: the plugin by name, torchledger from src
        monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
        load = f" -p {PLUGIN}"
    pytester.makeini(f"[pytest]\naddopts = --strict-markers{load}\n")
    return pytester


def _run_my_repo(my_repo: pytest.Pytester, *args: str) -> pytest.RunResult:
    return my_repo.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=300)


def test_a_repository_of_its_own_gets_the_options(my_repo: pytest.Pytester) -> None:
    done = _run_my_repo(my_repo, "--help")
    assert done.ret == 0, done.stdout.str()
    text = done.stdout.str()
    assert "torchledger:" in text
    for option in OPTIONS:
        assert len(re.findall(rf"^\s+{option}\b", text, re.M)) == 1, option


def test_a_repository_of_its_own_records_the_ledger_s_figures(my_repo: pytest.Pytester) -> None:
    out = my_repo.path / "run.json"
    done = _run_my_repo(my_repo, "--ledger-device=cpu", "--benchmark-min-rounds=1", f"--benchmark-json={out}",
                        "-rs")
    gpu = torch.cuda.is_available()
    # test_on_each_device runs on the CPU and, with a GPU, on CUDA; the cuda-marked test needs a GPU
    done.assert_outcomes(passed=4 if gpu else 2, skipped=0 if gpu else 2)
    if not gpu:
        assert "needs a CUDA GPU: torch.cuda.is_available() is False" in done.stdout.str()
    [bench] = json.loads(out.read_text())["benchmarks"]
    extra = bench["extra_info"]
    assert bench["name"] == "test_my_step"
    assert extra["device"] and extra["timing"] == "burst" and extra["iterations"] == 1
    # on the CPU a benchmark runs on one thread unless --ledger-threads says otherwise, and its work says so
    assert extra["work"] == {"profile": "small", "n": 64, "threads": 1}
    assert extra["comparable"]["name"] == "tflops" and extra["comparable"]["value"] > 0
    assert extra["comparable"]["fraction_of_peak"] is not None  # the CPU's measured matmul ceiling
    assert extra["tflops"] > 0 and extra["flops"] == 2 * 64**3
    machine = json.loads(out.read_text())["machine_info"]["torchledger"]
    # glibc's malloc thresholds fixed for the session (on glibc; named as left alone elsewhere)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert machine["malloc"] == ({"mmap_threshold": 32 * 2**20, "trim_threshold": 64 * 2**20} if glibc
                                 else "the C library's own thresholds")
    assert machine["cpu_threads"] == 1


THREADS = """
import torch

DEFAULT = torch.get_num_threads()


def test_a_benchmark(benchmark):
    benchmark.extra_info["threads_inside"] = torch.get_num_threads()
    benchmark.pedantic(lambda: None, rounds=1)


def test_not_a_benchmark():
    assert torch.get_num_threads() == DEFAULT
"""


@pytest.mark.parametrize(("given", "expected"), [((), 1), (("--ledger-threads=2",), 2), (("--ledger-threads", "all"),
                                                                                        None)])
def test_a_benchmark_runs_on_the_threads_chosen(my_repo: pytest.Pytester, given: tuple[str, ...],
                                                expected: int | None) -> None:
    # torch's default thread count is the machine's (torch.get_num_threads() in a fresh process); a benchmark runs
    # on 1 thread unless told otherwise, a test that is no benchmark on the default, and the count comes back after
    my_repo.makepyfile(test_threads=THREADS)
    out = my_repo.path / "run.json"
    done = _run_my_repo(my_repo, "--ledger-device=cpu", f"--benchmark-json={out}", *given, "test_threads.py")
    done.assert_outcomes(passed=2)
    run = json.loads(out.read_text())
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    [bench] = run["benchmarks"]
    assert bench["extra_info"]["threads_inside"] == (expected or int(default))
    assert run["machine_info"]["torchledger"]["cpu_threads"] == (expected or "torch's default")


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_a_bad_thread_count_is_a_usage_error(my_repo: pytest.Pytester, value: str) -> None:
    done = _run_my_repo(my_repo, f"--ledger-threads={value}")
    assert done.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--ledger-threads={value!r}: give a whole number of threads >= 1" in done.stderr.str()
    assert "Traceback" not in done.stderr.str() + done.stdout.str()


def test_parse_threads() -> None:
    from torchledger.pytest_plugin import parse_threads

    assert parse_threads(None, cuda=False) == 1  # the CPU's default: one thread, as torch.utils.benchmark.Timer
    assert parse_threads(None, cuda=True) is None  # CUDA: the host's threads left as torch sets them
    assert parse_threads("all", cuda=False) is None
    assert parse_threads("3", cuda=True) == 3


def test_runs_are_filed_per_device(my_repo: pytest.Pytester) -> None:
    done = _run_my_repo(my_repo, "--ledger-device=cpu", "--benchmark-min-rounds=1", "--benchmark-autosave",
                        "test_my_step.py::test_my_step")
    done.assert_outcomes(passed=1)
    saved = list((my_repo.path / "results").glob("*/*/*.json"))
    assert len(saved) == 1 and not (my_repo.path / ".benchmarks").exists(), saved


# pytest as where torchledger is not installed: its distribution (and so its entry point) hidden from pytest
WITHOUT_THE_DIST = """
import importlib.metadata, sys
everything = importlib.metadata.distributions
importlib.metadata.distributions = lambda **kw: (d for d in everything(**kw) if d.metadata["Name"] != "torchledger")
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def _trace_config(*, bare: bool) -> tuple[list[str], str]:
    """The names of the plugins a run from the repository root registers, and the distributions whose entry points
    it loaded (``--trace-config``)."""
    python = [sys.executable, "-c", WITHOUT_THE_DIST] if bare else [sys.executable, "-m", "pytest"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run([*python, "-p", "no:cacheprovider", "--trace-config", "--co", "--ledger-groups=formulas",
                           "benchmarks/performance/test_formulas_speed.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PytestAssertRewriteWarning" not in done.stdout + done.stderr, done.stdout[-3000:]
    assert re.search(r"^=+ \d+ tests collected", done.stdout, re.M), done.stdout[-2000:]
    assert done.stdout.count(f"PLUGIN registered: <module '{PLUGIN}'") == 1, done.stdout[-4000:]
    third_party = done.stdout.split("registered third-party plugins:", 1)[1].split("active plugins:", 1)[0] \
        if "registered third-party plugins:" in done.stdout else ""
    active = done.stdout.split("active plugins:", 1)[1]
    return re.findall(r"^\s+([^\s:]+)\s*: ", active, re.M), third_party


@installed
def test_the_installed_run_registers_the_plugin_once() -> None:
    [entry] = _entry_points()
    assert entry.name == PLUGIN  # the module's import name: the root conftest's pytest_plugins finds it registered
    names, third_party = _trace_config(bare=False)
    assert names.count(PLUGIN) == 1, names
    assert "torchledger-" in third_party, third_party  # through the entry point, not the conftest


def test_a_bare_checkout_loads_the_plugin_once() -> None:
    # no torchledger distribution: only the root conftest's pytest_plugins loads the plugin, from src (pythonpath)
    names, third_party = _trace_config(bare=True)
    assert names.count(PLUGIN) == 1, names
    assert "torchledger-" not in third_party, third_party
