"""Hardware comparison report: the newest run of each machine merged into one Markdown page with PNG figures.

- a system-description table per machine;
- per benchmark group, speed normalized to a reference machine (a table and a bar chart);
- a roofline chart: achieved FLOP/s against arithmetic intensity for the matmuls that recorded both, under each
  machine's ceilings (the hardware table's peaks on GPUs; on a CPU, its own measured matmul peak and copy bandwidth);
- predicted against measured peak memory for every benchmark that recorded both.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from torchledger.formulas.hardware import lookup_device
from torchledger.reporting.results import Run
from torchledger.reporting.units import format_bytes


def _progress(step: int, total: int, what: str) -> None:
    print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def _system_rows(runs: dict[str, Run]) -> list[str]:
    lines = ["| machine | GPU | CPU | cores | RAM | torch | CUDA | run | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, run in runs.items():
        info = run.machine_info.get("torchledger", {})
        gpus = ", ".join(f"{g.get('name')} ({format_bytes(g.get('memory_bytes') or 0)}, driver {g.get('driver')}, "
                         f"{g.get('power_limit_w')} W, PCIe gen {g.get('pcie_generation')} x{g.get('pcie_width')})"
                         for g in info.get("gpus", [])) or "none"
        cpu = info.get("cpu_model") or run.machine_info.get("cpu", {}).get("brand_raw", "?")
        ram = format_bytes(info.get("ram_bytes") or 0)
        lines.append(f"| {tag} | {gpus} | {cpu} | {info.get('cpu_cores_logical', '?')} | {ram} | "
                     f"{info.get('torch', '?')} | {info.get('cuda') or '-'} | {run.datetime[:19]} | "
                     f"{run.commit or '-'} |")
    return lines


def _ceilings(run: Run) -> tuple[dict[str, float], float | None]:
    """Peak FLOP/s by dtype and memory bandwidth for a machine: the table's for a known GPU, else measured."""
    gpus = run.machine_info.get("torchledger", {}).get("gpus", [])
    if gpus:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = lookup_device(str(gpus[0].get("name")))
        if spec is not None:
            return dict(spec.peaks), spec.memory_bandwidth
    peaks: dict[str, float] = {}
    bandwidth = None
    for r in run.results.values():
        e = r.extra_info
        if e.get("tflops") and e.get("dtype") and "matmul" in r.name:
            peaks[e["dtype"]] = max(peaks.get(e["dtype"], 0.0), e["tflops"] * 1e12)
        if e.get("bandwidth_bytes_per_s") and "copy_bandwidth" in r.name:
            bandwidth = float(e["bandwidth_bytes_per_s"])
    return peaks, bandwidth


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (reports are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_speed(group: str, names: list[str], speed: dict[str, list[float | None]], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.35 * len(names) + 1.5)))
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
    plt.close(fig)


def _plot_roofline(runs: dict[str, Run], out: Path) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    drew = False
    for i, (tag, run) in enumerate(runs.items()):
        color = f"C{i}"
        points = [(r.extra_info["intensity"], r.extra_info["tflops"] * 1e12, r.extra_info.get("dtype", ""))
                  for r in run.results.values() if r.extra_info.get("intensity") and r.extra_info.get("tflops")]
        peaks, bandwidth = _ceilings(run)
        for x, y, label in points:
            ax.scatter([x], [y], color=color)
            ax.annotate(label, (x, y), fontsize=7, color=color)
            drew = True
        if bandwidth and peaks:
            top = max(peaks.values())
            xs = [0.1, top / bandwidth, 1e5]
            ax.plot(xs, [min(top, x * bandwidth) for x in xs], color=color, linestyle="--", label=f"{tag} ceiling")
    if not drew:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title("roofline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _plot_memory(runs: dict[str, Run], out: Path) -> list[tuple[str, str, int, int]]:
    plt = _pyplot()
    rows = [(tag, r.name, int(r.extra_info["predicted_memory"]), int(r.extra_info["peak_memory"]))
            for tag, run in runs.items() for r in run.results.values()
            if r.extra_info.get("predicted_memory") and r.extra_info.get("peak_memory")]
    if not rows:
        return rows
    fig, ax = plt.subplots(figsize=(6, 6))
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
    plt.close(fig)
    return rows


def build_report(history: dict[str, list[Run]], out_dir: Path, *, reference: str | None = None) -> Path:
    """Write ``out_dir/report.md`` and its figures from the newest run of each machine; returns the page's path.

    The folder is written whole or not at all (built beside it, then renamed), and an existing one is never
    replaced: ValueError names it.
    """
    if not history:
        raise ValueError("no runs to report on")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"-o {out_dir}: the folder exists and is not empty; reports never overwrite")
    runs = {tag: h[-1] for tag, h in sorted(history.items())}
    ref = reference or next(iter(runs))
    if ref not in runs:
        raise ValueError(f"reference={ref!r} is not among the machines: {', '.join(runs)}")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    groups = sorted({r.group for run in runs.values() for r in run.results.values()})
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
        lines += [f"### {group}", "", "| benchmark | " + " | ".join(f"{t} median" for t in runs) + " | "
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
            lines.append(f"| {n.split('::')[-1]} | " + " | ".join(medians) + " | " + " | ".join(speeds) + " |")
        figure = f"speed-{group}.png"
        _plot_speed(group, names, speed, tmp / figure)
        lines += ["", f"![speed, {group}]({figure})", ""]
    step += 1
    _progress(step, total, "roofline")
    lines += ["## Roofline", ""]
    if _plot_roofline(runs, tmp / "roofline.png"):
        lines += ["Achieved FLOP/s of the matmuls against their arithmetic intensity, under each machine's ceilings "
                  "(hardware table for known GPUs; measured matmul peak and copy bandwidth otherwise).", "",
                  "![roofline](roofline.png)", ""]
    else:
        lines += ["No benchmark recorded both `intensity` and `tflops`.", ""]
    step += 1
    _progress(step, total, "memory")
    lines += ["## Predicted and measured memory", ""]
    rows = _plot_memory(runs, tmp / "memory.png")
    if rows:
        lines += ["| machine | benchmark | predicted | measured | error |", "| --- | --- | --- | --- | --- |"]
        for tag, name, predicted, measured in rows:
            lines.append(f"| {tag} | {name.split('::')[-1]} | {format_bytes(predicted)} | {format_bytes(measured)} | "
                         f"{100 * (predicted - measured) / measured:+.2f}% |")
        lines += ["", "![memory](memory.png)", ""]
    else:
        lines += ["No benchmark recorded both `predicted_memory` and `peak_memory`.", ""]
    (tmp / "report.md").write_text("\n".join(lines))
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.replace(tmp, out_dir)
    return out_dir / "report.md"

