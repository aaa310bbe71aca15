"""Architecture families as data: every layer reads one description per family, an unknown family fails loudly,
and a sliding window is counted exactly when asked (checked against brute-force enumeration)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from benchmarks.verification.test_memory_random import SEED
from torchledger.formulas import flops as F
from torchledger.formulas.activations import activation_bytes, buffer_bytes, layer_activation_items
from torchledger.formulas.families import FAMILIES, GPT2, LLAMA, MIXTRAL, get_family
from torchledger.formulas.peak import inference_peak_bytes, train_peak_bytes
from torchledger.formulas.specs import ModelSpec, get_preset, n_params, param_counts, spec_from_hf_config

LLAMA_TINY = get_preset("llama-tiny")


def test_descriptions_say_what_each_family_builds() -> None:
    assert (GPT2.projections, GPT2.mlp, GPT2.norm, GPT2.positions, GPT2.bias, GPT2.tied) == (
        "fused", "gelu", "layernorm", "learned", True, True)
    assert (LLAMA.projections, LLAMA.mlp, LLAMA.norm, LLAMA.positions, LLAMA.bias, LLAMA.tied) == (
        "separate", "swiglu", "rmsnorm", "rotary", False, False)
    assert (MIXTRAL.projections, MIXTRAL.mlp, MIXTRAL.norm, MIXTRAL.positions) == (
        "separate", "moe", "rmsnorm", "rotary")
    assert (GPT2.mlp_matrices, LLAMA.mlp_matrices, MIXTRAL.mlp_matrices) == (2, 3, 3)
    assert (GPT2.norm_width, LLAMA.norm_width) == (2, 1)
    # Mistral is LLaMA's architecture; its window is a field of the spec
    assert get_family("mistral") is LLAMA
    assert set(FAMILIES) == {"gpt2", "llama", "mistral", "mixtral"}


@pytest.mark.parametrize("name", ["bert", "", "GPT2", None])
def test_unknown_family_raises_naming_it(name: object) -> None:
    with pytest.raises(ValueError, match=f"family={name!r} is not one of gpt2, llama, mistral, mixtral"):
        get_family(name)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"family={name!r}"):
        ModelSpec("x", name, 2, 128, 4, vocab_size=100, max_seq_len=64, d_ff=256)  # type: ignore[arg-type]


def test_a_mistral_spec_costs_what_the_same_llama_spec_costs() -> None:
    # the same architecture: every figure of a "mistral" spec equals the "llama" spec's
    kwargs = {"n_kv_heads": 2, "d_ff": 344}
    llama = ModelSpec("a", "llama", 2, 128, 4, vocab_size=1000, max_seq_len=256, **kwargs)  # type: ignore[arg-type]
    mistral = ModelSpec("a", "mistral", 2, 128, 4, vocab_size=1000, max_seq_len=256, **kwargs)  # type: ignore[arg-type]
    assert param_counts(mistral) == param_counts(llama)
    assert F.model_flops(mistral, 2, 64) == F.model_flops(llama, 2, 64)
    assert layer_activation_items(mistral, 2, 64, "bf16-mixed") == layer_activation_items(llama, 2, 64, "bf16-mixed")
    assert train_peak_bytes(mistral, 2, 64).peak == train_peak_bytes(llama, 2, 64).peak
    assert inference_peak_bytes(mistral, 2, 64) == inference_peak_bytes(llama, 2, 64)


def test_dense_families_refuse_experts() -> None:
    with pytest.raises(ValueError, match="n_experts=8, experts_per_token=2: a llama-family spec has no experts"):
        ModelSpec("x", "llama", 2, 128, 4, vocab_size=100, max_seq_len=64, d_ff=256, n_experts=8, experts_per_token=2)
    with pytest.raises(ValueError, match="n_experts=0"):
        ModelSpec("x", "mixtral", 2, 128, 4, vocab_size=100, max_seq_len=64, d_ff=256)
    with pytest.raises(ValueError, match="experts_per_token=3 exceeds n_experts=2"):
        ModelSpec("x", "mixtral", 2, 128, 4, vocab_size=100, max_seq_len=64, d_ff=256, n_experts=2,
                  experts_per_token=3)
    with pytest.raises(ValueError, match="sliding_window=0"):
        ModelSpec("x", "llama", 2, 128, 4, vocab_size=100, max_seq_len=64, d_ff=256, sliding_window=0)


def test_layers_read_the_description() -> None:
    # GPT-2's learned positions: position ids in the activations, no rotary buffers; LLaMA the reverse
    gpt = get_preset("gpt-tiny")
    assert activation_bytes(gpt, 2, 64).embedding == 64 * 8
    assert activation_bytes(LLAMA_TINY, 2, 64).embedding == 0
    assert buffer_bytes(gpt) == 0
    assert buffer_bytes(LLAMA_TINY) == 2 * 256 * 32 * 4  # cos and sin, max_seq_len x head_dim, fp32
    assert [k for k in F.layer_forward_flops_breakdown(gpt, 1, 8) if k.startswith("mlp.")] == ["mlp.fc", "mlp.proj"]
    assert [k for k in F.layer_forward_flops_breakdown(LLAMA_TINY, 1, 8) if k.startswith("mlp.")] == [
        "mlp.gate", "mlp.up", "mlp.down"]


# ------------------------------------------------------------------------------------------------ sliding window


def _brute_force_pairs(q_len: int, kv_len: int, window: int) -> int:
    """Enumerate every (query, key) pair a causal window of ``window`` keys lets through."""
    offset = kv_len - q_len
    return sum(1 for i in range(q_len) for j in range(kv_len) if j <= i + offset and j > i + offset - window)


@settings(derandomize=not SEED, max_examples=300, deadline=None, database=None)
@given(kv_len=st.integers(1, 300), data=st.data())
def test_window_pairs_equal_brute_force_enumeration(kv_len: int, data: st.DataObject) -> None:
    q_len = data.draw(st.integers(1, kv_len))
    window = data.draw(st.integers(1, 2 * kv_len + 2))
    assert F.window_pairs(q_len, kv_len, window) == _brute_force_pairs(q_len, kv_len, window)


if SEED:
    test_window_pairs_equal_brute_force_enumeration = hypothesis_seed(SEED)(
        test_window_pairs_equal_brute_force_enumeration)


def test_window_counts_by_hand() -> None:
    # T = 6, w = 4: min(i + 1, 4) for i = 0..5 = 1 + 2 + 3 + 4 + 4 + 4 = 18 pairs
    assert F.window_pairs(6, 6, 4) == 18
    # a window at least T long is the causal triangle with its diagonal: 6 * 7 / 2 = 21 (halving gives 18)
    assert F.window_pairs(6, 6, 6) == F.window_pairs(6, 6, 100) == 21
    # decode: 1 new query over 10 cached keys, window 4: 4 pairs
    assert F.window_pairs(1, 10, 4) == 4
    # attention FLOPs: 2 matmuls x 2 FLOPs x pairs x head_dim, per batch and head
    assert F.attention_flops(2, 3, 6, 6, 8, window=4) == 2 * 3 * 18 * (2 * 8 + 2 * 8)
    assert F.attention_backward_flops(2, 3, 6, 6, 8, window=4) == 2 * F.attention_flops(2, 3, 6, 6, 8, window=4)
    # a fused kernel recomputes QK^T over the same pairs
    assert F.attention_backward_flops(2, 3, 6, 6, 8, window=4, recompute_scores=True) == (
        2 * 2 * 3 * 18 * 32 + 2 * 2 * 3 * 18 * 8)
    with pytest.raises(ValueError, match="window=0"):
        F.attention_flops(1, 1, 4, 4, 8, window=0)
    with pytest.raises(ValueError, match="q_len=5 exceeds kv_len=4"):
        F.window_pairs(5, 4, 2)


MISTRAL_7B = {"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
              "max_position_embeddings": 32768, "sliding_window": 4096}  # mistralai/Mistral-7B-v0.1 config.json


def test_mistral_window_is_read_and_counted_only_when_asked() -> None:
    spec = spec_from_hf_config(MISTRAL_7B)
    assert spec.sliding_window == 4096
    assert spec_from_hf_config({**MISTRAL_7B, "sliding_window": None}).sliding_window is None
    assert n_params(spec) == 7_241_732_096  # the window has no parameters
    T, d = 8192, 4096
    dense = F.model_flops(spec, 1, T)
    windowed = F.model_flops(spec, 1, T, window=spec.sliding_window)
    # attention per layer, forward: 2 matmuls x 2 x heads x head_dim x pairs; pairs dense T^2, windowed
    # 4096 * 4097 / 2 + (8192 - 4096) * 4096
    pairs = 4096 * 4097 // 2 + 4096 * 4096
    per_pair = 2 * 2 * 32 * 128
    assert dense.forward - windowed.forward == 32 * per_pair * (T * T - pairs)
    assert windowed.backward == 2 * windowed.forward
    assert d == spec.d_model
    assert F.attention_convention() == "dense"
    assert F.attention_convention(causal=True) == "causal"
    assert F.attention_convention(window=4096) == "window 4096"


def test_windowed_reference_model_computes_the_dense_scores() -> None:
    # a mistral spec whose 64-token sequences exceed its 16-key window: the reference model masks attention, and
    # the counters (what the kernels execute) equal the dense formula, not the windowed one
    torch = pytest.importorskip("torch")
    from torchledger.counting import count_with_dispatch, count_with_hooks
    from torchledger.workloads import build_transformer, token_batch

    spec = ModelSpec("w", "mistral", 2, 128, 4, vocab_size=1000, max_seq_len=256, n_kv_heads=2, d_ff=344,
                     sliding_window=16)
    model = build_transformer(spec, device="meta")
    idx, targets = token_batch(spec, 2, 64, device="meta")

    def step() -> object:
        return model(idx, targets)[1]

    dense = F.model_flops(spec, 2, 64).train  # the meta device takes SDPA's math path: no recomputed scores
    assert count_with_dispatch(model, step).total == count_with_hooks(model, step).total == dense  # type: ignore[arg-type]
    assert F.model_flops(spec, 2, 64, window=16).train < dense
    # the mask itself: query 20 sees keys 5..20 only
    core = model.blocks[0].attn
    q = torch.randn(1, 1, 64, 8)
    v = torch.eye(64)[None, None]  # (1, 1, 64, 64): row j of the output is the attention weights of query j
    k = torch.zeros(1, 1, 64, 8)  # equal scores: uniform weights over the keys a query may see
    weights = core(q, k, v)[0, 0]
    assert torch.nonzero(weights[20] > 0).flatten().tolist() == list(range(5, 21))


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from torchledger.cli import main

    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_estimate_says_which_attention_it_counted(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    status, out, _ = _cli(["estimate", "--model", "llama-tiny", "--seq-len", "64", "--json"], capsys)
    assert status == 0
    dense = json.loads(out)
    assert dense["attention"] == "dense"
    status, out, _ = _cli(["estimate", "--model", "llama-tiny", "--seq-len", "64", "--attention", "window=16",
                           "--json"], capsys)
    windowed = json.loads(out)
    assert windowed["attention"] == "window 16"
    spec = get_preset("llama-tiny")
    assert windowed["flops"]["forward"] == F.model_flops(spec, 1, 64, window=16).forward
    # per layer: QK^T and AV over 64^2 pairs dense, over 16 * 17 / 2 + 48 * 16 pairs windowed
    per_pair = 2 * 2 * 4 * 32
    assert dense["flops"]["forward"] - windowed["flops"]["forward"] == 2 * per_pair * (64 * 64 - (136 + 768))
    status, out, _ = _cli(["estimate", "--model", "llama-tiny", "--seq-len", "64", "--attention", "causal"], capsys)
    assert "(attention causal)" in out


def test_count_names_the_formulas_convention(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    status, out, _ = _cli(["count", "--model", "llama-tiny", "--seq-len", "32"], capsys)
    assert status == 0 and "the formula counts attention dense" in out
    status, out, _ = _cli(["count", "--model", "llama-tiny", "--seq-len", "32", "--attention", "causal"], capsys)
    assert "the formula counts attention causal" in out and "= formula" not in out


@pytest.mark.parametrize(("flag", "message"), [
    ("window", "--attention window: llama-tiny has no sliding_window; give --attention window=N"),
    ("window=0", "argument --attention"),
    ("sparse", "'sparse' is not one of dense, causal, window, window=N"),
])
def test_bad_attention_flag_is_bad_usage(flag: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        from torchledger.cli import main

        status = main(["estimate", "--model", "llama-tiny", "--attention", flag])
        raise SystemExit(status)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
