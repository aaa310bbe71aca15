"""Regression detection and hardware reports over synthetic histories of pytest-benchmark runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from torchledger.cli import main
from torchledger.reporting.regression import compare_history
from torchledger.reporting.results import load_runs

BENCHES = {"test_matmul[fp32]": "precision", "test_matmul[bf16]": "precision", "test_epochs[workers2]": "dataloader",
           "test_checkpointing[full]": "checkpointing"}


def write_run(folder: Path, index: int, medians: dict[str, float], *, gpu: str | None = None,
              extra: dict[str, dict[str, object]] | None = None) -> Path:
    """A run as pytest-benchmark writes it (the fields the reader uses), filed like --benchmark-autosave."""
    tag = f"cuda-{gpu.lower().replace(' ', '-')}" if gpu else "cpu-test"
    path = folder / tag / "Linux-CPython-3.11-64bit" / f"{index:04d}_abc_2026010{index % 10}_000000.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine_info": {"torchledger": {"device_tag": tag, "gpus": [{"name": gpu, "memory_bytes": 80 * 2**30}]
                                         if gpu else [], "cpu_model": "Test CPU", "ram_bytes": 2**34}},
        "commit_info": {"id": f"{index:04d}".ljust(40, "c")},  # one commit per run
        "datetime": f"2026-01-{index + 1:02d}T00:00:00",
        "benchmarks": [{"name": n, "fullname": f"benchmarks/performance/t.py::{n}", "group": BENCHES.get(n, "g"),
                        "stats": {"median": m, "iqr": m * 0.01, "rounds": 5},
                        "extra_info": (extra or {}).get(n, {})} for n, m in medians.items()],
    }))
    return path


def noisy_history(folder: Path, runs: int, seed: int = 0, noise: float = 0.02) -> random.Random:
    rng = random.Random(seed)
    for i in range(runs):
        write_run(folder, i, {n: 1e-3 * (1 + rng.gauss(0, noise)) for n in BENCHES})
    return rng


def test_pure_noise_raises_nothing(tmp_path: Path) -> None:
    # 20 histories of 8 runs with 2% Gaussian noise: no step at all, so nothing may be reported
    for seed in range(20):
        folder = tmp_path / str(seed)
        noisy_history(folder, 8, seed)
        (comparison,) = [compare_history(h) for h in load_runs([folder]).values()]
        assert comparison.findings == [], comparison.findings
        assert comparison.stable == len(BENCHES)


def test_planted_step_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = noisy_history(tmp_path, 6)
    medians = {n: 1e-3 * (1 + rng.gauss(0, 0.02)) for n in BENCHES}
    medians["test_matmul[bf16]"] = 1.2e-3  # a 20% step
    write_run(tmp_path, 6, medians)
    (comparison,) = [compare_history(h) for h in load_runs([tmp_path]).values()]
    assert [(f.name.split("::")[-1], f.kind) for f in comparison.findings] == [("test_matmul[bf16]", "regression")]
    assert comparison.findings[0].change == pytest.approx(0.2, abs=0.03)
    assert main(["regress", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "slower" in out and "test_matmul[bf16]" in out


def test_faster_run_is_an_improvement(tmp_path: Path) -> None:
    rng = noisy_history(tmp_path, 6)
    medians = {n: 1e-3 * (1 + rng.gauss(0, 0.02)) for n in BENCHES}
    medians["test_epochs[workers2]"] = 0.7e-3  # 30% faster
    write_run(tmp_path, 6, medians)
    assert main(["regress", str(tmp_path), "--group-threshold", "dataloader=0.2"]) == 0
    (comparison,) = [compare_history(h, group_thresholds={"dataloader": 0.2}) for h in load_runs([tmp_path]).values()]
    assert [(f.name.split("::")[-1], f.kind) for f in comparison.findings] == [("test_epochs[workers2]",
                                                                               "improvement")]


def test_group_threshold_widens_a_noisy_group(tmp_path: Path) -> None:
    rng = noisy_history(tmp_path, 6)
    medians = {n: 1e-3 * (1 + rng.gauss(0, 0.02)) for n in BENCHES}
    medians["test_epochs[workers2]"] = 1.2e-3
    write_run(tmp_path, 6, medians)
    assert main(["regress", str(tmp_path), "--group-threshold", "dataloader=0.25"]) == 0


def test_corrupt_and_foreign_files_are_named_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noisy_history(tmp_path, 3)
    (tmp_path / "cpu-test" / "broken.json").write_text("{not json")
    (tmp_path / "cpu-test" / "other.json").write_text(json.dumps({"hello": "world"}))
    assert main(["regress", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "broken.json: not readable JSON" in err and "other.json: not a pytest-benchmark run" in err


@pytest.mark.parametrize("command", ["regress", "report"])
def test_empty_folder_is_bad_usage(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, str(tmp_path)] + (["-o", str(tmp_path / "out")] if command == "report" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no benchmark runs under" in err[0]
    assert main([command, str(tmp_path / "missing"), *args[2:]]) == 2


def test_report_merges_machines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    mem = {"test_checkpointing[full]": {"predicted_memory": 1000, "peak_memory": 1010},
           "test_matmul[bf16]": {"intensity": 2730.7, "tflops": 700.0, "dtype": "bf16"},
           "test_epochs[workers2]": {"batches": 24}}
    write_run(results, 0, dict.fromkeys(BENCHES, 1e-3), gpu="NVIDIA H100 80GB HBM3", extra=mem)
    write_run(results, 1, dict.fromkeys(BENCHES, 2e-3), gpu="NVIDIA A100-SXM4-80GB", extra=mem)
    out = tmp_path / "report"
    assert main(["report", str(results), "-o", str(out), "--reference", "cuda-nvidia-a100-sxm4-80gb"]) == 0
    page = (out / "report.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in page and "NVIDIA A100-SXM4-80GB" in page
    assert "| 2x (time, same work) |" in page  # the H100 took half the A100's time for the same 24 batches
    assert "| not compared: work not recorded on reference, this |" in page  # no work: no ratio of seconds
    assert "-0.99%" in page  # predicted 1000 B against measured 1010 B: (1000 - 1010) / 1010
    for figure in ("speed-precision.png", "roofline.png", "memory.png"):
        assert (out / figure).stat().st_size > 1000
    assert "[1/" in capsys.readouterr().err  # progress
    # a report never overwrites: the same -o again is refused, the first report intact
    assert main(["report", str(results), "-o", str(out)]) == 2
    assert (out / "report.md").read_text() == page


def test_report_names_each_machine_s_cpu_threads(tmp_path: Path) -> None:
    # a CPU run made on one thread (--ledger-threads) and a GPU run at torch's default: the machines table says so
    results = tmp_path / "results"
    cpu = write_run(results, 0, dict.fromkeys(BENCHES, 1e-3))
    run = json.loads(cpu.read_text())
    run["machine_info"]["torchledger"]["cpu_threads"] = 1
    cpu.write_text(json.dumps(run))
    write_run(results, 1, dict.fromkeys(BENCHES, 2e-3), gpu="NVIDIA H100 80GB HBM3")
    out = tmp_path / "report"
    assert main(["report", str(results), "-o", str(out)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in (out / "report.md").read_text().splitlines()
            if line.startswith("| cpu-test") or line.startswith("| cuda-nvidia-h100")}
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| machine |"))
    column = header.split(" | ").index("CPU threads")
    assert rows["cpu-test"][column] == "1" and rows["cuda-nvidia-h100-80gb-hbm3"][column] == "torch's default"


def test_too_short_a_history_is_not_judged(tmp_path: Path) -> None:
    # one earlier run gives no noise estimate: a 50% change is listed as unjudged, not as a regression
    write_run(tmp_path, 0, dict.fromkeys(BENCHES, 1e-3))
    write_run(tmp_path, 1, dict.fromkeys(BENCHES, 1.5e-3))
    assert main(["regress", str(tmp_path)]) == 0
    (comparison,) = [compare_history(h) for h in load_runs([tmp_path]).values()]
    assert comparison.findings == [] and len(comparison.short_history) == len(BENCHES)
    assert main(["regress", str(tmp_path), "--min-history", "1"]) == 1


def test_runs_of_one_commit_make_one_complete_run(tmp_path: Path) -> None:
    # one machine's suite run in two invocations (one per group), as a time-limited GPU job runs it: the report
    # shows both groups; a newer commit's run stands alone
    from torchledger.reporting.results import newest_results

    first = write_run(tmp_path, 1, {"test_matmul[fp32]": 1e-3})
    second = write_run(tmp_path, 2, {"test_epochs[workers2]": 2e-3})
    for path in (first, second):
        data = json.loads(path.read_text())
        data["commit_info"]["id"] = "a" * 40
        path.write_text(json.dumps(data))
    (history,) = load_runs([tmp_path]).values()
    merged = newest_results(history)
    assert sorted(n.split("::")[-1] for n in merged.results) == ["test_epochs[workers2]", "test_matmul[fp32]"]
    write_run(tmp_path, 3, {"test_matmul[bf16]": 1e-3})  # another commit
    (history,) = load_runs([tmp_path]).values()
    assert [n.split("::")[-1] for n in newest_results(history).results] == ["test_matmul[bf16]"]
