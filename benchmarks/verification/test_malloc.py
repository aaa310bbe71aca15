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
from typing import Any

import pytest

from torchledger.measuring.machine import FIXED_MALLOC

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# glibc's mechanism on its own, in a fresh process that has not touched its thresholds: one 16 MiB block, served by
# mmap (above the initial 128 KiB threshold) and freed, raises the mmap threshold to its size and the trim threshold
# to twice that (malloc.c, free); then each round mallocs three 15 MiB blocks (below 16 MiB: from the heap), writes
# them and frees them. Their 45 MiB at the top of the heap exceed the 32 MiB trim threshold, go back to the OS, and
# fault again in the next round. With the thresholds fixed, 45 MiB lie below the 64 MiB trim threshold and stay. The
# process imports only ctypes, json, resource and sys first, which free no block that large, so nothing else has moved
# the dynamic thresholds; the fixed mode imports torch first (through torchledger), which cannot matter once mallopt
# has set them.
MECHANISM = """
import ctypes, json, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the machine's huge page policy
if sys.argv[1] == "fixed":
    from torchledger.measuring.machine import fix_malloc_thresholds
    assert fix_malloc_thresholds() is not None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MiB = 2**20
first = libc.malloc(16 * MiB)
ctypes.memset(first, 1, 16 * MiB)
libc.free(first)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(15 * MiB) for _ in range(3)]
    for block in blocks:
        ctypes.memset(block, 1, 15 * MiB)
    for block in reversed(blocks):
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[1:]))
"""

# The small profile's MLP step (512-2048-2048-512 at batch 32, 32-true, AdamW foreach, gradients set to None) with
# the thresholds fixed: the pages faulted by each of the last 8 of 15 steps, in a fresh process (the heap still grows
# to its size in the first steps).
STEP = """
import ctypes, json, resource
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
import torch
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

MIB = 2**20 // 4096  # pages of 4 KiB in a MiB


def _run(program: str, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=600,
                          check=False, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's (mallopt); other C libraries are left alone")
def test_fixed_thresholds_keep_what_dynamic_ones_give_back() -> None:
    # dynamic: every round after the first faults its 45 MiB again (measured 11,488 pages of the 11,520); fixed: none
    dynamic, fixed = _run(MECHANISM, "default"), _run(MECHANISM, "fixed")
    assert all(pages >= 40 * MIB for pages in dynamic), dynamic
    assert sum(fixed) < MIB, fixed


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's (mallopt); other C libraries are left alone")
def test_fixed_thresholds_stop_the_faults_of_a_repeated_step() -> None:
    # Each step frees the 24 MiB of gradients (zero_grad sets them to None) and AdamW's 24 MiB sqrt(v). Under glibc's
    # dynamic thresholds the largest block freed, the 2048 x 2048 gradient (16 MiB), raises the trim threshold to
    # 32 MiB only, and what the step frees at the top of the heap can go back to the OS and fault in again: 44 MiB
    # in most steps, 163 to 356 MiB over these eight steps, though none at all in some processes (where the heap lies
    # varies), so the dynamic case is no control; the test above is. With the trim threshold at 64 MiB the heap keeps
    # it: at most 4 MiB over the eight steps (the heap growing once more), none in most processes.
    fixed = _run(STEP)
    assert sum(fixed) < 16 * MIB, fixed


def test_the_fixed_values_are_glibc_s_largest_dynamic_ones() -> None:
    # DEFAULT_MMAP_THRESHOLD_MAX is 4 MiB x sizeof(long) = 32 MiB on 64-bit; the dynamic trim threshold is twice the
    # mmap threshold (glibc malloc.c, free: mp_.trim_threshold = 2 * mp_.mmap_threshold)
    assert FIXED_MALLOC == {"mmap_threshold": 4 * 2**20 * 8, "trim_threshold": 2 * 4 * 2**20 * 8}
    # in a process of its own: here it would fix them for the rest of a session run with --ledger-malloc default
    applied = _run("from torchledger.measuring.machine import fix_malloc_thresholds as f; import json; "
                   "print(json.dumps(f()))")
    assert applied == (FIXED_MALLOC if GLIBC else None)
