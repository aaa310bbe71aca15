"""The fastest training configuration that fits: enumerate, drop what does not fit, rank by predicted tokens/s.

For a model, a GPU of the hardware table, a number of GPUs and a global batch in tokens, :func:`plan` tries every
micro-batch that divides each rank's share of the batch (the rest made up by gradient accumulation), every
checkpointing mode of the reference step, every sharding scheme (:data:`~torchledger.formulas.distributed.SHARDINGS`)
and every precision recipe; it keeps those whose predicted peak per rank fits the GPU (:func:`~.estimate.fit_on`:
the device's memory less the CUDA context and the cuBLAS workspaces) and ranks them by the step-time model's
tokens/s (:mod:`.steptime`), with the sharding's communication as exposed time over ``link_bandwidth``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ._validate import one_of, positive_int, positive_number
from .device import cublas_workspace_bytes
from .distributed import (
    SHARDINGS,
    collective_ranks,
    communication_bytes,
    communication_seconds,
    hybrid_groups,
    sharded_state_bytes,
)
from .estimate import Estimate, Fit, estimate
from .flops import model_flops
from .hardware import CUDA_CONTEXT_BYTES, DeviceSpec, get_device, peak_dtype
from .memory import get_recipe
from .specs import ModelSpec, check_seq_len, n_params, param_counts
from .steptime import Calibration, StepTime, datasheet_calibration, step_time, transformer_step_ops
from .vocabulary import STEP_CHECKPOINTING

__all__ = ["DEFAULT_GPUS_PER_NODE", "DEFAULT_LINK_BANDWIDTH", "PlanEntry", "compute_dtype", "config_time",
           "estimate_time", "plan"]

# Bytes/s each GPU sends to the others when a step's collectives cross nodes: one 400 Gb/s InfiniBand NDR port per
# GPU (NVIDIA DGX H100 datasheet: 8 ConnectX-7 at 400 Gb/s for 8 GPUs). NB: within one NVLink node the links are
# faster (450 GB/s per direction on H100 SXM); the planner takes the slower, inter-node figure unless told.
DEFAULT_LINK_BANDWIDTH = 50e9
# GPUs that share one NVLink node (a DGX/HGX H100 or H200 holds 8): hsdp's shard groups are tried up to the world.
DEFAULT_GPUS_PER_NODE = 8

_PLAIN = ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op")


def estimate_time(e: Estimate, cal: Calibration, *, link_bandwidth: float = DEFAULT_LINK_BANDWIDTH) -> StepTime:
    """The predicted step time of ``e`` on the machine of ``cal`` (:func:`config_time` of its configuration). Where
    the estimate names an interconnect, its collectives' alpha-beta seconds (``Estimate.communication_seconds``)
    are the communication; else the bytes each rank sends over ``link_bandwidth``."""
    t = config_time(e.spec, e.batch, e.seq_len, cal, precision=e.precision, optimizer=e.optimizer,
                    optimizer_impl=e.optimizer_impl, checkpointing=e.checkpointing, grad_accum=e.grad_accum,
                    world_size=e.world_size, sharding=e.sharding if e.sharding in (*_PLAIN, "hsdp") else "fsdp",
                    link_bandwidth=link_bandwidth, shard_group_size=e.shard_group_size)
    timed = getattr(e, "communication_seconds", None)
    total = timed().get("total") if callable(timed) and getattr(e, "interconnect", None) else None
    if total is not None:
        phases = dict(t.phases)
        phases["communication"] = replace(phases["communication"], seconds=float(total))
        t = replace(t, phases=phases)
    return t


def config_time(spec: ModelSpec, batch: int, seq_len: int, cal: Calibration, *, precision: str = "32-true",
                optimizer: str = "adamw", optimizer_impl: str = "foreach", checkpointing: str = "none",
                grad_accum: int = 1, world_size: int = 1, sharding: str = "ddp",
                link_bandwidth: float = DEFAULT_LINK_BANDWIDTH, shard_group_size: int | None = None,
                gpus_per_node: int = DEFAULT_GPUS_PER_NODE, intra_node_bandwidth: float | None = None) -> StepTime:
    """The predicted step time of one configuration on the machine of ``cal``: its ops
    (:func:`~.steptime.transformer_step_ops`), the optimizer's update over each rank's shard where the sharding
    splits the optimizer state, and the step's collectives (:func:`~.distributed.communication_bytes`, bytes each
    rank sends) as exposed communication: over ``intra_node_bandwidth`` (default ``link_bandwidth``) when the
    ranks of a collective lie within one node of ``gpus_per_node`` (the whole world, or under ``hsdp`` a shard
    group of ``shard_group_size`` ranks, consecutive ranks being on one node), else over ``link_bandwidth``.
    NB: ZeRO-3/FSDP/HSDP gather and reduce per micro-batch (FSDP2 syncs gradients on every backward unless told
    not to), the others once per step."""
    positive_number("link_bandwidth", link_bandwidth)
    positive_int("gpus_per_node", gpus_per_node)
    intra = link_bandwidth if intra_node_bandwidth is None else positive_number("intra_node_bandwidth",
                                                                                 intra_node_bandwidth)
    if sharding == "hsdp":
        shards = hybrid_groups(world_size, shard_group_size)[1]
    else:
        shards = world_size if sharding != "ddp" else 1
    ops = transformer_step_ops(spec, batch, seq_len, precision=precision, optimizer=optimizer,
                               optimizer_impl=optimizer_impl, checkpointing=checkpointing, grad_accum=grad_accum,
                               device=cal.kind, shards=shards)
    comm = 0.0
    if world_size > 1:
        n = n_params(spec)
        sent = communication_bytes(n, recipe=precision, world_size=world_size, sharding=sharding,
                                   root_params=n - param_counts(spec).layers,
                                   shard_group_size=shard_group_size if sharding == "hsdp" else None)
        per_step = grad_accum if sharding in ("zero3", "fsdp", "hsdp") else 1
        for name, nbytes in sent.items():
            ranks = collective_ranks(name, sharding, world_size, shard_group_size if sharding == "hsdp" else None)
            # a shard group within a node (every group, consecutive ranks: the group size divides the node's GPUs,
            # else some group straddles two nodes); the all-reduce across hsdp's groups spans nodes unless the world
            # fits one
            local = (gpus_per_node % ranks == 0 and not (sharding == "hsdp" and name == "all_reduce")) or (
                world_size <= gpus_per_node)
            comm += communication_seconds(nbytes * per_step, intra if local else link_bandwidth, world_size=ranks)
    flops = model_flops(spec, batch, seq_len, checkpointing=checkpointing)
    compute = compute_dtype(precision)
    t = step_time(ops, cal, tokens=grad_accum * batch * seq_len,
                  model_flops=grad_accum * (flops.forward + flops.backward), compute_dtype=compute,
                  communication_s=comm)
    return replace(t, ranks=world_size)


def compute_dtype(precision: str) -> str:
    """The peak-table dtype of a recipe's matmuls (fp32 under ``32-true``: PyTorch's default "highest")."""
    dtype = get_recipe(precision).compute_dtype
    return "fp32" if dtype == "float32" else peak_dtype(dtype)


@dataclass(frozen=True)
class PlanEntry:
    """One configuration that fits: its estimate (memory per rank), its fit and its predicted time."""

    estimate: Estimate
    fit: Fit
    time: StepTime

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over all ranks."""
        return self.time.tokens_per_s

    def to_dict(self) -> dict[str, object]:
        e = self.estimate
        return {"precision": e.precision, "sharding": e.sharding, "shard_group_size": e.shard_group_size,
                "checkpointing": e.checkpointing,
                "micro_batch": e.batch, "grad_accum": e.grad_accum, "seq_len": e.seq_len,
                "world_size": e.world_size, "peak_bytes": e.peak_per_rank, "usable_bytes": self.fit.usable,
                "memory": e.phases_per_rank, "tokens_per_s": self.tokens_per_s, "time": self.time.to_dict()}


def plan(
    spec: ModelSpec,
    gpu: str | DeviceSpec,
    gpus: int,
    global_batch_tokens: int,
    seq_len: int | None = None,
    *,
    calibration: Calibration | None = None,
    precisions: tuple[str, ...] = ("bf16-mixed", "16-mixed", "bf16-true", "32-true"),
    shardings: tuple[str, ...] | None = None,
    checkpointing: tuple[str, ...] = STEP_CHECKPOINTING,
    optimizer: str = "adamw",
    optimizer_impl: str = "foreach",
    link_bandwidth: float = DEFAULT_LINK_BANDWIDTH,
    top: int = 5,
    shard_group_sizes: tuple[int, ...] | None = None,
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
    intra_node_bandwidth: float | None = None,
) -> tuple[list[PlanEntry], int]:
    """The ``top`` fastest configurations that fit, fastest first, and how many configurations were tried.

    ``global_batch_tokens`` must be a multiple of ``seq_len x gpus``: each rank then runs that many tokens per step
    as micro-batch x accumulation sequences. ``hsdp`` is tried with every shard group of ``shard_group_sizes``
    (default: the powers of two from 2 below ``gpus`` that divide it); its collectives, and those of every scheme,
    run over ``intra_node_bandwidth`` within a node of ``gpus_per_node`` (:func:`config_time`)."""
    dev = gpu if isinstance(gpu, DeviceSpec) else get_device(gpu)
    positive_int("gpus", gpus)
    positive_int("global_batch_tokens", global_batch_tokens)
    positive_int("top", top)
    positive_number("link_bandwidth", link_bandwidth)
    positive_int("gpus_per_node", gpus_per_node)
    if intra_node_bandwidth is not None:
        positive_number("intra_node_bandwidth", intra_node_bandwidth)
    for mode in checkpointing:
        one_of("checkpointing", mode, STEP_CHECKPOINTING)
    seq = check_seq_len(spec, spec.max_seq_len if seq_len is None else seq_len)
    if global_batch_tokens % (seq * gpus):
        raise ValueError(f"global_batch_tokens={global_batch_tokens} is not a multiple of seq_len x gpus = "
                         f"{seq} x {gpus} = {seq * gpus}: every rank runs whole sequences")
    for name in precisions:
        get_recipe(name)
    sequences = global_batch_tokens // (seq * gpus)
    cal = calibration or datasheet_calibration(dev)
    # every scheme of the sharding model that needs no more than the world size (hybrid ones need their groups)
    schemes = tuple(s for s in SHARDINGS if s in (*_PLAIN, "hsdp")) if shardings is None else shardings
    for name in schemes:  # named ones are checked even where one GPU leaves only ddp
        one_of("shardings", name, SHARDINGS)
    schemes = schemes if gpus > 1 and gpus <= n_params(spec) else ("ddp",)
    if shard_group_sizes is None:
        shard_group_sizes = tuple(2**i for i in range(1, gpus.bit_length()) if 2**i < gpus and gpus % 2**i == 0)
    for g in shard_group_sizes:
        hybrid_groups(gpus, g)  # ValueError naming shard_group_size unless it divides the world and shards
    if shardings is not None and "hsdp" in schemes and not shard_group_sizes:
        raise ValueError(f"shardings={shardings!r}: hsdp over gpus={gpus} has no shard group to try (no power of two "
                         "from 2 below it divides it): give shard_group_sizes")
    # (sharding, shard group size): hsdp once per group size, the others once
    layouts = [(s, g) for s in schemes for g in ((*shard_group_sizes,) if s == "hsdp" else (None,))]
    n = n_params(spec)
    # a recipe whose compute dtype the machine has no matmul path for (bf16 on a T4) is not tried
    precisions = tuple(p for p in precisions if compute_dtype(p) in cal.matmul)
    micro_batches = [b for b in range(1, sequences + 1) if sequences % b == 0]
    usable = _fit_of(dev, 0, seq, 1).usable
    timed: list[tuple[StepTime, int, dict[str, object]]] = []
    tried = 0
    for precision in precisions:
        for sharding, group in layouts:
            # the model states at rest, per rank, are a floor of every peak: a layout they overflow is not estimated
            states = sharded_state_bytes(n, recipe=precision, optimizer=optimizer, world_size=gpus,
                                         sharding=sharding, shard_group_size=group).total
            if states > usable:
                tried += len(checkpointing) * len(micro_batches)
                continue
            for mode in checkpointing:
                config: dict[str, object] = {"precision": precision, "optimizer": optimizer, "checkpointing": mode,
                                             "world_size": gpus, "sharding": sharding,
                                             "optimizer_impl": optimizer_impl}
                if group is not None:
                    config["shard_group_size"] = group

                def at(layers: int, batch: int, accum: int, config: dict[str, object] = config) -> Estimate:
                    small = spec if layers == spec.n_layers else replace(spec, n_layers=layers)
                    return estimate(small, batch, seq, grad_accum=accum, device="cuda", **config)  # type: ignore[arg-type]

                cache: dict[tuple[int, int, int], dict[str, int]] = {}
                for batch in micro_batches:
                    tried += 1
                    accum = sequences // batch
                    peak = _extrapolated_peak(spec, batch, min(accum, 2), at, cache)
                    if peak > _SCREEN * usable:
                        continue
                    t = config_time(spec, batch, seq, cal, precision=precision, optimizer=optimizer,
                                    optimizer_impl=optimizer_impl, checkpointing=mode, grad_accum=accum,
                                    world_size=gpus, sharding=sharding, link_bandwidth=link_bandwidth,
                                    shard_group_size=group, gpus_per_node=gpus_per_node,
                                    intra_node_bandwidth=intra_node_bandwidth)
                    timed.append((t, peak, {**config, "batch": batch, "grad_accum": accum}))
    timed.sort(key=lambda item: (-item[0].tokens_per_s, item[1]))
    found: list[PlanEntry] = []
    too_big: dict[tuple[object, ...], int] = {}  # per configuration: the smallest micro-batch that did not fit
    for t, _, chosen in timed:
        if len(found) == top:
            break
        kwargs = dict(chosen)
        batch = int(kwargs.pop("batch"))  # type: ignore[call-overload]
        same = tuple(v for k, v in sorted(kwargs.items()) if k != "grad_accum")
        if batch >= too_big.get(same, batch + 1):
            continue  # the peak grows with the micro-batch
        # the extrapolated peak screened the candidates; the exact estimate decides
        e = estimate(spec, batch, seq, device="cuda", **kwargs)  # type: ignore[arg-type]
        fit = _fit_of(dev, e.peak_per_rank, seq, e.batch)
        if fit.fits:
            found.append(PlanEntry(replace(e, fit=fit, time=t), fit, t))
        else:
            too_big[same] = min(batch, too_big.get(same, batch))
    found.sort(key=lambda p: (-p.tokens_per_s, p.estimate.peak_per_rank))  # equal speed: the smaller peak first
    return found, tried


_BASE_LAYERS = (4, 8)  # the block counts the peak is extrapolated from (even: every-other checkpoints half)
_SMALL = 8  # specs of at most this many blocks are estimated exactly for every candidate
# The extrapolated peak only screens: a candidate goes on to the exact estimate (in the order of its predicted
# speed) unless its extrapolated peak exceeds this many times the usable memory. Over all 360 configurations the
# planner tries for LLaMA-2-70B on 64 ranks at 4,096 tokens, extrapolated over exact peaks lay between 0.94 and
# 1.007 (and between 0.81 and 1.0 for its 300 hsdp ones, groups of 2 to 32: an under-estimate only lets more
# through to the exact estimate): a margin of 25% drops nothing that fits.
_SCREEN = 1.25


def _extrapolated_peak(spec: ModelSpec, batch: int, accum: int, at: Callable[[int, int, int], Estimate],
                       cache: dict[tuple[int, int, int], dict[str, int]]) -> int:
    """The peak per rank of ``spec`` at ``batch``, each phase taken as bilinear in blocks and micro-batch from four
    exact estimates of the same configuration at :data:`_BASE_LAYERS` blocks and micro-batch 1 and 2 (every phase
    sums per-block and per-sequence terms: model states grow with the blocks, activations with blocks x sequences).
    NB: a screen, not the answer (a phase's peak moment can move between blocks: from 2 and 4 blocks, ZeRO-3 with
    full checkpointing extrapolated to 79 GiB against 21 GiB exact); the planner confirms every configuration it
    reports with the exact estimate."""
    if spec.n_layers <= _SMALL:
        return at(spec.n_layers, batch, accum).peak_per_rank

    def phases(layers: int, b: int) -> dict[str, int]:
        key = (layers, b, accum)
        if key not in cache:
            cache[key] = at(layers, b, accum).phases_per_rank
        return cache[key]

    l0, l1 = _BASE_LAYERS
    f00, f10, f01, f11 = phases(l0, 1), phases(l1, 1), phases(l0, 2), phases(l1, 2)
    x, y = (spec.n_layers - l0) / (l1 - l0), batch - 1
    best = 0.0
    for k in f00:
        v = f00[k] + x * (f10[k] - f00[k]) + y * (f01[k] - f00[k]) + x * y * (f11[k] - f10[k] - f01[k] + f00[k])
        best = max(best, v)
    return math.ceil(best)


def _fit_of(dev: DeviceSpec, peak: int, seq_len: int, batch: int) -> Fit:
    """Whether ``peak`` fits, as :func:`~.estimate.fit_on` says, without its search for the largest micro-batch
    (the planner tries each micro-batch itself): ``max_batch`` is the batch tried."""
    workspaces = 2 * cublas_workspace_bytes(dev.compute_capability or (1, 0))
    return Fit(gpu=dev.name, capacity=dev.capacity_bytes, capacity_source=dev.capacity_source,
               context=CUDA_CONTEXT_BYTES, workspaces=workspaces, peak=peak, seq_len=seq_len, max_batch=batch)
