"""One rank of the data-parallel step-time benchmark, launched by torchrun (it reads RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT from the environment torchrun sets):

    torchrun --standalone --nproc-per-node 2 benchmarks/performance/dist_step.py --sharding fsdp --out step.json

Trains the reference GPT workload under DDP or FSDP2 and writes rank 0's median step time to ``--out``.
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

from torchledger.measuring.training import MemoryCase
from torchledger.workloads.train_step import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharding", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--preset", default="gpt-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    try:
        case = MemoryCase(args.preset, args.batch, TrainConfig(), seq_len=args.seq_len)
        model, step, batches = case.build(device)
        if args.sharding == "ddp":
            step.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            step.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        times = []
        for i in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            step.step(batches)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first step creates the optimizer state
                times.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps({"median_s": sorted(times)[len(times) // 2],
                                                  "world_size": dist.get_world_size(), "device": device}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
