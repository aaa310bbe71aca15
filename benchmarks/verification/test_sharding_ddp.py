"""One rank of a DDP job and of ZeroRedundancyOptimizer (ZeRO-1, whole tensors per rank) over DDP, simulated
(PyTorch's own DistributedDataParallel and ZeroRedundancyOptimizer over a fake process group, under FakeTensorMode)
and measured with the storage tracker, against the per-rank estimate: its peak, its gradient buckets, and the bytes
it hands to each kind of collective against the formula.

Configurations are drawn at random (seeded as in ``test_memory_random.py``): both families, 1-3 blocks, any widths
(DDP and ZeroRedundancyOptimizer pad nothing), every recipe the simulation runs, every optimizer and implementation,
every checkpointing mode, accumulation 1-2, 2 to 16 ranks.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from hypothesis import strategies as st

from benchmarks.verification.test_memory_random import draw_sample
from torchledger.cli import main
from torchledger.formulas.distributed import collective_payloads
from torchledger.formulas.estimate import estimate
from torchledger.formulas.specs import ModelSpec, get_preset, param_counts
from torchledger.formulas.timeline import StepConfig
from torchledger.formulas.vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, STEP_CHECKPOINTING
from torchledger.formulas.zero_redundancy import (
    parameter_tensor_sizes,
    zero_redundancy_partition,
    zero_redundancy_payloads,
    zero_redundancy_rank_peak,
)
from torchledger.measuring.distributed import ShardedMeasurement, simulate_sharded
from torchledger.measuring.training import MemoryCase, relative_error
from torchledger.workloads.train_step import TrainConfig

TOLERANCE, SAMPLE = 0.02, 12
SIM_RECIPES = ("32-true", "bf16-mixed", "bf16-true", "16-true")

# llama-tiny: vocab 1000, d_model 128, 2 blocks, 4 heads of 32 with 2 KV heads (k, v: 64 x 128), d_ff 344
LLAMA_TINY_BLOCK = [128, 128 * 128, 64 * 128, 64 * 128, 128 * 128, 128, 344 * 128, 344 * 128, 128 * 344]
LLAMA_TINY = [1000 * 128, *LLAMA_TINY_BLOCK * 2, 128, 1000 * 128]  # embedding, blocks, final norm, head
N_LLAMA_TINY = 2 * 128_000 + 2 * (2 * 128 + 2 * 16_384 + 2 * 8_192 + 3 * 44_032) + 128  # 619,136


def _predict(case: MemoryCase, sharding: str, world: int) -> tuple[int, dict[str, int]]:
    c = case.config
    spec = case.transformer_spec()
    n = param_counts(spec).total
    if sharding == "zero1":
        config = StepConfig(c.precision, c.optimizer, c.optimizer_impl, c.checkpointing, c.grad_accum)
        peak = zero_redundancy_rank_peak(spec, case.batch, case.seq_len, config, world_size=world).peak
        return peak, zero_redundancy_payloads(n, recipe=c.precision)
    predicted = estimate(spec, case.batch, case.seq_len, precision=c.precision, optimizer=c.optimizer,
                         checkpointing=c.checkpointing, grad_accum=c.grad_accum, world_size=world,
                         sharding=sharding, optimizer_impl=c.optimizer_impl, device="cpu")
    return predicted.peak_per_rank, collective_payloads(n, recipe=c.precision, world_size=world, sharding=sharding)


def _compare(case: MemoryCase, sharding: str, world: int) -> tuple[float, str, ShardedMeasurement]:
    peak, payloads = _predict(case, sharding, world)
    measured = simulate_sharded(case, world_size=world, sharding=sharding)
    err = relative_error(peak, measured.memory.peak)
    report = (f"{100 * err:.3f}% apart: predicted {peak:,} B, measured {measured.memory.peak:,} B at "
              f"{measured.memory.peak_op} {measured.memory.by_category}; {sharding} over {world} ranks, "
              f"{case.transformer_spec()}, batch {case.batch} x {case.seq_len}, {case.config}")
    # DDP all-reduces every gradient once per step (the other micro-batches under no_sync); ZeroRedundancyOptimizer
    # then broadcasts every parameter from its owner
    assert measured.collective_payload == payloads, (measured.collective_payload, payloads, report)
    return err, report, measured


def test_llama_tiny_tensors_and_partition() -> None:
    spec = get_preset("llama-tiny")
    assert parameter_tensor_sizes(spec) == LLAMA_TINY
    assert sum(LLAMA_TINY) == N_LLAMA_TINY == param_counts(spec).total
    # largest first, each to the least loaded rank: the embedding and the head to ranks 0 and 1, the six 344 x 128
    # MLP matrices to ranks 2-7, the four 128 x 128 to ranks 2-5, the four 64 x 128 to ranks 6, 7, 6, 7, then the
    # five 128-element norms to ranks 2-6 (all at 44,032 + 16,384 = 44,032 + 2 x 8,192 = 60,416)
    owned = zero_redundancy_partition(LLAMA_TINY, 8)
    loads = [sum(LLAMA_TINY[i] for i in rank) for rank in owned]
    assert loads == [128_000, 128_000, *[60_416 + 128] * 5, 60_416]
    assert owned[0] == [0] and owned[1] == [len(LLAMA_TINY) - 1]
    # two ranks: 128,000 each first, then the rest alternately; every tensor owned once
    assert sorted(i for rank in zero_redundancy_partition(LLAMA_TINY, 2) for i in rank) == list(range(21))
    with pytest.raises(ValueError, match="world_size=0"):
        zero_redundancy_partition(LLAMA_TINY, 0)
    with pytest.raises(ValueError, match=r"config\.optimizer='lion'"):
        zero_redundancy_rank_peak(spec, 1, 16, StepConfig("32-true", "lion"), world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        zero_redundancy_rank_peak(spec, 1, 16, StepConfig(), world_size=2, rank=2)
    # Mixtral: a block's norm, q, k, v, o, norm, then the router and each expert's gate, up and down
    moe = get_preset("mixtral-tiny")
    d, f, kv, e = moe.d_model, moe.d_ff, moe.kv_dim, moe.n_experts
    block = [d, d * moe.q_dim, d * kv, d * kv, moe.q_dim * d, d, d * e, *[d * f, d * f, f * d] * e]
    assert parameter_tensor_sizes(moe) == [moe.vocab_size * d, *block * moe.n_layers, d, moe.vocab_size * d]
    with pytest.raises(ValueError, match="layout"):  # the reference model has no biases in a LLaMA
        parameter_tensor_sizes(dataclasses.replace(spec, bias=True))


def test_ddp_llama_tiny_on_8_ranks() -> None:
    case = MemoryCase("llama-tiny", 4, TrainConfig("bf16-mixed"), seq_len=64)
    err, report, measured = _compare(case, "ddp", 8)
    assert err <= TOLERANCE, report
    # the buckets hold every fp32 gradient: 619,136 x 4 B
    assert measured.memory.by_category["buckets"] == N_LLAMA_TINY * 4 == 2_476_544
    # two buckets, rebuilt in the order the gradients become ready: the first closes once it reaches 1 MiB
    # (head 512,000 B + final norm 512 + block 1's down, up and gate 3 x 176,128 + norm 512 + o_proj 65,536 =
    # 1,106,944 B), the rest (1,369,600 B) is under the 25 MiB cap
    assert measured.collective_payload == {"all_reduce": 2_476_544}
    assert measured.collective_calls == {"all_reduce": 2}


def test_zero_redundancy_llama_tiny_on_8_ranks() -> None:
    case = MemoryCase("llama-tiny", 4, TrainConfig("bf16-mixed"), seq_len=64)
    err, report, measured = _compare(case, "zero1", 8)
    assert err <= TOLERANCE, report
    # rank 0 owns the embedding alone: AdamW's two fp32 states of 128,000 elements and one step counter
    assert measured.memory.by_category["optimizer"] == 128_000 * 2 * 4 + 4
    # not the flat ZeRO-1's ceil(619,136 / 8) = 77,392 elements; and DDP's buckets beside it
    assert measured.memory.by_category["buckets"] == N_LLAMA_TINY * 4
    # the 21 tensors broadcast one by one from their owners, the gradients all-reduced in DDP's two buckets
    assert measured.collective_calls == {"all_reduce": 2, "broadcast": 21}


@st.composite
def replicated_cases(draw: st.DrawFn) -> tuple[MemoryCase, str, int]:
    sharding = draw(st.sampled_from(["ddp", "zero1"]))
    world = draw(st.sampled_from([2, 3, 4, 8, 16]))
    family = draw(st.sampled_from(["gpt2", "llama"]))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = 8 * draw(st.integers(1, 4))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])) if family == "llama" else heads
    d = heads * head_dim
    d_ff = draw(st.integers(16, 4 * d)) if family == "llama" else draw(st.sampled_from([0, 2 * d]))
    spec = ModelSpec(f"random-{family}", family, draw(st.integers(1, 3)), d, heads,  # type: ignore[arg-type]
                     vocab_size=draw(st.integers(32, 1024)), max_seq_len=128, n_kv_heads=kv, d_ff=d_ff)
    config = TrainConfig(draw(st.sampled_from(SIM_RECIPES)), draw(st.sampled_from(OPTIMIZERS)),
                         draw(st.sampled_from(OPTIMIZER_IMPLS)), draw(st.sampled_from(STEP_CHECKPOINTING)),
                         draw(st.integers(1, 2)))
    case = MemoryCase(spec.name, draw(st.integers(1, 4)), config, seq_len=draw(st.integers(8, 64)), spec=spec)
    return case, sharding, world


def _sample(n: int) -> list[tuple[MemoryCase, str, int]]:
    return draw_sample(replicated_cases(), n)


def test_random_replicated_ranks() -> None:
    """A sample of ``SAMPLE`` configurations: every one within 2%, every payload exact."""
    sample = _sample(SAMPLE)
    assert len(sample) >= SAMPLE - 2
    results = [_compare(*drawn)[:2] for drawn in sample]
    errors = sorted(err for err, _ in results)
    print(f"\n{len(errors)} replicated ranks: {sum(e <= TOLERANCE for e in errors)} within 2%, worst "
          f"{100 * errors[-1]:.3f}%")
    for err, report in results:
        assert err <= TOLERANCE, report


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", STEP_CHECKPOINTING)
@pytest.mark.parametrize("sharding", ["ddp", "zero1"])
def test_llama_7b_on_8_ranks(sharding: str, checkpointing: str) -> None:
    # LLaMA-7B, bf16-mixed, 4 x 2048 tokens per rank: about 20 s per configuration on a 2-core CPU
    case = MemoryCase("llama-7b", 4, TrainConfig("bf16-mixed", checkpointing=checkpointing), seq_len=2048)
    start = time.monotonic()
    err, report, measured = _compare(case, sharding, 8)
    print(f"llama-7b {sharding} {checkpointing}: {time.monotonic() - start:.1f} s; {report}")
    assert err <= TOLERANCE, report
    assert measured.memory.by_category["buckets"] == param_counts(get_preset("llama-7b")).total * 4


def test_measure_cli_simulates_a_ddp_rank(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["measure", "--simulate", "--model", "llama-tiny", "--batch-size", "2", "--seq-len", "32",
            "--precision", "bf16-true", "--world-size", "16", "--sharding", "ddp", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "simulated" and out["world_size"] == 16 and out["sharding"] == "ddp"
    assert abs(out["error_pct"]) <= 100 * TOLERANCE
    # every bf16 gradient all-reduced once, in DDP's buckets
    assert out["measured"]["collective_payload"] == {"all_reduce": N_LLAMA_TINY * 2}
    assert out["measured"]["by_category"]["buckets"] == N_LLAMA_TINY * 2
    # ZeroRedundancyOptimizer is not the flat ZeRO-1 the estimate models, and PyTorch has no ZeRO-2: one line, exit 2
    for sharding in ("zero1", "zero2"):
        assert main(["measure", "--simulate", "--model", "llama-tiny", "--world-size", "8", "--sharding",
                     sharding]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # one rank shards and reduces nothing (DDP would still build its buckets): bad usage, not a 1-rank "job"
    for sharding in ("ddp", "fsdp"):
        assert main(["measure", "--simulate", "--model", "llama-tiny", "--world-size", "1", "--sharding",
                     sharding]) == 2
        err = capsys.readouterr().err
        assert err.startswith("torchledger measure: error: --world-size 1") and len(err.strip().splitlines()) == 1
