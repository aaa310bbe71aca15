"""One rank of a sharded job, simulated (PyTorch's own FSDP2 over a fake process group, under FakeTensorMode) and
measured with the storage tracker, against the per-rank estimate: its peak, and the bytes it hands to each kind of
collective against the formula.

Configurations are drawn at random over the space the per-rank model claims (seeded as in
``test_memory_random.py``): both families, 1-3 blocks, every recipe the simulation runs (not ``16-mixed``, whose
GradScaler reads a value), every optimizer and implementation, every checkpointing mode, accumulation 1-2, FSDP
(``fsdp``/``zero3``), SHARD_GRAD_OP and hybrid sharding over 2, 4 or 8 ranks (not fused SGD: DTensor has no
rule for its kernel). Widths are multiples of the world
size: FSDP2 pads each tensor's first dimension to a multiple of N, which the model's per-unit shards
(``ceil(elements / N)``) equal only then.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import strategies as st

from benchmarks.verification.test_memory_random import draw_sample
from torchledger.cli import main
from torchledger.formulas.distributed import collective_payloads
from torchledger.formulas.estimate import estimate
from torchledger.formulas.specs import ModelSpec, get_preset, param_counts
from torchledger.formulas.vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, STEP_CHECKPOINTING
from torchledger.measuring.distributed import simulate_sharded
from torchledger.measuring.training import MemoryCase, relative_error
from torchledger.workloads.train_step import TrainConfig

TOLERANCE, HARD, SAMPLE = 0.02, 0.06, 24
SIM_RECIPES = ("32-true", "bf16-mixed", "bf16-true", "16-true")


@st.composite
def sharded_cases(draw: st.DrawFn) -> tuple[MemoryCase, str, int, int | None]:
    sharding = draw(st.sampled_from(["fsdp", "zero3", "fsdp-grad-op", "hsdp"]))
    world = draw(st.sampled_from([4, 8] if sharding == "hsdp" else [2, 4, 8]))
    group = draw(st.sampled_from([g for g in (2, 4) if g < world])) if sharding == "hsdp" else None
    family = draw(st.sampled_from(["gpt2", "llama"]))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = 8 * draw(st.integers(1, 4))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0 and h * head_dim % 8 == 0])) \
        if family == "llama" else heads
    d = heads * head_dim
    d_ff = 8 * draw(st.integers(2, d // 2)) if family == "llama" else draw(st.sampled_from([0, 2 * d]))
    spec = ModelSpec(f"random-{family}", family, draw(st.integers(1, 3)), d, heads,  # type: ignore[arg-type]
                     vocab_size=8 * draw(st.integers(4, 128)), max_seq_len=128, n_kv_heads=kv, d_ff=d_ff)
    optimizer = draw(st.sampled_from(OPTIMIZERS))
    # DTensor has no sharding rule for the fused SGD kernel (aten._fused_sgd_)
    impls = [i for i in OPTIMIZER_IMPLS if not (i == "fused" and optimizer in ("sgd", "momentum"))]
    config = TrainConfig(draw(st.sampled_from(SIM_RECIPES)), optimizer, draw(st.sampled_from(impls)),
                         draw(st.sampled_from(STEP_CHECKPOINTING)), draw(st.integers(1, 2)))
    case = MemoryCase(spec.name, draw(st.integers(1, 4)), config, seq_len=draw(st.integers(8, 64)), spec=spec)
    return case, sharding, world, group


def _compare(case: MemoryCase, sharding: str, world: int, group: int | None) -> tuple[float, str]:
    err, report, _, _ = _rank(case, sharding, world, group)
    return err, report


def _rank(case: MemoryCase, sharding: str, world: int, group: int | None) -> tuple[float, str, int, int]:
    """The relative error, its report, the predicted and the measured peak of one simulated rank."""
    c = case.config
    spec = case.transformer_spec()
    predicted = estimate(spec, case.batch, case.seq_len, precision=c.precision, optimizer=c.optimizer,
                         checkpointing=c.checkpointing, grad_accum=c.grad_accum, world_size=world,
                         sharding=sharding, optimizer_impl=c.optimizer_impl, device="cpu", shard_group_size=group)
    measured = simulate_sharded(case, world_size=world, sharding=sharding, shard_group_size=group)
    err = relative_error(predicted.peak_per_rank, measured.memory.peak)
    rank = predicted.rank_peak
    report = (f"{100 * err:.2f}% apart: predicted {predicted.peak_per_rank:,} B at "
              f"{rank.moment if rank else ''!r}, measured {measured.memory.peak:,} B at {measured.memory.peak_op} "
              f"{measured.memory.by_category}; {sharding} over {world} ranks (group {group}), {spec}, batch "
              f"{case.batch} x {case.seq_len}, {c}")
    # every collective's payload: each unit's parameters gathered (the root once: FSDP2 keeps it gathered from the
    # forward to the backward; under SHARD_GRAD_OP every unit once) and its gradients reduce-scattered, summed
    # over the micro-batches; under hsdp each rank's gradient shard all-reduced across the groups
    counts = param_counts(spec)
    formula = collective_payloads(counts.total, recipe=c.precision, world_size=world, sharding=sharding,
                                  root_params=counts.total - counts.layers, shard_group_size=group)
    per_micro_batch = {k: v * c.grad_accum for k, v in formula.items()}
    assert measured.collective_payload == per_micro_batch, (measured.collective_payload, per_micro_batch, report)
    return err, report, predicted.peak_per_rank, measured.memory.peak


def _sample(n: int) -> list[tuple[MemoryCase, str, int, int | None]]:
    return draw_sample(sharded_cases(), n)


def test_random_sharded_ranks() -> None:
    """A sample of ``SAMPLE`` configurations: at least 90% within 2%, every one within 6%, every payload exact.

    NB: over seeds 0-15 (384 configurations, the 16-bit ``*-true`` recipes among them) all 384 are within 2%, the
    worst 1.38%. Before the per-unit all-reduce buffers of hybrid sharding in a later micro-batch
    (``test_hybrid_sharding_keeps_all_reduce_buffers_in_a_later_micro_batch``), the walk's early frees
    (``test_the_walk_holds_what_the_step_still_holds``) and the CPU RMSNorm's op-by-op backward
    (``test_rms_norm_backward.py``) were modelled, 365 of the 32-true and bf16-mixed ones were, the worst 5.33%.
    """
    sample = _sample(SAMPLE)
    assert len(sample) >= SAMPLE - 2
    results = [_compare(*drawn) for drawn in sample]
    errors = sorted(err for err, _ in results)
    print(f"\n{len(errors)} sharded ranks: {sum(e <= TOLERANCE for e in errors)} within 2%, worst "
          f"{100 * errors[-1]:.2f}%")
    assert sum(e <= TOLERANCE for e in errors) >= 0.9 * len(errors), [r for e, r in results if e > TOLERANCE]
    for err, report in results:
        assert err <= HARD, report


@pytest.mark.parametrize(("spec", "batch", "seq_len", "config"), [
    # drawn by the random test (seeds 12 and 0), 3.97% and 5.08% apart while the model left the buffers out
    (ModelSpec("random-llama", "llama", 2, 128, 4, vocab_size=400, max_seq_len=128, n_kv_heads=2, d_ff=464), 1, 25,
     TrainConfig("bf16-mixed", "adam", "fused", "every-other", 2)),
    (ModelSpec("random-gpt2", "gpt2", 2, 64, 4, vocab_size=416, max_seq_len=128, d_ff=256), 1, 52,
     TrainConfig("32-true", "sgd", "foreach", "full", 2)),
])
def test_hybrid_sharding_keeps_all_reduce_buffers_in_a_later_micro_batch(spec: ModelSpec, batch: int, seq_len: int,
                                                                         config: TrainConfig) -> None:
    """Under hybrid sharding FSDP2 keeps each reduced block's all-reduce buffer (``AllReduceState``) to the end of
    the backward; in the second micro-batch that buffer is no longer the gradient (the new shard is added into the
    kept one), so the rank holds more than ``fsdp`` over one group does, by what the model says (within 1%)."""
    case = MemoryCase(spec.name, batch, config, seq_len=seq_len, spec=spec)
    err, report, predicted, measured = _rank(case, "hsdp", 4, 2)
    assert err <= TOLERANCE, report
    _, _, predicted_fsdp, measured_fsdp = _rank(case, "fsdp", 2, None)
    held = measured - measured_fsdp
    assert held > 0
    # the two peaks fall at different moments, each with the single-device walk's few hundred bytes of error
    assert abs(held - (predicted - predicted_fsdp)) <= 0.01 * held, (held, predicted - predicted_fsdp, report)


@pytest.mark.parametrize(("spec", "batch", "seq_len", "config", "sharding", "world", "group"), [
    # drawn by the random test (seed 9), once 2.59% apart, 9,920 B short in the second micro-batch's recomputation of
    # block 1: the targets of both micro-batches (the caller's storage, 2 x 62 x 8 B, counted from its first view)
    # and the bf16 cast of the incoming gradient (2 x 62 x 32 x 2 B) that the residual add's backward makes before
    # the recomputation starts (the add saves nothing; non-reentrant checkpointing recomputes at the first unpack)
    (ModelSpec("random-llama", "llama", 2, 32, 4, vocab_size=32, max_seq_len=128, n_kv_heads=4, d_ff=16), 2, 62,
     TrainConfig("bf16-mixed", "adam", "fused", "full", 2), "hsdp", 8, 4),
    # drawn by the random test (seed 12), once 2.43% apart, 67,584 B short at the checkpointed block's forward GELU: the
    # block's locals keep the qkv projection (3 x 11 x 384 x 4 B) and the attention output (3 x 11 x 128 x 4 B)
    # to the end of the block, where no saved tensor keeps them
    (ModelSpec("random-gpt2", "gpt2", 1, 128, 4, vocab_size=32, max_seq_len=128, d_ff=512), 3, 11,
     TrainConfig("32-true", "momentum", "for-loop", "every-other", 1), "hsdp", 4, 2),
])
def test_the_walk_holds_what_the_step_still_holds(spec: ModelSpec, batch: int, seq_len: int, config: TrainConfig,
                                                  sharding: str, world: int, group: int | None) -> None:
    """Small shapes where the single-device walk once freed tensors the step still held (the bytes named beside
    each case); the sharded rank inherits the walk, and small per-rank states show such gaps most."""
    case = MemoryCase(spec.name, batch, config, seq_len=seq_len, spec=spec)
    err, report = _compare(case, sharding, world, group)
    assert err <= TOLERANCE, report


@pytest.mark.parametrize("checkpointing", STEP_CHECKPOINTING)
@pytest.mark.parametrize(("sharding", "group"), [("fsdp", None), ("zero3", None), ("fsdp-grad-op", None),
                                                 ("hsdp", 4)])
def test_small_llama_every_sharding_and_checkpointing(sharding: str, group: int | None, checkpointing: str) -> None:
    case = MemoryCase("llama-tiny", 4, TrainConfig("bf16-mixed", checkpointing=checkpointing), seq_len=64)
    err, report = _compare(case, sharding, 8, group)
    assert err <= TOLERANCE, report


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", STEP_CHECKPOINTING)
@pytest.mark.parametrize("sharding", ["fsdp", "fsdp-grad-op"])
def test_llama_7b_on_8_ranks(sharding: str, checkpointing: str) -> None:
    # LLaMA-7B, bf16-mixed, 4 x 2048 tokens per rank: about 20 s per configuration on a 2-core CPU
    case = MemoryCase("llama-7b", 4, TrainConfig("bf16-mixed", checkpointing=checkpointing), seq_len=2048)
    start = time.monotonic()
    err, report = _compare(case, sharding, 8, None)
    print(f"llama-7b {sharding} {checkpointing}: {time.monotonic() - start:.1f} s; {report}")
    assert err <= TOLERANCE, report


def test_measure_cli_simulates_a_sharded_rank(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    args = ["measure", "--simulate", "--model", "llama-tiny", "--batch-size", "2", "--seq-len", "32",
            "--precision", "bf16-true", "--world-size", "16", "--sharding", "hsdp", "--shard-group-size", "8",
            "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "simulated" and out["world_size"] == 16 and out["sharding"] == "hsdp"
    assert abs(out["error_pct"]) <= 100 * TOLERANCE
    n = param_counts(get_preset("llama-tiny")).total
    # hsdp over groups of 8: each rank's gradient shard (n / 8 elements, bf16) all-reduced across the 2 groups
    assert out["measured"]["collective_payload"]["all_reduce"] == n // 8 * 2
    # bad usage: one line, exit 2
    assert main(["measure", "--model", "llama-tiny", "--world-size", "8", "--sharding", "fsdp"]) == 2  # no --simulate
    assert main(["measure", "--simulate", "--model", "llama-tiny", "--sharding", "fsdp"]) == 2  # no --world-size
    assert main(["measure", "--simulate", "--model", "llama-tiny", "--world-size", "8", "--sharding", "zero2"]) == 2
    assert main(["measure", "--simulate", "--model", "llama-tiny", "--world-size", "8", "--sharding", "hsdp",
                 "--shard-group-size", "3"]) == 2
