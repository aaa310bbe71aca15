"""What state the GPU was in while a figure was measured: clocks, power, temperature and why clocks were held down.

A GPU's clocks move with its load: a 700 W part under sustained matmuls lowers its SM clock to stay within its power
limit, so the same kernel times differently in a burst and under load. :class:`GpuStateSampler` polls NVML in a
background thread while a benchmark's timed rounds run and :meth:`GpuStateSampler.summary` reports the minimum and
the median of each quantity, with every clock-limiting reason seen:

- ``sm_clock_mhz``, ``memory_clock_mhz``: current SM and memory clocks;
- ``power_w``, ``power_limit_w``: power draw and the enforced power limit;
- ``temperature_c``: the GPU's temperature;
- ``throttle_reasons``: the names of the bits set in NVML's clock event (throttle) reasons mask, in any sample;
- ``samples``: how many samples were taken.

NVML (``pynvml`` from nvidia-ml-py) being absent, failing to start or failing every query is never an error: the
summary is then ``None`` and the benchmark records no ``gpu_state``. A quantity that one GPU does not report is left
out of the summary.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
from types import ModuleType
from typing import Any

# NVML's clock event reasons (nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*): bit -> name.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}

QUANTITIES = ("sm_clock_mhz", "memory_clock_mhz", "power_w", "power_limit_w", "temperature_c")

DEFAULT_INTERVAL_S = 0.01  # 10 ms: several samples in a 100 ms round; each sample costs NVML a few calls


def decode_throttle_reasons(mask: int) -> list[str]:
    """The names of the reasons set in an NVML clock event reasons bitmask; an unknown bit is named by its value."""
    if mask < 0:
        raise ValueError(f"clock event reasons mask must be >= 0, got {mask}")
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    bit = 1
    while unknown >= bit:
        if unknown & bit:
            names.append(f"unknown_0x{bit:x}")
        bit <<= 1
    return names


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``{quantity: {"min", "median"}, "throttle_reasons": [...], "samples": n}`` of the samples; None when there
    are none, or when no sample holds any quantity."""
    out: dict[str, Any] = {}
    for key in QUANTITIES:
        values = [float(s[key]) for s in samples if s.get(key) is not None]
        if values:
            out[key] = {"min": min(values), "median": float(statistics.median(values))}
    masks = [int(s["throttle_mask"]) for s in samples if s.get("throttle_mask") is not None]
    if not out and not masks:
        return None
    reasons: set[str] = set()
    for mask in masks:
        reasons.update(decode_throttle_reasons(mask))
    out["throttle_reasons"] = sorted(reasons)
    out["samples"] = len(samples)
    return out


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return None
    return pynvml  # type: ignore[no-any-return]


class GpuStateSampler:
    """Samples one GPU's state through NVML every ``interval_s`` seconds between :meth:`start` and :meth:`stop`
    (or as a context manager), in a daemon thread. ``uuid`` (``torch.cuda.get_device_properties(i).uuid``) finds
    the GPU whatever ``CUDA_VISIBLE_DEVICES`` says; otherwise NVML's ``index`` is used."""

    def __init__(self, index: int = 0, *, uuid: str | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.index, self.uuid, self.interval_s = index, uuid, interval_s
        self.samples: list[dict[str, Any]] = []
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> bool:
        nvml = _import_nvml()
        if nvml is None:
            return False
        try:
            nvml.nvmlInit()
        except Exception:
            return False
        try:
            handle = None
            if self.uuid:
                uuid = self.uuid if self.uuid.startswith(("GPU-", "MIG-")) else "GPU-" + self.uuid
                try:
                    handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                except Exception:
                    handle = None
            if handle is None:
                handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            self._shutdown(nvml)
            return False
        self._nvml, self._handle = nvml, handle
        return True

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()

    def sample(self) -> dict[str, Any]:
        """One reading of every quantity; a query that fails gives None for its quantity."""
        nvml, h = self._nvml, self._handle
        sm, mem = getattr(nvml, "NVML_CLOCK_SM", 1), getattr(nvml, "NVML_CLOCK_MEM", 2)
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        queries: dict[str, Any] = {
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, sm),
            "memory_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, mem),
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "power_limit_w": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)),
            "throttle_mask": lambda: None if reasons is None else int(reasons(h)),
        }
        reading: dict[str, Any] = {}
        for key, query in queries.items():
            try:
                reading[key] = query()
            except Exception:
                reading[key] = None
        return reading

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.interval_s):
                break
        self.samples.append(self.sample())  # the state at the end of the measured work

    def start(self) -> GpuStateSampler:
        self.samples = []
        if self._thread is None and self._open():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="torchledger-gpu-state", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any] | None:
        """Stops sampling and returns :meth:`summary`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._shutdown(self._nvml)
            self._nvml = self._handle = None
        return self.summary()

    def summary(self) -> dict[str, Any] | None:
        return summarize(self.samples)

    def __enter__(self) -> GpuStateSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cuda_uuid(device: Any) -> str | None:
    """The NVML-style UUID of a CUDA device (``GPU-...``), None when torch does not say."""
    import torch

    try:
        uuid = torch.cuda.get_device_properties(torch.device(device)).uuid
    except Exception:
        return None
    return f"GPU-{uuid}" if uuid else None
