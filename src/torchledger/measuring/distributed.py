"""One rank of an N-rank sharded training job, simulated on this machine: PyTorch's own DDP and FSDP2
(``fully_shard``) code over a fake process group (``torch.testing._internal.distributed.fake_pg``: every collective
returns at once, nothing is sent) under ``FakeTensorMode`` (nothing is allocated), measured with the project's
storage tracker. So LLaMA-7B on 64 ranks is measured on a laptop, as PyTorch's own tests of
``torch.distributed._tools.fsdp2_mem_tracker`` do.

What runs, by sharding (the names of :data:`torchledger.formulas.distributed.SHARDINGS`):

- ``fsdp`` and ``zero3``: ``fully_shard`` on every block, then on the root (embeddings, final norm, head).
- ``fsdp-grad-op``: the same with ``reshard_after_forward=False`` (SHARD_GRAD_OP).
- ``hsdp``: ``fully_shard`` over a 2-D mesh (replicate across groups of ``shard_group_size`` ranks, shard within).
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` itself (its C++ reducer, its gradient buckets: 25 MiB
  each, the first 1 MiB, rebuilt in gradient order after the first step), ``gradient_as_bucket_view=False`` and the
  other defaults, ``no_sync()`` for all micro-batches but the last. Three things let it run on fake tensors:
  ``init_sync=False`` (the check that every rank has the same shapes, ``_verify_param_shape_across_processes`` in
  torch/distributed/utils.py, reads the parameters' data: "The tensor has a non-zero number of elements, but its
  data is not allocated yet"; on the meta device: "Tensor.item() cannot be called on meta tensors"); a comm hook
  that divides the bucket by N and all-reduces it as the default does, returning the bucket (the fake process
  group's work completes with None, which the reducer rejects: "expected the hook result is either a Tensor or a
  TensorList found None", torch/csrc/distributed/c10d/comm.cpp:114, real tensors alike); and real storage for the
  few int32 tensors with which the reducer broadcasts its rebuilt bucket assignment (``Reducer::rebuild_buckets``
  reads them back: "data is not allocated yet" from ``DistributedDataParallel._pre_forward``). The buckets exist
  from the start of the step: they are counted as ``buckets``. ``broadcast_buffers=False``: the reference models'
  buffers (rotary tables) are the same on every rank.
- ``zero1`` (here only, not through the CLI): ``torch.distributed.optim.ZeroRedundancyOptimizer`` over that DDP,
  whole tensors per rank (:mod:`torchledger.formulas.zero_redundancy` predicts it, not the flat ZeRO-1 model).

``zero2`` is not simulated: PyTorch has no implementation that shards gradients and optimizer state but keeps the
parameters whole (FSDP2 with ``reshard_after_forward=False`` shards them between steps: that is ``fsdp-grad-op``).
Other data-parallel paths of PyTorch, and why they are not ``ddp``: ``torch.distributed._composable.replicate``
wraps DistributedDataParallel (the same failures without the three measures above); the FSDP2-based ``replicate``
(torch.distributed._composable.replicate_with_fsdp: FSDP2's machinery with a Replicate placement, one all-reduce per
unit, no buckets) runs here unmodified but is not what ``DistributedDataParallel`` users run; DDP's python reducer
(``torch._dynamo.config.optimize_ddp = "python_reducer"``) still builds the C++ reducer and its buckets, then
all-reduces each gradient on its own from a post-accumulate-grad hook: the path compiled autograd traces, not eager
DDP's.

The recipe's ``MixedPrecisionPolicy`` is the one :func:`torchledger.formulas.distributed.fsdp_policy` names.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torchledger.formulas._validate import one_of, positive_int
from torchledger.formulas.distributed import SIMULATED_SHARDINGS, fsdp_policy, hybrid_groups
from torchledger.measuring.memory import MemoryMeasurement, StorageTracker, measure_cpu
from torchledger.measuring.training import MemoryCase, check_simulable

__all__ = ["SIMULATED", "CollectiveCounter", "ShardedMeasurement", "simulate_sharded"]

#: what :func:`simulate_sharded` runs: the CLI's shardings and ZeroRedundancyOptimizer as ``zero1``
SIMULATED = (*SIMULATED_SHARDINGS, "zero1")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CollectiveCounter(TorchDispatchMode):
    """Records the payload handed to each c10d collective, in bytes: an all-gather's gathered output, a
    reduce-scatter's full input, an all-reduce's or a broadcast's tensor (summed over the calls), and the number of
    calls."""

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
                    ("all_reduce", 0) if "allreduce" in name else (
                        ("broadcast", 0) if name.startswith("broadcast") else (None, 0))))
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
    one_of("sharding", sharding, SIMULATED)
    check_simulable(case.config.precision)
    if sharding == "hsdp":
        hybrid_groups(n, shard_group_size)
    if sharding in _REPLICATED:
        return _simulate_replicated(case, n, sharding)
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


_REPLICATED = ("ddp", "zero1")


class _HostIndices(TorchDispatchMode):
    """Real storage for the int32 tensors DDP's reducer makes (to broadcast its rebuilt bucket assignment and read
    it back): a few ints, under FakeTensorMode they would have no data to read."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.empty.memory_format and kwargs.get("dtype") is torch.int32:
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _BucketTracker(StorageTracker):
    """The storage tracker, with DDP's gradient buckets (alive before the step) counted from the start."""

    def __init__(self, buckets: list[torch.Tensor]) -> None:
        super().__init__()
        self._buckets = buckets
        self.add_category("buckets", lambda: self._buckets)

    def track(self, model: torch.nn.Module | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> StorageTracker:
        for bucket in self._buckets:
            self._add(bucket)
        return super().track(model, optimizer)


def _wrap_ddp(model: torch.nn.Module, step: Any, world_size: int) -> dict[int, torch.Tensor]:
    """``model`` under DistributedDataParallel, ``step`` running its forward through it (``no_sync`` for all
    micro-batches but the last); returns the buckets by index, as the comm hook sees them."""
    from torch.nn.parallel import DistributedDataParallel

    buckets: dict[int, torch.Tensor] = {}

    def allreduce(_state, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations at run time
        # DDP's default (divide by the world size, all-reduce in place); the fake group's work completes with None,
        # a real group's with the reduced bucket, which is what the reducer copies back
        buffer = bucket.buffer()
        buckets[bucket.index()] = buffer
        buffer.div_(world_size)
        return dist.all_reduce(buffer, async_op=True).get_future().then(lambda _fut: buffer)

    # no buffer sync in the forward (``broadcast_buffers``, renamed ``forward_sync_buffers`` in PyTorch 2.13)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    options: dict[str, Any] = {sync: False}
    ddp = DistributedDataParallel(model, init_sync=False, **options)
    ddp.register_comm_hook(None, allreduce)
    loss_fn, accum = step.loss_fn, step.config.grad_accum
    calls = [0]

    def through_ddp(_model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> Any:
        ddp.require_backward_grad_sync = calls[0] % accum == accum - 1  # what ``ddp.no_sync()`` sets
        calls[0] += 1
        return loss_fn(ddp, batch)

    step.loss_fn = through_ddp
    return buckets


def _simulate_replicated(case: MemoryCase, n: int, sharding: str) -> ShardedMeasurement:
    """``ddp`` (DistributedDataParallel) or ``zero1`` (ZeroRedundancyOptimizer over it), simulated: two warm-up
    steps (the reducer rebuilds its buckets at the second), then the measured one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchledger.workloads.train_step import make_optimizer

    config = case.config
    counter = CollectiveCounter()
    with fake_process_group(n), FakeTensorMode(allow_non_fake_inputs=True), _HostIndices():
        model, step, batches = case.build("cpu")
        buckets = _wrap_ddp(model, step, n)
        local = step.optimizer  # the optimizer whose state the tracker follows
        if sharding == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            # the local optimizer of each rank's tensors is the case's own (class, implementation, momentum)
            zero = ZeroRedundancyOptimizer(model.parameters(), lr=config.lr,
                                           optimizer_class=lambda params, **_: make_optimizer(params, config))  # type: ignore[arg-type]
            step.optimizer, local = zero, zero.optim
        step.step(batches)
        buckets.clear()
        step.step(batches)  # the rebuilt buckets
        counter.payload.clear()
        counter.calls.clear()
        tracker = _BucketTracker(list(buckets.values()))
        with counter:
            memory = measure_cpu(lambda: step.step(batches), model, local, device="simulated", tracker=tracker)
    return ShardedMeasurement(memory, n, sharding, dict(counter.payload), dict(counter.calls))
