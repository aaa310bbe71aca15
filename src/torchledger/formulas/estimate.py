"""One training configuration, costed: what ``torchledger estimate`` prints, assembled from the other formulas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchledger.formulas._validate import one_of, positive_int
from torchledger.formulas.flops import ModelFlops, model_flops
from torchledger.formulas.memory import get_recipe, kv_cache_bytes
from torchledger.formulas.peak import TrainPeak, train_peak_bytes
from torchledger.formulas.specs import ModelSpec, check_seq_len, n_params

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


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

    @property
    def train_step_flops(self) -> int:
        return self.grad_accum * self.flops.train

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` contract: integers exact, bytes in bytes (keys are stable; new ones are only added)."""
        states = self.peak.states
        acts = self.peak.activations
        return {
            "model": self.spec.name,
            "batch_size": self.batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "optimizer": self.optimizer,
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
                "peak_train": self.peak.peak,
                "peak_phase": self.peak.phase,
                "phases": dict(self.peak.phases),
            },
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
) -> Estimate:
    """Cost one optimizer step of ``spec``: FLOPs (forward, backward, recompute) and memory (states, peak).

    ``batch`` is the micro-batch; ``grad_accum`` micro-batches make one step. The KV cache is for inference at the
    same batch and sequence length, in the recipe's compute dtype.
    """
    positive_int("batch_size", batch)
    check_seq_len(spec, seq_len)
    positive_int("grad_accum", grad_accum)
    recipe = get_recipe(precision)
    one_of("optimizer", optimizer, OPTIMIZERS)
    one_of("checkpointing", checkpointing, ("none", "full"))
    return Estimate(
        spec=spec, batch=batch, seq_len=seq_len, precision=precision, optimizer=optimizer,
        checkpointing=checkpointing, grad_accum=grad_accum,
        flops=model_flops(spec, batch, seq_len, checkpointing=checkpointing),
        peak=train_peak_bytes(spec, batch, seq_len, recipe=precision, optimizer=optimizer,
                              checkpointing=checkpointing, grad_accum=grad_accum),
        kv_cache=kv_cache_bytes(spec, batch, seq_len, recipe.compute_dtype),
    )
