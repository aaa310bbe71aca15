"""One rank of an N-rank sharded training job, simulated on this machine: PyTorch's own DDP and FSDP2
(``fully_shard``) code over a fake process group (``torch.testing._internal.distributed.fake_pg``: every collective
returns at once, nothing is sent) under ``FakeTensorMode`` (nothing is allocated), measured with the project's
storage tracker. So LLaMA-7B on 64 ranks is measured on a laptop, as PyTorch's own tests of
``torch.distributed._tools.fsdp2_mem_tracker`` do.

What runs, by sharding (the names of :data:`torchledger.formulas.distributed.SHARDINGS`):

- ``fsdp`` and ``zero3``: ``fully_shard`` on every block, then on the root (embeddings, final norm, head).
- ``fsdp-grad-op``: the same with ``reshard_after_forward=False`` (SHARD_GRAD_OP).
- ``hsdp``: ``fully_shard`` over a 2-D mesh (replicate across groups of ``shard_group_size`` ranks, shard within).

``zero1`` and ``zero2`` are not simulated: PyTorch has no flat-sharded implementation of them
(``ZeroRedundancyOptimizer`` assigns whole tensors to ranks). Nor is ``ddp``: its C++ reducer checks and allocates
real storage (``_verify_params_across_processes`` fails on fake tensors); two real gloo ranks check it instead.

The recipe's ``MixedPrecisionPolicy`` is the one :func:`torchledger.formulas.distributed.fsdp_policy` names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torchledger.formulas._validate import one_of, positive_int
from torchledger.formulas.distributed import SIMULATED_SHARDINGS, fsdp_policy, hybrid_groups
from torchledger.measuring.memory import MemoryMeasurement, measure_cpu
from torchledger.measuring.training import MemoryCase, check_simulable

__all__ = ["CollectiveCounter", "ShardedMeasurement", "simulate_sharded"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CollectiveCounter(TorchDispatchMode):
    """Records the payload handed to each c10d collective, in bytes: an all-gather's gathered output, a
    reduce-scatter's full input, an all-reduce's tensor (summed over the calls), and the number of calls."""

    def __init__(self) -> None:
        super().__init__()
        self.payload: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add(self, key: str, nbytes: int) -> None:
        self.payload[key] = self.payload.get(key, 0) + nbytes
        self.calls[key] = self.calls.get(key, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func.namespace == "c10d":  # e.g. fsdp.all_gather_copy_in only fills the send buffer: not a collective
            name = func.overloadpacket.__name__
            key, which = ("all_gather", 0) if ("allgather" in name or "all_gather" in name) else (
                ("reduce_scatter", 1) if "reduce_scatter" in name else (
                    ("all_reduce", 0) if "allreduce" in name else (None, 0)))
            if key is not None:
                tensors = [t for t in tree_leaves(args[which]) if isinstance(t, torch.Tensor)]
                self.add(key, sum(t.numel() * t.element_size() for t in tensors))
        return func(*args, **(kwargs or {}))


@dataclass
class ShardedMeasurement:
    """One simulated rank's steady-state step: its memory and the payload of each kind of collective it ran."""

    memory: MemoryMeasurement
    world_size: int
    sharding: str
    collective_payload: dict[str, int] = field(default_factory=dict)
    collective_calls: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """A fake process group of ``world_size`` ranks, this process being ``rank``; destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(model: torch.nn.Module, sharding: str, world_size: int, shard_group_size: int | None,
           precision: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh is built outside FakeTensorMode (it reads its rank map)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        if sharding == "hsdp":
            replicas, group = hybrid_groups(world_size, shard_group_size)
            mesh = init_device_mesh("cpu", (replicas, group), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world_size,))
    param, reduce = fsdp_policy(precision)
    policy = MixedPrecisionPolicy(param_dtype=_TORCH_DTYPES[param], reduce_dtype=_TORCH_DTYPES[reduce])
    keep = sharding == "fsdp-grad-op"
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("the simulated sharding needs a transformer workload (one unit per block)")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=not keep, mp_policy=policy)
    # the root as users wrap it: FSDP2 then keeps its parameters gathered from the forward to the backward
    fully_shard(model, mesh=mesh, mp_policy=policy)


def simulate_sharded(case: MemoryCase, *, world_size: int, sharding: str,
                     shard_group_size: int | None = None) -> ShardedMeasurement:
    """Rank 0 of a ``world_size``-rank job training ``case`` (its micro-batch per rank) under ``sharding``,
    simulated: one warm-up step makes the optimizer state, the next is measured."""
    n = positive_int("world_size", world_size)
    one_of("sharding", sharding, SIMULATED_SHARDINGS)
    check_simulable(case.config.precision)
    if sharding == "hsdp":
        hybrid_groups(n, shard_group_size)
    if case.config.optimizer_impl == "fused" and case.config.optimizer in ("sgd", "momentum"):
        raise ValueError(f"optimizer_impl='fused' with optimizer={case.config.optimizer!r}: DTensor has no sharding "
                         "rule for aten._fused_sgd_")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchledger.workloads.train_step import make_optimizer

    counter = CollectiveCounter()
    with fake_process_group(n), FakeTensorMode(allow_non_fake_inputs=True):
        model, step, batches = case.build("cpu")
        _shard(model, sharding, n, shard_group_size, case.config.precision)
        step.optimizer = make_optimizer(model.parameters(), case.config)
        step.step(batches)  # optimizer state exists from here on
        counter.payload.clear()
        counter.calls.clear()
        with counter:
            memory = measure_cpu(lambda: step.step(batches), model, step.optimizer, device="simulated")
    return ShardedMeasurement(memory, n, sharding, dict(counter.payload), dict(counter.calls))
