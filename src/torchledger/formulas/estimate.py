"""One training configuration, costed: what ``torchledger estimate`` prints, assembled from the other formulas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._validate import one_of, positive_int
from .activations import logprob_bytes
from .distributed import (
    SHARDINGS,
    ShardedStates,
    communication_bytes,
    fsdp_step_phases,
    sharded_state_bytes,
)
from .flops import ModelFlops, model_flops
from .memory import dtype_bytes, get_recipe, kv_cache_bytes
from .peak import TrainPeak, train_peak_bytes
from .specs import ModelSpec, check_seq_len, n_params, param_counts
from .vocabulary import OPTIMIZERS, STEP_CHECKPOINTING


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
        """The ``--json`` contract: integers exact, bytes in bytes (keys are stable; new ones are only added)."""
        states = self.sharded.states if self.sharded is not None else self.peak.states
        acts = self.peak.activations
        return {
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
) -> Estimate:
    """Cost one optimizer step of ``spec``: FLOPs (forward, backward, recompute) and memory (states, peak).

    ``batch`` is the micro-batch; ``grad_accum`` micro-batches make one step. The KV cache is for inference at the
    same batch and sequence length, in the recipe's compute dtype. With ``world_size > 1`` the memory figures are
    per rank under ``sharding`` and ``communication`` gives the bytes each rank sends per step, by collective.
    ``optimizer_impl`` is the optimizer's implementation (``foreach``, ``for-loop``, ``fused``: their temporaries
    differ); ``device`` the device whose terms the peak includes (:mod:`torchledger.formulas.device`; ``cuda`` by
    default, the device people size for).
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
    return Estimate(
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
