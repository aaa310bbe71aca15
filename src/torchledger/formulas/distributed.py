"""Sharded training: per-rank model-state memory and the bytes each rank sends per optimizer step.

Sharding schemes (Rajbhandari et al. 2020, ZeRO, Sec. 5; PyTorch FSDP):

- ``ddp``: every rank holds everything; gradients are all-reduced (in buckets that DDP allocates once, as large
  as the gradients, unless ``gradient_as_bucket_view=True``).
- ``zero1``: optimizer state (and fp32 master weights) sharded.
- ``zero2``: gradients sharded too (reduce-scatter instead of all-reduce).
- ``zero3`` / ``fsdp`` (FULL_SHARD): parameters sharded too; each unit's parameters are all-gathered for its
  forward and again for its backward.
- ``fsdp-grad-op`` (SHARD_GRAD_OP): parameters all-gathered once per step and kept until the backward is done.

Collectives move data as ring algorithms do (Patarasuk and Yuan 2009; nccl-tests' "bus bandwidth"): for a tensor of
S bytes over N ranks, all-reduce sends 2 (N - 1) / N x S bytes per rank, reduce-scatter and all-gather (N - 1) / N x S
each. Shards are ceil(elements / N): the flat buffers pad to a multiple of N, as ZeRO and FSDP do.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ._validate import one_of, positive_int, positive_number
from .memory import ModelStates, dtype_bytes, get_recipe, model_state_bytes

SHARDINGS = ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op", "hsdp")
#: the shardings :mod:`torchledger.measuring.distributed` runs with PyTorch's own code under FakeTensorMode and
#: this model predicts (zero1 and zero2 have no flat-sharded implementation in PyTorch; its ZeroRedundancyOptimizer,
#: whole tensors per rank, is simulated too but predicted by :mod:`torchledger.formulas.zero_redundancy`)
SIMULATED_SHARDINGS = ("ddp", "zero3", "fsdp", "fsdp-grad-op", "hsdp")
#: what each sharding shards: optimizer state (and master weights), gradients, parameters at rest; and whether the
#: parameters are all-gathered per unit for the forward and again for the backward (``regather``)
_SHARDED: dict[str, tuple[bool, bool, bool, bool]] = {
    "ddp": (False, False, False, False),
    "zero1": (True, False, False, False),
    "zero2": (True, True, False, False),
    "zero3": (True, True, True, True),
    "fsdp": (True, True, True, True),
    "fsdp-grad-op": (True, True, True, False),
    "hsdp": (True, True, True, True),
}
#: FSDP2's ``MixedPrecisionPolicy`` (param_dtype: the dtype parameters are all-gathered and computed in;
#: reduce_dtype: the dtype gradients are reduce-scattered in) that runs each recipe's step as the single-device
#: step runs it: the ``*-mixed`` recipes keep fp32 parameters and let autocast cast per matmul, so FSDP gathers
#: and reduces fp32; the ``*-true`` recipes gather and reduce in their own dtype.
FSDP_POLICIES: dict[str, tuple[str, str]] = {
    "32-true": ("float32", "float32"),
    "16-mixed": ("float32", "float32"),
    "bf16-mixed": ("float32", "float32"),
    "16-true": ("float16", "float16"),
    "bf16-true": ("bfloat16", "bfloat16"),
    "16-mixed-master": ("float16", "float32"),
    "bf16-mixed-master": ("bfloat16", "float32"),
}
__all__ = [
    "COLLECTIVES", "FSDP_POLICIES", "INTERCONNECTS", "SHARDINGS", "SIMULATED_SHARDINGS", "Interconnect",
    "ShardedStates", "all_gather_bytes", "all_reduce_bytes", "bus_bandwidth", "collective_payloads",
    "collective_ranks", "collective_seconds", "communication_bytes", "communication_seconds", "fsdp_policy",
    "fsdp_step_phases", "get_interconnect", "hybrid_groups", "reduce_scatter_bytes", "ring_steps", "shard_elements",
    "sharded_state_bytes", "step_communication_seconds",
]


def all_reduce_bytes(size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``size`` bytes: 2 (N - 1) / N x size (rounded up)."""
    return _ring(2 * size, world_size)


def reduce_scatter_bytes(size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring reduce-scatter of a ``size``-byte input: (N - 1) / N x size."""
    return _ring(size, world_size)


def all_gather_bytes(size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-gather whose output is ``size`` bytes: (N - 1) / N x size."""
    return _ring(size, world_size)


def _ring(size: int, world_size: int) -> int:
    if size < 0:
        raise ValueError(f"size={size} must be >= 0")
    n = positive_int("world_size", world_size)
    share = Fraction(size * (n - 1), n)
    return -(-share.numerator // share.denominator)


def fsdp_policy(recipe: str) -> tuple[str, str]:
    """FSDP2's ``MixedPrecisionPolicy`` dtypes (param_dtype, reduce_dtype) for ``recipe``: :data:`FSDP_POLICIES`."""
    return FSDP_POLICIES[get_recipe(recipe).name]


def hybrid_groups(world_size: int, shard_group_size: int | None) -> tuple[int, int]:
    """Hybrid sharding's mesh: (replica groups, ranks per shard group). Parameters, gradients and optimizer state
    are sharded within a group of ``shard_group_size`` ranks (a node) and replicated across the groups."""
    n = positive_int("world_size", world_size)
    if shard_group_size is None:
        raise ValueError("shard_group_size=None: hybrid sharding needs the ranks per shard group (e.g. per node)")
    g = positive_int("shard_group_size", shard_group_size)
    if g < 2:
        raise ValueError(f"shard_group_size={g} shards nothing: that is ddp")
    if n % g:
        raise ValueError(f"shard_group_size={g} must divide world_size={n}")
    return n // g, g


def shard_elements(n_elements: int, world_size: int) -> int:
    """Elements per rank of a flat buffer of ``n_elements`` sharded over ``world_size`` ranks (padded up)."""
    positive_int("n_elements", n_elements)
    n = positive_int("world_size", world_size)
    if n > n_elements:
        raise ValueError(f"world_size={n} exceeds the {n_elements} elements to shard: some ranks would hold nothing")
    return -(-n_elements // n)


@dataclass(frozen=True)
class ShardedStates:
    """One rank's model states under a sharding scheme, plus what the scheme adds (DDP's gradient buckets)."""

    states: ModelStates
    buckets: int
    sharding: str
    world_size: int

    @property
    def total(self) -> int:
        return self.states.total + self.buckets


def sharded_state_bytes(n_params: int, *, recipe: str = "32-true", optimizer: str = "adamw", world_size: int = 1,
                        sharding: str = "ddp", gradient_as_bucket_view: bool = False,
                        shard_group_size: int | None = None) -> ShardedStates:
    """Per-rank bytes of parameters, gradients, master weights and optimizer state (at rest, between steps).

    Check (ZeRO, Fig. 1, 7.5B parameters, mixed precision Adam, 64 GPUs): ``zero1`` 31.4 GB, ``zero2`` 16.6 GB,
    ``zero3`` 1.9 GB per GPU, from 120 GB with ``ddp``.
    """
    one_of("sharding", sharding, SHARDINGS)
    n = positive_int("world_size", world_size)
    if sharding == "hsdp":  # per rank, the states of fsdp over one shard group
        n = hybrid_groups(n, shard_group_size)[1]
        inner = sharded_state_bytes(n_params, recipe=recipe, optimizer=optimizer, world_size=n, sharding="fsdp")
        return ShardedStates(inner.states, 0, sharding, world_size)
    full = model_state_bytes(n_params, recipe, optimizer)
    params, grads = full.params, full.grads
    master, opt = full.master_params, full.optimizer
    if sharding != "ddp":  # ddp replicates: any world size; the others need an element per rank
        shard = model_state_bytes(shard_elements(n_params, n), recipe, optimizer)
        master, opt = shard.master_params, shard.optimizer
    if sharding in ("zero2", "zero3", "fsdp", "fsdp-grad-op"):
        grads = shard.grads
    if sharding in ("zero3", "fsdp", "fsdp-grad-op"):
        params = shard.params
    buckets = full.grads if sharding == "ddp" and not gradient_as_bucket_view and n > 1 else 0
    return ShardedStates(ModelStates(params, grads, master, opt), buckets, sharding, n)


def collective_payloads(n_params: int, *, recipe: str = "32-true", world_size: int = 2, sharding: str = "ddp",
                        root_params: int = 0, shard_group_size: int | None = None,
                        root_regathered: bool = False) -> dict[str, int]:
    """Bytes handed to each kind of collective per optimizer step (the gathered output of an all-gather, the full
    input of a reduce-scatter or all-reduce), summed over the step's calls.

    ``ddp``, ``zero1``: all-reduce of the gradients (ZeRO-1 then updates its shard and all-gathers the parameters).
    ``zero2``: reduce-scatter of the gradients, all-gather of the updated parameters. ``zero3``/``fsdp``: all-gather
    of every unit's parameters for the forward and again for the backward, except the root unit's
    (``root_params``: FSDP2 keeps the root's parameters gathered from forward to backward), and reduce-scatter of
    the gradients (ZeRO's 3 psi). ``fsdp-grad-op``: one all-gather, one reduce-scatter.
    ``hsdp``: those of ``fsdp`` within a shard group of ``shard_group_size`` ranks, and an all-reduce of each
    rank's gradient shard across the groups. Under FSDP, gathers are in FSDP2's ``param_dtype`` and reductions in
    its ``reduce_dtype`` (:func:`fsdp_policy`). ``root_regathered``: the root unit is gathered for the backward as
    well.
    NB: one micro-batch; with accumulation DDP and ZeRO-1/2 reduce once per step, FSDP gathers per micro-batch.
    """
    one_of("sharding", sharding, SHARDINGS)
    n = positive_int("world_size", world_size)
    r = get_recipe(recipe)
    if sharding == "hsdp":
        replicas, group = hybrid_groups(n, shard_group_size)
        inner = collective_payloads(n_params, recipe=recipe, world_size=group, sharding="fsdp",
                                    root_params=root_params, root_regathered=root_regathered)
        if replicas > 1:
            inner["all_reduce"] = shard_elements(n_params, group) * dtype_bytes(fsdp_policy(recipe)[1])
        return inner
    if sharding == "ddp":  # replicated: no shards, any world size
        return {"all_reduce": positive_int("n_params", n_params) * dtype_bytes(r.grad_dtype)}
    padded = shard_elements(n_params, n) * n
    grads = padded * dtype_bytes(r.grad_dtype)
    params = padded * dtype_bytes(r.param_dtype)
    if sharding == "zero1":
        return {"all_reduce": grads, "all_gather": params}
    if sharding == "zero2":
        return {"reduce_scatter": grads, "all_gather": params}
    if sharding == "fsdp-grad-op":
        return {"all_gather": params, "reduce_scatter": grads}
    if not 0 <= root_params <= n_params:
        raise ValueError(f"root_params={root_params} must be between 0 and n_params={n_params}")
    gather, reduce = (dtype_bytes(d) for d in fsdp_policy(recipe))
    params, grads = padded * gather, padded * reduce
    root = 0 if root_regathered else root_params * gather
    return {"all_gather": 2 * params - root, "reduce_scatter": grads}


def communication_bytes(n_params: int, *, recipe: str = "32-true", world_size: int = 1, sharding: str = "ddp",
                        root_params: int = 0, shard_group_size: int | None = None) -> dict[str, int]:
    """Bytes one rank sends per optimizer step, by collective: :func:`collective_payloads` through the ring
    algorithms' send volumes (under ``hsdp`` the gathers and reduce-scatters run over a shard group, the all-reduce
    over the replicas). Empty for one rank."""
    if positive_int("world_size", world_size) == 1:
        return {}
    send = {"all_reduce": all_reduce_bytes, "all_gather": all_gather_bytes, "reduce_scatter": reduce_scatter_bytes}
    payloads = collective_payloads(n_params, recipe=recipe, world_size=world_size, sharding=sharding,
                                   root_params=root_params, shard_group_size=shard_group_size)
    return {name: send[name](size, collective_ranks(name, sharding, world_size, shard_group_size))
            for name, size in payloads.items()}


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def collective_ranks(collective: str, sharding: str, world_size: int, shard_group_size: int | None = None) -> int:
    """The ranks one collective of a step runs over: the world, or under ``hsdp`` a shard group (gathers and
    reduce-scatters) or the replicas of a shard (the all-reduce)."""
    one_of("collective", collective, COLLECTIVES)
    if one_of("sharding", sharding, SHARDINGS) != "hsdp":
        return positive_int("world_size", world_size)
    replicas, group = hybrid_groups(world_size, shard_group_size)
    return replicas if collective == "all_reduce" else group


@dataclass(frozen=True)
class Interconnect:
    """A link between ranks for the alpha-beta model: ``bandwidth`` bytes/s one rank sends (one direction),
    ``step_latency`` seconds per ring step and ``base_latency`` seconds per collective call, with their sources."""

    name: str
    bandwidth: float
    bandwidth_source: str
    step_latency: float
    base_latency: float
    latency_source: str


_NCCL_TUNING = ("NCCL src/graph/tuning.cc, Ring/Simple: baseLat 8.4 us per collective; hwLat per ring step "
                "NVLink 5.7 us, PCI 5.7 us, NET 6.6 us")
INTERCONNECTS: dict[str, Interconnect] = {
    "nvlink4": Interconnect(
        "NVLink 4 / NVSwitch (H100 SXM)", 450e9,
        "NVIDIA H100 Tensor Core GPU datasheet: NVLink 900 GB/s per GPU, both directions (450 GB/s each way)",
        5.7e-6, 8.4e-6, _NCCL_TUNING),
    "pcie5": Interconnect(
        "PCIe Gen5 x16", 64e9,
        "PCI-SIG PCI Express 5.0: 32 GT/s per lane, x16 = 64 GB/s per direction (before 128b/130b encoding)",
        5.7e-6, 8.4e-6, _NCCL_TUNING),
    "ib-ndr400": Interconnect(
        "InfiniBand NDR 400 Gb/s (one port per GPU)", 50e9,
        "NVIDIA ConnectX-7 and Quantum-2 datasheets: NDR 400 Gb/s per port = 50 GB/s per direction",
        6.6e-6, 8.4e-6, _NCCL_TUNING),
}


def get_interconnect(name: str) -> Interconnect:
    """The link called ``name`` in :data:`INTERCONNECTS`; ValueError listing them when there is none."""
    return INTERCONNECTS[one_of("interconnect", name, INTERCONNECTS)]


def ring_steps(collective: str, world_size: int) -> int:
    """Steps of the ring algorithm: 2 (N - 1) for an all-reduce, N - 1 for an all-gather or reduce-scatter."""
    n = positive_int("world_size", world_size)
    return (2 if one_of("collective", collective, COLLECTIVES) == "all_reduce" else 1) * (n - 1)


def collective_seconds(collective: str, payload: int, world_size: int, interconnect: str, *, calls: int = 1) -> float:
    """Alpha-beta time of ``calls`` ring collectives moving ``payload`` bytes in all (the convention of
    :func:`collective_payloads`) over ``world_size`` ranks on ``interconnect``: the bytes one rank sends over the
    link's bandwidth, plus, per call, the base latency and the latency of every ring step. 0 on one rank."""
    n = positive_int("world_size", world_size)
    link = get_interconnect(interconnect)
    k = positive_int("calls", calls)
    if n == 1:
        return 0.0
    sent = all_reduce_bytes(payload, n) if collective == "all_reduce" else _ring(payload, n)
    steps = ring_steps(collective, n)
    return communication_seconds(sent, link.bandwidth, world_size=n, latency=link.step_latency,
                                 steps=k * steps) + k * link.base_latency


def step_communication_seconds(payloads: dict[str, int], *, sharding: str, world_size: int, interconnect: str,
                               calls: dict[str, int] | None = None, shard_group_size: int | None = None,
                               inter_node: str | None = None) -> dict[str, float]:
    """Seconds of each collective of one optimizer step (``payloads`` as :func:`collective_payloads` gives them;
    ``calls`` the number of calls of each, default one) on ``interconnect``; under ``hsdp`` the all-reduce across
    shard groups runs on ``inter_node`` (default ``interconnect``). Whether it hides behind compute is the step-time
    model's to say."""
    out: dict[str, float] = {}
    for name, size in payloads.items():
        n = collective_ranks(name, sharding, world_size, shard_group_size)
        link = inter_node if (sharding == "hsdp" and name == "all_reduce" and inter_node) else interconnect
        out[name] = collective_seconds(name, size, n, link, calls=(calls or {}).get(name, 1))
    return out


def communication_seconds(bytes_sent: int, link_bandwidth: float, *, world_size: int = 2,
                          latency: float = 0.0, steps: int | None = None) -> float:
    """Time to send ``bytes_sent`` per rank over a link of ``link_bandwidth`` bytes/s, plus ``latency`` per ring step
    (2 (N - 1) steps for an all-reduce unless ``steps`` is given): the alpha-beta model."""
    positive_number("link_bandwidth", link_bandwidth)
    n = positive_int("world_size", world_size)
    ring_steps = 2 * (n - 1) if steps is None else steps
    return bytes_sent / link_bandwidth + latency * ring_steps


def bus_bandwidth(algorithm_bandwidth: float, world_size: int, collective: str = "all_reduce") -> float:
    """nccl-tests' bus bandwidth from algorithm bandwidth (size / time): x 2(N-1)/N for all-reduce, x (N-1)/N for
    all-gather and reduce-scatter."""
    n = positive_int("world_size", world_size)
    factor = {"all_reduce": Fraction(2 * (n - 1), n), "all_gather": Fraction(n - 1, n),
              "reduce_scatter": Fraction(n - 1, n)}[one_of("collective", collective,
                                                              ("all_reduce", "all_gather", "reduce_scatter"))]
    return algorithm_bandwidth * float(factor)


def fsdp_step_phases(
    n_params: int,
    unit_params: list[int],
    root_params: int,
    *,
    saved: int,
    saved_per_unit: int,
    logits: int,
    head_grads: int,
    optimizer_temps: int,
    recipe: str = "32-true",
    optimizer: str = "adamw",
    world_size: int = 2,
) -> dict[str, int]:
    """Per-rank peak bytes of one FSDP2 (FULL_SHARD) training step, by moment.

    ``unit_params``: parameters of each wrapped unit in forward order; ``root_params``: the root unit's, which FSDP2
    keeps gathered from forward to backward. ``saved``/``logits``/``head_grads``: what one device holds at the start
    of the backward (see :mod:`torchledger.formulas.peak`), ``saved_per_unit`` the activations each unit saves.

    - ``backward`` start: sharded states, the root gathered, everything saved, the logits and their gradients, and
      the last unit gathered again (prefetched) for its backward;
    - each unit's backward: its gathered parameters, its full gradient (the reduce-scatter input) and gradient shard
      (the output), the next unit prefetched, the gradient shards of the units already done and the activations of
      the units not yet done;
    - ``backward_overlapped``: the same with the previous unit's reduce-scatter still in flight, which happens or
      not from run to run (collectives are asynchronous): the measured peak lies between ``backward`` and it;
    - ``optimizer``: sharded states and gradients, and the optimizer's temporaries over the shard.
    NB: checked against two gloo ranks on the CPU (MLP, gpt-tiny) within 2% of that range; FSDP's communication
    buffers on NCCL differ.
    """
    n = positive_int("world_size", world_size)
    r = get_recipe(recipe)
    p, g = dtype_bytes(r.param_dtype), dtype_bytes(r.grad_dtype)
    sh = sharded_state_bytes(n_params, recipe=recipe, optimizer=optimizer, world_size=n, sharding="fsdp").states
    persistent = sh.params + sh.master_params + sh.optimizer
    root_gathered = root_params * p - (-(-root_params // n)) * p
    start = persistent + root_gathered + saved + logits + head_grads + (unit_params[-1] * p if unit_params else 0)
    inner = overlapped = 0
    done = -(-root_params // n) * g
    for i in reversed(range(len(unit_params))):
        u = unit_params[i]
        prefetch = unit_params[i - 1] * p if i > 0 else 0
        moment = (persistent + root_gathered + done + u * p + u * g + -(-u // n) * g + prefetch
                  + saved_per_unit * (i + 1) + logits)
        inner = max(inner, moment)
        # the reduce-scatter of the unit done just before may still be in flight (its input not yet freed)
        in_flight = unit_params[i + 1] * g if i + 1 < len(unit_params) else 0
        overlapped = max(overlapped, moment + in_flight)
        done += -(-u // n) * g
    return {"backward": max(start, inner), "backward_overlapped": max(start, overlapped),
            "optimizer": persistent + sh.grads + -(-optimizer_temps // n)}
