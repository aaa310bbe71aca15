"""The peak of one rank of a sharded training step: the single-device timeline, moment by moment, with each rank's
share of the model states in place of the whole.

A rank runs the same forward and backward on its own micro-batch as one device does, so its activations and their
transients are the single-device walk's (:mod:`torchledger.formulas.timeline`), moment for moment. What differs is
the model states and what the sharding adds, and one model gives them for every sharding
(:data:`torchledger.formulas.distributed.SHARDINGS`):

- parameters at rest: whole (``ddp``, ``zero1``, ``zero2``), or each unit's shard (``fsdp``, ``zero3``,
  ``fsdp-grad-op``, ``hsdp``), plus the units gathered at that moment, in FSDP2's ``param_dtype``: FULL_SHARD holds
  the root unit (embeddings, final norm, head; FSDP2 keeps it gathered from forward to backward), the block in
  flight and, in the backward, the next block prefetched; SHARD_GRAD_OP holds every block gathered from its forward
  until its own backward is done; beside them the flat all-gather outputs FSDP2 keeps (in the forward the latest
  one until the next unit's copy-out, the last one until the root's forward ends after the loss; at each copy-out
  the unit's own and the previous unit's);
- gradients: whole (``ddp``, ``zero1``), or, where they are sharded, the shards of the units whose backward is done,
  the whole gradients of the unit in flight and of the root (reduced at the end of the backward), and the previous
  unit's reduce-scatter input, which FSDP2 keeps until the next unit's reduce-scatter
  (``reduce_scatter_max_input_buffers``, 1 by default); at each unit's reduce-scatter, its whole gradients and the
  reduce-scatter input in ``reduce_dtype``, the unit resharded first;
- optimizer state (and master weights) and the optimizer's temporaries: sharded except under ``ddp``;
- ``ddp``: its gradient buckets, as large as the gradients (``gradient_as_bucket_view=False``, the default).

Units: one per block, and the root. Hybrid sharding (``hsdp``) shards within ``shard_group_size`` ranks and
replicates across groups: per rank, the figures of ``fsdp`` over ``shard_group_size`` ranks, plus the all-reduce
buffers FSDP2 keeps to the end of the backward (:func:`hsdp_all_reduce_buffer_bytes`): in a later micro-batch of
accumulation, and in every micro-batch where the reduce dtype differs from the parameters' dtype.

NB: shards are ``ceil(unit elements / N)`` per unit (FSDP2 pads each tensor's first dimension to a multiple of N:
equal whenever N divides it); with accumulation, the later micro-batches are the first one's moments plus the
gradient shards kept between them (gradient-sharding schemes), or the single device's (``ddp``, ``zero1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._validate import non_negative_int, one_of, positive_int
from .distributed import _SHARDED, SHARDINGS, fsdp_policy, hybrid_groups
from .memory import OPTIMIZER_STATES, dtype_bytes, get_recipe
from .specs import ModelSpec, param_counts
from .timeline import Moment, StepConfig, _TransformerStep

__all__ = ["RankPeak", "hsdp_all_reduce_buffer_bytes", "rank_peak_bytes", "sharded_ranks"]


@dataclass(frozen=True)
class RankPeak:
    """One rank's step: the largest total of each phase and the moment of the peak."""

    phases: dict[str, int]
    moment: str

    @property
    def peak(self) -> int:
        return max(self.phases.values())


def sharded_ranks(sharding: str, world_size: int, shard_group_size: int | None = None) -> int:
    """The ranks a unit is sharded over: ``world_size``, or ``shard_group_size`` under hybrid sharding."""
    one_of("sharding", sharding, SHARDINGS)
    n = positive_int("world_size", world_size)
    return hybrid_groups(n, shard_group_size)[1] if sharding == "hsdp" else n


def hsdp_all_reduce_buffer_bytes(shard_elements: int, recipe: str, *, later_micro_batch: bool) -> int:
    """Bytes hybrid sharding keeps beside the gradient shards of the units already reduced in this backward, whose
    gradient shards total ``shard_elements`` (per rank), under ``recipe``'s FSDP2 policy (:func:`fsdp_policy`).

    FSDP2's ``foreach_reduce`` (``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``) reduce-scatters a
    unit's gradients into a new ``reduce_output`` (one shard, in ``reduce_dtype``) and, under HSDP, all-reduces it
    in place across the replica groups and returns it as ``all_reduce_input``; ``FSDPParamGroup.post_backward``
    (``_fsdp_param_group.py``) keeps it in ``_all_reduce_state`` (``AllReduceState``, so that the caching allocator
    cannot hand its block to the next unit's reduce-scatter while the all-reduce runs) until
    ``finalize_backward`` clears it at the end of the backward. Whether that costs bytes beyond the gradient:

    - the first micro-batch, reduce dtype equal to the parameters' dtype: ``reduce_output`` becomes the sharded
      gradient itself (viewed out into ``sharded_param.grad``): nothing more;
    - a later micro-batch of accumulation: the new shard is added into the kept gradient
      (``sharded_param.grad._local_tensor += new_sharded_grad``) and ``reduce_output`` stays referenced: one more
      shard in ``reduce_dtype`` per reduced unit (plain FSDP frees it after the addition);
    - reduce dtype other than the parameters' (``*-mixed-master``): the gradient is a cast copy
      (``_to_dtype_if_needed``), ``reduce_output`` the kept buffer, in every micro-batch.
    """
    n = non_negative_int("shard_elements", shard_elements)
    r = get_recipe(recipe)
    reduce = fsdp_policy(r.name)[1]
    if not later_micro_batch and reduce == r.param_dtype:
        return 0
    return n * dtype_bytes(reduce)


def _walk_moments(spec: ModelSpec, batch: int, seq_len: int, config: StepConfig, device: str,
                  implementation: Any = None) -> list[Moment]:
    if implementation is None:
        step = _TransformerStep(spec, batch, seq_len, config, device)
    else:  # what transformers runs (formulas.timeline_hf): the same walk, its layers' ops
        from .timeline_hf import _HFStep

        step = _HFStep(spec, implementation, batch, seq_len, config, device)
    moments: list[Moment] = []
    step.tl.moments = moments
    step.micro_batches(step.forward)
    step.finish()
    return moments


def _block_of(label: str) -> int | None:
    if label.startswith("block "):
        return int(label.split(" ", 2)[1])
    return None


def rank_peak_bytes(spec: ModelSpec, batch: int, seq_len: int, config: StepConfig, *, sharding: str,
                    world_size: int, shard_group_size: int | None = None, device: str = "cpu",
                    implementation: Any = None) -> RankPeak:
    """The per-rank phases of one training step of the reference transformer (or of the Hugging Face model of
    ``implementation``, a :class:`torchledger.formulas.timeline_hf.HFProfile`) under ``sharding``."""
    one_of("sharding", sharding, SHARDINGS)
    n_ranks = positive_int("world_size", world_size)
    N = sharded_ranks(sharding, n_ranks, shard_group_size)
    shard_opt, shard_grads, shard_params, regather = _SHARDED[sharding]
    r = get_recipe(config.recipe)
    p, g = dtype_bytes(r.param_dtype), dtype_bytes(r.grad_dtype)
    policy_param, policy_reduce = fsdp_policy(config.recipe)
    pg, rd = dtype_bytes(policy_param), dtype_bytes(policy_reduce)
    counts = param_counts(spec)
    L, n = spec.n_layers, counts.total
    F = counts.per_layer  # a block's elements
    S = -(-F // N)  # its shard
    F_root = n - counts.layers
    S_root = -(-F_root // N)
    shard_total = L * S + S_root
    moments = _walk_moments(spec, batch, seq_len, config, device, implementation)

    # optimizer state: k bytes per element (state tensors, master weights) plus Adam's 4-byte step counters
    k = OPTIMIZER_STATES[config.optimizer] * dtype_bytes(r.optimizer_dtype) + (
        dtype_bytes(r.master_dtype) if r.master_dtype else 0)
    opt_elements = shard_total if shard_params else (-(-n // N) if shard_opt else n)
    full_params_bytes = n * p

    phases: dict[str, int] = {}
    best = ("", -1)
    mb, last_phase = 0, "forward"
    context: int | str = "head"  # the unit the backward is in: "head", a block, "embedding"

    def gathered(phase: str, ctx: int | str, fwd_block: int | None) -> int:
        """Elements of the units gathered (beyond their shards) at a moment."""
        if not shard_params:
            return 0
        if phase == "optimizer":
            return 0
        if phase == "forward":
            # in the forward FSDP2 keeps the flat output of the latest all-gather until the next unit's copy-out
            # (the root's forward, the loss included, frees the last one at its end)
            if fwd_block is None and context != "after":  # the embedding: the root unit and its flat output
                return 2 * F_root
            if fwd_block is None:  # the final norm, head and loss: the last block's flat output
                return F_root + F + (0 if regather else L * F)
            return F_root + F + F * (1 if regather else fwd_block + 1)
        if ctx == "head":
            return F_root + F * (1 if regather else L)
        if ctx == "embedding":
            return F_root
        assert isinstance(ctx, int)
        if regather:
            return F_root + F * (2 if ctx > 0 else 1)
        return F_root + F * (ctx + 1)

    def done_blocks(ctx: int | str) -> int:
        if ctx == "head":
            return 0
        if ctx == "embedding":
            return L
        assert isinstance(ctx, int)
        return L - 1 - ctx

    def per_rank(m: Moment, phase: str, ctx: int | str, fwd_block: int | None) -> int:
        cats = m.by_category
        params_r = cats["params"] - full_params_bytes + (shard_total * p if shard_params else full_params_bytes)
        params_r += gathered(phase, ctx, fwd_block) * pg
        counters = cats["optimizer"] - n * k
        opt_r = opt_elements * k + counters
        grads_r = cats["grads"]
        temps = cats["temporaries"]
        extra = 0
        if shard_grads:
            if phase == "backward":
                d = done_blocks(ctx)
                grads_r += -d * F * g + d * S * p
                # the previous unit's reduce-scatter input, kept until this unit's reduce-scatter
                if d > 0:
                    extra += F * rd
                extra += all_reduce_kept(d, later=False)
            elif phase == "optimizer":
                grads_r = shard_total * p
        if phase == "optimizer" and shard_opt:
            temps = -(-temps * opt_elements // n)
        if sharding == "ddp" and n_ranks > 1:
            extra += n * g  # DDP's gradient buckets
        return (m.total - cats["params"] - cats["grads"] - cats["optimizer"] - cats["temporaries"]
                + params_r + grads_r + opt_r + temps + extra)

    def record(phase: str, total: int, label: str) -> None:
        nonlocal best
        if total > phases.get(phase, -1):
            phases[phase] = total
        if total > best[1]:
            best = (f"{phase}: {label}", total)

    def all_reduce_kept(units: int, *, later: bool) -> int:
        """HSDP's all-reduce buffers of ``units`` reduced blocks, kept to the end of the backward."""
        if sharding != "hsdp" or units <= 0:
            return 0
        return hsdp_all_reduce_buffer_bytes(units * S, config.recipe, later_micro_batch=later)

    def take(phase: str, total: int, label: str, ctx: int | str = "head", reducing: bool = False) -> None:
        """``reducing``: the moment of a block's reduce-scatter, its own buffers not yet made."""
        record(phase, total, label)
        if accumulating and phase != "optimizer":
            # a later micro-batch repeats the first one's moments beside the gradient shards kept between them
            # (FSDP2 reduce-scatters every micro-batch and adds each new shard into the kept one)
            later = shard_total * p - (done_blocks(ctx) * S * p if phase == "backward" else 0)
            if phase == "backward":  # and, under hsdp, the reduced units' all-reduce buffers
                reduced = done_blocks(ctx) - (1 if reducing else 0)
                later += all_reduce_kept(reduced, later=True) - all_reduce_kept(reduced, later=False)
            record(phase, total + later, f"{label} (micro-batch 2)")

    accumulating = False

    fwd_block: int | None = None
    for m in moments:
        if m.phase == "forward" and last_phase == "backward":
            mb += 1
        if shard_grads and mb > 0 and m.phase != "optimizer":
            last_phase = m.phase
            continue  # the first micro-batch's moments stand for the later ones (see ``take``)
        accumulating = shard_grads and config.grad_accum > 1
        if m.phase == "forward":
            if last_phase != "forward":
                context, fwd_block = "before", None
            b = _block_of(m.label)
            if b is not None and b != fwd_block and shard_params:
                # the block's copy-out: its parameters made beside its flat all-gather output while the previous
                # unit's flat output (the root's before block 0) is still referenced
                before = per_rank(m, "forward", "head", b) - m.size + (F_root if b == 0 else F) * pg
                take("forward", before, f"block {b} all-gather copy-out")
            if b is not None:
                fwd_block = b
                context = "blocks"
            elif context == "blocks" and not m.label.startswith(("embed", "wte", "wpe", "position")):
                fwd_block, context = None, "after"
        if m.phase == "backward":
            if last_phase != "backward":
                context = "head"
            b = _block_of(m.label)
            new_ctx: int | str = context
            if b is not None:
                new_ctx = b
            elif isinstance(context, int) and m.label.startswith(("embed", "wte", "wpe")):
                new_ctx = "embedding"
            if new_ctx != context and isinstance(context, int) and shard_grads:
                # the reduce-scatter of the unit just done, at the state before this moment's allocation: the
                # unit resharded, the next one not yet prefetched, its whole gradients beside the input
                done_unit = context
                before = per_rank(m, "backward", new_ctx, None) - m.size
                if shard_params and regather and isinstance(new_ctx, int) and new_ctx > 0:
                    before -= F * pg  # the block after next is prefetched only after this reduce-scatter
                before += -S * p + F * g - all_reduce_kept(1, later=False)  # its all-reduce buffer not yet made
                take("backward", before, f"block {done_unit} reduce-scatter", new_ctx, reducing=True)
            if new_ctx != context and isinstance(new_ctx, int) and shard_params and regather:
                # the block's copy-out of its prefetched all-gather: its parameters beside the flat output
                before = per_rank(m, "backward", new_ctx, None) - m.size + (F * pg if new_ctx == 0 else 0)
                take("backward", before, f"block {new_ctx} all-gather copy-out", new_ctx)
            context = new_ctx
        last_phase = m.phase
        ctx = context if m.phase == "backward" else "head"
        total = per_rank(m, m.phase, ctx, fwd_block)
        take(m.phase, total, m.label, ctx)
    return RankPeak(phases, best[0])
