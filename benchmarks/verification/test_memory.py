"""Memory formulas against first-principles byte counts and published figures."""

from __future__ import annotations

import pytest

from torchledger.formulas import activations as A
from torchledger.formulas import memory as M
from torchledger.formulas import peak as P
from torchledger.formulas.specs import get_preset, n_params, spec_from_hf_config

GPT2 = get_preset("gpt2-small")
LLAMA7 = get_preset("llama-7b")
GPT_TINY = get_preset("gpt-tiny")
LLAMA_TINY = get_preset("llama-tiny")


@pytest.mark.parametrize(
    ("name", "size"),
    [("float32", 4), ("torch.bfloat16", 2), ("fp16", 2), ("half", 2), ("fp8", 1), ("int8", 1), ("float64", 8),
     ("tf32", 4), ("int64", 8)],
)
def test_dtype_bytes(name: str, size: int) -> None:
    assert M.dtype_bytes(name) == size


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype='float12' is not known"):
        M.dtype_bytes("float12")


@pytest.mark.parametrize(
    ("recipe", "optimizer", "per_param", "parts"),
    [
        # (params, grads, master, optimizer) bytes per parameter
        ("32-true", "adamw", 16, (4, 4, 0, 8)),
        ("32-true", "momentum", 12, (4, 4, 0, 4)),
        ("32-true", "sgd", 8, (4, 4, 0, 0)),
        ("16-mixed", "adamw", 16, (4, 4, 0, 8)),  # AMP: the fp32 weights are the master copy
        ("bf16-mixed", "adam", 16, (4, 4, 0, 8)),
        ("16-mixed-master", "adamw", 16, (2, 2, 4, 8)),  # ZeRO Sec. 3.1: 2 + 2 + K with K = 12
        ("bf16-mixed-master", "momentum", 12, (2, 2, 4, 4)),
        ("bf16-true", "adamw", 8, (2, 2, 0, 4)),
        ("16-true", "sgd", 4, (2, 2, 0, 0)),
    ],
)
def test_model_states_per_parameter(recipe: str, optimizer: str, per_param: int, parts: tuple[int, ...]) -> None:
    n = 1_000_003
    states = M.model_state_bytes(n, recipe, optimizer)
    assert (states.params, states.grads, states.master_params, states.optimizer) == tuple(p * n for p in parts)
    assert states.total == per_param * n


def test_zero_mixed_precision_adam_is_16_bytes_per_parameter() -> None:
    # Rajbhandari et al. 2020 (ZeRO), Sec. 3.1: a 7.5B model needs 16 x 7.5B = 120 GB of model states.
    assert M.model_state_bytes(7_500_000_000, "16-mixed-master", "adam").total == 120 * 10**9
    # The lecture notes' 7B "precise" breakdown (fp32 master, fp16 weights and grads, fp32 Adam) is the same: 112 GB.
    assert M.model_state_bytes(7_000_000_000, "16-mixed-master", "adamw").total == 112 * 10**9


def test_kv_cache_llama_7b() -> None:
    # 2 (K, V) x 32 layers x 32 KV heads x 128 x 2 bytes = 524,288 bytes = 512 KiB per token
    assert M.kv_cache_bytes(LLAMA7, 1, 1, "bfloat16") == 2 * 32 * 32 * 128 * 2 == 512 * 2**10
    assert M.kv_cache_bytes(LLAMA7, 1, 2048, "bfloat16") == 2**30  # 1 GiB (the lecture notes said 17 GB)
    assert M.kv_cache_bytes(LLAMA7, 1, 4096, "bfloat16") == 2 * 2**30


def test_kv_cache_gqa() -> None:
    mistral = spec_from_hf_config({"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                                   "vocab_size": 32000, "max_position_embeddings": 32768})
    # 8 KV heads instead of 32: a quarter of LLaMA-7B's cache, 128 KiB per token in bf16
    assert M.kv_cache_bytes(mistral, 4, 4096, "bf16") == 4 * 4096 * 2 * 32 * 8 * 128 * 2
    assert M.kv_cache_bytes(mistral, 1, 1, "bf16") * 4 == M.kv_cache_bytes(LLAMA7, 1, 1, "bf16")


def test_gpt2_layer_activations_16bit_against_korthikanti() -> None:
    s, b, h, a = 1024, 4, 768, 12
    items = A.layer_activation_items(GPT2, b, s, "bf16-true")
    sbh = s * b * h
    # 2 bytes x (ln_1 input 1 + qkv input 1 + qkv 3 + sdpa out 1 + ln_2 input 1 + fc input 1 + gelu in 4 + out 4)
    big = 2 * 16 * sbh
    small = 2 * 2 * (s * b * 4) + b * a * s * 4  # two LayerNorms' fp32 mean and rstd, SDPA's fp32 log-sum-exp
    assert sum(items.values()) == big + small
    # Korthikanti et al. 2022 eq. 1: 34 sbh + 5 a s^2 b; the reference layers have no dropout masks (2 sbh) and
    # fused attention keeps no s x s matrix.
    assert M.korthikanti_layer_activation_bytes(s, b, h, a) == 34 * sbh + 5 * a * s * s * b
    assert M.korthikanti_layer_activation_bytes(s, b, h, a, flash=True) - big == 2 * sbh


def test_gpt2_layer_activations_mixed_keeps_the_residual_stream_in_fp32() -> None:
    s, b, h = 256, 2, 768
    items = A.layer_activation_items(GPT2, b, s, "bf16-mixed")
    # the two LayerNorm inputs (fp32 residual stream) at 4 bytes, the other 14 sbh at 2 bytes
    assert items["ln_1.input"] == items["ln_2.input"] == 4 * s * b * h
    assert sum(items.values()) == (2 * 4 + 14 * 2) * s * b * h + 16 * s * b + b * 12 * s * 4


def test_llama_layer_activations() -> None:
    b, s = 2, 64
    t, d, f, q, kv = b * s, 128, 344, 128, 64
    items = A.layer_activation_items(LLAMA_TINY, b, s, "32-true")
    expected = (
        2 * (t * d * 4 + t * 4 + t * d * 4)  # two RMSNorms: fp32 input, rstd, fp32 normalized
        + t * d * 4  # q/k/v projections' shared input
        + t * (q + kv + kv) * 4  # rotated q and k, v (2 KV heads)
        + t * q * 4 + b * 4 * s * 4  # SDPA output and log-sum-exp
        + t * d * 4  # MLP input
        + 4 * t * f * 4  # gate, silu(gate), up, product
    )
    assert sum(items.values()) == expected


def test_full_checkpointing_keeps_only_block_inputs() -> None:
    b, s = 4, 1024
    none = A.activation_bytes(GPT2, b, s, "bf16-true")
    full = A.activation_bytes(GPT2, b, s, "bf16-true", "full")
    assert none.layers == 12 * none.per_layer
    assert full.layers == 12 * s * b * 768 * 2  # Korthikanti's 2sbh per layer
    assert full.recompute_layer == none.per_layer
    assert full.saved < none.saved


def test_activations_of_the_head() -> None:
    b, s = 2, 128
    acts = A.activation_bytes(GPT_TINY, b, s, "32-true")
    t = b * s
    # ln_f input + stats, head input, fp32 log-probs; position ids; logits held by the caller
    assert acts.head == t * 128 * 4 + 2 * t * 4 + t * 128 * 4 + t * 1000 * 4
    assert acts.embedding == s * 8
    assert acts.logits == t * 1000 * 4
    assert acts.autocast_copies == 0
    mixed = A.activation_bytes(GPT_TINY, b, s, "16-mixed")
    # autocast caches a 16-bit copy of every matmul weight: per block 4 d^2 + 2 d * 4d, plus the tied head V d
    assert mixed.autocast_copies == 2 * (2 * (4 * 128**2 + 8 * 128**2) + 1000 * 128)


def test_peak_llama_7b_bf16_true_is_in_the_optimizer_step() -> None:
    n = n_params(LLAMA7)
    peak = P.train_peak_bytes(LLAMA7, 1, 2048, recipe="bf16-true", optimizer="adamw")
    # params 2 + grads 2 + exp_avg and exp_avg_sq 2 x 2 + foreach sqrt temporary 2 = 10 bytes per parameter,
    # plus the rotary cos and sin tables (4096 positions x head_dim 128, bf16), Adam's fp32 step counter per tensor
    # (embedding, 9 per block x 32, final norm, head = 291), and the caller's int64 targets (2,048), which
    # cross-entropy's view makes the CPU's storage tracker count to the step's end; the scalar _foreach_add_ adds to
    # the counters is freed before the sqrt
    assert peak.phases["optimizer"] == 10 * n + 2 * 4096 * 128 * 2 + 4 * 291 + 2048 * 8
    assert peak.phase == "optimizer"
    assert peak.moment == "optimizer: adamw foreach sqrt"


def test_peak_small_model_large_batch_is_in_the_backward() -> None:
    peak = P.train_peak_bytes(GPT_TINY, 64, 256, recipe="32-true", optimizer="adamw")
    acts = A.activation_bytes(GPT_TINY, 64, 256, "32-true")
    states = M.model_state_bytes(n_params(GPT_TINY), "32-true", "adamw")
    # Adam's fp32 step counters: wte, wpe, 12 tensors per block x 2, ln_f's weight and bias
    persistent = states.params + states.optimizer + 4 * 28
    targets = 64 * 256 * 8  # the int64 targets viewed by cross-entropy and saved by nll_loss
    # the forward ends with nll_loss's two fp32 scalars (the loss and the total weight) and the step's loss /
    # grad_accum beside everything else: 12 bytes
    assert peak.phases["forward"] == persistent + acts.forward_end + targets + 12
    # backward begins with the gradients of the log-probabilities and of the logits, B T V fp32 each, beside the two
    # scalars the backward's caller holds (loss / grad_accum and the ones_like seed)
    assert peak.phases["backward"] == persistent + acts.saved + targets + 8 + acts.logits + 2 * 64 * 256 * 1000 * 4
    assert peak.phase == "backward"
    assert peak.moment == "backward: log_softmax grad"


def test_grad_accumulation_adds_gradients_not_activations() -> None:
    one = P.train_peak_bytes(GPT_TINY, 8, 256, grad_accum=1)
    four = P.train_peak_bytes(GPT_TINY, 8, 256, grad_accum=4)
    grads = 4 * n_params(GPT_TINY)
    targets = 8 * 256 * 8  # one micro-batch's int64 targets, counted on the CPU from cross-entropy's view onwards
    assert four.activations == one.activations
    # the last micro-batch's forward: every gradient, and the targets of the three micro-batches before it
    assert four.phases["forward"] - one.phases["forward"] == grads + 3 * targets
    assert four.phases["optimizer"] - one.phases["optimizer"] == 3 * targets


@pytest.mark.parametrize(
    ("impl", "expected"), [("foreach", 4 * 1000), ("for-loop", 3 * 300 * 4), ("fused", 0)]
)
def test_adam_step_temporaries(impl: str, expected: int) -> None:
    # for-loop without the order: the bound, sqrt and quotient of the largest tensor beside a previous quotient as large
    assert M.optimizer_step_temp_bytes(1000, 300, "adamw", "32-true", impl) == expected


def test_for_loop_adam_keeps_the_previous_denominator() -> None:
    # sizes in order 300, 200, 500: the third tensor's sqrt and quotient (2 x 500) beside the second's quotient (200)
    sizes = [300, 200, 500]
    assert M.optimizer_step_temp_bytes(1000, 500, "adamw", "32-true", "for-loop", sizes=sizes) == (2 * 500 + 200) * 4
    # the largest first: its own two buffers (2 x 500), no earlier quotient; the second adds 2 x 300 + 500 = 1,100
    assert M.optimizer_step_temp_bytes(1000, 500, "adam", "32-true", "for-loop", sizes=[500, 300, 200]) == 1100 * 4
    with pytest.raises(ValueError, match="sizes="):
        M.optimizer_step_temp_bytes(1000, 500, "adamw", "32-true", "for-loop", sizes=[500, 300])


@pytest.mark.parametrize("sizes", [(300, 200, 500), (500, 300, 200), (64, 4096, 8, 1000)])
def test_for_loop_adam_temporaries_measured(sizes: tuple[int, ...]) -> None:
    # torch.optim.AdamW(foreach=False) on CPU, tracked at the dispatcher: the step's peak above the states it starts
    # and ends with is the formula's temporaries (the fp32 step counters are made on the first step: step twice)
    torch = pytest.importorskip("torch")
    from torchledger.measuring.memory import StorageTracker

    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = torch.optim.AdamW(params, foreach=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tracker = StorageTracker()
    with tracker:
        tracker.track(torch.nn.ParameterList(params), opt)
        before = tracker.current
        opt.step()
    assert tracker.peak - before == M.optimizer_step_temp_bytes(
        sum(sizes), max(sizes), "adamw", "32-true", "for-loop", sizes=list(sizes))


def test_master_recipes_copy_gradients_to_fp32_for_the_step() -> None:
    assert M.optimizer_step_temp_bytes(1000, 300, "sgd", "bf16-mixed-master") == 4 * 1000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: M.model_state_bytes(10, "fp8-mixed"), "precision='fp8-mixed'"),
        (lambda: M.model_state_bytes(10, "32-true", "lion"), "optimizer='lion'"),
        (lambda: M.model_state_bytes(0), "n_params=0"),
        (lambda: A.activation_bytes(GPT2, 1, 0), "seq_len=0"),
        (lambda: A.activation_bytes(GPT2, 1, 8, checkpointing="selective"), "checkpointing='selective'"),
        (lambda: P.train_peak_bytes(GPT2, 1, 8, grad_accum=0), "grad_accum=0"),
        (lambda: M.optimizer_step_temp_bytes(10, 5, impl="turbo"), "impl='turbo'"),
    ],
)
def test_bad_arguments(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_master_recipe_keeps_fp32_master_weights_and_gradients() -> None:
    # gpt-tiny (557,568 parameters in 28 tensors), bf16-mixed-master, fused AdamW (no temporaries of its own): at the
    # optimizer step, per parameter: bf16 weight 2 + fp32 master 4 + two fp32 moments 8 + bf16 gradient 2 + its fp32
    # copy for the master update 4 = 20 bytes, plus Adam's 4-byte step counter per tensor (ZeRO's 16 B per parameter
    # of model states, and the gradient's fp32 copy), and the caller's 8 int64 targets the CPU's tracker counts
    n = 557_568
    peak = P.train_peak_bytes(get_preset("gpt-tiny"), 1, 8, recipe="bf16-mixed-master", optimizer="adamw",
                              optimizer_impl="fused")
    assert peak.phases["optimizer"] == 20 * n + 4 * 28 + 8 * 8
    assert peak.breakdown()["optimizer"] == (4 + 8) * n + 4 * 28
