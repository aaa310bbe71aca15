"""Reading pytest-benchmark runs back: one JSON file per run, filed in one folder per machine.

A file that is not valid JSON, or valid JSON that is not a pytest-benchmark run (a field of the wrong type, no valid
``datetime``), or not a regular file at all (a named pipe is never opened for reading), is named in a warning and
skipped: one bad file never stops a report. A benchmark entry whose statistics are not valid (a median that is not a
finite number > 0, an IQR that is not a finite number >= 0) is named in a warning and left out of its run.

The newest file of a folder, by pytest-benchmark's autosave numbering (``0042_<commit>_<date>.json``), is different:
when it is not a valid run, :func:`read_runs` reports it as such instead of a warning, because the run before it
would otherwise silently take its place.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime as _datetime
from datetime import timezone
from pathlib import Path
from typing import Any, TextIO

from torchledger.reporting.units import format_bytes, format_flops


class SkippedData(UserWarning):
    """A file, or a benchmark entry of one, left out because it is not valid data; the message names it."""


@dataclass(frozen=True)
class Result:
    """One benchmark of one run: its timing statistics (seconds) and what it recorded beside them."""

    name: str
    group: str
    median: float
    iqr: float
    rounds: int
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One run: when, on what machine, at which commit, and its results by benchmark name.

    ``invalid`` names the benchmarks of the run whose statistics were not valid (left out of ``results``).
    """

    path: Path
    machine: str
    datetime: str
    commit: str
    machine_info: dict[str, Any]
    results: dict[str, Result]
    invalid: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokenNewest:
    """The newest file of a folder (by autosave number) that is not a valid run, and the machines it belongs to."""

    path: Path
    reason: str
    machines: tuple[str, ...]


@dataclass(frozen=True)
class Runs:
    """What :func:`read_runs` found: the valid runs by machine (oldest first), and the broken newest files."""

    by_machine: dict[str, list[Run]]
    broken_newest: list[BrokenNewest]


def finite(value: object) -> float | None:
    """``value`` as a float when it is a finite JSON number (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, shortened to ``limit`` characters: for messages that name a value read from a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def moment(text: object) -> _datetime | None:
    """An ISO 8601 date and time as a naive UTC datetime (a naive one is taken as UTC); None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        when = _datetime.fromisoformat(text)
        return when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo else when
    except (ValueError, OverflowError):
        return None


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` when it is a regular file; ValueError otherwise (a FIFO is never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"{path}: not readable ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file"
            raise ValueError(f"{path}: not a regular file ({kind})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{path}: not readable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _object(data: dict[str, Any], key: str, where: str, path: Path) -> dict[str, Any]:
    """``data[key]`` when it is an object, {} when absent or null; ValueError naming the field otherwise."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a pytest-benchmark run ({where}{key} is {shown(value)}, not an object)")
    return value


def _check_machine_info(machine_info: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``torchledger`` part of ``machine_info``, its fields checked for the types the readers rely on."""
    _object(machine_info, "cpu", "machine_info.", path)
    info = _object(machine_info, "torchledger", "machine_info.", path)
    gpus = info.get("gpus")
    if gpus is not None and not (isinstance(gpus, list) and all(isinstance(g, dict) for g in gpus)):
        raise ValueError(f"{path}: not a pytest-benchmark run "
                         f"(machine_info.torchledger.gpus is {shown(gpus)}, not a list of objects)")
    tag = info.get("device_tag")
    if tag is not None and not isinstance(tag, str):
        raise ValueError(f"{path}: not a pytest-benchmark run "
                         f"(machine_info.torchledger.device_tag is {shown(tag)}, not a string)")
    return info


def _result(entry: dict[str, Any], name: str, path: Path) -> Result | None:
    """One benchmark entry; None, with a warning naming the file and the benchmark, when its statistics are invalid."""
    stats = entry.get("stats")
    problem = None
    median = iqr = None
    rounds = 1
    if not isinstance(stats, dict):
        problem = f"stats {shown(stats)} is not an object"
    else:
        median = finite(stats.get("median"))
        iqr = finite(stats.get("iqr", 0.0))
        raw_rounds = stats.get("rounds", 1)
        if median is None or median <= 0:
            problem = f"median {shown(stats.get('median'))} is not a finite number > 0"
        elif iqr is None or iqr < 0:
            problem = f"iqr {shown(stats.get('iqr'))} is not a finite number >= 0"
        elif isinstance(raw_rounds, bool) or not isinstance(raw_rounds, int) or raw_rounds < 1:
            problem = f"rounds {shown(raw_rounds)} is not a positive integer"
        else:
            rounds = raw_rounds
    if problem is not None or median is None or iqr is None:
        warnings.warn(f"{path}: {name}: {problem}: left out", SkippedData, stacklevel=3)
        return None
    extra = entry.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        warnings.warn(f"{path}: {name}: extra_info {shown(extra)} is not an object: ignored", SkippedData,
                      stacklevel=3)
        extra = None
    group = entry.get("group")
    return Result(name=name, group=group if isinstance(group, str) and group else "(no group)", median=median,
                  iqr=iqr, rounds=rounds, extra_info=dict(extra or {}))


def load_run(path: Path) -> Run:
    """Parse one pytest-benchmark JSON file; ValueError naming the file when it is not one.

    Benchmark entries with invalid statistics are left out of the run, each named in a :class:`SkippedData` warning.
    """
    raw = _read_regular(path)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a pytest-benchmark run (JSON nested too deeply)") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or "machine_info" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark run (no 'benchmarks' list and 'machine_info')")
    if not isinstance(data["machine_info"], dict):
        raise ValueError(f"{path}: not a pytest-benchmark run (machine_info is {shown(data['machine_info'])}, "
                         "not an object)")
    machine_info: dict[str, Any] = data["machine_info"]
    info = _check_machine_info(machine_info, path)
    commit = _object(data, "commit_info", "", path).get("id")
    if commit is not None and not isinstance(commit, str):
        raise ValueError(f"{path}: not a pytest-benchmark run (commit_info.id is {shown(commit)}, not a string)")
    if moment(data.get("datetime")) is None:
        raise ValueError(f"{path}: not a pytest-benchmark run ('datetime' is {shown(data.get('datetime'))}, "
                         "not an ISO 8601 date and time)")
    results: dict[str, Result] = {}
    invalid: list[str] = []
    for i, entry in enumerate(data["benchmarks"]):
        name = entry.get("fullname") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(name, str) or not name:
            raise ValueError(f"{path}: not a pytest-benchmark run (benchmark #{i} has no 'fullname')")
        result = _result(entry, name, path)
        if result is None:
            invalid.append(name)
        else:
            results[name] = result
    tag = info.get("device_tag") or _folder_tag(path)
    return Run(path=path, machine=tag, datetime=data["datetime"], commit=(commit or "")[:12],
               machine_info=machine_info, results=results, invalid=tuple(invalid))


def _folder_tag(path: Path) -> str:
    """The machine a run file is filed under: ``<storage>/<device tag>/<machine id>/<run>.json``."""
    return path.parent.parent.name or path.parent.name


_AUTOSAVE = re.compile(r"(\d+)_.*\.json")


def _autosave_number(path: Path) -> int | None:
    match = _AUTOSAVE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def read_runs(paths: Iterable[str | Path]) -> Runs:
    """Every run under ``paths`` (storage folders, machine folders or single files), by machine, oldest first.

    Raises ValueError when a path does not exist; skips, with a :class:`SkippedData` warning naming it, any file that
    is not a run, except the newest autosaved file of each folder, which is returned in ``broken_newest`` instead.
    """
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists() and not path.is_symlink():
            raise ValueError(f"PATH={str(p)!r} does not exist")
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    files = list(dict.fromkeys(files))
    newest: dict[Path, Path] = {}
    for f in files:
        number = _autosave_number(f)
        if number is not None:
            best = newest.get(f.parent)
            if best is None or (number, f.name) > (_autosave_number(best) or 0, best.name):
                newest[f.parent] = f
    runs: dict[str, list[Run]] = {}
    machines_of: dict[Path, set[str]] = {}
    broken: list[tuple[Path, str]] = []
    for f in files:
        try:
            run = load_run(f)
        except ValueError as exc:
            if newest.get(f.parent) == f:
                broken.append((f, str(exc)))
            else:
                warnings.warn(f"skipped {exc}", SkippedData, stacklevel=2)
            continue
        runs.setdefault(run.machine, []).append(run)
        machines_of.setdefault(f.parent, set()).add(run.machine)
    for history in runs.values():
        history.sort(key=lambda r: (moment(r.datetime) or _datetime.min, r.path.name))
    return Runs(runs, [BrokenNewest(f, reason, tuple(sorted(machines_of.get(f.parent) or {_folder_tag(f)})))
                       for f, reason in broken])


def load_runs(paths: Iterable[str | Path]) -> dict[str, list[Run]]:
    """Every valid run under ``paths``, by machine, oldest first: :func:`read_runs` with every file not a run named
    in a warning, the newest autosaved one of a folder included."""
    found = read_runs(paths)
    for b in found.broken_newest:
        warnings.warn(f"skipped {b.reason}", SkippedData, stacklevel=2)
    return found.by_machine


@contextmanager
def skipped_data_as_lines(prefix: str, stream: TextIO | None = None) -> Iterator[None]:
    """Within the block, every :class:`SkippedData` warning is written to ``stream`` (stderr) as one line.

    Other warnings are shown as usual.
    """
    out = stream or sys.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedData)
        show = warnings.showwarning

        def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None) -> None:
            if issubclass(category, SkippedData):
                print(f"{prefix}{message}", file=out, flush=True)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


def newest_results(history: list[Run]) -> Run:
    """The newest run of a machine (``history`` oldest first) with the results of the earlier runs of the same
    commit merged in, the newer result winning: one invocation of the suite per benchmark group (as a time-limited
    GPU job runs it) still makes one complete run of that commit."""
    if not history:
        raise ValueError("history is empty: no runs")
    newest = history[-1]
    if not newest.commit:
        return newest
    merged: dict[str, Result] = {}
    for run in history:
        if run.commit == newest.commit:
            merged.update(run.results)
    return Run(path=newest.path, machine=newest.machine, datetime=newest.datetime, commit=newest.commit,
               machine_info=newest.machine_info, results=merged, invalid=newest.invalid)


COMPARABLE_NAMES = ("tflops", "gbps", "samples_per_s", "batches_per_s")
# The size profiles' square matmul edge (``--ledger-size``): how a run that did not record ``work`` names its profile.
_PROFILE_BY_EDGE = {512: "small", 8192: "full"}
# extra_info keys that size the work of a benchmark, in the order they are shown; a run that did not record ``work``
# is described by the ones it has.
_SIZE_KEYS = ("workload", "model", "shape", "batch", "seq_len", "effective_batch", "micro_batches", "batches",
              "epochs", "bytes_moved", "bytes", "bytes_min", "params", "world_size", "tokens_per_step", "flops")
_RECIPE_DTYPE = {"32-true": "fp32", "16-mixed": "fp16", "16-true": "fp16", "bf16-mixed": "bf16", "bf16-true": "bf16"}


@dataclass(frozen=True)
class Comparable:
    """The figure of a benchmark that can be compared across machines: a rate that does not depend on how long the
    work took, with its fraction of the machine's own peak (for ``dtype``) where known."""

    name: str  # one of COMPARABLE_NAMES
    value: float
    fraction_of_peak: float | None = None
    dtype: str | None = None

    @property
    def size_free(self) -> bool:
        """True for rates of the hardware (TFLOP/s, GB/s) that hold across sizes of work; a rate of samples or
        batches depends on their size, and compares only between runs of identical work."""
        return self.name in ("tflops", "gbps")


@dataclass(frozen=True)
class Described:
    """What a benchmark did (``work``, None when not recorded) and the figure to compare (None when none)."""

    work: dict[str, Any] | None
    comparable: Comparable | None
    derived: bool  # True when read from older extra_info keys instead of ``work`` and ``comparable``


def _warn(where: str, message: str) -> None:
    warnings.warn(f"{where}: {message}", SkippedData, stacklevel=3)


def _positive(extra: dict[str, Any], key: str) -> float | None:
    number = finite(extra.get(key))
    return number if number is not None and number > 0 else None


def _dtype_of(extra: dict[str, Any]) -> str | None:
    dtype = extra.get("dtype")
    if isinstance(dtype, str) and dtype:
        return dtype
    recipe = extra.get("recipe")
    return _RECIPE_DTYPE.get(recipe) if isinstance(recipe, str) else None


def describe(result: Result, where: str = "") -> Described:
    """The work and the comparable figure of one benchmark result: the one place that reads them.

    ``extra_info["work"]`` (a dict naming the size of the work) and ``extra_info["comparable"]`` (``name`` one of
    :data:`COMPARABLE_NAMES`, ``value`` a finite number > 0, ``fraction_of_peak`` a finite number >= 0 or null) are
    used when recorded; a value of the wrong form is named in a :class:`SkippedData` warning (``where`` names the file
    and benchmark) and taken as not recorded. A run that did not record them is read from the keys it has: the size
    keys (``shape``, ``workload``, ``flops``, ``batches``, ...) and the profile from a square matmul's edge (512
    small, 8192 full); ``tflops`` (with ``fraction_of_peak`` or ``mfu``), ``bandwidth_bytes_per_s`` or
    ``batches_per_s``; the dtype from ``dtype`` or ``recipe``. No size key at all: work not recorded (None).
    """
    extra = result.extra_info
    where = where or result.name
    derived = False
    work: dict[str, Any] | None = None
    raw_work = extra.get("work")
    if raw_work is not None and not (isinstance(raw_work, dict) and raw_work):
        _warn(where, f"extra_info work {shown(raw_work)} is not a non-empty object: work taken as not recorded")
    elif isinstance(raw_work, dict):
        work = dict(raw_work)
    if "work" not in extra:
        derived = True
        found = {key: extra[key] for key in _SIZE_KEYS if extra.get(key) is not None}
        shape = found.get("shape")
        if isinstance(shape, list) and shape:
            found.pop("flops", None)  # follows from the shape
            if len(shape) == 3 and len(set(shape)) == 1 and shape[0] in _PROFILE_BY_EDGE:
                found = {"profile": _PROFILE_BY_EDGE[shape[0]], **found}
        work = found or None
    comparable: Comparable | None = None
    dtype = _dtype_of(extra)
    raw = extra.get("comparable")
    if raw is not None:
        name = raw.get("name") if isinstance(raw, dict) else None
        value = finite(raw.get("value")) if isinstance(raw, dict) else None
        fraction = raw.get("fraction_of_peak") if isinstance(raw, dict) else None
        fraction_ok = fraction is None or ((f := finite(fraction)) is not None and f >= 0)
        if name in COMPARABLE_NAMES and value is not None and value > 0 and fraction_ok:
            comparable = Comparable(str(name), value, finite(fraction), dtype)
        else:
            _warn(where, f"extra_info comparable {shown(raw)} is not {{name: one of {', '.join(COMPARABLE_NAMES)}, "
                  "value: a finite number > 0, fraction_of_peak: a finite number >= 0 or null}: not compared")
    else:
        derived = True
        fraction = _positive(extra, "fraction_of_peak")
        if (tflops := _positive(extra, "tflops")) is not None:
            comparable = Comparable("tflops", tflops, fraction or _positive(extra, "mfu"), dtype)
        elif (bandwidth := _positive(extra, "bandwidth_bytes_per_s")) is not None:
            comparable = Comparable("gbps", bandwidth / 1e9, fraction or _positive(extra, "fraction_of_host_link"))
        elif (batches := _positive(extra, "batches_per_s")) is not None:
            comparable = Comparable("batches_per_s", batches, None)
        elif (samples := _positive(extra, "samples_per_s")) is not None:
            comparable = Comparable("samples_per_s", samples, None)
    return Described(work, comparable, derived)


def work_text(work: dict[str, Any] | None) -> str:
    """``small, shape 512x512x512``: a work description on one line; ``work not recorded`` for None."""
    if not work:
        return "work not recorded"
    parts = []
    for key, value in work.items():
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            value = "x".join(str(v) for v in value)
        number = finite(value)
        if number is not None and key == "flops":
            value = format_flops(number)
        elif number is not None and key.startswith("bytes"):
            value = format_bytes(number)
        parts.append(str(value) if key == "profile" else f"{key} {value}")
    return ", ".join(parts)


def work_difference(works: dict[str, dict[str, Any] | None]) -> str:
    """What differs between the works of several machines, e.g. ``shape 512x512x512 (a) vs 8192x8192x8192 (b)``;
    empty when they are all recorded and identical."""
    recorded = {m: w for m, w in works.items() if w}
    missing = [m for m, w in works.items() if not w]
    if missing:
        return f"work not recorded on {', '.join(missing)}"
    keys = list(dict.fromkeys(k for w in recorded.values() for k in w))
    parts = []
    for key in keys:
        values = {m: w.get(key) for m, w in recorded.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            shown_values = [work_text({key: v}).removeprefix(f"{key} ") if v is not None else "-"
                            for v in values.values()]
            parts.append(f"{key} " + " vs ".join(shown_values))
    return "; ".join(parts)
