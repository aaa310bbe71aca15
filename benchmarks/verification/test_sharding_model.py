"""The per-rank memory model of every sharding (``formulas.sharded_peak``), its consistency, and the communication
time of each collective (``formulas.distributed``), from first principles and the cited figures."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from benchmarks.verification.test_memory_random import RANDOM, SEED
from torchledger.cli import main
from torchledger.formulas import distributed as D
from torchledger.formulas.estimate import estimate
from torchledger.formulas.sharded_peak import hsdp_all_reduce_buffer_bytes
from torchledger.formulas.specs import get_preset, param_counts
from torchledger.formulas.vocabulary import STEP_CHECKPOINTING

GB = 10**9


def _peak(model: str, sharding: str, world: int, checkpointing: str = "none", group: int | None = None,
          precision: str = "bf16-mixed", grad_accum: int = 1) -> int:
    return estimate(get_preset(model), 4, 2048, precision=precision, checkpointing=checkpointing,
                    grad_accum=grad_accum, world_size=world, sharding=sharding, shard_group_size=group
                    ).peak_per_rank


@pytest.mark.parametrize("checkpointing", STEP_CHECKPOINTING)
@pytest.mark.parametrize(("model", "world"), [("llama-7b", 8), ("llama-7b", 64), ("llama-13b", 16)])
def test_more_sharding_never_needs_more(model: str, world: int, checkpointing: str) -> None:
    peaks = {s: _peak(model, s, world, checkpointing) for s in ("ddp", "zero1", "zero2", "fsdp")}
    # each scheme shards a superset of the previous one's states
    assert peaks["fsdp"] <= peaks["zero2"] <= peaks["zero1"] <= peaks["ddp"], peaks


@pytest.mark.parametrize("checkpointing", STEP_CHECKPOINTING)
def test_grad_op_holds_zero2_states_plus_the_parameter_shards(checkpointing: str) -> None:
    # SHARD_GRAD_OP and ZeRO-2 both hold every parameter whole from the forward to the backward and shard the
    # gradients and optimizer state; SHARD_GRAD_OP keeps each rank's fp32 parameter shard besides (FSDP2 gathers
    # into new storage): LLaMA-7B over 8 ranks, 6,738,415,616 / 8 = 842,301,952 elements x 4 bytes
    spec = get_preset("llama-7b")
    n, world = param_counts(spec).total, 8
    counts = param_counts(spec)
    shards = (spec.n_layers * -(-counts.per_layer // world) + -(-(n - counts.layers) // world)) * 4
    assert shards == 842_301_952 * 4
    grad_op = _peak("llama-7b", "fsdp-grad-op", world, checkpointing)
    zero2 = _peak("llama-7b", "zero2", world, checkpointing)
    if checkpointing == "none":  # both peak at the start of the backward, every block gathered
        assert grad_op - zero2 == shards
    else:  # the forward's last all-gather output is still held at the loss (the root frees it after the loss)
        assert 0 < grad_op - zero2 <= shards + counts.per_layer * 4


@settings(max_examples=25, derandomize=not RANDOM, deadline=None, database=None)
@given(model=st.sampled_from(["llama-tiny", "gpt-tiny", "llama-7b", "gpt2-small"]),
       group=st.sampled_from([2, 4, 8]), replicas=st.sampled_from([2, 4, 8]),
       checkpointing=st.sampled_from(STEP_CHECKPOINTING), grad_accum=st.integers(1, 3),
       precision=st.sampled_from(["32-true", "bf16-mixed", "bf16-true", "16-mixed"]))
def test_equal_states_give_equal_figures(model: str, group: int, replicas: int, checkpointing: str, grad_accum: int,
                                         precision: str) -> None:
    spec = get_preset(model)
    seq = min(256, spec.max_seq_len)

    def rank(sharding: str, world: int, g: int | None = None) -> dict[str, int]:
        return estimate(spec, 2, seq, precision=precision, checkpointing=checkpointing, grad_accum=grad_accum,
                        world_size=world, sharding=sharding, shard_group_size=g).phases_per_rank

    # zero3 and fsdp name the same states; hybrid sharding holds, per rank, what fsdp over one group holds, and in
    # a later micro-batch's backward the all-reduce buffers of the blocks already reduced (at most all of them: one
    # fp32 shard each under these recipes' policies, the reduce dtype being the parameters')
    assert rank("zero3", group) == rank("fsdp", group)
    hsdp, fsdp = rank("hsdp", group * replicas, group), rank("fsdp", group)
    if grad_accum == 1:
        assert hsdp == fsdp
    else:
        assert hsdp["forward"] == fsdp["forward"] and hsdp["optimizer"] == fsdp["optimizer"]
        block_shard = -(-param_counts(spec).per_layer // group)
        reduce_bytes = 2 if precision == "bf16-true" else 4
        assert 0 <= hsdp["backward"] - fsdp["backward"] <= spec.n_layers * block_shard * reduce_bytes


if RANDOM:  # TORCHLEDGER_RANDOM_SEED picks the examples (see test_memory_random.py)
    test_equal_states_give_equal_figures = hypothesis_seed(SEED)(test_equal_states_give_equal_figures)


def test_checkpointing_keeps_only_the_block_inputs() -> None:
    # LLaMA-7B over 8 ranks, FSDP: full checkpointing saves each block's input (4 x 2048 x 4096 fp32 = 128 MiB)
    # instead of its activations (1.86 GB a block), so the peak drops by most of 32 blocks' saved tensors; not all:
    # autocast's cache of 16-bit weight copies (13.2 GB) lives to the end of the forward either way, where the
    # checkpointed step now peaks (a model that kept each block's saved tensors, as FSDP's phases once did, fails)
    none, full = _peak("llama-7b", "fsdp", 8, "none"), _peak("llama-7b", "fsdp", 8, "full")
    saved_per_block = estimate(get_preset("llama-7b"), 4, 2048, precision="bf16-mixed").peak.activations.per_layer
    assert none - full > 25 * (saved_per_block - 4 * 2048 * 4096 * 4)


# ------------------------------------------------------------------------------------------------ communication


def test_collective_seconds_from_the_cited_figures() -> None:
    link = D.INTERCONNECTS["nvlink4"]
    assert link.bandwidth == 450e9 and "datasheet" in link.bandwidth_source
    assert "tuning.cc" in link.latency_source
    # an all-gather of 1 GB over 8 ranks: each rank sends 7/8 GB over 450 GB/s, 7 ring steps of 5.7 us, 8.4 us base
    assert D.collective_seconds("all_gather", GB, 8, "nvlink4") == pytest.approx(0.875e9 / 450e9 + 7 * 5.7e-6
                                                                                  + 8.4e-6)
    # an all-reduce of 1 GB over 16 ranks on InfiniBand NDR (50 GB/s): 2 x 15/16 GB, 30 steps of 6.6 us
    assert D.collective_seconds("all_reduce", GB, 16, "ib-ndr400") == pytest.approx(1.875e9 / 50e9 + 30 * 6.6e-6
                                                                                     + 8.4e-6)
    # 33 calls pay 33 base latencies and 33 x 7 steps
    assert D.collective_seconds("reduce_scatter", GB, 8, "pcie5", calls=33) == pytest.approx(
        0.875e9 / 64e9 + 33 * (7 * 5.7e-6 + 8.4e-6))
    assert D.collective_seconds("all_reduce", GB, 1, "nvlink4") == 0.0
    # the existing pure function is unchanged: 1.75 GB at 100 GB/s plus 14 ring steps of 5 us
    assert D.communication_seconds(1_750_000_000, 100e9, world_size=8, latency=5e-6) == pytest.approx(0.01757)


def test_hybrid_payloads_and_groups() -> None:
    # LLaMA-7B in bf16-true over 4 nodes of 8: gathers and reduce-scatters within a node, the gradient shard
    # (n / 8 elements, bf16) all-reduced across the 4 nodes
    n = 6_738_415_616
    payloads = D.collective_payloads(n, recipe="bf16-true", world_size=32, sharding="hsdp", shard_group_size=8)
    assert payloads == {"all_gather": 2 * 2 * n, "reduce_scatter": 2 * n, "all_reduce": 2 * n // 8}
    assert D.collective_ranks("all_reduce", "hsdp", 32, 8) == 4
    assert D.collective_ranks("all_gather", "hsdp", 32, 8) == 8
    sent = D.communication_bytes(n, recipe="bf16-true", world_size=32, sharding="hsdp", shard_group_size=8)
    assert sent["all_reduce"] == 2 * (2 * n // 8) * 3 // 4  # ring all-reduce over 4 ranks: 2 x 3/4 of the shard
    seconds = D.step_communication_seconds(payloads, sharding="hsdp", world_size=32, shard_group_size=8,
                                           interconnect="nvlink4", inter_node="ib-ndr400")
    assert seconds["all_reduce"] == pytest.approx(sent["all_reduce"] / 50e9 + 6 * 6.6e-6 + 8.4e-6)


def test_hsdp_keeps_its_all_reduce_buffers() -> None:
    # FSDP2 (_fsdp_param_group.py, AllReduceState) keeps each reduced unit's all-reduce buffer, one gradient shard
    # in reduce_dtype, to the end of the backward; beyond the gradient itself only in a later micro-batch (the new
    # shard is added into the kept one) or where the reduce dtype is not the parameters' (the gradient is a cast)
    assert hsdp_all_reduce_buffer_bytes(1000, "bf16-mixed", later_micro_batch=False) == 0  # fp32 = the gradient
    assert hsdp_all_reduce_buffer_bytes(1000, "bf16-mixed", later_micro_batch=True) == 1000 * 4
    assert hsdp_all_reduce_buffer_bytes(1000, "bf16-true", later_micro_batch=True) == 1000 * 2
    for later in (False, True):  # bf16 parameters reduced in fp32
        assert hsdp_all_reduce_buffer_bytes(1000, "bf16-mixed-master", later_micro_batch=later) == 1000 * 4
    with pytest.raises(ValueError, match="shard_elements=-1"):
        hsdp_all_reduce_buffer_bytes(-1, "bf16-mixed", later_micro_batch=True)
    with pytest.raises(ValueError, match="fp64"):
        hsdp_all_reduce_buffer_bytes(1, "fp64", later_micro_batch=True)

    # LLaMA-7B, bf16-mixed, 2 micro-batches of 2 x 256 tokens, 16 ranks in groups of 4 against fsdp over 4 ranks:
    # both peak in the second micro-batch's backward at block 30, block 31 already reduced, where hybrid sharding
    # also keeps block 31's all-reduce buffer: a quarter of a block's 4 d^2 + 3 d d_ff + 2 d elements, in fp32
    d, d_ff = 4096, 11008
    block = 4 * d * d + 3 * d * d_ff + 2 * d
    assert block == 202_383_360
    kw = dict(precision="bf16-mixed", grad_accum=2)
    hsdp = estimate(get_preset("llama-7b"), 2, 256, world_size=16, sharding="hsdp", shard_group_size=4, **kw)
    fsdp = estimate(get_preset("llama-7b"), 2, 256, world_size=4, sharding="fsdp", **kw)
    assert hsdp.rank_peak is not None and fsdp.rank_peak is not None
    moment = "backward: block 30 attn.q weight grad cast (micro-batch 2)"
    assert hsdp.rank_peak.moment == fsdp.rank_peak.moment == moment
    assert hsdp.peak_per_rank - fsdp.peak_per_rank == block // 4 * 4
    # one micro-batch: the reduce output is the gradient shard itself, nothing kept beside it
    one = dict(precision="bf16-mixed", grad_accum=1)
    assert estimate(get_preset("llama-7b"), 2, 256, world_size=16, sharding="hsdp", shard_group_size=4,
                    **one).peak_per_rank == estimate(get_preset("llama-7b"), 2, 256, world_size=4, sharding="fsdp",
                                                     **one).peak_per_rank


def test_fsdp_policy_dtypes() -> None:
    # what each recipe's FSDP2 MixedPrecisionPolicy gathers and reduces in
    assert D.fsdp_policy("bf16-mixed") == ("float32", "float32")  # autocast over fp32 parameters
    assert D.fsdp_policy("bf16-true") == ("bfloat16", "bfloat16")
    assert D.fsdp_policy("bf16-mixed-master") == ("bfloat16", "float32")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: D.hybrid_groups(8, None), "shard_group_size=None"),
        (lambda: D.hybrid_groups(8, 3), "shard_group_size=3 must divide world_size=8"),
        (lambda: D.hybrid_groups(8, 1), "shard_group_size=1"),
        (lambda: D.collective_seconds("all_gather", 10, 2, "carrier-pigeon"), "interconnect='carrier-pigeon'"),
        (lambda: D.collective_seconds("broadcast", 10, 2, "nvlink4"), "collective='broadcast'"),
        (lambda: D.collective_seconds("all_gather", 10, 2, "nvlink4", calls=0), "calls=0"),
    ],
)
def test_bad_arguments(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


# ------------------------------------------------------------------------------------------------ the CLI


def test_estimate_reports_communication_time(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["estimate", "--model", "llama-7b", "--batch-size", "4", "--seq-len", "2048", "--precision", "bf16-mixed",
            "--world-size", "8", "--sharding", "fsdp", "--interconnect", "nvlink4", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    n = 6_738_415_616
    root = n - 32 * 202_383_360  # embeddings, final norm, head
    # FULL_SHARD in fp32 (bf16-mixed keeps fp32 parameters): every block gathered twice, the root once
    assert out["communication"]["all_gather"] == (2 * n - root) * 4 * 7 // 8
    time = out["communication_time"]
    assert time["interconnect"] == "nvlink4" and time["calls"] == {"all_gather": 65, "reduce_scatter": 33}
    assert time["seconds"]["all_gather"] == pytest.approx((2 * n - root) * 4 * 7 / 8 / 450e9
                                                          + 65 * (7 * 5.7e-6 + 8.4e-6))
    assert time["seconds"]["total"] == pytest.approx(time["seconds"]["all_gather"] + time["seconds"]["reduce_scatter"])
    assert out["memory"]["peak_train"] == _peak("llama-7b", "fsdp", 8)
    assert main(args[:-1]) == 0
    assert "time per step on nvlink4: all_gather" in capsys.readouterr().out
    # hybrid sharding over 4 nodes of 8: the all-reduce of each gradient shard (fp32, n / 8 elements) across the
    # nodes on InfiniBand NDR: 2 x 3/4 of the shard at 50 GB/s, 6 ring steps of 6.6 us, one call per unit
    hybrid = ["estimate", "--model", "llama-7b", "--batch-size", "4", "--seq-len", "2048", "--precision",
              "bf16-mixed", "--world-size", "32", "--sharding", "hsdp", "--shard-group-size", "8", "--interconnect",
              "nvlink4", "--inter-node", "ib-ndr400", "--json"]
    assert main(hybrid) == 0
    seconds = json.loads(capsys.readouterr().out)["communication_time"]["seconds"]
    shard = n // 8 * 4
    assert seconds["all_reduce"] == pytest.approx(2 * shard * 3 / 4 / 50e9 + 33 * (6 * 6.6e-6 + 8.4e-6))


@pytest.mark.parametrize(
    "args",
    [
        ["--sharding", "fsdp"],  # no --world-size: a single device has nothing to shard
        ["--sharding", "zero2", "--grad-accum", "2"],
        ["--world-size", "8", "--sharding", "hsdp"],  # no --shard-group-size
        ["--world-size", "8", "--sharding", "hsdp", "--shard-group-size", "3"],
        ["--world-size", "8", "--sharding", "fsdp", "--shard-group-size", "4"],
        ["--interconnect", "nvlink4"],
        ["--world-size", "8", "--interconnect", "token-ring"],
        ["--world-size", "8", "--sharding", "fsdp", "--interconnect", "nvlink4", "--inter-node", "ib-ndr400"],
    ],
)
def test_estimate_sharding_bad_usage(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model", "llama-7b", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
