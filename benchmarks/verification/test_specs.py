"""Model specs: parameter counts against published figures, presets, Hugging Face config.json reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchledger.formulas.specs import (
    PRESETS,
    HFConfigError,
    ModelSpec,
    check_seq_len,
    get_preset,
    n_params,
    param_counts,
    read_hf_config,
    spec_from_hf_config,
)

# Published totals: Hugging Face's model.num_parameters() for the GPT-2 checkpoints (tied head counted once) and
# Llama 2 (Touvron et al. 2023) for the 7B/13B shapes.
PUBLISHED_PARAMS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
}


@pytest.mark.parametrize(("preset", "expected"), PUBLISHED_PARAMS.items())
def test_published_parameter_counts(preset: str, expected: int) -> None:
    assert n_params(get_preset(preset)) == expected


def test_gpt2_small_parameters_from_first_principles() -> None:
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    per_layer = (
        2 * d  # ln_1 weight + bias
        + d * 3 * d + 3 * d  # c_attn
        + d * d + d  # attention c_proj
        + 2 * d  # ln_2
        + d * 4 * d + 4 * d  # c_fc
        + 4 * d * d + d  # mlp c_proj
    )
    assert per_layer == 7_087_872
    expected = vocab * d + ctx * d + layers * per_layer + 2 * d  # wte (tied head) + wpe + blocks + ln_f
    assert expected == 124_439_808
    assert n_params(get_preset("gpt2-small")) == expected


def test_llama_7b_parameters_from_first_principles() -> None:
    d, layers, vocab, ffn = 4096, 32, 32000, 11008
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d  # q,k,v,o + gate,up,down + two RMSNorm weights
    expected = 2 * vocab * d + layers * per_layer + d  # embedding + untied head + blocks + final norm
    assert expected == 6_738_415_616
    assert param_counts(get_preset("llama-7b")).total == expected


def test_gpt3_175b_is_the_published_175b() -> None:
    # Brown et al. 2020, Table 2.1 rounds to 175.0B; the exact count with biases and LayerNorms is 174.6B.
    total = n_params(get_preset("gpt3-175b"))
    assert total == 12 * 96 * 12288**2 + 13 * 12288 * 96 + 50257 * 12288 + 2048 * 12288 + 2 * 12288
    assert abs(total - 175.0e9) / 175.0e9 < 0.003


def test_gqa_shrinks_key_value_projections() -> None:
    tiny = get_preset("llama-tiny")  # d 128, 4 heads of 32, 2 KV heads, ffn 344
    assert (tiny.head_dim, tiny.q_dim, tiny.kv_dim) == (32, 128, 64)
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 344 + 2 * 128
    assert param_counts(tiny).per_layer == per_layer
    assert n_params(tiny) == 2 * 1000 * 128 + 2 * per_layer + 128


def test_tiny_presets_match_the_issue() -> None:
    gpt = get_preset("gpt-tiny")
    assert (gpt.family, gpt.n_layers, gpt.d_model, gpt.n_heads, gpt.vocab_size, gpt.max_seq_len) == (
        "gpt2", 2, 128, 4, 1000, 256
    )
    llama = get_preset("llama-tiny")
    assert (llama.n_layers, llama.d_model, llama.n_heads, llama.n_kv_heads, llama.d_ff, llama.vocab_size) == (
        2, 128, 4, 2, 344, 1000
    )
    assert set(PRESETS) >= {"gpt-tiny", "llama-tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl",
                            "llama-7b", "llama-13b", "gpt3-175b"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 0}, "n_layers=0"),
        ({"d_model": -128}, "d_model=-128"),
        ({"n_heads": 3}, "n_heads=3 must divide d_model=128"),
        ({"n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
        ({"vocab_size": 2.5}, "vocab_size=2.5"),
        ({"family": "bert"}, "family='bert'"),
    ],
)
def test_bad_spec_names_argument_and_value(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "x", "family": "gpt2", "n_layers": 2, "d_model": 128, "n_heads": 4,
                               "vocab_size": 1000, "max_seq_len": 64}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelSpec(**base)  # type: ignore[arg-type]


def test_llama_spec_needs_d_ff() -> None:
    with pytest.raises(ValueError, match="d_ff"):
        ModelSpec("x", "llama", 2, 128, 4, vocab_size=100, max_seq_len=64)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="model='gpt5' is not a preset"):
        get_preset("gpt5")


# Field names and values as in the Hub's gpt2/config.json and meta-llama/Llama-2-7b-hf/config.json.
GPT2_CONFIG = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
               "n_positions": 1024, "n_inner": None, "activation_function": "gelu_new"}
LLAMA2_CONFIG = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
                 "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu"}
MISTRAL_CONFIG = {"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                  "max_position_embeddings": 32768, "sliding_window": 4096}


def test_hf_configs_give_the_preset_shapes(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2_CONFIG))
    assert n_params(spec_from_hf_config(path)) == 124_439_808
    assert n_params(spec_from_hf_config(LLAMA2_CONFIG)) == 6_738_415_616


def test_hf_mistral_7b() -> None:
    # Mistral 7B v0.1: GQA with 8 KV heads of 128; Jiang et al. 2023 report 7.24B parameters.
    spec = spec_from_hf_config(MISTRAL_CONFIG)
    d, kv, ffn = 4096, 8 * 128, 14336
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ffn + 2 * d
    assert n_params(spec) == 2 * 32000 * d + 32 * per_layer + d == 7_241_732_096


def test_hf_config_missing_field(tmp_path: Path) -> None:
    broken = {k: v for k, v in LLAMA2_CONFIG.items() if k != "intermediate_size"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="missing the field 'intermediate_size'"):
        spec_from_hf_config(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not readable JSON"), ('{"model_type": "t5"}', "model_type='t5'"), ("[1, 2]", "JSON object")],
)
def test_hf_config_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config(path)


def test_hf_config_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        spec_from_hf_config(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("model_type", ["llama"], "a string"),
        ("num_hidden_layers", "32", "a positive integer"),
        ("hidden_size", True, "a positive integer"),
        ("intermediate_size", 11008.5, "a positive integer"),
        ("num_key_value_heads", 0, "a positive integer"),
        ("tie_word_embeddings", "false", "a JSON boolean"),
        ("attention_bias", 1, "a JSON boolean"),
        ("_name_or_path", {"id": 1}, "a string"),
    ],
)
def test_hf_config_fields_are_checked_by_type(field: str, value: object, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA2_CONFIG, field: value}))
    with pytest.raises(HFConfigError) as info:
        spec_from_hf_config(path)
    assert str(info.value) == f"{field}={value!r} in {path} must be {kind}" + (
        " (true or false)" if kind == "a JSON boolean" else "")
    assert isinstance(info.value, ValueError)


def test_hf_config_json_booleans_are_read_as_written() -> None:
    untied = spec_from_hf_config({**GPT2_CONFIG, "tie_word_embeddings": False})
    assert not untied.tied_embeddings
    # an LM head of its own: 50,257 x 768 more than the tied 124,439,808
    assert n_params(untied) == 124_439_808 + 50257 * 768
    assert spec_from_hf_config({**GPT2_CONFIG, "tie_word_embeddings": True}).tied_embeddings


def test_hf_config_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(HFConfigError, match="is not a regular file"):
        spec_from_hf_config(tmp_path)  # a directory
    with pytest.raises(HFConfigError, match="no such file"):
        read_hf_config(tmp_path / "absent.json")


@pytest.mark.parametrize(("preset", "table"), [("gpt-tiny", "learned position table"),
                                               ("llama-tiny", "rotary position table")])
def test_seq_len_at_most_the_context(preset: str, table: str) -> None:
    spec = get_preset(preset)
    assert check_seq_len(spec, 256) == 256
    with pytest.raises(ValueError, match=f"seq_len=257 exceeds max_seq_len=256, the context of {preset}: its {table}"):
        check_seq_len(spec, 257)
