"""All-reduce bandwidth against message size, as nccl-tests reports it (algorithm and bus bandwidth): NCCL across
the GPUs of this node when it has two or more, gloo across two CPU processes otherwise (the small profile)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.performance.conftest import Ledger
from benchmarks.verification.dist_worker import collective_sweep, rendezvous
from torchledger.formulas.distributed import bus_bandwidth


@pytest.mark.benchmark(group="collectives")
@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.cuda)])
def test_all_reduce_sweep(ledger: Ledger, ledger_size: str, backend: str, tmp_path: Path) -> None:
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL all-reduce needs 2 or more GPUs; this machine has {torch.cuda.device_count()}")
    world = torch.cuda.device_count() if backend == "nccl" else 2
    top = 2**30 if ledger_size == "full" else 2**22
    sizes = [2**k for k in range(10, top.bit_length(), 2)]

    def sweep() -> None:
        mp.start_processes(collective_sweep, args=(world, rendezvous(tmp_path), backend, sizes, str(tmp_path)),
                           nprocs=world, start_method="spawn", join=True)

    ledger.time(sweep, rounds=1, warmup=0, events=False, work={"bytes": sizes[-1], "sizes": len(sizes)},
                backend=backend, world_size=world)
    medians: dict[str, Any] = json.loads((tmp_path / "sweep.json").read_text())
    table = []
    for size, seconds in medians.items():
        algbw = int(size) / seconds
        table.append({"bytes": int(size), "seconds": seconds, "algbw": algbw, "busbw": bus_bandwidth(algbw, world)})
    peak_busbw = max(row["busbw"] for row in table)
    ledger.record(all_reduce=table, peak_busbw=peak_busbw)
    ledger.set_comparable("gbps", peak_busbw / 1e9)  # NCCL's bus bandwidth of the best message size


@pytest.mark.benchmark(group="collectives")
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("world", [1, 2])
def test_data_parallel_step_vs_world_size(ledger: Ledger, sizes: dict[str, Any], sharding: str, world: int,
                                          tmp_path: Path) -> None:
    """One GPT step per rank under DDP or FSDP2, launched with torchrun: NCCL over GPUs when there are enough,
    gloo over CPU processes otherwise. Weak scaling: each rank keeps the per-rank batch. The timed call is the whole
    launch (interpreter and torch start-up included); the step itself is ``step_median_s`` in extra_info."""
    import subprocess
    import sys

    if ledger.cuda and torch.cuda.device_count() < world:
        pytest.skip(f"world size {world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    script = Path(__file__).with_name("dist_step.py")
    out = tmp_path / "step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if not ledger.cuda else dict(os.environ)

    def launch() -> None:
        # --standalone: the launcher binds a free port itself (parallel test workers start launchers too)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(script), "--sharding", sharding, "--preset", sizes["gpt"], "--batch", str(sizes["gpt_batch"]),
               "--seq-len", str(sizes["gpt_seq"]), "--out", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")

    ledger.time(launch, rounds=1, warmup=0, events=False, work={
        "model": sizes["gpt"], "batch": sizes["gpt_batch"], "seq_len": sizes["gpt_seq"], "world_size": world},
        sharding=sharding, world_size=world)
    result = json.loads(out.read_text())
    ledger.record(step_median_s=result["median_s"], tokens_per_step=world * sizes["gpt_batch"] * sizes["gpt_seq"])
    ledger.set_comparable("samples_per_s", world * sizes["gpt_batch"] / result["median_s"])  # sequences, all ranks
