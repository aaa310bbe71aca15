"""Hardware comparison report: the newest run of each machine merged into one Markdown page with PNG figures.

- a system-description table per machine;
- per benchmark group, speed normalized to a reference machine (a table and a bar chart);
- a roofline chart: achieved FLOP/s against arithmetic intensity for the matmuls that recorded both, under each
  machine's ceilings (the hardware table's peaks on GPUs; on a CPU, its own measured matmul peak and copy bandwidth);
- predicted against measured peak memory for every benchmark that recorded both.

A figure in ``extra_info`` that is present but not a finite number > 0 is named (file, benchmark, field) in a warning
and its benchmark is left out of the chart and table that need it. The report is built in a new folder of its own
beside the target and renamed onto it when whole: nothing is ever deleted but that folder, and an existing report
is never replaced, not even by a report built at the same moment.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torchledger.formulas.hardware import DEVICES, DeviceSpec
from torchledger.reporting.results import Run, SkippedData, finite, newest_results, shown
from torchledger.reporting.units import format_bytes


def _progress(step: int, total: int, what: str) -> None:
    print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def _cell(value: object) -> str:
    """A value read from a file, on one line and safe inside a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _bytes(value: object) -> str:
    number = finite(value)
    return format_bytes(number) if number is not None and number >= 0 else "?"


def _system_rows(runs: dict[str, Run]) -> list[str]:
    lines = ["| machine | GPU | CPU | cores | RAM | torch | CUDA | run | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, run in runs.items():
        info = run.machine_info.get("torchledger")
        info = info if isinstance(info, dict) else {}
        gpus = ", ".join(f"{g.get('name')} ({_bytes(g.get('memory_bytes') or 0)}, driver {g.get('driver')}, "
                         f"{g.get('power_limit_w')} W, PCIe gen {g.get('pcie_generation')} x{g.get('pcie_width')})"
                         for g in info.get("gpus") or [] if isinstance(g, dict)) or "none"
        cpu_info = run.machine_info.get("cpu")
        cpu = info.get("cpu_model") or (cpu_info.get("brand_raw") if isinstance(cpu_info, dict) else None) or "?"
        cells = [tag, gpus, cpu, info.get("cpu_cores_logical", "?"), _bytes(info.get("ram_bytes") or 0),
                 info.get("torch", "?"), info.get("cuda") or "-", run.datetime[:19], run.commit or "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


@dataclass
class _Measures:
    """The figures of one run that the report reads from ``extra_info``, each value checked once."""

    roofline: list[tuple[float, float, str]] = field(default_factory=list)  # intensity, FLOP/s, dtype
    peaks: dict[str, float] = field(default_factory=dict)  # measured matmul FLOP/s by dtype
    bandwidth: float | None = None  # measured copy bandwidth, bytes/s
    memory: list[tuple[str, int, int]] = field(default_factory=list)  # benchmark, predicted, measured bytes


def _number(run: Run, name: str, key: str) -> float | None:
    """``extra_info[key]`` of benchmark ``name``: None when absent, and also, with a warning, when not valid."""
    value = run.results[name].extra_info.get(key)
    if value is None:
        return None
    number = finite(value)
    if number is None or number <= 0:
        warnings.warn(f"{run.path}: {name}: extra_info {key} {shown(value)} is not a finite number > 0: "
                      "left out of the report", SkippedData, stacklevel=2)
        return None
    return number


def _measures(run: Run) -> _Measures:
    m = _Measures()
    for name, r in run.results.items():
        dtype = r.extra_info.get("dtype")
        dtype = dtype if isinstance(dtype, str) else ""
        intensity, tflops = _number(run, name, "intensity"), _number(run, name, "tflops")
        if intensity is not None and tflops is not None:
            m.roofline.append((intensity, tflops * 1e12, dtype))
        if tflops is not None and dtype and "matmul" in name:
            m.peaks[dtype] = max(m.peaks.get(dtype, 0.0), tflops * 1e12)
        if "copy_bandwidth" in name:
            m.bandwidth = _number(run, name, "bandwidth_bytes_per_s") or m.bandwidth
        predicted, peak = _number(run, name, "predicted_memory"), _number(run, name, "peak_memory")
        if predicted is not None and peak is not None:
            m.memory.append((name, int(predicted), int(peak)))
    return m


def _lookup(name: str) -> DeviceSpec | None:
    """The hardware table's entry for a GPU name, or None (quietly: an unknown GPU uses measured ceilings)."""
    key = name.strip().lower()
    return next((d for d in DEVICES if any(re.search(p, key) for p in d.patterns)), None)


def _ceilings(run: Run, measured: _Measures) -> tuple[dict[str, float], float | None]:
    """Peak FLOP/s by dtype and memory bandwidth for a machine: the table's for a known GPU, else measured."""
    info = run.machine_info.get("torchledger")
    gpus = info.get("gpus") if isinstance(info, dict) else None
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict):
        spec = _lookup(str(gpus[0].get("name")))
        if spec is not None:
            return dict(spec.peaks), spec.memory_bandwidth
    return dict(measured.peaks), measured.bandwidth


def _plot_speed(group: str, names: list[str], speed: dict[str, list[float | None]], out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, max(3.0, 0.35 * len(names) + 1.5)))
    ax = fig.subplots()
    height = 0.8 / max(len(speed), 1)
    for i, (machine, values) in enumerate(speed.items()):
        ys = [j + i * height for j in range(len(names))]
        ax.barh(ys, [v or 0.0 for v in values], height=height, label=machine)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    ax.set_yticklabels([n.split("::")[-1][:60] for n in names], fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed relative to the reference machine (higher is faster)")
    ax.set_title(f"group: {group}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _plot_roofline(runs: dict[str, Run], measures: dict[str, _Measures], out: Path) -> bool:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    drew = False
    for i, (tag, run) in enumerate(runs.items()):
        color = f"C{i}"
        peaks, bandwidth = _ceilings(run, measures[tag])
        for x, y, label in measures[tag].roofline:
            ax.scatter([x], [y], color=color)
            ax.annotate(label, (x, y), fontsize=7, color=color)
            drew = True
        if bandwidth and peaks:
            top = max(peaks.values())
            xs = [0.1, top / bandwidth, 1e5]
            ax.plot(xs, [min(top, x * bandwidth) for x in xs], color=color, linestyle="--", label=f"{tag} ceiling")
    if not drew:
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title("roofline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def _plot_memory(runs: dict[str, Run], measures: dict[str, _Measures], out: Path) -> list[tuple[str, str, int, int]]:
    from matplotlib.figure import Figure

    rows = [(tag, name, predicted, measured) for tag in runs for name, predicted, measured in measures[tag].memory]
    if not rows:
        return rows
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for i, tag in enumerate(runs):
        pts = [(p, m) for t, _, p, m in rows if t == tag]
        if pts:
            ax.scatter([p for p, _ in pts], [m for _, m in pts], color=f"C{i}", label=tag)
    lo = min(min(p, m) for _, _, p, m in rows)
    hi = max(max(p, m) for _, _, p, m in rows)
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted peak (bytes)")
    ax.set_ylabel("measured peak (bytes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return rows


def _figure_names(groups: list[str]) -> dict[str, str]:
    """A file name per group, inside the report folder whatever the group is called, and one per group."""
    names: dict[str, str] = {}
    for group in groups:
        base = "speed-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", group).lstrip(".") or "group")
        name, n = f"{base}.png", 2
        while name in names.values():
            name, n = f"{base}-{n}.png", n + 1
        names[group] = name
    return names


def _write(runs: dict[str, Run], ref: str, folder: Path) -> None:
    """The page and its figures, into ``folder``."""
    measures = {tag: _measures(run) for tag, run in runs.items()}
    groups = sorted({r.group for run in runs.values() for r in run.results.values()})
    figures = _figure_names(groups)
    total = len(groups) + 3
    step = 0
    lines = ["# Hardware comparison", "",
             f"The newest run of each of {len(runs)} machine(s); speeds relative to `{ref}`.", "",
             "## Machines", "", *_system_rows(runs), ""]
    step += 1
    _progress(step, total, "machines")
    lines += ["## Speed by group", ""]
    for group in groups:
        step += 1
        _progress(step, total, f"group {group}")
        names = sorted({n for run in runs.values() for n, r in run.results.items() if r.group == group})
        ref_results = runs[ref].results
        speed: dict[str, list[float | None]] = {}
        lines += [f"### {_cell(group)}", "", "| benchmark | " + " | ".join(f"{t} median" for t in runs) + " | "
                  + " | ".join(f"{t} speed" for t in runs) + " |",
                  "| --- |" + " --- |" * (2 * len(runs))]
        for tag, run in runs.items():
            speed[tag] = [
                (ref_results[n].median / run.results[n].median) if n in run.results and n in ref_results else None
                for n in names
            ]
        for j, n in enumerate(names):
            medians = [f"{runs[t].results[n].median:.4g} s" if n in runs[t].results else "-" for t in runs]
            speeds = [f"{speed[t][j]:.2f}x" if speed[t][j] else "-" for t in runs]
            lines.append(f"| {_cell(n.split('::')[-1])} | " + " | ".join(medians) + " | " + " | ".join(speeds)
                         + " |")
        _plot_speed(group, names, speed, folder / figures[group])
        lines += ["", f"![speed, {_cell(group)}]({figures[group]})", ""]
    step += 1
    _progress(step, total, "roofline")
    lines += ["## Roofline", ""]
    if _plot_roofline(runs, measures, folder / "roofline.png"):
        lines += ["Achieved FLOP/s of the matmuls against their arithmetic intensity, under each machine's ceilings "
                  "(hardware table for known GPUs; measured matmul peak and copy bandwidth otherwise).", "",
                  "![roofline](roofline.png)", ""]
    else:
        lines += ["No benchmark recorded both `intensity` and `tflops`.", ""]
    step += 1
    _progress(step, total, "memory")
    lines += ["## Predicted and measured memory", ""]
    rows = _plot_memory(runs, measures, folder / "memory.png")
    if rows:
        lines += ["| machine | benchmark | predicted | measured | error |", "| --- | --- | --- | --- | --- |"]
        for tag, name, predicted, measured in rows:
            lines.append(f"| {tag} | {_cell(name.split('::')[-1])} | {format_bytes(predicted)} | "
                         f"{format_bytes(measured)} | {100 * (predicted - measured) / measured:+.2f}% |")
        lines += ["", "![memory](memory.png)", ""]
    else:
        lines += ["No benchmark recorded both `predicted_memory` and `peak_memory`.", ""]
    (folder / "report.md").write_text("\n".join(lines))


def _check_target(out_dir: Path) -> None:
    """ValueError naming ``-o`` unless it is a new folder, or an existing empty one (which the report replaces)."""
    if out_dir.name in ("", ".", ".."):
        raise ValueError(f"-o {out_dir}: name a new folder for the report")
    if out_dir.is_symlink():
        raise ValueError(f"-o {out_dir}: is a symbolic link; a report is written to a new folder, never through "
                         "a link")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"-o {out_dir}: exists and is not a folder; reports never overwrite")
        if any(out_dir.iterdir()):
            raise ValueError(f"-o {out_dir}: the folder exists and is not empty; reports never overwrite")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders this call created, outermost first."""
    missing: list[Path] = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        created.append(d)
    return created


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` in one step, never replacing a report or a file.

    rename(2) replaces nothing but an empty folder: a target that has become a file, a link or a non-empty folder
    (another report finished first) makes it fail, and this one is refused.
    """
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise ValueError(f"-o {out_dir}: was taken while this report was being built (by another report to the "
                             "same folder?); reports never overwrite") from None
        raise


def _folder_mode(page: Path) -> int:
    """The mode a folder made under the current umask would have, read off a file just written under it."""
    mode = stat.S_IMODE(page.stat().st_mode) & 0o666
    return mode | (mode & 0o444) >> 2


def build_report(history: dict[str, list[Run]], out_dir: Path, *, reference: str | None = None) -> Path:
    """Write ``out_dir/report.md`` and its figures from the newest run of each machine (with the earlier runs of its
    commit merged in: :func:`~torchledger.reporting.results.newest_results`); returns the page's path.

    The folder is written whole or not at all: built in a new folder of its own beside ``out_dir``, then renamed
    onto it. ``out_dir`` must not exist or be an empty folder; ValueError names it otherwise, also when another
    report takes it first. On any failure, Ctrl-C included, the build folder (and the parents this call created)
    are removed and the error is raised again: OSError for a folder that cannot be written.
    """
    if not history:
        raise ValueError("no runs to report on")
    runs = {tag: newest_results(h) for tag, h in sorted(history.items())}
    ref = reference or next(iter(runs))
    if ref not in runs:
        raise ValueError(f"reference={ref!r} is not among the machines: {', '.join(runs)}")
    _check_target(out_dir)
    created = _make_parents(out_dir.parent)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"{out_dir.name}.partial-"))
        _write(runs, ref, tmp)
        tmp.chmod(_folder_mode(tmp / "report.md"))
        _publish(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return out_dir / "report.md"
