"""The predicted peak of a training step against the CPU measurement, on configurations drawn at random.

The space is the one the prediction claims: the reference workloads (gpt-tiny, llama-tiny, mlp, cnn), transformer
specs of both families and MLP/CNN shapes drawn at random, batch 1-8, every recipe the training step runs, every
optimizer and implementation, every checkpointing mode (transformers), accumulation 1-4, clipping on or off. Each drawn
configuration is measured with the live-storage tracker and must be within 5% of the prediction (each category
within 10% of the peak); over a sample of ``SAMPLE`` configurations at least 98% must be within 2%, the peak and
every category.

Seeded by default (the same configurations every run); set ``TORCHLEDGER_RANDOM_SEED`` to an integer for another
sample, or to ``random`` for a fresh one (the hypothesis profile ``nightly`` does the same). A failure prints the
configuration as a ``torchledger measure`` command line.
"""

from __future__ import annotations

import json
import os
import random
import shlex
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from torchledger.formulas.peak import TrainPeak
from torchledger.formulas.specs import CNNSpec, MLPSpec, ModelSpec
from torchledger.formulas.vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, STEP_CHECKPOINTING
from torchledger.measuring.memory import CATEGORIES
from torchledger.measuring.training import MemoryCase, measure, relative_error
from torchledger.workloads.train_step import TrainConfig

RECIPES = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
SAMPLE = 60
HARD, TARGET, SHARE = 0.05, 0.02, 0.98

_seed_env = os.environ.get("TORCHLEDGER_RANDOM_SEED", "")
settings.register_profile("ci", derandomize=True, max_examples=12, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", derandomize=False, max_examples=100, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
RANDOM = _seed_env != "" or os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
SEED = random.SystemRandom().randrange(2**32) if _seed_env == "random" else int(_seed_env or 0)
PROFILE = "nightly" if RANDOM else "ci"
T = TypeVar("T")


@st.composite
def transformer_specs(draw: st.DrawFn) -> ModelSpec:
    """Small transformers of every family (GPT-2, LLaMA, Mistral's sliding window, Mixtral's experts): one step well
    under a second on a CPU."""
    family = draw(st.sampled_from(["gpt2", "llama", "mistral", "mixtral"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])) if family != "gpt2" else heads
    d = heads * head_dim
    d_ff = draw(st.integers(16, 4 * d + 64)) if family != "gpt2" else draw(st.sampled_from([0, 2 * d, 3 * d]))
    extra: dict[str, int] = {}
    if family == "mistral":
        extra["sliding_window"] = draw(st.integers(4, 128))
    if family == "mixtral":
        extra["n_experts"] = draw(st.integers(2, 8))
        extra["experts_per_token"] = draw(st.integers(1, min(2, extra["n_experts"])))
    return ModelSpec(f"random-{family}", family, draw(st.integers(1, 3)), d, heads,  # type: ignore[arg-type]
                     vocab_size=draw(st.integers(32, 2048)), max_seq_len=128, n_kv_heads=kv, d_ff=d_ff, **extra)


@st.composite
def cases(draw: st.DrawFn) -> MemoryCase:
    kind = draw(st.sampled_from(["gpt-tiny", "llama-tiny", "mlp", "cnn", "transformer", "mlp-shape", "cnn-shape"]))
    precision = draw(st.sampled_from(RECIPES))
    optimizer = draw(st.sampled_from(OPTIMIZERS))
    impl = draw(st.sampled_from(OPTIMIZER_IMPLS))
    transformer = kind in ("gpt-tiny", "llama-tiny", "transformer")
    ckpt = draw(st.sampled_from(STEP_CHECKPOINTING)) if transformer else "none"
    config = TrainConfig(precision, optimizer, impl, ckpt, draw(st.integers(1, 4)),
                         draw(st.sampled_from([None, 1.0])))
    batch = draw(st.integers(1, 8))
    if kind in ("gpt-tiny", "llama-tiny"):
        return MemoryCase(kind, batch, config, seq_len=draw(st.integers(8, 128)))
    if kind == "transformer":
        spec = draw(transformer_specs())
        return MemoryCase(spec.name, batch, config, seq_len=draw(st.integers(8, 128)), spec=spec)
    if kind == "mlp-shape":
        dims = tuple(draw(st.lists(st.integers(16, 1024), min_size=2, max_size=5)))
        return MemoryCase("mlp", batch, config, mlp=MLPSpec(dims))
    if kind == "cnn-shape":
        channels = tuple(draw(st.lists(st.integers(4, 48), min_size=1, max_size=3)))
        return MemoryCase("cnn", batch, config, cnn=CNNSpec(draw(st.integers(1, 4)), channels,
                                                            draw(st.integers(8, 32)), draw(st.integers(2, 20))))
    return MemoryCase(kind, batch, config)


def predict(case: MemoryCase, routing: list[list[int]] | None = None) -> TrainPeak:
    """The prediction the measurement is held to; a Mixture of Experts with the ``routing`` its step took."""
    return case.predict("cpu", routing)


def command_line(case: MemoryCase) -> str:
    """The ``torchledger measure`` command that measures ``case`` (a random transformer through a config.json)."""
    c = case.config
    args = ["torchledger", "measure", "--device", "cpu"]
    prefix = ""
    if case.spec is not None:
        s = case.spec
        if s.family == "gpt2":
            hf = {"model_type": "gpt2", "n_layer": s.n_layers, "n_embd": s.d_model, "n_head": s.n_heads,
                  "vocab_size": s.vocab_size, "n_positions": s.max_seq_len, "n_inner": s.d_ff}
        else:
            hf = {"model_type": "llama", "num_hidden_layers": s.n_layers, "hidden_size": s.d_model,
                  "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads, "vocab_size": s.vocab_size,
                  "max_position_embeddings": s.max_seq_len, "intermediate_size": s.d_ff}
            if s.family == "mistral":
                hf.update(model_type="mistral", sliding_window=s.sliding_window)
            if s.family == "mixtral":
                hf.update(model_type="mixtral", num_local_experts=s.n_experts,
                          num_experts_per_tok=s.experts_per_token)
        prefix = f"echo {shlex.quote(json.dumps(hf))} > spec.json && "
        args += ["--hf-config", "spec.json", "--implementation", "reference"]  # the reference transformer
    else:
        args += ["--model", case.workload]
    args += ["--batch-size", str(case.batch)]
    if case.seq_len:
        args += ["--seq-len", str(case.seq_len)]
    args += ["--precision", c.precision, "--optimizer", c.optimizer, "--optimizer-impl", c.optimizer_impl,
             "--checkpointing", c.checkpointing, "--grad-accum", str(c.grad_accum)]
    if c.clip_grad_norm is not None:
        args += ["--clip-grad-norm", str(c.clip_grad_norm)]
    line = prefix + " ".join(args)
    if case.workload == "mlp" and case.mlp.dims != MemoryCase("mlp", 1, c).mlp.dims:
        line += f"  # with MLPSpec(dims={case.mlp.dims})"
    if case.workload == "cnn" and case.cnn != MemoryCase("cnn", 1, c).cnn:
        s2 = case.cnn
        line += (f"  # with CNNSpec(in_channels={s2.in_channels}, channels={s2.channels}, "
                 f"image_size={s2.image_size}, n_classes={s2.n_classes})")
    return line


def compare(case: MemoryCase) -> tuple[float, str]:
    """The larger of the peak's relative error and the largest category's difference (as a share of the peak),
    with a report."""
    peak_err, cat_err, report = _errors(case)
    return max(peak_err, cat_err), report


def _errors(case: MemoryCase) -> tuple[float, float, str]:
    measured = measure(case, "cpu")
    predicted = predict(case, measured.routing)
    err = relative_error(predicted.peak, measured.peak)
    cats = predicted.breakdown()
    worst_cat = max(abs(cats[k] - measured.by_category[k]) for k in CATEGORIES) / measured.peak
    report = (f"{100 * err:.2f}% apart (categories up to {100 * worst_cat:.2f}% of the peak): predicted "
              f"{predicted.peak:,} B at {predicted.moment!r} {cats}, measured {measured.peak:,} B at "
              f"{measured.peak_op} {measured.by_category}\n  {command_line(case)}")
    return err, worst_cat, report


@settings(settings.get_profile(PROFILE))
@given(case=cases())
def test_random_configuration_within_5_percent(case: MemoryCase) -> None:
    peak_err, cat_err, report = _errors(case)
    assert peak_err <= HARD, report
    assert cat_err <= 2 * HARD, report


if RANDOM:  # TORCHLEDGER_RANDOM_SEED picks this test's examples too (printed on failure, so a run can be repeated)
    test_random_configuration_within_5_percent = hypothesis_seed(SEED)(test_random_configuration_within_5_percent)


def draw_sample(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """Up to ``n`` examples of ``strategy``, to measure one by one (a test then states what share must hold): the
    CI's fixed sample, or under ``TORCHLEDGER_RANDOM_SEED`` that seed's."""
    drawn: list[T] = []

    def collect(case: T) -> None:
        drawn.append(case)

    run = given(case=strategy)(collect)
    run = settings(max_examples=n, derandomize=not RANDOM, database=None, deadline=None,
                   suppress_health_check=list(HealthCheck))(run)
    if RANDOM:
        run = hypothesis_seed(SEED)(run)
    run()
    return drawn[:n]


def test_sample_98_percent_within_2_percent() -> None:
    """A sample of ``SAMPLE`` configurations: at least 98% within 2%, every one within 5%; prints the
    distribution of the errors."""
    sample = draw_sample(cases(), SAMPLE)
    assert len(sample) >= 50
    detailed = [_errors(case) for case in sample]
    results = [(max(p, c), r) for p, c, r in detailed]
    errors = sorted(err for err, _ in results)
    bins = {f"<= {100 * b:g}%": sum(e <= b for e in errors) for b in (0.005, 0.01, 0.02, 0.05)}
    worst = max(results)
    print(f"\n{len(errors)} configurations (seed {SEED if RANDOM else 'derandomized'}): {bins}; worst {worst[1]}")
    within = sum(e <= TARGET for e in errors) / len(errors)
    assert within >= SHARE, [r for e, r in results if e > TARGET]
    for peak_err, cat_err, report in detailed:
        assert peak_err <= HARD and cat_err <= 2 * HARD, report


GPT2_SMALL = [
    MemoryCase("gpt2-small", 2, TrainConfig("32-true", "sgd", "for-loop", "full", 3), seq_len=128),
    MemoryCase("gpt2-small", 2, TrainConfig("16-mixed", "sgd"), seq_len=256),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", GPT2_SMALL, ids=lambda c: f"{c.config.precision}-{c.config.optimizer}-"
                         f"{c.config.checkpointing}-acc{c.config.grad_accum}-b{c.batch}x{c.seq_len}")
def test_gpt2_small_within_2_percent(case: MemoryCase) -> None:
    err, report = compare(case)
    assert err <= TARGET, report


# Configurations a random sample (seed 4173297522) found with the peak right and the categories off, each pinning one
# mechanism. On the CPU the tracker counts storages exactly, so the peak and every category must be equal to the byte.
_GPT_1_LAYER = ModelSpec("random-gpt2", "gpt2", 1, 64, 2, vocab_size=32, max_seq_len=128, d_ff=192)
PINNED = [
    # In a checkpointed block's recomputation, mlp.proj's saved input (the recomputed GELU output, 54 x 192 x 4 B)
    # dies when AddmmBackward returns, before the engine sums the bias gradient; the GELU gradient then makes the
    # peak. Batch 1 also checks the token ids and targets do not share one (B, T + 1) storage.
    pytest.param(MemoryCase(_GPT_1_LAYER.name, 1, TrainConfig("32-true", "adamw", "for-loop", "every-other", 1),
                            seq_len=54, spec=_GPT_1_LAYER), "backward: block 0 mlp.gelu grad", "gelu_backward.default",
                 id="recomputed-bias-grad"),
    # nll_loss's two fp32 scalars are made while autocast's fp32 copy of the logits lives: the forward's peak,
    # with the log-probabilities already saved for the backward (activations), not temporaries.
    pytest.param(MemoryCase("llama-tiny", 4, TrainConfig("16-mixed", "momentum", "foreach", "every-other", 4),
                            seq_len=8), "forward: nll_loss total_weight", "nll_loss_forward.default",
                 id="nll-loss-under-autocast"),
    # The loss's scalars: loss / grad_accum, GradScaler's scaled loss and backward's ones_like seed live through the
    # backward (12 B here, where the peak is); a first step skipped by GradScaler (its 2^16 scale overflows these
    # fp16 gradients) leaves no momentum buffers, so the measurement warms up until the optimizer has stepped.
    pytest.param(MemoryCase("mlp", 1, TrainConfig("16-mixed", "momentum", "foreach"), mlp=MLPSpec((16, 16))),
                 "backward: layer 0 weight grad cast", "_to_copy.default", id="loss-scalars-and-grad-scaler"),
]


@pytest.mark.parametrize(("case", "moment", "op"), PINNED)
def test_pinned_configuration_is_exact_in_every_category(case: MemoryCase, moment: str, op: str) -> None:
    predicted = predict(case)
    measured = measure(case, "cpu")
    assert (predicted.moment, measured.peak_op) == (moment, op)
    assert predicted.peak == measured.peak
    assert predicted.breakdown() == measured.by_category


def test_recomputed_linear_frees_its_input_before_the_bias_gradient() -> None:
    # pure arithmetic on the walk: rows = 54, d = 64, d_ff = 192, fp32
    from torchledger.formulas.timeline import StepConfig, _TransformerStep, _walk

    step = _TransformerStep(_GPT_1_LAYER, 1, 54, StepConfig("32-true", "adamw", "for-loop", "every-other"), "cpu")
    step.tl.moments = []
    _walk(step, step.forward)
    by_label = {(m.phase, m.label): m.total for m in step.tl.moments}
    weight = by_label[("backward", "block 0 mlp.proj weight grad")]
    bias = by_label[("backward", "block 0 mlp.proj bias grad")]
    assert weight - bias == 54 * 192 * 4 - 64 * 4  # the GELU output freed, the 64 fp32 bias gradients made


def test_token_batch_gives_each_tensor_its_own_storage() -> None:
    from torchledger.workloads.models import token_batch

    for batch in (1, 3):
        idx, targets = token_batch(_GPT_1_LAYER, batch, 54)
        assert idx.untyped_storage().nbytes() == targets.untyped_storage().nbytes() == batch * 54 * 8
        assert idx.untyped_storage().data_ptr() != targets.untyped_storage().data_ptr()


@pytest.mark.parametrize(("precision", "at_least"), [("16-mixed", 2), ("32-true", 1)])
def test_warm_up_steps_until_the_optimizer_has_stepped(precision: str, at_least: int) -> None:
    model, step, batches = MemoryCase("mlp", 1, TrainConfig(precision, "momentum", "foreach"),
                                      mlp=MLPSpec((16, 16))).build("cpu")
    n = step.warm_up(batches)
    assert n >= at_least and (precision != "32-true" or n == 1)
    if step.scaler is not None:  # GradScaler's defaults (PyTorch docs): init_scale 2^16, backoff_factor 0.5
        assert step.scaler.get_scale() == 2.0**16 * 0.5 ** (n - 1)
    assert all("momentum_buffer" in step.optimizer.state[p] for p in model.parameters())
