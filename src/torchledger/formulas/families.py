"""Architecture families as data: one frozen description per family, read by every formula and by the workloads.

A family says how a decoder block is built; a :class:`~torchledger.formulas.specs.ModelSpec` says how large it is.
Every part of the project that depends on the architecture (parameter counts, FLOPs, saved activations, the step's
timeline, the reference models) reads these fields instead of comparing family names, so adding a family is one
entry of :data:`FAMILIES` (plus its tests), and an unknown name raises ValueError.

- ``gpt2``: fused QKV projection, GELU MLP (two matrices), LayerNorm (weight and bias), learned positions, biases,
  tied LM head (Radford et al. 2019).
- ``llama``: separate q/k/v projections (grouped-query attention), SwiGLU MLP (three matrices), RMSNorm (weight),
  rotary positions, no biases, untied LM head (Touvron et al. 2023).
- ``mistral``: the ``llama`` description; its sliding-window attention is a field of the spec
  (``sliding_window``), not of the architecture (Jiang et al. 2023, arXiv 2310.06825).
- ``mixtral``: ``llama`` attention and a sparse Mixture-of-Experts MLP: a router Linear(d_model, n_experts, no bias)
  and ``n_experts`` SwiGLU experts, each token visiting ``experts_per_token`` of them (Jiang et al. 2024, Mixtral
  of Experts, arXiv 2401.04088).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Projections = Literal["fused", "separate"]
MLPKind = Literal["gelu", "swiglu", "moe"]
NormKind = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rotary"]

# Weight matrices of d_model x d_ff per MLP (per expert for ``moe``) and their names, in the order they run.
MLP_MATRICES: dict[str, tuple[str, ...]] = {"gelu": ("fc", "proj"), "swiglu": ("gate", "up", "down"),
                                            "moe": ("gate", "up", "down")}
# Parameters of one norm per unit of width: LayerNorm has a weight and a bias, RMSNorm a weight.
NORM_WIDTHS: dict[str, int] = {"layernorm": 2, "rmsnorm": 1}


@dataclass(frozen=True)
class FamilyDescription:
    """How one family builds its blocks: what the formulas and the workloads read instead of the family's name.

    Args:
        name: the family's name (the key of :data:`FAMILIES` it was registered under may be an alias).
        projections: ``fused`` (one Linear d -> q + 2 kv, GPT-2's ``c_attn``) or ``separate`` (q, k, v Linears).
        mlp: ``gelu`` (fc, GELU, proj), ``swiglu`` (down(silu(gate(x)) * up(x))) or ``moe`` (a router and SwiGLU
            experts).
        norm: ``layernorm`` (``native_layer_norm``: saves its input, mean and rstd) or ``rmsnorm`` (``F.rms_norm``:
            saves its fp32 input, rstd and normalized tensor).
        positions: ``learned`` (a max_seq_len x d_model table, position ids made in the forward) or ``rotary``
            (cos and sin buffers of max_seq_len x head_dim, no parameters).
        bias: whether Linear layers carry a bias unless the spec says otherwise.
        tied: whether the LM head reuses the token embedding unless the spec says otherwise.
        default_d_ff: the MLP width as a multiple of d_model when the spec gives none; 0: the spec must give it.
        norm_names: the names of the two block norms and the final norm (as the reference models and the step's
            timeline label them).
        embedding_name: the token embedding's name.
    """

    name: str
    projections: Projections
    mlp: MLPKind
    norm: NormKind
    positions: Positions
    bias: bool
    tied: bool
    default_d_ff: int
    norm_names: tuple[str, str, str]
    embedding_name: str

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of d_model x d_ff in the MLP (in each expert for ``moe``)."""
        return len(MLP_MATRICES[self.mlp])

    @property
    def mlp_names(self) -> tuple[str, ...]:
        """The MLP's matrices in the order they run: ``fc``/``proj`` or ``gate``/``up``/``down``."""
        return MLP_MATRICES[self.mlp]

    @property
    def norm_width(self) -> int:
        """Parameters of one norm per unit of d_model: 2 (weight and bias) or 1 (weight)."""
        return NORM_WIDTHS[self.norm]

    @property
    def learned_positions(self) -> bool:
        return self.positions == "learned"

    @property
    def rotary(self) -> bool:
        return self.positions == "rotary"

    @property
    def moe(self) -> bool:
        """Whether the MLP is a Mixture of Experts (the spec then gives ``n_experts`` and ``experts_per_token``)."""
        return self.mlp == "moe"


GPT2 = FamilyDescription(
    name="gpt2", projections="fused", mlp="gelu", norm="layernorm", positions="learned", bias=True, tied=True,
    default_d_ff=4, norm_names=("ln_1", "ln_2", "ln_f"), embedding_name="wte",
)
LLAMA = FamilyDescription(
    name="llama", projections="separate", mlp="swiglu", norm="rmsnorm", positions="rotary", bias=False, tied=False,
    default_d_ff=0, norm_names=("norm_1", "norm_2", "norm"), embedding_name="embed_tokens",
)
MIXTRAL = FamilyDescription(
    name="mixtral", projections="separate", mlp="moe", norm="rmsnorm", positions="rotary", bias=False, tied=False,
    default_d_ff=0, norm_names=("norm_1", "norm_2", "norm"), embedding_name="embed_tokens",
)

FAMILIES: dict[str, FamilyDescription] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,  # LLaMA's architecture; the sliding window is the spec's ``sliding_window``
    "mixtral": MIXTRAL,
}


def get_family(name: str) -> FamilyDescription:
    """The description of the family called ``name``; ValueError naming it and the known families otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"family={name!r} is not one of {', '.join(FAMILIES)}") from None
