"""Like-for-like hardware comparison: what a report and `regress` compare, and what they refuse to compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.verification.test_reporting import write_run
from torchledger.cli import main
from torchledger.reporting.regression import compare_history, markdown
from torchledger.reporting.report import _measures, _plot_roofline, compare_row
from torchledger.reporting.results import Result, describe, load_runs, newest_results, work_difference
from torchledger.reporting.units import format_rate, format_seconds

H100 = "NVIDIA H100 80GB HBM3"


def result(median: float = 1e-3, **extra: Any) -> Result:
    return Result(name="b", group="g", median=median, iqr=0.0, rounds=5, extra_info=extra)


@pytest.mark.parametrize("seconds, text", [(2.5, "2.5 s"), (4.32e-05, "43.2 us"), (0.0272, "27.2 ms"),
                                           (3.1e-8, "31 ns")])
def test_seconds_in_human_units(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_rates_in_human_units() -> None:
    assert format_rate(752.07, "TFLOP/s") == "752 TFLOP/s"
    assert format_rate(4141.98, "GB/s") == "4,142 GB/s"
    assert format_rate(0.40989, "TFLOP/s") == "0.41 TFLOP/s"


def test_work_and_comparable_derived_from_older_runs() -> None:
    # a run from before `work` and `comparable` were recorded: the profile follows from the 512^3 shape
    d = describe(result(dtype="bf16", shape=[512, 512, 512], flops=2 * 512**3, tflops=0.41, mfu=0.97))
    assert d.derived and d.work == {"profile": "small", "shape": [512, 512, 512]}
    assert d.comparable is not None
    assert (d.comparable.name, d.comparable.value, d.comparable.fraction_of_peak, d.comparable.dtype) == \
        ("tflops", 0.41, 0.97, "bf16")
    bw = describe(result(bytes_moved=2**32, bandwidth_bytes_per_s=4.0e12, fraction_of_peak=0.8))
    assert bw.comparable is not None and bw.comparable.name == "gbps" and bw.comparable.value == 4000.0
    recipe = describe(result(recipe="bf16-mixed", workload="gpt", tflops=1.0))
    assert recipe.comparable is not None and recipe.comparable.dtype == "bf16"
    assert describe(result(l2_flushed=False)).work is None  # no size key: work not recorded


def test_recorded_work_and_comparable_win() -> None:
    work = {"profile": "full", "model": "gpt2-small", "batch": 16, "seq_len": 1024}
    d = describe(result(work=work, comparable={"name": "samples_per_s", "value": 250.0, "fraction_of_peak": None},
                        tflops=99.0))
    assert not d.derived and d.work == work
    assert d.comparable is not None and (d.comparable.name, d.comparable.value) == ("samples_per_s", 250.0)


@pytest.mark.parametrize("comparable", [{"name": "speed", "value": 1.0}, {"name": "tflops", "value": -1.0},
                                        {"name": "tflops", "value": 1.0, "fraction_of_peak": "high"}, "fast"])
def test_a_bad_comparable_is_named_and_not_compared(comparable: object) -> None:
    with pytest.warns(UserWarning, match="extra_info comparable"):
        d = describe(result(comparable=comparable, tflops=5.0), "run.json: b")
    assert d.comparable is None


def test_work_difference_names_what_differs() -> None:
    small, full = {"profile": "small", "shape": [512] * 3}, {"profile": "full", "shape": [8192] * 3}
    assert work_difference({"a": small, "b": full}) == "profile small vs full; shape 512x512x512 vs 8192x8192x8192"
    assert work_difference({"a": small, "b": dict(small)}) == ""
    assert work_difference({"a": small, "b": None}) == "work not recorded on b"


def test_compare_row_like_for_like_only() -> None:
    small = result(1e-3, dtype="bf16", shape=[512] * 3, tflops=0.5)
    full = result(2e-3, dtype="bf16", shape=[8192] * 3, tflops=500.0)
    pair = lambda r: (r, describe(r))  # noqa: E731
    # TFLOP/s is a rate of the hardware: compared across sizes, 500 / 0.5 = 1000x, although it took twice the time
    ratio, text = compare_row(pair(small), pair(full))
    assert ratio == pytest.approx(1000.0) and text.startswith("1,000x (TFLOP/s")
    # no comparable figure and different work: never a speed ratio, the difference named
    a, b = result(1e-3, batches=24), result(4e-3, batches=96)
    ratio, text = compare_row(pair(a), pair(b))
    assert ratio is None and text == "not compared: batches 24 vs 96"
    # identical work: seconds compare, ref time / this time
    ratio, text = compare_row(pair(result(3e-3, batches=24)), pair(result(1e-3, batches=24)))
    assert ratio == pytest.approx(3.0) and "time, same work" in text
    # unknown work is never compared by time
    ratio, text = compare_row(pair(result(3e-3)), pair(result(1e-3)))
    assert ratio is None and "work not recorded" in text
    # batches/s depends on the batch: between different work it is not a speed ratio either
    ratio, _ = compare_row(pair(result(1e-3, batches=24, batches_per_s=200.0)),
                           pair(result(1e-3, batches=96, batches_per_s=50.0)))
    assert ratio is None


def two_profiles(results: Path) -> None:
    """A CPU on the small profile, an H100 on the full one: bf16 matmuls at 0.4 and 700 TFLOP/s; the H100's matmul
    took longer (8192^3 against 512^3), and it alone ran fp8."""
    cpu = {"test_matmul[bf16]": {"dtype": "bf16", "shape": [512] * 3, "tflops": 0.4, "mfu": 0.95},
           "test_epochs[workers2]": {"batches": 24, "batches_per_s": 300.0}}
    gpu = {"test_matmul[bf16]": {"dtype": "bf16", "shape": [8192] * 3, "tflops": 700.0, "mfu": 700 / 989.4},
           "test_matmul[fp8]": {"dtype": "fp8", "shape": [8192] * 3, "tflops": 1400.0},
           "test_epochs[workers2]": {"batches": 96, "batches_per_s": 50.0}}
    write_run(results, 0, {"test_matmul[bf16]": 6.7e-4, "test_epochs[workers2]": 0.08}, extra=cpu)
    write_run(results, 1, {"test_matmul[bf16]": 1.57e-3, "test_matmul[fp8]": 7.9e-4, "test_epochs[workers2]": 1.9},
              gpu=H100, extra=gpu)


def test_report_compares_rates_not_seconds_of_different_work(tmp_path: Path) -> None:
    two_profiles(tmp_path / "results")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "results"), "-o", str(out), "--reference", "cpu-test"]) == 0
    page = (out / "report.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| test_matmul[bf16] |"))
    assert "1,750x (TFLOP/s)" in row  # 700 / 0.4, not 6.7e-4 / 1.57e-3 = 0.43x
    assert "0.43x" not in page
    assert "71% of bf16 peak" in row and "95% of bf16 peak" in row  # each machine's own peak
    assert "670 us" in row and "1.57 ms" in row  # seconds in human units
    assert "profile small vs full" in row
    epochs = next(line for line in page.splitlines() if line.startswith("| test_epochs[workers2] |"))
    assert "not compared: batches 24 vs 96" in epochs and "x (" not in epochs
    # the roofline: fp8 is there, on its own ceiling (1978.9 TFLOP/s for an H100 SXM): 1400 / 1978.9 = 71%
    fp8 = next(line for line in page.splitlines() if line.startswith("| cuda-nvidia-h100-80gb-hbm3 | fp8 |"))
    assert "| 71% |" in fp8
    bf16 = next(line for line in page.splitlines() if line.startswith("| cuda-nvidia-h100-80gb-hbm3 | bf16 |"))
    assert f"| {700 / 989.4 * 100:.0f}% |" in bf16  # against bf16's 989.4, not fp8's 1978.9 (35%)


def test_roofline_points_sit_on_their_own_dtype_ceiling(tmp_path: Path) -> None:
    two_profiles(tmp_path / "results")
    runs = {tag: newest_results(h) for tag, h in sorted(load_runs([tmp_path / "results"]).items())}
    measures = {tag: _measures(run) for tag, run in runs.items()}
    points = _plot_roofline(runs, measures, tmp_path / "roofline.png")
    by = {(tag, dtype): (x, y, fraction) for tag, dtype, x, y, fraction in points}
    # intensity of an n^3 matmul with inputs and output in one dtype: 2n^3 / (3 n^2 bytes) = 2n / (3 bytes)
    x, _, fraction = by[("cuda-nvidia-h100-80gb-hbm3", "fp8")]
    assert x == pytest.approx(2 * 8192 / 3) and fraction == pytest.approx(1400 / 1978.9)
    x, _, fraction = by[("cuda-nvidia-h100-80gb-hbm3", "bf16")]
    assert x == pytest.approx(8192 / 3) and fraction == pytest.approx(700 / 989.4)
    assert (tmp_path / "roofline.png").stat().st_size > 10_000


def runs_of(folder: Path) -> list[Any]:
    (history,) = load_runs([folder]).values()
    return history


def test_regress_says_what_it_judged_against_and_what_it_did_not(tmp_path: Path) -> None:
    names = ["test_matmul[fp32]", "test_matmul[bf16]", "test_epochs[workers2]"]
    for i in range(4):
        write_run(tmp_path, i, dict.fromkeys(names, 1e-3), extra={"test_matmul[bf16]": {"shape": [512] * 3}})
    # the newest commit runs in two parts; the second part is a partial run that has no epochs benchmark,
    # and its bf16 matmul ran on the full profile
    first = write_run(tmp_path, 4, {"test_matmul[fp32]": 1.5e-3}, extra={})
    second = write_run(tmp_path, 5, {"test_matmul[bf16]": 1e-3}, extra={"test_matmul[bf16]": {"shape": [8192] * 3}})
    for path in (first, second):
        data = json.loads(path.read_text())
        data["commit_info"]["id"] = "f" * 40
        path.write_text(json.dumps(data))
    comparison = compare_history(runs_of(tmp_path))
    (judged,) = comparison.judged
    assert judged.name.endswith("test_matmul[fp32]") and judged.verdict == "regression"
    assert judged.against.startswith("median of 4 run(s), 2026-01-01 to 2026-01-04")
    why = {name.split("::")[-1]: reason for name, reason in comparison.not_judged.items()}
    assert why["test_matmul[bf16]"].startswith("work changed: full, shape 8192x8192x8192 now, small, shape 512")
    assert why["test_epochs[workers2]"] == "not run at the newest commit (last run in 0003_abc_20260103_000000.json)"
    text = markdown([comparison])
    assert "| slower | +50.0% | 1 ms | 1.5 ms |" in text
    assert "merged with the earlier run(s) of its commit 0004_" in text
    assert main(["regress", str(tmp_path)]) == 1


def test_repeated_runs_of_one_commit_are_history(tmp_path: Path) -> None:
    # three runs of the same commit (as when measuring the noise): the newest is judged against the two before it
    for i, median in enumerate([1e-3, 1.01e-3, 1.6e-3]):
        path = write_run(tmp_path, i, {"test_matmul[fp32]": median})
        data = json.loads(path.read_text())
        data["commit_info"]["id"] = "e" * 40
        path.write_text(json.dumps(data))
    comparison = compare_history(runs_of(tmp_path), min_history=2)
    (judged,) = comparison.judged
    assert judged.baseline == pytest.approx(1.005e-3) and judged.verdict == "regression"
