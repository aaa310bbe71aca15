"""One training configuration, costed: what ``torchledger estimate`` prints, assembled from the other formulas."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ._validate import one_of, positive_int
from .device import cublas_workspace_bytes
from .distributed import (
    SHARDINGS,
    ShardedStates,
    collective_payloads,
    communication_bytes,
    get_interconnect,
    hybrid_groups,
    sharded_state_bytes,
    step_communication_seconds,
)
from .flops import ModelFlops, model_flops
from .hardware import CUDA_CONTEXT_BYTES, DeviceSpec, get_device
from .memory import dtype_bytes, get_recipe, kv_cache_bytes
from .peak import TrainPeak, train_peak_bytes
from .sharded_peak import RankPeak, rank_peak_bytes
from .specs import ModelSpec, check_seq_len, n_params, param_counts
from .steptime import StepTime
from .timeline import StepConfig
from .timeline_hf import HFProfile, hf_train_peak_bytes
from .vocabulary import OPTIMIZERS, STEP_CHECKPOINTING

# shardings whose collectives run every micro-batch (FSDP2 gathers for each forward and backward, and
# reduce-scatters each micro-batch's gradients by default)
_PER_MICRO_BATCH = ("zero3", "fsdp", "fsdp-grad-op", "hsdp")


@dataclass(frozen=True)
class Fit:
    """Whether a step's predicted peak fits one GPU of the hardware table, and the largest micro-batch that does.

    ``capacity`` is the memory the device offers (the driver's total where measured, else the datasheet's); of it,
    ``context`` (the CUDA context, :data:`torchledger.formulas.hardware.CUDA_CONTEXT_BYTES`) and ``workspaces``
    (two cuBLAS workspaces: the caller's thread and autograd's, :mod:`torchledger.formulas.device`) are reserved,
    and the rest, ``usable``, is what the step's peak must fit in."""

    gpu: str
    capacity: int
    capacity_source: str
    context: int
    workspaces: int
    peak: int
    seq_len: int
    max_batch: int

    @property
    def usable(self) -> int:
        return self.capacity - self.context - self.workspaces

    @property
    def headroom(self) -> int:
        """Usable bytes left at the peak; negative: the shortfall."""
        return self.usable - self.peak

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "capacity_bytes": self.capacity,
            "fits": self.fits,
            "headroom_bytes": self.headroom,
            "max_batch_size": self.max_batch,
            "reserved_bytes": {"cuda_context": self.context, "cublas_workspaces": self.workspaces},
        }


def largest_fitting(peak_at: Callable[[int], int], usable: int) -> int:
    """The largest ``n >= 1`` with ``peak_at(n) <= usable`` for a ``peak_at`` that grows with ``n`` (0 when even
    ``peak_at(1)`` exceeds ``usable``): doubling until it does not fit, then bisecting, ``2 log2(n)`` calls."""
    if peak_at(1) > usable:
        return 0
    fits, over = 1, 2
    while peak_at(over) <= usable:
        if over > 2**62:
            raise ValueError(f"usable={usable!r}: the peak does not grow with the batch")
        fits, over = over, 2 * over
    while over - fits > 1:
        mid = (fits + over) // 2
        if peak_at(mid) <= usable:
            fits = mid
        else:
            over = mid
    return fits


def fit_on(e: Estimate, gpu: str | DeviceSpec) -> Fit:
    """Size the step of ``e`` (predicted with the ``cuda`` terms) for one GPU of the hardware table: the headroom
    of its peak, and the largest micro-batch of the same sequence length, options and ranks that fits."""
    if e.device != "cuda":
        raise ValueError(f"device={e.device!r}: sizing for a GPU takes the prediction with the cuda terms")
    dev = gpu if isinstance(gpu, DeviceSpec) else get_device(gpu)
    workspaces = 2 * cublas_workspace_bytes(dev.compute_capability or (1, 0))
    fit = Fit(gpu=dev.name, capacity=dev.capacity_bytes, capacity_source=dev.capacity_source,
              context=CUDA_CONTEXT_BYTES, workspaces=workspaces, peak=e.peak_per_rank, seq_len=e.seq_len,
              max_batch=0)

    def peak_at(batch: int) -> int:
        return e.peak_per_rank if batch == e.batch else e.at_batch(batch).peak_per_rank

    return replace(fit, max_batch=largest_fitting(peak_at, fit.usable))


@dataclass(frozen=True)
class Estimate:
    """FLOPs and bytes of one optimizer step of ``grad_accum`` micro-batches of ``batch`` x ``seq_len`` tokens."""

    spec: ModelSpec
    batch: int
    seq_len: int
    precision: str
    optimizer: str
    checkpointing: str
    grad_accum: int
    flops: ModelFlops
    peak: TrainPeak
    kv_cache: int
    world_size: int = 1
    sharding: str = "ddp"
    sharded: ShardedStates | None = None
    communication: dict[str, int] | None = None
    shard_group_size: int | None = None  # hsdp: ranks per shard group
    interconnect: str | None = None  # the link communication_seconds times the collectives on
    inter_node: str | None = None  # hsdp: the link of the all-reduce across shard groups (default interconnect)
    optimizer_impl: str = "foreach"
    device: str = "cuda"
    fit: Fit | None = None
    time: StepTime | None = None  # the predicted step time (formulas.planner.estimate_time), where asked for
    implementation: HFProfile | None = None  # what transformers runs (formulas.timeline_hf); None: the reference

    @property
    def peak_per_rank(self) -> int:
        """The step's peak on one rank (the largest of :attr:`phases_per_rank`)."""
        return max(self.phases_per_rank.values())

    def at_batch(self, batch: int) -> Estimate:
        """The same step at micro-batch ``batch`` (no GPU fit)."""
        return estimate(self.spec, batch, self.seq_len, precision=self.precision, optimizer=self.optimizer,
                        checkpointing=self.checkpointing, grad_accum=self.grad_accum, world_size=self.world_size,
                        sharding=self.sharding, optimizer_impl=self.optimizer_impl, device=self.device,
                        shard_group_size=self.shard_group_size, interconnect=self.interconnect,
                        implementation=self.implementation, inter_node=self.inter_node)

    @functools.cached_property
    def rank_peak(self) -> RankPeak | None:
        """One rank's step under the sharding (:mod:`torchledger.formulas.sharded_peak`); None for one rank."""
        if self.sharded is None:
            return None
        config = StepConfig(self.precision, self.optimizer, self.optimizer_impl, self.checkpointing,
                            self.grad_accum)
        return rank_peak_bytes(self.spec, self.batch, self.seq_len, config, sharding=self.sharding,
                               world_size=self.world_size, shard_group_size=self.shard_group_size,
                               device=self.device, implementation=self.implementation)

    @property
    def phases_per_rank(self) -> dict[str, int]:
        """The step's phases on one rank: the single-device timeline, moment by moment, with the rank's share of
        the model states, the units gathered, the gradients being reduced and DDP's buckets
        (:func:`torchledger.formulas.sharded_peak.rank_peak_bytes`)."""
        rank = self.rank_peak
        return dict(self.peak.phases) if rank is None else dict(rank.phases)

    def collective_calls(self) -> dict[str, int]:
        """Calls of each collective per step: DDP's 25 MiB gradient buckets (``bucket_cap_mb``); ZeRO's and FSDP's
        one per unit (a block, the root), gathered twice per step under FULL_SHARD and once under SHARD_GRAD_OP."""
        if self.world_size == 1 or not self.communication:
            return {}
        units = self.spec.n_layers + 1
        r = get_recipe(self.precision)
        if self.sharding == "ddp":
            return {"all_reduce": max(1, -(-n_params(self.spec) * dtype_bytes(r.grad_dtype) // (25 * 2**20)))}
        calls = {"all_gather": units, "reduce_scatter": units, "all_reduce": units}
        if self.sharding in ("zero3", "fsdp", "hsdp"):
            calls["all_gather"] = 2 * units - 1
        per_step = self.grad_accum if self.sharding in _PER_MICRO_BATCH else 1
        return {k: calls[k] * per_step for k in self.communication}

    def communication_seconds(self) -> dict[str, float]:
        """Alpha-beta seconds of each collective of one optimizer step on :attr:`interconnect` (empty without one),
        from :func:`torchledger.formulas.distributed.step_communication_seconds`, plus ``total``: the sum, as if
        nothing overlapped (what hides behind compute is the step-time model's). FSDP2 gathers and reduce-scatters
        every micro-batch; DDP and ZeRO-1/2 are taken to reduce once per step (``no_sync`` over the others)."""
        if self.interconnect is None or not self.communication:
            return {}
        n = n_params(self.spec)
        payloads = collective_payloads(n, recipe=self.precision, world_size=self.world_size, sharding=self.sharding,
                                       root_params=n - param_counts(self.spec).layers,
                                       shard_group_size=self.shard_group_size)
        per_step = self.grad_accum if self.sharding in _PER_MICRO_BATCH else 1
        payloads = {k: v * per_step for k, v in payloads.items()}
        out = step_communication_seconds(payloads, sharding=self.sharding, world_size=self.world_size,
                                         interconnect=self.interconnect, calls=self.collective_calls(),
                                         shard_group_size=self.shard_group_size, inter_node=self.inter_node)
        out["total"] = sum(out.values())
        return out

    @property
    def train_step_flops(self) -> int:
        return self.grad_accum * self.flops.train

    @property
    def model_flops_per_token(self) -> float:
        """Forward and backward FLOPs per token without the recompute: the model FLOPs MFU counts (PaLM, App. B);
        the training FLOPs per token with the recompute are the hardware FLOPs that HFU counts."""
        return (self.flops.forward + self.flops.backward) / self.flops.tokens

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` contract: integers exact, bytes in bytes (keys are stable; new ones are only added). With a
        GPU fit, also ``gpu``, ``capacity_bytes``, ``fits``, ``headroom_bytes``, ``max_batch_size`` and
        ``reserved_bytes``."""
        states = self.sharded.states if self.sharded is not None else self.peak.states
        acts = self.peak.activations
        out = {
            "model": self.spec.name,
            "batch_size": self.batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "optimizer_impl": self.optimizer_impl,
            "device": self.device,
            "checkpointing": self.checkpointing,
            "grad_accum": self.grad_accum,
            "params": n_params(self.spec),
            "flops": {
                "forward": self.flops.forward,
                "backward": self.flops.backward,
                "recompute": self.flops.recompute,
                "train_step": self.train_step_flops,
                "per_token_train": self.train_step_flops / (self.grad_accum * self.flops.tokens),
                # MFU's numerator (PaLM, App. B: the model's FLOPs, no recompute) and HFU's (recompute included)
                "per_token_model": self.model_flops_per_token,
                "per_token_hardware": self.train_step_flops / (self.grad_accum * self.flops.tokens),
            },
            "memory": {
                "params": states.params,
                "grads": states.grads,
                "master_params": states.master_params,
                "optimizer": states.optimizer,
                "activations": acts.saved,
                "kv_cache": self.kv_cache,
                "peak_train": max(self.phases_per_rank.values()),
                "peak_phase": max(self.phases_per_rank, key=lambda k: self.phases_per_rank[k]),
                "phases": self.phases_per_rank,
                # the op at the single-device peak (per rank, the phase's figures are adjusted, not re-walked)
                "peak_moment": self.peak.moment,
                "ddp_buckets": self.sharded.buckets if self.sharded is not None else 0,
            },
            "world_size": self.world_size,
            "sharding": self.sharding,
            "communication": dict(self.communication or {}),
            # whose layers the memory walks: "reference" or "hf:<model_type>" (formulas.timeline_hf)
            "implementation": "reference" if self.implementation is None else f"hf:{self.implementation.model_type}",
        }
        if self.sharded is not None:
            rank = self.rank_peak
            assert rank is not None
            memory: dict[str, Any] = out["memory"]  # type: ignore[assignment]
            memory["peak_moment_per_rank"] = rank.moment
            out["shard_group_size"] = self.shard_group_size
            seconds = self.communication_seconds()
            if seconds:
                link = get_interconnect(str(self.interconnect))
                out["communication_time"] = {
                    "interconnect": self.interconnect, "inter_node": self.inter_node, "link": link.name,
                    "bandwidth_bytes_per_s": link.bandwidth,
                    "bandwidth_source": link.bandwidth_source, "latency_source": link.latency_source,
                    "calls": self.collective_calls(), "seconds": seconds,
                }
        if self.fit is not None:
            out.update(self.fit.to_dict())
        if self.time is not None:
            out["time"] = self.time.to_dict()
        return out


def estimate(
    spec: ModelSpec,
    batch: int,
    seq_len: int,
    *,
    precision: str = "32-true",
    optimizer: str = "adamw",
    checkpointing: str = "none",
    grad_accum: int = 1,
    world_size: int = 1,
    sharding: str = "ddp",
    optimizer_impl: str = "foreach",
    device: str = "cuda",
    gpu: str | DeviceSpec | None = None,
    shard_group_size: int | None = None,
    interconnect: str | None = None,
    implementation: HFProfile | None = None,
    inter_node: str | None = None,
) -> Estimate:
    """Cost one optimizer step of ``spec``: FLOPs (forward, backward, recompute) and memory (states, peak).

    ``batch`` is the micro-batch; ``grad_accum`` micro-batches make one step. The KV cache is for inference at the
    same batch and sequence length, in the recipe's compute dtype. With ``world_size > 1`` the memory figures are
    per rank under ``sharding`` and ``communication`` gives the bytes each rank sends per step, by collective.
    ``optimizer_impl`` is the optimizer's implementation (``foreach``, ``for-loop``, ``fused``: their temporaries
    differ); ``device`` the device whose terms the peak includes (:mod:`torchledger.formulas.device`; ``cuda`` by
    default, the device people size for). ``gpu`` (a name of the hardware table) adds :class:`Fit`: whether the
    peak fits that device and the largest micro-batch that does. ``shard_group_size``: the ranks of a shard group
    under ``hsdp``. ``interconnect`` (a name of :data:`torchledger.formulas.distributed.INTERCONNECTS`) adds the
    alpha-beta seconds of each collective per step (:meth:`Estimate.communication_seconds`). ``implementation``
    (a :class:`torchledger.formulas.timeline_hf.HFProfile`) walks the memory of the step as Hugging Face
    transformers runs the model (:func:`torchledger.formulas.timeline_hf.hf_train_peak_bytes`) instead of the
    reference transformer's. NB: per rank (``world_size > 1``) the walk is the reference's.
    """
    positive_int("batch_size", batch)
    check_seq_len(spec, seq_len)
    positive_int("grad_accum", grad_accum)
    recipe = get_recipe(precision)
    one_of("optimizer", optimizer, OPTIMIZERS)
    one_of("checkpointing", checkpointing, STEP_CHECKPOINTING)
    positive_int("world_size", world_size)
    one_of("sharding", sharding, SHARDINGS)
    n = n_params(spec)
    if sharding == "hsdp":
        hybrid_groups(world_size, shard_group_size)
    for link in (interconnect, inter_node):
        if link is not None:
            get_interconnect(link)
    sharded = communication = None
    if world_size > 1:
        sharded = sharded_state_bytes(n, recipe=precision, optimizer=optimizer, world_size=world_size,
                                      sharding=sharding, shard_group_size=shard_group_size)
        counts = param_counts(spec)
        # one FSDP unit per block; the root unit holds the embeddings, the final norm and the head
        communication = communication_bytes(n, recipe=precision, world_size=world_size, sharding=sharding,
                                            root_params=n - counts.layers, shard_group_size=shard_group_size)
    result = Estimate(
        spec=spec, batch=batch, seq_len=seq_len, precision=precision, optimizer=optimizer,
        checkpointing=checkpointing, grad_accum=grad_accum,
        flops=model_flops(spec, batch, seq_len, checkpointing=checkpointing),
        peak=train_peak_bytes(spec, batch, seq_len, recipe=precision, optimizer=optimizer,
                              checkpointing=checkpointing, grad_accum=grad_accum, optimizer_impl=optimizer_impl,
                              device=device) if implementation is None else
        hf_train_peak_bytes(spec, implementation, batch, seq_len, recipe=precision, optimizer=optimizer,
                            checkpointing=checkpointing, grad_accum=grad_accum, optimizer_impl=optimizer_impl,
                            device=device),
        kv_cache=kv_cache_bytes(spec, batch, seq_len, recipe.compute_dtype),
        world_size=world_size, sharding=sharding, sharded=sharded, communication=communication,
        optimizer_impl=optimizer_impl, device=device, shard_group_size=shard_group_size, interconnect=interconnect,
        implementation=implementation, inter_node=inter_node,
    )
    return result if gpu is None else replace(result, fit=fit_on(result, gpu))
