"""`regress` and `report` on bad input, bad targets, races and failures: nothing lost, never a traceback.

Exit statuses: 0 fine, 1 a regression (regress only), 2 bad usage, 3 an I/O failure or an internal error,
4 the newest run of a machine is not a valid run (regress only), 130 interrupted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from benchmarks.verification.test_reporting import BENCHES, noisy_history, write_run
from torchledger.cli import main
from torchledger.reporting import regression, report
from torchledger.reporting.regression import compare_history
from torchledger.reporting.results import SkippedData, load_runs

SRC = Path(__file__).resolve().parents[2] / "src"


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def run_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def rewrite(path: Path, change: Any) -> Path:
    """Apply ``change`` to the parsed run in ``path`` and write it back."""
    data = run_json(path)
    change(data)
    path.write_text(json.dumps(data))
    return path


def set_median(path: Path, bench: str, value: float, key: str = "median") -> Path:
    def change(data: dict[str, Any]) -> None:
        for b in data["benchmarks"]:
            if b["name"] == bench:
                b["stats"][key] = value
    return rewrite(path, change)


def leftovers(folder: Path, name: str) -> list[str]:
    """Entries beside ``folder/name`` that a report build to it could have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name + ".partial"))


def cli(*args: str | Path) -> list[str]:
    return [str(a) for a in args]


# --- reading: foreign data is named and skipped, never a crash ------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("commit_info", "abc123"), ("commit_info", [1, 2]), ("torchledger", ["cpu"]), ("torchledger", "cpu-test"),
    ("machine_info", "x86_64"), ("gpus", "NVIDIA H100"), ("device_tag", 7),
])
def test_fields_of_the_wrong_type_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
                                                value: object) -> None:
    noisy_history(tmp_path, 5)
    bad = next(iter(sorted(tmp_path.rglob("0001_*.json"))))

    def change(data: dict[str, Any]) -> None:
        if field in ("commit_info", "machine_info"):
            data[field] = value
        else:
            data["machine_info"]["torchledger"] = value if field == "torchledger" else {
                **data["machine_info"]["torchledger"], field: value}
    rewrite(bad, change)
    assert main(cli("regress", tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"{bad}: not a pytest-benchmark run" in err and repr(value) in err, err
    assert "Traceback" not in err


def test_deeply_nested_json_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noisy_history(tmp_path, 4)
    deep = tmp_path / "cpu-test" / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    assert main(cli("regress", tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"{deep}: not a pytest-benchmark run" in err and "nested" in err


@pytest.mark.parametrize("name, status", [("pipe.json", 0), ("0009_newest.json", 4)])
def test_fifo_is_skipped_not_read(tmp_path: Path, name: str, status: int) -> None:
    # a named pipe with no writer blocks any reader forever: it must be named and skipped, never read (in a
    # process of its own, so that a hang fails the test instead of stopping the suite)
    noisy_history(tmp_path, 4)
    fifo = next(tmp_path.rglob("*.json")).parent / name
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "torchledger", "regress", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == status, proc.stderr
    assert f"{fifo}: not a regular file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("key, value", [("median", 0.0), ("median", -1e-3), ("median", math.inf), ("iqr", -1e-5),
                                        ("iqr", math.nan), ("median", "fast")])
def test_invalid_statistics_are_named_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str,
                                                   value: object) -> None:
    noisy_history(tmp_path, 6)
    bad = sorted(tmp_path.rglob("0002_*.json"))[0]
    set_median(bad, "test_matmul[bf16]", value, key)  # type: ignore[arg-type]
    assert main(cli("regress", tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"{bad}: benchmarks/performance/t.py::test_matmul[bf16]: {key}" in err, err
    with pytest.warns(SkippedData, match=r"test_matmul\[bf16\]"):
        history = load_runs([tmp_path])
    (comparison,) = [compare_history(h) for h in history.values()]
    assert comparison.stable == len(BENCHES)  # judged on the runs that remain


def test_a_zero_baseline_is_not_a_division_by_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the earlier runs all recorded 0 s: no valid history, so the benchmark is new, not infinitely slower
    for i in range(5):
        path = write_run(tmp_path, i, dict.fromkeys(BENCHES, 1e-3))
        if i < 4:
            set_median(path, "test_matmul[fp32]", 0.0)
    assert main(cli("regress", tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "1 new benchmark(s) without history" in out
    assert err.count("test_matmul[fp32]: median 0.0") == 4


def test_a_nan_median_in_the_newest_run_is_invalid_not_unchanged(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rng = noisy_history(tmp_path, 6)
    medians = {n: 1e-3 * (1 + rng.gauss(0, 0.02)) for n in BENCHES}
    medians["test_epochs[workers2]"] = math.nan
    newest = write_run(tmp_path, 6, medians)
    assert main(cli("regress", tmp_path)) == 0
    out, err = capsys.readouterr()
    assert f"{newest}: benchmarks/performance/t.py::test_epochs[workers2]: median nan" in err
    assert f"{len(BENCHES) - 1} unchanged within noise" in out
    assert "1 with invalid statistics, not judged: benchmarks/performance/t.py::test_epochs[workers2]" in out
    with pytest.warns(SkippedData, match="median nan"):
        history = load_runs([tmp_path])
    (comparison,) = [compare_history(h) for h in history.values()]
    assert comparison.invalid == ["benchmarks/performance/t.py::test_epochs[workers2]"]
    assert comparison.stable == len(BENCHES) - 1


@pytest.mark.parametrize("datetime", [None, "", "yesterday", 20260101, "2026-13-01T00:00:00"])
def test_a_run_without_a_valid_datetime_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   datetime: object) -> None:
    noisy_history(tmp_path, 6)
    bad = sorted(tmp_path.rglob("0003_*.json"))[0]
    rewrite(bad, lambda data: data.update(datetime=datetime))
    assert main(cli("regress", tmp_path)) == 0
    out, err = capsys.readouterr()
    assert f"{bad}: not a pytest-benchmark run" in err and "datetime" in err and repr(datetime) in err
    assert "Newest run 0005_" in out  # not the run without a date


# --- regress: a broken newest run is never silently replaced by the one before -------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "no datetime"])
def test_a_broken_newest_run_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    noisy_history(tmp_path, 6)
    newest = sorted(tmp_path.rglob("*.json"))[-1]
    text = newest.read_text()
    if damage == "no datetime":
        rewrite(newest, lambda data: data.update(datetime=None))
    else:
        newest.write_text({"truncated": text[: len(text) // 2], "empty": "", "foreign": "{}"}[damage])
    assert main(cli("regress", tmp_path)) == 4
    out, err = capsys.readouterr()
    errors = [line for line in lines(err) if "error" in line]
    assert len(errors) == 1 and str(newest) in errors[0] and "newest" in errors[0], err
    assert "cpu-test" in out and "not judged" in out
    assert "unchanged within noise" not in out  # the run before it was not judged in its place


def test_a_broken_newest_run_does_not_hide_a_regression_elsewhere(tmp_path: Path) -> None:
    noisy_history(tmp_path, 6)
    sorted(tmp_path.rglob("*.json"))[-1].write_text("{")
    for i in range(6):
        write_run(tmp_path, i, {"test_matmul[fp32]": 1e-3 if i < 5 else 2e-3}, gpu="NVIDIA H100 80GB HBM3")
    assert main(cli("regress", tmp_path)) == 1


def test_a_broken_older_run_only_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noisy_history(tmp_path, 6)
    older = sorted(tmp_path.rglob("*.json"))[-2]
    older.write_text("{")
    assert main(cli("regress", tmp_path)) == 0
    assert f"warning: skipped {older}: not readable JSON" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["dataloader=nan", "dataloader=-1", "dataloader=inf", "dataloader=0",
                                   "dataloader=", "dataloader", "=0.2", "dataloader=a lot"])
def test_bad_group_thresholds_are_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    noisy_history(tmp_path, 4)
    assert main(cli("regress", tmp_path, "--group-threshold", value)) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "--group-threshold" in err[0] and repr(value) in err[0], err


def test_compare_history_rejects_a_non_finite_group_threshold(tmp_path: Path) -> None:
    noisy_history(tmp_path, 4)
    (history,) = load_runs([tmp_path]).values()
    with pytest.raises(ValueError, match="dataloader"):
        compare_history(history, group_thresholds={"dataloader": math.nan})
    with pytest.raises(ValueError, match="threshold"):
        compare_history(history, threshold=math.inf)


# --- regress: a failure is never read as "slower" ------------------------------------------------------------------


class _BrokenPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("stdout", ["full", "pipe"])
def test_unwritable_stdout_is_an_io_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], stdout: str) -> None:
    rng = noisy_history(tmp_path, 6)
    write_run(tmp_path, 6, {n: 2e-3 * (1 + rng.gauss(0, 0.02)) for n in BENCHES})  # a regression, too
    if stdout == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    stream = open("/dev/full", "w") if stdout == "full" else _BrokenPipe()  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(cli("regress", tmp_path)) == 3
    finally:
        monkeypatch.undo()
        stream.close()
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "standard output" in err[0], err


def test_an_internal_error_is_status_3_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    noisy_history(tmp_path, 4)

    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("float division by zero")
    monkeypatch.setattr(regression, "compare_history", boom)
    assert main(cli("regress", tmp_path)) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "internal error" in err[0] and "ZeroDivisionError" in err[0], err


def test_ctrl_c_in_regress_is_130_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    noisy_history(tmp_path, 4)

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(regression, "compare_history", interrupt)
    try:
        status = main(cli("regress", tmp_path))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    assert status == 130
    assert len(lines(capsys.readouterr().err)) == 1


def test_regress_help_documents_every_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["regress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for status in ("0 nothing got slower", "1 something got slower", "2 bad usage", "3 an I/O failure",
                   "4 the newest run", "130 interrupted"):
        assert f"Exit status: {status}" in text or f"; {status}" in text, status


# --- report: never delete what it did not create; whole or not at all ----------------------------------------------


def two_machines(results: Path, extra: dict[str, dict[str, object]] | None = None) -> None:
    write_run(results, 0, dict.fromkeys(BENCHES, 1e-3), gpu="NVIDIA H100 80GB HBM3", extra=extra)
    write_run(results, 1, dict.fromkeys(BENCHES, 2e-3), gpu="NVIDIA A100-SXM4-80GB", extra=extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_never_deletes_a_partial_folder_it_did_not_create(tmp_path: Path) -> None:
    # the input folder happens to be named like the old build folder of the output
    results = tmp_path / "nightly.partial"
    two_machines(results)
    before = snapshot(results)
    assert main(cli("report", results, "-o", tmp_path / "nightly")) == 0
    assert snapshot(results) == before
    assert (tmp_path / "nightly" / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nightly", "nightly.partial"]


def test_report_fills_an_existing_empty_folder(tmp_path: Path) -> None:
    two_machines(tmp_path / "results")
    (tmp_path / "out").mkdir()
    assert main(cli("report", tmp_path / "results", "-o", tmp_path / "out")) == 0
    assert (tmp_path / "out" / "report.md").is_file() and leftovers(tmp_path, "out") == []


def test_report_creates_missing_parents(tmp_path: Path) -> None:
    two_machines(tmp_path / "results")
    assert main(cli("report", tmp_path / "results", "-o", tmp_path / "a" / "b" / "out")) == 0
    assert (tmp_path / "a" / "b" / "out" / "report.md").is_file()


def machine_rows(page: str) -> set[str]:
    """The machines of the report's system-description table."""
    table = page.split("## Machines")[1].split("##")[0]
    return {line.split(" | ")[0].lstrip("| ") for line in table.splitlines()
            if line.startswith("| cuda-") or line.startswith("| cpu-")}


def report_is_whole(out: Path, machines: set[str]) -> None:
    """The page, its figures and nothing else, all from the run that wrote the page."""
    page = (out / "report.md").read_text()
    figures = {line.split("](")[1].rstrip(")") for line in page.splitlines() if line.startswith("![")}
    assert {p.name for p in out.iterdir()} == figures | {"report.md"}
    assert machine_rows(page) == machines


def test_two_reports_to_one_folder_at_once_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # both builds finish, then both try to publish at the same moment: exactly one wins, whole
    histories = {}
    for name, group in (("a", "precision"), ("b", "dataloader")):
        folder = tmp_path / name
        for i in range(2):
            write_run(folder, i, {n: 1e-3 for n, g in BENCHES.items() if g == group},
                      gpu=["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"][i] if name == "a" else None)
        histories[name] = load_runs([folder])
    out = tmp_path / "out"
    barrier = threading.Barrier(2, timeout=300)
    publish = report._publish

    def together(tmp: Path, target: Path) -> None:
        barrier.wait()
        publish(tmp, target)
    monkeypatch.setattr(report, "_publish", together)
    outcomes: dict[str, object] = {}

    def build(name: str) -> None:
        try:
            outcomes[name] = report.build_report(histories[name], out)
        except Exception as exc:  # recorded and checked below
            outcomes[name] = exc
    threads = [threading.Thread(target=build, args=(name,)) for name in histories]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failed = {n: o for n, o in outcomes.items() if isinstance(o, Exception)}
    assert len(outcomes) == 2 and len(failed) == 1, outcomes
    (loser, exc), = failed.items()
    assert isinstance(exc, ValueError) and f"-o {out}" in str(exc), exc
    winner = "a" if loser == "b" else "b"
    report_is_whole(out, set(histories[winner]))
    assert leftovers(tmp_path, "out") == []


def test_two_reports_to_one_folder_at_once_processes(tmp_path: Path) -> None:
    inputs = []
    for name, gpu in (("a", "NVIDIA H100 80GB HBM3"), ("b", None)):
        folder = tmp_path / name
        write_run(folder, 0, dict.fromkeys(BENCHES, 1e-3), gpu=gpu)
        inputs.append(folder)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-m", "torchledger", "report", str(folder), "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for folder in inputs]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 2], results
    (loser_err,) = [err for status, err in results if status == 2]
    assert f"-o {out}" in lines(loser_err)[-1] and "Traceback" not in loser_err
    page = (out / "report.md").read_text()
    machines = {"cuda-nvidia-h100-80gb-hbm3"} if "cuda-nvidia-h100" in page else {"cpu-test"}
    report_is_whole(out, machines)
    assert leftovers(tmp_path, "out") == []


def test_a_report_that_loses_the_race_exits_2_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    two_machines(tmp_path / "results")
    out = tmp_path / "out"
    progress = report._progress

    def meanwhile(step: int, total: int, what: str) -> None:
        if what == "memory":  # another run publishes its report while this one is still building
            out.mkdir()
            (out / "report.md").write_text("the other run's report")
        progress(step, total, what)
    monkeypatch.setattr(report, "_progress", meanwhile)
    assert main(cli("report", tmp_path / "results", "-o", out)) == 2
    err = lines(capsys.readouterr().err)
    assert f"-o {out}" in err[-1] and not any("Traceback" in line for line in err), err
    assert (out / "report.md").read_text() == "the other run's report"
    assert leftovers(tmp_path, "out") == []


# --- report: bad targets and bad data ------------------------------------------------------------------------------


def test_report_onto_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_machines(tmp_path / "results")
    target = tmp_path / "out"
    target.write_text("keep me")
    assert main(cli("report", tmp_path / "results", "-o", target)) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and f"-o {target}" in err[0] and "not a folder" in err[0], err
    assert target.read_text() == "keep me" and leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("points_to", ["empty folder", "nothing"])
def test_report_onto_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str], points_to: str) -> None:
    two_machines(tmp_path / "results")
    target, link = tmp_path / "elsewhere", tmp_path / "out"
    if points_to == "empty folder":
        target.mkdir()
    link.symlink_to(target)
    assert main(cli("report", tmp_path / "results", "-o", link)) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and f"-o {link}" in err[0] and "symbolic link" in err[0], err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (list(target.iterdir()) == []) if points_to == "empty folder" else not target.exists()
    assert leftovers(tmp_path, "out") == []


def test_report_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_machines(tmp_path / "results")
    (tmp_path / "plain").write_text("a file")
    target = tmp_path / "plain" / "out"
    assert main(cli("report", tmp_path / "results", "-o", target)) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and f"-o {target}" in err[0], err
    assert (tmp_path / "plain").read_text() == "a file"


def test_report_in_a_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    two_machines(tmp_path / "results")
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse the folder the way a read-only one would
        def refuse(*args: object, **kwargs: object) -> str:
            raise PermissionError(13, "Permission denied", str(parent))
        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    else:
        parent.chmod(0o555)
    try:
        assert main(cli("report", tmp_path / "results", "-o", parent / "out")) == 3
    finally:
        parent.chmod(0o755)
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and f"-o {parent / 'out'}" in err[0] and "Permission denied" in err[0], err
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError, RuntimeError])
def test_a_failing_report_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], failure: type[BaseException]) -> None:
    two_machines(tmp_path / "results", extra={"test_checkpointing[full]": {"predicted_memory": 1000,
                                                                           "peak_memory": 1010}})

    def fail(*args: object, **kwargs: object) -> None:
        raise failure(28, "No space left on device") if failure is OSError else failure()
    monkeypatch.setattr(report, "_plot_memory", fail)
    try:
        status = main(cli("report", tmp_path / "results", "-o", tmp_path / "out"))
    except BaseException as exc:  # what escaped is the failure
        pytest.fail(f"{exc!r} escaped main()")
    assert status == {KeyboardInterrupt: 130, OSError: 3, RuntimeError: 3}[failure]
    err = [line for line in lines(capsys.readouterr().err) if not line.startswith("[")]
    assert len(err) == 1, err
    if failure is OSError:
        assert f"-o {tmp_path / 'out'}" in err[0] and "No space left" in err[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_a_zero_median_is_left_out_of_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_machines(tmp_path / "results")
    bad = sorted((tmp_path / "results").rglob("*.json"))[0]
    set_median(bad, "test_matmul[fp32]", 0.0)
    assert main(cli("report", tmp_path / "results", "-o", tmp_path / "out")) == 0
    assert f"{bad}: benchmarks/performance/t.py::test_matmul[fp32]: median 0.0" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.parametrize("field, value", [("gpus", "NVIDIA H100"), ("torchledger", ["cuda"]), ("gpus", [3]),
                                          ("cpu", "x86")])
def test_machine_info_of_the_wrong_type_in_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
                                                    value: object) -> None:
    two_machines(tmp_path / "results")
    bad = sorted((tmp_path / "results").rglob("*.json"))[0]

    def change(data: dict[str, Any]) -> None:
        info = data["machine_info"]
        if field == "torchledger":
            info["torchledger"] = value
        elif field == "cpu":
            info["cpu"] = value
        else:
            info["torchledger"][field] = value
    rewrite(bad, change)
    assert main(cli("report", tmp_path / "results", "-o", tmp_path / "out")) == 0
    err = lines(capsys.readouterr().err)
    assert any(str(bad) in line and repr(value) in line for line in err), err
    page = (tmp_path / "out" / "report.md").read_text()
    assert machine_rows(page) == {"cuda-nvidia-h100-80gb-hbm3"}  # the other machine alone


def test_only_foreign_files_is_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_run(tmp_path / "results", 0, dict.fromkeys(BENCHES, 1e-3))
    rewrite(path, lambda data: data["machine_info"].update(torchledger=["cpu"]))
    # the only run is broken: for report, a warning and then nothing to report on
    assert main(cli("report", tmp_path / "results", "-o", tmp_path / "out")) == 2
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
    assert "no benchmark runs" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [{"predicted_memory": "lots", "peak_memory": 1010},
                                   {"predicted_memory": 1000, "peak_memory": math.nan},
                                   {"predicted_memory": 1000, "peak_memory": 0},
                                   {"intensity": "high", "tflops": 700.0, "dtype": "bf16"},
                                   {"intensity": 2730.7, "tflops": -1, "dtype": "bf16"}])
def test_bad_extra_info_is_named_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              extra: dict[str, object]) -> None:
    two_machines(tmp_path / "results", extra={"test_matmul[bf16]": extra})
    assert main(cli("report", tmp_path / "results", "-o", tmp_path / "out")) == 0
    err = capsys.readouterr().err
    (key,) = [k for k, v in extra.items()
              if k != "dtype" and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    for path in (tmp_path / "results").rglob("*.json"):
        assert f"{path}: benchmarks/performance/t.py::test_matmul[bf16]: extra_info {key}" in err, err
    page = (tmp_path / "out" / "report.md").read_text()
    first = "`intensity`" if key in ("intensity", "tflops") else "`predicted_memory`"
    assert f"No benchmark recorded both {first}" in page


def test_group_names_never_leave_the_report_folder(tmp_path: Path) -> None:
    path = write_run(tmp_path / "results", 0, dict.fromkeys(BENCHES, 1e-3))

    def change(data: dict[str, Any]) -> None:
        data["benchmarks"][0]["group"] = "../../escape"
        data["benchmarks"][1]["group"] = "a/b"
    rewrite(path, change)
    out = tmp_path / "deep" / "out"
    assert main(cli("report", tmp_path / "results", "-o", out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "results"]
    report_is_whole(out, {"cpu-test"})


def test_report_help_documents_every_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for status in ("0 written", "2 bad usage", "3 DIR cannot be written", "130 interrupted"):
        assert f"Exit status: {status}" in text or f"; {status}" in text, status
