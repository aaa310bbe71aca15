"""What machine a figure was measured on: the device's name as the hardware table knows it."""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> str:
    """``torch.cuda.get_device_name()`` for a CUDA device, the CPU model otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return str(torch.cuda.get_device_name(dev))
    return cpu_model()


def _nvml_gpus() -> list[dict[str, Any]]:
    """Every GPU as NVML describes it: name, memory, driver, clocks, power limit, PCIe link. [] without NVML."""
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    gpus = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            info: dict[str, Any] = {"index": i, "name": pynvml.nvmlDeviceGetName(h), "driver": driver}
            queries: dict[str, Callable[[Any], Any]] = {
                "memory_bytes": lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).total,
                "sm_clock_max_mhz": lambda h: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "memory_clock_max_mhz": lambda h: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_limit_w": lambda h: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
                "pcie_generation": lambda h: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h),
                "pcie_width": lambda h: pynvml.nvmlDeviceGetCurrPcieLinkWidth(h),
            }
            for key, query in queries.items():
                try:
                    info[key] = query(h)
                except pynvml.NVMLError:
                    info[key] = None
            gpus.append(info)
    finally:
        pynvml.nvmlShutdown()
    return gpus


def describe_machine() -> dict[str, Any]:
    """What a benchmark run ran on: GPUs (NVML), CUDA, cuDNN and torch versions, the CPU, its cores and RAM."""
    import psutil

    cuda = torch.cuda.is_available()
    return {
        "device_tag": device_tag(),
        "gpus": _nvml_gpus() if cuda else [],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu_model": cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "llc_bytes": last_level_cache_bytes(),
    }


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the CPU's last-level data cache (the highest ``level`` of the data or unified caches of
    CPU 0 in sysfs), in bytes; None where sysfs does not say (not Linux, or no cache entries). Read from sysfs
    because py-cpuinfo, which pytest-benchmark records, reports this machine's 32 MiB L3 as 1 MiB."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    best: tuple[int, int] | None = None
    for entry in sorted(root.glob("index*")):
        try:
            kind = (entry / "type").read_text().strip()
            level = int((entry / "level").read_text())
            size = (entry / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        number, unit = (size[:-1], units[size[-1]]) if size[-1:] in units else (size, 1)
        if kind == "Instruction" or not number.isdigit():
            continue
        if best is None or level > best[0]:
            best = (level, int(number) * unit)
    return best[1] if best is not None and best[1] > 0 else None


# glibc's mallopt parameters (malloc.h) and the values the suite fixes them at: the most its dynamic thresholds ever
# reach on a 64-bit machine (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB; the trim threshold is twice the mmap threshold).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
FIXED_MALLOC: dict[str, int] = {"mmap_threshold": 32 * 2**20, "trim_threshold": 64 * 2**20}


def fix_malloc_thresholds() -> dict[str, int] | None:
    """Fix glibc's malloc thresholds at :data:`FIXED_MALLOC`, so that CPU timings do not depend on what ran earlier
    in the process; returns what was set, None where the C library is not glibc (nothing is changed there).

    Why: glibc serves blocks of at least the mmap threshold with fresh pages and returns the top of its heap to the
    OS when more than the trim threshold lies free there; the next write to such memory takes a page fault. Both
    thresholds start at 128 KiB and rise to the largest block the process has freed (mallopt(3)), so the same
    training step faults or not by the process's history. On the 2-core EPYC the MLP step of the small profile
    (512-2048-2048-512, AdamW) faulted 27 to 45 MiB a step and took 34 to 39 ms in a fresh process, and faulted
    nothing and took 26 ms after one 30 MiB block had been freed. Setting a threshold with mallopt turns the dynamic
    adjustment off; these values are the state a process reaches once it has freed a block of 32 MiB, as training
    at any real size does at its first step. Blocks of 32 MiB and more still get fresh pages every time."""
    import ctypes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, FIXED_MALLOC["mmap_threshold"]) != 1 or \
            mallopt(_M_TRIM_THRESHOLD, FIXED_MALLOC["trim_threshold"]) != 1:
        return None
    return dict(FIXED_MALLOC)


def device_tag() -> str:
    """A folder-safe name for this machine's accelerator, by which its runs are filed: ``cuda-<gpu name>`` or
    ``cpu-<cpu model>`` (the same for every machine of that kind, so a nightly CI runner keeps one history)."""
    name = "cuda-" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu-" + cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]
