"""The collectives a sharded step runs, timed on every rank of a torchrun job, beside the alpha-beta prediction.

One node (NCCL across its GPUs; gloo across CPU processes where there are none):

    torchrun --standalone --nproc-per-node 8 benchmarks/performance/collectives_torchrun.py \\
        --interconnect nvlink4 --out collectives.json

Several nodes (one torchrun per node, e.g. under SLURM; see docs/distributed.md):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        benchmarks/performance/collectives_torchrun.py --interconnect ib-ndr400 --out collectives.json

For each collective (all-reduce, all-gather, reduce-scatter) and payload (the convention of
``torchledger.formulas.distributed.collective_payloads``: the gathered output, the full input), rank 0 writes the
median time of ``--iters`` calls after ``--warmup``, the algorithm bandwidth (payload / time), the bus bandwidth as
nccl-tests reports it, and ``collective_seconds`` on ``--interconnect``.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from torchledger.formulas.distributed import INTERCONNECTS, bus_bandwidth, collective_seconds


def _call(name: str, payload: torch.Tensor, shard: torch.Tensor) -> None:
    if name == "all_reduce":
        dist.all_reduce(payload)
    elif name == "all_gather":
        dist.all_gather_into_tensor(payload, shard)
    else:
        dist.reduce_scatter_tensor(shard, payload)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interconnect", choices=list(INTERCONNECTS), default="nvlink4")
    parser.add_argument("--min-bytes", type=int, default=2**20)
    parser.add_argument("--max-bytes", type=int, default=2**30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    world = dist.get_world_size()
    results = []
    try:
        size = args.min_bytes
        while size <= args.max_bytes:
            elements = max(world, size // 4 // world * world)  # fp32, a multiple of the world size
            payload = torch.ones(elements, device=device)
            shard = torch.ones(elements // world, device=device)
            for name in ("all_reduce", "all_gather", "reduce_scatter"):
                times = []
                for i in range(args.warmup + args.iters):
                    dist.barrier()
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    _call(name, payload, shard)
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
                median = sorted(times)[len(times) // 2]
                nbytes = elements * 4
                results.append({
                    "collective": name, "payload_bytes": nbytes, "seconds": median,
                    "algorithm_bandwidth": nbytes / median,
                    "bus_bandwidth": bus_bandwidth(nbytes / median, world, name),
                    "predicted_seconds": collective_seconds(name, nbytes, world, args.interconnect),
                })
            size *= 4
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps({
                "world_size": world, "backend": dist.get_backend(), "interconnect": args.interconnect,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu", "results": results}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
