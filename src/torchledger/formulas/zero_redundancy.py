"""ZeRO-1 as PyTorch implements it: ``torch.distributed.optim.ZeroRedundancyOptimizer`` over DDP.

PyTorch's only ZeRO-1 assigns whole parameter tensors to ranks (``ZeroRedundancyOptimizer._partition_parameters``):
the tensors sorted by element count, largest first (a stable sort), each given to the rank holding the fewest
elements so far (the lowest such rank on a tie). A rank keeps optimizer state only for its own tensors, so its share
is not ``ceil(n / N)`` (the flat partition :func:`torchledger.formulas.distributed.sharded_state_bytes` models for
``zero1``): rank 0 takes the largest tensor first, and LLaMA-7B's 32,000 x 4,096 embedding alone is more than an
eighth of a block. Everything else is DDP's: whole parameters and gradients, and DDP's gradient buckets (as large as
the gradients, ``gradient_as_bucket_view=False``). After its local step each rank broadcasts its updated tensors
(``_sync_params``): one broadcast per parameter tensor, from its owner.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._validate import one_of, positive_int
from .distributed import shard_elements
from .memory import OPTIMIZER_STATES, dtype_bytes, get_recipe
from .sharded_peak import RankPeak, rank_peak_bytes
from .specs import ModelSpec, param_counts
from .timeline import StepConfig, transformer_params

__all__ = ["ADAM_STEP_BYTES", "parameter_tensor_sizes", "zero_redundancy_partition", "zero_redundancy_payloads",
           "zero_redundancy_rank_peak"]

#: Adam's and AdamW's ``state["step"]``: one fp32 scalar per parameter tensor (torch.optim.adam, ``_init_group``)
ADAM_STEP_BYTES = 4


def parameter_tensor_sizes(spec: ModelSpec) -> list[int]:
    """Element counts of the reference transformer's parameter tensors (:mod:`torchledger.workloads.models`), in
    ``model.parameters()`` order: what ZeroRedundancyOptimizer partitions. The layout is the timeline's (the
    family's description), whose order the for-loop optimizer's measured walk already holds to."""
    sizes = [p.numel for p in transformer_params(spec)[0]]
    if sum(sizes) != param_counts(spec).total:
        raise ValueError(f"spec={spec.name!r}: its parameter tensors are not the reference model's layout "
                         f"(bias={spec.bias} where the {spec.family} family has "
                         f"{'biases' if spec.description.bias else 'none'})")
    return sizes


def zero_redundancy_partition(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """The indices into ``sizes`` (element counts of the parameter tensors, in order) that each rank owns, as
    ``ZeroRedundancyOptimizer._partition_parameters`` assigns them: largest first, each to the least loaded rank."""
    n = positive_int("world_size", world_size)
    numels = [positive_int("sizes[]", s) for s in sizes]
    owned: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(numels)), key=lambda i: numels[i], reverse=True):  # stable, as sorted() in PyTorch
        rank = load.index(min(load))  # the first least loaded rank (ZeroRedundancyOptimizer._get_min_index)
        owned[rank].append(i)
        load[rank] += numels[i]
    return owned


def zero_redundancy_payloads(n_params: int, *, recipe: str = "32-true") -> dict[str, int]:
    """Bytes handed to each kind of collective per optimizer step under ZeroRedundancyOptimizer over DDP: DDP's
    all-reduce of every gradient bucket (in the gradients' dtype) and the broadcast of every parameter tensor from
    its owner (in the parameters' dtype). NB: one synchronized backward per step (``no_sync`` for the others)."""
    n = positive_int("n_params", n_params)
    r = get_recipe(recipe)
    return {"all_reduce": n * dtype_bytes(r.grad_dtype), "broadcast": n * dtype_bytes(r.param_dtype)}


def zero_redundancy_rank_peak(spec: ModelSpec, batch: int, seq_len: int, config: StepConfig, *, world_size: int,
                              rank: int = 0, device: str = "cpu") -> RankPeak:
    """The phases of one step of ``rank`` under ZeroRedundancyOptimizer over DDP: the flat ZeRO-1 walk
    (:func:`torchledger.formulas.sharded_peak.rank_peak_bytes`, ``zero1``), plus DDP's gradient buckets, with the
    optimizer state of the rank's whole tensors in place of ``ceil(n / N)`` elements and Adam's step counters of
    its own tensors only.

    NB: the optimizer step's temporaries stay the flat walk's (``ceil(n / N)`` elements' worth): the rank's share
    differs by (its elements - ceil(n / N)) / n of them, 0.1% of LLaMA-7B's on 8 ranks.
    """
    n_ranks = positive_int("world_size", world_size)
    if not 0 <= rank < n_ranks:
        raise ValueError(f"rank={rank} must be between 0 and world_size - 1 = {n_ranks - 1}")
    sizes = parameter_tensor_sizes(spec)
    owned = zero_redundancy_partition(sizes, n_ranks)[rank]
    n = sum(sizes)
    r = get_recipe(config.recipe)
    states = OPTIMIZER_STATES[one_of("config.optimizer", config.optimizer, OPTIMIZER_STATES)]
    k = states * dtype_bytes(r.optimizer_dtype) + (dtype_bytes(r.master_dtype) if r.master_dtype else 0)
    counters = ADAM_STEP_BYTES if states == 2 else 0
    delta = ((sum(sizes[i] for i in owned) - shard_elements(n, n_ranks)) * k
             - (len(sizes) - len(owned)) * counters
             + n * dtype_bytes(r.grad_dtype))  # DDP's buckets
    flat = rank_peak_bytes(spec, batch, seq_len, config, sharding="zero1", world_size=n_ranks, device=device)
    return RankPeak({phase: total + delta for phase, total in flat.phases.items()}, flat.moment)
