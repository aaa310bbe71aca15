"""The names every layer shares, defined once: optimizers and their implementations, checkpointing modes, the
non-transformer reference workloads. The CLI's choices, the formulas' checks, the workloads and the benchmarks all
import them from here.

Checkpointing modes:

- ``none``: every block saves what its ops save;
- ``full``: every block is checkpointed (non-reentrant ``torch.utils.checkpoint``): it keeps only its input and is
  recomputed in the backward;
- ``every-other``: blocks 0, 2, 4, ... are checkpointed, the others not: half the saving for half the recompute;
- ``selective``: only the attention core (QK^T and AV) is recomputed, as Korthikanti et al. 2022 define selective
  activation recomputation. The FLOP formulas count it; the reference training step does not run it, so neither
  the memory prediction nor a measurement takes it.
"""

from __future__ import annotations

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "adamw")
OPTIMIZER_IMPLS: tuple[str, ...] = ("foreach", "for-loop", "fused")
CHECKPOINTING: tuple[str, ...] = ("none", "full", "every-other", "selective")
STEP_CHECKPOINTING: tuple[str, ...] = ("none", "full", "every-other")  # what the reference step runs and predicts
REFERENCE_WORKLOADS: tuple[str, ...] = ("mlp", "cnn")
TIMING_MODES: tuple[str, ...] = ("burst", "sustained")  # one call per timed round, or rounds of at least 100 ms


def checkpointed_blocks(mode: str, n_layers: int) -> list[int]:
    """Which blocks of ``n_layers`` a step checkpointing ``mode`` (one of :data:`STEP_CHECKPOINTING`) runs under
    ``torch.utils.checkpoint``."""
    if mode == "full":
        return list(range(n_layers))
    if mode == "every-other":
        return list(range(0, n_layers, 2))
    return []
