"""glibc's malloc thresholds, fixed for a benchmark session (``--ledger-malloc fixed``,
:func:`torchledger.measuring.machine.fix_malloc_thresholds`): with them, a training step that frees and re-allocates
its large tensors every iteration stops taking page faults for them, whatever ran before in the process.

Page faults are counted, not timed: ``getrusage``'s minor faults are deterministic for a given allocation pattern.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from torchledger.measuring.machine import FIXED_MALLOC, fix_malloc_thresholds

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# The small profile's MLP step (512-2048-2048-512 at batch 32, 32-true, AdamW foreach, gradients set to None): the
# pages faulted by each of the last 8 of 15 steps, in a fresh process, glibc's thresholds fixed or left dynamic
# (the heap still grows to its size in the first steps).
PATTERN = """
import json, resource, sys
import torch
if sys.argv[1] == "fixed":
    from torchledger.measuring.machine import fix_malloc_thresholds
    assert fix_malloc_thresholds() is not None
from torchledger.formulas.specs import MLPSpec
from torchledger.measuring.training import MemoryCase
from torchledger.workloads.train_step import TrainConfig
torch.manual_seed(0)
model, step, batches = MemoryCase("mlp", 32, TrainConfig(), mlp=MLPSpec((512, 2048, 2048, 512))).build("cpu")
faults = []
for i in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step.step(batches)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[7:]))
"""


def _faults(policy: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", PATTERN, policy], capture_output=True, text=True, timeout=120,
                          check=False, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's (mallopt); other C libraries are left alone")
def test_fixed_thresholds_stop_the_faults_of_a_repeated_step() -> None:
    # Each step frees the 24 MiB of gradients (zero_grad sets them to None) and AdamW's 24 MiB sqrt(v). Under glibc's
    # dynamic thresholds the largest block freed, the 2048 x 2048 gradient (16 MiB), raises the trim threshold to
    # 32 MiB only: what the step frees at the top of the heap can exceed it, go back to the OS, and be faulted in
    # again by a later step. How often varies from process to process (where the heap lies): 44 MiB in most steps,
    # none in some; over these eight steps 163 to 356 MiB were measured. With the trim threshold at 64 MiB the heap
    # keeps it: at most 4 MiB over the eight steps (the heap growing once more), none in most processes. The bounds
    # sit between the two: the control must fault at least 24 MiB, the fixed thresholds less than 16 MiB.
    mib = 2**20 // 4096  # pages of 4 KiB in a MiB
    dynamic, fixed = _faults("default"), _faults("fixed")
    assert sum(dynamic) >= 24 * mib, dynamic
    assert sum(fixed) < 16 * mib, fixed


def test_the_fixed_values_are_glibc_s_largest_dynamic_ones() -> None:
    # DEFAULT_MMAP_THRESHOLD_MAX is 4 MiB x sizeof(long) = 32 MiB on 64-bit; the dynamic trim threshold is twice the
    # mmap threshold (glibc malloc.c, free: mp_.trim_threshold = 2 * mp_.mmap_threshold)
    assert FIXED_MALLOC == {"mmap_threshold": 4 * 2**20 * 8, "trim_threshold": 2 * 4 * 2**20 * 8}
    applied = fix_malloc_thresholds()  # this process: the suite's session has set them already, as it does
    assert applied == (FIXED_MALLOC if GLIBC else None)
