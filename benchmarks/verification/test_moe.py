"""Mixture of Experts (the ``mixtral`` family): parameter counts against Mixtral-8x7B's published figures, FLOPs
exact whatever the routing, counters equal to the formula on the reference MoE, memory predicted from the routing
and measured on the CPU, and Mixtral's config.json read."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from benchmarks.verification.counter_cases import (
    GAPS,
    Case,
    _fused_attention_kernel,
    _transformer,
    measured_and_expected,
    run,
)
from benchmarks.verification.test_memory_random import SEED
from torchledger.counting import count_with_dispatch, count_with_hooks
from torchledger.formulas import flops as F
from torchledger.formulas.estimate import estimate
from torchledger.formulas.peak import train_peak_bytes
from torchledger.formulas.specs import ModelSpec, get_preset, n_params, param_counts, spec_from_hf_config
from torchledger.formulas.timeline import balanced_routing
from torchledger.formulas.vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, STEP_CHECKPOINTING
from torchledger.measuring.training import MemoryCase, measure, relative_error, simulate
from torchledger.workloads import build_transformer, token_batch
from torchledger.workloads.train_step import TrainConfig

TINY = get_preset("mixtral-tiny")
MIXTRAL = get_preset("mixtral-8x7b")

# mistralai/Mixtral-8x7B-v0.1 config.json (the fields the formulas read)
MIXTRAL_CONFIG = {"model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                  "max_position_embeddings": 32768, "num_local_experts": 8, "num_experts_per_tok": 2,
                  "sliding_window": None, "tie_word_embeddings": False, "rope_theta": 1e6}


# ------------------------------------------------------------------------------------------------ parameters


def test_mixtral_8x7b_total_and_active_parameters() -> None:
    d, kv, f, V, L = 4096, 8 * 128, 14336, 32000, 32
    attention = d * d + 2 * d * kv + d * d  # q, k, v, o
    expert = 3 * d * f  # gate, up, down
    per_layer = attention + d * 8 + 8 * expert + 2 * d  # router (d x 8, no bias), 8 experts, two RMSNorms
    total = 2 * V * d + L * per_layer + d  # embedding, untied head, final norm
    assert total == 46_702_792_704  # Mixtral-8x7B's published count
    assert n_params(MIXTRAL) == param_counts(MIXTRAL).total == total
    # top-2: each token visits 2 of the 8 experts; the 6 others of each of the 32 layers are inactive
    active = total - L * 6 * expert
    assert active == 12_879_925_248  # Mixtral's "13B active parameters"
    assert param_counts(MIXTRAL).active == active
    # dense families: everything is active
    assert param_counts(get_preset("llama-7b")).active == param_counts(get_preset("llama-7b")).total


def test_hf_mixtral_config_gives_the_preset() -> None:
    spec = spec_from_hf_config(MIXTRAL_CONFIG, name="mixtral-8x7b")
    assert spec == MIXTRAL
    assert (spec.n_experts, spec.experts_per_token, spec.sliding_window) == (8, 2, None)
    assert spec_from_hf_config({**MIXTRAL_CONFIG, "sliding_window": 4096}).sliding_window == 4096
    with pytest.raises(ValueError, match="missing the field 'num_local_experts'"):
        spec_from_hf_config({k: v for k, v in MIXTRAL_CONFIG.items() if k != "num_local_experts"})


def test_reference_moe_has_the_counted_parameters() -> None:
    model = build_transformer(TINY, device="meta")
    assert sum(p.numel() for p in model.parameters()) == n_params(TINY)
    d, f, E = 128, 344, 4
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + d * E + E * 3 * d * f + 2 * d
    assert param_counts(TINY).per_layer == per_layer
    assert param_counts(TINY).active == n_params(TINY) - 2 * (4 - 2) * 3 * d * f


# ------------------------------------------------------------------------------------------------ FLOPs


def test_moe_flops_from_first_principles() -> None:
    # mixtral-tiny, B=2, T=64: N = 128 tokens; the router (d -> E) on every token, and N k = 256 token-rows
    # through the experts' three matrices, however the router spreads them
    N, d, f, E, k, q, kv, H, hd = 128, 128, 344, 4, 2, 128, 64, 4, 32
    attention = 2 * N * d * (q + 2 * kv) + 2 * (2 * 2 * H * 64 * 64 * hd) + 2 * N * q * d
    layer = attention + 2 * N * d * E + 3 * 2 * (N * k) * d * f
    head = 2 * N * d * 1000
    flops = F.model_flops(TINY, 2, 64)
    assert flops.forward == 2 * layer + head
    assert flops.backward == 2 * flops.forward
    # per token, PaLM's 6N + 12LHQT with N = the active matmul weights is the same count
    assert F.palm_train_flops_per_token(TINY, 64) * N == flops.train
    # full checkpointing recomputes every matmul of a MoE block (the experts' outputs are saved)
    assert F.model_flops(TINY, 2, 64, checkpointing="full").recompute == 2 * layer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flops_are_exact_whatever_the_routing(seed: int) -> None:
    # random weights route unevenly; the counters see each expert's own rows, the formula only N k in all
    torch.manual_seed(seed)
    model = build_transformer(TINY, device="cpu")
    with torch.no_grad():
        for block in model.blocks:
            block.moe.router.weight.normal_(0, 1)  # a decisive, uneven router
    idx, targets = token_batch(TINY, 2, 64, seed=seed)

    def step() -> torch.Tensor:
        loss = model(idx, targets)[1]
        assert loss is not None
        return loss

    expected = F.model_flops(TINY, 2, 64).forward
    assert count_with_dispatch(model, step, backward=False).forward == expected
    assert count_with_hooks(model, step, backward=False).forward == expected
    routing = [block.moe.tokens_per_expert for block in model.blocks]
    assert all(sum(layer) == 128 * 2 for layer in routing)
    assert routing != [list(layer) for layer in balanced_routing(TINY, 128)]  # not the balanced stand-in


MOE_CASE = Case("mixtral-tiny", _transformer("mixtral-tiny", causal=True), ("forward", "forward+backward",
                                                                            "checkpointed"), attention=True)
DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("phase", MOE_CASE.phases)
@pytest.mark.parametrize("counter", ["hooks", "dispatch"])
def test_counters_equal_the_formula_on_the_reference_moe(counter: str, phase: str, device: str) -> None:
    counted, expected = run(MOE_CASE, counter, device, phase)
    measured, predicted = measured_and_expected(MOE_CASE, counted, expected, phase)
    assert measured == predicted, f"{counter} counted {measured:,}, the formula says {predicted:,}"
    assert counted.forward == expected.forward


def _profiler_gap(device: str, phase: str) -> str | None:
    """As for the dense transformers, but a MoE block's recomputation runs its last matmul (nothing stops early)."""
    kernel = _fused_attention_kernel(MOE_CASE, device) if device != "meta" else ""
    return f"torch.profiler counts 0 for the fused attention kernel {kernel}" if kernel else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("phase", MOE_CASE.phases)
def test_profiler_on_the_reference_moe(phase: str, device: str, request: pytest.FixtureRequest) -> None:
    gap = _profiler_gap(device, phase)
    if gap:
        request.applymarker(pytest.mark.xfail(strict=True, reason=gap))
    counted, expected = run(MOE_CASE, "profiler", device, phase)
    measured, predicted = measured_and_expected(MOE_CASE, counted, expected, phase)
    assert measured == predicted, f"profiler counted {measured:,}, the formula says {predicted:,}"


def test_dense_profiler_gap_names_the_early_stop() -> None:
    # the dense cases' gap under checkpointing (the down projection aborted by the early stop) is not a MoE's
    assert "early stop" in (GAPS["profiler"](MOE_CASE, "meta", "checkpointed") or "")
    assert _profiler_gap("meta", "checkpointed") is None


# ------------------------------------------------------------------------------------------------ memory


MEMORY_CASES = [
    MemoryCase("mixtral-tiny", 4, TrainConfig("32-true", "adamw", "foreach"), seq_len=128),
    MemoryCase("mixtral-tiny", 4, TrainConfig("bf16-mixed", "adamw", "fused"), seq_len=128),
    MemoryCase("mixtral-tiny", 8, TrainConfig("32-true", "sgd", "foreach"), seq_len=128),
    MemoryCase("mixtral-tiny", 4, TrainConfig("bf16-mixed", "momentum", "for-loop"), seq_len=256),
    MemoryCase("mixtral-tiny", 8, TrainConfig("bf16-true", "sgd", "foreach"), seq_len=128),
    MemoryCase("mixtral-tiny", 8, TrainConfig("16-mixed", "sgd", "foreach", clip_grad_norm=1.0), seq_len=128),
    MemoryCase("mixtral-tiny", 8, TrainConfig("32-true", "sgd", "foreach", "full"), seq_len=128),
    MemoryCase("mixtral-tiny", 8, TrainConfig("bf16-mixed", "sgd", "foreach", "full"), seq_len=128),
]


def _memory_id(c: MemoryCase) -> str:
    return f"{c.config.precision}-{c.config.optimizer}-{c.config.checkpointing}-{c.batch}x{c.seq_len}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", MEMORY_CASES, ids=_memory_id)
def test_measured_peak_matches_the_prediction_with_the_routing(case: MemoryCase, device: str,
                                                                memory_record: Any) -> None:
    # the measurement returns the routing its step took (measured.routing), and the record keeps it for the replay
    measured = measure(case, device)
    assert measured.routing is not None and [sum(b) for b in measured.routing] == [case.batch * case.seq_len * 2] * 2
    predicted = case.predict(device, measured.routing)
    memory_record(case, measured, predicted, snapshot=lambda path: measure(case, device, snapshot=path))
    err = relative_error(predicted.peak, measured.peak)
    assert err <= {"cpu": 0.02, "cuda": 0.03}[device], (
        f"predicted {predicted.peak:,} B at {predicted.moment}, measured {measured.peak:,} B ({100 * err:.2f}%); "
        f"{predicted.by_category} vs {measured.by_category}")


def test_saved_activations_do_not_depend_on_the_balance() -> None:
    # the same N k rows, split evenly or all on one expert: at the start of the backward (the loss's gradient)
    # the same bytes are saved; only the transients of one expert at a time differ
    even = balanced_routing(TINY, 4 * 128)
    skewed = [[4 * 128 * 2, 0, 0, 0]] * 2
    a = train_peak_bytes(TINY, 4, 128, recipe="32-true", optimizer="sgd", routing=even)
    b = train_peak_bytes(TINY, 4, 128, recipe="32-true", optimizer="sgd", routing=skewed)
    assert a.moment == b.moment == "backward: log_softmax grad"
    assert a.by_category == b.by_category
    # under autocast an expert that gets no token casts no weights: 3 unvisited experts x 3 matrices x 2 layers
    a = train_peak_bytes(TINY, 4, 128, recipe="bf16-mixed", optimizer="sgd", routing=even)
    b = train_peak_bytes(TINY, 4, 128, recipe="bf16-mixed", optimizer="sgd", routing=skewed)
    assert a.by_category["activations"] - b.by_category["activations"] == 3 * 3 * 128 * 344 * 2 * 2


def test_an_expert_no_token_chose_gets_no_gradient_and_no_update() -> None:
    # AdamW foreach takes torch._foreach_sqrt of exp_avg_sq for the parameters with a gradient only: with expert 0
    # of block 1 unvisited, its gate, up and down (3 x 128 x 344 fp32 each) have none, and the sqrt is smaller by them
    even = balanced_routing(TINY, 2 * 64)
    skewed = [list(even[0]), [0, 128, 64, 64]]
    a = train_peak_bytes(TINY, 2, 64, routing=even)
    b = train_peak_bytes(TINY, 2, 64, routing=skewed)
    assert a.moment == b.moment == "optimizer: adamw foreach sqrt"
    expert = 3 * 128 * 344 * 4
    assert a.by_category["grads"] - b.by_category["grads"] == expert
    assert a.by_category["temporaries"] - b.by_category["temporaries"] == expert
    # after the backward only the caller's targets (2 x 64 int64) are left of what the step made: the router's
    # softmax is the forward's local, freed as the block returns, and its saved reference as its backward runs
    assert a.by_category["activations"] == 2 * 64 * 8


def test_measure_predicts_from_the_routing_the_step_took(capsys: pytest.CaptureFixture[str]) -> None:
    from torchledger.cli import main

    # a batch whose router leaves one expert without a token (checked below), the case that tells the routing apart
    assert main(["measure", "--device", "cpu", "--model", "mixtral-tiny", "--batch-size", "2", "--seq-len", "64",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    routing = out["measured"]["routing"]
    assert [sum(block) for block in routing] == [2 * 64 * 2] * 2  # N tokens x top-2, per block
    assert 0 in routing[0] + routing[1]
    assert out["predicted"]["by_category"] == out["measured"]["by_category"]
    assert out["predicted"]["peak"] == out["measured"]["peak"]


def test_simulation_routes_as_the_prediction_assumes() -> None:
    # FakeTensorMode holds no values: the reference MoE routes as balanced_routing says, and so does the prediction
    case = MemoryCase("mixtral-tiny", 4, TrainConfig("32-true", "adamw", "foreach"), seq_len=128)
    assert simulate(case).peak == case.predict("cpu").peak


@pytest.mark.parametrize("routing", [[[1, 2, 3]], [[256, 256, 0, 0], [0, 0, 0, 0]], [[-1, 257, 0, 0]] * 2])
def test_bad_routing_is_refused(routing: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="routing="):
        train_peak_bytes(TINY, 1, 128, routing=routing)


def test_estimate_of_mixtral_8x7b_has_a_peak() -> None:
    e = estimate(MIXTRAL, 1, 4096, precision="bf16-mixed", optimizer="adamw", checkpointing="full")
    states = e.peak.states
    # every expert's parameters, gradients and Adam moments are there: 46.7B x (4 + 4 + 8) bytes at least
    assert states.params + states.optimizer >= 46_702_792_704 * (4 + 8)
    assert e.peak_per_rank > states.params + states.optimizer
    assert e.flops.forward == F.model_flops(MIXTRAL, 1, 4096).forward


def test_moe_spec_round_trips_through_a_record() -> None:
    spec = ModelSpec("m", "mixtral", 1, 64, 2, vocab_size=50, max_seq_len=32, d_ff=96, n_experts=3,
                     experts_per_token=1)
    case = MemoryCase("m", 1, TrainConfig(), seq_len=16, spec=spec)
    assert MemoryCase.from_record(case.to_record()).spec == spec


@pytest.mark.parametrize("recipe", ["32-true", "bf16-true"])
@pytest.mark.parametrize(("batch", "seq_len"), [(4, 128), (1, 256)])
def test_prefill_peak_with_the_routing(recipe: str, batch: int, seq_len: int) -> None:
    from torchledger.formulas.peak import inference_peak_bytes
    from torchledger.measuring.memory import measure_cpu
    from torchledger.measuring.training import _inference_run

    case = MemoryCase("mixtral-tiny", batch, TrainConfig(recipe), seq_len=seq_len)
    model, run, tracker, _ = _inference_run(case, "cpu")
    measured = measure_cpu(run, model, tracker=tracker)
    routing = [list(block.moe.tokens_per_expert) for block in model.blocks]
    predicted = inference_peak_bytes(TINY, batch, seq_len, recipe=recipe, routing=routing)
    assert relative_error(predicted.peak, measured.peak) <= 0.02, (predicted, measured.peak, routing)


@st.composite
def moe_cases(draw: st.DrawFn) -> MemoryCase:
    """Small Mixture-of-Experts transformers and training steps, drawn over the space the prediction claims:
    any expert count and top-k, every recipe, optimizer and implementation, checkpointing, clipping; one
    micro-batch (each micro-batch routes its own tokens), vocabularies from 8 (fewer logits than widths too). With
    the CPU RMSNorm's op-by-op backward in the walk, seeds 1-13 (156 configurations, the 16-bit ``*-true`` recipes
    and small vocabularies among them) were all within 2%; before it, those recipes and vocabularies below 4 d_model
    missed by 3-14% (the final norm's backward, not the experts) and were left out."""
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([16, 32]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    d = heads * head_dim
    experts = draw(st.integers(1, 6))
    vocab = draw(st.integers(8, 1024))
    spec = ModelSpec("random-moe", "mixtral", draw(st.integers(1, 2)), d, heads, vocab_size=vocab, max_seq_len=64,
                     n_kv_heads=kv, d_ff=draw(st.integers(d, 4 * d + 64)), n_experts=experts,
                     experts_per_token=draw(st.integers(1, experts)))
    precision = draw(st.sampled_from(["32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true"]))
    ckpt = draw(st.sampled_from(STEP_CHECKPOINTING))
    config = TrainConfig(precision, draw(st.sampled_from(OPTIMIZERS)), draw(st.sampled_from(OPTIMIZER_IMPLS)), ckpt,
                         1, draw(st.sampled_from([None, 1.0])))
    return MemoryCase(spec.name, draw(st.integers(2, 4)), config, seq_len=draw(st.integers(32, 64)), spec=spec)


@settings(derandomize=not SEED, max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_cases())
def test_random_moe_steps_within_2_percent(case: MemoryCase) -> None:
    measured = measure(case, "cpu")  # with the routing its step took
    predicted = case.predict("cpu", measured.routing)
    err = relative_error(predicted.peak, measured.peak)
    report = (f"{case}: predicted {predicted.peak:,} B at {predicted.moment}, measured {measured.peak:,} B "
              f"({100 * err:.2f}%); {predicted.by_category} vs {measured.by_category}")
    assert err <= 0.02, report


if SEED:
    test_random_moe_steps_within_2_percent = hypothesis_seed(SEED)(test_random_moe_steps_within_2_percent)
