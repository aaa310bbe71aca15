"""One rank of the 2-process gloo checks in ``test_distributed.py``: train one step of a reference workload under
DDP or FSDP2 (``fully_shard``), and write what it measured to ``<out>/rank<r>.json``: the bytes each collective moved
(gradient buckets through a DDP communication hook; FSDP2's c10d all-gathers and reduce-scatters through a dispatch
mode), the rank's model-state bytes, and its peak memory (the project's storage tracker).

No ``from __future__ import annotations`` here: DDP checks the communication hook's annotations as objects."""

import datetime
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torchledger.measuring.memory import StorageTracker
from torchledger.measuring.training import MemoryCase
from torchledger.workloads.train_step import TrainConfig


class _CollectiveSizes(TorchDispatchMode):
    """Records the payload of c10d all-gathers (output size) and reduce-scatters (input size), in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if func.namespace != "c10d":  # e.g. fsdp.all_gather_copy_in only fills the send buffer
            return func(*args, **(kwargs or {}))
        key = "all_gather" if ("allgather" in name or "all_gather" in name) else (
            "reduce_scatter" if "reduce_scatter" in name else ("all_reduce" if "allreduce" in name else None))
        if key is not None:
            # all-gather: the gathered output (first argument); reduce-scatter: the full input (second argument);
            # all-reduce: the tensor (first argument)
            tensors = tree_leaves(args[1] if key == "reduce_scatter" else args[0])
            payload = [t for t in tensors if isinstance(t, torch.Tensor)]
            self.sizes[key] = self.sizes.get(key, 0) + sum(t.numel() * t.element_size() for t in payload)
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    grads = sum(local(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt = sum(local(v).numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
              if isinstance(v, torch.Tensor) and k != "step")
    return {"params": params, "grads": grads, "optimizer": opt}


def rendezvous(folder: str | Path) -> str:
    """The ranks meet in a file under ``folder`` (a test's own temporary folder), not at a TCP port: a port found
    free and bound only once the ranks have started can be taken meanwhile by another test worker's ranks. A new
    file each launch: one a finished launch left behind would hold its ranks' keys."""
    import uuid

    return "file://" + str(Path(folder).resolve() / f"rendezvous-{uuid.uuid4().hex}")


def run_rank(rank: int, world: int, init_method: str, kind: str, workload: str, out: str,
             checkpointing: str = "none", shard_group_size: int = 0) -> None:
    """``kind``: ``ddp``, ``fsdp`` (FULL_SHARD), ``fsdp-grad-op`` (SHARD_GRAD_OP) or ``hsdp`` (a 2-D mesh of
    ``world // shard_group_size`` replicas of ``shard_group_size`` shards)."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        case = MemoryCase(workload, 8, TrainConfig(optimizer="adamw", optimizer_impl="foreach",
                                                   checkpointing=checkpointing),
                          seq_len=64 if workload != "mlp" else 0)
        model, step, batches = case.build("cpu")
        sizes: dict[str, int] = {}
        if kind == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model)

            def counting_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
                buffer = bucket.buffer()
                sizes["all_reduce"] = sizes.get("all_reduce", 0) + buffer.numel() * buffer.element_size()
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
            step.model = ddp
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world // shard_group_size, shard_group_size),
                                    mesh_dim_names=("replicate", "shard")) if kind == "hsdp" else None
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            blocks = getattr(model, "blocks", None) or linears  # one unit per block (transformer) or layer (MLP)
            for block in blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=kind != "fsdp-grad-op")
            fully_shard(model, mesh=mesh)
            step.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        step.step(batches)  # optimizer state exists from here on
        sizes.clear()
        spy = _CollectiveSizes()
        tracker = StorageTracker().track(model, step.optimizer)
        with tracker, spy:
            step.step(batches)
        # DDP's buckets are counted by its hook (whose all-reduce the spy sees too)
        sizes.update({k: v for k, v in spy.sizes.items() if kind != "ddp" or k != "all_reduce"})
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "collective_payload": sizes, "collective_calls": spy.calls, "peak": tracker.peak,
            "peak_breakdown": tracker.peak_breakdown,
            "states_after_step": _state_bytes(model, step.optimizer),
        }))
    finally:
        dist.destroy_process_group()


def die_on_rank_one(rank: int, world: int, init_method: str) -> None:
    """Rank 1 fails after joining the group; rank 0 is busy elsewhere (not in a collective, whose own failure could
    otherwise be reported first) and must be ended by the launcher, not waited for."""
    import time

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    time.sleep(600)


def collective_sweep(rank: int, world: int, init_method: str, backend: str, sizes: list[int], out: str) -> None:
    """Time all-reduce over ``sizes`` (bytes, fp32 tensors): median of 5 after 2 warm-ups; rank 0 writes the result."""
    import time

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    results = {}
    try:
        for size in sizes:
            t = torch.ones(size // 4, device=device)
            times = []
            for i in range(7):
                dist.barrier()
                if backend == "nccl":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                dist.all_reduce(t)
                if backend == "nccl":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            results[size] = sorted(times)[len(times) // 2]
        if rank == 0:
            Path(out, "sweep.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
