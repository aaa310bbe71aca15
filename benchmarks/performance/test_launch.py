"""The roofline group's launch overhead: the fixed cost of one eager op on the benchmark's device, for the step-time
model's calibration (:mod:`torchledger.reporting.calibration` reads ``launch_overhead_s``).

One timed call issues :data:`LAUNCHES` adds of one-element tensors back to back, then waits for the device (on CUDA
a ``torch.cuda.synchronize()`` inside the call, so that the figure is the queue's throughput and not only the
host's issue rate, whatever timer the run uses). The work of each add is one element: what remains is the Python
binding, the dispatcher, the allocation of the output and, on CUDA, the kernel launch, the per-op cost that the
step-time model charges once per launch. The figure is the median call over ``LAUNCHES``.
NB: the add records no autograd graph (its inputs need no gradient); the ops of a training step's forward do.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger

LAUNCHES = 1000  # per timed call: about 5 to 10 ms at a few microseconds per op, far above the timer's resolution


@pytest.mark.benchmark(group="roofline")
def test_launch_overhead(ledger: Ledger, sizes: dict[str, Any]) -> None:
    a = torch.ones(1, device=ledger.device)
    b = torch.ones(1, device=ledger.device)

    def adds() -> None:
        for _ in range(LAUNCHES):
            torch.add(a, b)
        ledger.sync()

    # events=False: the stream is idle between the tiny kernels (host-bound work), and each call synchronizes itself
    seconds = ledger.time(adds, rounds=max(sizes["rounds"], 10), warmup=2, samples=LAUNCHES, events=False,
                          work={"launches": LAUNCHES})
    ledger.record(launch_overhead_s=None if seconds is None else seconds / LAUNCHES)
