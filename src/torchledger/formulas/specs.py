"""Model specifications: frozen dataclasses, named presets, and specs read from a Hugging Face config.json.

A spec gives a decoder's sizes; its ``family`` names the architecture, described as data in
:mod:`torchledger.formulas.families` (every parameter and every matmul is accounted for):

- ``gpt2``: multi-head attention with a fused QKV projection, GELU MLP (two matrices), LayerNorm with weight and
  bias, learned absolute positions, biases on every Linear, LM head tied to the token embedding.
- ``llama`` (and ``mistral``, the same description): grouped-query attention (separate q/k/v projections), SwiGLU
  MLP (three matrices), RMSNorm (weight only), rotary positions (no parameters), no biases, untied LM head.
- ``mixtral``: LLaMA's attention and a Mixture of Experts: a router and ``n_experts`` SwiGLU experts, of which each
  token visits ``experts_per_token``.

Any family may carry a causal ``sliding_window`` (Mistral's): each query attends to at most that many keys.

Reading a config.json needs no transformers import: the fields are read from the JSON directly.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

from ._validate import positive_int
from .families import FAMILIES as _DESCRIPTIONS
from .families import FamilyDescription, get_family

Family = Literal["gpt2", "llama", "mistral", "mixtral"]
FAMILIES: tuple[str, ...] = tuple(_DESCRIPTIONS)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer.

    Args:
        name: a label for reports.
        family: ``"gpt2"``, ``"llama"``, ``"mistral"`` or ``"mixtral"``: a key of
            :data:`torchledger.formulas.families.FAMILIES` (see the module docstring for what each implies).
        n_layers: transformer blocks.
        d_model: residual stream width.
        n_heads: query heads.
        vocab_size: rows of the token embedding and columns of the LM head.
        max_seq_len: context length (rows of the learned position table for ``gpt2``).
        n_kv_heads: key/value heads (grouped-query attention); defaults to ``n_heads``.
        d_ff: MLP hidden width (of each expert for ``mixtral``); defaults to ``4 * d_model`` for ``gpt2`` and is
            required for the others.
        head_dim: per-head width; defaults to ``d_model // n_heads`` (then ``n_heads`` must divide ``d_model``).
        tied_embeddings: whether the LM head reuses the token embedding; defaults by family.
        bias: whether Linear layers carry a bias; defaults by family.
        n_experts: experts per block (Mixture of Experts families only, where it is required).
        experts_per_token: experts each token visits, the router's top-k (Mixture of Experts families only).
        sliding_window: keys each query attends to at most, causally (Mistral's sliding window); None: all.
    """

    name: str
    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    max_seq_len: int
    n_kv_heads: int = 0
    d_ff: int = 0
    head_dim: int = 0
    tied_embeddings: bool | None = None
    bias: bool | None = None
    source: str = field(default="", compare=False)
    n_experts: int = 0
    experts_per_token: int = 0
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        fam = get_family(self.family)
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            positive_int(name, getattr(self, name))
        # Fill the family defaults (object.__setattr__ because the dataclass is frozen).
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        positive_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention groups)"
            )
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        positive_int("head_dim", self.head_dim)
        if self.d_ff == 0:
            if not fam.default_d_ff:
                raise ValueError(f"d_ff=0: a {self.family}-family spec needs its {fam.mlp} hidden width d_ff")
            object.__setattr__(self, "d_ff", fam.default_d_ff * self.d_model)
        positive_int("d_ff", self.d_ff)
        if self.tied_embeddings is None:
            object.__setattr__(self, "tied_embeddings", fam.tied)
        if self.bias is None:
            object.__setattr__(self, "bias", fam.bias)
        if fam.moe:
            positive_int("n_experts", self.n_experts)
            positive_int("experts_per_token", self.experts_per_token)
            if self.experts_per_token > self.n_experts:
                raise ValueError(f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}")
        elif self.n_experts or self.experts_per_token:
            raise ValueError(f"n_experts={self.n_experts}, experts_per_token={self.experts_per_token}: a "
                             f"{self.family}-family spec has no experts (a Mixture of Experts family has)")
        if self.sliding_window is not None:
            positive_int("sliding_window", self.sliding_window)

    @property
    def description(self) -> FamilyDescription:
        """The family's architecture as data (:mod:`torchledger.formulas.families`)."""
        return get_family(self.family)

    @property
    def q_dim(self) -> int:
        """Width of the query projection output: n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projection outputs: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of d_model x d_ff in the MLP: 2 for GELU, 3 for SwiGLU (gate, up, down)."""
        return self.description.mlp_matrices

    @property
    def norm_params(self) -> int:
        """Parameters of one norm: LayerNorm has weight and bias, RMSNorm only a weight."""
        return self.description.norm_width * self.d_model

    @property
    def experts(self) -> int:
        """SwiGLU/GELU MLPs per block: ``n_experts`` for a Mixture of Experts, else 1."""
        return self.n_experts if self.description.moe else 1

    @property
    def active_experts(self) -> int:
        """MLPs each token runs through per block: ``experts_per_token`` for a Mixture of Experts, else 1."""
        return self.experts_per_token if self.description.moe else 1


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a spec, by part. ``total`` counts a tied embedding once.

    ``per_layer_inactive``: the parameters of a block that one token does not visit (a Mixture of Experts' experts
    beyond its top-k; 0 for dense families), so that ``active`` is what one token's forward touches."""

    token_embedding: int
    position_embedding: int
    per_layer: int
    per_layer_matmul: int
    final_norm: int
    lm_head: int
    n_layers: int
    per_layer_inactive: int = 0

    @property
    def layers(self) -> int:
        return self.per_layer * self.n_layers

    @property
    def total(self) -> int:
        return self.token_embedding + self.position_embedding + self.layers + self.final_norm + self.lm_head

    @property
    def active(self) -> int:
        """Parameters one token's forward touches: ``total`` less the experts it does not visit (``total`` for
        dense families). Mixtral-8x7B with top-2: 12,879,925,248 of 46,702,792,704."""
        return self.total - self.per_layer_inactive * self.n_layers

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: parameters outside the embeddings and the LM head."""
        return self.layers + self.final_norm

    @property
    def matmul(self) -> int:
        """Weights that enter a matmul once per token: every Linear weight of the blocks plus the LM head matrix.

        This is the N of PaLM's 6N + 12LHQT (App. B) as nanoGPT's sizing notebook applies it: embedding tables are
        lookups, not matmuls, except that a tied token embedding is also the LM head and is counted there. For a
        Mixture of Experts only the router and the experts a token visits enter its matmuls (the active weights).
        """
        blocks = (self.per_layer_matmul - self.per_layer_inactive) * self.n_layers
        return blocks + self.token_embedding * int(self.lm_head == 0) + self.lm_head


def param_counts(spec: ModelSpec) -> ParamCounts:
    """Count the parameters of ``spec`` exactly, part by part.

    A Mixture of Experts block holds a router (d_model x n_experts, no bias) and ``n_experts`` MLPs; each token
    visits ``experts_per_token`` of them, so the other experts' weights are ``per_layer_inactive``.
    """
    d, f = spec.d_model, spec.d_ff
    fam = spec.description
    attn_weights = d * (spec.q_dim + 2 * spec.kv_dim) + spec.q_dim * d
    expert = spec.mlp_matrices * d * f
    router = d * spec.n_experts if fam.moe else 0
    mlp_weights = router + spec.experts * expert
    biases = 0
    if spec.bias:
        # qkv, attention output, MLP up (and gate) and down projections (of every expert)
        biases = spec.q_dim + 2 * spec.kv_dim + d + spec.experts * ((spec.mlp_matrices - 1) * f + d)
    per_layer = attn_weights + mlp_weights + biases + 2 * spec.norm_params
    inactive = (spec.experts - spec.active_experts) * (expert + (((spec.mlp_matrices - 1) * f + d) if spec.bias
                                                                 else 0))
    return ParamCounts(
        token_embedding=spec.vocab_size * d,
        position_embedding=spec.max_seq_len * d if fam.learned_positions else 0,
        per_layer=per_layer,
        per_layer_matmul=attn_weights + mlp_weights,
        final_norm=spec.norm_params,
        lm_head=0 if spec.tied_embeddings else spec.vocab_size * d,
        n_layers=spec.n_layers,
        per_layer_inactive=inactive,
    )


def n_params(spec: ModelSpec) -> int:
    """Total trainable parameters of ``spec`` (a tied embedding counted once)."""
    return param_counts(spec).total


def check_seq_len(spec: ModelSpec, seq_len: int) -> int:
    """``seq_len`` if ``spec`` can run it: at most ``max_seq_len``, the model's context.

    Every family refuses longer sequences: a learned position table (``gpt2``) has no rows beyond max_seq_len, and
    the reference rotary models' tables have max_seq_len rows too (nor was the model trained beyond it).
    """
    positive_int("seq_len", seq_len)
    if seq_len > spec.max_seq_len:
        table = "learned position table" if spec.description.learned_positions else "rotary position table"
        raise ValueError(
            f"seq_len={seq_len} exceeds max_seq_len={spec.max_seq_len}, the context of {spec.name}: its {table} "
            f"has {spec.max_seq_len} rows"
        )
    return seq_len


def _gpt2(name: str, n_layers: int, d_model: int, n_heads: int, source: str) -> ModelSpec:
    return ModelSpec(name, "gpt2", n_layers, d_model, n_heads, vocab_size=50257, max_seq_len=1024, source=source)


_GPT2_SOURCE = "Radford et al. 2019, GPT-2, Table 2; Hugging Face gpt2* config.json"
_LLAMA2_SOURCE = "Touvron et al. 2023, Llama 2 (arXiv 2307.09288); meta-llama/Llama-2-*-hf config.json"
_MIXTRAL_SOURCE = "Jiang et al. 2024, Mixtral of Experts (arXiv 2401.04088); mistralai/Mixtral-8x7B-v0.1 config.json"

PRESETS: dict[str, ModelSpec] = {
    # Small enough for exact CPU checks in seconds.
    "gpt-tiny": ModelSpec("gpt-tiny", "gpt2", 2, 128, 4, vocab_size=1000, max_seq_len=256, source="torchledger"),
    "llama-tiny": ModelSpec(
        "llama-tiny", "llama", 2, 128, 4, vocab_size=1000, max_seq_len=256, n_kv_heads=2, d_ff=344, source="torchledger"
    ),
    "gpt2-small": _gpt2("gpt2-small", 12, 768, 12, _GPT2_SOURCE),
    "gpt2-medium": _gpt2("gpt2-medium", 24, 1024, 16, _GPT2_SOURCE),
    "gpt2-large": _gpt2("gpt2-large", 36, 1280, 20, _GPT2_SOURCE),
    "gpt2-xl": _gpt2("gpt2-xl", 48, 1600, 25, _GPT2_SOURCE),
    "llama-7b": ModelSpec(
        "llama-7b", "llama", 32, 4096, 32, vocab_size=32000, max_seq_len=4096, d_ff=11008, source=_LLAMA2_SOURCE
    ),
    "llama-13b": ModelSpec(
        "llama-13b", "llama", 40, 5120, 40, vocab_size=32000, max_seq_len=4096, d_ff=13824, source=_LLAMA2_SOURCE
    ),
    "llama-70b": ModelSpec(
        "llama-70b", "llama", 80, 8192, 64, vocab_size=32000, max_seq_len=4096, n_kv_heads=8, d_ff=28672,
        source=_LLAMA2_SOURCE,
    ),
    "gpt3-175b": ModelSpec(
        "gpt3-175b", "gpt2", 96, 12288, 96, vocab_size=50257, max_seq_len=2048,
        source="Brown et al. 2020, GPT-3 (arXiv 2005.14165), Table 2.1",
    ),
    # Mixture of Experts: LLaMA attention, a router and n_experts SwiGLU experts per block, top-k routing.
    "mixtral-tiny": ModelSpec(
        "mixtral-tiny", "mixtral", 2, 128, 4, vocab_size=1000, max_seq_len=256, n_kv_heads=2, d_ff=344,
        n_experts=4, experts_per_token=2, source="torchledger",
    ),
    "mixtral-8x7b": ModelSpec(
        "mixtral-8x7b", "mixtral", 32, 4096, 32, vocab_size=32000, max_seq_len=32768, n_kv_heads=8, d_ff=14336,
        n_experts=8, experts_per_token=2, source=_MIXTRAL_SOURCE,
    ),
}


def get_preset(name: str) -> ModelSpec:
    """Return the preset called ``name``; ValueError listing the presets when there is none."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model={name!r} is not a preset; choose one of {', '.join(PRESETS)}") from None


_HF_FIELDS: dict[str, dict[str, str]] = {
    "gpt2": {
        "n_layers": "n_layer",
        "d_model": "n_embd",
        "n_heads": "n_head",
        "vocab_size": "vocab_size",
        "max_seq_len": "n_positions",
    },
    "llama": {
        "n_layers": "num_hidden_layers",
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "vocab_size": "vocab_size",
        "max_seq_len": "max_position_embeddings",
        "d_ff": "intermediate_size",
    },
    "mixtral": {
        "n_layers": "num_hidden_layers",
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "vocab_size": "vocab_size",
        "max_seq_len": "max_position_embeddings",
        "d_ff": "intermediate_size",
        "n_experts": "num_local_experts",
        "experts_per_token": "num_experts_per_tok",
    },
}
_HF_MODEL_TYPES: dict[str, Family] = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "mixtral": "mixtral"}
# model types whose config.json carries Mistral's ``sliding_window`` (an integer, or null for full attention)
_HF_SLIDING_WINDOW = ("mistral", "mixtral")


class HFConfigError(ValueError):
    """A config.json unusable as such: not a readable regular file, not a JSON object, or a field of the wrong type."""


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object of a config.json; HFConfigError naming the path when it is not a regular file (a named pipe
    would block the read), not readable, or not a JSON object."""
    where = os.fspath(path)
    try:
        mode = os.stat(where).st_mode
    except FileNotFoundError:
        raise HFConfigError(f"hf_config={where!r}: no such file") from None
    except OSError as exc:
        raise HFConfigError(f"hf_config={where!r} is not readable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise HFConfigError(f"hf_config={where!r} is not a regular file")
    try:
        with open(where, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFConfigError(f"hf_config={where!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"hf_config={where!r} does not hold a JSON object")
    return data


def _hf_int(data: dict[str, Any], key: str, where: str, *, required: bool = True) -> int:
    """A positive integer field (a JSON number without a fraction, not a boolean); 0 when optional and absent/null."""
    value = data.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HFConfigError(f"{key}={value!r} in {where} must be a positive integer")
    return value


def _hf_bool(data: dict[str, Any], key: str, where: str, default: bool) -> bool:
    """A JSON boolean field (``true``/``false``, never a string or a number); ``default`` when absent."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise HFConfigError(f"{key}={value!r} in {where} must be a JSON boolean (true or false)")
    return value


def _hf_str(data: dict[str, Any], key: str, where: str) -> str | None:
    """A string field; None when absent."""
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise HFConfigError(f"{key}={value!r} in {where} must be a string")
    return value


def spec_from_hf_config(config: str | os.PathLike[str] | dict[str, Any], name: str | None = None) -> ModelSpec:
    """Build a spec from a Hugging Face ``config.json`` (a path or the parsed dict) of a GPT-2, LLaMA, Mistral or
    Mixtral model.

    Every field read is checked by type (HFConfigError, a ValueError, naming the field, the value and the file):
    sizes are positive integers, flags JSON booleans, names strings. A supported ``model_type`` that lacks a field,
    or an unsupported one, is a plain ValueError: the formulas do not describe that model.

    Mistral's and Mixtral's ``sliding_window`` (null: full attention) becomes the spec's ``sliding_window``; the
    FLOP formulas count it when asked (``window``; by default attention is counted densely, as the kernels compute
    it) and the reference model masks attention with it. Mixtral's ``num_local_experts`` and
    ``num_experts_per_tok`` become ``n_experts`` and ``experts_per_token``.
    """
    if isinstance(config, dict):
        where, data = "config", config
    else:
        where, data = os.fspath(config), read_hf_config(config)
    model_type = _hf_str(data, "model_type", where)
    if model_type not in _HF_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} in {where} is not supported; supported: {', '.join(_HF_MODEL_TYPES)}"
        )
    family = _HF_MODEL_TYPES[model_type]
    fam = get_family(family)
    kwargs: dict[str, Any] = {}
    for ours, theirs in _HF_FIELDS[family].items():
        if theirs not in data:
            raise ValueError(f"{where} is missing the field {theirs!r} that a {model_type} config needs")
        kwargs[ours] = _hf_int(data, theirs, where)
    if model_type in _HF_SLIDING_WINDOW:
        kwargs["sliding_window"] = _hf_int(data, "sliding_window", where, required=False) or None
    if fam.projections == "fused":  # GPT-2's config.json
        kwargs["d_ff"] = _hf_int(data, "n_inner", where, required=False)
        kwargs["tied_embeddings"] = _hf_bool(data, "tie_word_embeddings", where, True)
    else:
        kwargs["n_kv_heads"] = _hf_int(data, "num_key_value_heads", where, required=False)
        kwargs["head_dim"] = _hf_int(data, "head_dim", where, required=False)
        kwargs["tied_embeddings"] = _hf_bool(data, "tie_word_embeddings", where, False)
        kwargs["bias"] = _hf_bool(data, "attention_bias", where, False)
        if kwargs["bias"] or _hf_bool(data, "mlp_bias", where, False):
            raise ValueError(f"attention_bias/mlp_bias=True in {where} is not supported for {model_type} specs")
    label = name or _hf_str(data, "_name_or_path", where) or f"{model_type} ({where})"
    try:
        return ModelSpec(name=str(label), family=family, source=where, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class MLPSpec:
    """A stack of Linear layers with ReLU between them: ``dims[0] -> dims[1] -> ... -> dims[-1]``, biases on.

    The default is the lecture notes' MLP (1024 -> 4096 -> 4096 -> 1024).
    """

    dims: tuple[int, ...] = (1024, 4096, 4096, 1024)
    name: str = "mlp"

    def __post_init__(self) -> None:
        if len(self.dims) < 2:
            raise ValueError(f"dims={self.dims!r} needs at least an input and an output width")
        for i, width in enumerate(self.dims):
            positive_int(f"dims[{i}]", width)

    @property
    def n_params(self) -> int:
        return sum(a * b + b for a, b in pairwise(self.dims))


@dataclass(frozen=True)
class CNNSpec:
    """The lecture notes' small CNN: 3x3 convolutions (padding 1) with ReLU, global average pool, a Linear head.

    Default: Conv2d(3, 64) -> Conv2d(64, 128) -> pool -> Linear(128, 10) on 32 x 32 images.
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128)
    image_size: int = 32
    n_classes: int = 10
    name: str = "cnn"

    def __post_init__(self) -> None:
        positive_int("in_channels", self.in_channels)
        positive_int("image_size", self.image_size)
        positive_int("n_classes", self.n_classes)
        if not self.channels:
            raise ValueError(f"channels={self.channels!r} needs at least one convolution")
        for i, c in enumerate(self.channels):
            positive_int(f"channels[{i}]", c)

    @property
    def n_params(self) -> int:
        widths = (self.in_channels, *self.channels)
        convs = sum(cin * cout * 9 + cout for cin, cout in pairwise(widths))
        return convs + self.channels[-1] * self.n_classes + self.n_classes
