"""One training configuration, costed: what ``torchledger estimate`` prints, assembled from the other formulas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ._validate import one_of, positive_int
from .activations import logprob_bytes
from .device import cublas_workspace_bytes
from .distributed import (
    SHARDINGS,
    ShardedStates,
    communication_bytes,
    fsdp_step_phases,
    sharded_state_bytes,
)
from .flops import ModelFlops, model_flops
from .hardware import CUDA_CONTEXT_BYTES, DeviceSpec, get_device
from .memory import dtype_bytes, get_recipe, kv_cache_bytes
from .peak import TrainPeak, train_peak_bytes
from .specs import ModelSpec, check_seq_len, n_params, param_counts
from .vocabulary import OPTIMIZERS, STEP_CHECKPOINTING


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
    optimizer_impl: str = "foreach"
    device: str = "cuda"
    fit: Fit | None = None

    @property
    def peak_per_rank(self) -> int:
        """The step's peak on one rank (the largest of :attr:`phases_per_rank`)."""
        return max(self.phases_per_rank.values())

    def at_batch(self, batch: int) -> Estimate:
        """The same step at micro-batch ``batch`` (no GPU fit)."""
        return estimate(self.spec, batch, self.seq_len, precision=self.precision, optimizer=self.optimizer,
                        checkpointing=self.checkpointing, grad_accum=self.grad_accum, world_size=self.world_size,
                        sharding=self.sharding, optimizer_impl=self.optimizer_impl, device=self.device)

    @property
    def phases_per_rank(self) -> dict[str, int]:
        """The step's phases on one rank: each rank's share of the model states in place of the whole, DDP's
        gradient buckets added, one block's parameters gathered under ``zero3``/``fsdp``, and the optimizer's
        temporaries shrunk with its sharded state. NB: activations and their transients as on one device."""
        phases = dict(self.peak.phases)
        if self.sharded is None:
            return phases
        full, mine = self.peak.states, self.sharded.states
        persistent = full.params + full.master_params + full.optimizer
        delta = mine.params + mine.master_params + mine.optimizer - persistent + self.sharded.buckets
        if self.sharding in ("zero3", "fsdp", "fsdp-grad-op"):
            delta += param_counts(self.spec).per_layer * dtype_bytes(get_recipe(self.precision).param_dtype)
        temps = phases["optimizer"] - persistent - full.grads - self.peak.buffers
        if self.sharding in ("zero3", "fsdp"):
            # one unit per block, the embeddings, final norm and head in the root unit
            counts, acts, r = param_counts(self.spec), self.peak.activations, get_recipe(self.precision)
            fsdp = fsdp_step_phases(
                counts.total, [counts.per_layer] * self.spec.n_layers, counts.total - counts.layers,
                saved=acts.saved, saved_per_unit=acts.per_layer, logits=acts.logits,
                head_grads=2 * self.batch * self.seq_len * self.spec.vocab_size * logprob_bytes(r),
                optimizer_temps=temps, recipe=self.precision, optimizer=self.optimizer, world_size=self.world_size,
            )
            phases.update(fsdp)
            phases["forward"] += delta - self.sharded.buckets
            return phases
        if self.sharding != "ddp":
            phases["optimizer"] += -(-temps // self.world_size) - temps
        phases["optimizer"] += mine.grads - full.grads
        if self.grad_accum > 1:
            phases["forward"] += mine.grads - full.grads
            phases["backward"] += mine.grads - full.grads
        return {k: v + delta for k, v in phases.items()}

    @property
    def train_step_flops(self) -> int:
        return self.grad_accum * self.flops.train

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
        }
        if self.fit is not None:
            out.update(self.fit.to_dict())
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
) -> Estimate:
    """Cost one optimizer step of ``spec``: FLOPs (forward, backward, recompute) and memory (states, peak).

    ``batch`` is the micro-batch; ``grad_accum`` micro-batches make one step. The KV cache is for inference at the
    same batch and sequence length, in the recipe's compute dtype. With ``world_size > 1`` the memory figures are
    per rank under ``sharding`` and ``communication`` gives the bytes each rank sends per step, by collective.
    ``optimizer_impl`` is the optimizer's implementation (``foreach``, ``for-loop``, ``fused``: their temporaries
    differ); ``device`` the device whose terms the peak includes (:mod:`torchledger.formulas.device`; ``cuda`` by
    default, the device people size for). ``gpu`` (a name of the hardware table) adds :class:`Fit`: whether the
    peak fits that device and the largest micro-batch that does.
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
    sharded = communication = None
    if world_size > 1:
        sharded = sharded_state_bytes(n, recipe=precision, optimizer=optimizer, world_size=world_size,
                                      sharding=sharding)
        counts = param_counts(spec)
        # one FSDP unit per block; the root unit holds the embeddings, the final norm and the head
        communication = communication_bytes(n, recipe=precision, world_size=world_size, sharding=sharding,
                                            root_params=n - counts.layers)
    result = Estimate(
        spec=spec, batch=batch, seq_len=seq_len, precision=precision, optimizer=optimizer,
        checkpointing=checkpointing, grad_accum=grad_accum,
        flops=model_flops(spec, batch, seq_len, checkpointing=checkpointing),
        peak=train_peak_bytes(spec, batch, seq_len, recipe=precision, optimizer=optimizer,
                              checkpointing=checkpointing, grad_accum=grad_accum, optimizer_impl=optimizer_impl,
                              device=device),
        kv_cache=kv_cache_bytes(spec, batch, seq_len, recipe.compute_dtype),
        world_size=world_size, sharding=sharding, sharded=sharded, communication=communication,
        optimizer_impl=optimizer_impl, device=device,
    )
    return result if gpu is None else replace(result, fit=fit_on(result, gpu))
